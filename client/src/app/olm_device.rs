//! This device's Olm account (ENVELOPE.md "Version 2"): made from its key on first use, its
//! signing key and prekeys published, topped up as they are claimed, and its sessions with each
//! peer device, saved after every message.

use super::*;
use crate::api::DeviceKey;
use crate::olm::{self, DeviceAddress, OlmError, OlmState, SigningPublicKey};
use crate::store::OlmFile;

/// A directory's devices (id, X25519 key) and their signing keys (id, PEM), checked.
pub(super) type ListedKeys = (Vec<(u32, PublicKey)>, Vec<(u32, Option<String>)>);

/// How often `inbox` reads the server's prekey count when nothing says it changed.
const PREKEYS_CHECK_EVERY: TimeDelta = TimeDelta::hours(1);

pub(super) fn olm_error(doing: &str, e: OlmError) -> Error {
    Error::Other(format!("{doing}: {e}"))
}

/// This device's Olm state and the file it lives in.
pub(super) struct OlmDevice {
    pub file: OlmFile,
    pub state: OlmState,
}

impl App {
    /// This device's Olm state; made from its current key on first use and saved at once.
    pub(super) fn olm_device(&self, acct: &Account) -> Result<OlmDevice, Error> {
        let key = self
            .keyring()?
            .current
            .private_key()
            .map_err(Error::Other)?;
        let own = DeviceAddress::new(acct.user_id, acct.device_id);
        if let Some(file) = self.profile.olm()? {
            match OlmState::from_json(&file.state, &key.public_key()) {
                Ok(mut state) if state.own() == own => {
                    // Accounts retired more than `MESSAGE_TTL` ago open nothing still on the
                    // server: gone before any use, and from the file at the next save.
                    state.prune_retired_accounts(Utc::now());
                    return Ok(OlmDevice { file, state });
                }
                // Made for another key (a rotate-key that stopped half way): start again.
                Ok(_) | Err(OlmError::AccountKeyMismatch) => self.out.warn(
                    "this device's Olm state was made for another key: starting a new one (peers \
                     start new sessions with it)",
                ),
                Err(e) => return Err(olm_error("reading this device's Olm state", e)),
            }
        }
        let state = OlmState::new(own, &key, None)
            .map_err(|e| olm_error("making this device's Olm account", e))?;
        let file = OlmFile {
            state: state.to_json().to_string(),
            published: false,
            published_at: None,
            prekeys_checked_at: None,
        };
        self.profile.save_olm(&file)?;
        Ok(OlmDevice { file, state })
    }

    /// Saves the state: after every message sealed or opened with it, before anything else.
    /// Retired accounts past `MESSAGE_TTL` are dropped first.
    pub(super) fn save_olm(&self, device: &mut OlmDevice) -> Result<(), Error> {
        device.state.prune_retired_accounts(Utc::now());
        device.file.state = device.state.to_json().to_string();
        self.profile.save_olm(&device.file)?;
        Ok(())
    }

    /// Publishes this device's signing key and a first set of prekeys, or tops them up when the
    /// server's count (read at most hourly, or at once after a session used one) runs low. The
    /// keys are on disk before the server hears of them.
    pub(super) fn publish_prekeys(&self, acct: &Account) -> Result<(), Error> {
        let mut device = self.olm_device(acct)?;
        let now = Utc::now();
        if !device.file.published {
            let upload = device.state.signing_key_upload();
            // A signing key already there (a run that stopped after this step) is ours only if it
            // is the same key; the server refuses to replace one without a rotation signature.
            let listed = self.authed("reading your keys", |api, t| {
                api.device_keys(t, acct.user_id)
            })?;
            let ours = device.state.signing_key().to_pem();
            let there = listed
                .devices
                .iter()
                .find(|d| d.device_id == acct.device_id)
                .and_then(|d| d.signing_key.clone());
            if there.as_deref() != Some(ours.as_str()) {
                self.authed("publishing this device's signing key", |api, t| {
                    api.set_signing_key(t, &upload)
                })?;
            }
            self.upload_prekeys(&mut device, olm::PREKEY_TARGET as usize, true)?;
            device.file.published = true;
            device.file.published_at = Some(now);
        } else if device
            .file
            .prekeys_checked_at
            .is_none_or(|at| at + PREKEYS_CHECK_EVERY < now)
        {
            let count = self.authed("reading your prekey count", |api, t| api.prekey_count(t))?;
            if let Some(top_up) = olm::top_up(&count) {
                self.upload_prekeys(&mut device, top_up.one_time_keys, top_up.new_last_resort)?;
            }
        } else {
            return Ok(());
        }
        device.file.prekeys_checked_at = Some(now);
        self.save_olm(&mut device)
    }

    fn upload_prekeys(
        &self,
        device: &mut OlmDevice,
        one_time_keys: usize,
        new_last_resort: bool,
    ) -> Result<(), Error> {
        let upload = device
            .state
            .prekey_upload(one_time_keys, new_last_resort)
            .map_err(|e| olm_error("making prekeys", e))?;
        self.save_olm(device)?;
        self.authed("publishing prekeys", |api, t| {
            api.upload_prekeys(t, &upload)
        })?;
        device.state.mark_prekeys_published();
        self.save_olm(device)
    }

    /// Publishing is never what a command is for: a failure is one warning, and the next
    /// command tries again.
    pub(super) fn publish_prekeys_or_warn(&self, acct: &Account) {
        if let Err(e) = self.publish_prekeys(acct) {
            self.out.warn(&format!(
                "this device's prekeys are not published yet ({e}); messages to it use version \
                 1 until they are"
            ));
        }
    }

    /// `GET /keys/{user_id}`, checked: the answer is for the account asked, every key is X25519
    /// with its own fingerprint, and a signing key is listed only with a binding signature that
    /// verifies for its device's key. Gives the device list and the signing keys.
    pub(super) fn listed_keys(&self, user_id: Uuid, whose: &str) -> Result<ListedKeys, Error> {
        let keys = self.authed(&format!("reading {whose}'s keys"), |api, t| {
            api.device_keys(t, user_id)
        })?;
        if keys.user_id != user_id {
            return Err(Error::KeyChanged(format!(
                "the directory answered the keys of {whose} with another account's ({}); nothing \
                 was sent or pinned",
                keys.user_id
            )));
        }
        self.keys_from(whose, user_id, &keys.devices)
    }

    pub(super) fn keys_from(
        &self,
        whose: &str,
        user_id: Uuid,
        devices: &[DeviceKey],
    ) -> Result<ListedKeys, Error> {
        let listed: Vec<crate::api::DirectoryDevice> = devices
            .iter()
            .map(|d| crate::api::DirectoryDevice {
                device_id: d.device_id,
                public_key: d.public_key.clone(),
                key_fingerprint: d.key_fingerprint.clone(),
                key_updated_at: None,
            })
            .collect();
        let listed = self.listed_from(whose, &listed)?;
        let mut signing = Vec::new();
        for (d, (id, key)) in devices.iter().zip(&listed) {
            let verified = match (&d.signing_key, &d.binding_sig) {
                (Some(pem), Some(sig)) => {
                    let sk = SigningPublicKey::from_pem(pem)
                        .map_err(|e| olm_error(&format!("{whose}'s device {id}"), e))?;
                    olm::verify_binding(&sk, sig, DeviceAddress::new(user_id, *id), key)
                        .map_err(|e| olm_error(&format!("{whose}'s device {id}"), e))?;
                    Some(sk.to_pem())
                }
                _ => None,
            };
            // A reset signing key (its owner lost the old one) is a change to show, never pinned
            // quietly: it is reported as no key until the device rotates again.
            signing.push((*id, verified.filter(|_| !d.signing_key_reset)));
        }
        Ok((listed, signing))
    }
}
