//! POST /keys/claim: a prekey of each device of a user, to start a session with it (API.md
//! "Prekeys", ENVELOPE.md "Version 2"). For each device, in id order: its lowest one-time
//! prekey, removed in the same step, so that it is handed out at most once however many claims
//! race; none left, or the device's one-time keys handed out `PREKEY_CLAIMS_PER_TARGET` times in
//! this window: its last-resort key (which stays); neither: null.
//!
//! The requester's quota counts devices (`PREKEY_CLAIMS_PER_WINDOW`); past it nothing is
//! claimed (429). `device_ids` names each device at most once (a repeat is 422, as for
//! `POST /messages/devices`); one that is not the user's is 404, and nothing is claimed.

use std::collections::HashSet;

use common::domain::canonical_uuid;
use common::http::{authenticate, json_body, json_integer};
use common::response::json_response;
use common::runtime::HandlerResult;
use common::{ApiError, AppState};
use lambda_http::Request;
use lambda_http::http::StatusCode;
use serde::Serialize;
use serde_json::Value;
use uuid::Uuid;

use crate::get_keys::SignedPrekey;
use crate::rate_limit::Bucket;

/// `claim_prekeys()` (migrations/20261204000001): the caller's device, the target's devices, the
/// requester's quota, then per device its handout counter (locked: one device's claims take
/// turns), its lowest one-time key by DELETE ... RETURNING, or its last-resort key.
pub const CLAIM_SQL: &str = "SELECT outcome, device_id, key_id, public_key, signature, retry_after \
     FROM claim_prekeys($1, $2, $3, $4, $5, $6, $7, $8, $9)";

#[derive(sqlx::FromRow)]
struct Row {
    outcome: String,
    device_id: Option<i32>,
    key_id: Option<i64>,
    public_key: Option<Vec<u8>>,
    signature: Option<Vec<u8>>,
    retry_after: i64,
}

#[derive(Debug, Serialize)]
pub struct Claimed {
    pub user_id: Uuid,
    pub devices: Vec<ClaimedDevice>,
}

#[derive(Debug, Serialize)]
pub struct ClaimedDevice {
    pub device_id: i32,
    pub prekey: Option<ClaimedPrekey>,
}

#[derive(Debug, Serialize)]
pub struct ClaimedPrekey {
    #[serde(flatten)]
    pub prekey: SignedPrekey,
    pub last_resort: bool,
}

pub async fn handler(state: &AppState, request: Request) -> HandlerResult {
    let caller = authenticate(&request, state.jwt()?)?;
    let body = json_body(&request, crate::MAX_ACCOUNT_BODY_BYTES)?;
    let user_id = canonical_uuid(body.required_str("user_id")?)
        .ok_or_else(|| ApiError::validation("user_id", "user_id must be a UUID"))?;
    let device_ids = body.get("device_ids").map(device_ids).transpose()?;

    let config = &state.config;
    let rows: Vec<Row> = state
        .db
        .query_as(CLAIM_SQL)
        .bind(caller.user_id)
        .bind(caller.device_id)
        .bind(user_id)
        .bind(device_ids)
        .bind(Bucket::PrekeyClaimRequester.as_str())
        .bind(i32::try_from(config.prekey_claims_per_window).unwrap_or(i32::MAX))
        .bind(Bucket::PrekeyClaimTarget.as_str())
        .bind(i32::try_from(config.prekey_claims_per_target).unwrap_or(i32::MAX))
        .bind(config.prekey_claim_window_seconds as f64)
        .fetch_all(state.pool())
        .await?;
    let first = rows
        .first()
        .ok_or_else(|| ApiError::internal("claim_prekeys() answered no row"))?;
    match first.outcome.as_str() {
        "one_time" | "last_resort" | "none" => {}
        "unauthorized" => return Err(ApiError::Unauthorized),
        "no_user" => return Err(ApiError::NotFound("no such user")),
        "no_device" => return Err(ApiError::NotFound("no such device")),
        "rate_limited" => {
            return Err(ApiError::RateLimited {
                retry_after_seconds: first.retry_after.max(1) as u64,
            });
        }
        other => {
            return Err(ApiError::internal(format!(
                "claim_prekeys() answered {other:?}"
            )));
        }
    }
    let devices = rows
        .into_iter()
        .map(claimed_device)
        .collect::<Result<Vec<_>, _>>()?;
    Ok(json_response(StatusCode::OK, &Claimed { user_id, devices }))
}

/// `device_ids`: an array of distinct device ids, not empty. Not an array or not whole numbers:
/// 400; empty, out of range or repeated: 422.
fn device_ids(value: &Value) -> Result<Vec<i32>, ApiError> {
    const FIELD: &str = "device_ids";
    let items = value
        .as_array()
        .ok_or_else(|| ApiError::bad_field(FIELD, "device_ids must be an array"))?;
    if items.is_empty() {
        return Err(ApiError::validation(
            FIELD,
            "device_ids must name at least one device (or be left out for all of them)",
        ));
    }
    let mut seen = HashSet::with_capacity(items.len());
    let mut ids = Vec::with_capacity(items.len());
    for item in items {
        let id = json_integer(item)
            .ok_or_else(|| ApiError::bad_field(FIELD, "device_ids must be whole numbers"))?
            .filter(|id| (1..=i64::from(i32::MAX)).contains(id))
            .ok_or_else(|| {
                ApiError::validation(FIELD, format!("device ids are between 1 and {}", i32::MAX))
            })?;
        if !seen.insert(id) {
            return Err(ApiError::validation(
                FIELD,
                "device_ids must name each device once",
            ));
        }
        ids.push(id as i32);
    }
    Ok(ids)
}

fn claimed_device(row: Row) -> Result<ClaimedDevice, ApiError> {
    let incomplete = || ApiError::internal("claim_prekeys() answered an incomplete row");
    let device_id = row.device_id.ok_or_else(incomplete)?;
    let prekey = match (
        row.outcome.as_str(),
        row.key_id,
        row.public_key,
        row.signature,
    ) {
        ("none", ..) => None,
        (
            outcome @ ("one_time" | "last_resort"),
            Some(key_id),
            Some(public_key),
            Some(signature),
        ) => Some(ClaimedPrekey {
            prekey: SignedPrekey::new(key_id, &public_key, &signature),
            last_resort: outcome == "last_resort",
        }),
        _ => return Err(incomplete()),
    };
    Ok(ClaimedDevice { device_id, prekey })
}
