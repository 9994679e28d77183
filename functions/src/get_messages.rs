//! GET /messages: the caller's undelivered, unexpired messages, oldest first, in pages.

use chrono::{DateTime, Utc};
use common::domain::{PageLimit, encode_ciphertext, parse_id};
use common::http::{authenticate, json_response, query_param};
use common::runtime::HandlerResult;
use common::{ApiError, AppState};
use lambda_http::Request;
use lambda_http::http::StatusCode;
use serde::Serialize;
use uuid::Uuid;

/// Ciphertext bytes one response may carry: its base64 (4/3 larger) plus JSON stays under
/// Lambda's 6 MB response limit. A single larger message is still returned on its own.
pub const PAGE_CIPHERTEXT_BUDGET: i64 = 4 * 1024 * 1024;

#[derive(Debug, Serialize)]
pub struct Message {
    pub id: Uuid,
    pub sender_id: Uuid,
    pub recipient_id: Uuid,
    pub encrypted_data: String,
    pub timestamp: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
}

#[derive(Debug, Serialize)]
pub struct Page {
    pub messages: Vec<Message>,
    pub has_more: bool,
}

/// One indexed query (messages_pending_by_recipient): up to limit + 1 candidates after the
/// cursor, cut where their ciphertext would exceed the response budget. The caller row makes a
/// deleted account's token 401 rather than an empty page.
pub const PAGE_SQL: &str = r#"
WITH caller AS (SELECT id FROM users WHERE id = $1),
candidates AS (
    SELECT m.id, m.sender_id, m.recipient_id, m.encrypted_data, m."timestamp", m.expires_at,
           sum(octet_length(m.encrypted_data)) OVER (ORDER BY m.id) AS running_bytes,
           row_number() OVER (ORDER BY m.id) AS position
    FROM messages m
    WHERE m.recipient_id = (SELECT id FROM caller)
      AND NOT m.is_delivered
      AND m.expires_at > now()
      AND m.id > $2
    ORDER BY m.id
    LIMIT $3 + 1
)
SELECT c.id, c.sender_id, c.recipient_id, c.encrypted_data, c."timestamp", c.expires_at,
       (SELECT count(*) FROM candidates) AS candidate_count
FROM caller
LEFT JOIN candidates c ON c.position <= $3 AND (c.position = 1 OR c.running_bytes <= $4)
ORDER BY c.id
"#;

#[derive(sqlx::FromRow)]
struct Row {
    id: Option<Uuid>,
    sender_id: Option<Uuid>,
    recipient_id: Option<Uuid>,
    encrypted_data: Option<Vec<u8>>,
    timestamp: Option<DateTime<Utc>>,
    expires_at: Option<DateTime<Utc>>,
    candidate_count: i64,
}

pub async fn handler(state: &AppState, request: Request) -> HandlerResult {
    let caller = authenticate(&request, &state.jwt)?;
    let limit = PageLimit::parse(query_param(&request, "limit").as_deref())?;
    // Ids are UUIDv7, so id order is time order and a cursor works even once its message is gone.
    let after = match query_param(&request, "after") {
        Some(raw) => parse_id(&raw, "after")?,
        None => Uuid::nil(),
    };
    let rows: Vec<Row> = sqlx::query_as(PAGE_SQL)
        .bind(caller)
        .bind(after)
        .bind(i64::from(limit.get()))
        .bind(PAGE_CIPHERTEXT_BUDGET)
        .fetch_all(state.pool())
        .await?;
    // No row at all: the caller's account is gone.
    let candidate_count = rows.first().ok_or(ApiError::Unauthorized)?.candidate_count;
    let messages: Vec<Message> = rows
        .into_iter()
        .filter_map(|row| {
            Some(Message {
                id: row.id?,
                sender_id: row.sender_id?,
                recipient_id: row.recipient_id?,
                encrypted_data: encode_ciphertext(&row.encrypted_data?),
                timestamp: row.timestamp?,
                expires_at: row.expires_at?,
            })
        })
        .collect();
    let has_more = candidate_count > messages.len() as i64;
    Ok(json_response(StatusCode::OK, &Page { messages, has_more }))
}
