//! GET /users?name=<name>: find a recipient by name (any case).

use chrono::{DateTime, Utc};
use common::domain::UserName;
use common::http::{authenticate, query_param};
use common::response::json_response;
use common::runtime::HandlerResult;
use common::{ApiError, AppState};
use lambda_http::Request;
use lambda_http::http::StatusCode;
use uuid::Uuid;

use crate::users::PublicKeyEntry;

pub const SQL: &str = r#"
SELECT EXISTS (SELECT 1 FROM users WHERE id = $1) AS caller_exists,
       u.id AS user_id, u.name, u.public_key, u.key_updated_at
FROM (SELECT 1) AS one
LEFT JOIN users u ON lower(u.name COLLATE "C") = $2
"#;

/// A directory lookup joined with the caller's own existence check.
#[derive(sqlx::FromRow)]
pub struct Found {
    caller_exists: bool,
    user_id: Option<Uuid>,
    name: Option<String>,
    public_key: Option<String>,
    key_updated_at: Option<DateTime<Utc>>,
}

/// 401 when the caller's account is gone, 404 when the entry is, else the entry.
pub fn respond(found: Found) -> Result<PublicKeyEntry, ApiError> {
    if !found.caller_exists {
        return Err(ApiError::Unauthorized);
    }
    match (
        found.user_id,
        found.name,
        found.public_key,
        found.key_updated_at,
    ) {
        (Some(user_id), Some(name), Some(public_key), Some(key_updated_at)) => Ok(PublicKeyEntry {
            user_id,
            name,
            public_key,
            key_updated_at,
        }),
        _ => Err(ApiError::NotFound("no such user")),
    }
}

pub async fn handler(state: &AppState, request: Request) -> HandlerResult {
    let caller = authenticate(&request, state.jwt()?)?;
    let raw = query_param(&request, "name")
        .ok_or_else(|| ApiError::validation("name", "name is required"))?;
    let name = UserName::parse(&raw)?;
    let found: Found = state
        .db
        .query_as(SQL)
        .bind(caller)
        .bind(name.key())
        .fetch_one(state.pool())
        .await?;
    respond(found).map(|entry| json_response(StatusCode::OK, &entry))
}
