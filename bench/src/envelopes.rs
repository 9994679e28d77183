//! Phase a, what forward secrecy costs (issue 20): the client's own seal and open for envelope
//! version 1 (HPKE) and version 2 (Olm), a session's set-up on both ends, the Olm state the
//! client writes after every message, `POST /keys/claim` in process next to a plain send, and
//! the requests a send makes, counted from the client's code.
//!
//! The crypto is `messenger_client`'s, called as `messenger send` and `messenger inbox` call it:
//! on one thread, no I/O.

use std::collections::VecDeque;
use std::time::Instant;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use common::AppState;
use functions::api_event::ApiEvent;
use messenger_client::envelope::{self, Plaintext};
use messenger_client::keys::{PrivateKey, PublicKey};
use messenger_client::olm::{
    ClaimedPrekey, DeviceAddress, MESSAGE_TYPE_NORMAL, MESSAGE_TYPE_PRE_KEY, OlmState,
    PREKEY_LOW_WATER, PREKEY_TARGET, SignedPrekey, verify_prekey,
};
use serde_json::json;
use uuid::Uuid;

use crate::Settings;
use crate::fixture::{Fixture, PASSWORD, app_state_with, call_ok, fresh_name, next_ip};
use crate::report::{Samples, Table, us};
use crate::statements::timed;

/// The two message sizes: a short chat line and a long paste.
const TEXT_SIZES: [(&str, usize); 2] = [("100 B", 100), ("16 KiB", 16 * 1024)];
/// Peer sessions in the larger Olm state (a user with a few contacts' devices).
const MANY_PEERS: usize = 20;

struct Device {
    address: DeviceAddress,
    key: PrivateKey,
    public: PublicKey,
    state: OlmState,
}

fn device(user_id: Uuid, device_id: u32) -> Device {
    let address = DeviceAddress::new(user_id, device_id);
    let key = PrivateKey::generate();
    let state = OlmState::new(address, &key, None).expect("a fresh Olm account");
    Device {
        address,
        public: key.public_key(),
        key,
        state,
    }
}

/// A published one-time prekey as `POST /keys/claim` answers it.
fn as_claimed(prekey: &SignedPrekey) -> ClaimedPrekey {
    ClaimedPrekey {
        key_id: prekey.key_id,
        public_key: prekey.public_key.clone(),
        signature: prekey.signature.clone(),
        last_resort: false,
    }
}

/// A text of `bytes` ASCII characters (JSON-escaping costs nothing extra on it).
fn text(bytes: usize) -> String {
    "The quick brown fox jumps over the lazy dog. "
        .chars()
        .cycle()
        .take(bytes)
        .collect()
}

fn time<T>(f: impl FnOnce() -> T) -> (f64, T) {
    let started = Instant::now();
    let out = f();
    (started.elapsed().as_secs_f64() * 1e6, out)
}

/// `from` starts a session with `to` from one of `to`'s published one-time keys.
fn start(from: &mut Device, to: &mut Device) {
    let upload = to.state.prekey_upload(1, false).expect("a prekey");
    to.state.mark_prekeys_published();
    let prekey = verify_prekey(
        &as_claimed(&upload.prekeys[0]),
        to.address,
        &to.state.signing_key(),
    )
    .expect("the prekey verifies");
    from.state
        .start_session(&to.public, &prekey)
        .expect("an outbound session");
}

/// One message from `from` to `to`, opened: (seal us, open us, envelope bytes, its type byte).
fn exchange(from: &mut Device, to: &mut Device, text: &str) -> (f64, f64, usize, u8) {
    let plaintext = Plaintext::new(text);
    let (seal, sealed) = time(|| from.state.encrypt(to.address, &to.public, &plaintext));
    let sealed = sealed.expect("a session to encrypt with");
    let (open, opened) = time(|| to.state.decrypt(&sealed, from.address, &from.public));
    assert_eq!(opened.expect("the message opens").plaintext.text, text);
    (seal, open, sealed.len(), sealed[1])
}

/// Two devices with an answered session (a message each way): later messages are normal ones.
fn established() -> (Device, Device) {
    let (mut alice, mut bob) = (device(Uuid::now_v7(), 1), device(Uuid::now_v7(), 1));
    start(&mut alice, &mut bob);
    exchange(&mut alice, &mut bob, "hello");
    exchange(&mut bob, &mut alice, "hi");
    (alice, bob)
}

#[derive(Default)]
struct SealOpen {
    seal: Vec<f64>,
    open: Vec<f64>,
    bytes: usize,
}

impl SealOpen {
    fn push(&mut self, i: usize, warmup: usize, (seal, open, bytes, _): (f64, f64, usize, u8)) {
        if i >= warmup {
            self.seal.push(seal);
            self.open.push(open);
        }
        self.bytes = bytes;
    }

    fn row(self, table: &mut Table, what: &str, size: &str) {
        let (seal, open) = (Samples::from_us(self.seal), Samples::from_us(self.open));
        table.row(vec![
            what.into(),
            size.into(),
            self.bytes.to_string(),
            us(seal.p50()),
            us(seal.p99()),
            us(open.p50()),
            us(open.p99()),
        ]);
    }
}

fn seal_and_open(settings: &Settings) {
    let mut table = Table::new(
        "a1. Per message: seal and open as the client runs them (us; messenger_client, one thread, no I/O)",
        &[
            "envelope", "text", "bytes", "seal p50", "p99", "open p50", "p99",
        ],
    );
    for (size, bytes) in TEXT_SIZES {
        let body = text(bytes);
        let n = if bytes > 1000 {
            settings.iterations / 4
        } else {
            settings.iterations
        }
        .max(10);
        let warmup = (n / 10).max(10);

        // Version 1: HPKE auth mode, two X25519 operations to seal and two to open.
        let (alice, bob) = (device(Uuid::now_v7(), 1), device(Uuid::now_v7(), 1));
        let (a, b) = (alice.address.user_id, bob.address.user_id);
        let mut v1 = SealOpen::default();
        for i in 0..warmup + n {
            let plaintext = Plaintext::new(body.as_str());
            let (seal, sealed) = time(|| envelope::seal(&plaintext, a, &alice.key, b, &bob.public));
            let (open, opened) =
                time(|| envelope::open(&sealed, a, b, &[&bob.key], &[alice.public]));
            assert_eq!(opened.expect("v1 opens").plaintext.text, body);
            v1.push(i, warmup, (seal, open, sealed.len(), sealed[0]));
        }
        v1.row(&mut table, "v1 HPKE", size);

        // Version 2, normal messages one way: the chain key moves on, no Diffie-Hellman.
        let (mut alice, mut bob) = established();
        let mut normal = SealOpen::default();
        for i in 0..warmup + n {
            let sent = exchange(&mut alice, &mut bob, &body);
            assert_eq!(sent.3, MESSAGE_TYPE_NORMAL);
            normal.push(i, warmup, sent);
        }
        normal.row(&mut table, "v2 Olm normal, same sender", size);

        // Version 2, each message a reply: a new ratchet key each turn (one X25519 to seal,
        // one to open).
        let (mut alice, mut bob) = established();
        let mut replies = SealOpen::default();
        for i in 0..warmup + n {
            let (from, to) = if i % 2 == 0 {
                (&mut alice, &mut bob)
            } else {
                (&mut bob, &mut alice)
            };
            let sent = exchange(from, to, &body);
            assert_eq!(sent.3, MESSAGE_TYPE_NORMAL);
            replies.push(i, warmup, sent);
        }
        replies.row(&mut table, "v2 Olm normal, each a reply", size);

        // Version 2, pre-key messages (the sender has no answer yet) on a session the
        // recipient already made from the first one.
        let (mut alice, mut bob) = (device(Uuid::now_v7(), 1), device(Uuid::now_v7(), 1));
        start(&mut alice, &mut bob);
        exchange(&mut alice, &mut bob, "hello");
        let mut pre_key = SealOpen::default();
        for i in 0..warmup + n {
            let sent = exchange(&mut alice, &mut bob, &body);
            assert_eq!(sent.3, MESSAGE_TYPE_PRE_KEY);
            pre_key.push(i, warmup, sent);
        }
        pre_key.row(&mut table, "v2 Olm pre-key, session known", size);
    }
    table.note("v1: HPKE auth mode (DHKEM X25519, HKDF-SHA256, ChaCha20Poly1305), the same two long-term keys for every message");
    table.note("v2: the plaintext JSON gains from/to; open works on a copy of the session (pickled and read back) and keeps it only if the message opens");
    table.note("each a reply: every message carries a new ratchet key; pre-key: sent before any answer, the recipient finds the session the first one made");
    table.print();
}

fn session_setup(settings: &Settings) {
    let n = (settings.iterations / 4).max(10);
    let warmup = (n / 10).max(10);
    let mut alice = device(Uuid::now_v7(), 1);
    let mut bob = device(Uuid::now_v7(), 1);
    let bob_signing = bob.state.signing_key();
    let body = text(100);
    let mut stock: VecDeque<SignedPrekey> = VecDeque::new();
    let (mut verify, mut start, mut first, mut sender, mut recipient, mut top_up) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    for i in 0..warmup + n {
        // The recipient tops its stock up as the client does: back to the target when it runs
        // below the low-water mark; the private keys it holds are in every inbound session's
        // account copy.
        if stock.len() < PREKEY_LOW_WATER as usize {
            let wanted = PREKEY_TARGET as usize - stock.len();
            let (t, upload) = time(|| bob.state.prekey_upload(wanted, i == 0));
            bob.state.mark_prekeys_published();
            top_up.push(t);
            stock.extend(upload.expect("prekeys").prekeys);
        }
        let claimed = as_claimed(&stock.pop_front().expect("a prekey in stock"));

        let (t_verify, verified) = time(|| verify_prekey(&claimed, bob.address, &bob_signing));
        let verified = verified.expect("the prekey verifies");
        let (t_start, started) = time(|| alice.state.start_session(&bob.public, &verified));
        started.expect("an outbound session");
        let plaintext = Plaintext::new(body.as_str());
        let (t_first, sealed) = time(|| alice.state.encrypt(bob.address, &bob.public, &plaintext));
        let sealed = sealed.expect("the new session encrypts");
        assert_eq!(sealed[1], MESSAGE_TYPE_PRE_KEY);
        let (t_open, opened) = time(|| bob.state.decrypt(&sealed, alice.address, &alice.public));
        let opened = opened.expect("the pre-key message opens");
        assert!(opened.new_session, "the recipient made a new session");
        if i >= warmup {
            verify.push(t_verify);
            start.push(t_start);
            first.push(t_first);
            sender.push(t_verify + t_start + t_first);
            recipient.push(t_open);
        }
    }
    let mut table = Table::new(
        &format!(
            "a2. Session set-up, v2 (us; {n} sessions, 100 B first message, the recipient holding {PREKEY_LOW_WATER} to {PREKEY_TARGET} one-time keys)"
        ),
        &["step", "p50", "p99"],
    );
    for (what, v) in [
        ("sender: verify_prekey (Ed25519 signature)", verify),
        ("sender: start_session (X3DH-like, 3 X25519)", start),
        ("sender: first encrypt (pre-key message)", first),
        ("sender: the three together", sender),
        (
            "recipient: inbound session + first decrypt (one-time key used up)",
            recipient,
        ),
        (
            "recipient: prekey_upload of a top-up (25 to 50 keys, signed)",
            top_up,
        ),
    ] {
        let s = Samples::from_us(v);
        table.row(vec![what.into(), us(s.p50()), us(s.p99())]);
    }
    table.note("plus the claim's round trip on the sender (a4), and on both ends the state written after the message (a3)");
    table.print();
}

/// A device with `one_time_keys` of its own prekeys published and an answered session with each
/// of `peers` others.
fn state_with_peers(peers: usize, one_time_keys: usize) -> Device {
    let mut me = device(Uuid::now_v7(), 1);
    me.state
        .prekey_upload(one_time_keys, true)
        .expect("prekeys");
    me.state.mark_prekeys_published();
    for _ in 0..peers {
        let mut peer = device(Uuid::now_v7(), 1);
        start(&mut me, &mut peer);
        exchange(&mut me, &mut peer, "hello");
        exchange(&mut peer, &mut me, "hi");
    }
    me
}

fn persistence(settings: &Settings) {
    let n = (settings.iterations / 4).max(10);
    let warmup = (n / 10).max(10);
    let mut table = Table::new(
        &format!(
            "a3. Olm state persistence: OlmState::to_json and from_json (us; {n} iterations; the account holds {PREKEY_TARGET} one-time keys unless said)"
        ),
        &[
            "state",
            "JSON bytes",
            "to_json p50",
            "p99",
            "from_json p50",
            "p99",
        ],
    );
    let target = PREKEY_TARGET as usize;
    for (what, peers, one_time_keys) in [
        ("1 peer session".to_string(), 1, target),
        (format!("{MANY_PEERS} peer sessions"), MANY_PEERS, target),
        ("1 peer session, no one-time key held".into(), 1, 0),
    ] {
        let me = state_with_peers(peers, one_time_keys);
        let (mut write, mut read, mut size) = (vec![], vec![], 0);
        for i in 0..warmup + n {
            let (t_write, json) = time(|| me.state.to_json());
            let (t_read, back) = time(|| OlmState::from_json(&json, &me.public));
            back.expect("the state reads back");
            size = json.len();
            if i >= warmup {
                write.push(t_write);
                read.push(t_read);
            }
        }
        let (write, read) = (Samples::from_us(write), Samples::from_us(read));
        table.row(vec![
            what,
            size.to_string(),
            us(write.p50()),
            us(write.p99()),
            us(read.p50()),
            us(read.p99()),
        ]);
    }
    table.note("the client serializes the state after every message it seals or opens (before the send, before the confirm) and reads it each time a command loads it;");
    table.note("reading an account back derives the public key of every private key it holds (an X25519 each), as does the account copy a first decrypt works on (a2)");
    table.note("the 0600 atomic file write itself (write, fsync, rename) is not in these figures");
    table.print();
}

/// A user whose device 1 has an X25519 key, a signing key and `stock` signed one-time prekeys
/// on the server: (user id, its device, its token).
async fn recipient_with_prekeys(state: &'static AppState, stock: usize) -> (Uuid, Device, String) {
    let key = PrivateKey::generate();
    let body = call_ok(
        state,
        ApiEvent::new("POST", "/register")
            .source_ip(&next_ip())
            .json(json!({"name": fresh_name("fiona"), "password": PASSWORD,
                         "public_key": key.public_key().to_pem()})),
        201,
    )
    .await;
    let user: Uuid = body["id"].as_str().unwrap().parse().unwrap();
    let token = state.jwt().unwrap().issue(user, 1).unwrap().access_token;
    let address = DeviceAddress::new(user, 1);
    let mut device = Device {
        address,
        public: key.public_key(),
        state: OlmState::new(address, &key, None).expect("an Olm account"),
        key,
    };
    call_ok(
        state,
        ApiEvent::new("PUT", "/keys/signing-key")
            .bearer(&token)
            .json(serde_json::to_value(device.state.signing_key_upload()).unwrap()),
        200,
    )
    .await;
    let mut uploaded = 0;
    while uploaded < stock {
        let upload = device
            .state
            .prekey_upload((stock - uploaded).min(100), uploaded == 0)
            .expect("prekeys");
        uploaded += upload.prekeys.len();
        call_ok(
            state,
            ApiEvent::new("POST", "/keys/prekeys")
                .bearer(&token)
                .json(serde_json::to_value(&upload).unwrap()),
            200,
        )
        .await;
        device.state.mark_prekeys_published();
    }
    (user, device, token)
}

async fn prekey_count(state: &'static AppState, token: &str) -> (i64, i64) {
    let count = call_ok(
        state,
        ApiEvent::new("GET", "/keys/prekeys/count").bearer(token),
        200,
    )
    .await;
    (
        count["available"].as_i64().unwrap(),
        count["last_resort_claims"].as_i64().unwrap_or(0),
    )
}

async fn claim_latency(settings: &Settings, fx: &Fixture) -> (f64, f64) {
    let n = (settings.iterations / 2).max(10);
    let warmup = (n / 10).max(20);
    // The deployed pool and statements; only the quotas are lifted so that one requester can
    // claim a thousand keys of one device, each a one-time key (their counting is still paid).
    let state = app_state_with(
        &settings.database_url,
        4,
        None,
        &[
            ("PREKEY_CLAIMS_PER_WINDOW", "1000000".into()),
            ("PREKEY_CLAIMS_PER_TARGET", "1000000".into()),
            ("PREKEY_MAX_STORED", "100000".into()),
        ],
    )
    .await;
    let (user, mut bob, bob_token) = recipient_with_prekeys(state, warmup + n).await;
    let (available, _) = prekey_count(state, &bob_token).await;
    assert_eq!(available as usize, warmup + n, "the stock uploaded");

    // A plain send to the same device, as the client makes it: one v2 normal envelope of a
    // 100 B text through POST /messages/devices.
    let mut alice = device(fx.alice, 1);
    start(&mut alice, &mut bob);
    exchange(&mut alice, &mut bob, "hello");
    exchange(&mut bob, &mut alice, "hi");
    let sealed = alice
        .state
        .encrypt(bob.address, &bob.public, &Plaintext::new(text(100)))
        .expect("a normal message");
    let send = ApiEvent::new("POST", "/messages/devices")
        .bearer(&fx.alice_token)
        .json(json!({"recipient_id": user, "envelopes": [{
            "device_id": 1,
            "key_fingerprint": bob.public.fingerprint(),
            "encrypted_data": B64.encode(&sealed),
        }]}));
    let claim = ApiEvent::new("POST", "/keys/claim")
        .bearer(&fx.alice_token)
        .json(json!({"user_id": user, "device_ids": [1]}));

    let (available, _) = prekey_count(state, &bob_token).await;
    let (mut claims, mut sends) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for i in 0..warmup + n {
        let c = timed(state, &claim, 200).await;
        let s = timed(state, &send, 201).await;
        if i >= warmup {
            claims.push(c);
            sends.push(s);
        }
    }
    // Every claim took a one-time key of its own, none fell back to the last-resort key.
    let (left, last_resort_claims) = prekey_count(state, &bob_token).await;
    assert_eq!(
        (left, last_resort_claims),
        (available - (warmup + n) as i64, 0)
    );
    let (claims, sends) = (Samples::from_us(claims), Samples::from_us(sends));

    let mut table = Table::new(
        &format!(
            "a4. POST /keys/claim against a plain send (us; handler in process, deployed pool settings, interleaved, {n} iterations)"
        ),
        &["request", "p50", "p99"],
    );
    table.row(vec![
        "POST /keys/claim (1 device, a fresh one-time key each)".into(),
        us(claims.p50()),
        us(claims.p99()),
    ]);
    table.row(vec![
        format!(
            "POST /messages/devices (1 device, v2 normal, {} B)",
            sealed.len()
        ),
        us(sends.p50()),
        us(sends.p99()),
    ]);
    table.note("claim: claim_prekeys(): the caller's device, the target's devices, the requester's and the target's counters, DELETE ... RETURNING of the lowest one-time key");
    table.note("checked after the run: the device's stock fell by exactly the number of claims and no claim was answered with the last-resort key");
    table.print();
    (claims.p50(), sends.p50())
}

fn requests_per_message((claim_p50, send_p50): (f64, f64)) {
    let mut table = Table::new(
        "a5. Requests per `messenger send` to a contact's one device (counted from client/src/app/send.rs, not measured; a cached token)",
        &["case", "lookups", "claims", "sends", "total"],
    );
    for (case, lookups, claims, sends) in [
        ("v2, first contact (name not pinned yet)", 2, 1, 1),
        ("v2, first message to a pinned device", 0, 1, 1),
        ("v2, later messages (session kept)", 0, 0, 1),
        ("v1 (the device publishes no signing key)", 0, 0, 1),
    ] {
        table.row(vec![
            case.into(),
            lookups.to_string(),
            claims.to_string(),
            sends.to_string(),
            (lookups + claims + sends).to_string(),
        ]);
    }
    table.note("lookups: GET /users?name= and GET /keys/{id} (contact_for); claims: POST /keys/claim (seal_for, one for all the contact's devices without a session); sends: POST /messages/devices (post_with_retries, one for all devices)");
    table.note("besides: GET /keys/{own id} on the first send and when the own device list is over 10 min old (send_copies); v1 to a contact: GET /keys/{id} when its pins are over 10 min old (refresh_signing_keys)");
    table.note("with other devices of one's own: their copy is one more POST /messages/devices (and one POST /keys/claim while one of them has no session); a lone device posts no copy");
    table.note("not counted: POST /login when the cached token has expired; one more POST per 409 devices_changed answer");
    table.note(&format!(
        "a claim adds a round trip and {} us of handler time (a4) to a first message, whose send takes {} us",
        us(claim_p50),
        us(send_p50)
    ));
    table.print();
}

pub(crate) async fn phase_a(settings: &Settings, fx: &Fixture) {
    seal_and_open(settings);
    session_setup(settings);
    persistence(settings);
    let latencies = claim_latency(settings, fx).await;
    requests_per_message(latencies);
}
