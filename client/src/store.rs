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

    /// Erases the whole profile (after the account is deleted).
    pub fn erase(self, _lock: ProfileLock) -> Result<(), StoreError> {
        fs::remove_dir_all(&self.dir).map_err(io(&self.dir))
    }
}

const ACCOUNT: &str = "account.json";
const KEYS: &str = "keys.json";
const CONTACTS: &str = "contacts.json";
const INBOX: &str = "inbox.json";
const TOKEN: &str = "token.json";

/// Which account this profile holds, and on which API.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Account {
    pub api: String,
    pub name: String,
    pub user_id: Uuid,
    pub registered_at: DateTime<Utc>,
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

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Contact {
    pub name: String,
    /// Oldest first; the last one is current.
    pub keys: Vec<PinnedKey>,
    #[serde(default)]
    pub pending: Option<PendingKey>,
}

impl Contact {
    pub fn new(name: &str, key: &PublicKey, now: DateTime<Utc>) -> Self {
        Contact {
            name: name.to_string(),
            keys: vec![PinnedKey {
                public_key: key.to_pem(),
                fingerprint: key.fingerprint(),
                pinned_at: now,
                replaced_at: None,
            }],
            pending: None,
        }
    }

    pub fn current(&self) -> &PinnedKey {
        self.keys.last().expect("a contact has a pinned key")
    }

    /// The keys that may open this contact's messages: the current one, then earlier ones
    /// replaced less than `MESSAGE_TTL` ago (newest first).
    pub fn opening_keys(&self, now: DateTime<Utc>) -> Vec<PublicKey> {
        self.keys
            .iter()
            .rev()
            .filter(|k| k.replaced_at.is_none_or(|at| at + MESSAGE_TTL > now))
            .filter_map(|k| PublicKey::from_pem(&k.public_key).ok())
            .collect()
    }

    /// Accepts `key` as this contact's current key.
    pub fn accept(&mut self, key: &PublicKey, now: DateTime<Utc>) {
        let fp = key.fingerprint();
        if self.current().fingerprint == fp {
            self.pending = None;
            return;
        }
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
        self.pending = None;
    }

    /// Drops earlier keys whose window has passed.
    pub fn prune(&mut self, now: DateTime<Utc>) {
        let last = self.keys.len().saturating_sub(1);
        let mut i = 0;
        self.keys.retain(|k| {
            let keep = i == last || k.replaced_at.is_none_or(|at| at + MESSAGE_TTL > now);
            i += 1;
            keep
        });
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
        let mut c = Contact::new("bob", &k1, now);
        c.accept(&k2, now);
        assert_eq!(c.opening_keys(now), vec![k2, k1]);
        assert_eq!(c.opening_keys(now + MESSAGE_TTL), vec![k2]);
        c.prune(now + MESSAGE_TTL);
        assert_eq!(c.keys.len(), 1);
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
