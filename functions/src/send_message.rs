//! POST /messages: store ciphertext for an existing recipient until it is confirmed or expires.

use chrono::{DateTime, Utc};
use common::domain::{Ciphertext, canonical_uuid};
use common::http::{authenticate, json_body, json_response};
use common::runtime::HandlerResult;
use common::{ApiError, AppState};
use lambda_http::Request;
use lambda_http::http::StatusCode;
use serde::Serialize;
use uuid::Uuid;

#[derive(Debug, Serialize, sqlx::FromRow)]
pub struct Sent {
    pub id: Uuid,
    pub sender_id: Uuid,
    pub recipient_id: Uuid,
    pub timestamp: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
}

/// One round trip: the row is inserted only if the recipient exists (no row back means 404); a
/// sender whose account is gone fails the foreign key (401).
pub const INSERT_SQL: &str = r#"
INSERT INTO messages (id, sender_id, recipient_id, encrypted_data, "timestamp", expires_at)
SELECT $1, $2, u.id, $4, now(), now() + make_interval(secs => $5)
FROM users u WHERE u.id = $3
RETURNING id, sender_id, recipient_id, "timestamp", expires_at
"#;

pub async fn handler(state: &AppState, request: Request) -> HandlerResult {
    let sender = authenticate(&request, &state.jwt)?;
    let config = &state.config;
    let body = json_body(&request, config.max_body_bytes())?;
    let recipient_id = canonical_uuid(body.required_str("recipient_id")?)
        .ok_or_else(|| ApiError::validation("recipient_id", "recipient_id must be a UUID"))?;
    let ciphertext = Ciphertext::parse(
        body.required_str("encrypted_data")?,
        config.max_message_bytes,
    )?;

    let sent: Option<Sent> = sqlx::query_as(INSERT_SQL)
        .bind(Uuid::now_v7())
        .bind(sender)
        .bind(recipient_id)
        .bind(ciphertext.into_bytes())
        .bind(config.message_ttl_seconds as f64)
        .fetch_optional(state.pool())
        .await
        .map_err(|error| match &error {
            sqlx::Error::Database(db) if db.is_foreign_key_violation() => ApiError::Unauthorized,
            _ => error.into(),
        })?;
    let sent = sent.ok_or(ApiError::NotFound("no such recipient"))?;
    Ok(json_response(StatusCode::CREATED, &sent))
}
