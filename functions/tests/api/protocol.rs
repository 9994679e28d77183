//! The wire protocol per statement (vendor/sqlx-postgres, issue 21): an unnamed statement whose
//! parameter types are all known is one exchange (Parse, Bind, Describe, Execute, Close and Sync
//! in one write, one ReadyForQuery back), a connection released idle is not pinged, and errors
//! inside the one exchange (a constraint violation, a statement timeout, an error after some
//! rows, a terminated backend) leave the connection usable or closed, never out of step.
//!
//! Counted by a proxy between the client and PostgreSQL that frames the client's messages: a
//! round trip is a client write after the server has answered (and the first write).

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use serde_json::{Value, json};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgSslMode};
use sqlx::{Column, Connection, PgConnection, PgPool, Row, TypeInfo};

use crate::prekeys;
use crate::support::{PASSWORD, RequestBuilder, TestApp, TestResponse, key};

#[derive(Default)]
struct Counters {
    round_trips: AtomicU64,
    statements: AtomicU64,
    parses: AtomicU64,
    describes: AtomicU64,
    syncs: AtomicU64,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Counts {
    round_trips: u64,
    /// Execute and simple Query messages.
    statements: u64,
    parses: u64,
    describes: u64,
    syncs: u64,
}

impl std::ops::Sub for Counts {
    type Output = Counts;
    fn sub(self, o: Counts) -> Counts {
        Counts {
            round_trips: self.round_trips - o.round_trips,
            statements: self.statements - o.statements,
            parses: self.parses - o.parses,
            describes: self.describes - o.describes,
            syncs: self.syncs - o.syncs,
        }
    }
}

/// A counting TCP proxy on its own threads (no delay: the bench's phase 9 adds that).
struct Proxy {
    port: u16,
    counters: Arc<Counters>,
}

impl Proxy {
    fn start(upstream: String) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let counters = Arc::new(Counters::default());
        let c = counters.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                let Ok(server) = TcpStream::connect(&upstream) else {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let spoke = Arc::new(AtomicBool::new(true));
                let (c2, s2) = (c.clone(), spoke.clone());
                let (cr, sw) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                std::thread::spawn(move || {
                    let mut frontend = Frontend::default();
                    forward(cr, sw, |data| {
                        if s2.swap(false, Ordering::SeqCst) {
                            c2.round_trips.fetch_add(1, Ordering::SeqCst);
                        }
                        frontend.feed(data, &c2);
                    })
                });
                std::thread::spawn(move || {
                    forward(server, client, |_| spoke.store(true, Ordering::SeqCst))
                });
            }
        });
        Self { port, counters }
    }

    fn counts(&self) -> Counts {
        let c = &self.counters;
        Counts {
            round_trips: c.round_trips.load(Ordering::SeqCst),
            statements: c.statements.load(Ordering::SeqCst),
            parses: c.parses.load(Ordering::SeqCst),
            describes: c.describes.load(Ordering::SeqCst),
            syncs: c.syncs.load(Ordering::SeqCst),
        }
    }

    /// The test database's options, through this proxy (plaintext, so it can read them).
    fn options(&self, pool: &PgPool) -> PgConnectOptions {
        (*pool.connect_options())
            .clone()
            .host("127.0.0.1")
            .port(self.port)
            .ssl_mode(PgSslMode::Disable)
    }

    fn for_pool(pool: &PgPool) -> Self {
        let o = pool.connect_options();
        Self::start(format!("{}:{}", o.get_host(), o.get_port()))
    }
}

fn forward(mut from: TcpStream, mut to: TcpStream, mut saw: impl FnMut(&[u8])) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                saw(&buf[..n]);
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

#[derive(Default)]
struct Frontend {
    started: bool,
    head: Vec<u8>,
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
                let counter = match h[0] {
                    b'E' | b'Q' => Some(&counters.statements),
                    b'P' => Some(&counters.parses),
                    b'D' => Some(&counters.describes),
                    b'S' => Some(&counters.syncs),
                    _ => None,
                };
                if let Some(c) = counter {
                    c.fetch_add(1, Ordering::SeqCst);
                }
                self.skip =
                    (u32::from_be_bytes([h[1], h[2], h[3], h[4]]) as usize).saturating_sub(4);
            } else {
                let len = u32::from_be_bytes([h[0], h[1], h[2], h[3]]) as usize;
                let code = u32::from_be_bytes([h[4], h[5], h[6], h[7]]);
                // SSLRequest and GSSENCRequest come before the startup message.
                self.started = code != 80_877_103 && code != 80_877_104;
                self.skip = len.saturating_sub(8);
            }
            self.head.clear();
        }
    }
}

/// One statement: one write, one exchange, one Sync.
const ONE_EXCHANGE: Counts = Counts {
    round_trips: 1,
    statements: 1,
    parses: 1,
    describes: 1,
    syncs: 1,
};

async fn wait_idle(pool: &PgPool) {
    for _ in 0..200 {
        if pool.num_idle() == pool.size() as usize {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("the pool's connection never came back idle");
}

async fn int(conn: &mut PgConnection, v: i64) -> i64 {
    sqlx::query_scalar::<_, i64>("SELECT $1::int8")
        .persistent(false)
        .bind(v)
        .fetch_one(&mut *conn)
        .await
        .unwrap()
}

fn code(e: &sqlx::Error) -> String {
    e.as_database_error()
        .and_then(|d| d.code())
        .map(|c| c.into_owned())
        .unwrap_or_else(|| format!("not a database error: {e}"))
}

/// Every endpoint's statement is one exchange, and a released connection is not pinged: the
/// round trips of a request are exactly its statements, with one Sync each.
#[sqlx::test(migrator = "common::db::MIGRATOR")]
async fn one_round_trip_per_statement_through_the_handlers(pool: PgPool) {
    let proxy = Proxy::for_pool(&pool);
    let through = PgPoolOptions::new()
        .max_connections(1)
        .connect_lazy_with(proxy.options(&pool));
    let app = TestApp::with_env(through, &[]);
    let (_, token) = app.user("alice").await;
    let (bob, _) = app.user("bob").await;
    let sent = app
        .request("POST", "/messages")
        .bearer(&token)
        .json(json!({"recipient_id": bob, "encrypted_data": "aGVsbG8="}))
        .send()
        .await;
    assert_eq!(sent.status, 201, "{}", sent.text);
    wait_idle(app.state.pool()).await;

    let requests = [
        ("GET", "/me".to_string(), None, 200),
        ("GET", format!("/public-key/{bob}"), None, 200),
        ("GET", "/users?name=bob".to_string(), None, 200),
        (
            "PUT",
            "/update-key".to_string(),
            Some(json!({"public_key": key("ed25519.pem")})),
            200,
        ),
        (
            "POST",
            "/messages".to_string(),
            Some(json!({"recipient_id": bob, "encrypted_data": "aGVsbG8="})),
            201,
        ),
        ("GET", "/messages".to_string(), None, 200),
        ("GET", "/health/ready".to_string(), None, 200),
    ];
    for (method, path, body, status) in requests {
        let before = proxy.counts();
        let mut request = app.request(method, &path).bearer(&token);
        if let Some(body) = body {
            request = request.json(body);
        }
        let r = request.send().await;
        assert_eq!(r.status, status, "{method} {path}: {}", r.text);
        wait_idle(app.state.pool()).await;
        let d = proxy.counts() - before;
        assert!(d.statements >= 1, "{method} {path}: {d:?}");
        assert_eq!(
            (d.round_trips, d.parses, d.describes, d.syncs),
            (d.statements, d.statements, d.statements, d.statements),
            "{method} {path}: one exchange (Parse, Describe, Sync) per statement, no ping: {d:?}"
        );
    }
    // A login (two statements) and a registration: still one exchange each.
    let before = proxy.counts();
    app.login("alice").await;
    wait_idle(app.state.pool()).await;
    let d = proxy.counts() - before;
    assert_eq!(
        (d.round_trips, d.syncs),
        (d.statements, d.statements),
        "{d:?}"
    );
    app.state.pool().close().await;
}

/// One request through an app whose one connection goes through `proxy`: its answer and what
/// it cost on the wire, counted once the connection is back in the pool.
async fn counted(
    app: &TestApp,
    proxy: &Proxy,
    request: RequestBuilder<'_>,
) -> (TestResponse, Counts) {
    wait_idle(app.state.pool()).await;
    let before = proxy.counts();
    let response = request.send().await;
    wait_idle(app.state.pool()).await;
    (response, proxy.counts() - before)
}

/// An app on one connection through a counting proxy (opened first, so its start-up is counted
/// against no request), and each request's round trips, statements and Syncs against the
/// floor it should take.
struct AtTheFloor {
    proxy: Proxy,
    app: TestApp,
    seen: std::cell::RefCell<Vec<(&'static str, Counts, u64)>>,
}

impl AtTheFloor {
    async fn new(pool: &PgPool, vars: &[(&str, &str)]) -> Self {
        let proxy = Proxy::for_pool(pool);
        let through = PgPoolOptions::new()
            .max_connections(1)
            .connect_lazy_with(proxy.options(pool));
        let app = TestApp::with_env(through, vars);
        let ready = app.request("GET", "/health/ready").send().await;
        assert_eq!(ready.status, 200, "{}", ready.text);
        Self {
            proxy,
            app,
            seen: Default::default(),
        }
    }

    /// `request`, which must answer `status`, in `floor` round trips (checked by `assert_all`).
    async fn expect(
        &self,
        what: &'static str,
        request: RequestBuilder<'_>,
        status: u16,
        floor: u64,
    ) {
        let (r, d) = counted(&self.app, &self.proxy, request).await;
        assert_eq!(r.status, status, "{what}: {}", r.text);
        self.seen.borrow_mut().push((what, d, floor));
    }

    /// Prints every request's figures, then holds each to one round trip, statement and Sync
    /// per statement it needs.
    async fn assert_all(self) {
        let seen = self.seen.take();
        for (what, d, _) in &seen {
            println!(
                "{what:28} {} round trips, {} statements, {} syncs",
                d.round_trips, d.statements, d.syncs
            );
        }
        for (what, d, floor) in seen {
            assert_eq!(
                (d.round_trips, d.statements, d.syncs),
                (floor, floor, floor),
                "{what}"
            );
        }
        self.app.state.pool().close().await;
    }
}

/// The account endpoints at their floor: a request takes one round trip per statement, and
/// only the statements it needs. bcrypt runs between the statement that counts the attempt
/// (and finds the hash) and the one that writes the outcome, so a success takes two; every
/// refusal is decided by the first and takes one. Registration checks its limit and the name
/// before bcrypt too (a refused one costs no hashing), then inserts: two on success.
#[sqlx::test(migrator = "common::db::MIGRATOR")]
async fn account_endpoints_take_the_round_trips_they_need(pool: PgPool) {
    let floor = AtTheFloor::new(
        &pool,
        &[
            ("LOGIN_MAX_FAILURES", "2"),
            ("REGISTER_MAX_PER_ADDRESS", "2"),
        ],
    )
    .await;
    let app = &floor.app;
    let register = |name: &str, ip: &str| {
        app.request("POST", "/register")
            .with_source_ip(ip)
            .json(json!({"name": name, "password": PASSWORD, "public_key": key("ed25519.pem")}))
    };
    let login = |name: &str, password: &str, ip: &str| {
        app.request("POST", "/login")
            .with_source_ip(ip)
            .json(json!({"name": name, "password": password}))
    };
    let delete = |token: &str, password: &str, ip: &str| {
        app.request("DELETE", "/me")
            .bearer(token)
            .with_source_ip(ip)
            .json(json!({"password": password}))
    };

    floor
        .expect("register", register("alice", "192.0.2.1"), 201, 2)
        .await;
    floor
        .expect(
            "register, name taken",
            register("ALICE", "192.0.2.2"),
            409,
            1,
        )
        .await;
    for name in ["filler1", "filler2"] {
        assert_eq!(register(name, "192.0.2.3").send().await.status, 201);
    }
    floor
        .expect(
            "register, over the limit",
            register("filler3", "192.0.2.3"),
            429,
            1,
        )
        .await;

    floor
        .expect("login", login("alice", PASSWORD, "192.0.2.4"), 200, 2)
        .await;
    floor
        .expect(
            "login, wrong password",
            login("alice", "wrong-password", "192.0.2.5"),
            401,
            1,
        )
        .await;
    floor
        .expect(
            "login, unknown name",
            login("nobody", PASSWORD, "192.0.2.5"),
            401,
            1,
        )
        .await;
    assert_eq!(
        login("alice", "wrong-password", "192.0.2.5")
            .send()
            .await
            .status,
        401
    );
    floor
        .expect(
            "login, over the limit",
            login("alice", PASSWORD, "192.0.2.5"),
            429,
            1,
        )
        .await;

    let token = app.login("alice").await;
    floor
        .expect(
            "delete, wrong password",
            delete(&token, "wrong-password", "192.0.2.6"),
            401,
            1,
        )
        .await;
    // A 429 is decided by the statement that checked the token's device: no check after it.
    floor
        .expect(
            "delete, over the limit",
            delete(&token, PASSWORD, "192.0.2.5"),
            429,
            1,
        )
        .await;
    floor
        .expect("delete", delete(&token, PASSWORD, "192.0.2.6"), 204, 2)
        .await;
    floor
        .expect(
            "delete, account gone",
            delete(&token, PASSWORD, "192.0.2.6"),
            401,
            1,
        )
        .await;

    floor.assert_all().await;
}

/// The device endpoints that take a password at the same floor: a link, a removal and a
/// signing-key reset write their success in the statement after bcrypt, and a refusal by the
/// password or a limit takes the one statement that counted it.
#[sqlx::test(migrator = "common::db::MIGRATOR")]
async fn device_endpoints_take_the_round_trips_they_need(pool: PgPool) {
    let floor = AtTheFloor::new(&pool, &[("LOGIN_MAX_FAILURES", "2")]).await;
    let app = &floor.app;
    let alice = prekeys::x25519_user(app, "alice").await;
    let link_code = || async {
        let r = app
            .request("POST", "/devices/link-codes")
            .bearer(&alice.token)
            .send()
            .await;
        assert_eq!(r.status, 201, "{}", r.text);
        r.body["code"].as_str().unwrap().to_string()
    };
    let link = |code: &str, password: &str, ip: &str| {
        app.request("POST", "/devices").with_source_ip(ip).json(
            json!({"name": "alice", "password": password, "link_code": code,
                         "public_key": key("x25519.pem"), "label": "laptop"}),
        )
    };
    let remove = |device: i32, password: &str, ip: &str| {
        app.request("DELETE", &format!("/devices/{device}"))
            .bearer(&alice.token)
            .with_source_ip(ip)
            .json(json!({"password": password}))
    };

    let code = link_code().await;
    floor
        .expect(
            "link, wrong password",
            link(&code, "wrong-password", "192.0.2.1"),
            401,
            1,
        )
        .await;
    floor
        .expect(
            "link, wrong code",
            link("AAAA-AAAA-AAAA", PASSWORD, "192.0.2.2"),
            403,
            2,
        )
        .await;
    floor
        .expect("link", link(&code, PASSWORD, "192.0.2.2"), 201, 2)
        .await;
    assert_eq!(
        link(&code, "wrong-password", "192.0.2.1")
            .send()
            .await
            .status,
        401
    );
    floor
        .expect(
            "link, over the limit",
            link(&code, PASSWORD, "192.0.2.1"),
            429,
            1,
        )
        .await;

    floor
        .expect(
            "remove, wrong password",
            remove(2, "wrong-password", "192.0.2.3"),
            401,
            1,
        )
        .await;
    // Refused before any statement; the runtime's check of the token's device is the one.
    floor
        .expect("remove device 1", remove(1, PASSWORD, "192.0.2.3"), 403, 1)
        .await;
    floor
        .expect(
            "remove, over the limit",
            remove(2, PASSWORD, "192.0.2.1"),
            429,
            1,
        )
        .await;
    floor
        .expect("remove", remove(2, PASSWORD, "192.0.2.3"), 204, 2)
        .await;
    // A refusal found by a statement: that statement checked the token's device already.
    floor
        .expect(
            "remove, no such device",
            remove(9, PASSWORD, "192.0.2.3"),
            404,
            2,
        )
        .await;
    floor
        .expect(
            "lookup, no such name",
            app.request("GET", "/users?name=nobody")
                .bearer(&alice.token),
            404,
            1,
        )
        .await;

    // A first signing key: the device's keys, then the set. A reset by password: the count and
    // the hash between them, the success written with the new key.
    let (first, second) = (prekeys::secret(1), prekeys::secret(2));
    let set = |body: Value| prekeys::signing_key_request(app, &alice, body);
    floor
        .expect(
            "signing key, the first",
            set(prekeys::signing_key_body(&alice, &first)),
            200,
            2,
        )
        .await;
    let mut reset = prekeys::signing_key_body(&alice, &second);
    reset["password"] = json!("wrong-password");
    floor
        .expect(
            "signing key, wrong password",
            set(reset.clone()).with_source_ip("192.0.2.4"),
            401,
            2,
        )
        .await;
    reset["password"] = json!(PASSWORD);
    floor
        .expect(
            "signing key, reset",
            set(reset).with_source_ip("192.0.2.4"),
            200,
            3,
        )
        .await;

    floor.assert_all().await;
}

/// On one connection: each kind of statement and each error inside the one exchange, with the
/// exchange counted, and the connection in step after it (the next statement answers right).
#[sqlx::test(migrator = "common::db::MIGRATOR")]
async fn errors_inside_the_exchange_leave_the_connection_in_step(pool: PgPool) {
    let proxy = Proxy::for_pool(&pool);
    let mut conn = PgConnection::connect_with(&proxy.options(&pool))
        .await
        .unwrap();
    sqlx::query("CREATE TEMP TABLE t (id int PRIMARY KEY)")
        .persistent(false)
        .execute(&mut conn)
        .await
        .unwrap();

    // A plain statement with parameters: one exchange.
    let before = proxy.counts();
    assert_eq!(int(&mut conn, 7).await, 7);
    assert_eq!(proxy.counts() - before, ONE_EXCHANGE);

    // A unique violation.
    let insert = |id: i32| {
        sqlx::query("INSERT INTO t (id) VALUES ($1)")
            .persistent(false)
            .bind(id)
    };
    insert(1).execute(&mut conn).await.unwrap();
    let before = proxy.counts();
    let e = insert(1).execute(&mut conn).await.unwrap_err();
    assert_eq!(code(&e), "23505");
    assert_eq!((proxy.counts() - before).round_trips, 1);
    assert_eq!(int(&mut conn, 8).await, 8);

    // An error after some rows were sent.
    let e = sqlx::query_scalar::<_, i32>(
        "SELECT 10 / (3 - g) FROM generate_series(1, 5) g WHERE g > $1",
    )
    .persistent(false)
    .bind(0)
    .fetch_all(&mut conn)
    .await
    .unwrap_err();
    assert_eq!(code(&e), "22012");
    assert_eq!(int(&mut conn, 9).await, 9);

    // A syntax error in the Parse of the exchange.
    let e = sqlx::query("SELEC $1::int4")
        .persistent(false)
        .bind(1)
        .execute(&mut conn)
        .await
        .unwrap_err();
    assert_eq!(code(&e), "42601");
    assert_eq!(int(&mut conn, 10).await, 10);

    // A statement timeout, set on this connection.
    sqlx::query("SET statement_timeout = 100")
        .persistent(false)
        .execute(&mut conn)
        .await
        .unwrap();
    let e = sqlx::query("SELECT pg_sleep($1)")
        .persistent(false)
        .bind(5.0f64)
        .execute(&mut conn)
        .await
        .unwrap_err();
    assert_eq!(code(&e), "57014");
    assert_eq!(int(&mut conn, 11).await, 11);
    sqlx::query("SET statement_timeout = 0")
        .persistent(false)
        .execute(&mut conn)
        .await
        .unwrap();

    // Inside a transaction: the error aborts it, the rollback recovers, the insert before it is gone.
    let mut tx = conn.begin().await.unwrap();
    insert(2).execute(&mut *tx).await.unwrap();
    let e = insert(2).execute(&mut *tx).await.unwrap_err();
    assert_eq!(code(&e), "23505");
    let e = insert(3).execute(&mut *tx).await.unwrap_err();
    assert_eq!(code(&e), "25P02");
    tx.rollback().await.unwrap();
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM t WHERE id > $1")
        .persistent(false)
        .bind(1)
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(n, 0);

    // A column of a type the connection has not seen (an enum): the exchange is read to its
    // end before the type is looked up, and the name comes out right.
    sqlx::query("CREATE TYPE mood AS ENUM ('calm', 'glad')")
        .persistent(false)
        .execute(&mut conn)
        .await
        .unwrap();
    let row = sqlx::query("SELECT $1::text::mood AS m, $2::int4 AS n")
        .persistent(false)
        .bind("glad")
        .bind(5)
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(row.column(0).type_info().name(), "mood");
    assert_eq!(row.get::<i32, _>("n"), 5);
    assert_eq!(int(&mut conn, 12).await, 12);

    // The same with several rows, and with an error after the first rows: the rows come out
    // in order, the error comes out, and the connection stays in step.
    sqlx::query("CREATE TYPE level AS ENUM ('low', 'high')")
        .persistent(false)
        .execute(&mut conn)
        .await
        .unwrap();
    let rows = sqlx::query("SELECT g, 'high'::level AS l FROM generate_series(1, $1) g")
        .persistent(false)
        .bind(4)
        .fetch_all(&mut conn)
        .await
        .unwrap();
    let ids: Vec<i32> = rows.iter().map(|r| r.get("g")).collect();
    assert_eq!(ids, [1, 2, 3, 4]);
    assert_eq!(rows[0].column(1).type_info().name(), "level");
    sqlx::query("CREATE TYPE shade AS ENUM ('dark')")
        .persistent(false)
        .execute(&mut conn)
        .await
        .unwrap();
    let e = sqlx::query("SELECT 'dark'::shade, 10 / (2 - g) FROM generate_series(1, $1) g")
        .persistent(false)
        .bind(3)
        .fetch_all(&mut conn)
        .await
        .unwrap_err();
    assert_eq!(code(&e), "22012");
    assert_eq!(int(&mut conn, 14).await, 14);

    // Named (cached) statements still take the two-step path and work alongside.
    for i in 0..3 {
        let v: i64 = sqlx::query_scalar("SELECT $1::int8 + 1")
            .bind(i)
            .fetch_one(&mut conn)
            .await
            .unwrap();
        assert_eq!(v, i + 1);
    }
    assert_eq!(int(&mut conn, 13).await, 13);
    conn.close().await.unwrap();
}

/// A backend terminated under the pool's connection: the statement fails, the connection is
/// closed rather than reused out of step, and the next request runs on a new one.
#[sqlx::test(migrator = "common::db::MIGRATOR")]
async fn a_terminated_backend_closes_the_connection(pool: PgPool) {
    let proxy = Proxy::for_pool(&pool);
    let through = PgPoolOptions::new()
        .max_connections(1)
        .test_before_acquire(false)
        .connect_lazy_with(proxy.options(&pool));
    let pid = || {
        sqlx::query_scalar::<_, i32>("SELECT pg_backend_pid() + $1")
            .persistent(false)
            .bind(0)
    };
    let first = pid().fetch_one(&through).await.unwrap();
    wait_idle(&through).await;
    let killed: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
        .bind(first)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(killed);
    tokio::time::sleep(Duration::from_millis(100)).await;
    // The idle connection is handed out untested: its statement fails.
    let e = pid().fetch_one(&through).await.unwrap_err();
    let text = e.to_string();
    assert!(
        code(&e) == "57P01" || matches!(e, sqlx::Error::Io(_) | sqlx::Error::Protocol(_)),
        "{text}"
    );
    // and the pool does not keep it.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let second = pid().fetch_one(&through).await.unwrap();
    assert_ne!(first, second);
    through.close().await;
}

/// A seeded mix of statement kinds on one connection against the real server: after every
/// step the connection answers the next statement with its own value (never a previous
/// statement's rows or errors), and every unnamed statement with known types is one exchange.
#[sqlx::test(migrator = "common::db::MIGRATOR")]
async fn a_mix_of_statement_kinds_stays_in_step(pool: PgPool) {
    let proxy = Proxy::for_pool(&pool);
    let mut conn = PgConnection::connect_with(&proxy.options(&pool))
        .await
        .unwrap();
    sqlx::query("CREATE TEMP TABLE f (id int PRIMARY KEY, v text)")
        .persistent(false)
        .execute(&mut conn)
        .await
        .unwrap();
    let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut in_tx = false;
    for step in 0..300i64 {
        let kind = next() % 10;
        let id = (next() % 40) as i32;
        let before = proxy.counts();
        let pipelined = match kind {
            0 => {
                // insert, possibly a duplicate
                let r = sqlx::query("INSERT INTO f (id, v) VALUES ($1, $2)")
                    .persistent(false)
                    .bind(id)
                    .bind(format!("v{step}"))
                    .execute(&mut conn)
                    .await;
                if let Err(e) = &r {
                    assert!(["23505", "25P02"].contains(&code(e).as_str()), "{e}");
                }
                true
            }
            1 => {
                let r =
                    sqlx::query_scalar::<_, String>("SELECT v FROM f WHERE id >= $1 ORDER BY id")
                        .persistent(false)
                        .bind(id)
                        .fetch_all(&mut conn)
                        .await;
                if let Err(e) = &r {
                    assert_eq!(code(e), "25P02", "{e}");
                }
                true
            }
            2 => {
                let r = sqlx::query_scalar::<_, i32>(
                    "SELECT 100 / (g - $1) FROM generate_series(0, 5) g",
                )
                .persistent(false)
                .bind(id % 8)
                .fetch_all(&mut conn)
                .await;
                match &r {
                    Ok(v) => assert_eq!(v.len(), 6),
                    Err(e) => assert!(["22012", "25P02"].contains(&code(e).as_str()), "{e}"),
                }
                true
            }
            3 => {
                let r = sqlx::query("DELETE FROM f WHERE id = $1")
                    .persistent(false)
                    .bind(id)
                    .execute(&mut conn)
                    .await;
                if let Err(e) = &r {
                    assert_eq!(code(e), "25P02", "{e}");
                }
                true
            }
            4 => {
                let r = sqlx::query("SELEC $1")
                    .persistent(false)
                    .bind(id)
                    .execute(&mut conn)
                    .await;
                assert!(r.is_err());
                true
            }
            5 => {
                // a simple query (no arguments): one Query message
                let r = sqlx::raw_sql("SELECT 1; SELECT 2").execute(&mut conn).await;
                if let Err(e) = &r {
                    assert_eq!(code(e), "25P02", "{e}");
                }
                false
            }
            6 => {
                // a named, cached statement: the two-step path the first time
                let r = sqlx::query_scalar::<_, i64>("SELECT count(*) FROM f WHERE id < $1")
                    .bind(id)
                    .fetch_one(&mut conn)
                    .await;
                if let Err(e) = &r {
                    assert_eq!(code(e), "25P02", "{e}");
                }
                false
            }
            7 => {
                let sql = if in_tx { "COMMIT" } else { "BEGIN" };
                sqlx::raw_sql(sql).execute(&mut conn).await.unwrap();
                in_tx = !in_tx;
                false
            }
            8 => {
                if in_tx {
                    sqlx::raw_sql("ROLLBACK").execute(&mut conn).await.unwrap();
                    in_tx = false;
                }
                false
            }
            _ => {
                let r = sqlx::query("SELECT pg_sleep($1)")
                    .persistent(false)
                    .bind(0.0f64)
                    .execute(&mut conn)
                    .await;
                if let Err(e) = &r {
                    assert_eq!(code(e), "25P02", "{e}");
                }
                true
            }
        };
        if pipelined {
            let d = proxy.counts() - before;
            assert_eq!(
                (d.round_trips, d.syncs, d.statements),
                (1, 1, 1),
                "step {step} kind {kind}: {d:?}"
            );
        }
        if in_tx {
            // an aborted transaction answers nothing until it ends
            let r = sqlx::query_scalar::<_, i64>("SELECT $1::int8")
                .persistent(false)
                .bind(step)
                .fetch_one(&mut conn)
                .await;
            match r {
                Ok(v) => assert_eq!(v, step),
                Err(e) => assert_eq!(code(&e), "25P02", "{e}"),
            }
        } else {
            assert_eq!(int(&mut conn, step).await, step, "step {step} kind {kind}");
        }
    }
    conn.close().await.unwrap();
}

/// The pool skips its release ping only for a connection with nothing in flight: a statement
/// cancelled mid-exchange, or a transaction dropped without commit, is settled before the
/// connection is handed out again.
#[sqlx::test(migrator = "common::db::MIGRATOR")]
async fn a_connection_with_work_in_flight_is_settled_on_release(pool: PgPool) {
    let proxy = Proxy::for_pool(&pool);
    let through = PgPoolOptions::new()
        .max_connections(1)
        .test_before_acquire(false)
        .connect_lazy_with(proxy.options(&pool));
    sqlx::query("CREATE TABLE settle (id int PRIMARY KEY)")
        .execute(&pool)
        .await
        .unwrap();
    let value = |v: i64| {
        sqlx::query_scalar::<_, i64>("SELECT $1::int8")
            .persistent(false)
            .bind(v)
    };
    assert_eq!(value(1).fetch_one(&through).await.unwrap(), 1);
    wait_idle(&through).await;

    // Cancelled while the server is still working on it.
    let slow = sqlx::query_scalar::<_, i64>("SELECT 99::int8 FROM pg_sleep($1)")
        .persistent(false)
        .bind(1.0f64)
        .fetch_one(&through);
    assert!(
        tokio::time::timeout(Duration::from_millis(50), slow)
            .await
            .is_err()
    );
    assert_eq!(value(2).fetch_one(&through).await.unwrap(), 2);

    // A transaction dropped without commit: rolled back before the next use.
    {
        let mut tx = through.begin().await.unwrap();
        sqlx::query("INSERT INTO settle (id) VALUES ($1)")
            .persistent(false)
            .bind(1)
            .execute(&mut *tx)
            .await
            .unwrap();
    }
    let mut conn = through.acquire().await.unwrap();
    // Inside the dropped transaction the insert would have its transaction id assigned and be
    // visible; on a settled connection neither is the case.
    let in_tx: bool =
        sqlx::query_scalar("SELECT pg_current_xact_id_if_assigned() IS NOT NULL OR $1")
            .persistent(false)
            .bind(false)
            .fetch_one(&mut *conn)
            .await
            .unwrap();
    assert!(!in_tx, "the dropped transaction is still open");
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM settle WHERE id > $1")
        .persistent(false)
        .bind(0)
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    assert_eq!(n, 0);
    drop(conn);

    // And an idle, clean release costs nothing: one exchange per statement, no ping.
    wait_idle(&through).await;
    let before = proxy.counts();
    for i in 0..5 {
        assert_eq!(value(i).fetch_one(&through).await.unwrap(), i);
        wait_idle(&through).await;
    }
    let d = proxy.counts() - before;
    assert_eq!((d.round_trips, d.syncs, d.statements), (5, 5, 5), "{d:?}");
    through.close().await;
}
