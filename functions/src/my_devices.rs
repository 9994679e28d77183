//! GET /me/devices: the caller's account's devices, in id order, with labels (the owner's own),
//! `current` marking the token's device.

use chrono::{DateTime, Utc};
use common::http::authenticate;
use common::response::json_response;
use common::runtime::HandlerResult;
use common::{ApiError, AppState};
use lambda_http::Request;
use lambda_http::http::StatusCode;
use serde::Serialize;

#[derive(Debug, Serialize, sqlx::FromRow)]
pub struct MyDevice {
    pub device_id: i32,
    pub label: String,
    pub public_key: String,
    pub key_fingerprint: String,
    pub created_at: DateTime<Utc>,
    pub key_updated_at: DateTime<Utc>,
    pub current: bool,
}

#[derive(Debug, Serialize)]
pub struct MyDevices {
    pub devices: Vec<MyDevice>,
}

/// Every device of the account, on the primary key. The token's device is among them exactly
/// when it still exists, so one statement answers both.
pub const SQL: &str = r#"
SELECT d.device_id, d.label, d.public_key, d.key_fingerprint, d.created_at, d.key_updated_at,
       d.device_id = $2 AS current
FROM devices d
WHERE d.user_id = $1
ORDER BY d.device_id
"#;

pub async fn handler(state: &AppState, request: Request) -> HandlerResult {
    let caller = authenticate(&request, state.jwt()?)?;
    let devices: Vec<MyDevice> = state
        .db
        .query_as(SQL)
        .bind(caller.user_id)
        .bind(caller.device_id)
        .fetch_all(state.pool())
        .await?;
    // A valid token for a device (or account) that no longer exists.
    if !devices.iter().any(|d| d.current) {
        return Err(ApiError::Unauthorized);
    }
    Ok(json_response(StatusCode::OK, &MyDevices { devices }))
}
