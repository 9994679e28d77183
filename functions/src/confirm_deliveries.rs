//! POST /messages/delivered: the recipient confirms up to 500 messages in one round trip, with
//! the same erasure as `PUT /messages/{id}/delivered`.

use std::collections::HashSet;

use common::domain::canonical_uuid;
use common::http::{Caller, authenticate, json_body};
use common::response::json_response;
use common::runtime::HandlerResult;
use common::{ApiError, AppState};
use lambda_http::Request;
use lambda_http::http::StatusCode;
use serde::Serialize;
use uuid::Uuid;

/// Most ids one request may confirm.
pub const MAX_IDS: usize = 500;

/// 500 ids with generous whitespace.
const MAX_BODY_BYTES: usize = 64 * 1024;

/// Marking delivered and erasing the ciphertext is one statement, scoped by recipient, so no
/// delivered message's content outlives the confirmation and nobody confirms another's
/// messages (nor another device's of the same account). Already delivered ones match again
/// (confirming twice is fine). The caller row makes a removed device's token 401.
pub const CONFIRM_SQL: &str = r#"
WITH caller AS (SELECT user_id, device_id FROM devices WHERE user_id = $1 AND device_id = $3),
confirmed AS (
    UPDATE messages SET is_delivered = true, encrypted_data = NULL
    WHERE recipient_id = (SELECT user_id FROM caller)
      AND recipient_device_id = (SELECT device_id FROM caller)
      AND id = ANY($2)
    RETURNING id
)
SELECT EXISTS (SELECT 1 FROM caller) AS caller_exists, ARRAY (SELECT id FROM confirmed) AS confirmed
"#;

#[derive(Debug, Serialize)]
pub struct Confirmed {
    pub confirmed: usize,
    pub not_found: Vec<Uuid>,
}

/// Confirms `ids` for `caller`: the ids that were messages to the caller's device, or 401 when
/// that device or its account is gone.
pub async fn confirm(
    state: &AppState,
    caller: Caller,
    ids: &[Uuid],
) -> Result<HashSet<Uuid>, ApiError> {
    let (caller_exists, confirmed): (bool, Vec<Uuid>) = state
        .db
        .query_as(CONFIRM_SQL)
        .bind(caller.user_id)
        .bind(ids)
        .bind(caller.device_id)
        .fetch_one(state.pool())
        .await?;
    if !caller_exists {
        return Err(ApiError::Unauthorized);
    }
    Ok(confirmed.into_iter().collect())
}

pub async fn handler(state: &AppState, request: Request) -> HandlerResult {
    let caller = authenticate(&request, state.jwt()?)?;
    let body = json_body(&request, MAX_BODY_BYTES)?;
    let raw = body.required_array("ids")?;
    if raw.is_empty() || raw.len() > MAX_IDS {
        return Err(ApiError::validation(
            "ids",
            format!("ids must hold 1 to {MAX_IDS} message ids"),
        ));
    }
    let ids = raw
        .iter()
        .map(|id| id.as_str().and_then(canonical_uuid))
        .collect::<Option<Vec<Uuid>>>()
        .ok_or_else(|| ApiError::bad_field("ids", "every id must be a message id (a UUID)"))?;

    let confirmed = confirm(state, caller, &ids).await?;
    let mut seen = HashSet::with_capacity(ids.len());
    let not_found = ids
        .iter()
        .filter(|id| !confirmed.contains(id) && seen.insert(**id))
        .copied()
        .collect();
    Ok(json_response(
        StatusCode::OK,
        &Confirmed {
            confirmed: confirmed.len(),
            not_found,
        },
    ))
}
