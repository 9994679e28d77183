//! The commands of the `messenger` CLI, on one profile and one API.

mod contacts;
mod delete_account;
mod devices;
mod olm_device;
mod read_inbox;
mod register;
mod rotate_key;
mod send;
mod trust;
mod whoami;

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
    /// 3: no password, a wrong one, a token or a link code the server refused.
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
    /// 8: the name is taken, or the account is at its device limit.
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
  3  authentication: no password available, wrong name or password, token refused,
     a link code refused
  4  not found: no such user, or no account in this profile
  5  key changed: a contact's key differs from the pinned one; nothing was sent
     (check the fingerprint with them, then `messenger trust NAME`)
  6  the API is unreachable or failing (after retries)
  7  rate limited, or the recipient's mailbox is full (try later)
  8  the name is already taken, or the account has as many devices as it may";

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
        (_, Some(403)) => Error::Auth(format!("{doing}: {e}")),
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
    /// This device's Olm state while `inbox` opens version 2 messages (loaded on first use).
    olm: std::cell::RefCell<Option<olm_device::OlmDevice>>,
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
            olm: std::cell::RefCell::new(None),
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
        self.login_as(&acct.name, &pw, acct.device_id)
    }

    /// `POST /login` as `device_id` of the account `name`; the token is cached for later calls.
    fn login_as(&self, name: &str, password: &str, device_id: u32) -> Result<String, Error> {
        let tok = self.api.login(name, password, device_id).map_err(|e| {
            // The server answers a removed device as it answers a wrong password (neither
            // tells a guesser which devices exist); this device knows it is not device 1.
            let refused = e.code() == Some("invalid_credentials");
            match self.err(e, "logging in") {
                Error::Auth(m) if refused && device_id != 1 => Error::Auth(format!(
                    "{m}, or this device (device {device_id}) was removed from the account"
                )),
                other => other,
            }
        })?;
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
