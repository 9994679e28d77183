//! `rotate-key`: a new key for this device; the old one kept for messages in flight.

use super::*;

impl App {
    pub fn rotate_key(&self) -> Result<Value, Error> {
        let _lock = self.profile.lock()?;
        self.account()?;
        let now = Utc::now();
        let before = self.keyring()?;
        let new = PrivateKey::generate();
        let mut ring = before.clone();
        ring.prune(now);
        ring.rotate(&new, now);
        // The new private key is on disk before the server publishes it.
        self.profile.save_keyring(&ring)?;
        let pem = new.public_key().to_pem();
        let mut attempt = 0;
        let result = loop {
            attempt += 1;
            match self.call(|api, t| api.update_key(t, &pem)) {
                Err(CallError::Api(e)) if e.is_transient() && attempt < 4 => {
                    std::thread::sleep(Duration::from_millis(500 << attempt));
                }
                r => break r,
            }
        };
        if let Err(e) = result {
            // Not published, or not known to be: the old key stays current, and the new one is
            // kept as retired in case the server did take it.
            let mut back = before;
            back.retired.push(store::RetiredKey {
                key: store::StoredKey::new(&new),
                retired_at: now,
                keep_until: now + MESSAGE_TTL,
            });
            self.profile.save_keyring(&back)?;
            return Err(match e {
                CallError::Api(e) => self.err(e, "publishing the new key"),
                CallError::Client(e) => e,
            });
        }
        // The Olm account follows the device key: a new identity and signing key, the sessions
        // kept (the server dropped the old signing key and prekeys with the re-key), published
        // again below. The old account is kept for `MESSAGE_TTL`: a peer that claimed one of its
        // prekeys before now may still send a pre-key message made from it.
        if let Some(file) = self.profile.olm()? {
            let old_key = before.current.private_key().map_err(Error::Other)?;
            if let Ok(old) = crate::olm::OlmState::from_json(&file.state, &old_key.public_key()) {
                // Retired accounts past `MESSAGE_TTL` are not carried over.
                let (rotated, _) = old
                    .rotate_signing_key(&new, None, now)
                    .map_err(|e| olm_device::olm_error("re-keying the Olm account", e))?;
                self.profile.save_olm(&store::OlmFile {
                    state: rotated.to_json().to_string(),
                    published: false,
                    published_at: None,
                    prekeys_checked_at: None,
                })?;
            }
        }
        // Our own pin for this device follows (our other devices see the change and accept it).
        let acct = self.account()?;
        let mut contacts = self.profile.contacts()?;
        if let Some(pins) = contacts
            .by_id
            .get_mut(&acct.user_id)
            .and_then(|me| me.devices.get_mut(&acct.device_id))
        {
            pins.accept(&new.public_key(), now);
            self.profile.save_contacts(&contacts)?;
        }
        self.publish_prekeys_or_warn(&acct);
        let fp = new.public_key().fingerprint();
        let old = &ring
            .retired
            .last()
            .expect("rotate keeps the old key")
            .key
            .fingerprint;
        self.out
            .say(&format!("new key fingerprint: {}", group_fingerprint(&fp)));
        self.out.say(&format!(
            "the old key {} is kept until {} to open messages already sealed to it",
            group_fingerprint(old),
            human_time(now + MESSAGE_TTL)
        ));
        self.out.say("Your contacts will see the change and must accept it with `messenger trust YOUR_NAME`.");
        Ok(
            json!({"fingerprint": fp, "previous": old, "previous_kept_until": rfc3339(now + MESSAGE_TTL)}),
        )
    }
}
