//! `inbox`: fetch, judge, record, show and confirm this device's messages.

use super::*;

impl App {
    /// Reads the directory's devices of the account `id` once per run and brings its pins up to
    /// them (a first contact is pinned now, trust on first use; a new device or a changed key
    /// is recorded as shown and waits for `trust`). `Err(reason)`: its messages are dropped
    /// (no such account and nothing pinned, or a directory answer that cannot be used for a
    /// contact never pinned). A change to the contacts is on disk before its note is shown.
    fn refresh_sender(
        &self,
        id: Uuid,
        contacts: &mut Contacts,
        notes: &mut Vec<String>,
        now: DateTime<Utc>,
    ) -> Result<Result<(), String>, Error> {
        let listed = match self.call(|api, t| api.device_keys(t, id)) {
            Ok(l) if l.user_id == id => Some(self.keys_from("its sender", id, &l.devices)),
            Ok(l) => Some(Err(Error::Other(format!(
                "the directory answered the device list of its sender {id} with another \
                 account's ({})",
                l.user_id
            )))),
            Err(CallError::Api(e)) if e.status() == Some(404) => None,
            Err(CallError::Api(e)) => return Err(self.err(e, "reading a sender's devices")),
            Err(CallError::Client(e)) => return Err(e),
        };
        let mut note = None;
        let outcome = match (contacts.by_id.get_mut(&id), listed) {
            (Some(c), Some(Ok((listed, signing)))) => {
                let mut changes = c.reconcile(&listed, now);
                changes.signing_changed = c.reconcile_signing(&signing, now);
                if changes.needs_trust() {
                    note = Some(format!(
                        "{}. Compare with {} out of band, then run `messenger trust {}`; \
                         messages sealed with keys not accepted are held until then",
                        send::pending_summary(c),
                        c.name,
                        c.name
                    ));
                } else {
                    note = Some(String::new()); // recorded, nothing to say
                }
                Ok(())
            }
            (Some(c), Some(Err(e))) => {
                note = Some(format!(
                    "{}: {e}; only the keys pinned for {} open its messages",
                    c.name, c.name
                ));
                Ok(())
            }
            // No such account any more: what is pinned still opens what it sent.
            (Some(_), None) => Ok(()),
            (None, None) => Err("its sender's account does not exist".to_string()),
            (None, Some(Err(e))) => Err(format!("{e}; it is not pinned")),
            (None, Some(Ok((listed, signing)))) => {
                let dir = match self.call(|api, t| api.public_key(t, id)) {
                    Ok(d) if d.user_id == id => d,
                    Ok(d) => {
                        return Ok(Err(format!(
                            "the directory answered the lookup of its sender {id} with another \
                             account ({})",
                            d.user_id
                        )));
                    }
                    Err(CallError::Api(e)) if e.status() == Some(404) => {
                        return Ok(Err("its sender's account does not exist".into()));
                    }
                    Err(CallError::Api(e)) => {
                        return Err(self.err(e, "looking up a sender's key"));
                    }
                    Err(CallError::Client(e)) => return Err(e),
                };
                let primary = PublicKey::from_pem(&dir.public_key).ok();
                if listed.iter().find(|(d, _)| *d == 1).map(|(_, k)| *k) != primary {
                    Err(
                        "the directory's device 1 of its sender is not the account's key it \
                         shows; nothing is pinned"
                            .to_string(),
                    )
                } else if let Some((old, _)) = contacts.find_name(&dir.name) {
                    // The name was freed and taken again: a new account, not the one pinned. Its
                    // key is recorded as the pending change of that name, for `trust` to accept.
                    let fp = primary.map(|k| k.fingerprint()).unwrap_or_default();
                    if let Some(c) = contacts.by_id.get_mut(&old)
                        && let Some(k) = primary
                    {
                        c.pending_account = Some(PendingKey::new(&k, Some(id), now));
                    }
                    note = Some(format!(
                        "{} (id {}) is not the {} you pinned (id {}): its key is {}; its messages \
                         are held until you compare it with them and run `messenger trust {}`",
                        dir.name,
                        id,
                        dir.name,
                        old,
                        group_fingerprint(&fp),
                        dir.name
                    ));
                    Ok(())
                } else {
                    note = Some(format!(
                        "first contact with {}: pinned {} (compare with {} out of band)",
                        dir.name,
                        send::describe_devices(&listed),
                        dir.name
                    ));
                    let mut contact = Contact::new(&dir.name, &listed, now);
                    contact.reconcile_signing(&signing, now);
                    contacts.by_id.insert(id, contact);
                    Ok(())
                }
            }
        };
        if let Some(note) = note {
            // Recorded first, shown second: a pending key is always one the user was shown.
            self.profile.save_contacts(contacts)?;
            if !note.is_empty() {
                self.out.warn(&note);
                notes.push(note);
            }
        }
        Ok(outcome)
    }

    /// Who sent a message from `device` of the account `id`, as pinned: the keys that open its
    /// messages, and the key shown for it and not accepted yet (its messages are then held).
    /// The directory is read once per account per run ([`Self::refresh_sender`]).
    fn sender(
        &self,
        (id, device): (Uuid, u32),
        contacts: &mut Contacts,
        refreshed: &mut HashMap<Uuid, Result<(), String>>,
        notes: &mut Vec<String>,
        now: DateTime<Utc>,
    ) -> Result<Result<Sender, String>, Error> {
        if let std::collections::hash_map::Entry::Vacant(entry) = refreshed.entry(id) {
            entry.insert(self.refresh_sender(id, contacts, notes, now)?);
        }
        if let Err(reason) = &refreshed[&id] {
            return Ok(Err(reason.clone()));
        }
        // A new account under a pinned contact's name: held until `trust` accepts it.
        if let Some((c, p)) = contacts.by_id.values().find_map(|c| {
            let p = c.pending_account.as_ref()?;
            (p.user_id == Some(id)).then_some((c, p))
        }) {
            return Ok(Ok(Sender {
                name: format!("{} (new account)", c.name),
                keys: Vec::new(),
                changed_to: Some(p.fingerprint.clone()),
                v2_since: None,
            }));
        }
        let Some(c) = contacts.by_id.get(&id) else {
            return Ok(Err("its sender is not pinned".into()));
        };
        let Some(pins) = c.devices.get(&device) else {
            return Ok(Err(format!(
                "it comes from a device of {} (device {device}) that the directory does not \
                 list and that was never pinned",
                c.name
            )));
        };
        Ok(Ok(Sender {
            name: c.name.clone(),
            keys: pins.opening_keys(now),
            changed_to: pins.pending.as_ref().map(|p| p.fingerprint.clone()),
            v2_since: pins.signing.as_ref().map(|s| s.pinned_at),
        }))
    }

    /// Opens a version 2 (Olm) message from the sender's pinned identity key(s) for that device.
    /// The Olm state is saved before the verdict is recorded or shown. One that does not open
    /// is reported, and our next message to that device starts a new session.
    fn judge_v2(
        &self,
        m: &Message,
        sender: &Sender,
        state: &InboxState,
        now: DateTime<Utc>,
    ) -> Result<Verdict, Error> {
        use crate::olm::{DeviceAddress, OlmError};
        let Ok(bytes) =
            base64::engine::general_purpose::STANDARD.decode(m.encrypted_data.as_bytes())
        else {
            return Ok(Verdict::Dropped {
                reason: "its encrypted_data is not base64".into(),
            });
        };
        // A byte-for-byte replay of an envelope already opened: its message key is gone, so it
        // would not open anyway; said as what it is, and no session is disturbed by it.
        let envelope = envelope_seen_key(&bytes);
        if state.seen.contains_key(&envelope) {
            return Ok(Verdict::Dropped {
                reason: format!(
                    "it replays message {}, already shown (the same version 2 envelope)",
                    &envelope["envelope/".len()..][..16]
                ),
            });
        }
        let acct = self.account()?;
        let mut slot = self.olm.borrow_mut();
        if slot.is_none() {
            *slot = Some(self.olm_device(&acct)?);
        }
        let device = slot.as_mut().expect("loaded above");
        let from = DeviceAddress::new(m.sender_id, m.sender_device_id);
        let mut result = Err(OlmError::IdentityKeyMismatch);
        for key in &sender.keys {
            result = device.state.decrypt(&bytes, from, key);
            if !matches!(
                result,
                Err(OlmError::IdentityKeyMismatch | OlmError::NoSession)
            ) {
                break;
            }
        }
        let verdict = match result {
            Ok(opened) => {
                if opened.new_session {
                    // A one-time key is used up: read the server's count at the end of this run.
                    device.file.prekeys_checked_at = None;
                }
                inbox::judge_opened(m, opened.plaintext, sender, state, now)
            }
            Err(OlmError::IdentityKeyMismatch | OlmError::NoSession)
                if sender.changed_to.is_some() =>
            {
                Verdict::Held {
                    new_fingerprint: sender.changed_to.clone().unwrap_or_default(),
                }
            }
            Err(e) => {
                device.state.forget_sessions(from);
                Verdict::Dropped {
                    reason: format!(
                        "the version 2 envelope does not open with the key pinned for {} ({e}); \
                         your next message to that device starts a new session",
                        sender.name
                    ),
                }
            }
        };
        self.save_olm(device)?;
        Ok(verdict)
    }

    /// Confirms delivery, in batches of 500 (`POST /messages/delivered`), or one by one on a
    /// server without the batch endpoint.
    fn confirm(&self, ids: &[Uuid]) -> Result<(), Error> {
        for chunk in ids.chunks(500) {
            if self.batch_confirm.get() {
                match self.call(|api, t| api.confirm_many(t, chunk)) {
                    Ok(_) => continue,
                    Err(CallError::Api(e)) if matches!(e.status(), Some(404 | 405)) => {
                        self.batch_confirm.set(false);
                    }
                    Err(CallError::Api(e)) => return Err(self.err(e, "confirming delivery")),
                    Err(CallError::Client(e)) => return Err(e),
                }
            }
            for id in chunk {
                match self.call(|api, t| api.confirm_one(t, *id)) {
                    Ok(()) => {}
                    Err(CallError::Api(e)) if e.status() == Some(404) => {}
                    Err(CallError::Api(e)) => return Err(self.err(e, "confirming delivery")),
                    Err(CallError::Client(e)) => return Err(e),
                }
            }
        }
        Ok(())
    }

    pub fn inbox(&self, limit: u32, follow: Option<Duration>) -> Result<Value, Error> {
        if !(1..=500).contains(&limit) {
            return Err(Error::Usage("--limit is 1 to 500".into()));
        }
        let mut first = true;
        loop {
            let report = self.inbox_once(limit, first)?;
            first = false;
            let Some(every) = follow else {
                return Ok(report);
            };
            if self.out.json {
                println!("{}", json_line(&report));
            }
            std::thread::sleep(every);
        }
    }

    fn inbox_once(&self, limit: u32, say_empty: bool) -> Result<Value, Error> {
        let _lock = self.profile.lock()?;
        let acct = self.account()?;
        // Prekeys published (or topped up, at most hourly) before the state is loaded below.
        self.olm.borrow_mut().take();
        self.publish_prekeys_or_warn(&acct);
        let now = Utc::now();
        let mut ring = self.keyring()?;
        if ring.prune(now) {
            self.profile.save_keyring(&ring)?;
        }
        let my_keys = ring.opening_keys(now).map_err(Error::Other)?;
        let mut contacts = self.profile.contacts()?;
        for c in contacts.by_id.values_mut() {
            c.prune(now);
        }
        let mut state = self.profile.inbox()?;
        state.prune(now);
        if !state.unconfirmed.is_empty() {
            self.confirm(&state.unconfirmed)?;
            state.unconfirmed.clear();
            self.profile.save_inbox(&state)?;
        }

        let mut report = Report::default();
        let mut refreshed = HashMap::new();
        // Held messages first: the sender's key may have been accepted since. Each stays in
        // `state.held` until it is shown or dropped, so the state saved at any point is whole.
        for held in state.held.clone() {
            if held.message.expires_at <= now {
                state.held.retain(|h| h.message.id != held.message.id);
                report.drop(
                    &held.message,
                    "?",
                    "it expired while held: its sender's key was never accepted",
                );
                continue;
            }
            self.judge_one(
                held.message,
                acct.user_id,
                acct.device_id,
                &my_keys,
                &mut contacts,
                &mut refreshed,
                &mut state,
                &mut report,
                now,
                Some(held.held_at),
            )?;
        }
        self.profile.save_contacts(&contacts)?;
        self.profile.save_inbox(&state)?;

        loop {
            let page = self.authed("reading the inbox", |api, t| {
                api.messages(t, state.cursor, limit)
            })?;
            let received = page.messages.len();
            for m in page.messages {
                // Each message is recorded (the cursor past it, its delivery to confirm, its id
                // as seen) before it is shown: a failure later in the page shows nothing twice.
                self.judge_one(
                    m,
                    acct.user_id,
                    acct.device_id,
                    &my_keys,
                    &mut contacts,
                    &mut refreshed,
                    &mut state,
                    &mut report,
                    now,
                    None,
                )?;
            }
            // Recorded first, confirmed second: a crash between the two confirms on the next run
            // and shows nothing twice.
            self.profile.save_contacts(&contacts)?;
            self.profile.save_inbox(&state)?;
            if !state.unconfirmed.is_empty() {
                self.confirm(&state.unconfirmed)?;
                state.unconfirmed.clear();
                self.profile.save_inbox(&state)?;
            }
            if !page.has_more || received == 0 {
                break;
            }
        }
        // A session made from one of our one-time keys: top up now if the stock runs low.
        let used = self.olm.borrow_mut().take();
        if used.is_some_and(|d| d.file.prekeys_checked_at.is_none()) {
            self.publish_prekeys_or_warn(&acct);
        }
        if say_empty
            && report.shown.is_empty()
            && report.dropped.is_empty()
            && report.held.is_empty()
        {
            self.out.say("no new messages");
        }
        Ok(
            json!({"messages": report.shown, "dropped": report.dropped, "held": report.held,
                  "notes": report.notes}),
        )
    }

    /// Judges one message, records the outcome on disk, then shows it. `held_since`: a message
    /// held by an earlier run (still in `state.held`); `None`: one of the page just received.
    #[allow(clippy::too_many_arguments)]
    fn judge_one(
        &self,
        m: Message,
        me: Uuid,
        me_device: u32,
        my_keys: &[PrivateKey],
        contacts: &mut Contacts,
        refreshed: &mut HashMap<Uuid, Result<(), String>>,
        state: &mut InboxState,
        report: &mut Report,
        now: DateTime<Utc>,
        held_since: Option<DateTime<Utc>>,
    ) -> Result<(), Error> {
        let sender = self.sender(
            (m.sender_id, m.sender_device_id),
            contacts,
            refreshed,
            &mut report.notes,
            now,
        )?;
        let verdict = match &sender {
            Ok(_) if m.recipient_device_id != me_device => Verdict::Dropped {
                reason: format!(
                    "it is addressed to another device (device {}; this is device {me_device})",
                    m.recipient_device_id
                ),
            },
            Ok(sender) if envelope_version(&m) == Some(crate::olm::FORMAT_VERSION) => {
                self.judge_v2(&m, sender, state, now)?
            }
            // A downgrade: version 1 from a device that speaks version 2 to a device (this one)
            // whose keys it could have read by then (a sender reads keys it lacks at least every
            // `send::KEYS_FRESH`).
            Ok(sender)
                if envelope_version(&m) == Some(1)
                    && sender.v2_since.is_some_and(|since| m.timestamp > since)
                    && self
                        .profile
                        .olm()?
                        .and_then(|o| o.published_at)
                        .is_some_and(|at| m.timestamp > at + send::KEYS_FRESH) =>
            {
                Verdict::Dropped {
                    reason: format!(
                        "it is a version 1 message from a device of {} that uses version 2 (a \
                         downgrade): refused",
                        sender.name
                    ),
                }
            }
            Ok(sender) => inbox::judge(&m, me, my_keys, sender, state, now),
            Err(reason) => Verdict::Dropped {
                reason: reason.clone(),
            },
        };
        let name = sender
            .as_ref()
            .map(|s| s.name.clone())
            .unwrap_or_else(|_| "?".into());

        // What is done with the message, on disk before anything about it is shown.
        match (&verdict, held_since) {
            (Verdict::Shown(pt), _) => {
                inbox::remember(state, m.sender_id, pt, now);
                if envelope_version(&m) == Some(crate::olm::FORMAT_VERSION)
                    && let Ok(bytes) = base64::engine::general_purpose::STANDARD
                        .decode(m.encrypted_data.as_bytes())
                {
                    let until = state.seen[&InboxState::seen_key(m.sender_id, pt.id)];
                    state.seen.insert(envelope_seen_key(&bytes), until);
                }
            }
            (Verdict::Held { .. }, None) => state.held.push(Held {
                held_at: now,
                message: m.clone(),
            }),
            (Verdict::Held { .. }, Some(_)) => {}
            (Verdict::Dropped { .. }, _) => {}
        }
        match held_since {
            None => {
                state.cursor = Some(m.id);
                state.unconfirmed.push(m.id);
            }
            Some(_) if !matches!(verdict, Verdict::Held { .. }) => {
                state.held.retain(|h| h.message.id != m.id);
            }
            Some(_) => {}
        }
        self.profile.save_inbox(state)?;

        match verdict {
            Verdict::Shown(pt) => {
                // A copy from another device of ours: "you (device 2) to bob".
                let to = pt.sent_to.filter(|_| m.sender_id == me).map(|to| {
                    contacts
                        .by_id
                        .get(&to)
                        .map(|c| c.name.clone())
                        .unwrap_or_else(|| to.to_string())
                });
                let name = if m.sender_id == me {
                    let mut you = format!("you (device {})", m.sender_device_id);
                    if let Some(to) = &to {
                        you.push_str(&format!(" to {to}"));
                    }
                    you
                } else {
                    name
                };
                let shown_name = escape_controls(&name);
                let mut lines = pt.text.lines();
                let first = lines.next().unwrap_or("");
                self.out.say(&format!(
                    "{}  {}: {}",
                    human_time(pt.sent_at),
                    shown_name,
                    first
                ));
                for more in lines {
                    self.out.say(&format!(
                        "{:width$}{}",
                        "",
                        more,
                        width = 25 + shown_name.chars().count()
                    ));
                }
                report
                    .shown
                    .push(json!({"id": m.id, "message_id": pt.id, "from": name,
                    "from_id": m.sender_id, "from_device": m.sender_device_id,
                    "sent_to": pt.sent_to.filter(|_| m.sender_id == me), "to": to,
                    "sent_at": rfc3339(pt.sent_at),
                    "received_at": rfc3339(m.timestamp), "text": pt.text}));
            }
            Verdict::Held { new_fingerprint } => {
                let contact = name.trim_end_matches(" (new account)");
                let line = format!(
                    "held message {} from {}: sealed with a key that is not pinned for {} (the \
                     directory now has {}); not opened. Compare it with {}, then `messenger trust {}` \
                     and `messenger inbox`",
                    m.id,
                    name,
                    name,
                    group_fingerprint(&new_fingerprint),
                    contact,
                    contact
                );
                self.out.say(&line);
                report
                    .held
                    .push(json!({"id": m.id, "from": name, "from_id": m.sender_id,
                    "new_fingerprint": new_fingerprint, "reason": line}));
            }
            Verdict::Dropped { reason } => {
                report.drop(&m, &name, &reason);
                self.out.say(&format!(
                    "dropped message {} from {}: {}",
                    m.id, name, reason
                ));
            }
        }
        Ok(())
    }
}

#[derive(Default)]
struct Report {
    shown: Vec<Value>,
    dropped: Vec<Value>,
    held: Vec<Value>,
    notes: Vec<String>,
}

impl Report {
    fn drop(&mut self, m: &Message, from: &str, reason: &str) {
        self.dropped
            .push(json!({"id": m.id, "from": from, "from_id": m.sender_id, "reason": reason}));
    }
}

/// The first byte of a message's envelope, if it has one.
fn envelope_version(m: &Message) -> Option<u8> {
    let head: String = m.encrypted_data.chars().take(4).collect();
    base64::engine::general_purpose::STANDARD
        .decode(head.as_bytes())
        .ok()?
        .first()
        .copied()
}

/// The replay record's key for a version 2 envelope: SHA-256 of its bytes.
fn envelope_seen_key(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    format!(
        "envelope/{}",
        crate::keys::hex(&sha2::Sha256::digest(bytes))
    )
}
