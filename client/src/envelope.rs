//! The message envelope of ENVELOPE.md: HPKE (RFC 9180) in auth mode with DHKEM(X25519,
//! HKDF-SHA256), HKDF-SHA256 and ChaCha20Poly1305, single shot, `info` binding the pair of
//! accounts, empty `aad`; bytes `0x01 || enc || ciphertext`; a UTF-8 JSON plaintext.

use crate::keys::{PrivateKey, PublicKey};
use chrono::{DateTime, SecondsFormat, Utc};
use hpke::aead::ChaCha20Poly1305;
use hpke::kdf::HkdfSha256;
use hpke::kem::X25519HkdfSha256;
use hpke::{Deserializable, OpModeR, OpModeS, Serializable};
use rand_core::CryptoRng;
use uuid::Uuid;

pub type Kem = X25519HkdfSha256;
pub type Kdf = HkdfSha256;
pub type Aead = ChaCha20Poly1305;

/// The first byte of `encrypted_data`: the envelope format version.
pub const FORMAT_VERSION: u8 = 0x01;
/// The length of HPKE's `enc` for DHKEM(X25519): the ephemeral public key.
pub const ENC_LEN: usize = 32;
/// ChaCha20Poly1305's tag.
pub const TAG_LEN: usize = 16;
/// The smallest envelope: version byte, `enc`, and the tag of an empty plaintext.
pub const MIN_LEN: usize = 1 + ENC_LEN + TAG_LEN;
/// The plaintext JSON's `v`.
pub const PLAINTEXT_VERSION: u64 = 1;
/// `info` starts with these bytes (the label and one zero byte).
pub const INFO_LABEL: &[u8] = b"secure-messenger/v1\0";

/// Why an envelope was refused. None of these carries plaintext or key material.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OpenError {
    #[error("the envelope is truncated ({0} bytes, at least {MIN_LEN} expected)")]
    Truncated(usize),
    #[error("the envelope has format version {0}, this client reads version {FORMAT_VERSION} only")]
    UnknownFormat(u8),
    #[error(
        "the envelope does not open: it was tampered with, sealed for another recipient, \
         or sealed by a key not pinned for its sender"
    )]
    DoesNotOpen,
    #[error("the plaintext is not a version-{PLAINTEXT_VERSION} message: {0}")]
    BadPlaintext(String),
    #[error(
        "the plaintext has message version {0}, this client reads version {PLAINTEXT_VERSION} only"
    )]
    UnknownPlaintextVersion(String),
}

/// The plaintext JSON object. Unknown fields are ignored when reading.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plaintext {
    pub v: u64,
    pub id: Uuid,
    pub sent_at: DateTime<Utc>,
    pub text: String,
    /// On a copy that one of our devices sent to our others: the account it sent the message to
    /// (`"sent_to"`, a field this client adds; others ignore it).
    pub sent_to: Option<Uuid>,
}

impl Plaintext {
    /// A new message with a fresh id (UUIDv7) sent now.
    pub fn new(text: impl Into<String>) -> Self {
        Plaintext {
            v: PLAINTEXT_VERSION,
            id: Uuid::now_v7(),
            sent_at: Utc::now(),
            text: text.into(),
            sent_to: None,
        }
    }

    pub fn to_json(&self) -> Vec<u8> {
        let mut json = serde_json::json!({
            "v": self.v,
            "id": self.id.hyphenated().to_string(),
            "sent_at": self.sent_at.to_rfc3339_opts(SecondsFormat::Millis, true),
            "text": self.text,
        });
        if let Some(to) = self.sent_to {
            json["sent_to"] = to.hyphenated().to_string().into();
        }
        serde_json::to_vec(&json).expect("a JSON object serializes")
    }

    /// Reads the plaintext JSON: `v` first (an unknown one is refused as such), then the fields.
    pub fn from_json(bytes: &[u8]) -> Result<Self, OpenError> {
        let value: serde_json::Value = serde_json::from_slice(bytes)
            .map_err(|_| OpenError::BadPlaintext("not UTF-8 JSON".into()))?;
        let obj = value
            .as_object()
            .ok_or_else(|| OpenError::BadPlaintext("not a JSON object".into()))?;
        match obj.get("v") {
            Some(v) if v.as_u64() == Some(PLAINTEXT_VERSION) => {}
            Some(v) => {
                let shown: String = v.to_string().chars().take(16).collect();
                return Err(OpenError::UnknownPlaintextVersion(shown));
            }
            None => return Err(OpenError::BadPlaintext("no \"v\"".into())),
        }
        // Field by field, so that no error message ever quotes a value of the plaintext.
        let id = obj
            .get("id")
            .and_then(|v| v.as_str())
            .and_then(|v| Uuid::try_parse(v).ok())
            .ok_or_else(|| OpenError::BadPlaintext("\"id\" is missing or not a UUID".into()))?;
        let sent_at = obj
            .get("sent_at")
            .and_then(|v| v.as_str())
            .and_then(|v| DateTime::parse_from_rfc3339(v).ok())
            .ok_or_else(|| {
                OpenError::BadPlaintext("\"sent_at\" is missing or not an RFC 3339 time".into())
            })?
            .with_timezone(&Utc);
        let text = obj
            .get("text")
            .and_then(|v| v.as_str())
            .ok_or_else(|| OpenError::BadPlaintext("\"text\" is missing or not a string".into()))?
            .to_string();
        let sent_to = match obj.get("sent_to") {
            None | Some(serde_json::Value::Null) => None,
            Some(v) => Some(
                v.as_str()
                    .and_then(|v| Uuid::try_parse(v).ok())
                    .ok_or_else(|| OpenError::BadPlaintext("\"sent_to\" is not a UUID".into()))?,
            ),
        };
        Ok(Plaintext {
            v: PLAINTEXT_VERSION,
            id,
            sent_at,
            text,
            sent_to,
        })
    }
}

/// `info` = label, zero byte, sender id (16 bytes), recipient id (16 bytes).
pub fn info(sender_id: Uuid, recipient_id: Uuid) -> Vec<u8> {
    let mut info = Vec::with_capacity(INFO_LABEL.len() + 32);
    info.extend_from_slice(INFO_LABEL);
    info.extend_from_slice(sender_id.as_bytes());
    info.extend_from_slice(recipient_id.as_bytes());
    info
}

/// HPKE `SealAuth` in one shot (RFC 9180 §6.1) with the given randomness: returns `(enc, ct)`.
/// The ephemeral key is `DeriveKeyPair(32 bytes from rng)`, so a fixed `ikmE` reproduces the RFC's
/// vectors.
pub fn seal_auth_with_rng(
    sender: &PrivateKey,
    recipient: &PublicKey,
    info: &[u8],
    aad: &[u8],
    plaintext: &[u8],
    rng: &mut impl CryptoRng,
) -> ([u8; ENC_LEN], Vec<u8>) {
    let mode = OpModeS::<Kem>::Auth((sender.to_hpke(), sender.public_key().to_hpke()));
    let (enc, ct) = hpke::single_shot_seal_with_rng::<Aead, Kdf, Kem>(
        &mode,
        &recipient.to_hpke(),
        info,
        plaintext,
        aad,
        rng,
    )
    .expect("sealing to a valid X25519 key");
    let mut enc_bytes = [0u8; ENC_LEN];
    enc_bytes.copy_from_slice(&enc.to_bytes());
    (enc_bytes, ct)
}

/// HPKE `OpenAuth` in one shot; `None` when it does not open.
pub fn open_auth(
    recipient: &PrivateKey,
    sender: &PublicKey,
    enc: &[u8],
    info: &[u8],
    aad: &[u8],
    ct: &[u8],
) -> Option<Vec<u8>> {
    let enc = <Kem as hpke::Kem>::EncappedKey::from_bytes(enc).ok()?;
    hpke::single_shot_open::<Aead, Kdf, Kem>(
        &OpModeR::Auth(sender.to_hpke()),
        &recipient.to_hpke(),
        &enc,
        info,
        ct,
        aad,
    )
    .ok()
}

/// Seals a message from `sender_id` (holding `sender_key`) to `recipient_id` (whose key is
/// `recipient_key`): the bytes of `encrypted_data`, before base64. The ephemeral key comes from
/// the operating system's generator (hpke's `getrandom`).
pub fn seal(
    plaintext: &Plaintext,
    sender_id: Uuid,
    sender_key: &PrivateKey,
    recipient_id: Uuid,
    recipient_key: &PublicKey,
) -> Vec<u8> {
    let mode = OpModeS::<Kem>::Auth((sender_key.to_hpke(), sender_key.public_key().to_hpke()));
    let (enc, ct) = hpke::single_shot_seal::<Aead, Kdf, Kem>(
        &mode,
        &recipient_key.to_hpke(),
        &info(sender_id, recipient_id),
        &plaintext.to_json(),
        b"",
    )
    .expect("sealing to a valid X25519 key");
    frame(&enc.to_bytes(), &ct)
}

fn frame(enc: &[u8], ct: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 + enc.len() + ct.len());
    out.push(FORMAT_VERSION);
    out.extend_from_slice(enc);
    out.extend_from_slice(ct);
    out
}

/// [`seal`] with the given randomness (tests use a fixed one).
pub fn seal_with_rng(
    plaintext: &Plaintext,
    sender_id: Uuid,
    sender_key: &PrivateKey,
    recipient_id: Uuid,
    recipient_key: &PublicKey,
    rng: &mut impl CryptoRng,
) -> Vec<u8> {
    let (enc, ct) = seal_auth_with_rng(
        sender_key,
        recipient_key,
        &info(sender_id, recipient_id),
        b"",
        &plaintext.to_json(),
        rng,
    );
    frame(&enc, &ct)
}

/// What opened an envelope: the plaintext and which of the offered keys did it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Opened {
    pub plaintext: Plaintext,
    /// Index into the recipient keys offered (0 = the first, usually the current key).
    pub recipient_key: usize,
    /// Index into the sender keys offered.
    pub sender_key: usize,
}

/// Opens `encrypted_data` (decoded) sent by `sender_id` to `recipient_id`. `recipient_keys` are
/// the recipient's own private keys (current first, then retired ones still kept);
/// `sender_keys` are the keys pinned for that sender (current first, then earlier ones still in
/// their window). Nothing else is ever tried: a key not pinned for the sender opens nothing.
pub fn open(
    envelope: &[u8],
    sender_id: Uuid,
    recipient_id: Uuid,
    recipient_keys: &[&PrivateKey],
    sender_keys: &[PublicKey],
) -> Result<Opened, OpenError> {
    if let Some(&version) = envelope.first()
        && version != FORMAT_VERSION
    {
        return Err(OpenError::UnknownFormat(version));
    }
    if envelope.len() < MIN_LEN {
        return Err(OpenError::Truncated(envelope.len()));
    }
    let (enc, ct) = envelope[1..].split_at(ENC_LEN);
    let info = info(sender_id, recipient_id);
    for (r, recipient) in recipient_keys.iter().enumerate() {
        for (s, sender) in sender_keys.iter().enumerate() {
            if let Some(pt) = open_auth(recipient, sender, enc, &info, b"", ct) {
                let plaintext = Plaintext::from_json(&pt)?;
                return Ok(Opened {
                    plaintext,
                    recipient_key: r,
                    sender_key: s,
                });
            }
        }
    }
    Err(OpenError::DoesNotOpen)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Party {
        id: Uuid,
        key: PrivateKey,
    }

    fn party() -> Party {
        Party {
            id: Uuid::now_v7(),
            key: PrivateKey::generate(),
        }
    }

    #[test]
    fn seals_and_opens() {
        let (alice, bob) = (party(), party());
        let pt = Plaintext::new("hello, Bob");
        let env = seal(&pt, alice.id, &alice.key, bob.id, &bob.key.public_key());
        assert_eq!(env[0], FORMAT_VERSION);
        assert_eq!(env.len(), 1 + 32 + pt.to_json().len() + 16);
        let opened = open(
            &env,
            alice.id,
            bob.id,
            &[&bob.key],
            &[alice.key.public_key()],
        )
        .unwrap();
        assert_eq!(
            opened.plaintext,
            Plaintext::from_json(&pt.to_json()).unwrap()
        );
        assert_eq!(opened.plaintext.text, "hello, Bob");
    }

    #[test]
    fn a_flipped_bit_in_any_byte_is_refused() {
        let (alice, bob) = (party(), party());
        let env = seal(
            &Plaintext::new("x"),
            alice.id,
            &alice.key,
            bob.id,
            &bob.key.public_key(),
        );
        for i in 1..env.len() {
            let bit = 1u8 << (i % 8);
            let mut t = env.clone();
            t[i] ^= bit;
            assert_eq!(
                open(&t, alice.id, bob.id, &[&bob.key], &[alice.key.public_key()]),
                Err(OpenError::DoesNotOpen),
                "byte {i}"
            );
        }
        let mut t = env.clone();
        t[0] = 2;
        assert_eq!(
            open(&t, alice.id, bob.id, &[&bob.key], &[alice.key.public_key()]),
            Err(OpenError::UnknownFormat(2))
        );
        assert_eq!(
            open(
                &env[..40],
                alice.id,
                bob.id,
                &[&bob.key],
                &[alice.key.public_key()]
            ),
            Err(OpenError::Truncated(40))
        );
        assert_eq!(
            open(&[], alice.id, bob.id, &[&bob.key], &[]),
            Err(OpenError::Truncated(0))
        );
    }

    #[test]
    fn info_binds_the_pair_of_accounts() {
        let (alice, bob, carol) = (party(), party(), party());
        // Sealed for Carol's account id but with Bob's key (a server relaying it to Bob):
        // Bob's key would decapsulate, but the info names Carol.
        let env = seal(
            &Plaintext::new("x"),
            alice.id,
            &alice.key,
            carol.id,
            &bob.key.public_key(),
        );
        assert_eq!(
            open(
                &env,
                alice.id,
                bob.id,
                &[&bob.key],
                &[alice.key.public_key()]
            ),
            Err(OpenError::DoesNotOpen)
        );
        // And a message claimed to be from Carol, sealed by Alice with Alice's key as if from
        // Carol's id, opens only as coming from Carol's id, not as Alice's.
        let env = seal(
            &Plaintext::new("x"),
            carol.id,
            &alice.key,
            bob.id,
            &bob.key.public_key(),
        );
        assert_eq!(
            open(
                &env,
                alice.id,
                bob.id,
                &[&bob.key],
                &[alice.key.public_key()]
            ),
            Err(OpenError::DoesNotOpen)
        );
    }

    #[test]
    fn a_key_not_pinned_for_the_sender_opens_nothing() {
        let (alice, bob, mallory) = (party(), party(), party());
        // The server substitutes Mallory's key for Alice's; Bob has Alice's pinned.
        let env = seal(
            &Plaintext::new("x"),
            alice.id,
            &mallory.key,
            bob.id,
            &bob.key.public_key(),
        );
        assert_eq!(
            open(
                &env,
                alice.id,
                bob.id,
                &[&bob.key],
                &[alice.key.public_key()]
            ),
            Err(OpenError::DoesNotOpen)
        );
    }

    #[test]
    fn retired_keys_on_both_sides_still_open() {
        let (alice, bob) = (party(), party());
        let (alice_new, bob_new) = (PrivateKey::generate(), PrivateKey::generate());
        let env = seal(
            &Plaintext::new("x"),
            alice.id,
            &alice.key,
            bob.id,
            &bob.key.public_key(),
        );
        let opened = open(
            &env,
            alice.id,
            bob.id,
            &[&bob_new, &bob.key],
            &[alice_new.public_key(), alice.key.public_key()],
        )
        .unwrap();
        assert_eq!((opened.recipient_key, opened.sender_key), (1, 1));
    }

    #[test]
    fn plaintext_versions_and_unknown_fields() {
        let id = Uuid::now_v7();
        let ok = format!(
            r#"{{"v":1,"id":"{id}","sent_at":"2026-01-02T03:04:05Z","text":"hi","extra":[1]}}"#
        );
        assert_eq!(Plaintext::from_json(ok.as_bytes()).unwrap().text, "hi");
        let v2 = format!(r#"{{"v":2,"id":"{id}","sent_at":"2026-01-02T03:04:05Z","text":"hi"}}"#);
        assert_eq!(
            Plaintext::from_json(v2.as_bytes()),
            Err(OpenError::UnknownPlaintextVersion("2".into()))
        );
        assert!(matches!(
            Plaintext::from_json(b"[]"),
            Err(OpenError::BadPlaintext(_))
        ));
        assert!(matches!(
            Plaintext::from_json(br#"{"v":1,"text":"no id"}"#),
            Err(OpenError::BadPlaintext(_))
        ));
    }

    #[test]
    fn info_layout() {
        let s = Uuid::parse_str("0190a6f0-0000-7000-8000-000000000001").unwrap();
        let r = Uuid::parse_str("0190a6f0-0000-7000-8000-000000000002").unwrap();
        let i = info(s, r);
        assert_eq!(&i[..20], b"secure-messenger/v1\0");
        assert_eq!(&i[20..36], s.as_bytes());
        assert_eq!(&i[36..], r.as_bytes());
        assert_eq!(i.len(), 52);
    }
}
