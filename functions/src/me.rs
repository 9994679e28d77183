//! GET /me: the caller's own account.

use common::http::authenticate;
use common::response::json_response;
use common::runtime::HandlerResult;
use common::{ApiError, AppState};
use lambda_http::Request;
use lambda_http::http::StatusCode;

use crate::users::Profile;

pub const SQL: &str =
    "SELECT id, name, public_key, created_at, key_updated_at FROM users WHERE id = $1";

pub async fn handler(state: &AppState, request: Request) -> HandlerResult {
    let caller = authenticate(&request, state.jwt()?)?;
    let profile: Option<Profile> = state
        .db
        .query_as(SQL)
        .bind(caller)
        .fetch_optional(state.pool())
        .await?;
    // A valid token for an account that no longer exists.
    let profile = profile.ok_or(ApiError::Unauthorized)?;
    Ok(json_response(StatusCode::OK, &profile))
}
