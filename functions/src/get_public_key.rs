//! GET /public-key/{user_id}: another user's public key.

use common::domain::parse_id;
use common::http::{authenticate, path_param};
use common::response::json_response;
use common::runtime::HandlerResult;
use common::{ApiError, AppState};
use lambda_http::Request;
use lambda_http::http::StatusCode;

use crate::lookup_user::{Found, respond};

/// The entry, and whether the caller's own account still exists, in one round trip.
pub const SQL: &str = r#"
SELECT EXISTS (SELECT 1 FROM users WHERE id = $1) AS caller_exists,
       u.id AS user_id, u.name, u.public_key, u.key_updated_at
FROM (SELECT 1) AS one
LEFT JOIN users u ON u.id = $2
"#;

pub async fn handler(state: &AppState, request: Request) -> HandlerResult {
    let caller = authenticate(&request, state.jwt()?)?;
    let raw = path_param(&request, "user_id")
        .ok_or_else(|| ApiError::bad_field("user_id", "user_id is required"))?;
    let user_id = parse_id(&raw, "user_id")?;
    let found: Found = state
        .db
        .query_as(SQL)
        .bind(caller)
        .bind(user_id)
        .fetch_one(state.pool())
        .await?;
    respond(found).map(|entry| json_response(StatusCode::OK, &entry))
}
