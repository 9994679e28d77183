//! GET /messages: the caller's undelivered, unexpired messages, oldest first, in pages.

use std::fmt::Write;

use chrono::{DateTime, SecondsFormat, Utc};
use common::domain::{PageLimit, encode_ciphertext_into, parse_id};
use common::http::{authenticate, query_param};
use common::response::json_text_response;
use common::runtime::HandlerResult;
use common::{ApiError, AppState};
use lambda_http::Request;
use lambda_http::http::StatusCode;
use uuid::Uuid;

/// Ciphertext bytes one response may carry: its base64 (4/3 larger) plus JSON stays under
/// Lambda's 6 MB response limit. A single larger message is still returned on its own.
pub const PAGE_CIPHERTEXT_BUDGET: i64 = 4 * 1024 * 1024;

/// One message of a page, ciphertext still raw.
#[derive(Debug)]
pub struct Message {
    pub id: Uuid,
    pub sender_id: Uuid,
    pub sender_device_id: i32,
    pub recipient_id: Uuid,
    pub recipient_device_id: i32,
    pub encrypted_data: Vec<u8>,
    pub timestamp: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
}

/// One indexed query (messages_pending_by_recipient): up to limit + 1 candidates after the
/// cursor, cut where their ciphertext would exceed the response budget. The caller row makes a
/// deleted account's token 401 rather than an empty page.
pub const PAGE_SQL: &str = r#"
WITH caller AS (SELECT user_id, device_id FROM devices WHERE user_id = $1 AND device_id = $5),
candidates AS (
    SELECT m.id, m.sender_id, m.sender_device_id, m.recipient_id, m.recipient_device_id,
           m.encrypted_data, m."timestamp", m.expires_at,
           sum(octet_length(m.encrypted_data)) OVER (ORDER BY m.id) AS running_bytes,
           row_number() OVER (ORDER BY m.id) AS position
    FROM messages m
    WHERE m.recipient_id = (SELECT user_id FROM caller)
      AND m.recipient_device_id = (SELECT device_id FROM caller)
      AND NOT m.is_delivered
      AND m.expires_at > now()
      AND m.id > $2
    ORDER BY m.id
    LIMIT $3 + 1
)
SELECT c.id, c.sender_id, c.sender_device_id, c.recipient_id, c.recipient_device_id,
       c.encrypted_data, c."timestamp", c.expires_at,
       (SELECT count(*) FROM candidates) AS candidate_count
FROM caller
LEFT JOIN candidates c ON c.position <= $3 AND (c.position = 1 OR c.running_bytes <= $4)
ORDER BY c.id
"#;

#[derive(sqlx::FromRow)]
struct Row {
    id: Option<Uuid>,
    sender_id: Option<Uuid>,
    sender_device_id: Option<i32>,
    recipient_id: Option<Uuid>,
    recipient_device_id: Option<i32>,
    encrypted_data: Option<Vec<u8>>,
    timestamp: Option<DateTime<Utc>>,
    expires_at: Option<DateTime<Utc>>,
    candidate_count: i64,
}

pub async fn handler(state: &AppState, request: Request) -> HandlerResult {
    let caller = authenticate(&request, state.jwt()?)?;
    let limit = PageLimit::parse(query_param(&request, "limit").as_deref())?;
    // Ids are UUIDv7, so id order is time order and a cursor works even once its message is gone.
    let after = match query_param(&request, "after") {
        Some(raw) => parse_id(&raw, "after")?,
        None => Uuid::nil(),
    };
    let rows: Vec<Row> = state
        .db
        .query_as(PAGE_SQL)
        .bind(caller.user_id)
        .bind(after)
        .bind(i64::from(limit.get()))
        .bind(PAGE_CIPHERTEXT_BUDGET)
        .bind(caller.device_id)
        .fetch_all(state.pool())
        .await?;
    // No row at all: the caller's device (or account) is gone.
    let candidate_count = rows.first().ok_or(ApiError::Unauthorized)?.candidate_count;
    let messages: Vec<Message> = rows
        .into_iter()
        .filter_map(|row| {
            Some(Message {
                id: row.id?,
                sender_id: row.sender_id?,
                sender_device_id: row.sender_device_id?,
                recipient_id: row.recipient_id?,
                recipient_device_id: row.recipient_device_id?,
                encrypted_data: row.encrypted_data?,
                timestamp: row.timestamp?,
                expires_at: row.expires_at?,
            })
        })
        .collect();
    let has_more = candidate_count > messages.len() as i64;
    Ok(json_text_response(
        StatusCode::OK,
        page_json(&messages, has_more),
    ))
}

/// The page as JSON, written directly rather than through serde: the base64 goes straight into
/// the output, with no string per message and no escape scan over text that cannot need
/// escaping. A page carries up to 4 MiB of ciphertext, so this halves the passes over it.
/// Field for field what serde would write (the test compares the two).
pub fn page_json(messages: &[Message], has_more: bool) -> String {
    let mut out = String::with_capacity(page_capacity(messages));
    out.push_str(r#"{"messages":["#);
    for (i, m) in messages.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        // Writing to a String cannot fail.
        let _ = write!(
            out,
            r#"{{"id":"{}","sender_id":"{}","sender_device_id":{},"recipient_id":"{}","recipient_device_id":{},"encrypted_data":""#,
            m.id, m.sender_id, m.sender_device_id, m.recipient_id, m.recipient_device_id
        );
        encode_ciphertext_into(&m.encrypted_data, &mut out);
        let _ = write!(
            out,
            r#"","timestamp":"{}","expires_at":"{}"}}"#,
            rfc3339(&m.timestamp),
            rfc3339(&m.expires_at)
        );
    }
    let _ = write!(out, r#"],"has_more":{has_more}}}"#);
    out
}

/// At least the length of the page's JSON, so it is written without reallocating: three UUIDs
/// (108), two device ids (20 at most), two timestamps (60 at most, with nanoseconds), the keys
/// and punctuation (138).
fn page_capacity(messages: &[Message]) -> usize {
    const FIXED_PER_MESSAGE: usize = 326;
    32 + messages
        .iter()
        .map(|m| FIXED_PER_MESSAGE + m.encrypted_data.len().div_ceil(3) * 4)
        .sum::<usize>()
}

/// The form chrono's serde uses (and every other response of this API): RFC 3339, `Z`, as
/// many fraction digits as needed.
fn rfc3339(at: &DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::AutoSi, true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;
    use serde_json::{Value, json};

    fn message(seed: u8, len: usize, at: DateTime<Utc>) -> Message {
        Message {
            id: Uuid::now_v7(),
            sender_id: Uuid::now_v7(),
            sender_device_id: i32::from(seed) + 1,
            recipient_id: Uuid::now_v7(),
            recipient_device_id: i32::MAX - i32::from(seed),
            encrypted_data: (0..len).map(|i| (i as u8).wrapping_mul(seed)).collect(),
            timestamp: at,
            expires_at: at + chrono::Duration::days(7),
        }
    }

    /// What `serde_json` makes of the same page (the form the other endpoints write), with the
    /// base64 crate's own encoder as the oracle for the ciphertext.
    fn with_serde(messages: &[Message], has_more: bool) -> Value {
        let messages: Vec<Value> = messages
            .iter()
            .map(|m| {
                json!({
                    "id": m.id,
                    "sender_id": m.sender_id,
                    "sender_device_id": m.sender_device_id,
                    "recipient_id": m.recipient_id,
                    "recipient_device_id": m.recipient_device_id,
                    "encrypted_data": base64::engine::general_purpose::STANDARD.encode(&m.encrypted_data),
                    "timestamp": m.timestamp,
                    "expires_at": m.expires_at,
                })
            })
            .collect();
        json!({"messages": messages, "has_more": has_more})
    }

    #[test]
    fn page_json_is_what_serde_writes() {
        let whole = DateTime::from_timestamp(1_795_869_296, 0).unwrap();
        let cases = [
            (vec![], false),
            (vec![message(3, 0, whole)], true),
            (
                vec![
                    message(7, 1, whole + chrono::Duration::milliseconds(120)),
                    message(11, 2, whole + chrono::Duration::microseconds(123_456)),
                    message(13, 1024, whole + chrono::Duration::microseconds(5)),
                    message(17, 65_536, whole),
                ],
                false,
            ),
        ];
        for (messages, has_more) in cases {
            let ours = page_json(&messages, has_more);
            let parsed: Value = serde_json::from_str(&ours).expect("valid JSON");
            assert_eq!(parsed, with_serde(&messages, has_more));
            // Same strings byte for byte (timestamps included), and the key order of the contract.
            assert!(ours.starts_with(r#"{"messages":["#), "{ours}");
            assert!(
                ours.ends_with(&format!(r#"],"has_more":{has_more}}}"#)),
                "{ours}"
            );
        }
    }

    #[test]
    fn a_page_is_written_without_reallocating() {
        let at = DateTime::from_timestamp(1_795_869_296, 123_456_000).unwrap();
        for count in [0, 1, 10, 500] {
            let messages: Vec<_> = (0..count)
                .map(|i| message(i as u8, i * 37 % 2000, at))
                .collect();
            let text = page_json(&messages, true);
            // Had the buffer grown, its capacity would no longer be the one asked for.
            assert_eq!(
                text.capacity(),
                page_capacity(&messages),
                "{count} messages"
            );
        }
    }
}
