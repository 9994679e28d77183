//! `register` and `login`: a new account on this device, a fresh token.

use super::*;

impl App {
    pub fn register(&self, name: &str) -> Result<Value, Error> {
        if !valid_user_name(name) {
            return Err(Error::Usage(format!(
                "{name:?}: a name is 3 to 32 characters of A-Z a-z 0-9 _ . -"
            )));
        }
        let _lock = self.profile.lock()?;
        let key = self.new_device_key()?;
        let password = self.password(&format!("Choose a password for {name}: "), true)?;
        if !(8..=72).contains(&password.len()) {
            return Err(Error::Usage("a password is 8 to 72 bytes".into()));
        }
        let pem = key.public_key().to_pem();
        let acct = self
            .api
            .register(name, &password, &pem)
            .map_err(|e| self.err(e, "registering"))?;
        self.profile.save_account(&Account {
            api: self.api.base().to_string(),
            name: acct.name.clone(),
            user_id: acct.id,
            device_id: 1,
            registered_at: acct.created_at,
        })?;
        // Our own account is a contact too (its devices are pinned like anyone's); device 1 is
        // this one.
        let mut contacts = self.profile.contacts()?;
        contacts.by_id.insert(
            acct.id,
            Contact::new(&acct.name, &[(1, key.public_key())], Utc::now()),
        );
        self.profile.save_contacts(&contacts)?;
        let fp = key.public_key().fingerprint();
        // A token now, so that the next commands need not ask for the password.
        if let Err(e) = self.login_as(&acct.name, &password, 1) {
            self.out
                .warn(&format!("registered, but logging in failed: {e}"));
        }
        if self.profile.token()?.is_some() {
            self.publish_prekeys_or_warn(&self.account()?);
        }
        self.out.say(&format!(
            "registered {} (id {}) at {}",
            acct.name,
            acct.id,
            self.api.base()
        ));
        self.out
            .say(&format!("your key fingerprint: {}", group_fingerprint(&fp)));
        self.out
            .say("Your contacts can compare it with what `messenger contacts` shows them.");
        Ok(
            json!({"id": acct.id, "name": acct.name, "fingerprint": fp, "api": self.api.base(),
                  "profile": self.profile.name}),
        )
    }

    pub fn login(&self) -> Result<Value, Error> {
        let _lock = self.profile.lock()?;
        self.login_fresh()?;
        let t = self
            .profile
            .token()?
            .ok_or_else(|| Error::Other("token not saved".into()))?;
        let acct = self.account()?;
        self.out.say(&format!(
            "logged in as {} until {}",
            acct.name,
            human_time(t.expires_at)
        ));
        Ok(json!({"name": acct.name, "expires_at": rfc3339(t.expires_at)}))
    }

    /// For `register` and `join`: an empty profile (else a usage error naming what it holds),
    /// and this device's key, on disk before the server hears of it (a leftover from an
    /// attempt that failed is reused).
    pub(super) fn new_device_key(&self) -> Result<PrivateKey, Error> {
        if let Some(a) = self.profile.account()? {
            return Err(Error::Usage(format!(
                "profile {:?} already holds the account {} ({}); use --profile NAME for another account",
                self.profile.name, a.name, a.api
            )));
        }
        let ring = match self.profile.keyring()? {
            Some(r) => r,
            None => {
                let r = Keyring::new(&PrivateKey::generate());
                self.profile.save_keyring(&r)?;
                r
            }
        };
        ring.current.private_key().map_err(Error::Other)
    }
}
