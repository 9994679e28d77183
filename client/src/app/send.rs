//! `send`: seal a message for every device of a contact, and for our other devices.

use super::*;
use crate::api::{DeviceEnvelope, DevicesChanged, SentToDevices};

impl App {
    /// `GET /users?name=`, checked as ENVELOPE.md "Trust" says: the answer must carry the name
    /// asked (without regard to case), and an id that is pinned must be pinned under that name.
    /// Anything else is the directory trying to redirect a pin: a key change, nothing pinned.
    pub(super) fn lookup_name(&self, name: &str, contacts: &Contacts) -> Result<Directory, Error> {
        let dir = self.authed(&format!("looking up {name}"), |api, t| {
            api.lookup_user(t, name)
        })?;
        if !dir.name.eq_ignore_ascii_case(name) {
            return Err(Error::KeyChanged(format!(
                "the directory answered the lookup of {name} with another name, {} (id {}). \
                 Nothing was sent or pinned: an answer must carry the name asked",
                dir.name, dir.user_id
            )));
        }
        if let Some(c) = contacts.by_id.get(&dir.user_id)
            && !c.name.eq_ignore_ascii_case(name)
        {
            return Err(Error::KeyChanged(format!(
                "the directory answered the lookup of {name} with the id {} of your contact {}. \
                 Nothing was sent or pinned: a pinned id is never moved to another name",
                dir.user_id, c.name
            )));
        }
        Ok(dir)
    }

    /// The contact `name`: the one pinned under that name, or a first contact pinned now with
    /// every device the directory lists (trust on first use). A name shown as now belonging to
    /// another account is refused until `trust`.
    pub(super) fn contact_for(&self, name: &str, contacts: &mut Contacts) -> Result<Uuid, Error> {
        if let Some((id, c)) = contacts.find_name(name) {
            if let Some(p) = &c.pending_account {
                return Err(Error::KeyChanged(format!(
                    "the name {} now belongs to another account (id {}), with key {}. Nothing was \
                     sent. Check with them, then run `messenger trust {}`",
                    c.name,
                    p.user_id.unwrap_or_default(),
                    group_fingerprint(&p.fingerprint),
                    c.name
                )));
            }
            return Ok(id);
        }
        let dir = self.lookup_name(name, contacts)?;
        let (listed, signing) = self.listed_keys(dir.user_id, &dir.name)?;
        // The directory's two answers agree on the account's key, or neither is pinned.
        let primary = PublicKey::from_pem(&dir.public_key).ok();
        if listed.iter().find(|(id, _)| *id == 1).map(|(_, k)| *k) != primary {
            return Err(Error::KeyChanged(format!(
                "the directory lists a device 1 for {} whose key is not the account's key it \
                 shows. Nothing was sent or pinned",
                dir.name
            )));
        }
        let now = Utc::now();
        let mut contact = Contact::new(&dir.name, &listed, now);
        contact.reconcile_signing(&signing, now);
        contacts.by_id.insert(dir.user_id, contact);
        self.profile.save_contacts(contacts)?;
        self.out.warn(&format!(
            "first contact with {}: pinned {} (compare with {} out of band)",
            dir.name,
            describe_devices(&listed),
            dir.name
        ));
        Ok(dir.user_id)
    }

    pub fn send(&self, name: &str, text: &str) -> Result<Value, Error> {
        let text = if text == "-" {
            let mut buf = String::new();
            std::io::stdin().read_to_string(&mut buf).map_err(|_| {
                Error::Usage("the message on standard input is not UTF-8 text".into())
            })?;
            if buf.ends_with('\n') {
                buf.pop();
                if buf.ends_with('\r') {
                    buf.pop();
                }
            }
            buf
        } else {
            text.to_string()
        };
        if text.is_empty() {
            return Err(Error::Usage("the message is empty".into()));
        }
        let _lock = self.profile.lock()?;
        let acct = self.account()?;
        let ring = self.keyring()?;
        let key = ring.current.private_key().map_err(Error::Other)?;
        let mut contacts = self.profile.contacts()?;
        let to = self.contact_for(name, &mut contacts)?;
        let to_name = contacts.by_id[&to].name.clone();
        let pt = Plaintext::new(text);
        let sent =
            match self.seal_and_post(&acct, &key, to, &pt, &pt.id.to_string(), &mut contacts) {
                // The pinned account is gone: whoever holds the name now is shown, not sent to.
                Err(Error::NotFound(_)) if to != acct.user_id => {
                    return self
                        .show_new_account(&acct, &mut contacts, to, &to_name, &None, Utc::now())
                        .map(|_| Value::Null);
                }
                other => other?,
            }
            .ok_or_else(|| {
                Error::Usage("this is your only device: there is nothing to send it to".into())
            })?;
        self.out.say(&format!(
            "sent to {} ({} device{})",
            to_name,
            sent.0.messages.len(),
            if sent.0.messages.len() == 1 { "" } else { "s" }
        ));
        // A copy for our other devices, so that they see what we sent. The message is sent
        // whatever happens to the copy.
        let copies = if to == acct.user_id {
            0
        } else {
            match self.send_copies(&acct, &key, to, &pt, &mut contacts) {
                Ok(n) => n,
                Err(e) => {
                    self.out
                        .warn(&format!("your other devices get no copy of it: {e}"));
                    0
                }
            }
        };
        let ids: Vec<Value> = sent
            .0
            .messages
            .iter()
            .map(|m| json!({"device_id": m.device_id, "id": m.id}))
            .collect();
        Ok(
            json!({"id": sent.0.messages.first().map(|m| m.id), "messages": ids,
            "message_id": pt.id, "to": to_name, "to_id": to,
            "timestamp": sent.0.timestamp, "expires_at": sent.0.expires_at,
            "attempts": sent.1, "replayed": sent.0.replayed, "copies": copies}),
        )
    }

    /// A copy of `pt`, sent to `to`, for each of our other devices. The device list is read
    /// again when it is older than [`KEYS_FRESH`]; a device of ours not accepted yet gets
    /// nothing (the copy is skipped, with the reason).
    fn send_copies(
        &self,
        acct: &Account,
        key: &PrivateKey,
        to: Uuid,
        pt: &Plaintext,
        contacts: &mut Contacts,
    ) -> Result<usize, Error> {
        let me = self.own_contact(acct, contacts)?;
        let now = Utc::now();
        if me.devices_checked_at.is_none_or(|at| at + KEYS_FRESH < now) {
            self.refresh_own_devices(acct, contacts)?;
        }
        let mut copy = pt.clone();
        copy.id = Uuid::now_v7();
        copy.sent_to = Some(to);
        let sent = self.seal_and_post(
            acct,
            key,
            acct.user_id,
            &copy,
            &copy.id.to_string(),
            contacts,
        )?;
        Ok(sent.map(|s| s.0.messages.len()).unwrap_or(0))
    }

    /// Seals `pt` for every accepted device of `to` (for ourselves: every device but this one)
    /// and posts them in one `POST /messages/devices`. On `devices_changed` the contact's pins
    /// are brought up to the list given: a removed device is dropped and the message sealed
    /// again; a new device or a changed key is recorded as shown and refused until `trust`, so
    /// nothing is ever sealed to a key the user did not accept. `None`: nothing to send to (our
    /// own lone device).
    pub(super) fn seal_and_post(
        &self,
        acct: &Account,
        key: &PrivateKey,
        to: Uuid,
        pt: &Plaintext,
        idem: &str,
        contacts: &mut Contacts,
    ) -> Result<Option<(SentToDevices, u32)>, Error> {
        self.refresh_signing_keys(to, contacts)?;
        for _ in 0..4 {
            let contact = contacts
                .by_id
                .get(&to)
                .ok_or_else(|| Error::Other("the contact is not pinned".into()))?;
            if contact.has_pending() {
                return Err(Error::KeyChanged(pending_message(contact)));
            }
            let targets: Vec<(u32, PublicKey, Option<String>)> = contact
                .sealing_targets()
                .into_iter()
                .filter(|(device, _, _)| !(to == acct.user_id && *device == acct.device_id))
                .collect();
            let envelopes = self.seal_for(acct, key, to, &contact.name.clone(), pt, &targets)?;
            if envelopes.is_empty() {
                return Ok(None);
            }
            match self.post_with_retries(to, &envelopes, idem)? {
                Ok(sent) => return Ok(Some(sent)),
                Err(changed) => {
                    let name = contact.name.clone();
                    let listed = self.listed_from(&name, &changed.devices)?;
                    let contact = contacts.by_id.get_mut(&to).expect("looked up above");
                    let changes = contact.reconcile(&listed, Utc::now());
                    self.profile.save_contacts(contacts)?;
                    if !changes.removed.is_empty() {
                        self.out.warn(&format!(
                            "{name} no longer has device{} {}",
                            if changes.removed.len() == 1 { "" } else { "s" },
                            join_ids(&changes.removed)
                        ));
                    }
                    // A new device or key is refused at the top of the loop, as shown.
                }
            }
        }
        Err(Error::Unavailable(
            "sending: the recipient's devices kept changing; try again".into(),
        ))
    }

    /// Reads the directory's keys of `to` again when one of its devices has no signing key pinned
    /// and the list is older than [`KEYS_FRESH`]: a device that started publishing one
    /// gets version 2 from the next message on.
    fn refresh_signing_keys(&self, to: Uuid, contacts: &mut Contacts) -> Result<(), Error> {
        let Some(contact) = contacts.by_id.get(&to) else {
            return Ok(());
        };
        let now = Utc::now();
        let stale = contact
            .devices_checked_at
            .is_none_or(|at| at + KEYS_FRESH < now);
        if !stale
            || contact
                .sealing_targets()
                .iter()
                .all(|(_, _, s)| s.is_some())
        {
            return Ok(());
        }
        let name = contact.name.clone();
        let (listed, signing) = self.listed_keys(to, &name)?;
        let contact = contacts.by_id.get_mut(&to).expect("looked up above");
        contact.reconcile(&listed, now);
        contact.reconcile_signing(&signing, now);
        Ok(self.profile.save_contacts(contacts)?)
    }

    /// One envelope per target device: version 2 (Olm) to a device whose signing key is pinned,
    /// starting a session from a prekey claimed now (its signature checked against that key)
    /// where there is none; version 1 otherwise. The Olm state is saved before anything is sent.
    fn seal_for(
        &self,
        acct: &Account,
        key: &PrivateKey,
        to: Uuid,
        name: &str,
        pt: &Plaintext,
        targets: &[(u32, PublicKey, Option<String>)],
    ) -> Result<Vec<DeviceEnvelope>, Error> {
        use crate::olm::{DeviceAddress, SigningPublicKey, verify_prekey};
        let v2: Vec<(u32, PublicKey, SigningPublicKey)> = targets
            .iter()
            .filter_map(|(id, k, s)| {
                let s = SigningPublicKey::from_pem(s.as_deref()?).ok()?;
                Some((*id, *k, s))
            })
            .collect();
        let mut device = if v2.is_empty() {
            None
        } else {
            Some(self.olm_device(acct)?)
        };
        if let Some(device) = device.as_mut() {
            let without: Vec<u32> = v2
                .iter()
                .filter(|(id, k, _)| !device.state.has_session(DeviceAddress::new(to, *id), k))
                .map(|(id, _, _)| *id)
                .collect();
            if !without.is_empty() {
                let claimed = self.authed(&format!("claiming {name}'s prekeys"), |api, t| {
                    api.claim_prekeys(t, to, &without)
                })?;
                for (id, k, signing) in v2.iter().filter(|(id, _, _)| without.contains(id)) {
                    let owner = DeviceAddress::new(to, *id);
                    let prekey = claimed
                        .devices
                        .iter()
                        .find(|d| d.device_id == *id && claimed.user_id == to)
                        .and_then(|d| d.prekey.as_ref())
                        .ok_or_else(|| {
                            Error::KeyChanged(format!(
                                "{name}'s device {id} has a signing key pinned but the server \
                                 hands out no prekey for it; nothing was sent (this client does \
                                 not fall back to version 1 once a device uses version 2)"
                            ))
                        })?;
                    let verified = verify_prekey(prekey, owner, signing).map_err(|e| {
                        Error::KeyChanged(format!(
                            "{name}'s device {id}: the claimed prekey is refused ({e}); nothing \
                             was sent"
                        ))
                    })?;
                    device
                        .state
                        .start_session(k, &verified)
                        .map_err(|e| olm_device::olm_error("starting a session", e))?;
                }
            }
        }
        let mut envelopes = Vec::with_capacity(targets.len());
        for (id, device_key, signing) in targets {
            let sealed = match (signing, device.as_mut()) {
                (Some(_), Some(device)) => device
                    .state
                    .encrypt(DeviceAddress::new(to, *id), device_key, pt)
                    .map_err(|e| olm_device::olm_error("sealing", e))?,
                _ => envelope::seal(pt, acct.user_id, key, to, device_key),
            };
            envelopes.push(DeviceEnvelope {
                device_id: *id,
                key_fingerprint: device_key.fingerprint(),
                encrypted_data: base64::engine::general_purpose::STANDARD.encode(&sealed),
            });
        }
        // Every ratchet step taken is on disk before the ciphertext leaves: a crash never
        // seals two messages with one message key.
        if let Some(device) = device.as_mut() {
            self.save_olm(device)?;
        }
        Ok(envelopes)
    }

    /// `POST /messages/devices`, the same body and `Idempotency-Key` on every attempt: a retry
    /// after a lost answer is stored once. Retries timeouts, resets and 5xx with backoff, and
    /// waits out `rate_limited`. `Ok(Err(..))`: 409 `devices_changed`, nothing stored.
    fn post_with_retries(
        &self,
        to: Uuid,
        envelopes: &[DeviceEnvelope],
        idem: &str,
    ) -> Result<Result<(SentToDevices, u32), DevicesChanged>, Error> {
        const ATTEMPTS: u32 = 6;
        let mut attempt = 0;
        let mut waited_for_limit = 0;
        loop {
            attempt += 1;
            match self.call(|api, t| api.send_to_devices(t, to, envelopes, idem)) {
                Ok(sent) => return Ok(Ok((sent, attempt))),
                Err(CallError::Client(e)) => return Err(e),
                Err(CallError::Api(ApiError::DevicesChanged(changed))) => return Ok(Err(changed)),
                Err(CallError::Api(e)) if e.is_transient() && attempt < ATTEMPTS => {
                    let backoff = Duration::from_millis(250 << attempt.min(6));
                    self.out.warn(&format!(
                        "sending: {e}; retrying in {} ms",
                        backoff.as_millis()
                    ));
                    std::thread::sleep(backoff);
                }
                Err(CallError::Api(ApiError::Status {
                    status: 429,
                    ref code,
                    retry_after,
                    ..
                })) if code == "rate_limited" && waited_for_limit < 3 => {
                    waited_for_limit += 1;
                    attempt -= 1;
                    let secs = retry_after.unwrap_or(5).clamp(1, 60);
                    self.out
                        .warn(&format!("sending: rate limited; waiting {secs} s"));
                    std::thread::sleep(Duration::from_secs(secs));
                }
                Err(CallError::Api(e @ ApiError::Status { status: 413, .. })) => {
                    return Err(Error::Usage(format!(
                        "sending: the message is too large ({e})"
                    )));
                }
                Err(CallError::Api(e)) => return Err(self.err(e, "sending")),
            }
        }
    }
}

/// How long a device list is trusted before `send` reads it again (our own, for the copies;
/// a contact's, while one of its devices has no signing key pinned).
pub(super) const KEYS_FRESH: TimeDelta = TimeDelta::minutes(10);

/// "device 1 3f2a 91c0 ..., device 2 ..." for a message to a person.
pub(super) fn describe_devices(devices: &[(u32, PublicKey)]) -> String {
    devices
        .iter()
        .map(|(id, k)| format!("device {id} {}", group_fingerprint(&k.fingerprint())))
        .collect::<Vec<_>>()
        .join(", ")
}

pub(super) fn join_ids(ids: &[u32]) -> String {
    ids.iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// A refused send: what waits for `trust NAME` ([`pending_summary`]), and what to do.
pub(super) fn pending_message(c: &Contact) -> String {
    format!(
        "{}. Nothing was sent. Compare with {} out of band, then run `messenger trust {}`",
        pending_summary(c),
        c.name,
        c.name
    )
}

/// What waits for `trust NAME`, as one line: "NAME: " and each new device, changed key (with
/// its fingerprint) or changed signing key.
pub(super) fn pending_summary(c: &Contact) -> String {
    let mut shown = Vec::new();
    for (id, d) in &c.devices {
        let Some(p) = d.pending.as_ref().filter(|_| d.removed_at.is_none()) else {
            continue;
        };
        shown.push(match d.current() {
            Some(k) => format!(
                "device {id}'s key changed: pinned {}, the directory now has {}",
                group_fingerprint(&k.fingerprint),
                group_fingerprint(&p.fingerprint)
            ),
            None => format!(
                "a new device {id} with key {}",
                group_fingerprint(&p.fingerprint)
            ),
        });
    }
    for (id, d) in &c.devices {
        if let Some(p) = d
            .pending_signing
            .as_ref()
            .filter(|_| d.removed_at.is_none())
        {
            shown.push(match &p.signing_key {
                Some(_) => format!("device {id}'s signing key changed"),
                None => format!(
                    "device {id} no longer shows the signing key pinned for it (version 2 would \
                     stop)"
                ),
            });
        }
    }
    if let Some(p) = &c.pending_account {
        shown.push(format!(
            "the name now belongs to another account (id {}), with key {}",
            p.user_id.unwrap_or_default(),
            group_fingerprint(&p.fingerprint)
        ));
    }
    format!("{}: {}", c.name, shown.join("; "))
}
