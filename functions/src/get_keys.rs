//! GET /keys/{user_id}: a user's devices with what a sender pins and verifies before it starts
//! a session (API.md "Prekeys", ENVELOPE.md "Version 2"): each device's X25519 key and
//! fingerprint, its signing key with the binding signature, whether that key was reset by
//! password, and its last-resort prekey. Read-only: no prekey is used up (that is
//! `POST /keys/claim`).

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use common::domain::parse_id;
use common::http::{authenticate, path_param};
use common::response::json_response;
use common::runtime::HandlerResult;
use common::{ApiError, AppState};
use lambda_http::Request;
use lambda_http::http::StatusCode;
use serde::Serialize;
use uuid::Uuid;

/// The user's devices in id order (the devices primary key), each with its last-resort key
/// (prekeys_one_last_resort), and whether the caller's device (`$1`, `$3`) still exists, in one
/// statement. No device row at all: no such user (device 1 lives as long as the account).
pub const SQL: &str = r#"
SELECT EXISTS (SELECT 1 FROM devices WHERE user_id = $1 AND device_id = $3) AS caller_exists,
       d.device_id, d.public_key, d.key_fingerprint, d.signing_key, d.binding_sig,
       d.signing_key_reset, lr.key_id AS last_resort_key_id,
       lr.public_key AS last_resort_public_key, lr.signature AS last_resort_signature
FROM (SELECT 1) AS one
LEFT JOIN devices d ON d.user_id = $2
LEFT JOIN prekeys lr ON lr.user_id = d.user_id AND lr.device_id = d.device_id AND lr.last_resort
ORDER BY d.device_id
"#;

#[derive(sqlx::FromRow)]
struct Row {
    caller_exists: bool,
    device_id: Option<i32>,
    public_key: Option<String>,
    key_fingerprint: Option<String>,
    signing_key: Option<String>,
    binding_sig: Option<Vec<u8>>,
    signing_key_reset: Option<bool>,
    last_resort_key_id: Option<i64>,
    last_resort_public_key: Option<Vec<u8>>,
    last_resort_signature: Option<Vec<u8>>,
}

#[derive(Debug, Serialize)]
pub struct Keys {
    pub user_id: Uuid,
    pub devices: Vec<DeviceKeys>,
}

#[derive(Debug, Serialize)]
pub struct DeviceKeys {
    pub device_id: i32,
    pub public_key: String,
    pub key_fingerprint: String,
    pub signing_key: Option<String>,
    /// Base64 of 64 bytes.
    pub binding_sig: Option<String>,
    pub signing_key_reset: bool,
    pub last_resort: Option<SignedPrekey>,
}

/// A prekey as the contract writes it: base64 key and signature.
#[derive(Debug, Serialize)]
pub struct SignedPrekey {
    pub key_id: i64,
    pub public_key: String,
    pub signature: String,
}

impl SignedPrekey {
    pub fn new(key_id: i64, public_key: &[u8], signature: &[u8]) -> Self {
        Self {
            key_id,
            public_key: BASE64.encode(public_key),
            signature: BASE64.encode(signature),
        }
    }
}

pub async fn handler(state: &AppState, request: Request) -> HandlerResult {
    crate::routes::refuse_shadowed(&request)?;
    let caller = authenticate(&request, state.jwt()?)?;
    let raw = path_param(&request, "user_id")
        .ok_or_else(|| ApiError::bad_field("user_id", "user_id is required"))?;
    let user_id = parse_id(&raw, "user_id")?;
    let rows: Vec<Row> = state
        .db
        .query_as(SQL)
        .bind(caller.user_id)
        .bind(user_id)
        .bind(caller.device_id)
        .fetch_all(state.pool())
        .await?;
    // The statement answers at least one row (FROM (SELECT 1)).
    let first = rows
        .first()
        .ok_or_else(|| ApiError::internal("the keys statement answered no row"))?;
    if !first.caller_exists {
        return Err(ApiError::Unauthorized);
    }
    let devices: Vec<DeviceKeys> = rows.into_iter().filter_map(device_keys).collect();
    if devices.is_empty() {
        return Err(ApiError::NotFound("no such user"));
    }
    Ok(json_response(StatusCode::OK, &Keys { user_id, devices }))
}

fn device_keys(row: Row) -> Option<DeviceKeys> {
    let last_resort = match (
        row.last_resort_key_id,
        row.last_resort_public_key,
        row.last_resort_signature,
    ) {
        (Some(key_id), Some(public_key), Some(signature)) => {
            Some(SignedPrekey::new(key_id, &public_key, &signature))
        }
        _ => None,
    };
    Some(DeviceKeys {
        device_id: row.device_id?,
        public_key: row.public_key?,
        key_fingerprint: row.key_fingerprint?,
        signing_key: row.signing_key,
        binding_sig: row.binding_sig.map(|sig| BASE64.encode(sig)),
        signing_key_reset: row.signing_key_reset?,
        last_resort,
    })
}
