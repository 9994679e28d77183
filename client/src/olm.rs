//! ENVELOPE.md "Version 2": Olm sessions (forward secrecy) on vodozemac, with the signatures of
//! API.md "Prekeys (forward secrecy)".
//!
//! The device's Olm account uses the device's X25519 key as its Curve25519 identity key and the
//! device's Ed25519 signing key as its Ed25519 identity key. One [`OlmState`] holds the account,
//! the prekey id counter and the sessions (a few per peer device, newest first); the caller saves
//! [`OlmState::to_json`] (0600, atomically) after every change: every message read or sent, every
//! prekey upload prepared.
//!
//! A re-keyed account (a new device key or signing key) leaves the previous one retired for
//! [`MESSAGE_TTL`]: a peer may have claimed one of its prekeys before the change and send a
//! pre-key message made from it for as long as messages live on the server.
//!
//! Envelope bytes: `0x02 ‖ type (0x00 pre-key, 0x01 normal) ‖ the Olm message`. Plaintext: the
//! version 1 JSON plus `"from"` and `"to"` (`{"user_id", "device_id"}`).

use crate::envelope::{OpenError, Plaintext};
use crate::keys::{PrivateKey, PublicKey};
use crate::store::MESSAGE_TTL;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use uuid::Uuid;
use vodozemac::olm::{
    Account, AccountPickle, InboundCreationResult, OlmMessage, PreKeyMessage, Session,
    SessionConfig, SessionCreationError, SessionPickle,
};
use vodozemac::{Curve25519PublicKey, Curve25519SecretKey, Ed25519SecretKey, KeyId};
use zeroize::Zeroizing;

/// The first byte of a version 2 `encrypted_data`.
pub const FORMAT_VERSION: u8 = 0x02;
/// The second byte: an Olm pre-key message (the session is not yet answered).
pub const MESSAGE_TYPE_PRE_KEY: u8 = 0x00;
/// The second byte: an Olm normal message.
pub const MESSAGE_TYPE_NORMAL: u8 = 0x01;
/// Sessions kept per peer device, newest first (Matrix clients keep a handful too): enough for
/// two devices that started sessions at once, few enough that a peer cannot grow the state.
pub const MAX_SESSIONS_PER_PEER: usize = 4;
/// One-time keys a device aims to have on the server.
pub const PREKEY_TARGET: u32 = 50;
/// Below this many one-time keys on the server, a device tops up to [`PREKEY_TARGET`].
pub const PREKEY_LOW_WATER: u32 = 25;
/// API.md `PREKEY_UPLOAD_MAX` (its default): one-time keys in one upload.
pub const PREKEY_UPLOAD_MAX: usize = 100;
/// DER of an Ed25519 SubjectPublicKeyInfo up to its 32 key bytes (RFC 8410).
pub const ED25519_SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];
/// Version of [`OlmState`]'s JSON.
const STATE_VERSION: u32 = 1;

/// Why a version 2 operation failed. None carries plaintext or key material.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OlmError {
    #[error("the envelope is truncated")]
    Truncated,
    #[error("the envelope has format version {0}, not version 2 (Olm)")]
    NotVersion2(u8),
    #[error("the envelope has Olm message type {0}, known are 0 (pre-key) and 1 (normal)")]
    UnknownMessageType(u8),
    #[error("the Olm message is malformed")]
    Malformed,
    #[error("the Olm session uses a version other than libolm's (SessionConfig::version_1)")]
    UnsupportedSessionVersion,
    #[error(
        "the message comes from an identity key other than the one pinned for its sender device"
    )]
    IdentityKeyMismatch,
    #[error("no Olm session with this device: a normal message cannot start one")]
    NoSession,
    #[error(
        "the pre-key message was made from a one-time key this device does not hold \
         (already used, or never its own)"
    )]
    UnknownOneTimeKey,
    #[error("the message does not open in any session with this device")]
    DoesNotOpen,
    #[error(transparent)]
    Plaintext(#[from] OpenError),
    #[error("the plaintext's \"{0}\" differs from the ids the message was delivered with")]
    Misaddressed(&'static str),
    #[error("the prekey's signature does not verify under the signing key pinned for its device")]
    BadPrekeySignature,
    #[error(
        "the binding signature does not verify: the signing key is not bound to this device key"
    )]
    BadBindingSignature,
    #[error("the rotation signature does not verify under the previous signing key")]
    BadRotationSignature,
    #[error("{0} is not base64 of {1} bytes")]
    BadEncoding(&'static str, usize),
    #[error("the prekey is a small-order X25519 point")]
    SmallOrderPrekey,
    #[error("not an Ed25519 public key (SPKI PEM)")]
    NotEd25519,
    #[error("the Olm account's identity keys are not this device's keys")]
    AccountKeyMismatch,
    #[error("every prekey id up to 2^32-1 is used under this signing key: rotate the signing key")]
    KeyIdsExhausted,
    #[error("the Olm state is unreadable: {0}")]
    State(String),
}

/// A device as the API names it: its account's user id and its device id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct DeviceAddress {
    pub user_id: Uuid,
    pub device_id: u32,
}

impl DeviceAddress {
    pub fn new(user_id: Uuid, device_id: u32) -> Self {
        DeviceAddress { user_id, device_id }
    }
}

/// What a signature vouches for (API.md "Prekeys"): each is its own context string.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignatureContext {
    /// The device's X25519 `public_key` ‖ the signing key, by the signing key.
    Bind,
    /// The new signing key, by the current one.
    Rotate,
    /// key_id ‖ one-time prekey.
    Prekey,
    /// key_id ‖ last-resort prekey.
    LastResort,
}

impl SignatureContext {
    pub fn as_bytes(self) -> &'static [u8] {
        match self {
            Self::Bind => b"sm-bind",
            Self::Rotate => b"sm-rotate",
            Self::Prekey => b"sm-prekey",
            Self::LastResort => b"sm-last-resort",
        }
    }
}

/// The bytes a signature covers: `context ‖ 0x00 ‖ user id (16) ‖ device id (4, BE) ‖ fields`.
pub fn signed_message(
    context: SignatureContext,
    owner: DeviceAddress,
    fields: &[&[u8]],
) -> Vec<u8> {
    let mut message = Vec::with_capacity(64 + fields.iter().map(|f| f.len()).sum::<usize>());
    message.extend_from_slice(context.as_bytes());
    message.push(0);
    message.extend_from_slice(owner.user_id.as_bytes());
    message.extend_from_slice(&owner.device_id.to_be_bytes());
    for field in fields {
        message.extend_from_slice(field);
    }
    message
}

/// An Ed25519 public signing key (a device's `signing_key`).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct SigningPublicKey(pub [u8; 32]);

impl fmt::Debug for SigningPublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SigningPublicKey({})", BASE64.encode(self.0))
    }
}

impl SigningPublicKey {
    /// SPKI PEM (`-----BEGIN PUBLIC KEY-----`), as `signing_key` carries it.
    pub fn to_pem(&self) -> String {
        let mut der = ED25519_SPKI_PREFIX.to_vec();
        der.extend_from_slice(&self.0);
        pem_rfc7468::encode_string("PUBLIC KEY", pem_rfc7468::LineEnding::LF, &der)
            .expect("PEM encoding of 44 bytes")
    }

    /// Parses the API's `signing_key`: one Ed25519 SPKI PEM block, a valid curve point.
    pub fn from_pem(pem: &str) -> Result<Self, OlmError> {
        let (label, der) =
            pem_rfc7468::decode_vec(pem.trim().as_bytes()).map_err(|_| OlmError::NotEd25519)?;
        if label != "PUBLIC KEY" || der.len() != 44 || der[..12] != ED25519_SPKI_PREFIX {
            return Err(OlmError::NotEd25519);
        }
        let mut raw = [0u8; 32];
        raw.copy_from_slice(&der[12..]);
        ed25519_dalek::VerifyingKey::from_bytes(&raw).map_err(|_| OlmError::NotEd25519)?;
        Ok(SigningPublicKey(raw))
    }

    /// Strict Ed25519 verification (as the server does: no malleable or small-order signatures).
    pub fn verifies(&self, message: &[u8], signature: &[u8; 64]) -> bool {
        ed25519_dalek::VerifyingKey::from_bytes(&self.0)
            .map(|key| {
                key.verify_strict(message, &ed25519_dalek::Signature::from_bytes(signature))
                    .is_ok()
            })
            .unwrap_or(false)
    }
}

fn decode_fixed<const N: usize>(field: &'static str, b64: &str) -> Result<[u8; N], OlmError> {
    if b64.len() > N.div_ceil(3) * 4 {
        return Err(OlmError::BadEncoding(field, N));
    }
    BASE64
        .decode(b64)
        .ok()
        .and_then(|bytes| bytes.try_into().ok())
        .ok_or(OlmError::BadEncoding(field, N))
}

/// The body of `PUT /keys/signing-key` (without `password`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SigningKeyUpload {
    pub signing_key: String,
    pub binding_sig: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rotation_sig: Option<String>,
}

/// One signed prekey as `POST /keys/prekeys` takes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SignedPrekey {
    pub key_id: u32,
    pub public_key: String,
    pub signature: String,
}

/// The body of `POST /keys/prekeys`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PrekeyUpload {
    pub prekeys: Vec<SignedPrekey>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_resort: Option<SignedPrekey>,
}

/// A prekey as `POST /keys/claim` answers it (`devices[].prekey`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ClaimedPrekey {
    pub key_id: u32,
    pub public_key: String,
    pub signature: String,
    #[serde(default)]
    pub last_resort: bool,
}

/// A claimed prekey whose signature verified under the signing key pinned for its device: the
/// only kind a session can be started from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VerifiedPrekey {
    owner: DeviceAddress,
    key_id: u32,
    public_key: [u8; 32],
    last_resort: bool,
}

impl VerifiedPrekey {
    pub fn owner(&self) -> DeviceAddress {
        self.owner
    }
    pub fn key_id(&self) -> u32 {
        self.key_id
    }
    pub fn is_last_resort(&self) -> bool {
        self.last_resort
    }
}

/// Checks a claimed prekey of `owner` against the signing key pinned for `owner`: the signature
/// must be over `sm-prekey` (or `sm-last-resort` when the server says so), that user id, that
/// device id, that key id and that key. Anything else is refused.
pub fn verify_prekey(
    claimed: &ClaimedPrekey,
    owner: DeviceAddress,
    pinned_signing_key: &SigningPublicKey,
) -> Result<VerifiedPrekey, OlmError> {
    let public_key: [u8; 32] = decode_fixed("public_key", &claimed.public_key)?;
    let signature: [u8; 64] = decode_fixed("signature", &claimed.signature)?;
    let context = if claimed.last_resort {
        SignatureContext::LastResort
    } else {
        SignatureContext::Prekey
    };
    let message = signed_message(
        context,
        owner,
        &[&claimed.key_id.to_be_bytes(), &public_key],
    );
    if !pinned_signing_key.verifies(&message, &signature) {
        return Err(OlmError::BadPrekeySignature);
    }
    if PublicKey(public_key).is_small_order() {
        return Err(OlmError::SmallOrderPrekey);
    }
    Ok(VerifiedPrekey {
        owner,
        key_id: claimed.key_id,
        public_key,
        last_resort: claimed.last_resort,
    })
}

/// Checks a directory's `binding_sig`: the signing key says it belongs to the device whose
/// X25519 key is `device_key`.
pub fn verify_binding(
    signing_key: &SigningPublicKey,
    binding_sig: &str,
    owner: DeviceAddress,
    device_key: &PublicKey,
) -> Result<(), OlmError> {
    let signature: [u8; 64] = decode_fixed("binding_sig", binding_sig)?;
    let message = signed_message(
        SignatureContext::Bind,
        owner,
        &[&device_key.0, &signing_key.0],
    );
    if signing_key.verifies(&message, &signature) {
        Ok(())
    } else {
        Err(OlmError::BadBindingSignature)
    }
}

/// Checks a `rotation_sig`: the previous signing key vouches for the new one.
pub fn verify_rotation(
    previous: &SigningPublicKey,
    new: &SigningPublicKey,
    rotation_sig: &str,
    owner: DeviceAddress,
) -> Result<(), OlmError> {
    let signature: [u8; 64] = decode_fixed("rotation_sig", rotation_sig)?;
    let message = signed_message(SignatureContext::Rotate, owner, &[&new.0]);
    if previous.verifies(&message, &signature) {
        Ok(())
    } else {
        Err(OlmError::BadRotationSignature)
    }
}

/// `GET /keys/prekeys/count` (and the `available` of `POST /keys/prekeys`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct PrekeyCount {
    pub available: u32,
    #[serde(default)]
    pub lowest_key_id: Option<u32>,
    #[serde(default)]
    pub last_resort_key_id: Option<u32>,
    #[serde(default)]
    pub last_resort_claims: u64,
}

/// What to upload next, if anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TopUp {
    pub one_time_keys: usize,
    pub new_last_resort: bool,
}

/// Decides a top-up from the server's count: one-time keys back to [`PREKEY_TARGET`] once fewer
/// than [`PREKEY_LOW_WATER`] are left (at most [`PREKEY_UPLOAD_MAX`] in one upload), and a new
/// last-resort key when there is none or the current one has started sessions (the account keeps
/// the previous one's private half, so sessions in flight from it still open). None: nothing to do.
pub fn top_up(count: &PrekeyCount) -> Option<TopUp> {
    let one_time_keys = if count.available < PREKEY_LOW_WATER {
        ((PREKEY_TARGET - count.available) as usize).min(PREKEY_UPLOAD_MAX)
    } else {
        0
    };
    let new_last_resort = count.last_resort_key_id.is_none() || count.last_resort_claims > 0;
    (one_time_keys > 0 || new_last_resort).then_some(TopUp {
        one_time_keys,
        new_last_resort,
    })
}

/// Whether a message started a session or continued one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageKind {
    PreKey,
    Normal,
}

/// A message that opened, addressed as delivered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decrypted {
    pub plaintext: Plaintext,
    pub kind: MessageKind,
    /// This message created a new inbound session (its one-time key is now gone).
    pub new_session: bool,
}

struct PeerSession {
    /// The peer's Curve25519 identity key the session was made with (an outbound session's own
    /// `SessionKeys` name ours, not theirs).
    peer_identity: PublicKey,
    session: Session,
}

/// An account this device used before a rotation: its unused one-time keys and its last-resort
/// keys still start inbound sessions for pre-key messages made from prekeys claimed before then.
struct RetiredAccount {
    account: Account,
    retired_at: DateTime<Utc>,
    /// Every pre-key message made from its prekeys has expired by then; it is dropped after it.
    keep_until: DateTime<Utc>,
}

/// A device's Olm state: its account, the next prekey id and its sessions. Its `Debug` prints no
/// secret.
pub struct OlmState {
    own: DeviceAddress,
    account: Account,
    /// Accounts replaced by a rotation, oldest first, each kept for [`MESSAGE_TTL`].
    retired: Vec<RetiredAccount>,
    /// The next prekey `key_id`, above every id uploaded under the current signing key; 2^32 when
    /// all are used.
    next_key_id: u64,
    /// Per peer device, newest (most recently used to receive or created) first.
    sessions: BTreeMap<DeviceAddress, Vec<PeerSession>>,
}

impl fmt::Debug for OlmState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OlmState")
            .field("own", &self.own)
            .field("identity_key", &self.identity_key())
            .field("signing_key", &self.signing_key())
            .field("next_key_id", &self.next_key_id)
            .field(
                "retired_accounts",
                &self
                    .retired
                    .iter()
                    .map(|r| r.keep_until)
                    .collect::<Vec<_>>(),
            )
            .field(
                "sessions",
                &self
                    .sessions
                    .iter()
                    .map(|(peer, sessions)| (peer, sessions.len()))
                    .collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

#[derive(Serialize, Deserialize)]
struct StoredState {
    version: u32,
    own: DeviceAddress,
    account: AccountPickle,
    next_key_id: u64,
    sessions: Vec<StoredPeer>,
    /// Absent in states written before retired accounts were kept.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    retired_accounts: Vec<StoredRetiredAccount>,
}

#[derive(Serialize, Deserialize)]
struct StoredRetiredAccount {
    account: AccountPickle,
    retired_at: DateTime<Utc>,
    keep_until: DateTime<Utc>,
}

#[derive(Serialize, Deserialize)]
struct StoredPeer {
    peer: DeviceAddress,
    sessions: Vec<StoredSession>,
}

#[derive(Serialize, Deserialize)]
struct StoredSession {
    /// base64 of the 32 raw bytes.
    peer_identity: String,
    session: SessionPickle,
}

/// vodozemac's `AccountPickle` with our own keys in it: the same serde shape (`signing_key` is the
/// externally tagged `SecretKeys::Normal(SigningKey)`, `diffie_hellman_key` the transparent
/// `Curve25519SecretKey`), written through vodozemac's own key types so that it follows their
/// encoding. The account's public keys are compared with ours afterwards.
#[derive(Serialize)]
struct AccountPickleFromKeys<'a> {
    signing_key: SecretKeysRepr<'a>,
    diffie_hellman_key: &'a Curve25519SecretKey,
    one_time_keys: serde_json::Value,
    fallback_keys: serde_json::Value,
}

#[derive(Serialize)]
enum SecretKeysRepr<'a> {
    Normal(&'a Ed25519SecretKey),
}

fn account_from_keys(
    device_key: &PrivateKey,
    signing_key: &Ed25519SecretKey,
) -> Result<Account, OlmError> {
    // A fresh account's (empty) one-time and fallback key stores: no secret in them.
    let fresh = serde_json::to_value(Account::new().pickle())
        .map_err(|e| OlmError::State(e.to_string()))?;
    let diffie_hellman_key = Curve25519SecretKey::from_slice(device_key.as_bytes());
    let shape = AccountPickleFromKeys {
        signing_key: SecretKeysRepr::Normal(signing_key),
        diffie_hellman_key: &diffie_hellman_key,
        one_time_keys: fresh["one_time_keys"].clone(),
        fallback_keys: fresh["fallback_keys"].clone(),
    };
    // Room enough up front, so that no reallocation leaves a copy of the keys behind.
    let mut json = Zeroizing::new(Vec::with_capacity(4096));
    serde_json::to_writer(&mut *json, &shape).map_err(|e| OlmError::State(e.to_string()))?;
    let pickle: AccountPickle =
        serde_json::from_slice(&json).map_err(|e| OlmError::State(e.to_string()))?;
    let account = Account::from_pickle(pickle);
    if account.curve25519_key().to_bytes() != device_key.public_key().0
        || account.ed25519_key().as_bytes() != signing_key.public_key().as_bytes()
    {
        return Err(OlmError::AccountKeyMismatch);
    }
    Ok(account)
}

/// Counts the bytes written to it (and keeps none).
struct ByteCount(usize);

impl std::io::Write for ByteCount {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len();
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn copy_account(account: &Account) -> Account {
    Account::from_pickle(account.pickle())
}

fn copy_session(session: &Session) -> Session {
    Session::from_pickle(session.pickle())
}

/// Splits `encrypted_data` into the Olm message.
pub fn parse_envelope(envelope: &[u8]) -> Result<OlmMessage, OlmError> {
    let [version, message_type, body @ ..] = envelope else {
        return Err(OlmError::Truncated);
    };
    if *version != FORMAT_VERSION {
        return Err(OlmError::NotVersion2(*version));
    }
    if *message_type > MESSAGE_TYPE_NORMAL {
        return Err(OlmError::UnknownMessageType(*message_type));
    }
    OlmMessage::from_parts(*message_type as usize, body).map_err(|_| OlmError::Malformed)
}

/// The envelope bytes of an Olm message.
pub fn frame(message: &OlmMessage) -> Vec<u8> {
    let (message_type, body) = message.to_parts();
    let mut out = Vec::with_capacity(2 + body.len());
    out.push(FORMAT_VERSION);
    out.push(message_type as u8);
    out.extend_from_slice(&body);
    out
}

/// The version 2 plaintext: the version 1 JSON plus `from` and `to`.
pub fn plaintext_json(plaintext: &Plaintext, from: DeviceAddress, to: DeviceAddress) -> Vec<u8> {
    let mut value: serde_json::Value =
        serde_json::from_slice(&plaintext.to_json()).expect("the v1 JSON parses");
    value["from"] = serde_json::json!({"user_id": from.user_id, "device_id": from.device_id});
    value["to"] = serde_json::json!({"user_id": to.user_id, "device_id": to.device_id});
    serde_json::to_vec(&value).expect("a JSON object serializes")
}

/// Reads a version 2 plaintext and checks its `from`/`to` against the delivery.
pub fn read_plaintext(
    bytes: &[u8],
    from: DeviceAddress,
    to: DeviceAddress,
) -> Result<Plaintext, OlmError> {
    let plaintext = Plaintext::from_json(bytes)?;
    let value: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|_| OpenError::BadPlaintext("not JSON".into()))?;
    for (field, expected) in [("from", from), ("to", to)] {
        let named: DeviceAddress = value
            .get(field)
            .and_then(|v| serde_json::from_value(v.clone()).ok())
            .ok_or_else(|| {
                OpenError::BadPlaintext(format!(
                    "\"{field}\" is missing or not {{\"user_id\", \"device_id\"}}"
                ))
            })?;
        if named != expected {
            return Err(OlmError::Misaddressed(field));
        }
    }
    Ok(plaintext)
}

fn creation_error(error: SessionCreationError) -> OlmError {
    match error {
        SessionCreationError::MismatchedIdentityKey(..) => OlmError::IdentityKeyMismatch,
        SessionCreationError::MissingOneTimeKey(_) => OlmError::UnknownOneTimeKey,
        SessionCreationError::MismatchedSessionConfig { .. } => OlmError::UnsupportedSessionVersion,
        SessionCreationError::NonContributoryKey => OlmError::DoesNotOpen,
        SessionCreationError::Decryption(_) => OlmError::DoesNotOpen,
    }
}

impl OlmState {
    /// The state of device `own`, whose X25519 key is `device_key`, with its Ed25519 signing key
    /// (its 32-byte seed) or, when None, a fresh one.
    pub fn new(
        own: DeviceAddress,
        device_key: &PrivateKey,
        signing_seed: Option<&[u8; 32]>,
    ) -> Result<Self, OlmError> {
        let signing_key = match signing_seed {
            Some(seed) => Ed25519SecretKey::from_slice(seed),
            None => Ed25519SecretKey::new(),
        };
        Ok(OlmState {
            own,
            account: account_from_keys(device_key, &signing_key)?,
            retired: Vec::new(),
            next_key_id: 0,
            sessions: BTreeMap::new(),
        })
    }

    pub fn own(&self) -> DeviceAddress {
        self.own
    }

    /// The account's Curve25519 identity key: the device's X25519 `public_key`.
    pub fn identity_key(&self) -> PublicKey {
        PublicKey(self.account.curve25519_key().to_bytes())
    }

    /// The account's Ed25519 key: the device's `signing_key`.
    pub fn signing_key(&self) -> SigningPublicKey {
        SigningPublicKey(*self.account.ed25519_key().as_bytes())
    }

    fn sign(&self, context: SignatureContext, fields: &[&[u8]]) -> String {
        let message = signed_message(context, self.own, fields);
        BASE64.encode(self.account.sign(&message).to_bytes())
    }

    /// The body of `PUT /keys/signing-key` publishing this state's signing key (first time, or
    /// after losing the previous one, with the password added by the caller).
    pub fn signing_key_upload(&self) -> SigningKeyUpload {
        let signing_key = self.signing_key();
        SigningKeyUpload {
            signing_key: signing_key.to_pem(),
            binding_sig: self.sign(
                SignatureContext::Bind,
                &[&self.identity_key().0, &signing_key.0],
            ),
            rotation_sig: None,
        }
    }

    /// A new signing key (`new_seed`, or a fresh one) on the account of `device_key` (the
    /// current device key or its replacement): returns the state to use once the server accepted
    /// it and the body of `PUT /keys/signing-key` with `rotation_sig` by the current key. The
    /// sessions are kept; the new account's one-time and fallback keys start anew (the server
    /// deletes the device's prekeys on any change), and the current account is retired at `now`
    /// and kept for [`MESSAGE_TTL`]: prekeys claimed before the change still start sessions
    /// (accounts retired earlier come along, except those past their time).
    /// `self` stays unchanged, so a refused upload changes nothing.
    pub fn rotate_signing_key(
        &self,
        device_key: &PrivateKey,
        new_seed: Option<&[u8; 32]>,
        now: DateTime<Utc>,
    ) -> Result<(OlmState, SigningKeyUpload), OlmError> {
        let mut rotated = OlmState::new(self.own, device_key, new_seed)?;
        rotated.retired = self
            .retired
            .iter()
            .filter(|r| r.keep_until > now)
            .map(|r| RetiredAccount {
                account: copy_account(&r.account),
                retired_at: r.retired_at,
                keep_until: r.keep_until,
            })
            .collect();
        rotated.retired.push(RetiredAccount {
            account: copy_account(&self.account),
            retired_at: now,
            keep_until: now + MESSAGE_TTL,
        });
        rotated.sessions = self
            .sessions
            .iter()
            .map(|(peer, sessions)| {
                let copies = sessions
                    .iter()
                    .map(|s| PeerSession {
                        peer_identity: s.peer_identity,
                        session: copy_session(&s.session),
                    })
                    .collect();
                (*peer, copies)
            })
            .collect();
        let mut upload = rotated.signing_key_upload();
        upload.rotation_sig =
            Some(self.sign(SignatureContext::Rotate, &[&rotated.signing_key().0]));
        Ok((rotated, upload))
    }

    /// The body of `POST /keys/prekeys`: `one_time_keys` new one-time keys (at most
    /// [`PREKEY_UPLOAD_MAX`], counting keys of an upload that did not go through, which are sent
    /// again) and, when `new_last_resort`, a new last-resort key, each with a fresh `key_id`
    /// above all before it and its signature. Save the state before sending it (the ids are used
    /// up), and call [`OlmState::mark_prekeys_published`] after a 200.
    pub fn prekey_upload(
        &mut self,
        one_time_keys: usize,
        new_last_resort: bool,
    ) -> Result<PrekeyUpload, OlmError> {
        let pending = self.account.one_time_keys().len();
        let wanted = one_time_keys.min(PREKEY_UPLOAD_MAX);
        if wanted > pending {
            self.account.generate_one_time_keys(wanted - pending);
        }
        if new_last_resort {
            self.account.generate_fallback_key();
        }
        let mut one_time: Vec<(KeyId, Curve25519PublicKey)> =
            self.account.one_time_keys().into_iter().collect();
        one_time.sort_by_key(|(id, _)| *id);
        let last_resort: Option<Curve25519PublicKey> =
            self.account.fallback_key().into_values().next();
        let needed = one_time.len() as u64 + u64::from(last_resort.is_some());
        if self.next_key_id + needed > 1 << 32 {
            return Err(OlmError::KeyIdsExhausted);
        }
        let mut signed = |context: SignatureContext, key: &Curve25519PublicKey| {
            let key_id = self.next_key_id as u32;
            self.next_key_id += 1;
            SignedPrekey {
                key_id,
                public_key: BASE64.encode(key.as_bytes()),
                signature: self.sign_prekey(context, key_id, key),
            }
        };
        let prekeys = one_time
            .iter()
            .map(|(_, key)| signed(SignatureContext::Prekey, key))
            .collect();
        let last_resort = last_resort.map(|key| signed(SignatureContext::LastResort, &key));
        Ok(PrekeyUpload {
            prekeys,
            last_resort,
        })
    }

    fn sign_prekey(
        &self,
        context: SignatureContext,
        key_id: u32,
        key: &Curve25519PublicKey,
    ) -> String {
        self.sign(context, &[&key_id.to_be_bytes(), key.as_bytes()])
    }

    /// After the server accepted a [`PrekeyUpload`]: its keys are no longer offered again.
    pub fn mark_prekeys_published(&mut self) {
        self.account.mark_keys_as_published();
    }

    /// One-time private keys held (published or not): each goes once a session made from it has
    /// opened a message.
    pub fn one_time_keys_held(&self) -> usize {
        self.account.stored_one_time_key_count()
    }

    /// Whether a session with `peer` under its pinned identity key exists to encrypt with.
    pub fn has_session(&self, peer: DeviceAddress, peer_identity: &PublicKey) -> bool {
        self.sessions
            .get(&peer)
            .is_some_and(|s| s.iter().any(|s| s.peer_identity == *peer_identity))
    }

    /// Sessions kept with `peer` (all identity keys).
    pub fn session_count(&self, peer: DeviceAddress) -> usize {
        self.sessions.get(&peer).map_or(0, Vec::len)
    }

    /// Accounts retired by rotations and still kept (their prekeys may be in flight).
    pub fn retired_account_count(&self) -> usize {
        self.retired.len()
    }

    /// Drops the retired accounts whose prekeys can no longer be in a live message (kept
    /// [`MESSAGE_TTL`] from their rotation); true when one was dropped. Called before the state
    /// is saved.
    pub fn prune_retired_accounts(&mut self, now: DateTime<Utc>) -> bool {
        let before = self.retired.len();
        self.retired.retain(|r| r.keep_until > now);
        self.retired.len() != before
    }

    /// Forgets every session with `peer` (a lost session: the next message starts a new one).
    pub fn forget_sessions(&mut self, peer: DeviceAddress) {
        self.sessions.remove(&peer);
    }

    fn put_first(&mut self, peer: DeviceAddress, session: PeerSession) {
        let sessions = self.sessions.entry(peer).or_default();
        sessions.insert(0, session);
        sessions.truncate(MAX_SESSIONS_PER_PEER);
    }

    /// Starts an outbound session with `peer` (whose pinned X25519 key is `peer_identity`) from
    /// a prekey of that device that verified under its pinned signing key. It becomes the session
    /// messages to `peer` use.
    pub fn start_session(
        &mut self,
        peer_identity: &PublicKey,
        prekey: &VerifiedPrekey,
    ) -> Result<(), OlmError> {
        let session = self
            .account
            .create_outbound_session(
                SessionConfig::version_1(),
                Curve25519PublicKey::from_bytes(peer_identity.0),
                Curve25519PublicKey::from_bytes(prekey.public_key),
            )
            .map_err(creation_error)?;
        self.put_first(
            prekey.owner,
            PeerSession {
                peer_identity: *peer_identity,
                session,
            },
        );
        Ok(())
    }

    /// Encrypts `plaintext` to `peer` in the newest session made with its pinned identity key:
    /// the bytes of `encrypted_data`. [`OlmError::NoSession`] when there is none (claim a prekey
    /// and [`OlmState::start_session`] first).
    pub fn encrypt(
        &mut self,
        peer: DeviceAddress,
        peer_identity: &PublicKey,
        plaintext: &Plaintext,
    ) -> Result<Vec<u8>, OlmError> {
        let own = self.own;
        let session = self
            .sessions
            .get_mut(&peer)
            .and_then(|s| s.iter_mut().find(|s| s.peer_identity == *peer_identity))
            .ok_or(OlmError::NoSession)?;
        let json = Zeroizing::new(plaintext_json(plaintext, own, peer));
        let message = session
            .session
            .encrypt(&*json)
            .map_err(|_| OlmError::DoesNotOpen)?;
        Ok(frame(&message))
    }

    /// Decrypts `encrypted_data` that the server delivered from device `from`, whose pinned
    /// X25519 key is `from_identity`, to this device. A pre-key message with no session of its
    /// own makes an inbound session (using up its one-time key); a normal message opens only in
    /// a session made with `from_identity`. The plaintext's `from`/`to` must match the delivery.
    /// On any error the state is unchanged.
    pub fn decrypt(
        &mut self,
        envelope: &[u8],
        from: DeviceAddress,
        from_identity: &PublicKey,
    ) -> Result<Decrypted, OlmError> {
        let message = parse_envelope(envelope)?;
        let own = self.own;
        if let OlmMessage::PreKey(pre_key) = &message {
            if pre_key.identity_key().to_bytes() != from_identity.0 {
                return Err(OlmError::IdentityKeyMismatch);
            }
            let existing = self.sessions.get(&from).and_then(|s| {
                s.iter().position(|s| {
                    s.peer_identity == *from_identity
                        && s.session.session_keys() == pre_key.session_keys()
                })
            });
            if let Some(index) = existing {
                // The sender has not seen an answer yet and still sends pre-key messages.
                return self
                    .decrypt_in(from, index, &message)?
                    .map(|plaintext| Decrypted {
                        plaintext,
                        kind: MessageKind::PreKey,
                        new_session: false,
                    })
                    .ok_or(OlmError::DoesNotOpen);
            }
            let (which, account, created) = self.inbound_session(from_identity, pre_key)?;
            let bytes = Zeroizing::new(created.plaintext);
            let plaintext = read_plaintext(&bytes, from, own)?;
            match which {
                None => self.account = account,
                Some(index) => self.retired[index].account = account,
            }
            self.put_first(
                from,
                PeerSession {
                    peer_identity: *from_identity,
                    session: created.session,
                },
            );
            return Ok(Decrypted {
                plaintext,
                kind: MessageKind::PreKey,
                new_session: true,
            });
        }
        let candidates: Vec<usize> = self
            .sessions
            .get(&from)
            .map(|s| {
                s.iter()
                    .enumerate()
                    .filter(|(_, s)| s.peer_identity == *from_identity)
                    .map(|(i, _)| i)
                    .collect()
            })
            .unwrap_or_default();
        if candidates.is_empty() {
            return Err(OlmError::NoSession);
        }
        for index in candidates {
            if let Some(plaintext) = self.decrypt_in(from, index, &message)? {
                return Ok(Decrypted {
                    plaintext,
                    kind: MessageKind::Normal,
                    new_session: false,
                });
            }
        }
        Err(OlmError::DoesNotOpen)
    }

    /// Makes an inbound session for `pre_key` on a copy of the account holding its one-time key:
    /// the current account, else the retired ones, newest first. Gives which account (None: the
    /// current one, else its index in `retired`) and the copy to keep if the message is accepted.
    fn inbound_session(
        &self,
        from_identity: &PublicKey,
        pre_key: &PreKeyMessage,
    ) -> Result<(Option<usize>, Account, InboundCreationResult), OlmError> {
        let accounts = std::iter::once((None, &self.account)).chain(
            self.retired
                .iter()
                .enumerate()
                .rev()
                .map(|(i, r)| (Some(i), &r.account)),
        );
        for (which, source) in accounts {
            let mut account = copy_account(source);
            match account.create_inbound_session(
                SessionConfig::version_1(),
                Curve25519PublicKey::from_bytes(from_identity.0),
                pre_key,
            ) {
                Ok(created) => return Ok((which, account, created)),
                Err(SessionCreationError::MissingOneTimeKey(_)) => continue,
                Err(e) => return Err(creation_error(e)),
            }
        }
        Err(OlmError::UnknownOneTimeKey)
    }

    /// Tries session `index` of `from` on a copy; keeps the copy (and moves the session first)
    /// only when the message opens and is addressed as delivered. None: it does not open there.
    fn decrypt_in(
        &mut self,
        from: DeviceAddress,
        index: usize,
        message: &OlmMessage,
    ) -> Result<Option<Plaintext>, OlmError> {
        let own = self.own;
        let sessions = self.sessions.get_mut(&from).expect("the caller found it");
        let mut trial = copy_session(&sessions[index].session);
        let Ok(bytes) = trial.decrypt(message) else {
            return Ok(None);
        };
        let bytes = Zeroizing::new(bytes);
        let plaintext = read_plaintext(&bytes, from, own)?;
        let mut kept = sessions.remove(index);
        kept.session = trial;
        sessions.insert(0, kept);
        Ok(Some(plaintext))
    }

    /// The state as JSON (vodozemac's unencrypted pickles: keep the file 0600).
    pub fn to_json(&self) -> Zeroizing<String> {
        let stored = StoredState {
            version: STATE_VERSION,
            own: self.own,
            account: self.account.pickle(),
            next_key_id: self.next_key_id,
            retired_accounts: self
                .retired
                .iter()
                .map(|r| StoredRetiredAccount {
                    account: r.account.pickle(),
                    retired_at: r.retired_at,
                    keep_until: r.keep_until,
                })
                .collect(),
            sessions: self
                .sessions
                .iter()
                .map(|(peer, sessions)| StoredPeer {
                    peer: *peer,
                    sessions: sessions
                        .iter()
                        .map(|s| StoredSession {
                            peer_identity: BASE64.encode(s.peer_identity.0),
                            session: s.session.pickle(),
                        })
                        .collect(),
                })
                .collect(),
        };
        // Sized up front, so that no reallocation leaves a copy of the keys behind.
        let mut size = ByteCount(0);
        serde_json::to_writer(&mut size, &stored).expect("the state serializes");
        let mut json = Zeroizing::new(Vec::with_capacity(size.0));
        serde_json::to_writer(&mut *json, &stored).expect("the state serializes");
        Zeroizing::new(String::from_utf8(json.to_vec()).expect("JSON is UTF-8"))
    }

    /// Reads [`OlmState::to_json`]; refuses a state whose account is not `device_key`'s.
    pub fn from_json(json: &str, device_key: &PublicKey) -> Result<Self, OlmError> {
        let stored: StoredState =
            serde_json::from_str(json).map_err(|_| OlmError::State("not an Olm state".into()))?;
        if stored.version != STATE_VERSION {
            return Err(OlmError::State(format!(
                "version {} (this client reads {STATE_VERSION})",
                stored.version
            )));
        }
        let account = Account::from_pickle(stored.account);
        if account.curve25519_key().to_bytes() != device_key.0 {
            return Err(OlmError::AccountKeyMismatch);
        }
        let mut sessions = BTreeMap::new();
        for peer in stored.sessions {
            let mut list = Vec::with_capacity(peer.sessions.len());
            for s in peer.sessions {
                let peer_identity = PublicKey(decode_fixed("peer_identity", &s.peer_identity)?);
                list.push(PeerSession {
                    peer_identity,
                    session: Session::from_pickle(s.session),
                });
            }
            sessions.insert(peer.peer, list);
        }
        let retired = stored
            .retired_accounts
            .into_iter()
            .map(|r| RetiredAccount {
                account: Account::from_pickle(r.account),
                retired_at: r.retired_at,
                keep_until: r.keep_until,
            })
            .collect();
        Ok(OlmState {
            own: stored.own,
            account,
            retired,
            next_key_id: stored.next_key_id,
            sessions,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::Signer as _;

    struct Device {
        address: DeviceAddress,
        key: PrivateKey,
        state: OlmState,
    }

    fn device(device_id: u32) -> Device {
        let address = DeviceAddress::new(Uuid::now_v7(), device_id);
        let key = PrivateKey::generate();
        let state = OlmState::new(address, &key, None).unwrap();
        Device {
            address,
            key,
            state,
        }
    }

    fn claimed(prekey: &SignedPrekey, last_resort: bool) -> ClaimedPrekey {
        ClaimedPrekey {
            key_id: prekey.key_id,
            public_key: prekey.public_key.clone(),
            signature: prekey.signature.clone(),
            last_resort,
        }
    }

    /// `recipient` publishes one one-time key; `sender` claims it, verifies it under the
    /// recipient's signing key and starts a session.
    fn start(sender: &mut Device, recipient: &mut Device) {
        let upload = recipient.state.prekey_upload(1, false).unwrap();
        recipient.state.mark_prekeys_published();
        let prekey = verify_prekey(
            &claimed(&upload.prekeys[0], false),
            recipient.address,
            &recipient.state.signing_key(),
        )
        .unwrap();
        sender
            .state
            .start_session(&recipient.key.public_key(), &prekey)
            .unwrap();
    }

    fn send(from: &mut Device, to: &Device, text: &str) -> Vec<u8> {
        from.state
            .encrypt(to.address, &to.key.public_key(), &Plaintext::new(text))
            .unwrap()
    }

    fn receive(to: &mut Device, from: &Device, envelope: &[u8]) -> Result<Decrypted, OlmError> {
        to.state
            .decrypt(envelope, from.address, &from.key.public_key())
    }

    #[test]
    fn the_account_is_the_devices_keys() {
        let key = PrivateKey::generate();
        let seed = [7u8; 32];
        let state =
            OlmState::new(DeviceAddress::new(Uuid::now_v7(), 1), &key, Some(&seed)).unwrap();
        assert_eq!(state.identity_key(), key.public_key());
        let expected = ed25519_dalek::SigningKey::from_bytes(&seed).verifying_key();
        assert_eq!(&state.signing_key().0, expected.as_bytes());
        // A fresh signing key differs each time; the identity key stays the device's.
        let fresh = OlmState::new(state.own(), &key, None).unwrap();
        assert_eq!(fresh.identity_key(), key.public_key());
        assert_ne!(fresh.signing_key(), state.signing_key());
    }

    #[test]
    fn round_trips_both_ways_pre_key_then_normal() {
        let (mut alice, mut bob) = (device(1), device(2));
        start(&mut alice, &mut bob);
        let held = bob.state.one_time_keys_held();
        let first = send(&mut alice, &bob, "hello bob");
        let second = send(&mut alice, &bob, "still unanswered");
        assert_eq!(&first[..2], &[FORMAT_VERSION, MESSAGE_TYPE_PRE_KEY]);
        assert_eq!(&second[..2], &[FORMAT_VERSION, MESSAGE_TYPE_PRE_KEY]);

        let opened = receive(&mut bob, &alice, &first).unwrap();
        assert_eq!(opened.plaintext.text, "hello bob");
        assert_eq!(
            (opened.kind, opened.new_session),
            (MessageKind::PreKey, true)
        );
        assert_eq!(
            bob.state.one_time_keys_held(),
            held - 1,
            "the one-time key is gone"
        );
        let opened = receive(&mut bob, &alice, &second).unwrap();
        assert_eq!(opened.plaintext.text, "still unanswered");
        assert_eq!(
            (opened.kind, opened.new_session),
            (MessageKind::PreKey, false)
        );
        assert_eq!(bob.state.session_count(alice.address), 1);

        let reply = send(&mut bob, &alice, "hi alice");
        assert_eq!(&reply[..2], &[FORMAT_VERSION, MESSAGE_TYPE_NORMAL]);
        let opened = receive(&mut alice, &bob, &reply).unwrap();
        assert_eq!(
            (opened.plaintext.text.as_str(), opened.kind),
            ("hi alice", MessageKind::Normal)
        );
        for i in 0..5 {
            let m = send(&mut alice, &bob, &format!("a{i}"));
            assert_eq!(
                m[1], MESSAGE_TYPE_NORMAL,
                "answered: normal messages from now on"
            );
            assert_eq!(
                receive(&mut bob, &alice, &m).unwrap().plaintext.text,
                format!("a{i}")
            );
            let m = send(&mut bob, &alice, &format!("b{i}"));
            assert_eq!(
                receive(&mut alice, &bob, &m).unwrap().plaintext.text,
                format!("b{i}")
            );
        }
        // Out of order within a chain opens too; a replayed message does not (its key is gone).
        let (x, y) = (send(&mut alice, &bob, "x"), send(&mut alice, &bob, "y"));
        assert_eq!(receive(&mut bob, &alice, &y).unwrap().plaintext.text, "y");
        assert_eq!(receive(&mut bob, &alice, &x).unwrap().plaintext.text, "x");
        assert_eq!(receive(&mut bob, &alice, &x), Err(OlmError::DoesNotOpen));
    }

    #[test]
    fn signature_layout_vectors() {
        let user = Uuid::from_bytes([0x11; 16]);
        let own = DeviceAddress::new(user, 258);
        let key = PrivateKey::from_bytes([0x42; 32]);
        let seed = [0x07; 32];
        let dalek = ed25519_dalek::SigningKey::from_bytes(&seed);
        let signing_raw = *dalek.verifying_key().as_bytes();
        let mut state = OlmState::new(own, &key, Some(&seed)).unwrap();

        let head = |context: &[u8]| {
            let mut bytes = context.to_vec();
            bytes.push(0);
            bytes.extend_from_slice(&[0x11; 16]);
            bytes.extend_from_slice(&[0, 0, 1, 2]);
            bytes
        };
        let mut bind = head(b"sm-bind");
        bind.extend_from_slice(&key.public_key().0);
        bind.extend_from_slice(&signing_raw);
        let upload = state.signing_key_upload();
        assert_eq!(
            upload.binding_sig,
            BASE64.encode(dalek.sign(&bind).to_bytes()),
            "Ed25519 is deterministic: the same bytes signed by the same key"
        );
        assert!(
            upload
                .signing_key
                .starts_with("-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEA")
        );
        assert_eq!(
            SigningPublicKey::from_pem(&upload.signing_key).unwrap().0,
            signing_raw
        );
        assert_eq!(upload.rotation_sig, None);
        let json = serde_json::to_value(&upload).unwrap();
        assert!(json.get("rotation_sig").is_none());
        verify_binding(
            &state.signing_key(),
            &upload.binding_sig,
            own,
            &key.public_key(),
        )
        .unwrap();

        let prekeys = state.prekey_upload(3, true).unwrap();
        let ids: Vec<u32> = prekeys.prekeys.iter().map(|p| p.key_id).collect();
        assert_eq!(ids, [0, 1, 2]);
        let last_resort = prekeys.last_resort.clone().unwrap();
        assert_eq!(last_resort.key_id, 3);
        for (prekey, context) in prekeys
            .prekeys
            .iter()
            .map(|p| (p, &b"sm-prekey"[..]))
            .chain([(&last_resort, &b"sm-last-resort"[..])])
        {
            let mut expected = head(context);
            expected.extend_from_slice(&prekey.key_id.to_be_bytes());
            expected.extend_from_slice(&BASE64.decode(&prekey.public_key).unwrap());
            assert_eq!(
                prekey.signature,
                BASE64.encode(dalek.sign(&expected).to_bytes())
            );
        }
        // The shared layout function gives the same bytes.
        assert_eq!(
            signed_message(
                SignatureContext::Bind,
                own,
                &[&key.public_key().0, &signing_raw]
            ),
            bind
        );

        let new_seed = [0x08; 32];
        let (rotated, rotation) = state
            .rotate_signing_key(&key, Some(&new_seed), Utc::now())
            .unwrap();
        let new_raw = *ed25519_dalek::SigningKey::from_bytes(&new_seed)
            .verifying_key()
            .as_bytes();
        let mut rotate = head(b"sm-rotate");
        rotate.extend_from_slice(&new_raw);
        assert_eq!(
            rotation.rotation_sig.as_deref(),
            Some(BASE64.encode(dalek.sign(&rotate).to_bytes()).as_str())
        );
        verify_rotation(
            &state.signing_key(),
            &rotated.signing_key(),
            rotation.rotation_sig.as_deref().unwrap(),
            own,
        )
        .unwrap();
        verify_binding(
            &rotated.signing_key(),
            &rotation.binding_sig,
            own,
            &key.public_key(),
        )
        .unwrap();
        assert_eq!(
            verify_binding(
                &state.signing_key(),
                &rotation.binding_sig,
                own,
                &key.public_key()
            ),
            Err(OlmError::BadBindingSignature)
        );
    }

    #[test]
    fn key_ids_rise_across_uploads_and_unsent_keys_are_sent_again() {
        let mut bob = device(2);
        let first = bob.state.prekey_upload(5, true).unwrap();
        assert_eq!(first.prekeys.len(), 5);
        // The upload did not go through: the same keys again, under new (higher) ids.
        let again = bob.state.prekey_upload(5, false).unwrap();
        let keys = |u: &PrekeyUpload| {
            u.prekeys
                .iter()
                .map(|p| p.public_key.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(keys(&again), keys(&first));
        assert_eq!(
            again.last_resort.as_ref().unwrap().public_key,
            first.last_resort.as_ref().unwrap().public_key
        );
        assert!(again.prekeys[0].key_id > first.last_resort.as_ref().unwrap().key_id);
        bob.state.mark_prekeys_published();
        let next = bob.state.prekey_upload(200, false).unwrap();
        assert_eq!(next.prekeys.len(), PREKEY_UPLOAD_MAX);
        assert!(next.last_resort.is_none());
        assert!(
            next.prekeys
                .iter()
                .all(|p| !keys(&first).contains(&p.public_key))
        );
        let mut previous = again.last_resort.unwrap().key_id;
        for p in &next.prekeys {
            assert!(p.key_id > previous);
            previous = p.key_id;
        }
        // The counter survives the state file.
        let json = bob.state.to_json();
        let mut restored = OlmState::from_json(&json, &bob.key.public_key()).unwrap();
        restored.mark_prekeys_published();
        let after = restored.prekey_upload(1, false).unwrap();
        assert_eq!(after.prekeys[0].key_id, previous + 1);
    }

    #[test]
    fn key_ids_end_at_u32_max() {
        let mut bob = device(2);
        bob.state.next_key_id = u64::from(u32::MAX);
        let last = bob.state.prekey_upload(1, false).unwrap();
        assert_eq!(last.prekeys[0].key_id, u32::MAX);
        bob.state.mark_prekeys_published();
        assert_eq!(
            bob.state.prekey_upload(1, false),
            Err(OlmError::KeyIdsExhausted)
        );
    }

    #[test]
    fn a_prekey_verifies_only_for_its_device_under_its_signing_key() {
        let (mut bob, other) = (device(2), device(3));
        let upload = bob.state.prekey_upload(1, true).unwrap();
        let one_time = claimed(&upload.prekeys[0], false);
        let last_resort = claimed(upload.last_resort.as_ref().unwrap(), true);
        let signer = bob.state.signing_key();
        assert!(verify_prekey(&one_time, bob.address, &signer).is_ok());
        let verified = verify_prekey(&last_resort, bob.address, &signer).unwrap();
        assert!(verified.is_last_resort());
        assert_eq!(verified.owner(), bob.address);

        let refused = |c: &ClaimedPrekey, owner: DeviceAddress, key: &SigningPublicKey| {
            verify_prekey(c, owner, key).unwrap_err()
        };
        // Signed by another key.
        assert_eq!(
            refused(&one_time, bob.address, &other.state.signing_key()),
            OlmError::BadPrekeySignature
        );
        // For another device id of the same account, or another account.
        let other_device = DeviceAddress::new(bob.address.user_id, 3);
        assert_eq!(
            refused(&one_time, other_device, &signer),
            OlmError::BadPrekeySignature
        );
        let other_user = DeviceAddress::new(other.address.user_id, 2);
        assert_eq!(
            refused(&one_time, other_user, &signer),
            OlmError::BadPrekeySignature
        );
        // Another context (a one-time key passed off as last-resort and back), another key id,
        // another key.
        let mut flipped = one_time.clone();
        flipped.last_resort = true;
        assert_eq!(
            refused(&flipped, bob.address, &signer),
            OlmError::BadPrekeySignature
        );
        let mut flipped = last_resort.clone();
        flipped.last_resort = false;
        assert_eq!(
            refused(&flipped, bob.address, &signer),
            OlmError::BadPrekeySignature
        );
        let mut moved = one_time.clone();
        moved.key_id += 1;
        assert_eq!(
            refused(&moved, bob.address, &signer),
            OlmError::BadPrekeySignature
        );
        let mut swapped = one_time.clone();
        swapped.public_key = last_resort.public_key.clone();
        assert_eq!(
            refused(&swapped, bob.address, &signer),
            OlmError::BadPrekeySignature
        );
        let mut short = one_time.clone();
        short.signature = BASE64.encode([0; 63]);
        assert_eq!(
            refused(&short, bob.address, &signer),
            OlmError::BadEncoding("signature", 64)
        );
    }

    #[test]
    fn a_small_order_prekey_is_refused_even_if_signed() {
        let bob = device(2);
        let small = [0u8; 32];
        let message = signed_message(
            SignatureContext::Prekey,
            bob.address,
            &[&0u32.to_be_bytes(), &small],
        );
        let claim = ClaimedPrekey {
            key_id: 0,
            public_key: BASE64.encode(small),
            signature: BASE64.encode(bob.state.account.sign(&message).to_bytes()),
            last_resort: false,
        };
        assert_eq!(
            verify_prekey(&claim, bob.address, &bob.state.signing_key()),
            Err(OlmError::SmallOrderPrekey)
        );
    }

    #[test]
    fn misaddressed_messages_are_refused_and_change_nothing() {
        let (mut alice, mut bob) = (device(1), device(2));
        start(&mut alice, &mut bob);
        let first = send(&mut alice, &bob, "to bob, device 2");
        let held = bob.state.one_time_keys_held();

        // Delivered as if from another device of Alice's (same key pinned for both, say).
        let other_device = DeviceAddress::new(alice.address.user_id, 9);
        assert_eq!(
            bob.state
                .decrypt(&first, other_device, &alice.key.public_key()),
            Err(OlmError::Misaddressed("from"))
        );
        // Delivered to another device of Bob's holding the same state (a copy with another id).
        let mut copy = serde_json::from_str::<serde_json::Value>(&bob.state.to_json()).unwrap();
        copy["own"]["device_id"] = serde_json::json!(3);
        let mut bob3 = OlmState::from_json(&copy.to_string(), &bob.key.public_key()).unwrap();
        assert_eq!(
            bob3.decrypt(&first, alice.address, &alice.key.public_key()),
            Err(OlmError::Misaddressed("to"))
        );
        // Nothing was used up: the right delivery still opens.
        assert_eq!(bob.state.one_time_keys_held(), held);
        assert_eq!(bob.state.session_count(alice.address), 0);
        assert_eq!(
            receive(&mut bob, &alice, &first).unwrap().plaintext.text,
            "to bob, device 2"
        );

        // The same for a normal message: refused, and the session does not move on.
        let reply = send(&mut bob, &alice, "r");
        receive(&mut alice, &bob, &reply).unwrap();
        let normal = send(&mut alice, &bob, "n");
        assert_eq!(
            bob.state
                .decrypt(&normal, other_device, &alice.key.public_key()),
            Err(OlmError::NoSession),
            "no session with that device at all"
        );
        let bob_copy = OlmState::from_json(&bob.state.to_json(), &bob.key.public_key()).unwrap();
        let mut moved = bob_copy;
        let sessions = moved.sessions.remove(&alice.address).unwrap();
        moved.sessions.insert(other_device, sessions);
        assert_eq!(
            moved.decrypt(&normal, other_device, &alice.key.public_key()),
            Err(OlmError::Misaddressed("from"))
        );
        assert_eq!(
            receive(&mut bob, &alice, &normal).unwrap().plaintext.text,
            "n"
        );
    }

    #[test]
    fn plaintext_carries_from_and_to() {
        let (from, to) = (
            DeviceAddress::new(Uuid::now_v7(), 1),
            DeviceAddress::new(Uuid::now_v7(), 4),
        );
        let json = plaintext_json(&Plaintext::new("t"), from, to);
        let value: serde_json::Value = serde_json::from_slice(&json).unwrap();
        assert_eq!(value["v"], 1);
        assert_eq!(value["from"]["user_id"], from.user_id.to_string());
        assert_eq!(value["from"]["device_id"], 1);
        assert_eq!(value["to"]["device_id"], 4);
        assert!(read_plaintext(&json, from, to).is_ok());
        assert_eq!(
            read_plaintext(&json, to, to),
            Err(OlmError::Misaddressed("from"))
        );
        assert_eq!(
            read_plaintext(&json, from, from),
            Err(OlmError::Misaddressed("to"))
        );
        let v1 = Plaintext::new("no from/to").to_json();
        assert!(matches!(
            read_plaintext(&v1, from, to),
            Err(OlmError::Plaintext(_))
        ));
    }

    #[test]
    fn another_identity_key_is_refused() {
        let (mut alice, mut bob, carol) = (device(1), device(2), device(3));
        start(&mut alice, &mut bob);
        let first = send(&mut alice, &bob, "hello");
        // Bob has pinned Carol's key for Alice's device (or the server substituted Alice's):
        // the pre-key message names Alice's identity key and is refused.
        assert_eq!(
            bob.state
                .decrypt(&first, alice.address, &carol.key.public_key()),
            Err(OlmError::IdentityKeyMismatch)
        );
        receive(&mut bob, &alice, &first).unwrap();
        let normal = {
            let reply = send(&mut bob, &alice, "r");
            receive(&mut alice, &bob, &reply).unwrap();
            send(&mut alice, &bob, "n")
        };
        // A normal message opens only in a session made with the pinned key.
        assert_eq!(
            bob.state
                .decrypt(&normal, alice.address, &carol.key.public_key()),
            Err(OlmError::NoSession)
        );
        // And no session toward Alice's device is used under another pinned key.
        assert_eq!(
            bob.state
                .encrypt(alice.address, &carol.key.public_key(), &Plaintext::new("x")),
            Err(OlmError::NoSession)
        );
        assert!(
            bob.state
                .has_session(alice.address, &alice.key.public_key())
        );
        assert!(
            !bob.state
                .has_session(alice.address, &carol.key.public_key())
        );
        assert_eq!(
            receive(&mut bob, &alice, &normal).unwrap().plaintext.text,
            "n"
        );
    }

    #[test]
    fn a_pre_key_message_for_a_used_one_time_key_is_refused() {
        let (mut alice, mut bob, mut carol) = (device(1), device(2), device(3));
        let upload = bob.state.prekey_upload(1, false).unwrap();
        bob.state.mark_prekeys_published();
        let prekey = verify_prekey(
            &claimed(&upload.prekeys[0], false),
            bob.address,
            &bob.state.signing_key(),
        )
        .unwrap();
        alice
            .state
            .start_session(&bob.key.public_key(), &prekey)
            .unwrap();
        // The server handed the same one-time key out twice (it must not): the second opens nothing.
        carol
            .state
            .start_session(&bob.key.public_key(), &prekey)
            .unwrap();
        {
            let m = send(&mut alice, &bob, "first");
            receive(&mut bob, &alice, &m)
        }
        .unwrap();
        let late = send(&mut carol, &bob, "second");
        assert_eq!(
            receive(&mut bob, &carol, &late),
            Err(OlmError::UnknownOneTimeKey)
        );
    }

    #[test]
    fn the_last_resort_key_starts_many_sessions() {
        let (mut alice, mut bob, mut carol) = (device(1), device(2), device(3));
        let upload = bob.state.prekey_upload(0, true).unwrap();
        bob.state.mark_prekeys_published();
        let claim = claimed(upload.last_resort.as_ref().unwrap(), true);
        let prekey = verify_prekey(&claim, bob.address, &bob.state.signing_key()).unwrap();
        alice
            .state
            .start_session(&bob.key.public_key(), &prekey)
            .unwrap();
        carol
            .state
            .start_session(&bob.key.public_key(), &prekey)
            .unwrap();
        assert_eq!(
            {
                let m = send(&mut alice, &bob, "a");
                receive(&mut bob, &alice, &m)
            }
            .unwrap()
            .plaintext
            .text,
            "a"
        );
        assert_eq!(
            {
                let m = send(&mut carol, &bob, "c");
                receive(&mut bob, &carol, &m)
            }
            .unwrap()
            .plaintext
            .text,
            "c"
        );
    }

    #[test]
    fn tampered_or_foreign_envelopes_are_refused() {
        let (mut alice, mut bob) = (device(1), device(2));
        start(&mut alice, &mut bob);
        let first = send(&mut alice, &bob, "hello");
        let mut tampered = first.clone();
        let last = tampered.len() - 1;
        tampered[last] ^= 1;
        assert_eq!(
            receive(&mut bob, &alice, &tampered),
            Err(OlmError::DoesNotOpen)
        );
        assert_eq!(
            receive(&mut bob, &alice, &first[..1]),
            Err(OlmError::Truncated)
        );
        let mut v1 = first.clone();
        v1[0] = 1;
        assert_eq!(
            receive(&mut bob, &alice, &v1),
            Err(OlmError::NotVersion2(1))
        );
        let mut kind = first.clone();
        kind[1] = 2;
        assert_eq!(
            receive(&mut bob, &alice, &kind),
            Err(OlmError::UnknownMessageType(2))
        );
        let mut as_normal = first.clone();
        as_normal[1] = MESSAGE_TYPE_NORMAL;
        assert!(receive(&mut bob, &alice, &as_normal).is_err());
        assert_eq!(
            receive(&mut bob, &alice, &first).unwrap().plaintext.text,
            "hello"
        );
    }

    #[test]
    fn state_survives_json_mid_conversation() {
        let (mut alice, mut bob) = (device(1), device(2));
        start(&mut alice, &mut bob);
        let first = send(&mut alice, &bob, "one");
        receive(&mut bob, &alice, &first).unwrap();
        let reply = send(&mut bob, &alice, "two");
        // Both sides restart from their saved state.
        alice.state = OlmState::from_json(&alice.state.to_json(), &alice.key.public_key()).unwrap();
        bob.state = OlmState::from_json(&bob.state.to_json(), &bob.key.public_key()).unwrap();
        assert_eq!(
            receive(&mut alice, &bob, &reply).unwrap().plaintext.text,
            "two"
        );
        let third = send(&mut alice, &bob, "three");
        bob.state = OlmState::from_json(&bob.state.to_json(), &bob.key.public_key()).unwrap();
        assert_eq!(
            receive(&mut bob, &alice, &third).unwrap().plaintext.text,
            "three"
        );
        assert_eq!(bob.state.own(), bob.address);
        assert_eq!(bob.state.signing_key(), {
            let json = bob.state.to_json();
            OlmState::from_json(&json, &bob.key.public_key())
                .unwrap()
                .signing_key()
        });
        // Another device's key, or no state at all, is refused.
        assert_eq!(
            OlmState::from_json(&bob.state.to_json(), &alice.key.public_key()).unwrap_err(),
            OlmError::AccountKeyMismatch
        );
        assert!(OlmState::from_json("{}", &bob.key.public_key()).is_err());
    }

    #[test]
    fn rotation_keeps_sessions() {
        let (mut alice, mut bob) = (device(1), device(2));
        start(&mut alice, &mut bob);
        {
            let m = send(&mut alice, &bob, "before");
            receive(&mut bob, &alice, &m)
        }
        .unwrap();
        let (rotated, _) = bob
            .state
            .rotate_signing_key(&bob.key, None, Utc::now())
            .unwrap();
        assert_ne!(rotated.signing_key(), bob.state.signing_key());
        bob.state = rotated;
        let reply = send(&mut bob, &alice, "after rotation");
        assert_eq!(
            receive(&mut alice, &bob, &reply).unwrap().plaintext.text,
            "after rotation"
        );
    }

    #[test]
    fn sessions_per_peer_are_capped_newest_first() {
        let (mut alice, mut bob) = (device(1), device(2));
        for _ in 0..MAX_SESSIONS_PER_PEER + 2 {
            start(&mut alice, &mut bob);
        }
        assert_eq!(
            alice.state.session_count(bob.address),
            MAX_SESSIONS_PER_PEER
        );
        // The newest session is the one used; Bob opens it.
        let m = send(&mut alice, &bob, "newest");
        assert_eq!(
            receive(&mut bob, &alice, &m).unwrap().plaintext.text,
            "newest"
        );
    }

    #[test]
    fn simultaneous_starts_converge() {
        let (mut alice, mut bob) = (device(1), device(2));
        start(&mut alice, &mut bob);
        start(&mut bob, &mut alice);
        let from_alice = send(&mut alice, &bob, "a");
        let from_bob = send(&mut bob, &alice, "b");
        assert_eq!(
            receive(&mut bob, &alice, &from_alice)
                .unwrap()
                .plaintext
                .text,
            "a"
        );
        assert_eq!(
            receive(&mut alice, &bob, &from_bob).unwrap().plaintext.text,
            "b"
        );
        for i in 0..3 {
            let m = send(&mut alice, &bob, &format!("a{i}"));
            assert_eq!(
                receive(&mut bob, &alice, &m).unwrap().plaintext.text,
                format!("a{i}")
            );
            let m = send(&mut bob, &alice, &format!("b{i}"));
            assert_eq!(
                receive(&mut alice, &bob, &m).unwrap().plaintext.text,
                format!("b{i}")
            );
        }
    }

    #[test]
    fn top_up_decisions() {
        let count = |available, last_resort_key_id, last_resort_claims| PrekeyCount {
            available,
            lowest_key_id: None,
            last_resort_key_id,
            last_resort_claims,
        };
        assert_eq!(
            top_up(&count(0, None, 0)),
            Some(TopUp {
                one_time_keys: 50,
                new_last_resort: true
            })
        );
        assert_eq!(top_up(&count(30, Some(4), 0)), None);
        assert_eq!(
            top_up(&count(24, Some(4), 0)),
            Some(TopUp {
                one_time_keys: 26,
                new_last_resort: false
            })
        );
        assert_eq!(
            top_up(&count(40, Some(4), 3)),
            Some(TopUp {
                one_time_keys: 0,
                new_last_resort: true
            })
        );
        let parsed: PrekeyCount = serde_json::from_str(
            r#"{"available": 3, "lowest_key_id": 7, "last_resort_key_id": null, "last_resort_claims": 0}"#,
        )
        .unwrap();
        assert_eq!(parsed.available, 3);
        assert_eq!(parsed.lowest_key_id, Some(7));
    }

    #[test]
    fn a_state_written_before_retired_accounts_loads() {
        let (mut alice, mut bob) = (device(1), device(2));
        start(&mut alice, &mut bob);
        let plain = bob.state.to_json();
        assert!(
            !plain.contains("retired_accounts"),
            "no field while there is none"
        );
        let (rotated, _) = bob
            .state
            .rotate_signing_key(&bob.key, None, Utc::now())
            .unwrap();
        let json = rotated.to_json();
        assert!(json.contains("retired_accounts"));
        let mut old: serde_json::Value = serde_json::from_str(&json).unwrap();
        old.as_object_mut().unwrap().remove("retired_accounts");
        let loaded = OlmState::from_json(&old.to_string(), &bob.key.public_key()).unwrap();
        assert_eq!(loaded.retired_account_count(), 0);
        assert_eq!(
            OlmState::from_json(&json, &bob.key.public_key())
                .unwrap()
                .retired_account_count(),
            1
        );
        // Rotating again keeps both, newest last, and drops only expired ones.
        let now = Utc::now();
        let (twice, _) = rotated.rotate_signing_key(&bob.key, None, now).unwrap();
        assert_eq!(twice.retired_account_count(), 2);
        let (later, _) = twice
            .rotate_signing_key(&bob.key, None, now + MESSAGE_TTL)
            .unwrap();
        assert_eq!(later.retired_account_count(), 1);
    }

    #[test]
    fn debug_prints_no_secret() {
        let key = PrivateKey::from_bytes([0x42; 32]);
        let seed = [0x07; 32];
        let state =
            OlmState::new(DeviceAddress::new(Uuid::now_v7(), 1), &key, Some(&seed)).unwrap();
        let shown = format!("{state:?}");
        assert!(shown.contains("OlmState"));
        for secret in [key.as_bytes(), &seed] {
            assert!(!shown.contains(&BASE64.encode(secret)));
            assert!(!shown.contains(&crate::keys::hex(secret)));
            assert!(!shown.contains(&format!("{:?}", secret)));
            assert!(!shown.contains("66, 66, 66"), "no byte list of the key");
        }
        // The pickle does hold them: that is what the 0600 file is for.
        assert!(state.to_json().contains("66,66,66"));
        // A retired account is not shown either.
        let (rotated, _) = state
            .rotate_signing_key(&PrivateKey::generate(), None, Utc::now())
            .unwrap();
        let shown = format!("{rotated:?}");
        assert!(shown.contains("retired_accounts"));
        assert!(!shown.contains(&BASE64.encode(key.as_bytes())));
        assert!(!shown.contains("66, 66, 66"));
        assert!(rotated.to_json().contains("66,66,66"), "kept in the file");
    }

    /// Figures for docs: `cargo test -p client --lib olm::tests::timings -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn timings() {
        use std::time::Instant;
        let rounds = 200u32;
        let (mut alice, mut bob) = (device(1), device(2));
        let t = Instant::now();
        for _ in 0..rounds {
            start(&mut alice, &mut bob);
            let m = send(&mut alice, &bob, "hello");
            receive(&mut bob, &alice, &m).unwrap();
        }
        println!(
            "session setup (upload 1 key, claim, verify, start, first message, inbound): {:?}",
            t.elapsed() / rounds
        );
        let t = Instant::now();
        let mut envelopes = Vec::new();
        for i in 0..rounds {
            envelopes.push(send(&mut alice, &bob, &format!("message {i}")));
        }
        println!("encrypt (same chain): {:?}", t.elapsed() / rounds);
        let t = Instant::now();
        for m in &envelopes {
            receive(&mut bob, &alice, m).unwrap();
        }
        println!("decrypt (same chain): {:?}", t.elapsed() / rounds);
        let t = Instant::now();
        for i in 0..rounds {
            let m = send(&mut bob, &alice, &format!("b{i}"));
            receive(&mut alice, &bob, &m).unwrap();
            let m = send(&mut alice, &bob, &format!("a{i}"));
            receive(&mut bob, &alice, &m).unwrap();
        }
        println!(
            "ping-pong (a ratchet step each way), per message: {:?}",
            t.elapsed() / (2 * rounds)
        );
        let t = Instant::now();
        let json = bob.state.to_json();
        let _ = OlmState::from_json(&json, &bob.key.public_key()).unwrap();
        println!(
            "state to_json + from_json ({} bytes, {} one-time keys): {:?}",
            json.len(),
            bob.state.one_time_keys_held(),
            t.elapsed()
        );
    }
}
