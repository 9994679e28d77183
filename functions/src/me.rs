//! GET /me: the caller's own account.

use common::http::authenticate;
use common::response::json_response;
use common::runtime::HandlerResult;
use common::{ApiError, AppState};
use lambda_http::Request;
use lambda_http::http::StatusCode;

use crate::users::Profile;

/// The account, when the token's device still exists.
pub const SQL: &str = r#"
SELECT u.id, u.name, u.public_key, u.created_at, u.key_updated_at
FROM users u JOIN devices d ON d.user_id = u.id AND d.device_id = $2
WHERE u.id = $1
"#;

pub async fn handler(state: &AppState, request: Request) -> HandlerResult {
    let caller = authenticate(&request, state.jwt()?)?;
    let profile: Option<Profile> = state
        .db
        .query_as(SQL)
        .bind(caller.user_id)
        .bind(caller.device_id)
        .fetch_optional(state.pool())
        .await?;
    // A valid token for an account that no longer exists.
    let profile = profile.ok_or(ApiError::Unauthorized)?;
    Ok(json_response(StatusCode::OK, &profile))
}
