//! DELETE /me: the caller erases the account, from any of its devices, with its password. The
//! devices, keys, and every message to or from the account (delivered or not), go with it in the
//! same statement (the foreign keys cascade); its tokens are refused from then on, and the name
//! is free again.

use common::domain::Password;
use common::http::{authenticate, client_address, json_body};
use common::response::no_content;
use common::runtime::HandlerResult;
use common::{ApiError, AppState};
use lambda_http::Request;

use crate::credentials;

/// The caller's name key, which the login limits count by, while the token's device exists.
pub const CALLER_SQL: &str = r#"
SELECT lower(u.name COLLATE "C") FROM users u
JOIN devices d ON d.user_id = u.id AND d.device_id = $2
WHERE u.id = $1
"#;

pub const DELETE_SQL: &str = "DELETE FROM users WHERE id = $1";

pub async fn handler(state: &AppState, request: Request) -> HandlerResult {
    let caller = authenticate(&request, state.jwt()?)?;
    let body = json_body(&request, crate::MAX_ACCOUNT_BODY_BYTES)?;
    let password = Password::parse(body.required_str("password")?)?;
    let name_key: Option<String> = state
        .db
        .query_scalar(CALLER_SQL)
        .bind(caller.user_id)
        .bind(caller.device_id)
        .fetch_optional(state.pool())
        .await?;
    // A valid token for a device or account that no longer exists.
    let name_key = name_key.ok_or(ApiError::Unauthorized)?;
    // A wrong password counts as a failed login, against the same limits.
    let address = client_address(&request);
    let owner = credentials::check(state, &name_key, &password, &address, caller.device_id).await?;
    if owner != caller.user_id {
        // The account was deleted and its name taken again while this request ran.
        return Err(ApiError::Unauthorized);
    }
    state
        .db
        .query(DELETE_SQL)
        .bind(caller.user_id)
        .execute(state.pool())
        .await?;
    Ok(no_content())
}
