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
use std::borrow::Cow;
use std::cell::Cell;
use std::collections::HashMap;
use std::fmt::Write as _;
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
    /// One line on stdout, with its control characters escaped (see [`escape_controls`]).
    pub fn say(&self, line: &str) {
        if !self.json {
            println!("{}", escape_controls(line));
        }
    }
    /// Warnings and notices: always on stderr, with control characters escaped.
    pub fn warn(&self, line: &str) {
        eprintln!("{}", escape_controls(line));
    }
}

/// Whether `c` can move the cursor, end, erase, recolour or reorder a line on a terminal: the
/// control characters (C0, DEL, C1), the bidirectional formatting characters, and the Unicode line
/// and paragraph separators.
fn unsafe_on_terminal(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{061c}' | '\u{200e}' | '\u{200f}' | '\u{2028}' | '\u{2029}'
            | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// Text that a sender or the server wrote (names, message text, error messages), made safe to
/// print (ENVELOPE.md "Trust"): every character of [`unsafe_on_terminal`] is written as
/// `\u{..}` (ESC as `\u{1b}`), so that no text can pose as another line or another sender.
/// Every line the CLI prints goes through it; text without such characters is unchanged.
pub fn escape_controls(text: &str) -> Cow<'_, str> {
    if !text.chars().any(unsafe_on_terminal) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        if unsafe_on_terminal(c) {
            let _ = write!(out, "\\u{{{:x}}}", c as u32);
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// A `--json` result as one line that is also safe on a terminal: serde_json escapes C0 already;
/// DEL, C1 and the characters of [`unsafe_on_terminal`] become `\uXXXX` too, which is the same
/// JSON value (they can only stand inside strings).
pub fn json_line(value: &Value) -> String {
    let line = value.to_string();
    if !line.chars().any(unsafe_on_terminal) {
        return line;
    }
    let mut out = String::with_capacity(line.len() + 16);
    for c in line.chars() {
        if unsafe_on_terminal(c) {
            let _ = write!(out, "\\u{:04x}", c as u32);
        } else {
            out.push(c);
        }
    }
    out
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
            &escape_controls(&format!(
                "Password for {} at {}: ",
                acct.name,
                self.api.base()
            )),
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

    /// `GET /users?name=`, checked as ENVELOPE.md "Trust" says: the answer must carry the name
    /// asked (without regard to case), and an id that is pinned must be pinned under that name.
    /// Anything else is the directory trying to redirect a pin: a key change, nothing pinned.
    fn lookup_name(&self, name: &str, contacts: &Contacts) -> Result<Directory, Error> {
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

    /// Looks `name` up in the directory and checks its key against the pinned one; pins it on
    /// first use. A changed key (or a name now held by another account) is refused, and recorded
    /// as the contact's pending key: the one `trust NAME` accepts.
    fn recipient(
        &self,
        name: &str,
        contacts: &mut Contacts,
    ) -> Result<(Directory, PublicKey), Error> {
        let dir = self.lookup_name(name, contacts)?;
        let key = PublicKey::from_pem(&dir.public_key).map_err(|e| {
            Error::Other(format!(
                "{}'s published key is refused ({e}): this client cannot encrypt to it. Nothing \
                 was sent or pinned",
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
                c.pending = Some(PendingKey::new(&key, None, now));
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
                if let Some((old_id, _)) = contacts.find_name(name) {
                    if let Some(old) = contacts.by_id.get_mut(&old_id) {
                        old.pending = Some(PendingKey::new(&key, Some(dir.user_id), now));
                    }
                    self.profile.save_contacts(contacts)?;
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
                self.profile.save_contacts(contacts)?;
                self.out.warn(&format!(
                    "first contact with {}: pinned key {} (compare it with {} out of band)",
                    dir.name,
                    group_fingerprint(&fp),
                    dir.name
                ));
                return Ok((dir, key));
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
    /// a first contact pinned now. `Ok(Err(reason))`: its messages are dropped for `reason` (no
    /// such account any more, or a directory answer that cannot be used). A change to the
    /// contacts is on disk before its note is shown.
    fn sender(
        &self,
        id: Uuid,
        contacts: &mut Contacts,
        cache: &mut HashMap<Uuid, Result<Sender, String>>,
        notes: &mut Vec<String>,
        now: DateTime<Utc>,
    ) -> Result<Result<Sender, String>, Error> {
        if let Some(s) = cache.get(&id) {
            return Ok(s.clone());
        }
        let dir = match self.call(|api, t| api.public_key(t, id)) {
            Ok(d) => Some(d),
            Err(CallError::Api(e)) if e.status() == Some(404) => None,
            Err(CallError::Api(e)) => return Err(self.err(e, "looking up a sender's key")),
            Err(CallError::Client(e)) => return Err(e),
        };
        // The directory's answer, when it is one this client can use.
        let published: Option<Result<(Directory, PublicKey), String>> = dir.map(|d| {
            if d.user_id != id {
                return Err(format!(
                    "the directory answered the lookup of its sender {id} with another account ({})",
                    d.user_id
                ));
            }
            match PublicKey::from_pem(&d.public_key) {
                Ok(k) => Ok((d, k)),
                Err(e) => Err(format!(
                    "its sender's published key is refused ({e}); it is not pinned"
                )),
            }
        });
        let mut note = None;
        let sender = match (contacts.by_id.get_mut(&id), published) {
            (Some(c), Some(Ok((_, k)))) => {
                let fp = k.fingerprint();
                if c.current().fingerprint == fp {
                    if c.pending.as_ref().is_some_and(|p| p.user_id.is_none()) {
                        c.pending = None;
                        note = Some(String::new());
                    }
                } else if c.pending.as_ref().map(|p| (&p.fingerprint, p.user_id))
                    != Some((&fp, None))
                {
                    c.pending = Some(PendingKey::new(&k, None, now));
                    note = Some(format!(
                        "{}'s key changed: pinned {}, the directory now has {}; messages sealed with \
                         it are held until you compare it with {} and run `messenger trust {}`",
                        c.name,
                        group_fingerprint(&c.current().fingerprint),
                        group_fingerprint(&fp),
                        c.name,
                        c.name
                    ));
                }
                Ok(Sender {
                    name: c.name.clone(),
                    keys: c.opening_keys(now),
                    changed_to: c
                        .pending
                        .as_ref()
                        .filter(|p| p.user_id.is_none())
                        .map(|p| p.fingerprint.clone()),
                })
            }
            (Some(c), refused) => {
                if let Some(Err(reason)) = refused {
                    note = Some(format!(
                        "{}: {reason}; only the key pinned for {} opens its messages",
                        c.name, c.name
                    ));
                }
                Ok(Sender {
                    name: c.name.clone(),
                    keys: c.opening_keys(now),
                    changed_to: None,
                })
            }
            (None, Some(Ok((d, k)))) => {
                if let Some((old, _)) = contacts.find_name(&d.name) {
                    // The name was freed and taken again: a new account, not the one pinned. Its
                    // key is recorded as the pending change of that name, for `trust` to accept.
                    if let Some(c) = contacts.by_id.get_mut(&old) {
                        c.pending = Some(PendingKey::new(&k, Some(id), now));
                    }
                    note = Some(format!(
                        "{} (id {}) is not the {} you pinned (id {}): its key is {}; its messages \
                         are held until you compare it with them and run `messenger trust {}`",
                        d.name,
                        id,
                        d.name,
                        old,
                        group_fingerprint(&k.fingerprint()),
                        d.name
                    ));
                    Ok(Sender {
                        name: format!("{} (new account)", d.name),
                        keys: Vec::new(),
                        changed_to: Some(k.fingerprint()),
                    })
                } else {
                    let c = Contact::new(&d.name, &k, now);
                    note = Some(format!(
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
                    Ok(s)
                }
            }
            (None, Some(Err(reason))) => Err(reason),
            (None, None) => Err("its sender's account does not exist".into()),
        };
        if let Some(note) = note {
            // Recorded first, shown second: a pending key is always one the user was shown.
            self.profile.save_contacts(contacts)?;
            if !note.is_empty() {
                self.out.warn(&note);
                notes.push(note);
            }
        }
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
                println!("{}", json_line(&report));
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
            let received = page.messages.len();
            for m in page.messages {
                // Each message is recorded (the cursor past it, its delivery to confirm, its id
                // as seen) before it is shown: a failure later in the page shows nothing twice.
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
        my_keys: &[PrivateKey],
        contacts: &mut Contacts,
        cache: &mut HashMap<Uuid, Result<Sender, String>>,
        state: &mut InboxState,
        report: &mut Report,
        now: DateTime<Utc>,
        held_since: Option<DateTime<Utc>>,
    ) -> Result<(), Error> {
        let sender = self.sender(m.sender_id, contacts, cache, &mut report.notes, now)?;
        let verdict = match &sender {
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
            (Verdict::Shown(pt), _) => inbox::remember(state, m.sender_id, pt, now),
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
                    "from_id": m.sender_id, "sent_at": rfc3339(pt.sent_at),
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
                let account = p
                    .user_id
                    .map(|other| format!(" for another account (id {other})"))
                    .unwrap_or_default();
                self.out.say(&format!(
                    "    KEY CHANGED: the directory has {}{account} (seen {}); `messenger trust {}` \
                     accepts this key",
                    group_fingerprint(&p.fingerprint),
                    human_time(p.seen_at),
                    c.name
                ));
            }
            list.push(
                json!({"id": id, "name": c.name, "fingerprint": cur.fingerprint,
                "pinned_at": rfc3339(cur.pinned_at), "earlier": earlier,
                "pending": c.pending.as_ref().map(|p| json!({"fingerprint": p.fingerprint,
                    "seen_at": rfc3339(p.seen_at), "user_id": p.user_id}))}),
            );
        }
        Ok(json!({"contacts": list}))
    }

    // ---------------------------------------------------------------------------------- trust

    /// Accepts a changed key for `name` (ENVELOPE.md "Trust"): the very key that was shown to the
    /// user (the contact's pending key, recorded when `send`, `inbox` or `contacts` showed it), or
    /// the key whose fingerprint the user typed. Never whatever the directory says at that moment:
    /// a changed key in the directory that was not shown yet is shown and recorded now, and
    /// accepted by the next `trust`. A name never pinned is pinned on first use, as `send` would.
    pub fn trust(&self, name: &str, expected: Option<&str>) -> Result<Value, Error> {
        let expected = match expected {
            None => None,
            Some(typed) => {
                let fp: String = typed
                    .chars()
                    .filter(|c| !c.is_whitespace())
                    .collect::<String>()
                    .to_lowercase();
                if fp.len() != 64 || !fp.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err(Error::Usage(
                        "--fingerprint: 64 hex digits (spaces allowed), as `messenger contacts` \
                         or `messenger whoami` shows them"
                            .into(),
                    ));
                }
                Some(fp)
            }
        };
        let _lock = self.profile.lock()?;
        self.account()?;
        let now = Utc::now();
        let mut contacts = self.profile.contacts()?;
        let pinned: Option<(Uuid, Contact)> =
            contacts.find_name(name).map(|(id, c)| (id, c.clone()));
        let shown = pinned.as_ref().and_then(|(id, c)| {
            let p = c.pending.as_ref()?;
            let wanted = expected.as_deref().is_none_or(|fp| fp == p.fingerprint);
            wanted.then(|| {
                (
                    p.user_id.unwrap_or(*id),
                    c.name.clone(),
                    p.public_key.clone(),
                )
            })
        });
        let (id, shown_name, key) = match shown {
            Some((id, shown_name, pem)) => {
                let key = PublicKey::from_pem(&pem).map_err(|e| {
                    Error::Other(format!(
                        "the key shown for {shown_name} is refused ({e}); nothing was pinned"
                    ))
                })?;
                (id, shown_name, key)
            }
            None => {
                let dir = self.lookup_name(name, &contacts)?;
                let key = PublicKey::from_pem(&dir.public_key).map_err(|e| {
                    Error::Other(format!(
                        "{}'s published key is refused ({e}); nothing was pinned",
                        dir.name
                    ))
                })?;
                let fp = key.fingerprint();
                match (&expected, &pinned) {
                    (Some(exp), _) if *exp != fp => {
                        let pending = pinned
                            .as_ref()
                            .and_then(|(_, c)| c.pending.as_ref())
                            .map(|p| {
                                format!(
                                    ", and the key shown earlier {}",
                                    group_fingerprint(&p.fingerprint)
                                )
                            })
                            .unwrap_or_default();
                        return Err(Error::KeyChanged(format!(
                            "{}'s key in the directory is {}{pending}, not the fingerprint you gave; \
                             nothing changed",
                            dir.name,
                            group_fingerprint(&fp)
                        )));
                    }
                    (None, Some((pid, c)))
                        if *pid != dir.user_id || c.current().fingerprint != fp =>
                    {
                        // A change nobody was shown yet: show it and record it; accept nothing.
                        let other = (*pid != dir.user_id).then_some(dir.user_id);
                        if let Some(c) = contacts.by_id.get_mut(pid) {
                            c.pending = Some(PendingKey::new(&key, other, now));
                        }
                        self.profile.save_contacts(&contacts)?;
                        let whose = match other {
                            Some(other) => format!(
                                "the name {} now belongs to another account (id {other}, was {pid}), with key",
                                dir.name
                            ),
                            None => format!("{}'s key in the directory is", dir.name),
                        };
                        return Err(Error::KeyChanged(format!(
                            "{whose} {}, not the pinned {}; nothing changed. Compare it with {}, then \
                             run `messenger trust {}` again to accept this key (or pass --fingerprint)",
                            group_fingerprint(&fp),
                            group_fingerprint(&c.current().fingerprint),
                            dir.name,
                            dir.name
                        )));
                    }
                    _ => (dir.user_id, dir.name, key),
                }
            }
        };
        let fp = key.fingerprint();
        let previous = contacts
            .by_id
            .get(&id)
            .map(|c| c.current().fingerprint.clone());
        // A contact of the same name under another id was a deleted account: forget it.
        contacts
            .by_id
            .retain(|cid, c| *cid == id || !c.name.eq_ignore_ascii_case(&shown_name));
        let held = self
            .profile
            .inbox()?
            .held
            .iter()
            .filter(|h| h.message.sender_id == id)
            .count();
        let say = match contacts.by_id.get_mut(&id) {
            Some(c) if c.current().fingerprint == fp => {
                c.pending = None;
                format!(
                    "{}'s key {} is already the pinned one",
                    shown_name,
                    group_fingerprint(&fp)
                )
            }
            Some(c) => {
                c.accept(&key, now);
                format!(
                    "{}: accepted the new key {} (was {}); messages sealed with the old key still \
                     open until {}",
                    shown_name,
                    group_fingerprint(&fp),
                    group_fingerprint(previous.as_deref().unwrap_or("")),
                    human_time(now + MESSAGE_TTL)
                )
            }
            None => {
                contacts
                    .by_id
                    .insert(id, Contact::new(&shown_name, &key, now));
                format!(
                    "{}: pinned key {} (id {id})",
                    shown_name,
                    group_fingerprint(&fp)
                )
            }
        };
        self.profile.save_contacts(&contacts)?;
        self.out.say(&say);
        if held > 0 {
            self.out.say(&format!(
                "{held} held message(s) from {}: run `messenger inbox` to read them",
                shown_name
            ));
        }
        Ok(
            json!({"name": shown_name, "id": id, "fingerprint": fp, "previous": previous,
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
                escape_controls(&acct.name)
            );
            let mut line = String::new();
            std::io::stdin()
                .read_line(&mut line)
                .map_err(|e| Error::Other(e.to_string()))?;
            if line.trim() != acct.name {
                return Err(Error::Usage("not confirmed; nothing was deleted".into()));
            }
        }
        let pw = self.password(
            &escape_controls(&format!("Password for {}: ", acct.name)),
            false,
        )?;
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
