//! The contract's key signatures (API.md "Prekeys"): Ed25519 over
//! `context ‖ 0x00 ‖ user id (16 bytes) ‖ device id (4 bytes, big-endian) ‖ fields`, so that no
//! signature can be moved to another account or device. Shared by `PUT /update-key`,
//! `PUT /keys/signing-key` and `POST /keys/prekeys`.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use common::domain::{KeyKind, PublicKeyPem, Refusal, is_small_order_x25519};
use ed25519_dalek::{Signature as Ed25519Signature, VerifyingKey};
use uuid::Uuid;

/// What a signature vouches for; each is its own context string.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Context {
    /// The device's X25519 `public_key` ‖ the signing key, by the signing key.
    Bind,
    /// The new signing key, by the current one.
    Rotate,
    /// key_id ‖ one-time prekey.
    Prekey,
    /// key_id ‖ last-resort prekey.
    LastResort,
}

impl Context {
    pub fn as_bytes(self) -> &'static [u8] {
        match self {
            Self::Bind => b"sm-bind",
            Self::Rotate => b"sm-rotate",
            Self::Prekey => b"sm-prekey",
            Self::LastResort => b"sm-last-resort",
        }
    }
}

/// The bytes a signature covers.
pub fn signed_message(
    context: Context,
    user_id: Uuid,
    device_id: i32,
    fields: &[&[u8]],
) -> Vec<u8> {
    let mut message = Vec::with_capacity(64 + fields.iter().map(|f| f.len()).sum::<usize>());
    message.extend_from_slice(context.as_bytes());
    message.push(0);
    message.extend_from_slice(user_id.as_bytes());
    message.extend_from_slice(&(device_id as u32).to_be_bytes());
    for field in fields {
        message.extend_from_slice(field);
    }
    message
}

/// A signature as JSON carries it: standard base64 of 64 bytes. Anything else is 422 on `field`
/// (a signature that does not verify is `invalid_signature`; one that is not even 64 bytes is
/// a broken rule).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Signature(pub [u8; 64]);

impl Signature {
    pub fn parse(field: &'static str, raw: &str) -> Result<Self, Refusal> {
        decode_fixed(field, raw)
            .map(Self)
            .ok_or_else(|| Refusal::rule(field, format!("{field} must be base64 of 64 bytes")))
    }
}

/// An X25519 prekey as JSON carries it: standard base64 of 32 bytes, not a small-order point.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrekeyBytes(pub [u8; 32]);

impl PrekeyBytes {
    pub fn parse(field: &'static str, raw: &str) -> Result<Self, Refusal> {
        let bytes: [u8; 32] = decode_fixed(field, raw)
            .ok_or_else(|| Refusal::rule(field, format!("{field} must be base64 of 32 bytes")))?;
        if is_small_order_x25519(&bytes) {
            return Err(Refusal::rule(
                field,
                format!("{field} is a small-order X25519 point"),
            ));
        }
        Ok(Self(bytes))
    }
}

/// The SPKI PEM of a raw Ed25519 public key (tests and tools).
pub fn ed25519_pem(raw: &[u8; 32]) -> String {
    spki_pem(
        &[
            0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
        ],
        raw,
    )
}

/// The SPKI PEM of a raw X25519 public key (tests and tools), as ENVELOPE.md writes it.
pub fn x25519_pem(raw: &[u8; 32]) -> String {
    spki_pem(
        &[
            0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x6e, 0x03, 0x21, 0x00,
        ],
        raw,
    )
}

fn spki_pem(prefix: &[u8; 12], raw: &[u8; 32]) -> String {
    let der: Vec<u8> = prefix.iter().chain(raw).copied().collect();
    format!(
        "-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n",
        BASE64.encode(der)
    )
}

fn decode_fixed<const N: usize>(_field: &'static str, raw: &str) -> Option<[u8; N]> {
    // base64 of N bytes is at most this long; refuse longer text before decoding it.
    if raw.len() > N.div_ceil(3) * 4 {
        return None;
    }
    BASE64.decode(raw).ok()?.try_into().ok()
}

/// A device's Ed25519 signing key: an SPKI PEM (`-----BEGIN PUBLIC KEY-----`) that parses as
/// Ed25519. Kept in the canonical PEM form the directory stores.
#[derive(Debug, Clone)]
pub struct SigningKey {
    pem: PublicKeyPem,
    raw: [u8; 32],
    key: VerifyingKey,
}

impl SigningKey {
    pub fn parse(field: &'static str, raw: &str) -> Result<Self, Refusal> {
        let not_ed25519 = || {
            Refusal::rule(
                field,
                format!("{field} must be an Ed25519 public key (SPKI PEM)"),
            )
        };
        let pem = PublicKeyPem::parse(raw).map_err(|_| not_ed25519())?;
        let bytes = pem.ed25519().ok_or_else(not_ed25519)?;
        let key = VerifyingKey::from_bytes(&bytes).map_err(|_| not_ed25519())?;
        Ok(Self {
            pem,
            raw: bytes,
            key,
        })
    }

    pub fn pem(&self) -> &str {
        self.pem.as_str()
    }

    /// Its 32 raw bytes, as the signatures' fields carry it.
    pub fn raw(&self) -> &[u8; 32] {
        &self.raw
    }

    /// Strict Ed25519 verification (no malleable or small-order signatures).
    pub fn verifies(&self, message: &[u8], signature: &Signature) -> bool {
        self.key
            .verify_strict(message, &Ed25519Signature::from_bytes(&signature.0))
            .is_ok()
    }
}

/// The token's device's signing key as stored (canonical PEM), if it has one.
pub const SIGNING_KEY_SQL: &str =
    "SELECT signing_key FROM devices WHERE user_id = $1 AND device_id = $2";

/// The caller's device's signing key (None when it has none); 401 when the device is gone.
pub async fn device_signing_key(
    state: &common::AppState,
    caller: common::http::Caller,
) -> Result<Option<String>, common::ApiError> {
    let stored: Option<Option<String>> = state
        .db
        .query_scalar(SIGNING_KEY_SQL)
        .bind(caller.user_id)
        .bind(caller.device_id)
        .fetch_optional(state.pool())
        .await?;
    stored.ok_or(common::ApiError::Unauthorized)
}

/// The raw X25519 bytes of a device key as stored (canonical PEM), for the `sm-bind` signature;
/// None when the stored key is not X25519 (a device 1 registered with another kind of key).
pub fn stored_x25519(pem: &str) -> Option<[u8; 32]> {
    PublicKeyPem::parse(pem)
        .ok()
        .filter(|key| key.kind() == KeyKind::X25519)
        .and_then(|key| key.x25519())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::Signer;

    #[test]
    fn the_signed_bytes_are_the_contracts_layout() {
        let user = Uuid::from_bytes([0x11; 16]);
        let message = signed_message(
            Context::Prekey,
            user,
            258,
            &[&7u32.to_be_bytes(), &[0xAA; 32]],
        );
        let mut expected = b"sm-prekey\0".to_vec();
        expected.extend_from_slice(&[0x11; 16]);
        expected.extend_from_slice(&[0, 0, 1, 2]);
        expected.extend_from_slice(&[0, 0, 0, 7]);
        expected.extend_from_slice(&[0xAA; 32]);
        assert_eq!(message, expected);
        assert!(signed_message(Context::LastResort, user, 1, &[]).starts_with(b"sm-last-resort\0"));
        assert!(signed_message(Context::Bind, user, 1, &[]).starts_with(b"sm-bind\0"));
        assert!(signed_message(Context::Rotate, user, 1, &[]).starts_with(b"sm-rotate\0"));
    }

    #[test]
    fn verifies_only_the_exact_message() {
        let secret = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
        let pem = ed25519_pem(secret.verifying_key().as_bytes());
        let key = SigningKey::parse("signing_key", &pem).unwrap();
        assert_eq!(key.raw(), secret.verifying_key().as_bytes());
        let user = Uuid::now_v7();
        let message = signed_message(Context::Prekey, user, 2, &[&[1; 32]]);
        let signature = Signature(secret.sign(&message).to_bytes());
        assert!(key.verifies(&message, &signature));
        // Another device, account or context: the same signature does not verify.
        assert!(!key.verifies(
            &signed_message(Context::Prekey, user, 3, &[&[1; 32]]),
            &signature
        ));
        assert!(!key.verifies(
            &signed_message(Context::Prekey, Uuid::now_v7(), 2, &[&[1; 32]]),
            &signature
        ));
        assert!(!key.verifies(
            &signed_message(Context::LastResort, user, 2, &[&[1; 32]]),
            &signature
        ));
    }

    #[test]
    fn values_refused() {
        assert!(Signature::parse("signature", &BASE64.encode([0; 63])).is_err());
        assert!(Signature::parse("signature", &BASE64.encode([0; 64])).is_ok());
        assert!(Signature::parse("signature", "not base64!").is_err());
        assert!(
            PrekeyBytes::parse("public_key", &BASE64.encode([0; 32])).is_err(),
            "small order"
        );
        assert!(PrekeyBytes::parse("public_key", &BASE64.encode([9; 32])).is_ok());
        assert!(PrekeyBytes::parse("public_key", &BASE64.encode([9; 31])).is_err());
        let x25519 = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../testdata/keys/x25519.pem"
        ))
        .unwrap();
        assert!(
            SigningKey::parse("signing_key", &x25519).is_err(),
            "X25519 is not a signing key"
        );
        assert!(stored_x25519(&x25519).is_some());
    }
}
