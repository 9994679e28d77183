//! The commands of the `messenger` CLI, on one profile and one API.

use crate::api::{Api, ApiError, Directory, Message};
use crate::envelope::{self, Plaintext};
use crate::inbox::{self, Sender, Verdict};
use crate::keys::{PrivateKey, PublicKey, group_fingerprint};
use crate::store::{
    self, Account, CachedToken, Contact, Contacts, Held, InboxState, Keyring, MESSAGE_TTL,
    PendingKey, Profile, StoreError,
};
use base64::Engine as _;
use chrono::{DateTime, SecondsFormat, TimeDelta, Utc};
use serde_json::{Value, json};
use std::cell::Cell;
use std::collections::HashMap;
use std::io::{IsTerminal, Read};
use std::time::Duration;
use uuid::Uuid;
use zeroize::Zeroizing;

pub const DEFAULT_API: &str = "http://127.0.0.1:9000";

/// A failed command. Its message is for a person, and never holds a password, a token, a
/// private key or a plaintext. Each kind has its own exit status.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// 2: the command line or a value given on it.
    #[error("{0}")]
    Usage(String),
    /// 3: no password, a wrong one, or a token the server refused.
    #[error("{0}")]
    Auth(String),
    /// 4: no such user, or no account in this profile.
    #[error("{0}")]
    NotFound(String),
    /// 5: a contact's key is not the pinned one (or ours is not what the server lists):
    /// refused until `messenger trust NAME`.
    #[error("{0}")]
    KeyChanged(String),
    /// 6: the API cannot be reached or failed (timeouts, 5xx, 503).
    #[error("{0}")]
    Unavailable(String),
    /// 7: rate limited, or the recipient's mailbox is full.
    #[error("{0}")]
    Limited(String),
    /// 8: the name is taken.
    #[error("{0}")]
    Conflict(String),
    /// 1: anything else (the profile's files, an unexpected answer).
    #[error("{0}")]
    Other(String),
}

impl Error {
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Other(_) => 1,
            Error::Usage(_) => 2,
            Error::Auth(_) => 3,
            Error::NotFound(_) => 4,
            Error::KeyChanged(_) => 5,
            Error::Unavailable(_) => 6,
            Error::Limited(_) => 7,
            Error::Conflict(_) => 8,
        }
    }
}

impl From<StoreError> for Error {
    fn from(e: StoreError) -> Self {
        Error::Other(e.to_string())
    }
}

/// The end of `--help`: the password, and the exit statuses (the README lists the same).
pub const HELP_FOOTER: &str = "\
The password is read from MESSENGER_PASSWORD, else asked on the terminal; it is never stored.
Profiles live in $MESSENGER_HOME/NAME, else $XDG_CONFIG_HOME/messenger/NAME (~/.config/...).

Exit status:
  0  success (inbox: also when it refused messages; each refusal is one line)
  1  other error (the profile's files, an unexpected answer)
  2  usage error
  3  authentication: no password available, wrong name or password, token refused
  4  not found: no such user, or no account in this profile
  5  key changed: a contact's key differs from the pinned one; nothing was sent
     (check the fingerprint with them, then `messenger trust NAME`)
  6  the API is unreachable or failing (after retries)
  7  rate limited, or the recipient's mailbox is full (try later)
  8  the name is already taken";

fn api_error(e: ApiError, doing: &str, api: &str) -> Error {
    let status = e.status();
    let code = e.code().unwrap_or("").to_string();
    match (&e, status) {
        (ApiError::Transport { .. }, _) => Error::Unavailable(format!(
            "{doing}: {e}; is the API at {api} up? (--api or MESSENGER_API)"
        )),
        (_, Some(401)) if code == "invalid_credentials" => {
            Error::Auth(format!("{doing}: wrong name or password"))
        }
        (_, Some(401)) => Error::Auth(format!("{doing}: the server refused the token ({e})")),
        (_, Some(404)) => Error::NotFound(format!("{doing}: {e}")),
        (_, Some(409)) => Error::Conflict(format!("{doing}: {e}")),
        (ApiError::Status { retry_after, .. }, Some(429)) => Error::Limited(format!(
            "{doing}: {e}{}",
            retry_after
                .map(|s| format!(" (retry after {s} s)"))
                .unwrap_or_default()
        )),
        (_, Some(s)) if s >= 500 => Error::Unavailable(format!("{doing}: {e}")),
        _ => Error::Other(format!("{doing}: {e}")),
    }
}

/// A call that needs a token: either the API said no, or getting a token failed.
enum CallError {
    Api(ApiError),
    Client(Error),
}

/// Where the command's human output goes; `--json` silences it (the JSON result says it all).
#[derive(Debug, Clone, Copy)]
pub struct Output {
    pub json: bool,
}

impl Output {
    pub fn say(&self, line: &str) {
        if !self.json {
            println!("{line}");
        }
    }
    /// Warnings and notices: always on stderr.
    pub fn warn(&self, line: &str) {
        eprintln!("{line}");
    }
}

pub struct App {
    pub profile: Profile,
    pub api: Api,
    pub out: Output,
    batch_confirm: Cell<bool>,
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

fn human_time(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%S UTC").to_string()
}

/// The API's name rule, checked before anything is sent.
pub fn valid_user_name(name: &str) -> bool {
    (3..=32).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
}

impl App {
    /// `api`: `--api`/`MESSENGER_API` when given, else the one the profile registered with,
    /// else [`DEFAULT_API`].
    pub fn new(profile_name: &str, api: Option<&str>, out: Output) -> Result<App, Error> {
        let root = store::profiles_root()?;
        let profile = Profile::at(&root, profile_name).map_err(|e| Error::Usage(e.to_string()))?;
        let base = match api {
            Some(a) => a.to_string(),
            None => profile
                .account()
                .ok()
                .flatten()
                .map(|a| a.api)
                .unwrap_or_else(|| DEFAULT_API.into()),
        };
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(Error::Usage(format!(
                "--api {base:?}: expected an http:// or https:// URL"
            )));
        }
        if base.starts_with("http://") && !is_loopback(&base) {
            out.warn(&format!(
                "warning: {base} is not HTTPS: your password and token would cross the network in clear"
            ));
        }
        Ok(App {
            profile,
            api: Api::new(&base),
            out,
            batch_confirm: Cell::new(true),
        })
    }

    fn account(&self) -> Result<Account, Error> {
        self.profile.account()?.ok_or_else(|| {
            Error::NotFound(format!(
                "profile {:?} holds no account: `messenger register NAME` first (or --profile)",
                self.profile.name
            ))
        })
    }

    fn keyring(&self) -> Result<Keyring, Error> {
        self.profile
            .keyring()?
            .ok_or_else(|| Error::Other(format!("profile {:?} has no key file", self.profile.name)))
    }

    fn err(&self, e: ApiError, doing: &str) -> Error {
        api_error(e, doing, self.api.base())
    }

    /// The password, from `MESSENGER_PASSWORD` or asked on the terminal; never stored.
    fn password(&self, prompt: &str, confirm: bool) -> Result<Zeroizing<String>, Error> {
        if let Some(p) = std::env::var_os("MESSENGER_PASSWORD") {
            return p
                .into_string()
                .map(Zeroizing::new)
                .map_err(|_| Error::Usage("MESSENGER_PASSWORD is not UTF-8".into()));
        }
        let ask = |prompt: &str| {
            rpassword::prompt_password(prompt)
                .map(Zeroizing::new)
                .map_err(|_| {
                    Error::Auth(
                        "a password is needed: run on a terminal, or set MESSENGER_PASSWORD".into(),
                    )
                })
        };
        let p = ask(prompt)?;
        if confirm && *ask("Again: ")? != *p {
            return Err(Error::Usage("the two passwords differ".into()));
        }
        Ok(p)
    }

    /// A fresh token, by logging in (password from the environment or the terminal).
    fn login_fresh(&self) -> Result<String, Error> {
        let acct = self.account()?;
        let pw = self.password(
            &format!("Password for {} at {}: ", acct.name, self.api.base()),
            false,
        )?;
        self.login_with(&acct.name, &pw)
    }

    fn login_with(&self, name: &str, password: &str) -> Result<String, Error> {
        let tok = self
            .api
            .login(name, password)
            .map_err(|e| self.err(e, "logging in"))?;
        // Keep a margin so a token never expires between our check and the server's.
        let ttl = tok.expires_in.saturating_sub(30).min(i64::MAX as u64) as i64;
        self.profile.save_token(&CachedToken {
            access_token: tok.access_token.clone(),
            expires_at: Utc::now() + TimeDelta::seconds(ttl),
            api: self.api.base().to_string(),
        })?;
        Ok(tok.access_token)
    }

    fn token(&self) -> Result<String, Error> {
        if let Some(t) = self.profile.token()?
            && t.api == self.api.base()
            && t.expires_at > Utc::now()
        {
            return Ok(t.access_token);
        }
        self.login_fresh()
    }

    /// Runs an authenticated call; when the server refuses the token (expired, revoked), logs in
    /// again once and repeats it.
    fn call<T>(&self, f: impl Fn(&Api, &str) -> Result<T, ApiError>) -> Result<T, CallError> {
        let token = self.token().map_err(CallError::Client)?;
        match f(&self.api, &token) {
            Err(ApiError::Status {
                status: 401,
                ref code,
                ..
            }) if code == "unauthorized" => {
                self.profile
                    .forget_token()
                    .map_err(|e| CallError::Client(e.into()))?;
                let token = self.login_fresh().map_err(CallError::Client)?;
                f(&self.api, &token).map_err(CallError::Api)
            }
            r => r.map_err(CallError::Api),
        }
    }

    fn authed<T>(
        &self,
        doing: &str,
        f: impl Fn(&Api, &str) -> Result<T, ApiError>,
    ) -> Result<T, Error> {
        self.call(f).map_err(|e| match e {
            CallError::Api(e) => self.err(e, doing),
            CallError::Client(e) => e,
        })
    }

    // ---------------------------------------------------------------------------------- register

    pub fn register(&self, name: &str) -> Result<Value, Error> {
        if !valid_user_name(name) {
            return Err(Error::Usage(format!(
                "{name:?}: a name is 3 to 32 characters of A-Z a-z 0-9 _ . -"
            )));
        }
        if let Some(a) = self.profile.account()? {
            return Err(Error::Usage(format!(
                "profile {:?} already holds the account {} ({}); use --profile NAME for another account",
                self.profile.name, a.name, a.api
            )));
        }
        let _lock = self.profile.lock()?;
        // The key is on disk before the server hears of it; a leftover from an attempt that
        // failed is reused.
        let ring = match self.profile.keyring()? {
            Some(r) => r,
            None => {
                let r = Keyring::new(&PrivateKey::generate());
                self.profile.save_keyring(&r)?;
                r
            }
        };
        let key = ring.current.private_key().map_err(Error::Other)?;
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
            registered_at: acct.created_at,
        })?;
        let fp = key.public_key().fingerprint();
        // A token now, so that the next commands need not ask for the password.
        if let Err(e) = self.login_with(&acct.name, &password) {
            self.out
                .warn(&format!("registered, but logging in failed: {e}"));
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

    // ---------------------------------------------------------------------------------- whoami

    pub fn whoami(&self) -> Result<Value, Error> {
        let _lock = self.profile.lock()?;
        let acct = self.account()?;
        let ring = self.keyring()?;
        let me = self.authed("reading your account", |api, t| api.me(t))?;
        let local = ring.current.fingerprint.clone();
        let published = PublicKey::from_pem(&me.public_key)
            .map(|k| k.fingerprint())
            .ok();
        self.out.say(&format!(
            "{} (id {}) at {}",
            me.name,
            me.id,
            self.api.base()
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
        let result = json!({"id": me.id, "name": me.name, "api": self.api.base(), "fingerprint": local,
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

    // ---------------------------------------------------------------------------------- send

    /// Looks `name` up in the directory and checks its key against the pinned one; pins it on
    /// first use. A changed key (or a name now held by another account) is refused.
    fn recipient(
        &self,
        name: &str,
        contacts: &mut Contacts,
    ) -> Result<(Directory, PublicKey), Error> {
        let dir = self.authed(&format!("looking up {name}"), |api, t| {
            api.lookup_user(t, name)
        })?;
        let key = PublicKey::from_pem(&dir.public_key).map_err(|_| {
            Error::Other(format!(
                "{}'s published key is not an X25519 key: this client cannot encrypt to it",
                dir.name
            ))
        })?;
        let fp = key.fingerprint();
        let now = Utc::now();
        match contacts.by_id.get_mut(&dir.user_id) {
            Some(c) if c.current().fingerprint == fp => {
                c.pending = None;
            }
            Some(c) => {
                c.pending = Some(PendingKey {
                    public_key: key.to_pem(),
                    fingerprint: fp.clone(),
                    seen_at: now,
                });
                let pinned = c.current().fingerprint.clone();
                self.profile.save_contacts(contacts)?;
                return Err(Error::KeyChanged(format!(
                    "{}'s key changed: pinned {}, the directory now has {}. Nothing was sent. If {} \
                     rotated their key, compare the new fingerprint with them, then run `messenger trust {}`",
                    dir.name,
                    group_fingerprint(&pinned),
                    group_fingerprint(&fp),
                    dir.name,
                    dir.name
                )));
            }
            None => {
                if let Some((old_id, _)) = contacts.find_name(&dir.name) {
                    return Err(Error::KeyChanged(format!(
                        "the name {} now belongs to another account (id {}, was {}), with key {}. \
                         Nothing was sent. Check with them, then run `messenger trust {}`",
                        dir.name,
                        dir.user_id,
                        old_id,
                        group_fingerprint(&fp),
                        dir.name
                    )));
                }
                contacts
                    .by_id
                    .insert(dir.user_id, Contact::new(&dir.name, &key, now));
                self.out.warn(&format!(
                    "first contact with {}: pinned key {} (compare it with {} out of band)",
                    dir.name,
                    group_fingerprint(&fp),
                    dir.name
                ));
            }
        }
        self.profile.save_contacts(contacts)?;
        Ok((dir, key))
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
        let mut contacts = self.profile.contacts()?;
        let (dir, key) = self.recipient(name, &mut contacts)?;
        let pt = Plaintext::new(text);
        let sealed = envelope::seal(
            &pt,
            acct.user_id,
            &ring.current.private_key().map_err(Error::Other)?,
            dir.user_id,
            &key,
        );
        let b64 = base64::engine::general_purpose::STANDARD.encode(&sealed);
        let idem = pt.id.hyphenated().to_string();
        let (sent, attempts) = self.post_with_retries(dir.user_id, &b64, &idem)?;
        self.out
            .say(&format!("sent to {} (message {})", dir.name, sent.id));
        Ok(
            json!({"id": sent.id, "message_id": pt.id, "to": dir.name, "to_id": dir.user_id,
            "timestamp": sent.timestamp, "expires_at": sent.expires_at,
            "attempts": attempts, "replayed": sent.replayed}),
        )
    }

    /// `POST /messages`, the same body and `Idempotency-Key` on every attempt: a retry after a
    /// lost answer is stored once. Retries timeouts, resets and 5xx with backoff, and waits out
    /// `rate_limited`.
    fn post_with_retries(
        &self,
        to: Uuid,
        b64: &str,
        idem: &str,
    ) -> Result<(crate::api::Sent, u32), Error> {
        const ATTEMPTS: u32 = 6;
        let mut attempt = 0;
        let mut waited_for_limit = 0;
        loop {
            attempt += 1;
            match self.call(|api, t| api.send_message(t, to, b64, idem)) {
                Ok(sent) => return Ok((sent, attempt)),
                Err(CallError::Client(e)) => return Err(e),
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

    // ---------------------------------------------------------------------------------- inbox

    /// Who sent a message: the pinned contact (with the directory's key checked against it), or
    /// a first contact pinned now. `None`: no such account any more.
    fn sender(
        &self,
        id: Uuid,
        contacts: &mut Contacts,
        cache: &mut HashMap<Uuid, Option<Sender>>,
        notes: &mut Vec<String>,
        now: DateTime<Utc>,
    ) -> Result<Option<Sender>, Error> {
        if let Some(s) = cache.get(&id) {
            return Ok(s.clone());
        }
        let dir = match self.call(|api, t| api.public_key(t, id)) {
            Ok(d) => Some(d),
            Err(CallError::Api(e)) if e.status() == Some(404) => None,
            Err(CallError::Api(e)) => return Err(self.err(e, "looking up a sender's key")),
            Err(CallError::Client(e)) => return Err(e),
        };
        let published = dir
            .as_ref()
            .and_then(|d| PublicKey::from_pem(&d.public_key).ok());
        let sender = match (contacts.by_id.get_mut(&id), dir, published) {
            (Some(c), _, Some(k)) => {
                let fp = k.fingerprint();
                if c.current().fingerprint == fp {
                    c.pending = None;
                } else if c.pending.as_ref().map(|p| &p.fingerprint) != Some(&fp) {
                    c.pending = Some(PendingKey {
                        public_key: k.to_pem(),
                        fingerprint: fp.clone(),
                        seen_at: now,
                    });
                    notes.push(format!(
                        "{}'s key changed: pinned {}, the directory now has {}; messages sealed with \
                         it are held until you compare it with {} and run `messenger trust {}`",
                        c.name,
                        group_fingerprint(&c.current().fingerprint),
                        group_fingerprint(&fp),
                        c.name,
                        c.name
                    ));
                }
                Some(Sender {
                    name: c.name.clone(),
                    keys: c.opening_keys(now),
                    changed_to: c.pending.as_ref().map(|p| p.fingerprint.clone()),
                })
            }
            (Some(c), _, None) => Some(Sender {
                name: c.name.clone(),
                keys: c.opening_keys(now),
                changed_to: None,
            }),
            (None, Some(d), Some(k)) => {
                if let Some((old, _)) = contacts.find_name(&d.name) {
                    // The name was freed and taken again: a new account, not the one pinned.
                    notes.push(format!(
                        "{} (id {}) is not the {} you pinned (id {}): its messages are held until \
                         `messenger trust {}`",
                        d.name, id, d.name, old, d.name
                    ));
                    Some(Sender {
                        name: format!("{} (new account)", d.name),
                        keys: Vec::new(),
                        changed_to: Some(k.fingerprint()),
                    })
                } else {
                    let c = Contact::new(&d.name, &k, now);
                    notes.push(format!(
                        "first contact with {}: pinned key {} (compare it with {} out of band)",
                        d.name,
                        group_fingerprint(&k.fingerprint()),
                        d.name
                    ));
                    let s = Sender {
                        name: d.name.clone(),
                        keys: c.opening_keys(now),
                        changed_to: None,
                    };
                    contacts.by_id.insert(id, c);
                    Some(s)
                }
            }
            (None, _, _) => None,
        };
        cache.insert(id, sender.clone());
        Ok(sender)
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
                println!("{report}");
            }
            std::thread::sleep(every);
        }
    }

    fn inbox_once(&self, limit: u32, say_empty: bool) -> Result<Value, Error> {
        let _lock = self.profile.lock()?;
        let acct = self.account()?;
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
        let mut cache = HashMap::new();
        // Held messages first: the sender's key may have been accepted since.
        for held in std::mem::take(&mut state.held) {
            if held.message.expires_at <= now {
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
                &my_keys,
                &mut contacts,
                &mut cache,
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
            let ids: Vec<Uuid> = page.messages.iter().map(|m| m.id).collect();
            for m in page.messages {
                state.cursor = Some(m.id);
                self.judge_one(
                    m,
                    acct.user_id,
                    &my_keys,
                    &mut contacts,
                    &mut cache,
                    &mut state,
                    &mut report,
                    now,
                    None,
                )?;
            }
            // Recorded first, confirmed second: a crash between the two confirms on the next run
            // and shows nothing twice.
            state.unconfirmed = ids.clone();
            self.profile.save_contacts(&contacts)?;
            self.profile.save_inbox(&state)?;
            if !ids.is_empty() {
                self.confirm(&ids)?;
                state.unconfirmed.clear();
                self.profile.save_inbox(&state)?;
            }
            if !page.has_more || ids.is_empty() {
                break;
            }
        }
        for n in &report.notes {
            self.out.warn(n);
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

    #[allow(clippy::too_many_arguments)]
    fn judge_one(
        &self,
        m: Message,
        me: Uuid,
        my_keys: &[PrivateKey],
        contacts: &mut Contacts,
        cache: &mut HashMap<Uuid, Option<Sender>>,
        state: &mut InboxState,
        report: &mut Report,
        now: DateTime<Utc>,
        held_since: Option<DateTime<Utc>>,
    ) -> Result<(), Error> {
        let Some(sender) = self.sender(m.sender_id, contacts, cache, &mut report.notes, now)?
        else {
            report.drop(&m, "?", "its sender's account does not exist");
            return Ok(());
        };
        match inbox::judge(&m, me, my_keys, &sender, state, now) {
            Verdict::Shown(pt) => {
                inbox::remember(state, m.sender_id, &pt, now);
                let mut lines = pt.text.lines();
                let first = lines.next().unwrap_or("");
                self.out.say(&format!(
                    "{}  {}: {}",
                    human_time(pt.sent_at),
                    sender.name,
                    first
                ));
                for more in lines {
                    self.out.say(&format!(
                        "{:width$}{}",
                        "",
                        more,
                        width = 25 + sender.name.len()
                    ));
                }
                report
                    .shown
                    .push(json!({"id": m.id, "message_id": pt.id, "from": sender.name,
                    "from_id": m.sender_id, "sent_at": rfc3339(pt.sent_at),
                    "received_at": rfc3339(m.timestamp), "text": pt.text}));
            }
            Verdict::Held { new_fingerprint } => {
                let line = format!(
                    "held message {} from {}: sealed with a key that is not pinned for {} (the \
                     directory now has {}); not opened. Compare it with {}, then `messenger trust {}` \
                     and `messenger inbox`",
                    m.id,
                    sender.name,
                    sender.name,
                    group_fingerprint(&new_fingerprint),
                    sender.name,
                    sender.name
                );
                self.out.say(&line);
                report.held.push(
                    json!({"id": m.id, "from": sender.name, "from_id": m.sender_id,
                    "new_fingerprint": new_fingerprint, "reason": line}),
                );
                state.held.push(Held {
                    held_at: held_since.unwrap_or(now),
                    message: m,
                });
            }
            Verdict::Dropped { reason } => {
                let name = sender.name.clone();
                report.drop(&m, &name, &reason);
                self.out.say(&format!(
                    "dropped message {} from {}: {}",
                    m.id, name, reason
                ));
            }
        }
        Ok(())
    }

    // ---------------------------------------------------------------------------------- contacts

    pub fn contacts(&self) -> Result<Value, Error> {
        let _lock = self.profile.lock()?;
        let now = Utc::now();
        let contacts = self.profile.contacts()?;
        let mut list = Vec::new();
        if contacts.by_id.is_empty() {
            self.out.say("no contacts yet");
        }
        for (id, c) in &contacts.by_id {
            let cur = c.current();
            self.out.say(&format!(
                "{}  {}",
                c.name,
                group_fingerprint(&cur.fingerprint)
            ));
            self.out.say(&format!(
                "    id {}, pinned {}",
                id,
                human_time(cur.pinned_at)
            ));
            let earlier: Vec<Value> = c.keys[..c.keys.len() - 1]
                .iter()
                .filter_map(|k| {
                    let until = k.replaced_at? + MESSAGE_TTL;
                    (until > now).then(|| {
                        self.out.say(&format!(
                            "    earlier key {} still opens messages until {}",
                            group_fingerprint(&k.fingerprint),
                            human_time(until)
                        ));
                        json!({"fingerprint": k.fingerprint, "opens_until": rfc3339(until)})
                    })
                })
                .collect();
            if let Some(p) = &c.pending {
                self.out.say(&format!(
                    "    KEY CHANGED: the directory has {} (seen {}); `messenger trust {}` to accept it",
                    group_fingerprint(&p.fingerprint),
                    human_time(p.seen_at),
                    c.name
                ));
            }
            list.push(json!({"id": id, "name": c.name, "fingerprint": cur.fingerprint,
                "pinned_at": rfc3339(cur.pinned_at), "earlier": earlier,
                "pending": c.pending.as_ref().map(|p| json!({"fingerprint": p.fingerprint, "seen_at": rfc3339(p.seen_at)}))}));
        }
        Ok(json!({"contacts": list}))
    }

    // ---------------------------------------------------------------------------------- trust

    pub fn trust(&self, name: &str, expected: Option<&str>) -> Result<Value, Error> {
        let _lock = self.profile.lock()?;
        self.account()?;
        let dir = self.authed(&format!("looking up {name}"), |api, t| {
            api.lookup_user(t, name)
        })?;
        let key = PublicKey::from_pem(&dir.public_key).map_err(|_| {
            Error::Other(format!("{}'s published key is not an X25519 key", dir.name))
        })?;
        let fp = key.fingerprint();
        if let Some(exp) = expected {
            let exp: String = exp
                .chars()
                .filter(|c| !c.is_whitespace())
                .collect::<String>()
                .to_lowercase();
            if exp != fp {
                return Err(Error::KeyChanged(format!(
                    "{}'s key in the directory is {}, not the fingerprint you gave; nothing changed",
                    dir.name,
                    group_fingerprint(&fp)
                )));
            }
        }
        let now = Utc::now();
        let mut contacts = self.profile.contacts()?;
        let previous = contacts
            .by_id
            .get(&dir.user_id)
            .map(|c| c.current().fingerprint.clone());
        // A contact of the same name under another id was a deleted account: forget it.
        let stale: Vec<Uuid> = contacts
            .by_id
            .iter()
            .filter(|(id, c)| **id != dir.user_id && c.name.eq_ignore_ascii_case(&dir.name))
            .map(|(id, _)| *id)
            .collect();
        for id in &stale {
            contacts.by_id.remove(id);
        }
        let held = self
            .profile
            .inbox()?
            .held
            .iter()
            .filter(|h| h.message.sender_id == dir.user_id)
            .count();
        match contacts.by_id.get_mut(&dir.user_id) {
            Some(c) if c.current().fingerprint == fp => {
                c.pending = None;
                self.out.say(&format!(
                    "{}'s key {} is already the pinned one",
                    dir.name,
                    group_fingerprint(&fp)
                ));
            }
            Some(c) => {
                c.accept(&key, now);
                self.out.say(&format!(
                    "{}: accepted the new key {} (was {}); messages sealed with the old key still \
                     open until {}",
                    dir.name,
                    group_fingerprint(&fp),
                    group_fingerprint(previous.as_deref().unwrap_or("")),
                    human_time(now + MESSAGE_TTL)
                ));
            }
            None => {
                contacts
                    .by_id
                    .insert(dir.user_id, Contact::new(&dir.name, &key, now));
                self.out.say(&format!(
                    "{}: pinned key {}",
                    dir.name,
                    group_fingerprint(&fp)
                ));
            }
        }
        self.profile.save_contacts(&contacts)?;
        if held > 0 {
            self.out.say(&format!(
                "{held} held message(s) from {}: run `messenger inbox` to read them",
                dir.name
            ));
        }
        Ok(
            json!({"name": dir.name, "id": dir.user_id, "fingerprint": fp, "previous": previous,
                  "held": held}),
        )
    }

    // ---------------------------------------------------------------------------------- rotate-key

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

    // ---------------------------------------------------------------------------------- delete

    pub fn delete_account(&self, yes: bool) -> Result<Value, Error> {
        let lock = self.profile.lock()?;
        let acct = self.account()?;
        if !yes {
            if !std::io::stdin().is_terminal() {
                return Err(Error::Usage(
                    "delete-account erases the account and every message: pass --yes".into(),
                ));
            }
            eprint!(
                "This erases {} and every message to or from it. Type the name to confirm: ",
                acct.name
            );
            let mut line = String::new();
            std::io::stdin()
                .read_line(&mut line)
                .map_err(|e| Error::Other(e.to_string()))?;
            if line.trim() != acct.name {
                return Err(Error::Usage("not confirmed; nothing was deleted".into()));
            }
        }
        let pw = self.password(&format!("Password for {}: ", acct.name), false)?;
        self.authed("deleting the account", |api, t| api.delete_me(t, &pw))?;
        let name = self.profile.name.clone();
        let dir = self.profile.dir.display().to_string();
        Profile::at(
            self.profile.dir.parent().expect("a profile has a parent"),
            &name,
        )?
        .erase(lock)?;
        self.out.say(&format!(
            "deleted the account {}; erased the profile {name} ({dir})",
            acct.name
        ));
        Ok(json!({"deleted": acct.name, "id": acct.user_id, "profile": name}))
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

fn is_loopback(url: &str) -> bool {
    let rest = url.split_once("://").map(|(_, r)| r).unwrap_or(url);
    let host = rest.split(['/', '?']).next().unwrap_or("");
    let host = host.rsplit_once('@').map(|(_, h)| h).unwrap_or(host);
    let host = if let Some(h) = host.strip_prefix('[') {
        h.split(']').next().unwrap_or("")
    } else {
        host.split(':').next().unwrap_or("")
    };
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_urls() {
        for u in [
            "http://127.0.0.1:9000",
            "http://localhost",
            "http://[::1]:8080/x",
            "http://127.0.0.2",
        ] {
            assert!(is_loopback(u), "{u}");
        }
        for u in [
            "http://example.com",
            "http://10.0.0.1:9000",
            "http://127.0.0.1.example.com",
        ] {
            assert!(!is_loopback(u), "{u}");
        }
    }

    #[test]
    fn exit_codes_are_distinct() {
        let all = [
            Error::Other(String::new()),
            Error::Usage(String::new()),
            Error::Auth(String::new()),
            Error::NotFound(String::new()),
            Error::KeyChanged(String::new()),
            Error::Unavailable(String::new()),
            Error::Limited(String::new()),
            Error::Conflict(String::new()),
        ];
        let mut codes: Vec<i32> = all.iter().map(Error::exit_code).collect();
        codes.sort();
        assert_eq!(codes, (1..=8).collect::<Vec<_>>());
        for c in codes {
            assert!(HELP_FOOTER.contains(&format!("  {c}  ")));
        }
    }
}
