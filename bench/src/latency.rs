//! Phase 9, latency as deployed: a small TCP proxy between the functions and PostgreSQL that
//! holds every chunk for a set one-way delay (default 0.5 ms each way: 1 ms round trip, what RDS
//! Proxy costs in a region) and reads the client's side of the protocol to count, per
//! connection, the round trips (the first client write, and every client write after the
//! server has sent something since the client's last write) and the statements (Execute and
//! simple Query messages). Each endpoint's warm p50 through it is printed next to its floor:
//! the statements it runs times the round-trip time.
//!
//! The proxy runs on its own OS threads with blocking sockets: tokio's timer has a resolution
//! of 1 ms, too coarse to hold a chunk for 0.5 ms, while `std::thread::sleep` is accurate to
//! some tens of microseconds. The bench's own runtime stays the functions' current_thread one.
//!
//! Environment: BENCH_RTT_US (1000), BENCH_ITERATIONS (capped at 500 here).

use std::cell::RefCell;
use std::future::Future;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::AppState;
use functions::api_event::ApiEvent;
use functions::routes::ROUTES;
use messenger_client::keys::PrivateKey;
use messenger_client::olm::{DeviceAddress, OlmState, PrekeyUpload};
use serde_json::json;
use sqlx::ConnectOptions;
use sqlx::postgres::{PgConnectOptions, PgSslMode};
use uuid::Uuid;

use crate::Settings;
use crate::fixture::{ED25519, Fixture, PASSWORD, app_state_with, call_ok, fresh_name, next_ip};
use crate::handler_cost::quiesce;
use crate::report::{Samples, Table};
use crate::statements::timed;

/// What the proxy has seen, over all its connections.
#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) connections: AtomicU64,
    pub(crate) round_trips: AtomicU64,
    /// Execute ('E') and simple Query ('Q') messages.
    pub(crate) statements: AtomicU64,
    /// Parse ('P'), Sync ('S') and Describe ('D') messages.
    pub(crate) parses: AtomicU64,
    pub(crate) syncs: AtomicU64,
    pub(crate) describes: AtomicU64,
}

/// A snapshot of the counters, for differences.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Counts {
    pub(crate) connections: u64,
    pub(crate) round_trips: u64,
    pub(crate) statements: u64,
    pub(crate) parses: u64,
    pub(crate) syncs: u64,
    pub(crate) describes: u64,
}

impl std::ops::Sub for Counts {
    type Output = Counts;
    fn sub(self, o: Counts) -> Counts {
        Counts {
            connections: self.connections - o.connections,
            round_trips: self.round_trips - o.round_trips,
            statements: self.statements - o.statements,
            parses: self.parses - o.parses,
            syncs: self.syncs - o.syncs,
            describes: self.describes - o.describes,
        }
    }
}

/// The delaying, counting proxy. It lives as long as the process (its threads are detached).
pub(crate) struct LatencyProxy {
    pub(crate) port: u16,
    pub(crate) counters: Arc<Counters>,
}

impl LatencyProxy {
    /// Listens on an ephemeral loopback port and forwards every connection to `upstream`
    /// ("host:port"), holding each chunk `one_way` in each direction.
    pub(crate) fn start(upstream: String, one_way: Duration) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        let counters = Arc::new(Counters::default());
        let c = counters.clone();
        std::thread::Builder::new()
            .name("latency-proxy".into())
            .spawn(move || {
                for client in listener.incoming() {
                    let Ok(client) = client else { continue };
                    let Ok(server) = TcpStream::connect(&upstream) else {
                        let _ = client.shutdown(Shutdown::Both);
                        continue;
                    };
                    c.connections.fetch_add(1, Ordering::Relaxed);
                    if let Err(e) = connect_pair(client, server, one_way, c.clone()) {
                        eprintln!("latency proxy: {e}");
                    }
                }
            })?;
        Ok(Self { port, counters })
    }

    pub(crate) fn counts(&self) -> Counts {
        let c = &self.counters;
        Counts {
            connections: c.connections.load(Ordering::SeqCst),
            round_trips: c.round_trips.load(Ordering::SeqCst),
            statements: c.statements.load(Ordering::SeqCst),
            parses: c.parses.load(Ordering::SeqCst),
            syncs: c.syncs.load(Ordering::SeqCst),
            describes: c.describes.load(Ordering::SeqCst),
        }
    }
}

fn connect_pair(
    client: TcpStream,
    server: TcpStream,
    one_way: Duration,
    counters: Arc<Counters>,
) -> std::io::Result<()> {
    client.set_nodelay(true)?;
    server.set_nodelay(true)?;
    // True until the client's first write, and again whenever the server has sent something
    // since the client's last write: the client's next write then starts a new round trip.
    let server_spoke = Arc::new(AtomicBool::new(true));
    let upstream = Direction::ClientToServer {
        server_spoke: server_spoke.clone(),
        frontend: Frontend::default(),
        counters,
    };
    let downstream = Direction::ServerToClient { server_spoke };
    pipe(client.try_clone()?, server.try_clone()?, one_way, upstream)?;
    pipe(server, client, one_way, downstream)?;
    Ok(())
}

enum Direction {
    ClientToServer {
        server_spoke: Arc<AtomicBool>,
        frontend: Frontend,
        counters: Arc<Counters>,
    },
    ServerToClient {
        server_spoke: Arc<AtomicBool>,
    },
}

impl Direction {
    fn saw(&mut self, data: &[u8]) {
        match self {
            Direction::ClientToServer {
                server_spoke,
                frontend,
                counters,
            } => {
                if server_spoke.swap(false, Ordering::SeqCst) {
                    counters.round_trips.fetch_add(1, Ordering::SeqCst);
                }
                frontend.feed(data, counters);
            }
            Direction::ServerToClient { server_spoke } => {
                server_spoke.store(true, Ordering::SeqCst);
            }
        }
    }
}

/// One direction: a reader thread stamps each chunk with its release time, a writer thread
/// sends it on then (order kept; a chunk read while another waits is not delayed twice).
fn pipe(
    mut from: TcpStream,
    mut to: TcpStream,
    one_way: Duration,
    mut direction: Direction,
) -> std::io::Result<()> {
    let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>)>();
    std::thread::Builder::new()
        .name("latency-read".into())
        .spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match from.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        direction.saw(&buf[..n]);
                        if tx
                            .send((Instant::now() + one_way, buf[..n].to_vec()))
                            .is_err()
                        {
                            break;
                        }
                    }
                }
            }
            // Dropping tx ends the writer, which then closes its side.
        })?;
    std::thread::Builder::new()
        .name("latency-write".into())
        .spawn(move || {
            for (due, chunk) in rx {
                let now = Instant::now();
                if due > now {
                    std::thread::sleep(due - now);
                }
                if to.write_all(&chunk).is_err() {
                    break;
                }
            }
            let _ = to.shutdown(Shutdown::Write);
        })?;
    Ok(())
}

const SSL_REQUEST: u32 = 80_877_103;
const GSSENC_REQUEST: u32 = 80_877_104;

/// The frontend (client) side of the protocol, framed to count its messages. Assumes a
/// plaintext connection (the bench connects to the proxy with sslmode=disable).
#[derive(Default)]
struct Frontend {
    /// After the startup message: every message is a tag byte and a length.
    started: bool,
    head: Vec<u8>,
    /// Body bytes of the current message still to skip.
    skip: usize,
}

impl Frontend {
    fn feed(&mut self, mut data: &[u8], counters: &Counters) {
        loop {
            let k = self.skip.min(data.len());
            self.skip -= k;
            data = &data[k..];
            if data.is_empty() {
                return;
            }
            let need = if self.started { 5 } else { 8 };
            let take = (need - self.head.len()).min(data.len());
            self.head.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.head.len() < need {
                return;
            }
            let h = &self.head;
            if self.started {
                let len = u32::from_be_bytes([h[1], h[2], h[3], h[4]]) as usize;
                let counter = match h[0] {
                    b'E' | b'Q' => Some(&counters.statements),
                    b'P' => Some(&counters.parses),
                    b'S' => Some(&counters.syncs),
                    b'D' => Some(&counters.describes),
                    _ => None,
                };
                if let Some(c) = counter {
                    c.fetch_add(1, Ordering::SeqCst);
                }
                self.skip = len.saturating_sub(4);
            } else {
                let len = u32::from_be_bytes([h[0], h[1], h[2], h[3]]) as usize;
                let code = u32::from_be_bytes([h[4], h[5], h[6], h[7]]);
                self.started = code != SSL_REQUEST && code != GSSENC_REQUEST;
                self.skip = len.saturating_sub(8);
            }
            self.head.clear();
        }
    }
}

/// Starts a proxy in front of the server `database_url` names and returns it with a URL to it
/// (same credentials and database, sslmode=disable so the proxy can read the protocol).
pub(crate) fn proxy_for(database_url: &str, one_way: Duration) -> (LatencyProxy, String) {
    let options: PgConnectOptions = database_url.parse().expect("a valid DATABASE_URL");
    let upstream = format!("{}:{}", options.get_host(), options.get_port());
    let proxy = LatencyProxy::start(upstream, one_way).expect("starting the latency proxy");
    let url = options
        .host("127.0.0.1")
        .port(proxy.port)
        .ssl_mode(PgSslMode::Disable)
        .to_url_lossy()
        .to_string();
    (proxy, url)
}

/// A request as a case makes it: work that must happen before each request (a fresh account, a
/// link code, a device to remove, messages to confirm, new prekeys) runs in this future, on a
/// separate pool that bypasses the proxy, before the counters are read and the clock starts.
type Prepared = Pin<Box<dyn Future<Output = ApiEvent>>>;

struct Case {
    /// The route of `functions::routes::ROUTES` it measures: (method, path template).
    route: (&'static str, &'static str),
    label: String,
    status: u16,
    /// Builds the next request, doing its untimed, uncounted set-up first.
    request: Box<dyn FnMut() -> Prepared>,
    /// Runs iterations / this (bcrypt at cost 4 still costs milliseconds).
    divisor: usize,
}

impl Case {
    fn new(
        route: (&'static str, &'static str),
        label: impl Into<String>,
        status: u16,
        divisor: usize,
        request: Box<dyn FnMut() -> Prepared>,
    ) -> Self {
        Self {
            route,
            label: label.into(),
            status,
            request,
            divisor,
        }
    }
}

/// The same request every time.
fn fixed(event: ApiEvent) -> Box<dyn FnMut() -> Prepared> {
    Box::new(move || {
        let event = event.clone();
        Box::pin(async move { event })
    })
}

/// A request built anew each time, with no set-up against the database.
fn each(mut make: impl FnMut() -> ApiEvent + 'static) -> Box<dyn FnMut() -> Prepared> {
    Box::new(move || {
        let event = make();
        Box::pin(async move { event })
    })
}

/// A request after its own set-up (through `direct`, off the proxy).
fn prepared<F, Fut>(mut make: F) -> Box<dyn FnMut() -> Prepared>
where
    F: FnMut() -> Fut + 'static,
    Fut: Future<Output = ApiEvent> + 'static,
{
    Box::new(move || Box::pin(make()))
}

/// Warm-up and timed iterations of a case.
fn runs(n: usize, divisor: usize) -> (usize, usize) {
    let iterations = (n / divisor).max(10);
    ((iterations / 10).max(5), iterations)
}

/// What the extra cases need on top of the fixture: every limit they would trip lifted (their
/// counting is still paid), for the proxied instance and the direct one that prepares requests.
const LIFTED: &[(&str, &str)] = &[
    ("MAX_DEVICES_PER_ACCOUNT", "100"),
    ("LINK_CODES_MAX_PER_WINDOW", "1000000"),
    ("LINK_MAX_FAILURES", "1000000"),
    ("LOGIN_MAX_FAILURES", "1000000"),
    ("LOGIN_MAX_FAILURES_PER_NAME", "1000000"),
    ("LOGIN_MAX_FAILURES_PER_ADDRESS", "1000000"),
    ("REGISTER_MAX_PER_ADDRESS", "1000000"),
    ("PREKEY_CLAIMS_PER_WINDOW", "1000000"),
    ("PREKEY_CLAIMS_PER_TARGET", "1000000"),
];

/// Devices linked to one account before the link case moves to a fresh one (the limit is 100).
const LINKS_PER_ACCOUNT: usize = 90;
/// Messages confirmed by one POST /messages/delivered, and one-time keys per POST /keys/prekeys.
const BATCH: usize = 10;
const PREKEYS_PER_UPLOAD: usize = 10;

/// The account the link case links to, and the links made so far.
type Linker = (Rc<Account>, usize);

/// An account made through the handlers on `direct`, with an X25519 device key (so its devices
/// can have signing keys), its device 1's token.
struct Account {
    id: Uuid,
    name: String,
    token: String,
    key: PrivateKey,
}

async fn account(direct: &'static AppState, prefix: &str) -> Account {
    let key = PrivateKey::generate();
    let name = fresh_name(prefix);
    let body = call_ok(
        direct,
        ApiEvent::new("POST", "/register")
            .source_ip(&next_ip())
            .json(json!({"name": name, "password": PASSWORD, "public_key": key.public_key().to_pem()})),
        201,
    )
    .await;
    let id: Uuid = body["id"].as_str().unwrap().parse().unwrap();
    Account {
        id,
        token: token(direct, id, 1),
        name,
        key,
    }
}

fn token(state: &'static AppState, user: Uuid, device: u32) -> String {
    state
        .jwt()
        .unwrap()
        .issue(user, device)
        .unwrap()
        .access_token
}

/// A new device of `account` through POST /devices/link-codes and POST /devices: its id.
async fn link(direct: &'static AppState, account: &Account, key: &PrivateKey) -> u32 {
    let body = call_ok(direct, link_code(&account.token), 201).await;
    let code = body["code"].as_str().unwrap().to_string();
    let linked = call_ok(direct, link_request(account, &code, key), 201).await;
    linked["device_id"].as_u64().unwrap() as u32
}

fn link_code(token: &str) -> ApiEvent {
    ApiEvent::new("POST", "/devices/link-codes").bearer(token)
}

fn link_request(account: &Account, code: &str, key: &PrivateKey) -> ApiEvent {
    ApiEvent::new("POST", "/devices")
        .source_ip(&next_ip())
        .json(
            json!({"name": account.name, "password": PASSWORD, "link_code": code,
                     "public_key": key.public_key().to_pem(), "label": "bench"}),
        )
}

/// The Olm state of `account`'s device `device` (its signing key from `seed`, or a fresh one).
fn olm(account: &Account, device: u32, key: &PrivateKey, seed: Option<&[u8; 32]>) -> OlmState {
    OlmState::new(DeviceAddress::new(account.id, device), key, seed).expect("an Olm account")
}

fn signing_key_request(token: &str, olm: &OlmState, password: bool) -> ApiEvent {
    let mut body = serde_json::to_value(olm.signing_key_upload()).unwrap();
    if password {
        body["password"] = json!(PASSWORD);
    }
    ApiEvent::new("PUT", "/keys/signing-key")
        .bearer(token)
        .json(body)
}

/// The device publishes its signing key and `stock` one-time prekeys (and a last-resort key).
async fn publish(direct: &'static AppState, token: &str, olm: &mut OlmState, stock: usize) {
    call_ok(direct, signing_key_request(token, olm, false), 200).await;
    let mut uploaded = 0;
    while uploaded < stock {
        let upload = olm
            .prekey_upload((stock - uploaded).min(100), uploaded == 0)
            .expect("prekeys");
        uploaded += upload.prekeys.len();
        call_ok(direct, prekeys_request(token, &upload), 200).await;
        olm.mark_prekeys_published();
    }
}

fn prekeys_request(token: &str, upload: &PrekeyUpload) -> ApiEvent {
    ApiEvent::new("POST", "/keys/prekeys")
        .bearer(token)
        .json(serde_json::to_value(upload).unwrap())
}

async fn cases(fx: &Fixture, direct: &'static AppState, n: usize) -> Vec<Case> {
    let t = fx.alice_token.clone();
    let login_name = fx.login_4.clone();

    // Kim: two devices, each with a signing key and a stock of one-time prekeys for every claim
    // of the claim case; the target of the key, device list and fan-out reads.
    let (warmup, iterations) = runs(n, 1);
    let stock = warmup + iterations + 10;
    let kim = account(direct, "kim").await;
    let mut kim1 = olm(&kim, 1, &kim.key, None);
    publish(direct, &kim.token, &mut kim1, stock).await;
    let kim2_key = PrivateKey::generate();
    let kim2 = link(direct, &kim, &kim2_key).await;
    let mut kim2_olm = olm(&kim, kim2, &kim2_key, None);
    publish(direct, &token(direct, kim.id, kim2), &mut kim2_olm, stock).await;
    let fan_out = ApiEvent::new("POST", "/messages/devices").bearer(&t).json(
        json!({"recipient_id": kim.id, "envelopes": [
            {"device_id": 1, "key_fingerprint": kim.key.public_key().fingerprint(),
             "encrypted_data": fx.ciphertext_b64},
            {"device_id": kim2, "key_fingerprint": kim2_key.public_key().fingerprint(),
             "encrypted_data": fx.ciphertext_b64},
        ]}),
    );

    // Pat: uploads BATCH fresh one-time keys per request, each id above the last.
    let pat = account(direct, "pat").await;
    let mut pat_olm = olm(&pat, 1, &pat.key, None);
    publish(direct, &pat.token, &mut pat_olm, 0).await;
    let (pat_id, pat_token) = (pat.id, pat.token.clone());
    let pat_olm = Rc::new(RefCell::new(pat_olm));

    // Ria: her signing key replaced by password each time, with A and B in turn.
    let ria = account(direct, "ria").await;
    let ria_keys = [
        olm(&ria, 1, &ria.key, Some(&[1; 32])),
        olm(&ria, 1, &ria.key, Some(&[2; 32])),
    ];
    call_ok(
        direct,
        signing_key_request(&ria.token, &ria_keys[0], false),
        200,
    )
    .await;
    let ria_resets = [
        signing_key_request(&ria.token, &ria_keys[1], true),
        signing_key_request(&ria.token, &ria_keys[0], true),
    ];
    let mut ria_turn = 0usize;

    // Dan: confirms BATCH messages sent to him just before.
    let dan = account(direct, "dan").await;
    let dan_id = dan.id;
    let dan_token = dan.token.clone();
    let sender = fx.alice_token.clone();
    let ciphertext = fx.ciphertext_b64.clone();

    // Lin: makes link codes (one device, so never full).
    let lin = account(direct, "lin").await;

    // Linker accounts: a fresh code per link, a fresh account every LINKS_PER_ACCOUNT links.
    let linker: Rc<RefCell<Option<Linker>>> = Rc::new(RefCell::new(None));

    // Rem: a device linked before each removal.
    let rem = Rc::new(account(direct, "rem").await);

    vec![
        Case::new(
            ("POST", "/register"),
            "POST /register (cost 4)",
            201,
            5,
            each(|| {
                ApiEvent::new("POST", "/register")
                    .source_ip(&next_ip())
                    .json(json!({"name": fresh_name("rt"), "password": PASSWORD, "public_key": ED25519}))
            }),
        ),
        Case::new(
            ("POST", "/login"),
            "POST /login (cost 4)",
            200,
            5,
            each(move || {
                ApiEvent::new("POST", "/login")
                    .source_ip(&next_ip())
                    .json(json!({"name": login_name, "password": PASSWORD}))
            }),
        ),
        Case::new(
            ("GET", "/me"),
            "GET /me",
            200,
            1,
            fixed(ApiEvent::new("GET", "/me").bearer(&t)),
        ),
        Case::new(
            ("DELETE", "/me"),
            "DELETE /me (cost 4; a fresh account each)",
            204,
            5,
            prepared(move || async move {
                let gone = account(direct, "gone").await;
                ApiEvent::new("DELETE", "/me")
                    .bearer(&gone.token)
                    .json(json!({"password": PASSWORD}))
            }),
        ),
        Case::new(
            ("GET", "/public-key/{user_id}"),
            "GET /public-key/{id}",
            200,
            1,
            fixed(ApiEvent::new("GET", format!("/public-key/{}", fx.bob)).bearer(&t)),
        ),
        Case::new(
            ("PUT", "/update-key"),
            "PUT /update-key",
            200,
            1,
            fixed(
                ApiEvent::new("PUT", "/update-key")
                    .bearer(&t)
                    .json(json!({"public_key": ED25519})),
            ),
        ),
        Case::new(
            ("GET", "/users"),
            "GET /users?name=",
            200,
            1,
            fixed(ApiEvent::new("GET", format!("/users?name={}", fx.bob_name)).bearer(&t)),
        ),
        Case::new(
            ("GET", "/health"),
            "GET /health",
            200,
            1,
            fixed(ApiEvent::new("GET", "/health")),
        ),
        Case::new(
            ("GET", "/health/ready"),
            "GET /health/ready",
            200,
            1,
            fixed(ApiEvent::new("GET", "/health/ready")),
        ),
        Case::new(
            ("POST", "/messages"),
            "POST /messages (1 KiB)",
            201,
            1,
            fixed(
                ApiEvent::new("POST", "/messages")
                    .bearer(&t)
                    .json(json!({"recipient_id": fx.carol, "encrypted_data": fx.ciphertext_b64})),
            ),
        ),
        Case::new(
            ("GET", "/messages"),
            "GET /messages (10 x 1 KiB)",
            200,
            1,
            fixed(ApiEvent::new("GET", "/messages").bearer(&t)),
        ),
        Case::new(
            ("PUT", "/messages/{id}/delivered"),
            "PUT /messages/{id}/delivered",
            204,
            1,
            fixed(
                ApiEvent::new("PUT", format!("/messages/{}/delivered", fx.confirmed_id)).bearer(&t),
            ),
        ),
        Case::new(
            ("POST", "/messages/delivered"),
            format!("POST /messages/delivered ({BATCH} ids)"),
            200,
            1,
            prepared(move || {
                let (sender, ciphertext, dan_token) =
                    (sender.clone(), ciphertext.clone(), dan_token.clone());
                async move {
                    let mut ids = Vec::with_capacity(BATCH);
                    for _ in 0..BATCH {
                        let sent = call_ok(
                            direct,
                            ApiEvent::new("POST", "/messages").bearer(&sender).json(
                                json!({"recipient_id": dan_id, "encrypted_data": ciphertext}),
                            ),
                            201,
                        )
                        .await;
                        ids.push(sent["id"].as_str().unwrap().to_string());
                    }
                    ApiEvent::new("POST", "/messages/delivered")
                        .bearer(&dan_token)
                        .json(json!({ "ids": ids }))
                }
            }),
        ),
        Case::new(
            ("POST", "/messages/devices"),
            "POST /messages/devices (2 devices, 1 KiB each)",
            201,
            1,
            fixed(fan_out),
        ),
        Case::new(
            ("GET", "/metrics"),
            "GET /metrics",
            200,
            1,
            fixed(ApiEvent::new("GET", "/metrics")),
        ),
        Case::new(
            ("POST", "/devices/link-codes"),
            "POST /devices/link-codes",
            201,
            1,
            fixed(link_code(&lin.token)),
        ),
        Case::new(
            ("POST", "/devices"),
            "POST /devices (cost 4; a fresh code each)",
            201,
            5,
            prepared(move || {
                let linker = linker.clone();
                async move {
                    let current = linker.borrow().clone();
                    let (account_, links) = match current {
                        Some((a, links)) if links < LINKS_PER_ACCOUNT => (a, links),
                        _ => (Rc::new(account(direct, "linker").await), 0),
                    };
                    *linker.borrow_mut() = Some((account_.clone(), links + 1));
                    let body = call_ok(direct, link_code(&account_.token), 201).await;
                    link_request(
                        &account_,
                        body["code"].as_str().unwrap(),
                        &PrivateKey::generate(),
                    )
                }
            }),
        ),
        Case::new(
            ("GET", "/me/devices"),
            "GET /me/devices (2 devices)",
            200,
            1,
            fixed(ApiEvent::new("GET", "/me/devices").bearer(&kim.token)),
        ),
        Case::new(
            ("GET", "/users/{user_id}/devices"),
            "GET /users/{id}/devices (2 devices)",
            200,
            1,
            fixed(ApiEvent::new("GET", format!("/users/{}/devices", kim.id)).bearer(&t)),
        ),
        Case::new(
            ("DELETE", "/devices/{device_id}"),
            "DELETE /devices/{id} (cost 4; a device linked before each)",
            204,
            5,
            prepared(move || {
                let rem = rem.clone();
                async move {
                    let device = link(direct, &rem, &rem.key).await;
                    ApiEvent::new("DELETE", format!("/devices/{device}"))
                        .bearer(&rem.token)
                        .json(json!({"password": PASSWORD}))
                }
            }),
        ),
        Case::new(
            ("PUT", "/keys/signing-key"),
            "PUT /keys/signing-key (first key; a fresh account each)",
            200,
            1,
            prepared(move || async move {
                let fresh = account(direct, "sk").await;
                signing_key_request(&fresh.token, &olm(&fresh, 1, &fresh.key, None), false)
            }),
        ),
        Case::new(
            ("PUT", "/keys/signing-key"),
            "PUT /keys/signing-key (reset by password, cost 4)",
            200,
            5,
            each(move || {
                // B first (the key set is A), then A, B, ...: a real replacement each time.
                ria_turn += 1;
                ria_resets[(ria_turn - 1) % 2].clone()
            }),
        ),
        Case::new(
            ("POST", "/keys/prekeys"),
            format!("POST /keys/prekeys ({PREKEYS_PER_UPLOAD} keys)"),
            200,
            1,
            prepared(move || {
                let (pat_olm, pat_token) = (pat_olm.clone(), pat_token.clone());
                async move {
                    let upload = {
                        let mut olm = pat_olm.borrow_mut();
                        let upload = olm
                            .prekey_upload(PREKEYS_PER_UPLOAD, false)
                            .expect("prekeys");
                        // The handler's 200 is asserted; the state only makes the next ids.
                        olm.mark_prekeys_published();
                        upload
                    };
                    // The stock stays under the deployed PREKEY_MAX_STORED (1000), as the
                    // upload counts it: emptied whenever another upload could pass 900.
                    let first = upload.prekeys[0].key_id as usize;
                    if first > 0 && first % 900 < PREKEYS_PER_UPLOAD {
                        sqlx::query(
                            "DELETE FROM prekeys WHERE user_id = $1 AND device_id = 1 AND NOT last_resort",
                        )
                        .bind(pat_id)
                        .execute(direct.pool())
                        .await
                        .expect("emptying the uploader's stock");
                    }
                    prekeys_request(&pat_token, &upload)
                }
            }),
        ),
        Case::new(
            ("GET", "/keys/prekeys/count"),
            format!("GET /keys/prekeys/count ({stock} keys)"),
            200,
            1,
            fixed(ApiEvent::new("GET", "/keys/prekeys/count").bearer(&kim.token)),
        ),
        Case::new(
            ("GET", "/keys/{user_id}"),
            "GET /keys/{id} (2 devices)",
            200,
            1,
            fixed(ApiEvent::new("GET", format!("/keys/{}", kim.id)).bearer(&t)),
        ),
        Case::new(
            ("POST", "/keys/claim"),
            "POST /keys/claim (2 devices, one-time keys)",
            200,
            1,
            fixed(
                ApiEvent::new("POST", "/keys/claim")
                    .bearer(&t)
                    .json(json!({"user_id": kim.id, "device_ids": [1, kim2]})),
            ),
        ),
    ]
}

/// The routes of `functions::routes::ROUTES` no case measures. Every route there is one a
/// client calls (the purge is an EventBridge schedule and the 404 fallback answers paths no
/// route has: neither is in the table), so none is exempt. A case naming a route the table does
/// not have is a mistake in this file.
fn uncovered(cases: &[Case]) -> Vec<String> {
    for case in cases {
        assert!(
            ROUTES.iter().any(|&(m, p, _)| (m, p) == case.route),
            "{}: {:?} is not a route of functions::routes::ROUTES",
            case.label,
            case.route
        );
    }
    ROUTES
        .iter()
        .filter(|&&(m, p, _)| !cases.iter().any(|c| c.route == (m, p)))
        .map(|&(m, p, f)| format!("{m} {p} ({f})"))
        .collect()
}

/// The p50 of one statement alone through the proxy, in µs: what one round trip costs this
/// machine with no handler around it (the delay threads' wake-ups and the driver included).
async fn bare_p50(state: &AppState, sql: &'static str, n: usize) -> f64 {
    let mut samples = Vec::with_capacity(n + 20);
    for _ in 0..n + 20 {
        quiesce(state.pool()).await;
        let started = Instant::now();
        state
            .db
            .query(sql)
            .execute(state.pool())
            .await
            .expect("a bare statement through the proxy");
        samples.push(started.elapsed().as_secs_f64() * 1e6);
    }
    Samples::from_us(samples.split_off(20)).p50()
}

pub(crate) async fn phase9(settings: &Settings, fx: &Fixture) {
    let rtt = Duration::from_micros(crate::env_number("BENCH_RTT_US", 1000u64).max(2));
    let (proxy, url) = proxy_for(&settings.database_url, rtt / 2);
    let mut extra: Vec<(&'static str, String)> =
        LIFTED.iter().map(|&(k, v)| (k, v.to_string())).collect();
    // The requests' set-up goes straight to the database, so the proxy counts only the
    // measured requests.
    let direct: &'static AppState = app_state_with(&settings.database_url, 4, None, &extra).await;
    // Deployed settings: every statement unnamed, one connection per instance.
    extra.extend([
        ("DB_STATEMENT_CACHE_CAPACITY", "0".into()),
        ("DB_MAX_CONNECTIONS", "1".into()),
    ]);
    let state: &'static AppState = app_state_with(&url, 4, None, &extra).await;
    let n = settings.iterations.min(500);
    let rtt_ms = rtt.as_secs_f64() * 1e3;
    let mut table = Table::new(
        &format!(
            "9. At a deployment's latency: handlers in process through a proxy adding {:.2} ms each way ({rtt_ms:.2} ms RTT), statement cache 0, one connection (ms; up to {n} warm iterations each)",
            rtt_ms / 2.0
        ),
        &[
            "endpoint",
            "p50",
            "p99",
            "round trips",
            "statements",
            "floor",
            "p50 / floor",
            "bare trips",
            "p50 / bare",
            "messages P/D/S",
        ],
    );
    // Measured first, on the warm connection: a read alone, and a write's commit alone
    // (txid_current() takes a transaction id, so its commit flushes the WAL as a write's does).
    let bare = bare_p50(state, "SELECT 1", n).await / 1e3;
    let bare_commit = bare_p50(state, "SELECT txid_current()", n).await / 1e3;
    let mut cases = cases(fx, direct, n).await;
    let missing = uncovered(&cases);
    for case in &mut cases {
        let (warmup, iterations) = runs(n, case.divisor);
        let mut samples = Vec::with_capacity(iterations);
        let mut total = Counts::default();
        for i in 0..warmup + iterations {
            // Set-up first (off the proxy), then the counters and the clock.
            let request = (case.request)().await;
            quiesce(state.pool()).await;
            let before = proxy.counts();
            let elapsed = timed(state, &request, case.status).await;
            // Until the connection is back in the pool: the release's own traffic (the pool's
            // ping) belongs to this request.
            quiesce(state.pool()).await;
            let d = proxy.counts() - before;
            if i >= warmup {
                samples.push(elapsed);
                total = Counts {
                    connections: total.connections + d.connections,
                    round_trips: total.round_trips + d.round_trips,
                    statements: total.statements + d.statements,
                    parses: total.parses + d.parses,
                    syncs: total.syncs + d.syncs,
                    describes: total.describes + d.describes,
                };
            }
        }
        let k = iterations as f64;
        let per = |v: u64| v as f64 / k;
        let s = Samples::from_us(samples);
        let floor = per(total.statements) * rtt_ms;
        table.row(vec![
            case.label.clone(),
            format!("{:.2}", s.p50() / 1e3),
            format!("{:.2}", s.p99() / 1e3),
            format!("{:.2}", per(total.round_trips)),
            format!("{:.2}", per(total.statements)),
            format!("{floor:.2}"),
            if floor > 0.0 {
                format!("{:.2}", s.p50() / 1e3 / floor)
            } else {
                "-".into()
            },
            format!("{:.2}", per(total.statements) * bare),
            if floor > 0.0 {
                format!("{:.2}", s.p50() / 1e3 / (per(total.statements) * bare))
            } else {
                "-".into()
            },
            format!(
                "{:.1}/{:.1}/{:.1}",
                per(total.parses),
                per(total.describes),
                per(total.syncs)
            ),
        ]);
        if total.connections > 0 {
            table.note(&format!(
                "{}: {} new connection(s) during the timed iterations (their handshakes are counted)",
                case.label, total.connections
            ));
        }
    }
    table.note(&format!(
        "bare trips: statements x a bare SELECT 1 through the proxy, p50 {bare:.2} ms (the set RTT is {rtt_ms:.2} ms; the rest is the proxy's thread wake-ups and the driver): the floor as this machine reaches it; a bare commit (SELECT txid_current(), a WAL flush) takes {bare_commit:.2} ms, which every write pays once"
    ));
    table.note("round trips: client writes after the server's last answer (and the first write), counted at the proxy, including the pool's work when the connection is released; statements: Execute and simple Query messages; floor: statements x RTT; P/D/S: Parse, Describe and Sync messages per request");
    if missing.is_empty() {
        table.note(&format!(
            "every route of functions::routes::ROUTES ({}) has a case; not routes there, so not here: the purge (an EventBridge schedule) and the 404 fallback",
            ROUTES.len()
        ));
    } else {
        let names = missing.join(", ");
        eprintln!("phase 9: routes without a case: {names}");
        table.note(&format!(
            "ROUTES WITHOUT A CASE (add one to latency.rs cases()): {names}"
        ));
    }
    table.note("set-up per request (fresh accounts, link codes, devices to remove, messages to confirm, new prekeys) runs on a separate pool straight to the database, before the counters are read and the clock starts");
    table.note("done when every endpoint is at one round trip per statement and its p50 within the floor + 20%: p50 / bare, for reads; writes add one commit, bcrypt its hash");
    table.print();
}
