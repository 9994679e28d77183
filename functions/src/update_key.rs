//! PUT /update-key: replace the caller's public key.

use common::domain::PublicKeyPem;
use common::http::{authenticate, json_body};
use common::response::json_response;
use common::runtime::HandlerResult;
use common::{ApiError, AppState};
use lambda_http::Request;
use lambda_http::http::StatusCode;

use crate::users::Profile;

pub const UPDATE_SQL: &str = r#"
UPDATE users SET public_key = $2, key_updated_at = now()
WHERE id = $1
RETURNING id, name, public_key, created_at, key_updated_at
"#;

pub async fn handler(state: &AppState, request: Request) -> HandlerResult {
    let caller = authenticate(&request, state.jwt()?)?;
    let body = json_body(&request, crate::MAX_ACCOUNT_BODY_BYTES)?;
    let public_key = PublicKeyPem::parse(body.required_str("public_key")?)?;
    let profile: Option<Profile> = state
        .db
        .query_as(UPDATE_SQL)
        .bind(caller)
        .bind(public_key.as_str())
        .fetch_optional(state.pool())
        .await?;
    let profile = profile.ok_or(ApiError::Unauthorized)?;
    Ok(json_response(StatusCode::OK, &profile))
}
