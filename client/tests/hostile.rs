//! ENVELOPE.md "Trust" against a hostile server: a small HTTP server on the loopback that lies
//! (another account's id or a look-alike name for `GET /users?name=`, a key swapped between the
//! moment it is shown and `trust`, a 500 in the middle of an inbox page, control characters in
//! names, texts and error messages, a small-order key), driving the real `messenger` binary.

use base64::Engine as _;
use chrono::{TimeDelta, Utc};
use messenger_client::envelope::{self, Plaintext};
use messenger_client::keys::{PrivateKey, PublicKey};
use messenger_client::store::{Account, CachedToken, Contact, Contacts, Keyring, Profile};
use serde_json::{Value, json};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use uuid::Uuid;

/// One request as the server read it.
#[derive(Debug, Clone)]
struct Request {
    method: String,
    /// The path without the query.
    path: String,
    body: String,
    /// The status the server answered.
    status: u16,
}

type Handler = dyn Fn(&Request) -> (u16, String) + Send + Sync;

/// The scripted server: every request is logged, then answered by the test's handler.
struct Server {
    base: String,
    log: Arc<Mutex<Vec<Request>>>,
}

impl Server {
    fn start(handler: impl Fn(&Request) -> (u16, String) + Send + Sync + 'static) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let log: Arc<Mutex<Vec<Request>>> = Arc::default();
        let handler: Arc<Handler> = Arc::new(handler);
        let server_log = log.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let (log, handler) = (server_log.clone(), handler.clone());
                std::thread::spawn(move || serve(stream, &log, &*handler));
            }
        });
        Server { base, log }
    }

    fn requests(&self) -> Vec<Request> {
        self.log.lock().unwrap().clone()
    }

    /// Sends the server stored (a 409 `devices_changed` stores nothing).
    fn posted_messages(&self) -> usize {
        self.requests()
            .iter()
            .filter(|r| r.method == "POST" && r.path.starts_with("/messages") && r.status == 201)
            .count()
    }

    /// Whether the client read the directory by name at all.
    fn looked_up_names(&self) -> bool {
        self.requests()
            .iter()
            .any(|r| r.method == "GET" && r.path == "/users")
    }
}

fn serve(stream: TcpStream, log: &Mutex<Vec<Request>>, handler: &Handler) {
    let mut writer = stream.try_clone().unwrap();
    let mut reader = BufReader::new(stream);
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let mut len = 0usize;
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((name, value)) = h.split_once(':')
                && name.eq_ignore_ascii_case("content-length")
            {
                len = value.trim().parse().unwrap();
            }
        }
        let mut body = vec![0; len];
        reader.read_exact(&mut body).unwrap();
        let mut parts = line.split_whitespace();
        let method = parts.next().unwrap_or("").to_string();
        let target = parts.next().unwrap_or("");
        let path = target.split_once('?').map_or(target, |(p, _)| p);
        let mut req = Request {
            method,
            path: path.to_string(),
            body: String::from_utf8_lossy(&body).into_owned(),
            status: 0,
        };
        let (status, json) = handler(&req);
        req.status = status;
        log.lock().unwrap().push(req);
        let resp = format!(
            "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{json}",
            json.len()
        );
        if writer.write_all(resp.as_bytes()).is_err() {
            return;
        }
    }
}

fn not_found() -> (u16, String) {
    (
        404,
        json!({"error": "not_found", "message": "no such thing"}).to_string(),
    )
}

fn directory(id: Uuid, name: &str, key: &PublicKey) -> (u16, String) {
    (
        200,
        json!({"user_id": id, "name": name, "public_key": key.to_pem(),
               "key_updated_at": null})
        .to_string(),
    )
}

/// `GET /users/{id}/devices` or `GET /keys/{id}` (the client reads either).
fn is_devices(path: &str, id: Uuid) -> bool {
    path == format!("/users/{id}/devices") || path == format!("/keys/{id}")
}

/// `GET /users/{id}/devices` (or `GET /keys/{id}`: no signing keys) of an account with one device, device 1 with `key`.
fn devices(id: Uuid, key: &PublicKey) -> (u16, String) {
    (
        200,
        json!({"user_id": id, "devices": [device(1, key)]}).to_string(),
    )
}

fn device(id: u32, key: &PublicKey) -> Value {
    json!({"device_id": id, "public_key": key.to_pem(), "key_fingerprint": key.fingerprint(),
           "key_updated_at": null})
}

/// `POST /messages/devices` to an account whose devices are `listed`: 201 when the envelopes
/// name exactly them with their fingerprints, else 409 `devices_changed` (nothing stored).
fn send_to(r: &Request, to: Uuid, listed: &[(u32, PublicKey)]) -> (u16, String) {
    let body: Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(body["recipient_id"], to.to_string(), "{r:?}");
    let mut sealed_for: Vec<(u64, String)> = body["envelopes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["device_id"].as_u64().unwrap(),
                e["key_fingerprint"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    sealed_for.sort();
    let current: Vec<(u64, String)> = listed
        .iter()
        .map(|(id, k)| (u64::from(*id), k.fingerprint()))
        .collect();
    if sealed_for != current {
        let devices: Vec<Value> = listed.iter().map(|(id, k)| device(*id, k)).collect();
        return (
            409,
            json!({"error": "devices_changed", "message": "the devices changed",
                   "missing": [], "extra": [], "stale": [], "devices": devices})
            .to_string(),
        );
    }
    let messages: Vec<Value> = listed
        .iter()
        .map(|(id, _)| json!({"device_id": id, "id": Uuid::now_v7()}))
        .collect();
    (
        201,
        json!({"sender_id": Uuid::now_v7(), "sender_device_id": 1, "recipient_id": to,
               "timestamp": Utc::now(), "expires_at": Utc::now() + TimeDelta::days(7),
               "messages": messages})
        .to_string(),
    )
}

/// A party of the conversation: an account id and its key.
struct Party {
    id: Uuid,
    key: PrivateKey,
}

impl Party {
    fn new() -> Party {
        Party {
            id: Uuid::now_v7(),
            key: PrivateKey::generate(),
        }
    }
    fn public(&self) -> PublicKey {
        self.key.public_key()
    }
}

/// Alice's profile (account, key, a cached token for `base`), in a fresh MESSENGER_HOME.
struct Alice {
    home: PathBuf,
    me: Party,
    base: String,
}

impl Alice {
    fn new(server: &Server) -> Alice {
        let home = std::env::temp_dir().join(format!("messenger-hostile-{}", Uuid::now_v7()));
        let me = Party::new();
        let profile = Profile::at(&home, "alice").unwrap();
        let _lock = profile.lock().unwrap();
        profile.save_keyring(&Keyring::new(&me.key)).unwrap();
        profile
            .save_account(&Account {
                api: server.base.clone(),
                name: "alice".into(),
                user_id: me.id,
                device_id: 1,
                registered_at: Utc::now(),
            })
            .unwrap();
        profile
            .save_token(&CachedToken {
                access_token: "a-token".into(),
                expires_at: Utc::now() + TimeDelta::minutes(10),
                api: server.base.clone(),
            })
            .unwrap();
        drop(_lock);
        let alice = Alice {
            home,
            me,
            base: server.base.clone(),
        };
        let me = Party {
            id: alice.me.id,
            key: PrivateKey::from_bytes(*alice.me.key.as_bytes()),
        };
        alice.pin("alice", &me);
        alice
    }

    fn profile(&self) -> Profile {
        Profile::at(&self.home, "alice").unwrap()
    }

    fn pin(&self, name: &str, who: &Party) {
        let p = self.profile();
        let _lock = p.lock().unwrap();
        let mut contacts = p.contacts().unwrap();
        contacts
            .by_id
            .insert(who.id, Contact::new(name, &[(1, who.public())], Utc::now()));
        p.save_contacts(&contacts).unwrap();
    }

    fn contacts(&self) -> Contacts {
        self.profile().contacts().unwrap()
    }

    /// Her contacts but herself.
    fn others(&self) -> usize {
        self.contacts()
            .by_id
            .keys()
            .filter(|id| **id != self.me.id)
            .count()
    }

    /// The pinned fingerprint of the contact `id`, if any.
    fn pinned(&self, id: Uuid) -> Option<String> {
        self.contacts()
            .by_id
            .get(&id)
            .and_then(|c| c.primary().map(|k| k.fingerprint.clone()))
    }

    /// Runs `messenger --profile alice --api BASE ARGS...` with no terminal and no password.
    fn run(&self, args: &[&str]) -> Run {
        let out = Command::new(env!("CARGO_BIN_EXE_messenger"))
            .args(["--profile", "alice", "--api", &self.base])
            .args(args)
            .env("MESSENGER_HOME", &self.home)
            .env_remove("MESSENGER_PASSWORD")
            .env_remove("MESSENGER_PROFILE")
            .env_remove("MESSENGER_API")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        Run::from(out)
    }

    /// A message from `from` to Alice as `GET /messages` lists it.
    fn message_from(&self, from: &Party, text: &str) -> Value {
        let sealed = envelope::seal(
            &Plaintext::new(text),
            from.id,
            &from.key,
            self.me.id,
            &self.me.public(),
        );
        json!({"id": Uuid::now_v7(), "sender_id": from.id, "recipient_id": self.me.id,
               "encrypted_data": base64::engine::general_purpose::STANDARD.encode(sealed),
               "timestamp": Utc::now(), "expires_at": Utc::now() + TimeDelta::days(7)})
    }
}

impl Drop for Alice {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.home);
    }
}

#[derive(Debug)]
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl From<Output> for Run {
    fn from(o: Output) -> Run {
        Run {
            code: o.status.code(),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }
}

/// The exit status of a key change (`messenger --help`).
const KEY_CHANGED: Option<i32> = Some(5);

fn grouped(fp: &str) -> String {
    messenger_client::keys::group_fingerprint(fp)
}

// ------------------------------------------------------------------------------ 1: send

#[test]
fn send_to_a_pinned_contact_never_asks_the_directory_for_the_name_so_a_look_alike_cannot_redirect_it()
 {
    let (bob, mallory) = (Party::new(), Party::new());
    let (bob_id, bob_key, mallory_key) = (bob.id, bob.public(), mallory.public());
    let server = Server::start(move |r| match (r.method.as_str(), r.path.as_str()) {
        // "bоb", with a Cyrillic о, and Mallory's id and key.
        ("GET", "/users") => directory(mallory.id, "b\u{43e}b", &mallory_key),
        ("POST", "/messages/devices") => send_to(r, bob_id, &[(1, bob_key)]),
        _ => not_found(),
    });
    let alice = Alice::new(&server);
    alice.pin("bob", &bob);
    let before = alice.contacts();

    let run = alice.run(&["send", "bob", "the secret"]);
    assert_eq!(run.code, Some(0), "{run:?}");
    assert!(
        !server.looked_up_names(),
        "a pinned name is never looked up"
    );
    assert_eq!(
        server.posted_messages(),
        1,
        "to the pinned account: {run:?}"
    );
    assert_eq!(alice.contacts().by_id, before.by_id, "nothing pinned");
}

#[test]
fn send_refuses_a_first_contact_answer_that_names_someone_else() {
    let mallory = Party::new();
    let mallory_key = mallory.public();
    let server = Server::start(move |r| match (r.method.as_str(), r.path.as_str()) {
        ("GET", "/users") => directory(mallory.id, "mallory", &mallory_key),
        ("POST", "/messages/devices") => send_to(r, mallory.id, &[(1, mallory_key)]),
        _ => not_found(),
    });
    let alice = Alice::new(&server);

    let run = alice.run(&["send", "carol", "hello carol"]);
    assert_eq!(run.code, KEY_CHANGED, "{run:?}");
    assert_eq!(server.posted_messages(), 0, "{run:?}");
    assert_eq!(alice.others(), 0, "nothing pinned");
}

#[test]
fn send_accepts_the_asked_name_in_another_case() {
    let bob = Party::new();
    let (bob_id, bob_key) = (bob.id, bob.public());
    let server = Server::start(move |r| match (r.method.as_str(), r.path.as_str()) {
        ("GET", "/users") => directory(bob_id, "Bob", &bob_key),
        ("POST", "/messages/devices") => send_to(r, bob_id, &[(1, bob_key)]),
        _ => not_found(),
    });
    let alice = Alice::new(&server);
    alice.pin("Bob", &bob);
    let run = alice.run(&["send", "bOB", "hi"]);
    assert_eq!(run.code, Some(0), "{run:?}");
    assert_eq!(server.posted_messages(), 1);
}

#[test]
fn send_refuses_an_answer_that_gives_a_pinned_name_another_pinned_contacts_id() {
    let (bob, mallory) = (Party::new(), Party::new());
    let (mallory_id, mallory_key) = (mallory.id, mallory.public());
    let server = Server::start(move |r| match (r.method.as_str(), r.path.as_str()) {
        // Bob's account is gone (404 to the send); Mallory is a contact too: her id and her
        // (pinned) key, under Bob's name.
        ("GET", "/users") => directory(mallory_id, "bob", &mallory_key),
        _ => not_found(),
    });
    let alice = Alice::new(&server);
    alice.pin("bob", &bob);
    alice.pin("mallory", &mallory);
    let before = alice.contacts();

    let run = alice.run(&["send", "bob", "the secret"]);
    assert_eq!(run.code, KEY_CHANGED, "{run:?}");
    assert_eq!(server.posted_messages(), 0, "{run:?}");
    assert_eq!(alice.contacts().by_id.len(), before.by_id.len());
    assert_eq!(
        alice.pinned(bob.id),
        before
            .by_id
            .get(&bob.id)
            .and_then(|c| c.primary().map(|k| k.fingerprint.clone()))
    );
}

#[test]
fn send_to_a_pinned_contact_whose_key_changed_sends_nothing_and_names_both_keys() {
    let (bob, bob_new) = (Party::new(), PrivateKey::generate().public_key());
    let bob_id = bob.id;
    let server = Server::start(move |r| match (r.method.as_str(), r.path.as_str()) {
        ("GET", "/users") => directory(bob_id, "bob", &bob_new),
        ("POST", "/messages/devices") => send_to(r, bob_id, &[(1, bob_new)]),
        _ => not_found(),
    });
    let alice = Alice::new(&server);
    alice.pin("bob", &bob);

    let run = alice.run(&["send", "bob", "the secret"]);
    assert_eq!(run.code, KEY_CHANGED, "{run:?}");
    assert_eq!(server.posted_messages(), 0);
    assert!(
        run.stderr.contains(&grouped(&bob.public().fingerprint())),
        "{run:?}"
    );
    assert!(
        run.stderr.contains(&grouped(&bob_new.fingerprint())),
        "{run:?}"
    );
    assert!(run.stderr.contains("messenger trust bob"), "{run:?}");
    assert_eq!(alice.pinned(bob.id), Some(bob.public().fingerprint()));
}

#[test]
fn a_name_taken_by_another_account_is_refused_until_trust_accepts_the_account_shown() {
    let (old_bob, new_bob) = (Party::new(), Party::new());
    let (new_id, new_key) = (new_bob.id, new_bob.public());
    let server = Server::start(move |r| match (r.method.as_str(), r.path.as_str()) {
        ("GET", "/users") => directory(new_id, "bob", &new_key),
        ("GET", p) if is_devices(p, new_id) => devices(new_id, &new_key),
        ("POST", "/messages/devices") if r.body.contains(&new_id.to_string()) => {
            send_to(r, new_id, &[(1, new_key)])
        }
        _ => not_found(),
    });
    let alice = Alice::new(&server);
    alice.pin("bob", &old_bob);

    let run = alice.run(&["send", "bob", "hi"]);
    assert_eq!(run.code, KEY_CHANGED, "{run:?}");
    assert!(
        run.stderr.contains(&grouped(&new_key.fingerprint())),
        "{run:?}"
    );
    assert_eq!(server.posted_messages(), 0);

    let run = alice.run(&["trust", "bob"]);
    assert_eq!(run.code, Some(0), "{run:?}");
    assert_eq!(
        alice.pinned(old_bob.id),
        None,
        "the deleted account is forgotten"
    );
    assert_eq!(alice.pinned(new_id), Some(new_key.fingerprint()));
    let run = alice.run(&["send", "bob", "hi"]);
    assert_eq!(run.code, Some(0), "{run:?}");
    let posted = server
        .requests()
        .into_iter()
        .find(|r| r.path == "/messages/devices" && r.status == 201)
        .unwrap();
    assert!(posted.body.contains(&new_id.to_string()), "{posted:?}");
}

// ------------------------------------------------------------------------------ 2: trust

/// Bob is pinned with his first key; the directory shows `shown` until `swap` is set, then
/// `swapped`.
fn swapping_server(bob: Uuid, shown: PublicKey, swapped: PublicKey) -> (Server, Arc<AtomicUsize>) {
    let swap = Arc::new(AtomicUsize::new(0));
    let phase = swap.clone();
    let server = Server::start(move |r| {
        let now = if phase.load(Ordering::SeqCst) == 0 {
            shown
        } else {
            swapped
        };
        match (r.method.as_str(), r.path.as_str()) {
            ("GET", "/users") => directory(bob, "bob", &now),
            ("GET", p) if is_devices(p, bob) => devices(bob, &now),
            ("POST", "/messages/devices") => send_to(r, bob, &[(1, now)]),
            _ => not_found(),
        }
    });
    (server, swap)
}

#[test]
fn trust_accepts_the_key_that_was_shown_not_the_one_the_directory_swaps_in() {
    let bob = Party::new();
    let (shown, swapped) = (
        PrivateKey::generate().public_key(),
        PrivateKey::generate().public_key(),
    );
    let (server, swap) = swapping_server(bob.id, shown, swapped);
    let alice = Alice::new(&server);
    alice.pin("bob", &bob);

    let run = alice.run(&["send", "bob", "hi"]);
    assert_eq!(run.code, KEY_CHANGED, "{run:?}");
    assert!(
        run.stderr.contains(&grouped(&shown.fingerprint())),
        "{run:?}"
    );

    swap.store(1, Ordering::SeqCst);
    let run = alice.run(&["trust", "bob"]);
    assert_eq!(run.code, Some(0), "{run:?}");
    assert_eq!(
        alice.pinned(bob.id),
        Some(shown.fingerprint()),
        "the key shown is accepted, not the one the directory returns now: {run:?}"
    );
    // The swapped key is then a change of its own: sending refuses it.
    let run = alice.run(&["send", "bob", "hi"]);
    assert_eq!(run.code, KEY_CHANGED, "{run:?}");
    assert_eq!(server.posted_messages(), 0);
}

#[test]
fn trust_with_a_typed_fingerprint_accepts_that_key_and_no_other() {
    let bob = Party::new();
    let (shown, swapped) = (
        PrivateKey::generate().public_key(),
        PrivateKey::generate().public_key(),
    );
    let (server, swap) = swapping_server(bob.id, shown, swapped);
    let alice = Alice::new(&server);
    alice.pin("bob", &bob);
    assert_eq!(alice.run(&["send", "bob", "hi"]).code, KEY_CHANGED);
    swap.store(1, Ordering::SeqCst);

    // A fingerprint that is neither the one shown nor the directory's changes nothing.
    let other = PrivateKey::generate().public_key().fingerprint();
    let run = alice.run(&["trust", "bob", "--fingerprint", &other]);
    assert_eq!(run.code, KEY_CHANGED, "{run:?}");
    assert_eq!(alice.pinned(bob.id), Some(bob.public().fingerprint()));

    // The one shown, typed in groups as people read it, while the directory has swapped it.
    let run = alice.run(&[
        "trust",
        "bob",
        "--fingerprint",
        &grouped(&shown.fingerprint()),
    ]);
    assert_eq!(run.code, Some(0), "{run:?}");
    assert_eq!(alice.pinned(bob.id), Some(shown.fingerprint()));

    // The directory's key, when it is the one the user typed.
    let run = alice.run(&["trust", "bob", "--fingerprint", &swapped.fingerprint()]);
    assert_eq!(run.code, Some(0), "{run:?}");
    assert_eq!(alice.pinned(bob.id), Some(swapped.fingerprint()));
}

#[test]
fn trust_with_no_key_shown_yet_pins_nothing_and_shows_the_key() {
    let bob = Party::new();
    let new = PrivateKey::generate().public_key();
    let (server, _swap) = swapping_server(bob.id, new, new);
    let alice = Alice::new(&server);
    alice.pin("bob", &bob);

    let run = alice.run(&["trust", "bob"]);
    assert_eq!(run.code, KEY_CHANGED, "{run:?}");
    assert_eq!(
        alice.pinned(bob.id),
        Some(bob.public().fingerprint()),
        "a key never shown is not accepted: {run:?}"
    );
    assert!(run.stderr.contains(&grouped(&new.fingerprint())), "{run:?}");
    // Now it was shown: accepting it is explicit.
    let run = alice.run(&["trust", "bob"]);
    assert_eq!(run.code, Some(0), "{run:?}");
    assert_eq!(alice.pinned(bob.id), Some(new.fingerprint()));
}

// ------------------------------------------------------------------------------ 3: inbox

#[test]
fn a_message_shown_before_a_failure_later_in_its_page_is_never_shown_again() {
    let (bob, carol) = (Party::new(), Party::new());
    let carol_fails = Arc::new(AtomicUsize::new(1));
    let page: Arc<Mutex<Vec<Value>>> = Arc::default();
    let (bob_id, bob_key, carol_id, carol_key) = (bob.id, bob.public(), carol.id, carol.public());
    let (fails, messages) = (carol_fails.clone(), page.clone());
    let server = Server::start(move |r| match (r.method.as_str(), r.path.as_str()) {
        // The page is served whole every time, whatever `after` says.
        ("GET", "/messages") => (
            200,
            json!({"messages": *messages.lock().unwrap(), "has_more": false}).to_string(),
        ),
        ("GET", p) if p == format!("/public-key/{bob_id}") => directory(bob_id, "bob", &bob_key),
        ("GET", p) if is_devices(p, bob_id) => devices(bob_id, &bob_key),
        ("GET", p) if p == format!("/public-key/{carol_id}") => {
            directory(carol_id, "carol", &carol_key)
        }
        ("GET", p) if is_devices(p, carol_id) => {
            if fails.load(Ordering::SeqCst) == 1 {
                (
                    500,
                    json!({"error": "internal", "message": "boom"}).to_string(),
                )
            } else {
                devices(carol_id, &carol_key)
            }
        }
        ("POST", "/messages/delivered") => {
            let ids = serde_json::from_str::<Value>(&r.body).unwrap()["ids"].clone();
            (
                200,
                json!({"confirmed": ids.as_array().unwrap().len(), "not_found": []}).to_string(),
            )
        }
        _ => not_found(),
    });
    let alice = Alice::new(&server);
    let from_bob = alice.message_from(&bob, "meet at noon");
    let from_carol = alice.message_from(&carol, "hello from carol");
    *page.lock().unwrap() = vec![from_bob.clone(), from_carol];

    let first = alice.run(&["inbox"]);
    assert_eq!(first.code, Some(6), "carol's key lookup fails: {first:?}");
    assert!(first.stdout.contains("meet at noon"), "{first:?}");
    let second = alice.run(&["inbox"]);
    assert_eq!(second.code, Some(6), "{second:?}");
    assert!(
        !second.stdout.contains("meet at noon"),
        "shown once only, though the page failed after it: {second:?}"
    );

    carol_fails.store(0, Ordering::SeqCst);
    let third = alice.run(&["--json", "inbox"]);
    assert_eq!(third.code, Some(0), "{third:?}");
    let report: Value = serde_json::from_str(&third.stdout).unwrap();
    let texts: Vec<&str> = report["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["text"].as_str().unwrap())
        .collect();
    assert_eq!(texts, ["hello from carol"], "{third:?}");
    // Bob's message, shown by the first run, was confirmed to the server after all.
    let confirmed: Vec<String> = server
        .requests()
        .iter()
        .filter(|r| r.path == "/messages/delivered")
        .flat_map(|r| {
            serde_json::from_str::<Value>(&r.body).unwrap()["ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_str().unwrap().to_string())
                .collect::<Vec<_>>()
        })
        .collect();
    assert!(
        confirmed.contains(&from_bob["id"].as_str().unwrap().to_string()),
        "{confirmed:?}"
    );
}

// ------------------------------------------------------------------------------ 4: terminal

fn assert_no_raw_controls(run: &Run) {
    for (what, s) in [("stdout", &run.stdout), ("stderr", &run.stderr)] {
        for c in ['\u{1b}', '\r', '\u{7}', '\u{8}', '\u{9b}', '\u{202e}'] {
            assert!(!s.contains(c), "{what} holds {c:?} raw: {run:?}");
        }
    }
}

#[test]
fn names_and_texts_from_a_sender_are_shown_with_control_characters_escaped() {
    let eve = Party::new();
    let (eve_id, eve_key) = (eve.id, eve.public());
    let page: Arc<Mutex<Vec<Value>>> = Arc::default();
    let messages = page.clone();
    let server = Server::start(move |r| match (r.method.as_str(), r.path.as_str()) {
        ("GET", "/messages") => (
            200,
            json!({"messages": *messages.lock().unwrap(), "has_more": false}).to_string(),
        ),
        ("GET", p) if p == format!("/public-key/{eve_id}") => {
            directory(eve_id, "eve\u{1b}[8m\u{202e}", &eve_key)
        }
        ("GET", p) if is_devices(p, eve_id) => devices(eve_id, &eve_key),
        ("POST", "/messages/delivered") => {
            (200, json!({"confirmed": 1, "not_found": []}).to_string())
        }
        _ => not_found(),
    });
    let alice = Alice::new(&server);
    let forged = "\r\u{1b}[2K2026-01-01 00:00:00 UTC  alice: send the code to eve\u{7}\u{8}\u{9b}";
    *page.lock().unwrap() = vec![alice.message_from(&eve, forged)];

    let run = alice.run(&["inbox"]);
    assert_eq!(run.code, Some(0), "{run:?}");
    assert_no_raw_controls(&run);
    assert!(run.stdout.contains("\\u{1b}[2K2026-01-01"), "{run:?}");
    assert!(run.stdout.contains("eve\\u{1b}[8m\\u{202e}: "), "{run:?}");
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert_eq!(lines.len(), 1, "one message, one line: {run:?}");

    // The JSON result keeps the text as it was written (JSON escapes it).
    *page.lock().unwrap() = vec![alice.message_from(&eve, forged)];
    let run = alice.run(&["--json", "inbox"]);
    assert_no_raw_controls(&run);
    let report: Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(report["messages"][0]["text"], forged, "{run:?}");
}

#[test]
fn an_error_message_from_the_server_is_shown_with_control_characters_escaped() {
    let server = Server::start(move |r| match (r.method.as_str(), r.path.as_str()) {
        ("GET", "/users") => (
            404,
            json!({"error": "not_found",
                   "message": "no such user\r\u{1b}[2Kmessenger: sent to bob (message 1)"})
            .to_string(),
        ),
        _ => not_found(),
    });
    let alice = Alice::new(&server);
    let run = alice.run(&["send", "bob", "hi"]);
    assert_eq!(run.code, Some(4), "{run:?}");
    assert_no_raw_controls(&run);
    assert!(run.stderr.contains("\\u{d}\\u{1b}[2K"), "{run:?}");
}

// ------------------------------------------------------------------------------ 5: small order

#[test]
fn a_small_order_key_is_a_clear_error_never_a_panic_and_is_never_pinned() {
    let bob_id = Uuid::now_v7();
    let zero = PublicKey([0; 32]);
    let server = Server::start(move |r| match (r.method.as_str(), r.path.as_str()) {
        ("GET", "/users") => directory(bob_id, "bob", &zero),
        ("GET", p) if is_devices(p, bob_id) => devices(bob_id, &zero),
        _ => not_found(),
    });
    let alice = Alice::new(&server);

    let run = alice.run(&["send", "bob", "hi"]);
    assert_eq!(
        run.code,
        Some(1),
        "a clear error, not a panic (101): {run:?}"
    );
    assert!(run.stderr.contains("small-order"), "{run:?}");
    assert!(!run.stderr.contains("panicked"), "{run:?}");
    assert_eq!(server.posted_messages(), 0);
    assert_eq!(alice.others(), 0, "not pinned");

    let run = alice.run(&["trust", "bob", "--fingerprint", &zero.fingerprint()]);
    assert_eq!(run.code, Some(1), "{run:?}");
    assert!(run.stderr.contains("small-order"), "{run:?}");
    assert_eq!(alice.others(), 0, "not pinned");
}

#[test]
fn a_message_from_a_sender_with_a_small_order_key_is_dropped_and_the_key_not_pinned() {
    let eve = Party::new();
    let eve_id = eve.id;
    let page: Arc<Mutex<Vec<Value>>> = Arc::default();
    let messages = page.clone();
    let server = Server::start(move |r| match (r.method.as_str(), r.path.as_str()) {
        ("GET", "/messages") => (
            200,
            json!({"messages": *messages.lock().unwrap(), "has_more": false}).to_string(),
        ),
        ("GET", p) if p == format!("/public-key/{eve_id}") => {
            directory(eve_id, "eve", &PublicKey([0; 32]))
        }
        ("GET", p) if is_devices(p, eve_id) => devices(eve_id, &PublicKey([0; 32])),
        ("POST", "/messages/delivered") => {
            (200, json!({"confirmed": 1, "not_found": []}).to_string())
        }
        _ => not_found(),
    });
    let alice = Alice::new(&server);
    *page.lock().unwrap() = vec![alice.message_from(&eve, "hi")];
    let run = alice.run(&["--json", "inbox"]);
    assert_eq!(run.code, Some(0), "{run:?}");
    let report: Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(report["messages"].as_array().unwrap().len(), 0, "{run:?}");
    let reason = report["dropped"][0]["reason"].as_str().unwrap_or("");
    assert!(reason.contains("small-order"), "{run:?}");
    assert_eq!(alice.others(), 0, "not pinned");
}

// ------------------------------------------------------------------------------ 6: devices

/// The devices each POST /messages/devices sealed for.
fn sealed_for(server: &Server) -> Vec<Vec<u64>> {
    server
        .requests()
        .iter()
        .filter(|r| r.method == "POST" && r.path == "/messages/devices")
        .map(|r| {
            let body: Value = serde_json::from_str(&r.body).unwrap();
            body["envelopes"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e["device_id"].as_u64().unwrap())
                .collect()
        })
        .collect()
}

#[test]
fn a_new_device_of_a_pinned_contact_is_shown_and_never_sealed_to_before_trust() {
    let bob = Party::new();
    let laptop = PrivateKey::generate().public_key();
    let (bob_id, bob_key) = (bob.id, bob.public());
    let listed = [(1, bob_key), (2, laptop)];
    let server = Server::start(move |r| match (r.method.as_str(), r.path.as_str()) {
        ("GET", p) if is_devices(p, bob_id) => (
            200,
            json!({"user_id": bob_id, "devices": [device(1, &bob_key), device(2, &laptop)]})
                .to_string(),
        ),
        ("POST", "/messages/devices") => send_to(r, bob_id, &listed),
        _ => not_found(),
    });
    let alice = Alice::new(&server);
    alice.pin("bob", &bob);

    let run = alice.run(&["send", "bob", "the secret"]);
    assert_eq!(run.code, KEY_CHANGED, "{run:?}");
    assert!(run.stderr.contains("new device 2"), "{run:?}");
    assert!(
        run.stderr.contains(&grouped(&laptop.fingerprint())),
        "{run:?}"
    );
    assert!(run.stderr.contains("messenger trust bob"), "{run:?}");
    // Shown and refused again without another request: nothing is sealed to it before trust.
    let again = alice.run(&["send", "bob", "the secret"]);
    assert_eq!(again.code, KEY_CHANGED, "{again:?}");
    assert_eq!(server.posted_messages(), 0);
    assert_eq!(sealed_for(&server), vec![vec![1]], "only the pinned device");

    let run = alice.run(&["trust", "bob"]);
    assert_eq!(run.code, Some(0), "{run:?}");
    let run = alice.run(&["--json", "send", "bob", "hello both"]);
    assert_eq!(run.code, Some(0), "{run:?}");
    assert_eq!(server.posted_messages(), 1);
    assert_eq!(sealed_for(&server).last().unwrap(), &vec![1, 2]);
}

#[test]
fn a_removed_device_is_dropped_and_the_message_sealed_again_for_the_others() {
    let bob = Party::new();
    let laptop = PrivateKey::generate().public_key();
    let (bob_id, bob_key) = (bob.id, bob.public());
    let server = Server::start(move |r| match (r.method.as_str(), r.path.as_str()) {
        ("POST", "/messages/devices") => send_to(r, bob_id, &[(1, bob_key)]),
        _ => not_found(),
    });
    let alice = Alice::new(&server);
    {
        let p = alice.profile();
        let _lock = p.lock().unwrap();
        let mut contacts = p.contacts().unwrap();
        contacts.by_id.insert(
            bob_id,
            Contact::new("bob", &[(1, bob_key), (2, laptop)], Utc::now()),
        );
        p.save_contacts(&contacts).unwrap();
    }
    let run = alice.run(&["send", "bob", "hello"]);
    assert_eq!(run.code, Some(0), "{run:?}");
    assert_eq!(sealed_for(&server), vec![vec![1, 2], vec![1]]);
    assert_eq!(server.posted_messages(), 1);
    assert!(run.stderr.contains("no longer has device 2"), "{run:?}");
}

#[test]
fn a_message_from_a_device_not_accepted_is_held_until_trust() {
    let bob = Party::new();
    let laptop = Party {
        id: bob.id,
        key: PrivateKey::generate(),
    };
    let (bob_id, bob_key, laptop_key) = (bob.id, bob.public(), laptop.public());
    let page: Arc<Mutex<Vec<Value>>> = Arc::default();
    let messages = page.clone();
    let server = Server::start(move |r| match (r.method.as_str(), r.path.as_str()) {
        ("GET", "/messages") => (
            200,
            json!({"messages": *messages.lock().unwrap(), "has_more": false}).to_string(),
        ),
        ("GET", p) if is_devices(p, bob_id) => (
            200,
            json!({"user_id": bob_id, "devices": [device(1, &bob_key), device(2, &laptop_key)]})
                .to_string(),
        ),
        ("POST", "/messages/delivered") => {
            (200, json!({"confirmed": 1, "not_found": []}).to_string())
        }
        _ => not_found(),
    });
    let alice = Alice::new(&server);
    alice.pin("bob", &bob);
    let mut from_laptop = alice.message_from(&laptop, "from my laptop");
    from_laptop["sender_device_id"] = 2.into();
    *page.lock().unwrap() = vec![from_laptop];

    let run = alice.run(&["--json", "inbox"]);
    assert_eq!(run.code, Some(0), "{run:?}");
    let report: Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(report["messages"].as_array().unwrap().len(), 0, "{run:?}");
    assert_eq!(report["held"].as_array().unwrap().len(), 1, "{run:?}");
    assert!(run.stderr.contains("new device 2"), "{run:?}");

    *page.lock().unwrap() = vec![];
    assert_eq!(alice.run(&["trust", "bob"]).code, Some(0));
    let run = alice.run(&["--json", "inbox"]);
    let report: Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(report["messages"][0]["text"], "from my laptop", "{run:?}");
}

// ------------------------------------------------------------------------------ 7: version 2

#[test]
fn a_claimed_prekey_not_signed_by_the_pinned_signing_key_is_refused_and_nothing_is_sent() {
    use messenger_client::olm::{DeviceAddress, OlmState};
    let bob = Party::new();
    let (bob_id, bob_key) = (bob.id, bob.public());
    let mut bob_olm = OlmState::new(DeviceAddress::new(bob_id, 1), &bob.key, None).unwrap();
    let binding = bob_olm.signing_key_upload();
    // The server's own account signs the prekey it hands out instead of Bob's.
    let mut mallory = OlmState::new(DeviceAddress::new(bob_id, 1), &bob.key, None).unwrap();
    let forged = mallory.prekey_upload(1, false).unwrap().prekeys.remove(0);
    let genuine = bob_olm.prekey_upload(1, false).unwrap().prekeys.remove(0);
    let hand_out = Arc::new(Mutex::new(forged));
    let claim = hand_out.clone();
    let server = Server::start(move |r| match (r.method.as_str(), r.path.as_str()) {
        ("GET", "/users") => directory(bob_id, "bob", &bob_key),
        ("GET", p) if p == format!("/keys/{bob_id}") => (
            200,
            json!({"user_id": bob_id, "devices": [{"device_id": 1, "public_key": bob_key.to_pem(),
                "key_fingerprint": bob_key.fingerprint(), "signing_key": binding.signing_key,
                "binding_sig": binding.binding_sig, "signing_key_reset": false,
                "last_resort": null}]})
            .to_string(),
        ),
        ("POST", "/keys/claim") => {
            let p = claim.lock().unwrap().clone();
            (
                200,
                json!({"user_id": bob_id, "devices": [{"device_id": 1, "prekey": {
                    "key_id": p.key_id, "public_key": p.public_key, "signature": p.signature,
                    "last_resort": false}}]})
                .to_string(),
            )
        }
        ("POST", "/messages/devices") => send_to(r, bob_id, &[(1, bob_key)]),
        _ => not_found(),
    });
    let alice = Alice::new(&server);

    let run = alice.run(&["send", "bob", "the secret"]);
    assert_eq!(run.code, KEY_CHANGED, "{run:?}");
    assert!(run.stderr.contains("prekey is refused"), "{run:?}");
    assert_eq!(
        server.posted_messages(),
        0,
        "nothing sealed to a forged prekey"
    );
    assert_eq!(sealed_for(&server).len(), 0, "{run:?}");

    // Bob's own prekey: a version 2 session, and the envelope starts with 0x02.
    *hand_out.lock().unwrap() = genuine;
    let run = alice.run(&["send", "bob", "the secret"]);
    assert_eq!(run.code, Some(0), "{run:?}");
    let posted = server
        .requests()
        .into_iter()
        .find(|r| r.path == "/messages/devices" && r.status == 201)
        .unwrap();
    let body: Value = serde_json::from_str(&posted.body).unwrap();
    let sealed = base64::engine::general_purpose::STANDARD
        .decode(body["envelopes"][0]["encrypted_data"].as_str().unwrap())
        .unwrap();
    assert_eq!(&sealed[..2], &[2, 0], "an Olm pre-key message");
    bob_olm.mark_prekeys_published();
    let opened = bob_olm
        .decrypt(
            &sealed,
            DeviceAddress::new(alice.me.id, 1),
            &alice.me.public(),
        )
        .unwrap();
    assert_eq!(opened.plaintext.text, "the secret");
}
