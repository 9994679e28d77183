//! `link`, `join`, `devices`, `remove-device`: one account on several devices (API.md
//! "Devices"), and the device lists that `send`, `inbox` and `trust` pin against.

use super::*;
use crate::api::DirectoryDevice;
use crate::store::DeviceChanges;

/// A device label: 1 to 64 characters, no control characters (API.md `POST /devices`).
pub fn valid_label(label: &str) -> bool {
    (1..=64).contains(&label.chars().count()) && !label.chars().any(char::is_control)
}

/// The label a new device gets unless `--label` says otherwise: the machine's host name.
fn default_label() -> String {
    let host = std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "computer".into());
    let label: String = format!("messenger on {host}").chars().take(64).collect();
    if valid_label(&label) {
        label
    } else {
        "messenger".into()
    }
}

/// A link code as typed: spaces and hyphens dropped, upper case (the server reads it back the
/// same way; API.md `POST /devices/link-codes`).
fn normalize_code(code: &str) -> String {
    code.chars()
        .filter(|c| !c.is_whitespace() && *c != '-')
        .collect::<String>()
        .to_ascii_uppercase()
}

/// `XXXX-XXXX-XXXX`, as the contract suggests showing it.
fn show_code(code: &str) -> String {
    let chars: Vec<char> = code.chars().collect();
    chars
        .chunks(4)
        .map(|c| c.iter().collect::<String>())
        .collect::<Vec<_>>()
        .join("-")
}

impl App {
    /// A directory's device list as keys this client can seal to. Every key must be X25519 and
    /// carry its own fingerprint; anything else is refused whole (a send is all or nothing).
    pub(super) fn listed_from(
        &self,
        whose: &str,
        devices: &[DirectoryDevice],
    ) -> Result<Vec<(u32, PublicKey)>, Error> {
        devices
            .iter()
            .map(|d| {
                let key = PublicKey::from_pem(&d.public_key).map_err(|e| {
                    Error::Other(format!(
                        "{whose}'s device {} has a key this client cannot encrypt to ({e}); \
                         nothing was sent or pinned",
                        d.device_id
                    ))
                })?;
                if key.fingerprint() != d.key_fingerprint {
                    return Err(Error::Other(format!(
                        "the directory lists {whose}'s device {} with a fingerprint that is not \
                         its key's; nothing was sent or pinned",
                        d.device_id
                    )));
                }
                Ok((d.device_id, key))
            })
            .collect()
    }

    /// Our own devices and their signing keys (`GET /keys/{our id}`); this device's entry must
    /// hold our current key.
    fn own_listed(&self, acct: &Account) -> Result<olm_device::ListedKeys, Error> {
        let (listed, signing) = self.listed_keys(acct.user_id, &acct.name)?;
        let ours = self.keyring()?.current.fingerprint.clone();
        match listed.iter().find(|(id, _)| *id == acct.device_id) {
            Some((_, k)) if k.fingerprint() == ours => Ok((listed, signing)),
            Some((_, k)) => Err(Error::KeyChanged(format!(
                "the server lists the key {} for this device (device {}), but its key is {}",
                group_fingerprint(&k.fingerprint()),
                acct.device_id,
                group_fingerprint(&ours)
            ))),
            None => Err(Error::Auth(format!(
                "the server does not list this device (device {}) any more: it was removed",
                acct.device_id
            ))),
        }
    }

    /// Our own account as a contact (its devices are pinned like anyone's): made on first use
    /// from `GET /keys/{our id}` (trust on first use, as for any first contact).
    pub(super) fn own_contact<'c>(
        &self,
        acct: &Account,
        contacts: &'c mut Contacts,
    ) -> Result<&'c Contact, Error> {
        if let std::collections::btree_map::Entry::Vacant(entry) =
            contacts.by_id.entry(acct.user_id)
        {
            let (listed, signing) = self.own_listed(acct)?;
            let mut me = Contact::new(&acct.name, &listed, Utc::now());
            me.reconcile_signing(&signing, Utc::now());
            entry.insert(me);
            self.profile.save_contacts(contacts)?;
        }
        Ok(&contacts.by_id[&acct.user_id])
    }

    /// Reads our device list again and records what changed; a new device of ours is shown
    /// (and waits for `trust`), never sealed to before.
    pub(super) fn refresh_own_devices(
        &self,
        acct: &Account,
        contacts: &mut Contacts,
    ) -> Result<DeviceChanges, Error> {
        self.own_contact(acct, contacts)?;
        let (listed, signing) = self.own_listed(acct)?;
        let me = contacts
            .by_id
            .get_mut(&acct.user_id)
            .expect("own_contact made it");
        let mut changes = me.reconcile(&listed, Utc::now());
        changes.signing_changed = me.reconcile_signing(&signing, Utc::now());
        self.profile.save_contacts(contacts)?;
        if changes.needs_trust() {
            self.out.warn(&format!(
                "{}. If you linked it, compare with `messenger whoami` on it, then run \
                 `messenger trust {}`",
                send::pending_summary(&contacts.by_id[&acct.user_id]),
                acct.name
            ));
        }
        Ok(changes)
    }

    pub fn link(&self) -> Result<Value, Error> {
        let _lock = self.profile.lock()?;
        let acct = self.account()?;
        let code = self.authed("making a link code", |api, t| api.create_link_code(t))?;
        let shown = show_code(&code.code);
        self.out.say(&format!(
            "link code: {shown} (valid until {}, once)",
            human_time(code.expires_at)
        ));
        self.out.say(&format!(
            "On the new device: messenger join {} {shown}",
            acct.name
        ));
        self.out.say(&format!(
            "Then compare the fingerprint it shows, and accept it here with `messenger trust {}`.",
            acct.name
        ));
        Ok(json!({"code": shown, "expires_at": rfc3339(code.expires_at), "name": acct.name}))
    }

    /// On a new device: a key of its own, linked to the account `name` with a code shown on a
    /// device the user already has, and the password.
    pub fn join(&self, name: &str, code: &str, label: Option<&str>) -> Result<Value, Error> {
        if !valid_user_name(name) {
            return Err(Error::Usage(format!(
                "{name:?}: a name is 3 to 32 characters of A-Z a-z 0-9 _ . -"
            )));
        }
        let code = normalize_code(code);
        if code.len() != 12 || !code.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return Err(Error::Usage(
                "a link code is 12 letters and digits, as `messenger link` shows it".into(),
            ));
        }
        let label = label.map(str::to_string).unwrap_or_else(default_label);
        if !valid_label(&label) {
            return Err(Error::Usage(
                "--label is 1 to 64 characters, no control characters".into(),
            ));
        }
        let _lock = self.profile.lock()?;
        let key = self.new_device_key()?;
        let password = self.password(
            &escape_controls(&format!("Password for {name} at {}: ", self.api.base())),
            false,
        )?;
        let linked = self
            .api
            .link_device(name, &password, &code, &key.public_key().to_pem(), &label)
            .map_err(|e| self.err(e, "linking this device"))?;
        let stranded = |e: Error| {
            Error::Other(format!(
                "{e}. This device was linked as device {} but is not set up: remove it from \
                 another device (`messenger remove-device {}`) and join again",
                linked.device_id, linked.device_id
            ))
        };
        let token = self
            .login_as(name, &password, linked.device_id)
            .map_err(stranded)?;
        let me = self
            .api
            .me(&token)
            .map_err(|e| stranded(self.err(e, "reading your account")))?;
        let acct = Account {
            api: self.api.base().to_string(),
            name: me.name.clone(),
            user_id: me.id,
            device_id: linked.device_id,
            registered_at: me.created_at,
        };
        self.profile.save_account(&acct)?;
        let mut contacts = self.profile.contacts()?;
        self.own_contact(&acct, &mut contacts)?;
        self.publish_prekeys_or_warn(&acct);
        let fp = key.public_key().fingerprint();
        self.out.say(&format!(
            "joined {} as device {} ({})",
            acct.name, linked.device_id, linked.label
        ));
        self.out.say(&format!(
            "this device's key fingerprint: {}",
            group_fingerprint(&fp)
        ));
        let others: Vec<(u32, PublicKey)> = contacts.by_id[&acct.user_id]
            .sealing_keys()
            .into_iter()
            .filter(|(id, _)| *id != acct.device_id)
            .collect();
        if !others.is_empty() {
            self.out.say(&format!(
                "pinned your other devices: {}",
                send::describe_devices(&others)
            ));
        }
        self.out.say(&format!(
            "On your other devices, `messenger trust {}` accepts this one once the fingerprints match.",
            acct.name
        ));
        Ok(
            json!({"id": acct.user_id, "name": acct.name, "device_id": linked.device_id,
                  "label": linked.label, "fingerprint": fp, "api": self.api.base(),
                  "profile": self.profile.name}),
        )
    }

    pub fn devices(&self) -> Result<Value, Error> {
        let _lock = self.profile.lock()?;
        let acct = self.account()?;
        let mine = self.authed("reading your devices", |api, t| api.my_devices(t))?;
        let mut contacts = self.profile.contacts()?;
        self.refresh_own_devices(&acct, &mut contacts)?;
        let me = &contacts.by_id[&acct.user_id];
        let mut list = Vec::new();
        for d in &mine.devices {
            let pins = me.devices.get(&d.device_id);
            let accepted = pins
                .and_then(|p| p.current())
                .is_some_and(|k| k.fingerprint == d.key_fingerprint);
            let state = if d.device_id == acct.device_id {
                "  (this device)"
            } else if accepted {
                ""
            } else {
                "  (not accepted: `messenger trust` your name after comparing)"
            };
            self.out.say(&format!(
                "device {}  {}  {}{state}",
                d.device_id,
                d.label,
                group_fingerprint(&d.key_fingerprint)
            ));
            list.push(json!({"device_id": d.device_id, "label": d.label,
                "fingerprint": d.key_fingerprint, "created_at": rfc3339(d.created_at),
                "current": d.device_id == acct.device_id, "accepted": accepted}));
        }
        Ok(json!({"devices": list}))
    }

    /// Removes one of the account's devices (this one too: then the profile is erased).
    pub fn remove_device(&self, device_id: u32, yes: bool) -> Result<Value, Error> {
        if device_id == 1 {
            return Err(Error::Usage(
                "device 1 is the account's own: `messenger delete-account` removes it".into(),
            ));
        }
        let lock = self.profile.lock()?;
        let acct = self.account()?;
        let this = device_id == acct.device_id;
        if this && !yes {
            return Err(Error::Usage(format!(
                "device {device_id} is this device: removing it erases this profile; pass --yes"
            )));
        }
        let pw = self.password(
            &escape_controls(&format!("Password for {}: ", acct.name)),
            false,
        )?;
        self.authed(&format!("removing device {device_id}"), |api, t| {
            api.remove_device(t, device_id, &pw)
        })?;
        if this {
            let name = self.profile.name.clone();
            Profile::at(
                self.profile.dir.parent().expect("a profile has a parent"),
                &name,
            )?
            .erase(lock)?;
            self.out.say(&format!(
                "removed this device (device {device_id}) from {}; erased the profile {name}",
                acct.name
            ));
        } else {
            let mut contacts = self.profile.contacts()?;
            if let Some(pins) = contacts
                .by_id
                .get_mut(&acct.user_id)
                .and_then(|me| me.devices.get_mut(&device_id))
            {
                pins.removed_at = Some(Utc::now());
                pins.pending = None;
            }
            self.profile.save_contacts(&contacts)?;
            self.out.say(&format!(
                "removed device {device_id} from {}: its undelivered messages are erased and its \
                 tokens no longer work",
                acct.name
            ));
        }
        Ok(json!({"removed": device_id, "this_device": this}))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_codes_are_read_back_without_case_or_hyphens() {
        assert_eq!(normalize_code("abcd-efgh-jk12"), "ABCDEFGHJK12");
        assert_eq!(normalize_code(" ABCD EFGH JK12\n"), "ABCDEFGHJK12");
        assert_eq!(show_code("ABCDEFGHJK12"), "ABCD-EFGH-JK12");
    }

    #[test]
    fn labels() {
        assert!(valid_label("Alice's phone"));
        assert!(valid_label(&"é".repeat(64)));
        assert!(!valid_label(""));
        assert!(!valid_label(&"x".repeat(65)));
        assert!(!valid_label("tab\there"));
        assert!(valid_label(&default_label()));
    }
}
