//! The HTTP edge: the one place where failures become the contract's statuses and
//! `{"error","message"}` body. The layers below refuse in their own terms (`Refusal`,
//! `TokenError`, `HashError`; `sqlx::Error` beside the database code in `db.rs`) and are mapped
//! here. Internal details are logged here and never sent to the client.

use lambda_http::http::{HeaderValue, StatusCode, header};
use lambda_http::{Body, Response};
use serde::Serialize;

use crate::domain::{Refusal, RefusalKind};
use crate::jwt::TokenError;
use crate::password::HashError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{message}")]
    BadRequest {
        message: String,
        field: Option<&'static str>,
    },
    #[error("missing, malformed or expired bearer token")]
    Unauthorized,
    #[error("invalid name or password")]
    InvalidCredentials,
    #[error("{0}")]
    Forbidden(&'static str),
    #[error("the link code is unknown, expired, already used or another account's")]
    LinkCodeInvalid,
    #[error("{0}")]
    NotFound(&'static str),
    #[error("{0}")]
    Conflict(&'static str),
    /// A multi-device send that does not name the recipient's current devices and keys. The
    /// object's fields (`missing`, `extra`, `stale`, `devices`) join the error body.
    #[error("the recipient's devices or keys changed: seal for the devices listed")]
    DevicesChanged(Box<serde_json::Map<String, serde_json::Value>>),
    #[error("the account already has as many devices as allowed")]
    DeviceLimit,
    #[error("{message}")]
    PayloadTooLarge {
        message: String,
        field: Option<&'static str>,
    },
    #[error("method not allowed")]
    MethodNotAllowed { allow: String },
    #[error("{message}")]
    Validation {
        field: &'static str,
        message: String,
    },
    #[error("this Idempotency-Key was already used for a different request")]
    IdempotencyKeyReused,
    #[error("{field} does not verify; nothing was stored")]
    InvalidSignature { field: &'static str },
    #[error("too many attempts, retry later")]
    RateLimited { retry_after_seconds: u64 },
    #[error("the recipient's mailbox is full, retry later")]
    MailboxFull { retry_after_seconds: u64 },
    /// Never shown to the client: logged, then answered with a generic 500.
    #[error("internal error: {0}")]
    Internal(String),
    /// The database could not be reached; the reason is short and holds no secret.
    #[error("database unavailable: {0}")]
    Unavailable(String),
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'static str,
    message: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    field: Option<&'static str>,
}

impl ApiError {
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::BadRequest {
            message: message.into(),
            field: None,
        }
    }

    pub fn bad_field(field: &'static str, message: impl Into<String>) -> Self {
        Self::BadRequest {
            message: message.into(),
            field: Some(field),
        }
    }

    pub fn validation(field: &'static str, message: impl Into<String>) -> Self {
        Self::Validation {
            field,
            message: message.into(),
        }
    }

    pub fn internal(error: impl std::fmt::Display) -> Self {
        Self::Internal(error.to_string())
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::BadRequest { .. } => StatusCode::BAD_REQUEST,
            Self::Unauthorized | Self::InvalidCredentials => StatusCode::UNAUTHORIZED,
            Self::Forbidden(_) | Self::LinkCodeInvalid => StatusCode::FORBIDDEN,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::Conflict(_) | Self::DevicesChanged(_) | Self::DeviceLimit => StatusCode::CONFLICT,
            Self::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            Self::Validation { .. }
            | Self::IdempotencyKeyReused
            | Self::InvalidSignature { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            Self::RateLimited { .. } | Self::MailboxFull { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            Self::BadRequest { .. } => "bad_request",
            Self::Unauthorized => "unauthorized",
            Self::InvalidCredentials => "invalid_credentials",
            Self::Forbidden(_) => "forbidden",
            Self::LinkCodeInvalid => "link_code_invalid",
            Self::NotFound(_) => "not_found",
            Self::Conflict(_) => "conflict",
            Self::DevicesChanged(_) => "devices_changed",
            Self::DeviceLimit => "device_limit",
            Self::PayloadTooLarge { .. } => "payload_too_large",
            Self::MethodNotAllowed { .. } => "method_not_allowed",
            Self::Validation { .. } => "validation_failed",
            Self::IdempotencyKeyReused => "idempotency_key_reused",
            Self::InvalidSignature { .. } => "invalid_signature",
            Self::RateLimited { .. } => "rate_limited",
            Self::MailboxFull { .. } => "mailbox_full",
            Self::Internal(_) => "internal",
            Self::Unavailable(_) => "unavailable",
        }
    }

    fn field(&self) -> Option<&'static str> {
        match self {
            Self::BadRequest { field, .. } | Self::PayloadTooLarge { field, .. } => *field,
            Self::Validation { field, .. } | Self::InvalidSignature { field } => Some(field),
            _ => None,
        }
    }

    /// The message a client may see.
    fn public_message(&self) -> String {
        match self {
            Self::Internal(_) => "internal error".to_string(),
            Self::Unavailable(_) => "the database is unavailable, retry shortly".to_string(),
            other => other.to_string(),
        }
    }

    /// The error body as JSON, for responses that add fields to it (e.g. readiness).
    pub fn body(&self) -> serde_json::Value {
        let mut body = serde_json::to_value(ErrorBody {
            error: self.code(),
            message: &self.public_message(),
            field: self.field(),
        })
        .expect("an error body always serializes");
        if let (Self::DevicesChanged(extra), Some(object)) = (self, body.as_object_mut()) {
            object.extend(extra.iter().map(|(k, v)| (k.clone(), v.clone())));
        }
        body
    }

    pub fn into_response(self) -> Response<Body> {
        self.response_with_body(self.body())
    }

    pub fn response_with_body(&self, body: serde_json::Value) -> Response<Body> {
        match self {
            Self::Internal(detail) => tracing::error!(error = %detail, "internal error"),
            Self::Unavailable(detail) => tracing::warn!(error = %detail, "database unavailable"),
            _ => {}
        }
        let mut response = crate::response::json_response(self.status(), &body);
        let headers = response.headers_mut();
        match self {
            // RFC 9110: every 401 carries a challenge.
            Self::Unauthorized | Self::InvalidCredentials => {
                headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            Self::RateLimited {
                retry_after_seconds,
            }
            | Self::MailboxFull {
                retry_after_seconds,
            } => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(*retry_after_seconds));
            }
            Self::MethodNotAllowed { allow } => {
                if let Ok(v) = HeaderValue::from_str(allow) {
                    headers.insert(header::ALLOW, v);
                }
            }
            _ => {}
        }
        response
    }
}

impl From<Refusal> for ApiError {
    fn from(refusal: Refusal) -> Self {
        let Refusal {
            kind,
            field,
            message,
        } = refusal;
        match (kind, field) {
            (RefusalKind::BreaksRule, Some(field)) => Self::Validation { field, message },
            (RefusalKind::BreaksRule, None) | (RefusalKind::Malformed, _) => {
                Self::BadRequest { message, field }
            }
            (RefusalKind::TooLarge, field) => Self::PayloadTooLarge { message, field },
        }
    }
}

impl From<TokenError> for ApiError {
    fn from(error: TokenError) -> Self {
        match error {
            TokenError::Refused => Self::Unauthorized,
            TokenError::Signing(detail) => Self::Internal(detail),
        }
    }
}

impl From<HashError> for ApiError {
    fn from(error: HashError) -> Self {
        Self::internal(error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(e: ApiError) -> (u16, serde_json::Value, lambda_http::http::HeaderMap) {
        let r = e.into_response();
        let status = r.status().as_u16();
        let headers = r.headers().clone();
        let body = match r.body() {
            Body::Text(t) => serde_json::from_str(t).unwrap(),
            other => panic!("unexpected body {other:?}"),
        };
        (status, body, headers)
    }

    #[test]
    fn every_variant_maps_to_the_contract_table() {
        let cases = [
            (ApiError::bad_request("x"), 400, "bad_request"),
            (ApiError::Unauthorized, 401, "unauthorized"),
            (ApiError::InvalidCredentials, 401, "invalid_credentials"),
            (ApiError::Forbidden("device 1"), 403, "forbidden"),
            (ApiError::LinkCodeInvalid, 403, "link_code_invalid"),
            (ApiError::DeviceLimit, 409, "device_limit"),
            (
                ApiError::DevicesChanged(Box::default()),
                409,
                "devices_changed",
            ),
            (
                ApiError::InvalidSignature {
                    field: "binding_sig",
                },
                422,
                "invalid_signature",
            ),
            (ApiError::NotFound("no such user"), 404, "not_found"),
            (ApiError::Conflict("name already taken"), 409, "conflict"),
            (
                ApiError::PayloadTooLarge {
                    message: "x".into(),
                    field: None,
                },
                413,
                "payload_too_large",
            ),
            (
                ApiError::MethodNotAllowed {
                    allow: "GET".into(),
                },
                405,
                "method_not_allowed",
            ),
            (ApiError::validation("name", "x"), 422, "validation_failed"),
            (
                ApiError::RateLimited {
                    retry_after_seconds: 7,
                },
                429,
                "rate_limited",
            ),
            (
                ApiError::IdempotencyKeyReused,
                422,
                "idempotency_key_reused",
            ),
            (
                ApiError::MailboxFull {
                    retry_after_seconds: 60,
                },
                429,
                "mailbox_full",
            ),
            (ApiError::internal("boom"), 500, "internal"),
            (ApiError::Unavailable("refused".into()), 503, "unavailable"),
        ];
        for (error, status, code) in cases {
            let (s, body, _) = parts(error);
            assert_eq!((s, body["error"].as_str().unwrap()), (status, code));
            assert!(body["message"].is_string());
        }
    }

    #[test]
    fn headers_the_contract_requires() {
        let (_, _, h) = parts(ApiError::Unauthorized);
        assert_eq!(h["www-authenticate"], "Bearer");
        let (_, _, h) = parts(ApiError::InvalidCredentials);
        assert_eq!(h["www-authenticate"], "Bearer");
        let (_, _, h) = parts(ApiError::MailboxFull {
            retry_after_seconds: 9,
        });
        assert_eq!(h["retry-after"], "9");
        let (_, _, h) = parts(ApiError::RateLimited {
            retry_after_seconds: 42,
        });
        assert_eq!(h["retry-after"], "42");
        let (_, _, h) = parts(ApiError::MethodNotAllowed {
            allow: "GET, POST".into(),
        });
        assert_eq!(h["allow"], "GET, POST");
        assert_eq!(h["content-type"], "application/json");
    }

    #[test]
    fn internals_never_reach_the_client() {
        let (_, body, _) = parts(ApiError::internal("relation users password=swordfish"));
        assert_eq!(body["message"], "internal error");
        let (_, body, _) = parts(ApiError::Unavailable("connection refused".into()));
        assert!(!body.to_string().contains("refused"));
    }

    #[test]
    fn validation_errors_name_the_field() {
        let (_, body, _) = parts(ApiError::validation("password", "too short"));
        assert_eq!(body["field"], "password");
        let (_, body, _) = parts(ApiError::NotFound("no such user"));
        assert!(body.get("field").is_none());
    }
}
