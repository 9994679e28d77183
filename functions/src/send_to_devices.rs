//! POST /messages/devices: one message for every device of a recipient, each sealed to that
//! device's key, all stored or none. The envelopes must name exactly the recipient's current
//! devices (for a user's own send: her other devices) with their current key fingerprints, or
//! the answer is 409 `devices_changed` with the list to seal for. One statement, whatever the
//! number of devices (`send_envelopes()`, shared with `POST /messages`).

use std::collections::HashSet;

use chrono::{DateTime, Utc};
use common::domain::{Ciphertext, canonical_uuid};
use common::http::{authenticate, json_body};
use common::response::json_response;
use common::runtime::HandlerResult;
use common::{ApiError, AppState};
use lambda_http::Request;
use lambda_http::http::StatusCode;
use serde::Serialize;
use serde_json::Value;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::send_message::{Envelope, idempotency_key, replayable, send};

#[derive(Debug, Serialize)]
pub struct SentToDevices {
    pub sender_id: Uuid,
    pub sender_device_id: i32,
    pub recipient_id: Uuid,
    pub timestamp: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    pub messages: Vec<DeviceMessage>,
}

#[derive(Debug, Serialize)]
pub struct DeviceMessage {
    pub device_id: i32,
    pub id: Uuid,
}

/// What tells one fan-out from another under the same key: the recipient and every envelope
/// (device, fingerprint, ciphertext), as a digest. Prefixed so it never equals a plain send's.
pub fn request_digest(recipient_id: Uuid, envelopes: &[Envelope]) -> Vec<u8> {
    let mut digest = Sha256::new();
    digest.update(b"sm-fan-out\0");
    digest.update(recipient_id.as_bytes());
    for envelope in envelopes {
        digest.update(envelope.device_id.to_be_bytes());
        let fingerprint = envelope.key_fingerprint.as_deref().unwrap_or_default();
        digest.update((fingerprint.len() as u32).to_be_bytes());
        digest.update(fingerprint.as_bytes());
        digest.update((envelope.ciphertext.len() as u64).to_be_bytes());
        digest.update(&envelope.ciphertext);
    }
    digest.finalize().to_vec()
}

/// One envelope of the body: `{"device_id", "key_fingerprint", "encrypted_data"}`.
fn parse_envelope(value: &Value, max_message_bytes: usize) -> Result<Envelope, ApiError> {
    let object = value
        .as_object()
        .ok_or_else(|| ApiError::bad_field("envelopes", "each envelope must be an object"))?;
    let device_id = match object.get("device_id") {
        None | Some(Value::Null) => {
            return Err(ApiError::validation(
                "envelopes",
                "each envelope needs a device_id",
            ));
        }
        Some(value) => match common::http::json_integer(value) {
            None => {
                return Err(ApiError::bad_field(
                    "envelopes",
                    "device_id must be a whole number",
                ));
            }
            Some(id) => id
                .filter(|id| (1..=i64::from(i32::MAX)).contains(id))
                .ok_or_else(|| ApiError::validation("envelopes", "device_id must be positive"))?
                as i32,
        },
    };
    let string = |field: &'static str| match object.get(field) {
        None | Some(Value::Null) => Err(ApiError::validation(
            "envelopes",
            format!("each envelope needs {field}"),
        )),
        Some(Value::String(s)) => Ok(s.as_str()),
        Some(_) => Err(ApiError::bad_field(
            "envelopes",
            format!("{field} must be a string"),
        )),
    };
    let fingerprint = string("key_fingerprint")?;
    if fingerprint.len() != 64 || !fingerprint.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(ApiError::validation(
            "envelopes",
            "key_fingerprint must be 64 hex characters (SHA-256 of the key's SPKI DER)",
        ));
    }
    let ciphertext = Ciphertext::parse(string("encrypted_data")?, max_message_bytes)?;
    Ok(Envelope {
        device_id,
        key_fingerprint: Some(fingerprint.to_ascii_lowercase()),
        ciphertext: ciphertext.into_bytes(),
    })
}

pub async fn handler(state: &AppState, request: Request) -> HandlerResult {
    let sender = authenticate(&request, state.jwt()?)?;
    let key = idempotency_key(&request)?;
    let config = &state.config;
    let max_devices = config.max_devices_per_account as usize;
    // Room for an envelope per device, each as large as a plain send's body may be.
    let body = json_body(&request, config.max_body_bytes() * max_devices)?;
    let recipient_id = canonical_uuid(body.required_str("recipient_id")?)
        .ok_or_else(|| ApiError::validation("recipient_id", "recipient_id must be a UUID"))?;
    let raw = body.required_array("envelopes")?;
    if raw.is_empty() || raw.len() > max_devices {
        return Err(ApiError::validation(
            "envelopes",
            format!("envelopes must hold 1 to {max_devices} envelopes, one per device"),
        ));
    }
    let envelopes = raw
        .iter()
        .map(|value| parse_envelope(value, config.max_message_bytes))
        .collect::<Result<Vec<_>, _>>()?;
    let mut seen = HashSet::with_capacity(envelopes.len());
    if !envelopes.iter().all(|e| seen.insert(e.device_id)) {
        return Err(ApiError::validation(
            "envelopes",
            "each device may be named once",
        ));
    }
    let digest = key
        .as_ref()
        .map(|_| request_digest(recipient_id, &envelopes));

    let delivered = send(
        state,
        sender,
        recipient_id,
        true,
        envelopes,
        key.as_ref(),
        digest,
    )
    .await?;
    let sent = SentToDevices {
        sender_id: sender.user_id,
        sender_device_id: delivered.sender_device_id,
        recipient_id,
        timestamp: delivered.timestamp,
        expires_at: delivered.expires_at,
        messages: delivered
            .messages
            .into_iter()
            .map(|(device_id, id)| DeviceMessage { device_id, id })
            .collect(),
    };
    Ok(replayable(
        json_response(StatusCode::CREATED, &sent),
        delivered.replayed,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn envelope(device_id: i32, fingerprint: &str, data: &[u8]) -> Envelope {
        Envelope {
            device_id,
            key_fingerprint: Some(fingerprint.into()),
            ciphertext: data.to_vec(),
        }
    }

    #[test]
    fn the_digest_covers_every_envelope() {
        let to = Uuid::now_v7();
        let base = request_digest(to, &[envelope(1, "aa", b"x"), envelope(2, "bb", b"y")]);
        for other in [
            request_digest(to, &[envelope(1, "aa", b"x")]),
            request_digest(to, &[envelope(1, "aa", b"x"), envelope(3, "bb", b"y")]),
            request_digest(to, &[envelope(1, "aa", b"x"), envelope(2, "bc", b"y")]),
            request_digest(to, &[envelope(1, "aa", b"x"), envelope(2, "bb", b"z")]),
            // Bytes moved between fingerprint and ciphertext do not collide.
            request_digest(to, &[envelope(1, "aax", b""), envelope(2, "bb", b"y")]),
            request_digest(
                Uuid::now_v7(),
                &[envelope(1, "aa", b"x"), envelope(2, "bb", b"y")],
            ),
        ] {
            assert_ne!(base, other);
        }
        // Never a plain send's digest of the same bytes.
        assert_ne!(
            request_digest(to, &[envelope(1, "", b"x")]),
            crate::send_message::request_digest(to, b"x")
        );
    }
}
