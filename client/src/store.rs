//! The profile directory: one account's keys, pinned contacts, inbox state and cached token.
//!
//! `$MESSENGER_HOME/<profile>/`, else `$XDG_CONFIG_HOME/messenger/<profile>/`, else
//! `~/.config/messenger/<profile>/`. The directory is mode 0700 and every file 0600, written
//! whole to a temporary file and renamed over the old one, so a crash never leaves half a file.
//! One command at a time holds the profile's lock (`.lock`).

use crate::keys::{PrivateKey, PublicKey};
use chrono::{DateTime, TimeDelta, Utc};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use uuid::Uuid;
use zeroize::Zeroizing;

/// The longest a message lives on the server (API.md: `MESSAGE_TTL_SECONDS` is at most 7 days).
/// Retired keys of ours, and earlier pinned keys of contacts, are kept this long.
pub const MESSAGE_TTL: TimeDelta = TimeDelta::days(7);
/// How long a shown message's id is remembered against replays: the TTL plus a day for clocks.
pub const SEEN_FOR: TimeDelta = TimeDelta::days(8);

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "profile name {0:?} is not 1 to 64 characters of A-Z a-z 0-9 _ . - (not starting with '.')"
    )]
    BadProfileName(String),
    #[error("cannot find a home for profiles: set MESSENGER_HOME (or HOME)")]
    NoHome,
    #[error("{path}: {err}")]
    Io { path: PathBuf, err: std::io::Error },
    #[error("{path} is damaged ({reason}); move it away to start over")]
    Corrupt { path: PathBuf, reason: String },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |err| StoreError::Io {
        path: path.to_path_buf(),
        err,
    }
}

/// Where profiles live.
pub fn profiles_root() -> Result<PathBuf, StoreError> {
    if let Some(home) = std::env::var_os("MESSENGER_HOME").filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(home));
    }
    if let Some(xdg) = std::env::var_os("XDG_CONFIG_HOME").filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(xdg).join("messenger"));
    }
    match std::env::var_os("HOME").filter(|v| !v.is_empty()) {
        Some(home) => Ok(PathBuf::from(home).join(".config").join("messenger")),
        None => Err(StoreError::NoHome),
    }
}

pub fn valid_profile_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
}

/// One profile's directory.
#[derive(Debug)]
pub struct Profile {
    pub name: String,
    pub dir: PathBuf,
}

/// Held while a command reads and writes the profile; dropping it unlocks.
#[derive(Debug)]
pub struct ProfileLock(#[allow(dead_code)] File);

impl Profile {
    pub fn at(root: &Path, name: &str) -> Result<Profile, StoreError> {
        if !valid_profile_name(name) {
            return Err(StoreError::BadProfileName(name.to_string()));
        }
        Ok(Profile {
            name: name.to_string(),
            dir: root.join(name),
        })
    }

    pub fn exists(&self) -> bool {
        self.dir.join(ACCOUNT).exists()
    }

    /// Creates the directory (0700) if needed and takes the profile's lock, waiting for another
    /// command on the same profile to finish.
    pub fn lock(&self) -> Result<ProfileLock, StoreError> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
            .map_err(io(&self.dir))?;
        let meta = fs::metadata(&self.dir).map_err(io(&self.dir))?;
        if meta.permissions().mode() & 0o077 != 0 {
            fs::set_permissions(&self.dir, fs::Permissions::from_mode(0o700))
                .map_err(io(&self.dir))?;
        }
        let path = self.dir.join(".lock");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&path)
            .map_err(io(&path))?;
        file.lock().map_err(io(&path))?;
        Ok(ProfileLock(file))
    }

    fn read<T: DeserializeOwned>(&self, file: &str) -> Result<Option<T>, StoreError> {
        let path = self.dir.join(file);
        let bytes = match fs::read(&path) {
            Ok(b) => Zeroizing::new(b),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(StoreError::Io { path, err: e }),
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| StoreError::Corrupt {
                path,
                reason: format!("JSON error at line {} column {}", e.line(), e.column()),
            })
    }

    /// Writes `file` whole, mode 0600, through a temporary file and a rename.
    fn write<T: Serialize>(&self, file: &str, value: &T) -> Result<(), StoreError> {
        let path = self.dir.join(file);
        let tmp = self.dir.join(format!(".{file}.tmp"));
        let bytes =
            Zeroizing::new(serde_json::to_vec_pretty(value).expect("profile data serializes"));
        let _ = fs::remove_file(&tmp);
        let mut f = OpenOptions::new()
            .create_new(true)
            .write(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io(&tmp))?;
        f.write_all(&bytes).map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
        drop(f);
        fs::rename(&tmp, &path).map_err(io(&path))?;
        if let Ok(d) = File::open(&self.dir) {
            let _ = d.sync_all();
        }
        Ok(())
    }

    fn remove(&self, file: &str) -> Result<(), StoreError> {
        let path = self.dir.join(file);
        match fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(StoreError::Io { path, err: e })
            }
            _ => Ok(()),
        }
    }

    pub fn account(&self) -> Result<Option<Account>, StoreError> {
        self.read(ACCOUNT)
    }
    pub fn save_account(&self, a: &Account) -> Result<(), StoreError> {
        self.write(ACCOUNT, a)
    }

    pub fn keyring(&self) -> Result<Option<Keyring>, StoreError> {
        let ring: Option<Keyring> = self.read(KEYS)?;
        if let Some(ring) = &ring {
            // Refuse a damaged key file now rather than at the first message.
            ring.current
                .private_key()
                .map_err(|reason| StoreError::Corrupt {
                    path: self.dir.join(KEYS),
                    reason,
                })?;
        }
        Ok(ring)
    }
    pub fn save_keyring(&self, k: &Keyring) -> Result<(), StoreError> {
        self.write(KEYS, k)
    }

    pub fn contacts(&self) -> Result<Contacts, StoreError> {
        Ok(self.read(CONTACTS)?.unwrap_or_default())
    }
    pub fn save_contacts(&self, c: &Contacts) -> Result<(), StoreError> {
        self.write(CONTACTS, c)
    }

    pub fn inbox(&self) -> Result<InboxState, StoreError> {
        Ok(self.read(INBOX)?.unwrap_or_default())
    }
    pub fn save_inbox(&self, i: &InboxState) -> Result<(), StoreError> {
        self.write(INBOX, i)
    }

    pub fn token(&self) -> Result<Option<CachedToken>, StoreError> {
        self.read(TOKEN)
    }
    pub fn save_token(&self, t: &CachedToken) -> Result<(), StoreError> {
        self.write(TOKEN, t)
    }
    pub fn forget_token(&self) -> Result<(), StoreError> {
        self.remove(TOKEN)
    }

    pub fn olm(&self) -> Result<Option<OlmFile>, StoreError> {
        self.read(OLM)
    }
    /// Written after every message sealed or opened with version 2, before it is sent or shown:
    /// a crash never reuses a message key nor loses a ratchet step.
    pub fn save_olm(&self, o: &OlmFile) -> Result<(), StoreError> {
        self.write(OLM, o)
    }

    /// Erases the whole profile (after the account is deleted).
    pub fn erase(self, _lock: ProfileLock) -> Result<(), StoreError> {
        fs::remove_dir_all(&self.dir).map_err(io(&self.dir))
    }
}

const ACCOUNT: &str = "account.json";
const KEYS: &str = "keys.json";
const CONTACTS: &str = "contacts.json";
const INBOX: &str = "inbox.json";
const OLM: &str = "olm.json";

/// This device's Olm account and sessions (ENVELOPE.md "Version 2"), as `olm::OlmState` writes
/// them, with what the server was told.
#[derive(Clone, Serialize, Deserialize)]
pub struct OlmFile {
    pub state: String,
    /// The signing key and a first set of prekeys are on the server.
    #[serde(default)]
    pub published: bool,
    /// Since when (peers that read our keys since then seal version 2 to us).
    #[serde(default)]
    pub published_at: Option<DateTime<Utc>>,
    /// When the server's prekey count was last read (none: read it at the next chance).
    #[serde(default)]
    pub prekeys_checked_at: Option<DateTime<Utc>>,
}

impl std::fmt::Debug for OlmFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "OlmFile(.., published: {})", self.published)
    }
}

impl Drop for OlmFile {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.state);
    }
}
const TOKEN: &str = "token.json";

/// Which account this profile holds, and on which API.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Account {
    pub api: String,
    pub name: String,
    pub user_id: Uuid,
    /// This profile's device of the account (1: the one `register` made).
    #[serde(default = "device_one")]
    pub device_id: u32,
    pub registered_at: DateTime<Utc>,
}

fn device_one() -> u32 {
    1
}

/// One of our private keys, PKCS #8 PEM.
#[derive(Clone, Serialize, Deserialize)]
pub struct StoredKey {
    private_key: String,
    pub fingerprint: String,
    pub created_at: DateTime<Utc>,
}

impl std::fmt::Debug for StoredKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "StoredKey({})", self.fingerprint)
    }
}

impl StoredKey {
    pub fn new(key: &PrivateKey) -> Self {
        StoredKey {
            private_key: key.to_pkcs8_pem(),
            fingerprint: key.public_key().fingerprint(),
            created_at: Utc::now(),
        }
    }
    pub fn private_key(&self) -> Result<PrivateKey, String> {
        let key = PrivateKey::from_pkcs8_pem(&self.private_key).map_err(|e| e.to_string())?;
        if key.public_key().fingerprint() != self.fingerprint {
            return Err("a private key does not match its fingerprint".into());
        }
        Ok(key)
    }
}

impl Drop for StoredKey {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.private_key);
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RetiredKey {
    pub key: StoredKey,
    pub retired_at: DateTime<Utc>,
    /// Everything sealed to this key has expired by then; the key is erased after it.
    pub keep_until: DateTime<Utc>,
}

/// Our current key and the retired ones still needed for messages in flight.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Keyring {
    pub current: StoredKey,
    #[serde(default)]
    pub retired: Vec<RetiredKey>,
}

impl Keyring {
    pub fn new(key: &PrivateKey) -> Self {
        Keyring {
            current: StoredKey::new(key),
            retired: Vec::new(),
        }
    }

    /// Drops retired keys whose messages have all expired; true when one was dropped.
    pub fn prune(&mut self, now: DateTime<Utc>) -> bool {
        let before = self.retired.len();
        self.retired.retain(|r| r.keep_until > now);
        self.retired.len() != before
    }

    /// Makes `key` current; the old current key is kept for `MESSAGE_TTL`.
    pub fn rotate(&mut self, key: &PrivateKey, now: DateTime<Utc>) {
        let old = std::mem::replace(&mut self.current, StoredKey::new(key));
        self.retired.push(RetiredKey {
            key: old,
            retired_at: now,
            keep_until: now + MESSAGE_TTL,
        });
    }

    /// Current key first, then the retired ones still kept (newest first).
    pub fn opening_keys(&self, now: DateTime<Utc>) -> Result<Vec<PrivateKey>, String> {
        let mut keys = vec![self.current.private_key()?];
        for r in self.retired.iter().rev().filter(|r| r.keep_until > now) {
            keys.push(r.key.private_key()?);
        }
        Ok(keys)
    }
}

/// A contact's key as pinned.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PinnedKey {
    pub public_key: String,
    pub fingerprint: String,
    pub pinned_at: DateTime<Utc>,
    /// When a newer key was accepted (`trust`); the key still opens messages for `MESSAGE_TTL`.
    #[serde(default)]
    pub replaced_at: Option<DateTime<Utc>>,
}

/// A key the directory returned for a contact that differs from the pinned one, not accepted:
/// recorded when it is shown to the user, and the only key that `trust NAME` accepts (ENVELOPE.md
/// "Trust": the very key that was shown, never whatever the directory says at that moment).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PendingKey {
    pub public_key: String,
    pub fingerprint: String,
    pub seen_at: DateTime<Utc>,
    /// The account that now holds the contact's name, when it is not the pinned one (the name
    /// was freed and taken again): accepting the key replaces the contact with that account.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<Uuid>,
}

impl PendingKey {
    pub fn new(key: &PublicKey, user_id: Option<Uuid>, now: DateTime<Utc>) -> Self {
        PendingKey {
            public_key: key.to_pem(),
            fingerprint: key.fingerprint(),
            seen_at: now,
            user_id,
        }
    }
}

/// What is pinned for one device of a contact (ENVELOPE.md "Trust": pins are per device).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct DevicePins {
    /// Oldest first; the last one is current. Empty: a device that was shown (`pending`) but
    /// never accepted, which nothing is sealed to and nothing opens with.
    #[serde(default)]
    pub keys: Vec<PinnedKey>,
    /// A key the directory lists for this device that is not the pinned one (or, for a device
    /// never accepted, its only key): shown, and accepted only by `trust`.
    #[serde(default)]
    pub pending: Option<PendingKey>,
    /// When the directory stopped listing it: nothing is sealed to it any more, and its keys
    /// still open what it sent for `MESSAGE_TTL`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub removed_at: Option<DateTime<Utc>>,
    /// Its Ed25519 signing key (PEM), pinned the first time the directory showed one bound to
    /// the pinned key: from then on messages to it are version 2, and a directory answer with
    /// another signing key or none is a key change (ENVELOPE.md "Version 2": no downgrade).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signing: Option<SigningPin>,
    /// A signing key (or none) the directory showed that is not the pinned one: shown, and
    /// accepted only by `trust`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending_signing: Option<PendingSigning>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PendingSigning {
    /// None: the directory shows no signing key for the device any more.
    pub signing_key: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SigningPin {
    pub signing_key: String,
    pub pinned_at: DateTime<Utc>,
}

impl DevicePins {
    fn pinned(key: &PublicKey, now: DateTime<Utc>) -> Self {
        DevicePins {
            keys: vec![PinnedKey {
                public_key: key.to_pem(),
                fingerprint: key.fingerprint(),
                pinned_at: now,
                replaced_at: None,
            }],
            pending: None,
            removed_at: None,
            signing: None,
            pending_signing: None,
        }
    }

    /// The accepted key, if any.
    pub fn current(&self) -> Option<&PinnedKey> {
        self.keys.last()
    }

    /// The keys that may open this device's messages: the current one, then earlier ones
    /// replaced (or removed) less than `MESSAGE_TTL` ago (newest first).
    pub fn opening_keys(&self, now: DateTime<Utc>) -> Vec<PublicKey> {
        if self.removed_at.is_some_and(|at| at + MESSAGE_TTL <= now) {
            return Vec::new();
        }
        self.keys
            .iter()
            .rev()
            .filter(|k| k.replaced_at.is_none_or(|at| at + MESSAGE_TTL > now))
            .filter_map(|k| PublicKey::from_pem(&k.public_key).ok())
            .collect()
    }

    /// Accepts `key` as this device's current key.
    pub fn accept(&mut self, key: &PublicKey, now: DateTime<Utc>) {
        let fp = key.fingerprint();
        self.pending = None;
        self.removed_at = None;
        if self.current().is_some_and(|k| k.fingerprint == fp) {
            return;
        }
        // A new device key comes with its own signing key: pinned anew when the directory shows it.
        self.signing = None;
        self.pending_signing = None;
        for k in self.keys.iter_mut().filter(|k| k.replaced_at.is_none()) {
            k.replaced_at = Some(now);
        }
        // A key pinned earlier and now back is pinned anew, not resurrected with its old dates.
        self.keys.retain(|k| k.fingerprint != fp);
        self.keys.push(PinnedKey {
            public_key: key.to_pem(),
            fingerprint: fp,
            pinned_at: now,
            replaced_at: None,
        });
    }

    /// Drops earlier keys whose window has passed.
    fn prune(&mut self, now: DateTime<Utc>) {
        let last = self.keys.len().saturating_sub(1);
        let mut i = 0;
        self.keys.retain(|k| {
            let keep = i == last || k.replaced_at.is_none_or(|at| at + MESSAGE_TTL > now);
            i += 1;
            keep
        });
    }
}

/// What the directory's list of a contact's devices changed, as recorded by
/// [`Contact::reconcile`]: new devices and changed keys are pending (shown, not accepted).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceChanges {
    /// `(device id, fingerprint)` of devices never accepted.
    pub new: Vec<(u32, String)>,
    /// `(device id, pinned fingerprint, listed fingerprint)`.
    pub changed: Vec<(u32, String, String)>,
    /// Devices whose signing key changed (or went), as [`Contact::reconcile_signing`] returns
    /// them: pending like a changed key. [`Contact::reconcile`] leaves it empty.
    pub signing_changed: Vec<u32>,
    /// Devices no longer listed.
    pub removed: Vec<u32>,
}

impl DeviceChanges {
    /// Whether something waits for the user's `trust`.
    pub fn needs_trust(&self) -> bool {
        !self.new.is_empty() || !self.changed.is_empty() || !self.signing_changed.is_empty()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(from = "ContactOnDisk")]
pub struct Contact {
    pub name: String,
    /// Per device id. Device 1 (the account's key) is always pinned.
    pub devices: BTreeMap<u32, DevicePins>,
    /// The name now belongs to another account (`user_id` set), with this device-1 key, as
    /// shown: `trust NAME` replaces the contact with that account.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending_account: Option<PendingKey>,
    /// When the device list was last read from the directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub devices_checked_at: Option<DateTime<Utc>>,
}

/// A contact as written by this version, or by one before devices (one key list for the account).
#[derive(Deserialize)]
struct ContactOnDisk {
    name: String,
    #[serde(default)]
    devices: Option<BTreeMap<u32, DevicePins>>,
    #[serde(default)]
    keys: Vec<PinnedKey>,
    #[serde(default)]
    pending: Option<PendingKey>,
    #[serde(default)]
    pending_account: Option<PendingKey>,
    #[serde(default)]
    devices_checked_at: Option<DateTime<Utc>>,
}

impl From<ContactOnDisk> for Contact {
    fn from(c: ContactOnDisk) -> Self {
        let (device_pending, account_pending) = match c.pending {
            Some(p) if p.user_id.is_some() => (None, Some(p)),
            p => (p, None),
        };
        let devices = c.devices.unwrap_or_else(|| {
            BTreeMap::from([(
                1,
                DevicePins {
                    keys: c.keys,
                    pending: device_pending,
                    removed_at: None,
                    signing: None,
                    pending_signing: None,
                },
            )])
        });
        Contact {
            name: c.name,
            devices,
            pending_account: c.pending_account.or(account_pending),
            devices_checked_at: c.devices_checked_at,
        }
    }
}

impl Contact {
    /// A first contact: `keys` (device id, key) pinned as they are (trust on first use).
    pub fn new(name: &str, keys: &[(u32, PublicKey)], now: DateTime<Utc>) -> Self {
        Contact {
            name: name.to_string(),
            devices: keys
                .iter()
                .map(|(id, k)| (*id, DevicePins::pinned(k, now)))
                .collect(),
            pending_account: None,
            devices_checked_at: Some(now),
        }
    }

    /// Device 1's accepted key: the account's, as `GET /users` shows it.
    pub fn primary(&self) -> Option<&PinnedKey> {
        self.devices.get(&1).and_then(DevicePins::current)
    }

    /// The devices a message is sealed for: listed, accepted, each with its current key.
    pub fn sealing_keys(&self) -> Vec<(u32, PublicKey)> {
        self.devices
            .iter()
            .filter(|(_, d)| d.removed_at.is_none())
            .filter_map(|(id, d)| {
                let k = PublicKey::from_pem(&d.current()?.public_key).ok()?;
                Some((*id, k))
            })
            .collect()
    }

    /// [`Self::sealing_keys`] with each device's pinned signing key (PEM), if any: those get
    /// version 2.
    pub fn sealing_targets(&self) -> Vec<(u32, PublicKey, Option<String>)> {
        self.sealing_keys()
            .into_iter()
            .map(|(id, k)| {
                let signing = self.devices[&id]
                    .signing
                    .as_ref()
                    .map(|s| s.signing_key.clone());
                (id, k, signing)
            })
            .collect()
    }

    /// Whether a shown key waits for `trust`.
    pub fn has_pending(&self) -> bool {
        self.pending_account.is_some()
            || self.devices.values().any(|d| {
                (d.pending.is_some() || d.pending_signing.is_some()) && d.removed_at.is_none()
            })
    }

    /// Brings the signing keys up to the directory's (`(device id, signing key PEM)` of devices
    /// whose listed key is the pinned one, binding checked by the caller): one never pinned is
    /// pinned now (its device's key is already trusted); another one, or none where one is
    /// pinned, is recorded as shown and waits for `trust`. Returns the devices so changed.
    pub fn reconcile_signing(
        &mut self,
        listed: &[(u32, Option<String>)],
        now: DateTime<Utc>,
    ) -> Vec<u32> {
        let mut changed = Vec::new();
        for (id, listed) in listed {
            let Some(pins) = self.devices.get_mut(id) else {
                continue;
            };
            match (&pins.signing, listed) {
                (None, Some(key)) => {
                    pins.signing = Some(SigningPin {
                        signing_key: key.clone(),
                        pinned_at: now,
                    });
                    pins.pending_signing = None;
                }
                (None, None) => pins.pending_signing = None,
                (Some(pin), Some(key)) if pin.signing_key == *key => pins.pending_signing = None,
                (Some(_), other) => {
                    pins.pending_signing = Some(PendingSigning {
                        signing_key: other.clone(),
                    });
                    changed.push(*id);
                }
            }
        }
        changed
    }

    /// Brings the pins up to the directory's `listed` devices: a device never accepted or a
    /// changed key becomes pending (shown, not accepted), an accepted key listed again clears its
    /// pending one, and a device no longer listed is marked removed (its keys still open what it
    /// sent, for `MESSAGE_TTL`). Nothing is ever accepted here.
    pub fn reconcile(&mut self, listed: &[(u32, PublicKey)], now: DateTime<Utc>) -> DeviceChanges {
        let mut changes = DeviceChanges::default();
        for (id, key) in listed {
            let fp = key.fingerprint();
            let pins = self.devices.entry(*id).or_default();
            pins.removed_at = None;
            match pins.current() {
                Some(k) if k.fingerprint == fp => pins.pending = None,
                current => {
                    let pinned = current.map(|k| k.fingerprint.clone());
                    if pins.pending.as_ref().is_none_or(|p| p.fingerprint != fp) {
                        pins.pending = Some(PendingKey::new(key, None, now));
                    }
                    match pinned {
                        Some(pinned) => changes.changed.push((*id, pinned, fp)),
                        None => changes.new.push((*id, fp)),
                    }
                }
            }
        }
        let listed_ids: Vec<u32> = listed.iter().map(|(id, _)| *id).collect();
        self.devices.retain(|id, pins| {
            if listed_ids.contains(id) {
                return true;
            }
            if pins.keys.is_empty() {
                return false; // shown, never accepted, gone: nothing to keep
            }
            if pins.removed_at.is_none() {
                pins.removed_at = Some(now);
                pins.pending = None;
                changes.removed.push(*id);
            }
            true
        });
        self.devices_checked_at = Some(now);
        changes
    }

    /// Accepts every pending device key (or only the one with fingerprint `only`); returns the
    /// `(device id, previous fingerprint, accepted fingerprint)` of each.
    pub fn accept_pending(
        &mut self,
        only: Option<&str>,
        now: DateTime<Utc>,
    ) -> Vec<(u32, Option<String>, String)> {
        let mut accepted = Vec::new();
        for pins in self.devices.values_mut() {
            if only.is_none()
                && pins.removed_at.is_none()
                && let Some(signing) = pins.pending_signing.take()
            {
                pins.signing = signing.signing_key.map(|signing_key| SigningPin {
                    signing_key,
                    pinned_at: now,
                });
            }
        }
        for (id, pins) in self.devices.iter_mut() {
            let Some(p) = pins.pending.clone() else {
                continue;
            };
            if pins.removed_at.is_some() || only.is_some_and(|fp| fp != p.fingerprint) {
                continue;
            }
            let Ok(key) = PublicKey::from_pem(&p.public_key) else {
                continue;
            };
            let previous = pins.current().map(|k| k.fingerprint.clone());
            pins.accept(&key, now);
            accepted.push((*id, previous, p.fingerprint));
        }
        if !accepted.is_empty() {
            // Their signing keys are read (and pinned) before the next message to them.
            self.devices_checked_at = None;
        }
        accepted
    }

    /// Drops earlier keys whose window has passed, and removed devices whose messages expired.
    pub fn prune(&mut self, now: DateTime<Utc>) {
        self.devices
            .retain(|_, d| d.removed_at.is_none_or(|at| at + MESSAGE_TTL > now));
        for d in self.devices.values_mut() {
            d.prune(now);
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Contacts {
    #[serde(default)]
    pub by_id: BTreeMap<Uuid, Contact>,
}

impl Contacts {
    pub fn find_name(&self, name: &str) -> Option<(Uuid, &Contact)> {
        self.by_id
            .iter()
            .find(|(_, c)| c.name.eq_ignore_ascii_case(name))
            .map(|(id, c)| (*id, c))
    }
}

/// A message whose sender's key changed and was not accepted yet: kept (still sealed) until
/// `trust` or until it expires.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Held {
    pub message: crate::api::Message,
    pub held_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct InboxState {
    /// The last message id received: the next page starts after it.
    #[serde(default)]
    pub cursor: Option<Uuid>,
    /// `"<sender id>/<plaintext id>"` of every message shown, until it can no longer be replayed.
    /// Written to disk before the message is shown (`app::inbox`), so that nothing is shown twice.
    #[serde(default)]
    pub seen: BTreeMap<String, DateTime<Utc>>,
    #[serde(default)]
    pub held: Vec<Held>,
    /// Received and recorded, not yet confirmed to the server (a crash between the two).
    #[serde(default)]
    pub unconfirmed: Vec<Uuid>,
}

impl InboxState {
    pub fn seen_key(sender: Uuid, id: Uuid) -> String {
        format!("{sender}/{id}")
    }

    pub fn prune(&mut self, now: DateTime<Utc>) {
        self.seen.retain(|_, until| *until > now);
    }
}

/// The cached access token (mode 0600, like the key): never the password.
#[derive(Clone, Serialize, Deserialize)]
pub struct CachedToken {
    pub access_token: String,
    pub expires_at: DateTime<Utc>,
    /// The API it was issued by.
    pub api: String,
}

impl std::fmt::Debug for CachedToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CachedToken(.., expires_at: {})", self.expires_at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn files_are_private_and_round_trip() {
        let root = std::env::temp_dir().join(format!("messenger-store-{}", Uuid::now_v7()));
        let p = Profile::at(&root, "alice").unwrap();
        let _lock = p.lock().unwrap();
        let key = PrivateKey::generate();
        p.save_keyring(&Keyring::new(&key)).unwrap();
        let ring = p.keyring().unwrap().unwrap();
        assert_eq!(
            ring.current.private_key().unwrap().public_key(),
            key.public_key()
        );
        assert_eq!(
            fs::metadata(p.dir.join(KEYS)).unwrap().mode() & 0o777,
            0o600
        );
        assert_eq!(fs::metadata(&p.dir).unwrap().mode() & 0o777, 0o700);
        fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn profile_names() {
        assert!(valid_profile_name("alice-2"));
        for bad in ["", ".", "..", "a/b", ".hidden", &"x".repeat(65)] {
            assert!(!valid_profile_name(bad), "{bad}");
        }
    }

    #[test]
    fn earlier_contact_keys_open_for_the_message_lifetime_only() {
        let now = Utc::now();
        let (k1, k2) = (
            PrivateKey::generate().public_key(),
            PrivateKey::generate().public_key(),
        );
        let mut c = Contact::new("bob", &[(1, k1)], now);
        let d = c.devices.get_mut(&1).unwrap();
        d.accept(&k2, now);
        assert_eq!(d.opening_keys(now), vec![k2, k1]);
        assert_eq!(d.opening_keys(now + MESSAGE_TTL), vec![k2]);
        c.prune(now + MESSAGE_TTL);
        assert_eq!(c.devices[&1].keys.len(), 1);
    }

    #[test]
    fn a_new_device_or_a_changed_key_is_pending_until_accepted() {
        let now = Utc::now();
        let key = || PrivateKey::generate().public_key();
        let (k1, k2, k1b, k3) = (key(), key(), key(), key());
        let mut c = Contact::new("bob", &[(1, k1), (2, k2)], now);
        assert_eq!(c.sealing_keys(), vec![(1, k1), (2, k2)]);

        // Device 3 appears, device 1 is re-keyed, device 2 is removed.
        let changes = c.reconcile(&[(1, k1b), (3, k3)], now);
        assert_eq!(changes.new, vec![(3, k3.fingerprint())]);
        assert_eq!(
            changes.changed,
            vec![(1, k1.fingerprint(), k1b.fingerprint())]
        );
        assert_eq!(changes.removed, vec![2]);
        assert!(changes.signing_changed.is_empty());
        assert!(changes.needs_trust() && c.has_pending());
        // A signing key change alone waits for `trust` too.
        let signing_only = DeviceChanges {
            signing_changed: vec![1],
            ..DeviceChanges::default()
        };
        assert!(signing_only.needs_trust());
        assert!(!DeviceChanges::default().needs_trust());
        // Nothing is sealed to a key not accepted; the removed device's key still opens.
        assert_eq!(c.sealing_keys(), vec![(1, k1)]);
        assert_eq!(c.devices[&2].opening_keys(now), vec![k2]);
        assert!(c.devices[&3].opening_keys(now).is_empty());

        // The same list again records nothing new; accepting takes what was shown.
        let again = c.reconcile(&[(1, k1b), (3, k3)], now);
        assert!(again.removed.is_empty());
        let accepted = c.accept_pending(Some(&k3.fingerprint()), now);
        assert_eq!(accepted, vec![(3, None, k3.fingerprint())]);
        assert_eq!(c.sealing_keys(), vec![(1, k1), (3, k3)]);
        c.accept_pending(None, now);
        assert!(!c.has_pending());
        assert_eq!(c.sealing_keys(), vec![(1, k1b), (3, k3)]);
        assert_eq!(c.devices[&1].opening_keys(now), vec![k1b, k1]);

        // A removed device's keys open until its messages have expired, then it is forgotten.
        c.prune(now + MESSAGE_TTL);
        assert!(!c.devices.contains_key(&2));
    }

    #[test]
    fn a_contact_written_before_devices_is_device_one() {
        let k = PrivateKey::generate().public_key();
        let other = PrivateKey::generate().public_key();
        let old = serde_json::json!({"name": "bob", "keys": [{"public_key": k.to_pem(),
            "fingerprint": k.fingerprint(), "pinned_at": "2026-12-01T00:00:00Z"}],
            "pending": {"public_key": other.to_pem(), "fingerprint": other.fingerprint(),
            "seen_at": "2026-12-02T00:00:00Z", "user_id": Uuid::nil()}});
        let c: Contact = serde_json::from_value(old).unwrap();
        assert_eq!(c.sealing_keys(), vec![(1, k)]);
        assert_eq!(c.devices[&1].pending, None);
        assert_eq!(
            c.pending_account.as_ref().unwrap().fingerprint,
            other.fingerprint()
        );
        let back: Contact = serde_json::from_value(serde_json::to_value(&c).unwrap()).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn retired_keys_are_kept_for_the_message_lifetime() {
        let now = Utc::now();
        let (k1, k2) = (PrivateKey::generate(), PrivateKey::generate());
        let mut ring = Keyring::new(&k1);
        ring.rotate(&k2, now);
        let keys = ring.opening_keys(now).unwrap();
        assert_eq!(keys.len(), 2);
        assert_eq!(keys[1].public_key(), k1.public_key());
        assert!(!ring.prune(now + MESSAGE_TTL - TimeDelta::seconds(1)));
        assert!(ring.prune(now + MESSAGE_TTL));
        assert_eq!(ring.opening_keys(now).unwrap().len(), 1);
    }
}
