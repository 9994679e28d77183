//! `trust`: accept what was shown for a contact: a changed key, a new device, or a new account
//! under a pinned name.

use super::*;

/// A typed fingerprint: 64 hex digits, spaces allowed, any case.
fn parse_fingerprint(typed: &str) -> Result<String, Error> {
    let fp: String = typed
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect::<String>()
        .to_lowercase();
    if fp.len() != 64 || !fp.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(Error::Usage(
            "--fingerprint: 64 hex digits (spaces allowed), as `messenger contacts` or \
             `messenger whoami` shows them"
                .into(),
        ));
    }
    Ok(fp)
}

impl App {
    /// Accepts what was shown for `name` (ENVELOPE.md "Trust"): the very keys recorded when
    /// `send`, `inbox`, `contacts` or `devices` showed them (each new device and changed key of
    /// the contact, or only the one whose fingerprint the user typed), never whatever the
    /// directory says at that moment: a change in the directory that was not shown yet is shown
    /// and recorded now, and accepted by the next `trust`. A name never pinned is pinned on
    /// first use, as `send` would.
    pub fn trust(&self, name: &str, expected: Option<&str>) -> Result<Value, Error> {
        let expected = expected.map(parse_fingerprint).transpose()?;
        let wanted = |fp: &str| expected.as_deref().is_none_or(|e| e == fp);
        let _lock = self.profile.lock()?;
        let acct = self.account()?;
        let now = Utc::now();
        let mut contacts = self.profile.contacts()?;
        let pinned: Option<(Uuid, Contact)> =
            contacts.find_name(name).map(|(id, c)| (id, c.clone()));

        // Shown before: a new account under the name, or device keys.
        if let Some((old_id, c)) = &pinned {
            if let Some(p) = c
                .pending_account
                .as_ref()
                .filter(|p| wanted(&p.fingerprint))
            {
                return self.accept_account(&acct, &mut contacts, *old_id, &c.name, p, now);
            }
            let shown = c.devices.values().any(|d| {
                d.removed_at.is_none()
                    && (d.pending.as_ref().is_some_and(|p| wanted(&p.fingerprint))
                        || (expected.is_none() && d.pending_signing.is_some()))
            });
            if shown {
                return self.accept_devices(
                    &acct,
                    &mut contacts,
                    *old_id,
                    expected.as_deref(),
                    now,
                );
            }
        }

        match pinned {
            None => {
                // A first contact: pinned as `send` would, with every device listed.
                let dir = self.lookup_name(name, &contacts)?;
                let (listed, signing) = self.listed_keys(dir.user_id, &dir.name)?;
                if let Some(exp) = &expected
                    && !listed.iter().any(|(_, k)| k.fingerprint() == *exp)
                {
                    return Err(Error::KeyChanged(format!(
                        "{}'s devices in the directory are {}, none with the fingerprint you gave; \
                         nothing changed",
                        dir.name,
                        send::describe_devices(&listed)
                    )));
                }
                let mut contact = Contact::new(&dir.name, &listed, now);
                contact.reconcile_signing(&signing, now);
                contacts.by_id.insert(dir.user_id, contact);
                self.profile.save_contacts(&contacts)?;
                self.out.say(&format!(
                    "{}: pinned {} (id {})",
                    dir.name,
                    send::describe_devices(&listed),
                    dir.user_id
                ));
                let fp = listed
                    .iter()
                    .find(|(d, _)| *d == 1)
                    .map(|(_, k)| k.fingerprint());
                Ok(
                    json!({"name": dir.name, "id": dir.user_id, "fingerprint": fp,
                    "previous": null, "held": self.held_from(dir.user_id)?}),
                )
            }
            Some((id, c)) => {
                // Nothing shown waits: read the directory now, and show what changed.
                let (listed, signing) = match self.call(|api, t| api.device_keys(t, id)) {
                    Ok(l) if l.user_id == id => self.keys_from(&c.name, id, &l.devices)?,
                    Ok(_) => {
                        return Err(Error::KeyChanged(format!(
                            "the directory answered the device list of {} with another \
                             account's; nothing changed",
                            c.name
                        )));
                    }
                    Err(CallError::Api(e)) if e.status() == Some(404) => {
                        return self.show_new_account(
                            &acct,
                            &mut contacts,
                            id,
                            &c.name,
                            &expected,
                            now,
                        );
                    }
                    Err(CallError::Api(e)) => return Err(self.err(e, "reading their devices")),
                    Err(CallError::Client(e)) => return Err(e),
                };
                let mut probe = contacts.by_id[&id].clone();
                let mut changes = probe.reconcile(&listed, now);
                // A signing key change needs trust like a key change (shown below).
                changes.signing_changed = probe.reconcile_signing(&signing, now);
                if let Some(exp) = &expected {
                    // Typed: accept the directory's key only when it is the one typed; record
                    // nothing otherwise (what was shown before stays what `trust` accepts).
                    let listed_now = probe
                        .devices
                        .values()
                        .any(|d| d.pending.as_ref().is_some_and(|p| p.fingerprint == *exp));
                    if listed_now {
                        contacts.by_id.insert(id, probe);
                        return self.accept_devices(&acct, &mut contacts, id, Some(exp), now);
                    }
                    if !probe
                        .sealing_keys()
                        .iter()
                        .any(|(_, k)| k.fingerprint() == *exp)
                    {
                        return Err(Error::KeyChanged(format!(
                            "{}'s devices in the directory are {}, none with the fingerprint you \
                             gave; nothing changed",
                            c.name,
                            send::describe_devices(&listed)
                        )));
                    }
                } else {
                    contacts.by_id.insert(id, probe);
                    self.profile.save_contacts(&contacts)?;
                    if changes.needs_trust() {
                        return Err(Error::KeyChanged(format!(
                            "{}; nothing changed. Compare with {} out of band, then run \
                             `messenger trust {}` again to accept (or pass --fingerprint)",
                            send::pending_summary(&contacts.by_id[&id]),
                            c.name,
                            c.name
                        )));
                    }
                }
                let contact = &contacts.by_id[&id];
                self.out.say(&format!(
                    "{}'s keys are already the pinned ones: {}",
                    c.name,
                    send::describe_devices(&contact.sealing_keys())
                ));
                Ok(json!({"name": c.name, "id": id,
                    "fingerprint": contact.primary().map(|k| k.fingerprint.clone()),
                    "previous": null, "held": self.held_from(id)?}))
            }
        }
    }

    /// How many held messages came from `id`.
    fn held_from(&self, id: Uuid) -> Result<usize, Error> {
        Ok(self
            .profile
            .inbox()?
            .held
            .iter()
            .filter(|h| h.message.sender_id == id)
            .count())
    }

    fn say_held(&self, id: Uuid, name: &str) -> Result<usize, Error> {
        let held = self.held_from(id)?;
        if held > 0 {
            self.out.say(&format!(
                "{held} held message(s) from {name}: run `messenger inbox` to read them"
            ));
        }
        Ok(held)
    }

    fn accept_devices(
        &self,
        acct: &Account,
        contacts: &mut Contacts,
        id: Uuid,
        only: Option<&str>,
        now: DateTime<Utc>,
    ) -> Result<Value, Error> {
        let contact = contacts.by_id.get_mut(&id).expect("pinned");
        let accepted = contact.accept_pending(only, now);
        let name = contact.name.clone();
        let fp = contact.primary().map(|k| k.fingerprint.clone());
        self.profile.save_contacts(contacts)?;
        let mut previous = None;
        for (device, before, after) in &accepted {
            let whose = if id == acct.user_id {
                "your".to_string()
            } else {
                format!("{name}'s")
            };
            match before {
                Some(before) => {
                    if *device == 1 {
                        previous = Some(before.clone());
                    }
                    self.out.say(&format!(
                        "{name}: accepted the new key {} of {whose} device {device} (was {}); \
                         messages sealed with the old key still open until {}",
                        group_fingerprint(after),
                        group_fingerprint(before),
                        human_time(now + MESSAGE_TTL)
                    ));
                }
                None => self.out.say(&format!(
                    "{name}: accepted {whose} new device {device} with key {}",
                    group_fingerprint(after)
                )),
            }
        }
        let held = self.say_held(id, &name)?;
        let devices: Vec<Value> = accepted
            .iter()
            .map(|(d, before, after)| json!({"device_id": d, "fingerprint": after, "previous": before}))
            .collect();
        Ok(
            json!({"name": name, "id": id, "fingerprint": fp, "previous": previous,
            "accepted": devices, "held": held}),
        )
    }

    /// Replaces the contact `old_id` with the account that now holds its name, as shown.
    fn accept_account(
        &self,
        _acct: &Account,
        contacts: &mut Contacts,
        old_id: Uuid,
        name: &str,
        shown: &PendingKey,
        now: DateTime<Utc>,
    ) -> Result<Value, Error> {
        let key = PublicKey::from_pem(&shown.public_key).map_err(|e| {
            Error::Other(format!(
                "the key shown for {name} is refused ({e}); nothing was pinned"
            ))
        })?;
        let id = shown.user_id.unwrap_or(old_id);
        let previous = contacts
            .by_id
            .get(&old_id)
            .and_then(|c| c.primary().map(|k| k.fingerprint.clone()));
        contacts.by_id.remove(&old_id);
        // Its other devices, if any, are shown at the next send or message, and accepted then.
        let mut contact = Contact::new(name, &[(1, key)], now);
        contact.devices_checked_at = None;
        contacts.by_id.insert(id, contact);
        self.profile.save_contacts(contacts)?;
        self.out.say(&format!(
            "{name}: pinned the account id {id} with key {} (it replaces id {old_id})",
            group_fingerprint(&shown.fingerprint)
        ));
        let held = self.say_held(id, name)?;
        Ok(
            json!({"name": name, "id": id, "fingerprint": shown.fingerprint,
            "previous": previous, "held": held}),
        )
    }

    /// The pinned account `old_id` is gone: whoever holds the name now is shown and recorded,
    /// never accepted here (unless the user typed its fingerprint).
    pub(super) fn show_new_account(
        &self,
        acct: &Account,
        contacts: &mut Contacts,
        old_id: Uuid,
        name: &str,
        expected: &Option<String>,
        now: DateTime<Utc>,
    ) -> Result<Value, Error> {
        let dir = self.lookup_name(name, contacts)?;
        if dir.user_id == old_id {
            return Err(Error::NotFound(format!(
                "{name}'s account answers neither sends nor device lists; nothing changed"
            )));
        }
        let key = PublicKey::from_pem(&dir.public_key).map_err(|e| {
            Error::Other(format!(
                "{}'s published key is refused ({e}); nothing was pinned",
                dir.name
            ))
        })?;
        let fp = key.fingerprint();
        let shown = PendingKey::new(&key, Some(dir.user_id), now);
        if expected.as_deref() == Some(fp.as_str()) {
            return self.accept_account(acct, contacts, old_id, name, &shown, now);
        }
        if let Some(c) = contacts.by_id.get_mut(&old_id) {
            c.pending_account = Some(shown);
        }
        self.profile.save_contacts(contacts)?;
        Err(Error::KeyChanged(format!(
            "the name {} now belongs to another account (id {}, was {old_id}), with key {}; \
             nothing changed. Compare it with {}, then run `messenger trust {}` again to accept \
             this key (or pass --fingerprint)",
            dir.name,
            dir.user_id,
            group_fingerprint(&fp),
            dir.name,
            dir.name
        )))
    }
}
