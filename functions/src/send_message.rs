//! POST /messages: store ciphertext for an existing recipient until it is confirmed or expires.
//! Retries with an `Idempotency-Key` store nothing new and get the first answer again.

use chrono::{DateTime, Utc};
use common::domain::{Ciphertext, IdempotencyKey, canonical_uuid};
use common::http::{authenticate, json_body};
use common::response::json_response;
use common::runtime::HandlerResult;
use common::{ApiError, AppState};
use lambda_http::Request;
use lambda_http::http::{HeaderName, HeaderValue, StatusCode};
use serde::Serialize;
use sha2::{Digest, Sha256};
use uuid::Uuid;

pub const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
pub const IDEMPOTENT_REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");

#[derive(Debug, Serialize)]
pub struct Sent {
    pub id: Uuid,
    pub sender_id: Uuid,
    pub recipient_id: Uuid,
    pub timestamp: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
}

/// One call of the `send_message()` function (migrations/20261130000001): an earlier answer to
/// this key, the sender's quota, the recipient's mailbox lock and quota, the id, the insert. A
/// sender whose account is gone fails the foreign key (401).
pub const SEND_SQL: &str = r#"
SELECT outcome, id, sender_id, recipient_id, "timestamp", expires_at, retry_after
FROM send_message($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
"#;

#[derive(sqlx::FromRow)]
struct Outcome {
    outcome: String,
    id: Option<Uuid>,
    sender_id: Option<Uuid>,
    recipient_id: Option<Uuid>,
    timestamp: Option<DateTime<Utc>>,
    expires_at: Option<DateTime<Utc>>,
    retry_after: i64,
}

impl Outcome {
    fn sent(self) -> Result<Sent, ApiError> {
        match (
            self.id,
            self.sender_id,
            self.recipient_id,
            self.timestamp,
            self.expires_at,
        ) {
            (Some(id), Some(sender_id), Some(recipient_id), Some(timestamp), Some(expires_at)) => {
                Ok(Sent {
                    id,
                    sender_id,
                    recipient_id,
                    timestamp,
                    expires_at,
                })
            }
            _ => Err(ApiError::internal("send_message() stored no row")),
        }
    }
}

/// What tells one request from another under the same key: its recipient and ciphertext, as a
/// digest, so nothing readable outlives the erasure of the ciphertext at confirmation.
pub fn request_digest(recipient_id: Uuid, ciphertext: &[u8]) -> Vec<u8> {
    let mut digest = Sha256::new();
    digest.update(recipient_id.as_bytes());
    digest.update(ciphertext);
    digest.finalize().to_vec()
}

/// The `Idempotency-Key` header, if any; malformed or repeated is 400.
fn idempotency_key(request: &Request) -> Result<Option<IdempotencyKey>, ApiError> {
    let mut values = request.headers().get_all(IDEMPOTENCY_KEY).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(ApiError::bad_request("send one Idempotency-Key"));
    }
    let raw = value.to_str().unwrap_or_default();
    Ok(Some(IdempotencyKey::parse(raw)?))
}

pub async fn handler(state: &AppState, request: Request) -> HandlerResult {
    let sender = authenticate(&request, state.jwt()?)?;
    let key = idempotency_key(&request)?;
    let config = &state.config;
    let body = json_body(&request, config.max_body_bytes())?;
    let recipient_id = canonical_uuid(body.required_str("recipient_id")?)
        .ok_or_else(|| ApiError::validation("recipient_id", "recipient_id must be a UUID"))?;
    let ciphertext = Ciphertext::parse(
        body.required_str("encrypted_data")?,
        config.max_message_bytes,
    )?
    .into_bytes();
    let digest = key
        .as_ref()
        .map(|_| request_digest(recipient_id, &ciphertext));

    let outcome: Outcome = state
        .db
        .query_as(SEND_SQL)
        .bind(Uuid::now_v7())
        .bind(sender)
        .bind(recipient_id)
        .bind(ciphertext)
        .bind(config.message_ttl_seconds as f64)
        .bind(key.as_ref().map(IdempotencyKey::as_str))
        .bind(digest)
        .bind(i32::try_from(config.send_max_per_window).unwrap_or(i32::MAX))
        .bind(config.send_window_seconds as f64)
        .bind(i32::try_from(config.max_pending_per_recipient).unwrap_or(i32::MAX))
        .bind(i64::try_from(config.max_pending_bytes_per_recipient).unwrap_or(i64::MAX))
        .fetch_one(state.pool())
        .await
        .map_err(|error| match &error {
            sqlx::Error::Database(db) if db.is_foreign_key_violation() => ApiError::Unauthorized,
            _ => error.into(),
        })?;
    let retry_after_seconds = outcome.retry_after.max(1) as u64;
    match outcome.outcome.as_str() {
        "stored" => Ok(json_response(StatusCode::CREATED, &outcome.sent()?)),
        "replayed" => {
            let mut response = json_response(StatusCode::CREATED, &outcome.sent()?);
            response
                .headers_mut()
                .insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
            Ok(response)
        }
        "key_reused" => Err(ApiError::IdempotencyKeyReused),
        "rate_limited" => Err(ApiError::RateLimited {
            retry_after_seconds,
        }),
        "mailbox_full" => Err(ApiError::MailboxFull {
            retry_after_seconds,
        }),
        "no_recipient" => Err(ApiError::NotFound("no such recipient")),
        other => Err(ApiError::internal(format!(
            "send_message() answered {other:?}"
        ))),
    }
}
