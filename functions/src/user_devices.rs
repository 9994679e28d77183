//! GET /users/{user_id}/devices: another account's (or one's own) devices as a sender needs
//! them, in id order: ids, keys and fingerprints, no labels (those are the owner's).

use chrono::{DateTime, Utc};
use common::domain::parse_id;
use common::http::{authenticate, path_param};
use common::response::json_response;
use common::runtime::HandlerResult;
use common::{ApiError, AppState};
use lambda_http::Request;
use lambda_http::http::StatusCode;
use serde::Serialize;
use uuid::Uuid;

use crate::send_message::DirectoryDevice;

#[derive(Debug, Serialize)]
pub struct UserDevices {
    pub user_id: Uuid,
    pub devices: Vec<DirectoryDevice>,
}

/// Whether the caller's device (`$1`, `$2`) still exists, and the user's (`$3`) devices on the
/// primary key, in one round trip. Every account has device 1, so no device means no user.
pub const SQL: &str = r#"
SELECT EXISTS (SELECT 1 FROM devices WHERE user_id = $1 AND device_id = $2) AS caller_exists,
       d.device_id, d.public_key, d.key_fingerprint, d.key_updated_at
FROM (SELECT 1) AS one
LEFT JOIN devices d ON d.user_id = $3
ORDER BY d.device_id
"#;

#[derive(sqlx::FromRow)]
struct Row {
    caller_exists: bool,
    device_id: Option<i32>,
    public_key: Option<String>,
    key_fingerprint: Option<String>,
    key_updated_at: Option<DateTime<Utc>>,
}

pub async fn handler(state: &AppState, request: Request) -> HandlerResult {
    let caller = authenticate(&request, state.jwt()?)?;
    let raw = path_param(&request, "user_id")
        .ok_or_else(|| ApiError::bad_field("user_id", "user_id is required"))?;
    let user_id = parse_id(&raw, "user_id")?;
    let rows: Vec<Row> = state
        .db
        .query_as(SQL)
        .bind(caller.user_id)
        .bind(caller.device_id)
        .bind(user_id)
        .fetch_all(state.pool())
        .await?;
    if !rows.first().is_some_and(|row| row.caller_exists) {
        // A valid token for a device (or account) that no longer exists.
        return Err(ApiError::Unauthorized);
    }
    let devices: Vec<DirectoryDevice> = rows
        .into_iter()
        .filter_map(|row| {
            DirectoryDevice::from_columns(
                row.device_id,
                row.public_key,
                row.key_fingerprint,
                row.key_updated_at,
            )
        })
        .collect();
    if devices.is_empty() {
        return Err(ApiError::NotFound("no such user"));
    }
    Ok(json_response(
        StatusCode::OK,
        &UserDevices { user_id, devices },
    ))
}
