//! POST /messages: store ciphertext for an existing recipient's device 1 until it is confirmed
//! or expires. Retries with an `Idempotency-Key` store nothing new and get the first answer
//! again. The send itself (`send`) serves `POST /messages/devices` too.

use chrono::{DateTime, Utc};
use common::domain::{Ciphertext, IdempotencyKey, canonical_uuid};
use common::http::{Caller, authenticate, json_body};
use common::response::json_response;
use common::runtime::HandlerResult;
use common::{ApiError, AppState};
use lambda_http::http::{HeaderName, HeaderValue, StatusCode};
use lambda_http::{Body, Request, Response};
use serde::Serialize;
use sha2::{Digest, Sha256};
use uuid::Uuid;

pub const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
pub const IDEMPOTENT_REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");

#[derive(Debug, Serialize)]
pub struct Sent {
    pub id: Uuid,
    pub sender_id: Uuid,
    pub sender_device_id: i32,
    pub recipient_id: Uuid,
    pub recipient_device_id: i32,
    pub timestamp: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
}

/// One call of `send_envelopes()` (migrations/20261204000001), for a plain send and a fan-out
/// alike: the sender's lock and device, an earlier answer to this key, the sender's quota, the
/// recipient's mailbox locks, the device list, each mailbox's quotas, the ids, the insert.
pub const SEND_SQL: &str = r#"
SELECT outcome, device_id, id, sender_device_id, "timestamp", expires_at, retry_after,
       public_key, key_fingerprint, key_updated_at, missing, extra, stale
FROM send_envelopes($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)
"#;

/// One row of `send_envelopes()`: a stored or replayed envelope, or one current device of the
/// recipient (devices_changed), or the one row of a refusal.
#[derive(sqlx::FromRow)]
struct OutcomeRow {
    outcome: String,
    device_id: Option<i32>,
    id: Option<Uuid>,
    sender_device_id: Option<i32>,
    timestamp: Option<DateTime<Utc>>,
    expires_at: Option<DateTime<Utc>>,
    retry_after: i64,
    public_key: Option<String>,
    key_fingerprint: Option<String>,
    key_updated_at: Option<DateTime<Utc>>,
    missing: Option<Vec<i32>>,
    extra: Option<Vec<i32>>,
    stale: Option<Vec<i32>>,
}

/// One envelope of a send: the device it is for, the fingerprint the sender sealed to (a
/// fan-out names it; a plain send to device 1 does not), the ciphertext.
pub struct Envelope {
    pub device_id: i32,
    pub key_fingerprint: Option<String>,
    pub ciphertext: Vec<u8>,
}

/// A send that was stored (or had been: `replayed`), one stored envelope per device.
pub struct Delivered {
    pub replayed: bool,
    pub sender_device_id: i32,
    pub timestamp: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    /// (device id, message id), in device order.
    pub messages: Vec<(i32, Uuid)>,
}

/// A device as `GET /users/{id}/devices` lists it (the `devices` of a `devices_changed`).
#[derive(Debug, Serialize)]
pub struct DirectoryDevice {
    pub device_id: i32,
    pub public_key: String,
    pub key_fingerprint: String,
    pub key_updated_at: DateTime<Utc>,
}

impl DirectoryDevice {
    /// A device from the nullable columns of an outer join (None where the join found none).
    pub fn from_columns(
        device_id: Option<i32>,
        public_key: Option<String>,
        key_fingerprint: Option<String>,
        key_updated_at: Option<DateTime<Utc>>,
    ) -> Option<Self> {
        Some(Self {
            device_id: device_id?,
            public_key: public_key?,
            key_fingerprint: key_fingerprint?,
            key_updated_at: key_updated_at?,
        })
    }
}

/// Stores `envelopes` from `sender` to `recipient` in one statement: all of them or none.
/// `fan_out`: the envelopes must name exactly the recipient's current devices (but the sending
/// one) with their current fingerprints, else `devices_changed`.
pub async fn send(
    state: &AppState,
    sender: Caller,
    recipient: Uuid,
    fan_out: bool,
    envelopes: Vec<Envelope>,
    key: Option<&IdempotencyKey>,
    digest: Option<Vec<u8>>,
) -> Result<Delivered, ApiError> {
    let config = &state.config;
    let proposed_ids: Vec<Uuid> = envelopes.iter().map(|_| Uuid::now_v7()).collect();
    let mut device_ids = Vec::with_capacity(envelopes.len());
    let mut fingerprints = Vec::with_capacity(envelopes.len());
    let mut data = Vec::with_capacity(envelopes.len());
    for envelope in envelopes {
        device_ids.push(envelope.device_id);
        fingerprints.push(envelope.key_fingerprint);
        data.push(envelope.ciphertext);
    }
    let rows: Vec<OutcomeRow> = state
        .db
        .query_as(SEND_SQL)
        .bind(sender.user_id)
        .bind(sender.device_id)
        .bind(recipient)
        .bind(fan_out)
        .bind(proposed_ids)
        .bind(device_ids)
        .bind(fingerprints)
        .bind(data)
        .bind(config.message_ttl_seconds as f64)
        .bind(key.map(IdempotencyKey::as_str))
        .bind(digest)
        .bind(i32::try_from(config.send_max_per_window).unwrap_or(i32::MAX))
        .bind(config.send_window_seconds as f64)
        .bind(i32::try_from(config.max_pending_per_recipient).unwrap_or(i32::MAX))
        .bind(i64::try_from(config.max_pending_bytes_per_recipient).unwrap_or(i64::MAX))
        .bind(i32::try_from(config.max_pending_from_one_sender).unwrap_or(i32::MAX))
        .fetch_all(state.pool())
        .await?;
    let first = rows
        .first()
        .ok_or_else(|| ApiError::internal("send_envelopes() answered no row"))?;
    let retry_after_seconds = first.retry_after.max(1) as u64;
    match first.outcome.as_str() {
        "stored" | "replayed" => delivered(rows),
        "key_reused" => Err(ApiError::IdempotencyKeyReused),
        "rate_limited" => Err(ApiError::RateLimited {
            retry_after_seconds,
        }),
        "mailbox_full" => Err(ApiError::MailboxFull {
            retry_after_seconds,
        }),
        "no_recipient" => Err(ApiError::NotFound("no such recipient")),
        "unauthorized" => Err(ApiError::Unauthorized),
        "devices_changed" => Err(devices_changed(rows)),
        other => Err(ApiError::internal(format!(
            "send_envelopes() answered {other:?}"
        ))),
    }
}

fn delivered(rows: Vec<OutcomeRow>) -> Result<Delivered, ApiError> {
    let incomplete = || ApiError::internal("send_envelopes() answered an incomplete row");
    let first = rows.first().ok_or_else(incomplete)?;
    let mut delivered = Delivered {
        replayed: first.outcome == "replayed",
        sender_device_id: first.sender_device_id.ok_or_else(incomplete)?,
        timestamp: first.timestamp.ok_or_else(incomplete)?,
        expires_at: first.expires_at.ok_or_else(incomplete)?,
        messages: Vec::with_capacity(rows.len()),
    };
    for row in rows {
        delivered.messages.push((
            row.device_id.ok_or_else(incomplete)?,
            row.id.ok_or_else(incomplete)?,
        ));
    }
    Ok(delivered)
}

fn devices_changed(rows: Vec<OutcomeRow>) -> ApiError {
    let list = |ids: &Option<Vec<i32>>| serde_json::json!(ids.clone().unwrap_or_default());
    let mut extra = serde_json::Map::new();
    if let Some(first) = rows.first() {
        extra.insert("missing".into(), list(&first.missing));
        extra.insert("extra".into(), list(&first.extra));
        extra.insert("stale".into(), list(&first.stale));
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
    extra.insert(
        "devices".into(),
        serde_json::to_value(devices).unwrap_or_default(),
    );
    ApiError::DevicesChanged(Box::new(extra))
}

/// What tells one request from another under the same key: its recipient and ciphertext, as a
/// digest, so nothing readable outlives the erasure of the ciphertext at confirmation.
pub fn request_digest(recipient_id: Uuid, ciphertext: &[u8]) -> Vec<u8> {
    let mut digest = Sha256::new();
    digest.update(recipient_id.as_bytes());
    digest.update(ciphertext);
    digest.finalize().to_vec()
}

/// The `Idempotency-Key` header, if any; malformed or repeated is 400.
pub fn idempotency_key(request: &Request) -> Result<Option<IdempotencyKey>, ApiError> {
    let mut values = request.headers().get_all(IDEMPOTENCY_KEY).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(ApiError::bad_request("send one Idempotency-Key"));
    }
    let raw = value.to_str().unwrap_or_default();
    Ok(Some(IdempotencyKey::parse(raw)?))
}

pub async fn handler(state: &AppState, request: Request) -> HandlerResult {
    let sender = authenticate(&request, state.jwt()?)?;
    let key = idempotency_key(&request)?;
    let config = &state.config;
    let body = json_body(&request, config.max_body_bytes())?;
    let recipient_id = canonical_uuid(body.required_str("recipient_id")?)
        .ok_or_else(|| ApiError::validation("recipient_id", "recipient_id must be a UUID"))?;
    let ciphertext = Ciphertext::parse(
        body.required_str("encrypted_data")?,
        config.max_message_bytes,
    )?
    .into_bytes();
    let digest = key
        .as_ref()
        .map(|_| request_digest(recipient_id, &ciphertext));
    // A client that knows nothing of devices reaches device 1, the one key it knows.
    let envelope = Envelope {
        device_id: 1,
        key_fingerprint: None,
        ciphertext,
    };
    let delivered = send(
        state,
        sender,
        recipient_id,
        false,
        vec![envelope],
        key.as_ref(),
        digest,
    )
    .await?;
    let &[(recipient_device_id, id)] = delivered.messages.as_slice() else {
        // The key was used for a fan-out to this recipient: another request.
        return Err(ApiError::IdempotencyKeyReused);
    };
    let sent = Sent {
        id,
        sender_id: sender.user_id,
        sender_device_id: delivered.sender_device_id,
        recipient_id,
        recipient_device_id,
        timestamp: delivered.timestamp,
        expires_at: delivered.expires_at,
    };
    Ok(replayable(
        json_response(StatusCode::CREATED, &sent),
        delivered.replayed,
    ))
}

/// A 201 that repeats an earlier answer says so (`Idempotent-Replayed: true`).
pub fn replayable(mut response: Response<Body>, replayed: bool) -> Response<Body> {
    if replayed {
        response
            .headers_mut()
            .insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
    }
    response
}
