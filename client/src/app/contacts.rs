//! `contacts`: the pinned contacts, each device's key fingerprint, and what waits for `trust`.

use super::*;

impl App {
    pub fn contacts(&self) -> Result<Value, Error> {
        let _lock = self.profile.lock()?;
        let acct = self.account()?;
        let now = Utc::now();
        let contacts = self.profile.contacts()?;
        let mut list = Vec::new();
        if contacts.by_id.iter().all(|(id, _)| *id == acct.user_id) {
            self.out.say("no contacts yet");
        }
        for (id, c) in &contacts.by_id {
            let you = if *id == acct.user_id { " (you)" } else { "" };
            let primary = c.primary().map(|k| k.fingerprint.clone());
            self.out.say(&format!(
                "{}{you}  {}",
                c.name,
                primary
                    .as_deref()
                    .map(group_fingerprint)
                    .unwrap_or_default()
            ));
            self.out.say(&format!("    id {id}"));
            let mut devices = Vec::new();
            for (device, pins) in &c.devices {
                let this = if *id == acct.user_id && *device == acct.device_id {
                    " (this device)"
                } else {
                    ""
                };
                if let Some(k) = pins.current() {
                    let removed = pins
                        .removed_at
                        .map(|at| format!(", removed {}", human_time(at)))
                        .unwrap_or_default();
                    self.out.say(&format!(
                        "    device {device}{this}  {}  pinned {}{removed}",
                        group_fingerprint(&k.fingerprint),
                        human_time(k.pinned_at)
                    ));
                }
                let earlier: Vec<Value> = pins.keys[..pins.keys.len().saturating_sub(1)]
                    .iter()
                    .filter_map(|k| {
                        let until = k.replaced_at? + MESSAGE_TTL;
                        (until > now).then(|| {
                            self.out.say(&format!(
                                "        earlier key {} still opens messages until {}",
                                group_fingerprint(&k.fingerprint),
                                human_time(until)
                            ));
                            json!({"fingerprint": k.fingerprint, "opens_until": rfc3339(until)})
                        })
                    })
                    .collect();
                if let Some(p) = &pins.pending {
                    let what = if pins.keys.is_empty() {
                        format!("NEW DEVICE {device}")
                    } else {
                        format!("    KEY CHANGED on device {device}:")
                    };
                    self.out.say(&format!(
                        "    {} the directory has {} (seen {}); `messenger trust {}` accepts it",
                        what.trim_start(),
                        group_fingerprint(&p.fingerprint),
                        human_time(p.seen_at),
                        c.name
                    ));
                }
                devices.push(json!({"device_id": device,
                    "fingerprint": pins.current().map(|k| k.fingerprint.clone()),
                    "pinned_at": pins.current().map(|k| rfc3339(k.pinned_at)),
                    "earlier": earlier, "removed_at": pins.removed_at.map(rfc3339),
                    "pending": pins.pending.as_ref().map(|p| json!({"fingerprint": p.fingerprint,
                        "seen_at": rfc3339(p.seen_at)}))}));
            }
            if let Some(p) = &c.pending_account {
                self.out.say(&format!(
                    "    KEY CHANGED: the name now belongs to another account (id {}) with key {} \
                     (seen {}); `messenger trust {}` accepts this account",
                    p.user_id.unwrap_or_default(),
                    group_fingerprint(&p.fingerprint),
                    human_time(p.seen_at),
                    c.name
                ));
            }
            list.push(json!({"id": id, "name": c.name, "fingerprint": primary, "you": !you.is_empty(),
                "devices": devices,
                "pending_account": c.pending_account.as_ref().map(|p| json!({"fingerprint": p.fingerprint,
                    "seen_at": rfc3339(p.seen_at), "user_id": p.user_id}))}));
        }
        Ok(json!({"contacts": list}))
    }
}
