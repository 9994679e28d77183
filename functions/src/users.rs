//! The user views the account endpoints return, and the directory look-up behind
//! GET /public-key/{user_id} and GET /users?name=.

use chrono::{DateTime, Utc};
use common::http::Caller;
use common::response::json_response;
use common::runtime::HandlerResult;
use common::{ApiError, AppState};
use lambda_http::http::StatusCode;
use serde::Serialize;
use sqlx::postgres::Postgres;
use uuid::Uuid;

/// GET /me and PUT /update-key.
#[derive(Debug, Serialize, sqlx::FromRow)]
pub struct Profile {
    pub id: Uuid,
    pub name: String,
    pub public_key: String,
    pub created_at: DateTime<Utc>,
    pub key_updated_at: DateTime<Utc>,
}

/// GET /public-key/{user_id} and GET /users?name=.
#[derive(Debug, Serialize, sqlx::FromRow)]
pub struct PublicKeyEntry {
    pub user_id: Uuid,
    pub name: String,
    pub public_key: String,
    pub key_updated_at: DateTime<Utc>,
}

/// A directory look-up: the entry on `users u` matching the condition (on `$2`), and whether the
/// caller (`$1`) still exists, in one round trip.
macro_rules! directory_sql {
    ($condition:literal) => {
        concat!(
            "SELECT EXISTS (SELECT 1 FROM devices WHERE user_id = $1 AND device_id = $3) ",
            "AS caller_exists, ",
            "u.id AS user_id, u.name, u.public_key, u.key_updated_at ",
            "FROM (SELECT 1) AS one LEFT JOIN users u ON ",
            $condition
        )
    };
}
pub(crate) use directory_sql;

#[derive(sqlx::FromRow)]
struct Found {
    caller_exists: bool,
    user_id: Option<Uuid>,
    name: Option<String>,
    public_key: Option<String>,
    key_updated_at: Option<DateTime<Utc>>,
}

/// Runs a `directory_sql!` statement: 401 when the caller's account is gone, 404 when the
/// entry is, else the entry.
pub async fn directory_entry<'q, K>(
    state: &AppState,
    sql: &'static str,
    caller: Caller,
    key: K,
) -> HandlerResult
where
    K: 'q + sqlx::Encode<'q, Postgres> + sqlx::Type<Postgres> + Send,
{
    let found: Found = state
        .db
        .query_as(sql)
        .bind(caller.user_id)
        .bind(key)
        .bind(caller.device_id)
        .fetch_one(state.pool())
        .await?;
    if !found.caller_exists {
        return Err(ApiError::Unauthorized);
    }
    match (
        found.user_id,
        found.name,
        found.public_key,
        found.key_updated_at,
    ) {
        (Some(user_id), Some(name), Some(public_key), Some(key_updated_at)) => Ok(json_response(
            StatusCode::OK,
            &PublicKeyEntry {
                user_id,
                name,
                public_key,
                key_updated_at,
            },
        )),
        _ => Err(ApiError::NotFound("no such user")),
    }
}
