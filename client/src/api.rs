//! The HTTP contract of `shared/API.md`, one blocking call per endpoint (ureq, rustls with ring).
//! Nothing here retries or logs: the caller decides (see `app`).

use chrono::{DateTime, Utc};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::time::Duration;
use ureq::http::Response;
use uuid::Uuid;

/// A failed call. Never holds a password, a token or ciphertext: the server's own `message` is
/// by contract free of them, and transport errors name only the endpoint.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("cannot reach the API ({reason})")]
    Transport { reason: String, timeout: bool },
    #[error("the API answered {status} {code}: {message}")]
    Status {
        status: u16,
        code: String,
        message: String,
        retry_after: Option<u64>,
    },
    #[error("unexpected answer from the API (HTTP {status}): {reason}")]
    Decode { status: u16, reason: String },
}

impl ApiError {
    pub fn status(&self) -> Option<u16> {
        match self {
            ApiError::Status { status, .. } | ApiError::Decode { status, .. } => Some(*status),
            ApiError::Transport { .. } => None,
        }
    }

    pub fn code(&self) -> Option<&str> {
        match self {
            ApiError::Status { code, .. } => Some(code),
            _ => None,
        }
    }

    /// A failure after which the same request may be sent again unchanged: no answer at all
    /// (timeout, reset), or a server-side 5xx.
    pub fn is_transient(&self) -> bool {
        match self {
            ApiError::Transport { .. } => true,
            ApiError::Status { status, .. } | ApiError::Decode { status, .. } => *status >= 500,
        }
    }
}

#[derive(Deserialize)]
pub struct Token {
    pub access_token: String,
    pub expires_in: u64,
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Token(.., expires_in: {})", self.expires_in)
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct Account {
    pub id: Uuid,
    pub name: String,
    pub public_key: String,
    pub created_at: DateTime<Utc>,
    #[serde(default)]
    pub key_updated_at: Option<DateTime<Utc>>,
}

/// `GET /users?name=` and `GET /public-key/{id}`.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct Directory {
    pub user_id: Uuid,
    pub name: String,
    pub public_key: String,
    #[serde(default)]
    pub key_updated_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct Sent {
    pub id: Uuid,
    pub sender_id: Uuid,
    pub recipient_id: Uuid,
    pub timestamp: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    /// `Idempotent-Replayed: true`: a retry found the first send stored.
    #[serde(skip)]
    pub replayed: bool,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
pub struct Message {
    pub id: Uuid,
    pub sender_id: Uuid,
    pub recipient_id: Uuid,
    pub encrypted_data: String,
    pub timestamp: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
}

#[derive(Debug, Deserialize)]
pub struct Page {
    pub messages: Vec<Message>,
    pub has_more: bool,
}

#[derive(Debug, Deserialize)]
pub struct Confirmed {
    pub confirmed: u64,
    #[serde(default)]
    pub not_found: Vec<Uuid>,
}

#[derive(Deserialize)]
struct ErrorBody {
    error: String,
    #[serde(default)]
    message: String,
}

/// A client of one API base URL.
#[derive(Clone)]
pub struct Api {
    agent: ureq::Agent,
    base: String,
}

impl fmt::Debug for Api {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Api({})", self.base)
    }
}

/// Per-call budgets: a connection is made quickly or not at all, and no call hangs forever.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

impl Api {
    pub fn new(base: &str) -> Self {
        Self::with_timeout(base, CALL_TIMEOUT)
    }

    pub fn with_timeout(base: &str, timeout: Duration) -> Self {
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(CONNECT_TIMEOUT.min(timeout)))
            .timeout_global(Some(timeout))
            .user_agent(concat!("messenger/", env!("CARGO_PKG_VERSION")))
            .build()
            .into();
        Api {
            agent,
            base: base.trim_end_matches('/').to_string(),
        }
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    pub fn register(
        &self,
        name: &str,
        password: &str,
        public_key: &str,
    ) -> Result<Account, ApiError> {
        let body =
            serde_json::json!({"name": name, "password": password, "public_key": public_key});
        let resp = self
            .agent
            .post(self.url("/register"))
            .header("Content-Type", "application/json")
            .send(body.to_string());
        expect(resp, 201)
    }

    pub fn login(&self, name: &str, password: &str) -> Result<Token, ApiError> {
        let body = serde_json::json!({"name": name, "password": password});
        let resp = self
            .agent
            .post(self.url("/login"))
            .header("Content-Type", "application/json")
            .send(body.to_string());
        expect(resp, 200)
    }

    pub fn me(&self, token: &str) -> Result<Account, ApiError> {
        let resp = self
            .agent
            .get(self.url("/me"))
            .header("Authorization", bearer(token))
            .call();
        expect(resp, 200)
    }

    pub fn delete_me(&self, token: &str, password: &str) -> Result<(), ApiError> {
        let body = serde_json::json!({"password": password});
        let resp = self
            .agent
            .delete(self.url("/me"))
            .header("Authorization", bearer(token))
            .header("Content-Type", "application/json")
            .force_send_body()
            .send(body.to_string());
        expect_empty(resp, 204)
    }

    pub fn lookup_user(&self, token: &str, name: &str) -> Result<Directory, ApiError> {
        let resp = self
            .agent
            .get(self.url("/users"))
            .query("name", name)
            .header("Authorization", bearer(token))
            .call();
        expect(resp, 200)
    }

    pub fn public_key(&self, token: &str, user_id: Uuid) -> Result<Directory, ApiError> {
        let resp = self
            .agent
            .get(self.url(&format!("/public-key/{user_id}")))
            .header("Authorization", bearer(token))
            .call();
        expect(resp, 200)
    }

    pub fn update_key(&self, token: &str, public_key: &str) -> Result<Account, ApiError> {
        let body = serde_json::json!({"public_key": public_key});
        let resp = self
            .agent
            .put(self.url("/update-key"))
            .header("Authorization", bearer(token))
            .header("Content-Type", "application/json")
            .send(body.to_string());
        expect(resp, 200)
    }

    /// `POST /messages` with `Idempotency-Key`; one attempt.
    pub fn send_message(
        &self,
        token: &str,
        recipient_id: Uuid,
        encrypted_data_b64: &str,
        idempotency_key: &str,
    ) -> Result<Sent, ApiError> {
        let body =
            serde_json::json!({"recipient_id": recipient_id, "encrypted_data": encrypted_data_b64});
        let resp = self
            .agent
            .post(self.url("/messages"))
            .header("Authorization", bearer(token))
            .header("Content-Type", "application/json")
            .header("Idempotency-Key", idempotency_key)
            .send(body.to_string());
        let mut replayed = false;
        let resp = resp.inspect(|r| {
            replayed = r
                .headers()
                .get("idempotent-replayed")
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.eq_ignore_ascii_case("true"));
        });
        let mut sent: Sent = expect(resp, 201)?;
        sent.replayed = replayed;
        Ok(sent)
    }

    pub fn messages(&self, token: &str, after: Option<Uuid>, limit: u32) -> Result<Page, ApiError> {
        let mut req = self
            .agent
            .get(self.url("/messages"))
            .query("limit", limit.to_string())
            .header("Authorization", bearer(token));
        if let Some(after) = after {
            req = req.query("after", after.to_string());
        }
        expect(req.call(), 200)
    }

    /// `POST /messages/delivered`: many confirmations in one round trip.
    pub fn confirm_many(&self, token: &str, ids: &[Uuid]) -> Result<Confirmed, ApiError> {
        let body = serde_json::json!({"ids": ids});
        let resp = self
            .agent
            .post(self.url("/messages/delivered"))
            .header("Authorization", bearer(token))
            .header("Content-Type", "application/json")
            .send(body.to_string());
        expect(resp, 200)
    }

    /// `PUT /messages/{id}/delivered`.
    pub fn confirm_one(&self, token: &str, id: Uuid) -> Result<(), ApiError> {
        let resp = self
            .agent
            .put(self.url(&format!("/messages/{id}/delivered")))
            .header("Authorization", bearer(token))
            .send_empty();
        expect_empty(resp, 204)
    }
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

fn transport(e: ureq::Error) -> ApiError {
    let timeout = matches!(e, ureq::Error::Timeout(_));
    ApiError::Transport {
        reason: e.to_string(),
        timeout,
    }
}

fn read_body(resp: Response<ureq::Body>) -> Result<(u16, Option<u64>, Vec<u8>), ApiError> {
    let status = resp.status().as_u16();
    let retry_after = resp
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok());
    let body = resp
        .into_body()
        .with_config()
        .limit(16 * 1024 * 1024)
        .read_to_vec()
        .map_err(transport)?;
    Ok((status, retry_after, body))
}

fn error_from(status: u16, retry_after: Option<u64>, body: &[u8]) -> ApiError {
    match serde_json::from_slice::<ErrorBody>(body) {
        Ok(e) => ApiError::Status {
            status,
            code: e.error,
            message: e.message,
            retry_after,
        },
        Err(_) => ApiError::Status {
            status,
            code: "unknown".into(),
            message: "(no error body from the contract)".into(),
            retry_after,
        },
    }
}

fn expect<T: DeserializeOwned>(
    resp: Result<Response<ureq::Body>, ureq::Error>,
    want: u16,
) -> Result<T, ApiError> {
    let (status, retry_after, body) = read_body(resp.map_err(transport)?)?;
    if status != want {
        return Err(error_from(status, retry_after, &body));
    }
    serde_json::from_slice(&body).map_err(|e| ApiError::Decode {
        status,
        // Where, never what: serde's own message can quote a value (a token, say).
        reason: format!(
            "{:?} error in its JSON at line {} column {}",
            e.classify(),
            e.line(),
            e.column()
        ),
    })
}

fn expect_empty(
    resp: Result<Response<ureq::Body>, ureq::Error>,
    want: u16,
) -> Result<(), ApiError> {
    let (status, retry_after, body) = read_body(resp.map_err(transport)?)?;
    if status != want {
        return Err(error_from(status, retry_after, &body));
    }
    Ok(())
}
