//! `whoami`: this profile's account, device and key, checked against the server.

use super::*;

impl App {
    pub fn whoami(&self) -> Result<Value, Error> {
        let _lock = self.profile.lock()?;
        let acct = self.account()?;
        let ring = self.keyring()?;
        let me = self.authed("reading your account", |api, t| api.me(t))?;
        let local = ring.current.fingerprint.clone();
        // `GET /me` shows device 1's key; any other device reads its own from its list.
        let published = if acct.device_id == 1 {
            PublicKey::from_pem(&me.public_key)
                .map(|k| k.fingerprint())
                .ok()
        } else {
            self.authed("reading your devices", |api, t| api.my_devices(t))?
                .devices
                .into_iter()
                .find(|d| d.device_id == acct.device_id)
                .and_then(|d| PublicKey::from_pem(&d.public_key).ok())
                .map(|k| k.fingerprint())
        };
        self.out.say(&format!(
            "{} (id {}) at {}, device {}",
            me.name,
            me.id,
            self.api.base(),
            acct.device_id
        ));
        self.out
            .say(&format!("key fingerprint: {}", group_fingerprint(&local)));
        self.out.say(&format!(
            "registered {}, key updated {}",
            human_time(me.created_at),
            me.key_updated_at
                .map(human_time)
                .unwrap_or_else(|| "never".into())
        ));
        if !ring.retired.is_empty() {
            for r in &ring.retired {
                self.out.say(&format!(
                    "retired key {} kept until {}",
                    group_fingerprint(&r.key.fingerprint),
                    human_time(r.keep_until)
                ));
            }
        }
        let result = json!({"id": me.id, "name": me.name, "api": self.api.base(), "device_id": acct.device_id, "fingerprint": local,
            "published_fingerprint": published, "created_at": me.created_at,
            "key_updated_at": me.key_updated_at, "profile": self.profile.name});
        if me.id != acct.user_id || published.as_deref() != Some(local.as_str()) {
            let hint = if ring
                .retired
                .iter()
                .any(|r| Some(&r.key.fingerprint) == published.as_ref())
            {
                " (an interrupted rotate-key: run `messenger rotate-key` again)"
            } else {
                ""
            };
            return Err(Error::KeyChanged(format!(
                "the server lists the key {} for you, but your current key is {}{hint}",
                published
                    .map(|f| group_fingerprint(&f))
                    .unwrap_or_else(|| "(not X25519)".into()),
                group_fingerprint(&local)
            )));
        }
        Ok(result)
    }
}
