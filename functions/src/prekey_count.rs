//! GET /keys/prekeys/count: the token's device's stock of prekeys (API.md "Prekeys"), so that it
//! tops up its one-time keys when they run low: how many one-time keys are left and the lowest
//! id among them, and its last-resort key's id with the claims it answered since its upload.

use common::http::authenticate;
use common::response::json_response;
use common::runtime::HandlerResult;
use common::{ApiError, AppState};
use lambda_http::Request;
use lambda_http::http::StatusCode;
use serde::Serialize;

/// One row while the token's device exists (none: 401). The counts read the primary key
/// (user_id, device_id, last_resort, key_id), the last-resort key prekeys_one_last_resort.
pub const SQL: &str = r#"
SELECT o.available, o.lowest_key_id, lr.key_id AS last_resort_key_id,
       lr.claims AS last_resort_claims
FROM devices d
CROSS JOIN LATERAL (
    SELECT count(*) AS available, min(p.key_id) AS lowest_key_id
    FROM prekeys p
    WHERE p.user_id = d.user_id AND p.device_id = d.device_id AND NOT p.last_resort
) AS o
LEFT JOIN prekeys lr ON lr.user_id = d.user_id AND lr.device_id = d.device_id AND lr.last_resort
WHERE d.user_id = $1 AND d.device_id = $2
"#;

#[derive(Debug, Serialize, sqlx::FromRow)]
pub struct PrekeyCount {
    pub available: i64,
    pub lowest_key_id: Option<i64>,
    pub last_resort_key_id: Option<i64>,
    pub last_resort_claims: Option<i32>,
}

pub async fn handler(state: &AppState, request: Request) -> HandlerResult {
    let caller = authenticate(&request, state.jwt()?)?;
    let count: PrekeyCount = state
        .db
        .query_as(SQL)
        .bind(caller.user_id)
        .bind(caller.device_id)
        .fetch_optional(state.pool())
        .await?
        // A valid token for a device or account that no longer exists.
        .ok_or(ApiError::Unauthorized)?;
    Ok(json_response(StatusCode::OK, &count))
}
