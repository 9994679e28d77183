//! POST /keys/prekeys: the token's device appends one-time prekeys and may replace its
//! last-resort prekey (API.md "Prekeys"), each signed by its signing key. All of the request or
//! none of it: a prekey that breaks a rule, a signature that does not verify, a key id not above
//! every id the device uploaded under its signing key, or a stock past `PREKEY_MAX_STORED`
//! stores nothing.
//!
//! Key ids within a request must be distinct (one-time and last-resort together), in any order.

use std::collections::HashSet;

use common::http::{Caller, authenticate, json_body, json_integer};
use common::response::json_response;
use common::runtime::HandlerResult;
use common::{ApiError, AppState};
use lambda_http::Request;
use lambda_http::http::StatusCode;
use serde::Serialize;
use serde_json::{Map, Value};

use crate::signatures::{Context, PrekeyBytes, Signature, SigningKey, signed_message};

/// The device's signing key, to verify the signatures against; no row when the token's device
/// (or account) is gone.
/// `store_prekeys()` (migrations/20261204000001): under the device row's lock, the signing key
/// must still be `$3`; then the key ids against the high-water mark, the stock against `$10`,
/// and the inserts.
pub const STORE_SQL: &str = "SELECT outcome, available, lowest_key_id, high_water \
     FROM store_prekeys($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)";

/// Room in the body for one prekey: a key id, 44 + 88 characters of base64, the field names.
const BODY_BYTES_PER_PREKEY: usize = 256;

/// The largest key id: key ids travel as 4 bytes.
const MAX_KEY_ID: i64 = u32::MAX as i64;

/// One prekey of the request, its signature not yet checked.
struct Prekey {
    key_id: i64,
    public_key: PrekeyBytes,
    signature: Signature,
}

impl Prekey {
    /// `{"key_id", "public_key", "signature"}` at `path` (e.g. `prekeys[3]`), refused on `field`.
    fn parse(field: &'static str, path: &str, value: &Value) -> Result<Self, ApiError> {
        let object = value
            .as_object()
            .ok_or_else(|| ApiError::bad_field(field, format!("{path} must be an object")))?;
        let key_id = match object.get("key_id") {
            None | Some(Value::Null) => {
                return Err(ApiError::validation(
                    field,
                    format!("{path}.key_id is required"),
                ));
            }
            Some(raw) => json_integer(raw).ok_or_else(|| {
                ApiError::bad_field(field, format!("{path}.key_id must be a whole number"))
            })?,
        }
        .filter(|id| (0..=MAX_KEY_ID).contains(id))
        .ok_or_else(|| {
            ApiError::validation(
                field,
                format!("{path}.key_id must be between 0 and {MAX_KEY_ID}"),
            )
        })?;
        let public_key =
            PrekeyBytes::parse("public_key", nested_str(object, field, path, "public_key")?)
                .map_err(|refusal| {
                    ApiError::validation(field, format!("{path}.{}", refusal.message))
                })?;
        let signature =
            Signature::parse("signature", nested_str(object, field, path, "signature")?).map_err(
                |refusal| ApiError::validation(field, format!("{path}.{}", refusal.message)),
            )?;
        Ok(Self {
            key_id,
            public_key,
            signature,
        })
    }

    fn verifies(&self, key: &SigningKey, context: Context, caller: Caller) -> bool {
        let message = signed_message(
            context,
            caller.user_id,
            caller.device_id,
            &[&(self.key_id as u32).to_be_bytes(), &self.public_key.0],
        );
        key.verifies(&message, &self.signature)
    }
}

/// A string member `name` of a nested object: absent or null is 422, another type 400.
fn nested_str<'a>(
    object: &'a Map<String, Value>,
    field: &'static str,
    path: &str,
    name: &str,
) -> Result<&'a str, ApiError> {
    match object.get(name) {
        None | Some(Value::Null) => Err(ApiError::validation(
            field,
            format!("{path}.{name} is required"),
        )),
        Some(value) => value
            .as_str()
            .ok_or_else(|| ApiError::bad_field(field, format!("{path}.{name} must be a string"))),
    }
}

#[derive(sqlx::FromRow)]
struct Stored {
    outcome: String,
    available: i64,
    lowest_key_id: Option<i64>,
    high_water: Option<i64>,
}

#[derive(Debug, Serialize)]
pub struct Stock {
    pub available: i64,
    pub lowest_key_id: Option<i64>,
}

pub async fn handler(state: &AppState, request: Request) -> HandlerResult {
    let caller = authenticate(&request, state.jwt()?)?;
    let config = &state.config;
    let upload_max = config.prekey_upload_max as usize;
    let body = json_body(&request, 1024 + (upload_max + 1) * BODY_BYTES_PER_PREKEY)?;
    let items = body.required_array("prekeys")?;
    if items.len() > upload_max {
        return Err(ApiError::validation(
            "prekeys",
            format!("at most {upload_max} prekeys in one upload"),
        ));
    }
    let prekeys = items
        .iter()
        .enumerate()
        .map(|(i, value)| Prekey::parse("prekeys", &format!("prekeys[{i}]"), value))
        .collect::<Result<Vec<_>, _>>()?;
    let last_resort = body
        .get("last_resort")
        .map(|value| Prekey::parse("last_resort", "last_resort", value))
        .transpose()?;
    let mut seen = HashSet::with_capacity(prekeys.len() + 1);
    if !prekeys
        .iter()
        .chain(&last_resort)
        .all(|prekey| seen.insert(prekey.key_id))
    {
        return Err(ApiError::validation(
            "prekeys",
            "key ids must be distinct within an upload (last_resort's too)",
        ));
    }

    let stored_key = crate::signatures::device_signing_key(state, caller)
        .await?
        .ok_or_else(no_signing_key)?;
    let signing_key = SigningKey::parse("signing_key", &stored_key).map_err(ApiError::internal)?;
    if !prekeys
        .iter()
        .all(|prekey| prekey.verifies(&signing_key, Context::Prekey, caller))
    {
        return Err(ApiError::InvalidSignature { field: "prekeys" });
    }
    if let Some(prekey) = &last_resort
        && !prekey.verifies(&signing_key, Context::LastResort, caller)
    {
        return Err(ApiError::InvalidSignature {
            field: "last_resort",
        });
    }

    let key_ids: Vec<i64> = prekeys.iter().map(|p| p.key_id).collect();
    let public_keys: Vec<&[u8]> = prekeys.iter().map(|p| p.public_key.0.as_slice()).collect();
    let signatures: Vec<&[u8]> = prekeys.iter().map(|p| p.signature.0.as_slice()).collect();
    let stored: Stored = state
        .db
        .query_as(STORE_SQL)
        .bind(caller.user_id)
        .bind(caller.device_id)
        .bind(&stored_key)
        .bind(&key_ids)
        .bind(&public_keys)
        .bind(&signatures)
        .bind(last_resort.as_ref().map(|p| p.key_id))
        .bind(last_resort.as_ref().map(|p| p.public_key.0.as_slice()))
        .bind(last_resort.as_ref().map(|p| p.signature.0.as_slice()))
        .bind(i32::try_from(config.prekey_max_stored).unwrap_or(i32::MAX))
        .fetch_one(state.pool())
        .await?;
    match stored.outcome.as_str() {
        "stored" => Ok(json_response(
            StatusCode::OK,
            &Stock {
                available: stored.available,
                lowest_key_id: stored.lowest_key_id,
            },
        )),
        "unauthorized" => Err(ApiError::Unauthorized),
        "no_signing_key" => Err(no_signing_key()),
        // Another signing key since the signatures were checked: they were made under a key
        // that is no longer the device's.
        "signing_key_changed" => Err(ApiError::InvalidSignature { field: "prekeys" }),
        "not_rising" => Err(ApiError::validation(
            "prekeys",
            format!(
                "every key_id must be above {}, the highest this device uploaded under its signing key",
                stored.high_water.unwrap_or_default()
            ),
        )),
        "too_many" => Err(ApiError::validation(
            "prekeys",
            format!(
                "a device stores at most {} one-time prekeys; it has {}",
                config.prekey_max_stored, stored.available
            ),
        )),
        other => Err(ApiError::internal(format!(
            "store_prekeys() answered {other:?}"
        ))),
    }
}

fn no_signing_key() -> ApiError {
    ApiError::Conflict("the device has no signing key: PUT /keys/signing-key first")
}
