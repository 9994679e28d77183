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

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::AppState;
use functions::api_event::ApiEvent;
use serde_json::json;
use sqlx::ConnectOptions;
use sqlx::postgres::{PgConnectOptions, PgSslMode};

use crate::Settings;
use crate::fixture::{ED25519, Fixture, PASSWORD, app_state_with, fresh_name, next_ip};
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

struct Case {
    label: &'static str,
    status: u16,
    /// Built per request (logins and registrations need a fresh source address or name).
    request: Box<dyn Fn() -> ApiEvent>,
    /// Runs iterations / this (bcrypt at cost 4 still costs milliseconds).
    divisor: usize,
}

fn cases(fx: &Fixture) -> Vec<Case> {
    let t = fx.alice_token.clone();
    let fixed = |event: ApiEvent| -> Box<dyn Fn() -> ApiEvent> { Box::new(move || event.clone()) };
    let login_name = fx.login_4.clone();
    vec![
        Case {
            label: "GET /me",
            status: 200,
            request: fixed(ApiEvent::new("GET", "/me").bearer(&t)),
            divisor: 1,
        },
        Case {
            label: "GET /public-key/{id}",
            status: 200,
            request: fixed(ApiEvent::new("GET", format!("/public-key/{}", fx.bob)).bearer(&t)),
            divisor: 1,
        },
        Case {
            label: "GET /users?name=",
            status: 200,
            request: fixed(ApiEvent::new("GET", format!("/users?name={}", fx.bob_name)).bearer(&t)),
            divisor: 1,
        },
        Case {
            label: "PUT /update-key",
            status: 200,
            request: fixed(
                ApiEvent::new("PUT", "/update-key")
                    .bearer(&t)
                    .json(json!({"public_key": ED25519})),
            ),
            divisor: 1,
        },
        Case {
            label: "POST /messages (1 KiB)",
            status: 201,
            request: fixed(
                ApiEvent::new("POST", "/messages")
                    .bearer(&t)
                    .json(json!({"recipient_id": fx.carol, "encrypted_data": fx.ciphertext_b64})),
            ),
            divisor: 1,
        },
        Case {
            label: "GET /messages (10 x 1 KiB)",
            status: 200,
            request: fixed(ApiEvent::new("GET", "/messages").bearer(&t)),
            divisor: 1,
        },
        Case {
            label: "PUT /messages/{id}/delivered",
            status: 204,
            request: fixed(
                ApiEvent::new("PUT", format!("/messages/{}/delivered", fx.confirmed_id)).bearer(&t),
            ),
            divisor: 1,
        },
        Case {
            label: "GET /health/ready",
            status: 200,
            request: fixed(ApiEvent::new("GET", "/health/ready")),
            divisor: 1,
        },
        Case {
            label: "POST /login (cost 4)",
            status: 200,
            request: Box::new(move || {
                ApiEvent::new("POST", "/login")
                    .source_ip(&next_ip())
                    .json(json!({"name": login_name, "password": PASSWORD}))
            }),
            divisor: 5,
        },
        Case {
            label: "POST /register (cost 4)",
            status: 201,
            request: Box::new(|| {
                ApiEvent::new("POST", "/register")
                    .source_ip(&next_ip())
                    .json(json!({"name": fresh_name("rt"), "password": PASSWORD, "public_key": ED25519}))
            }),
            divisor: 5,
        },
    ]
}

pub(crate) async fn phase9(settings: &Settings, fx: &Fixture) {
    let rtt = Duration::from_micros(crate::env_number("BENCH_RTT_US", 1000u64).max(2));
    let (proxy, url) = proxy_for(&settings.database_url, rtt / 2);
    // Deployed settings: every statement unnamed, one connection per instance.
    let state: &'static AppState = app_state_with(
        &url,
        4,
        None,
        &[
            ("DB_STATEMENT_CACHE_CAPACITY", "0".into()),
            ("DB_MAX_CONNECTIONS", "1".into()),
        ],
    )
    .await;
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
            "messages P/D/S",
        ],
    );
    for case in cases(fx) {
        let iterations = (n / case.divisor).max(10);
        let warmup = (iterations / 10).max(5);
        let mut samples = Vec::with_capacity(iterations);
        let mut total = Counts::default();
        for i in 0..warmup + iterations {
            let request = (case.request)();
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
            case.label.to_string(),
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
    // What one statement costs through the proxy with no handler around it: the floor as this
    // machine reaches it (the delay threads' wake-ups and the debug build's driver included).
    let mut bare = Vec::with_capacity(n);
    for _ in 0..n + 20 {
        quiesce(state.pool()).await;
        let started = Instant::now();
        state
            .db
            .query("SELECT 1")
            .execute(state.pool())
            .await
            .expect("SELECT 1 through the proxy");
        bare.push(started.elapsed().as_secs_f64() * 1e6);
    }
    let bare = Samples::from_us(bare.split_off(20));
    table.note(&format!(
        "a bare SELECT 1 on the same pool through the proxy: p50 {:.2} ms (the set RTT is {rtt_ms:.2} ms; the rest is the proxy's thread wake-ups and the driver)",
        bare.p50() / 1e3
    ));
    table.note("round trips: client writes after the server's last answer (and the first write), counted at the proxy, including the pool's work when the connection is released; statements: Execute and simple Query messages; floor: statements x RTT; P/D/S: Parse, Describe and Sync messages per request");
    table.note("done when every endpoint is at one round trip per statement and its p50 within the floor + 20%");
    table.print();
}
