//! `make bench`: what the functions cost, measured on this machine against the local PostgreSQL.
//!
//! 1. Handler cost over the database's own cost: each endpoint's warm in-process time (event
//!    JSON parse + `common::runtime::respond` + `functions::dispatch`) against the same SQL run
//!    bare through sqlx on the same pool with the same binds, interleaved, p50 and p99.
//! 2. Cold start: each release binary started as Lambda starts it, against a minimal Runtime API
//!    server: spawn -> first `next` poll (init), spawn -> first response (with the DB connect).
//! 3. Size and memory: stripped binary, zipped `bootstrap`, RSS at init and peak after 1,000
//!    warm invocations.
//! 4. bcrypt: login and register at the configured cost and at cost 4.
//!
//! Environment: DATABASE_URL (else `scripts/database-url.sh messenger_bench`; the database's
//! name must contain "bench", since the bench empties its tables), BCRYPT_COST (default 12),
//! BENCH_ITERATIONS (2000), BENCH_COLD_RUNS (20), BENCH_WARM_INVOCATIONS (1000),
//! BENCH_BCRYPT_RUNS (10). For experiments: BENCH_PHASES (e.g. "23"), BENCH_FUNCTIONS (e.g.
//! "me,health"), BENCH_BIN_DIR (another build's binaries), BENCH_FUNCTION_ENV ("K=V,K=V" added
//! to the functions' environment). The binaries are read from the directory of this executable
//! (target/release after `cargo build --release --bins`).

// The bench times bare SQL against the handlers, and sets up and empties its own database.
#![allow(clippy::disallowed_methods)]

mod report;
mod runtime_api;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use common::AppState;
use common::config::Config;
use common::db::{Database, MIGRATOR};
use common::domain::PublicKeyPem;
use functions::api_event::ApiEvent;
use report::{Samples, Table, bytes, mib, ms, us};
use runtime_api::{Report, RuntimeApi};
use serde_json::{Value, json};
use sqlx::PgPool;
use uuid::Uuid;

const JWT_SECRET: &str = "bench-jwt-secret-0123456789abcdef0123456789";
const PASSWORD: &str = "correct horse battery staple";
const ED25519: &str = include_str!("../../testdata/keys/ed25519.pem");
const EVENTBRIDGE: &str = include_str!("../fixtures/example-eventbridge-schedule.json");
/// Ciphertext per message, and messages waiting in the caller's inbox for GET /messages.
const CIPHERTEXT_BYTES: usize = 1024;
const INBOX: usize = 10;
const BIG_CIPHERTEXT_BYTES: usize = 60 * 1024;
const PAGE_LIMIT: i64 = 100;
/// `me.rs` and `health.rs` keep their SQL inline; these are copies of it.
const ME_SQL: &str =
    "SELECT id, name, public_key, created_at, key_updated_at FROM users WHERE id = $1";
const READY_SQL: &str = "SELECT 1";

/// The HTTP functions (every binary but purge and migrate).
const HTTP_FUNCTIONS: &[&str] = &[
    "register",
    "login",
    "me",
    "get-public-key",
    "update-key",
    "lookup-user",
    "health",
    "send-message",
    "get-messages",
    "confirm-delivery",
    "metrics",
    "not-found",
];

struct Settings {
    database_url: String,
    bcrypt_cost: u32,
    iterations: usize,
    cold_runs: usize,
    warm_invocations: usize,
    bcrypt_runs: usize,
    bin_dir: PathBuf,
    /// Which parts to run ("1234" by default) and, for 2 and 3, which functions.
    phases: String,
    only: Option<Vec<String>>,
}

fn env_number<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("bench/ is inside the workspace")
        .to_path_buf()
}

impl Settings {
    fn from_env() -> Self {
        let database_url = match std::env::var("DATABASE_URL") {
            Ok(url) if !url.trim().is_empty() => url,
            _ => {
                let out = Command::new("bash")
                    .arg("scripts/database-url.sh")
                    .arg("messenger_bench")
                    .current_dir(workspace_root())
                    .stderr(Stdio::inherit())
                    .output()
                    .expect("running scripts/database-url.sh");
                assert!(out.status.success(), "scripts/database-url.sh failed");
                String::from_utf8(out.stdout).unwrap().trim().to_string()
            }
        };
        let bin_dir = match std::env::var("BENCH_BIN_DIR") {
            Ok(dir) if !dir.is_empty() => PathBuf::from(dir),
            _ => std::env::current_exe()
                .ok()
                .and_then(|p| p.parent().map(Path::to_path_buf))
                .expect("the directory of the bench binary"),
        };
        Self {
            database_url,
            bcrypt_cost: env_number("BCRYPT_COST", 12),
            iterations: env_number("BENCH_ITERATIONS", 2000).max(10),
            cold_runs: env_number("BENCH_COLD_RUNS", 20).max(1),
            warm_invocations: env_number("BENCH_WARM_INVOCATIONS", 1000).max(2),
            bcrypt_runs: env_number("BENCH_BCRYPT_RUNS", 10).max(1),
            bin_dir,
            phases: std::env::var("BENCH_PHASES").unwrap_or_else(|_| "1234".into()),
            only: std::env::var("BENCH_FUNCTIONS")
                .ok()
                .filter(|v| !v.trim().is_empty())
                .map(|v| v.split(',').map(|f| f.trim().to_string()).collect()),
        }
    }

    fn phase(&self, n: char) -> bool {
        self.phases.contains(n)
    }

    fn selected(&self, function: &str) -> bool {
        self.only
            .as_ref()
            .is_none_or(|only| only.iter().any(|f| f == function))
    }

    fn binary(&self, name: &str) -> PathBuf {
        self.bin_dir.join(name)
    }
}

/// A unique client address per call, so registration's per-address limit never trips.
fn next_ip() -> String {
    static N: AtomicU32 = AtomicU32::new(1);
    let n = N.fetch_add(1, Ordering::Relaxed);
    format!("10.{}.{}.{}", (n >> 16) & 255, (n >> 8) & 255, n & 255)
}

/// A short name no earlier run used (names are 3..32 of [A-Za-z0-9_.-]).
fn fresh_name(prefix: &str) -> String {
    let id = Uuid::now_v7().simple().to_string();
    format!("{prefix}{}", &id[id.len() - 16..])
}

async fn app_state(url: &str, bcrypt_cost: u32, pool: Option<&PgPool>) -> &'static AppState {
    let vars: HashMap<&str, String> = HashMap::from([
        ("DATABASE_URL", url.to_string()),
        ("JWT_SECRET", JWT_SECRET.to_string()),
        ("BCRYPT_COST", bcrypt_cost.to_string()),
    ]);
    let config = Config::from_lookup(|k| vars.get(k).cloned()).expect("bench config is valid");
    let db = match pool {
        Some(pool) => Database::connect_with(&config.database, (*pool.connect_options()).clone()),
        None => Database::connect(&config.database).expect("DATABASE_URL is valid"),
    };
    Box::leak(Box::new(AppState::new(config, db)))
}

/// One request through the production path: event JSON -> Request -> respond(dispatch).
async fn call(state: &'static AppState, function: &'static str, event: &str) -> (u16, String) {
    let request = lambda_http::request::from_str(event).expect("a valid API Gateway v2 event");
    let response = common::runtime::respond(function, state, request, move |s, r| {
        functions::dispatch(function, s, r)
    })
    .await;
    let text = match response.body() {
        lambda_http::Body::Text(t) => t.clone(),
        lambda_http::Body::Binary(b) => String::from_utf8_lossy(b).into_owned(),
        _ => String::new(),
    };
    (response.status().as_u16(), text)
}

async fn call_ok(state: &'static AppState, request: ApiEvent, expect: u16) -> Value {
    let (function, event) = request.event();
    let (status, text) = call(state, function, &event).await;
    assert_eq!(status, expect, "{function}: {text}");
    serde_json::from_str(&text).unwrap_or(Value::Null)
}

/// The users and messages every measurement uses, made through the handlers themselves.
struct Fixture {
    alice: Uuid,
    alice_token: String,
    bob: Uuid,
    bob_name: String,
    carol: Uuid,
    /// Registered at the configured cost, and at cost 4.
    login_cfg: String,
    login_4: String,
    ciphertext: Vec<u8>,
    ciphertext_b64: String,
    /// 60 KiB: a TLS write of several TCP segments.
    big_ciphertext: Vec<u8>,
    pem: String,
    confirmed_id: Uuid,
}

async fn register(state: &'static AppState, name: &str) -> Uuid {
    let body = call_ok(
        state,
        ApiEvent::new("POST", "/register")
            .source_ip(&next_ip())
            .json(json!({"name": name, "password": PASSWORD, "public_key": ED25519})),
        201,
    )
    .await;
    body["id"].as_str().unwrap().parse().unwrap()
}

/// The bench empties its tables: never a database that is not obviously its own.
async fn check_bench_database(pool: &PgPool) {
    let database: String = sqlx::query_scalar("SELECT current_database()::text")
        .fetch_one(pool)
        .await
        .expect("connecting to the bench database");
    assert!(
        database.contains("bench"),
        "DATABASE_URL names database {database:?}; the bench empties its tables, so it only runs \
         on a database whose name contains \"bench\" (make bench uses messenger_bench)"
    );
}

async fn setup(state: &'static AppState, state4: &'static AppState) -> Fixture {
    sqlx::query("TRUNCATE users, messages, rate_limits, purge_runs CASCADE")
        .execute(state.pool())
        .await
        .expect("truncating the bench database");
    let alice = register(state4, &fresh_name("alice")).await;
    let bob_name = fresh_name("bob");
    let bob = register(state4, &bob_name).await;
    let carol = register(state4, &fresh_name("carol")).await;
    let login_cfg = fresh_name("cost");
    register(state, &login_cfg).await;
    let login_4 = fresh_name("cost4");
    register(state4, &login_4).await;

    let ciphertext: Vec<u8> = (0..CIPHERTEXT_BYTES)
        .map(|i| (i * 131 % 251) as u8)
        .collect();
    let ciphertext_b64 = B64.encode(&ciphertext);
    let bob_token = state.jwt().unwrap().issue(bob).unwrap().access_token;
    let alice_token = state.jwt().unwrap().issue(alice).unwrap().access_token;
    let send = |to: Uuid| {
        ApiEvent::new("POST", "/messages")
            .bearer(&bob_token)
            .json(json!({"recipient_id": to, "encrypted_data": ciphertext_b64}))
    };
    for _ in 0..INBOX {
        call_ok(state4, send(alice), 201).await;
    }
    // One more, confirmed at once: confirming it again is the repeatable 204.
    let sent = call_ok(state4, send(alice), 201).await;
    let confirmed_id: Uuid = sent["id"].as_str().unwrap().parse().unwrap();
    call_ok(
        state4,
        ApiEvent::new("PUT", format!("/messages/{confirmed_id}/delivered")).bearer(&alice_token),
        204,
    )
    .await;
    Fixture {
        alice,
        alice_token,
        bob,
        bob_name,
        carol,
        login_cfg,
        login_4,
        ciphertext,
        ciphertext_b64,
        big_ciphertext: (0..BIG_CIPHERTEXT_BYTES)
            .map(|i| (i * 131 % 251) as u8)
            .collect(),
        pem: PublicKeyPem::parse(ED25519).unwrap().as_str().to_string(),
        confirmed_id,
    }
}

// ------------------------------------------------------------------ 1. handler cost over SQL

#[derive(Clone, Copy)]
enum Sql {
    Me,
    PublicKey,
    Lookup,
    UpdateKey,
    Send,
    SendBig,
    Page,
    Confirm,
    Nothing,
    Ready,
    Metrics,
}

struct Case {
    label: &'static str,
    request: ApiEvent,
    status: u16,
    sql: Sql,
    /// Runs iterations / this (big writes fill the database quickly).
    divisor: usize,
}

fn cases(fx: &Fixture) -> Vec<Case> {
    let t = fx.alice_token.as_str();
    vec![
        Case {
            label: "GET /me",
            request: ApiEvent::new("GET", "/me").bearer(t),
            status: 200,
            sql: Sql::Me,
            divisor: 1,
        },
        Case {
            label: "GET /public-key/{id}",
            request: ApiEvent::new("GET", format!("/public-key/{}", fx.bob)).bearer(t),
            status: 200,
            sql: Sql::PublicKey,
            divisor: 1,
        },
        Case {
            label: "GET /users?name=",
            request: ApiEvent::new("GET", format!("/users?name={}", fx.bob_name)).bearer(t),
            status: 200,
            sql: Sql::Lookup,
            divisor: 1,
        },
        Case {
            label: "PUT /update-key",
            request: ApiEvent::new("PUT", "/update-key")
                .bearer(t)
                .json(json!({"public_key": ED25519})),
            status: 200,
            sql: Sql::UpdateKey,
            divisor: 1,
        },
        Case {
            label: "POST /messages (1 KiB)",
            request: ApiEvent::new("POST", "/messages")
                .bearer(t)
                .json(json!({"recipient_id": fx.carol, "encrypted_data": fx.ciphertext_b64})),
            status: 201,
            sql: Sql::Send,
            divisor: 1,
        },
        Case {
            label: "POST /messages (60 KiB)",
            request: ApiEvent::new("POST", "/messages").bearer(t).json(
                json!({"recipient_id": fx.carol, "encrypted_data": B64.encode(&fx.big_ciphertext)}),
            ),
            status: 201,
            sql: Sql::SendBig,
            divisor: 10,
        },
        Case {
            label: "GET /messages (10 x 1 KiB)",
            request: ApiEvent::new("GET", "/messages").bearer(t),
            status: 200,
            sql: Sql::Page,
            divisor: 1,
        },
        Case {
            label: "PUT /messages/{id}/delivered",
            request: ApiEvent::new("PUT", format!("/messages/{}/delivered", fx.confirmed_id))
                .bearer(t),
            status: 204,
            sql: Sql::Confirm,
            divisor: 1,
        },
        Case {
            label: "GET /health",
            request: ApiEvent::new("GET", "/health"),
            status: 200,
            sql: Sql::Nothing,
            divisor: 1,
        },
        Case {
            label: "GET /health/ready",
            request: ApiEvent::new("GET", "/health/ready"),
            status: 200,
            sql: Sql::Ready,
            divisor: 1,
        },
        Case {
            label: "GET /metrics",
            request: ApiEvent::new("GET", "/metrics"),
            status: 200,
            sql: Sql::Metrics,
            divisor: 1,
        },
    ]
}

/// The statement(s) the handler runs, bare, with the same binds. None when there are none.
async fn run_sql(sql: Sql, state: &AppState, fx: &Fixture) -> Option<()> {
    let (db, pool, config) = (&state.db, state.pool(), &state.config);
    let result = match sql {
        Sql::Me => db
            .query(ME_SQL)
            .bind(fx.alice)
            .fetch_optional(pool)
            .await
            .map(drop),
        Sql::PublicKey => db
            .query(functions::get_public_key::SQL)
            .bind(fx.alice)
            .bind(fx.bob)
            .fetch_one(pool)
            .await
            .map(drop),
        Sql::Lookup => db
            .query(functions::lookup_user::SQL)
            .bind(fx.alice)
            .bind(fx.bob_name.as_str())
            .fetch_one(pool)
            .await
            .map(drop),
        Sql::UpdateKey => db
            .query(functions::update_key::UPDATE_SQL)
            .bind(fx.alice)
            .bind(fx.pem.as_str())
            .fetch_optional(pool)
            .await
            .map(drop),
        Sql::Send | Sql::SendBig => {
            let ciphertext = match sql {
                Sql::SendBig => &fx.big_ciphertext,
                _ => &fx.ciphertext,
            };
            db.query(functions::send_message::SEND_SQL)
                .bind(Uuid::now_v7())
                .bind(fx.alice)
                .bind(fx.carol)
                .bind(ciphertext.as_slice())
                .bind(config.message_ttl_seconds as f64)
                .bind(None::<&str>)
                .bind(None::<Vec<u8>>)
                .bind(config.send_max_per_window as i32)
                .bind(config.send_window_seconds as f64)
                .bind(config.max_pending_per_recipient as i32)
                .bind(config.max_pending_bytes_per_recipient as i64)
                .fetch_one(pool)
                .await
                .map(drop)
        }
        Sql::Page => db
            .query(functions::get_messages::PAGE_SQL)
            .bind(fx.alice)
            .bind(Uuid::nil())
            .bind(PAGE_LIMIT)
            .bind(functions::get_messages::PAGE_CIPHERTEXT_BUDGET)
            .fetch_all(pool)
            .await
            .map(drop),
        Sql::Confirm => db
            .query(functions::confirm_deliveries::CONFIRM_SQL)
            .bind(fx.alice)
            .bind([fx.confirmed_id])
            .fetch_one(pool)
            .await
            .map(drop),
        Sql::Nothing => return None,
        Sql::Ready => db.query(READY_SQL).execute(pool).await.map(drop),
        Sql::Metrics => db
            .query(functions::metrics::SNAPSHOT_SQL)
            .fetch_one(pool)
            .await
            .map(drop),
    };
    result.expect("bare SQL");
    Some(())
}

struct Measured {
    full: Samples,
    dispatch: Samples,
    parse: Samples,
    sql: Option<Samples>,
    /// Median of the per-iteration differences handler - SQL (paired, so less noisy).
    paired_overhead: f64,
}

/// Waits (untimed) until every pooled connection is idle: sqlx pings a connection when it goes
/// back to the pool (a Sync round trip, in a background task), and a measurement that started
/// during the previous one's ping would pay for it. Requests to a Lambda instance are that far
/// apart too.
async fn quiesce(pool: &PgPool) {
    let deadline = Instant::now() + Duration::from_millis(20);
    while pool.num_idle() < pool.size() as usize && Instant::now() < deadline {
        tokio::task::yield_now().await;
    }
}

/// Interleaved: full handler, handler without the shell, bare SQL; so drift (other load on the
/// machine, table growth) hits all three alike.
async fn measure_case(
    state: &'static AppState,
    fx: &Fixture,
    case: &Case,
    warmup: usize,
    iterations: usize,
) -> Measured {
    let (function, event) = case.request.event();
    let mut full = Vec::with_capacity(iterations);
    let mut dispatch = Vec::with_capacity(iterations);
    let mut parse = Vec::with_capacity(iterations);
    let mut sql = Vec::with_capacity(iterations);
    for i in 0..warmup + iterations {
        // Parse + respond + dispatch: the whole in-process cost of one invocation.
        quiesce(state.pool()).await;
        let started = Instant::now();
        let request = lambda_http::request::from_str(&event).expect("valid event");
        let response = common::runtime::respond(function, state, request, move |s, r| {
            functions::dispatch(function, s, r)
        })
        .await;
        let elapsed = started.elapsed();
        let status = response.status().as_u16();
        assert_eq!(status, case.status, "{}: {:?}", case.label, response.body());
        drop(response);

        // The parse alone, then the handler without the shell (no log line, no CORS).
        quiesce(state.pool()).await;
        let started = Instant::now();
        let request = lambda_http::request::from_str(&event).expect("valid event");
        let parsed = started.elapsed();
        let started = Instant::now();
        let result = functions::dispatch(function, state, request).await;
        let dispatched = started.elapsed();
        assert!(result.is_ok(), "{}", case.label);
        drop(result);

        quiesce(state.pool()).await;
        let started = Instant::now();
        let ran = run_sql(case.sql, state, fx).await;
        let bare = started.elapsed();

        if i >= warmup {
            full.push(elapsed);
            parse.push(parsed);
            dispatch.push(dispatched);
            if ran.is_some() {
                sql.push(bare);
            }
        }
    }
    let mut diffs: Vec<f64> = if sql.is_empty() {
        full.iter().map(|d| d.as_secs_f64() * 1e6).collect()
    } else {
        full.iter()
            .zip(&sql)
            .map(|(f, q)| (f.as_secs_f64() - q.as_secs_f64()) * 1e6)
            .collect()
    };
    diffs.sort_by(f64::total_cmp);
    Measured {
        full: Samples::new(&full),
        dispatch: Samples::new(&dispatch),
        parse: Samples::new(&parse),
        sql: (!sql.is_empty()).then(|| Samples::new(&sql)),
        paired_overhead: diffs[diffs.len() / 2],
    }
}

/// The pieces of the shell that are not SQL: JWT verification and the request log line.
async fn micro(
    state: &'static AppState,
    fx: &Fixture,
    iterations: usize,
    database_url: &str,
) -> Table {
    let time = |f: &dyn Fn()| {
        let mut v = Vec::with_capacity(iterations);
        for i in 0..iterations + iterations / 10 {
            let started = Instant::now();
            f();
            if i >= iterations / 10 {
                v.push(started.elapsed());
            }
        }
        Samples::new(&v)
    };
    let mut parse_rows = Vec::new();
    for (label, request) in [
        (
            "GET /me",
            ApiEvent::new("GET", "/me").bearer(&fx.alice_token),
        ),
        (
            "POST /messages (1 KiB)",
            ApiEvent::new("POST", "/messages")
                .bearer(&fx.alice_token)
                .json(json!({"recipient_id": fx.carol, "encrypted_data": fx.ciphertext_b64})),
        ),
    ] {
        let (_, event) = request.event();
        let event = event.as_str();
        let current = time(&|| {
            std::hint::black_box(lambda_http::request::from_str(event).unwrap());
        });
        parse_rows.push(vec![
            format!(
                "event parse {label} ({} B): lambda_http::request::from_str",
                event.len()
            ),
            us(current.p50()),
            us(current.p99()),
        ]);
    }
    let mut jwt = Vec::with_capacity(iterations);
    let mut log = Vec::with_capacity(iterations);
    for _ in 0..iterations + iterations / 10 {
        let started = Instant::now();
        let claims = state
            .jwt()
            .unwrap()
            .verify(&fx.alice_token)
            .expect("valid token");
        jwt.push(started.elapsed());
        std::hint::black_box(claims);
        // The same event respond() logs per request.
        let started = Instant::now();
        lambda_http::tracing::info!(
            function = "me",
            method = "GET".to_string(),
            route = "/me".to_string(),
            status = 200u16,
            error = None::<&str>,
            duration_ms = 0.123,
            request_id = Some("00000000-0000-4000-8000-000000000001".to_string()),
            "request"
        );
        log.push(started.elapsed());
    }
    // A new database connection, as the first invocation of an instance opens one.
    let mut connect_rows = Vec::new();
    let options: sqlx::postgres::PgConnectOptions = database_url.parse().expect("a PostgreSQL URL");
    for (label, options) in [
        (
            "new DB connection, TLS (sslmode=prefer/require)",
            options.clone(),
        ),
        (
            "new DB connection, no TLS (sslmode=disable)",
            options.ssl_mode(sqlx::postgres::PgSslMode::Disable),
        ),
    ] {
        let mut v = Vec::new();
        for _ in 0..20 {
            use sqlx::Connection as _;
            let started = Instant::now();
            let mut conn = sqlx::PgConnection::connect_with(&options)
                .await
                .expect("connecting");
            sqlx::query(READY_SQL)
                .execute(&mut conn)
                .await
                .expect("SELECT 1");
            v.push(started.elapsed());
            let _ = conn.close().await;
        }
        let s = Samples::new(&v);
        connect_rows.push(vec![
            format!("{label} + SELECT 1"),
            us(s.p50()),
            us(s.pct(90.0)),
        ]);
    }
    let jwt = Samples::new(&jwt[iterations / 10..]);
    let log = Samples::new(&log[iterations / 10..]);
    let mut t = Table::new(
        "Per-request pieces, in process (us)",
        &["piece", "p50", "p99"],
    );
    t.row(vec![
        "JWT verify (HS256, jsonwebtoken)".into(),
        us(jwt.p50()),
        us(jwt.p99()),
    ]);
    t.row(vec![
        "request log line (tracing JSON, to /dev/null)".into(),
        us(log.p50()),
        us(log.p99()),
    ]);
    for row in parse_rows.into_iter().chain(connect_rows) {
        t.row(row);
    }
    t
}

// ------------------------------------------------------------------ 2 and 3. real binaries

fn lambda_env(
    settings: &Settings,
    function: &str,
    api: &str,
    bcrypt_cost: u32,
) -> Vec<(String, String)> {
    [
        ("PATH", "/usr/local/bin:/usr/bin:/bin".to_string()),
        ("LANG", "en_US.UTF-8".into()),
        ("TZ", ":UTC".into()),
        ("AWS_LAMBDA_RUNTIME_API", api.to_string()),
        ("AWS_LAMBDA_FUNCTION_NAME", function.to_string()),
        ("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "256".into()),
        ("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST".into()),
        (
            "AWS_LAMBDA_LOG_STREAM_NAME",
            "2026/11/28/[$LATEST]0123456789abcdef0123456789abcdef".into(),
        ),
        (
            "AWS_LAMBDA_LOG_GROUP_NAME",
            format!("/aws/lambda/{function}"),
        ),
        ("AWS_REGION", "us-east-1".into()),
        ("AWS_DEFAULT_REGION", "us-east-1".into()),
        ("AWS_EXECUTION_ENV", "AWS_Lambda_provided.al2023".into()),
        ("DATABASE_URL", settings.database_url.clone()),
        ("JWT_SECRET", JWT_SECRET.into()),
        ("BCRYPT_COST", bcrypt_cost.to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    // Extra variables for experiments: BENCH_FUNCTION_ENV="DB_MAX_CONNECTIONS=1,RUST_LOG=warn".
    .chain(
        std::env::var("BENCH_FUNCTION_ENV")
            .unwrap_or_default()
            .split(',')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect::<Vec<_>>(),
    )
    .collect()
}

fn spawn(bin: &Path, env: Vec<(String, String)>) -> std::process::Child {
    Command::new(bin)
        .env_clear()
        .envs(env)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {}: {e}", bin.display()))
}

fn stop(mut child: std::process::Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// A real-route event for `function`, fresh for each call (`n`) where it must be.
fn event_for(function: &str, fx: &Fixture, n: usize, warm: bool) -> (String, u16) {
    let t = fx.alice_token.as_str();
    let request = match function {
        "register" => ApiEvent::new("POST", "/register").source_ip(&next_ip()).json(
            json!({"name": fresh_name(&format!("r{n}x")), "password": PASSWORD, "public_key": ED25519}),
        ),
        "login" => {
            let name = if warm { &fx.login_4 } else { &fx.login_cfg };
            ApiEvent::new("POST", "/login").json(json!({"name": name, "password": PASSWORD}))
        }
        "me" => ApiEvent::new("GET", "/me").bearer(t),
        "get-public-key" => ApiEvent::new("GET", format!("/public-key/{}", fx.bob)).bearer(t),
        "update-key" => ApiEvent::new("PUT", "/update-key")
            .bearer(t)
            .json(json!({"public_key": ED25519})),
        "lookup-user" => ApiEvent::new("GET", format!("/users?name={}", fx.bob_name)).bearer(t),
        "health" => ApiEvent::new("GET", "/health/ready"),
        "send-message" => ApiEvent::new("POST", "/messages")
            .bearer(t)
            .json(json!({"recipient_id": fx.carol, "encrypted_data": fx.ciphertext_b64})),
        "get-messages" => ApiEvent::new("GET", "/messages").bearer(t),
        "confirm-delivery" => {
            ApiEvent::new("PUT", format!("/messages/{}/delivered", fx.confirmed_id)).bearer(t)
        }
        "metrics" => ApiEvent::new("GET", "/metrics"),
        "not-found" => ApiEvent::new("GET", "/nowhere"),
        "purge" => return (EVENTBRIDGE.to_string(), 0),
        other => panic!("no event for {other}"),
    };
    let status = match function {
        "register" | "send-message" => 201,
        "confirm-delivery" => 204,
        "not-found" => 404,
        _ => 200,
    };
    (request.event().1, status)
}

/// Checks the function's answer: the HTTP status inside the API Gateway response, or, for the
/// purge, a report.
fn check_answer(function: &str, body: &[u8], expect: u16) -> Result<(), String> {
    let value: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let ok = if function == "purge" {
        value.get("complete").is_some()
    } else {
        value["statusCode"].as_u64() == Some(u64::from(expect))
    };
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{function} answered {}",
            String::from_utf8_lossy(body)
        ))
    }
}

const REPORT_TIMEOUT: Duration = Duration::from_secs(30);

async fn wait_for_next(api: &mut RuntimeApi, function: &str) -> Instant {
    loop {
        match api.report(REPORT_TIMEOUT).await {
            Some(Report::Next(at)) => return at,
            Some(Report::InitError(body) | Report::Error(body)) => {
                panic!("{function}: {}", String::from_utf8_lossy(&body))
            }
            Some(Report::Response(..)) => {}
            None => panic!("{function}: no `next` poll within {REPORT_TIMEOUT:?}"),
        }
    }
}

async fn wait_for_response(api: &mut RuntimeApi, function: &str) -> (Instant, Vec<u8>) {
    loop {
        match api.report(REPORT_TIMEOUT).await {
            Some(Report::Response(at, body)) => return (at, body),
            Some(Report::InitError(body) | Report::Error(body)) => {
                panic!("{function}: {}", String::from_utf8_lossy(&body))
            }
            Some(Report::Next(_)) => {}
            None => panic!("{function}: no response within {REPORT_TIMEOUT:?}"),
        }
    }
}

struct Cold {
    init: Samples,
    first: Samples,
    init_cpu: Samples,
}

/// The database settings of IAM mode (DB_IAM_AUTH=true), pointed at the same server: the local
/// server ignores the token under trust auth, so the whole IAM path (token signing,
/// TLS required) runs.
fn iam_env(settings: &Settings, env: &mut Vec<(String, String)>) {
    let options: sqlx::postgres::PgConnectOptions =
        settings.database_url.parse().expect("a PostgreSQL URL");
    env.retain(|(k, _)| k != "DATABASE_URL");
    for (k, v) in [
        ("DB_IAM_AUTH", "true".to_string()),
        ("DB_HOST", options.get_host().to_string()),
        ("DB_PORT", options.get_port().to_string()),
        (
            "DB_NAME",
            options.get_database().unwrap_or("postgres").to_string(),
        ),
        ("DB_USER", options.get_username().to_string()),
        // What Lambda puts in the environment of every function (example values).
        ("AWS_REGION", "us-east-1".to_string()),
        ("AWS_ACCESS_KEY_ID", "AKIAIOSFODNN7EXAMPLE".to_string()),
        (
            "AWS_SECRET_ACCESS_KEY",
            "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY".to_string(),
        ),
        ("AWS_SESSION_TOKEN", "IQoJb3JpZ2luX2VjEXAMPLE".to_string()),
    ] {
        env.push((k.to_string(), v));
    }
}

async fn cold_start(
    settings: &Settings,
    fx: &Fixture,
    function: &str,
    iam: bool,
) -> Result<Cold, String> {
    let bin = settings.binary(function);
    let mut init = Vec::new();
    let mut first = Vec::new();
    let mut init_cpu = Vec::new();
    for run in 0..settings.cold_runs {
        let mut api = RuntimeApi::start(function).await.expect("runtime API");
        let (event, status) = event_for(function, fx, run, false);
        api.invoke(event);
        let mut env = lambda_env(settings, function, &api.address, settings.bcrypt_cost);
        if iam {
            iam_env(settings, &mut env);
        }
        let started = Instant::now();
        let child = spawn(&bin, env);
        let polled = wait_for_next(&mut api, function).await;
        // The event is already queued, so the process is answering it now: this CPU figure may
        // include the first microseconds of the invocation.
        let cpu = cpu_ns(child.id());
        let (answered, body) = wait_for_response(&mut api, function).await;
        stop(child);
        check_answer(function, &body, status)?;
        init.push(polled - started);
        first.push(answered - started);
        init_cpu.push(Duration::from_nanos(cpu));
    }
    Ok(Cold {
        init: Samples::new(&init),
        first: Samples::new(&first),
        init_cpu: Samples::new(&init_cpu),
    })
}

/// CPU time the process has used so far, all threads (ns, from /proc/<pid>/task/*/schedstat):
/// unlike wall-clock time, not inflated by other load on the machine.
fn cpu_ns(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("schedstat")).ok())
        .filter_map(|s| {
            s.split_whitespace()
                .next()
                .and_then(|v| v.parse::<u64>().ok())
        })
        .sum()
}

/// Context switches of all the process's threads so far (voluntary + involuntary): each is a
/// thread going to sleep or being woken, the cost of hopping between runtime threads.
fn context_switches(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("status")).ok())
        .map(|s| {
            s.lines()
                .filter(|l| l.contains("ctxt_switches:"))
                .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                .sum::<u64>()
        })
        .sum()
}

fn proc_status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

struct Warm {
    rss_init_kib: u64,
    hwm_kib: u64,
    invoke: Samples,
    /// CPU time per warm invocation, whole process (us).
    cpu_per_invoke_us: f64,
    switches_per_invoke: f64,
    /// Database connections the instance holds after the warm invocations.
    db_connections: i64,
}

/// Connections to the bench database from the functions (their application_name).
async fn function_connections(pool: &PgPool) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity \
         WHERE datname = current_database() AND application_name = 'secure-messenger' \
           AND pid <> pg_backend_pid()",
    )
    .fetch_one(pool)
    .await
    .unwrap_or(-1)
}

/// One instance, `n` invocations through the Runtime API; the first is the cold one.
async fn warm_instance(settings: &Settings, fx: &Fixture, function: &str, pool: &PgPool) -> Warm {
    let n = settings.warm_invocations;
    let events: Vec<(String, u16)> = (0..n).map(|i| event_for(function, fx, i, true)).collect();
    let before = function_connections(pool).await;
    let mut api = RuntimeApi::start(function).await.expect("runtime API");
    // Cost 4 so that 1,000 registrations take seconds; bcrypt's memory does not depend on it.
    let env = lambda_env(settings, function, &api.address, 4);
    let child = spawn(&settings.binary(function), env);
    let pid = child.id();
    wait_for_next(&mut api, function).await;
    let rss_init_kib = proc_status_kib(pid, "VmRSS:");
    let mut times = Vec::with_capacity(n);
    let mut cpu_after_first = 0;
    let mut switches_after_first = 0;
    for (i, (event, status)) in events.into_iter().enumerate() {
        let queued = Instant::now();
        api.invoke(event);
        let (answered, body) = wait_for_response(&mut api, function).await;
        if i == 0 || i == n - 1 {
            check_answer(function, &body, status).unwrap_or_else(|e| panic!("{e}"));
        }
        if i == 0 {
            cpu_after_first = cpu_ns(pid);
            switches_after_first = context_switches(pid);
        } else {
            times.push(answered - queued);
        }
    }
    let cpu_total = cpu_ns(pid).saturating_sub(cpu_after_first);
    let switches = context_switches(pid).saturating_sub(switches_after_first);
    let hwm_kib = proc_status_kib(pid, "VmHWM:");
    let db_connections = function_connections(pool).await - before;
    stop(child);
    Warm {
        rss_init_kib,
        hwm_kib,
        invoke: Samples::new(&times),
        cpu_per_invoke_us: cpu_total as f64 / 1000.0 / (n - 1) as f64,
        switches_per_invoke: switches as f64 / (n - 1) as f64,
        db_connections,
    }
}

/// Zipped size of the binary as Lambda's `bootstrap`: the `zip` CLI, else python3's zipfile.
fn zipped_size(bin: &Path) -> Option<u64> {
    let dir = std::env::temp_dir().join(format!("bench-zip-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).ok()?;
    std::fs::copy(bin, dir.join("bootstrap")).ok()?;
    let zipped = Command::new("zip")
        .args(["-q", "-X", "bootstrap.zip", "bootstrap"])
        .current_dir(&dir)
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
        || Command::new("python3")
            .args(["-m", "zipfile", "-c", "bootstrap.zip", "bootstrap"])
            .current_dir(&dir)
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
    let size = zipped
        .then(|| std::fs::metadata(dir.join("bootstrap.zip")).ok())
        .flatten()
        .map(|m| m.len());
    let _ = std::fs::remove_dir_all(&dir);
    size
}

// ------------------------------------------------------------------ 4. bcrypt

async fn bcrypt_table(
    settings: &Settings,
    state: &'static AppState,
    state4: &'static AppState,
    fx: &Fixture,
) -> Table {
    let time = |state: &'static AppState, request: ApiEvent, expect: u16| async move {
        let (function, event) = request.event();
        let started = Instant::now();
        let (status, text) = call(state, function, &event).await;
        let elapsed = started.elapsed();
        assert_eq!(status, expect, "{function}: {text}");
        elapsed
    };
    let login = |name: &str| {
        ApiEvent::new("POST", "/login").json(json!({"name": name, "password": PASSWORD}))
    };
    let register = || {
        ApiEvent::new("POST", "/register")
            .source_ip(&next_ip())
            .json(json!({"name": fresh_name("bc"), "password": PASSWORD, "public_key": ED25519}))
    };
    let mut t = Table::new(
        "bcrypt: handler time in process (ms; the hash dominates, it is not overhead)",
        &["call", "cost", "median", "min", "max"],
    );
    let cost = settings.bcrypt_cost;
    let runs = settings.bcrypt_runs;
    for (label, st, user, c) in [
        ("POST /login", state, &fx.login_cfg, cost),
        ("POST /login", state4, &fx.login_4, 4),
    ] {
        let mut v = Vec::new();
        for _ in 0..runs {
            v.push(time(st, login(user), 200).await);
        }
        let s = Samples::new(&v);
        t.row(vec![
            label.into(),
            c.to_string(),
            ms(s.p50()),
            ms(s.pct(0.0)),
            ms(s.pct(100.0)),
        ]);
    }
    for (st, c) in [(state, cost), (state4, 4)] {
        let mut v = Vec::new();
        for _ in 0..runs {
            v.push(time(st, register(), 201).await);
        }
        let s = Samples::new(&v);
        t.row(vec![
            "POST /register".into(),
            c.to_string(),
            ms(s.p50()),
            ms(s.pct(0.0)),
            ms(s.pct(100.0)),
        ]);
    }
    t.note(&format!(
        "median of {runs}; login verifies against the user's stored hash (made at that cost); BCRYPT_COST={cost} here"
    ));
    t
}

// ------------------------------------------------------------------ machine

fn cpu_model() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    for key in ["model name", "Model", "Hardware", "CPU part"] {
        if let Some(v) = info
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_once(':'))
        {
            return v.1.trim().to_string();
        }
    }
    "unknown".into()
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

fn command_line(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

async fn machine(pool: &PgPool) {
    let version: String = sqlx::query_scalar("SHOW server_version")
        .fetch_one(pool)
        .await
        .unwrap_or_default();
    let ssl: bool = sqlx::query_scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        .fetch_one(pool)
        .await
        .unwrap_or(false);
    let mem_kib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .next()
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .unwrap_or(0);
    println!("Secure Messenger API: make bench");
    println!(
        "machine     : {} CPU(s), {}, {:.1} GiB RAM, Linux {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        cpu_model(),
        mem_kib as f64 / 1024.0 / 1024.0,
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
    );
    println!(
        "postgresql  : {version} on 127.0.0.1 (TLS: {})",
        if ssl { "yes" } else { "no" }
    );
    println!("rustc       : {}", command_line("rustc", &["--version"]));
    println!(
        "load avg    : {} (at start; the CPUs are shared)",
        loadavg()
    );
}

// ------------------------------------------------------------------ main

// The functions' own runtime flavour, so in-process figures match what Lambda runs.
#[tokio::main(flavor = "current_thread")]
async fn main() {
    let settings = Settings::from_env();
    if cfg!(debug_assertions) {
        eprintln!("warning: a debug build; run `cargo run --release -p bench` for real figures");
    }
    let mut functions_all: Vec<&str> = HTTP_FUNCTIONS.to_vec();
    functions_all.extend(["purge", "migrate"]);
    functions_all.retain(|f| settings.selected(f));
    let missing: Vec<&&str> = functions_all
        .iter()
        .filter(|f| (settings.phase('2') || settings.phase('3')) && !settings.binary(f).is_file())
        .collect();
    assert!(
        missing.is_empty(),
        "missing {missing:?} in {}: run `cargo build --release --bins` first",
        settings.bin_dir.display()
    );

    // The production log format, written (and paid for) per request, to /dev/null.
    let devnull = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/null")
        .expect("/dev/null");
    let _ =
        lambda_http::tracing::dispatcher::set_global_default(lambda_http::tracing::Dispatch::new(
            common::telemetry::json_subscriber(std::sync::Mutex::new(devnull)),
        ));

    let state = app_state(&settings.database_url, settings.bcrypt_cost, None).await;
    check_bench_database(state.pool()).await;
    MIGRATOR
        .run(state.pool())
        .await
        .expect("applying migrations to the bench database");
    let state4 = app_state(&settings.database_url, 4, Some(state.pool())).await;
    machine(state.pool()).await;
    let fx = setup(state, state4).await;

    let mut worst_ratio = None;
    let mut worst_init = None;
    let mut biggest = None;
    if settings.phase('1') {
        worst_ratio = Some(phase1(&settings, state, &fx).await);
    }
    if settings.phase('2') {
        worst_init = Some(phase2(&settings, &fx).await);
    }
    if settings.phase('3') {
        biggest = Some(phase3(&settings, &fx, &functions_all, state.pool()).await);
    }
    if settings.phase('4') {
        bcrypt_table(&settings, state, state4, &fx).await.print();
    }

    println!();
    println!("load avg    : {} (at the end)", loadavg());
    let show = |v: Option<String>| v.unwrap_or_else(|| "not run".into());
    println!(
        "summary     : handler/SQL p50 worst {} (target <= 1.30) | init p50 worst {} ms (target < 20) | largest binary {} MiB (target < 8 MB = 7.63 MiB)",
        show(worst_ratio.map(|r| format!("{r:.2}"))),
        show(worst_init.map(|v| format!("{:.1}", v / 1000.0))),
        show(biggest.map(mib)),
    );
}

async fn phase1(settings: &Settings, state: &'static AppState, fx: &Fixture) -> f64 {
    // 1.
    let n = settings.iterations;
    let warmup = (n / 10).max(50);
    let mut main_table = Table::new(
        &format!(
            "1. Handler cost over the database's own cost (us; warm, in process, {n} interleaved iterations after {warmup} warm-up)"
        ),
        &[
            "endpoint",
            "handler p50",
            "p99",
            "SQL p50",
            "p99",
            "overhead p50",
            "paired",
            "ratio p50",
            "ratio p99",
        ],
    );
    let mut breakdown = Table::new(
        "1b. Where the non-SQL time goes (p50, us)",
        &[
            "endpoint",
            "event parse",
            "dispatch",
            "of it SQL",
            "handler code",
            "shell",
        ],
    );
    let mut worst_ratio: f64 = 0.0;
    for case in cases(fx) {
        let m = measure_case(
            state,
            fx,
            &case,
            warmup / case.divisor,
            (n / case.divisor).max(10),
        )
        .await;
        let (sql50, sql99) = m
            .sql
            .as_ref()
            .map_or((f64::NAN, f64::NAN), |s| (s.p50(), s.p99()));
        let ratio50 = m.full.p50() / sql50;
        if ratio50.is_finite() {
            worst_ratio = worst_ratio.max(ratio50);
        }
        main_table.row(vec![
            case.label.into(),
            us(m.full.p50()),
            us(m.full.p99()),
            us(sql50),
            us(sql99),
            us(m.full.p50() - if sql50.is_nan() { 0.0 } else { sql50 }),
            us(m.paired_overhead),
            if ratio50.is_finite() {
                format!("{ratio50:.2}")
            } else {
                "-".into()
            },
            if sql99.is_nan() {
                "-".into()
            } else {
                format!("{:.2}", m.full.p99() / sql99)
            },
        ]);
        breakdown.row(vec![
            case.label.into(),
            us(m.parse.p50()),
            us(m.dispatch.p50()),
            us(sql50),
            us(m.dispatch.p50() - if sql50.is_nan() { 0.0 } else { sql50 }),
            us(m.full.p50() - m.parse.p50() - m.dispatch.p50()),
        ]);
    }
    main_table.note("handler = lambda_http::request::from_str(event) + common::runtime::respond(functions::dispatch), JWT check and log line included");
    main_table.note("SQL = the handler's statement(s) through sqlx on the same pool (same prepared-statement cache, same binds)");
    main_table.note("overhead p50 = handler p50 - SQL p50; paired = median over iterations of (handler - SQL), the steadier estimate on a busy machine");
    main_table.note(&format!(
        "physical limit 1.00; target <= 1.30 at p50. Worst ratio p50: {worst_ratio:.2}"
    ));
    breakdown.note("dispatch = functions::dispatch on a parsed request (no log line, no CORS); handler code = dispatch - SQL");
    breakdown.note("shell = full - parse - dispatch (respond(): method/route strings, the JSON log line, CORS)");
    main_table.print();
    breakdown.print();
    micro(state, fx, n, &settings.database_url).await.print();

    worst_ratio
}

async fn phase2(settings: &Settings, fx: &Fixture) -> f64 {
    // 2.
    let mut cold_table = Table::new(
        &format!(
            "2. Cold start of the release binaries (ms; median of {} runs; spawn -> first `next` poll, spawn -> first response)",
            settings.cold_runs
        ),
        &[
            "function",
            "init p50",
            "init p90",
            "init CPU p50",
            "first response p50",
            "p90",
            "first invoke p50",
        ],
    );
    let mut worst_init: f64 = 0.0;
    let mut cold_fns: Vec<&str> = HTTP_FUNCTIONS.to_vec();
    cold_fns.push("purge");
    let mut runs: Vec<(&str, bool)> = cold_fns.iter().map(|f| (*f, false)).collect();
    runs.extend([("me", true), ("health", true)]);
    runs.retain(|(f, _)| settings.selected(f));
    for (function, iam) in runs {
        let label = if iam {
            format!("{function} (IAM auth mode)")
        } else {
            function.to_string()
        };
        match cold_start(settings, fx, function, iam).await {
            Ok(c) => {
                if !iam {
                    worst_init = worst_init.max(c.init.p50());
                }
                cold_table.row(vec![
                    label,
                    ms(c.init.p50()),
                    ms(c.init.pct(90.0)),
                    ms(c.init_cpu.p50()),
                    ms(c.first.p50()),
                    ms(c.first.pct(90.0)),
                    ms(c.first.p50() - c.init.p50()),
                ]);
            }
            Err(error) => {
                cold_table.row(vec![
                    label,
                    "-".into(),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                ]);
                cold_table.note(&format!("{function}: {error}"));
            }
        }
    }
    cold_table.note("init CPU = CPU time of all the process's threads at its first `next` poll (/proc schedstat): the work, without waits for a busy CPU");
    cold_table.note("first response includes the first database connection (TCP + TLS + auth) and the first statement prepare");
    cold_table.note("IAM auth mode (production's DB_IAM_AUTH=true): the function signs an RDS token (SigV4, offline) at init; same server, trust auth ignores the token");
    cold_table.note(&format!(
        "register and login include one bcrypt at cost {}; target init < 20 ms median. Worst init p50: {:.1} ms",
        settings.bcrypt_cost,
        worst_init / 1000.0
    ));
    cold_table.print();

    worst_init
}

async fn phase3(settings: &Settings, fx: &Fixture, functions_all: &[&str], pool: &PgPool) -> u64 {
    // 3.
    let w = settings.warm_invocations;
    let mut size_table = Table::new(
        &format!(
            "3. Size and memory (stripped release binary; zip of it as `bootstrap`; RSS via /proc after init and peak after {w} invocations)"
        ),
        &[
            "function",
            "binary bytes",
            "MiB",
            "zip bytes",
            "RSS init MiB",
            "peak RSS MiB",
            "warm invoke p50 us",
            "p99 us",
            "CPU us/invoke",
            "ctx sw/invoke",
            "DB conns",
        ],
    );
    let mut biggest = 0u64;
    for function in functions_all {
        let bin = settings.binary(function);
        let size = std::fs::metadata(&bin).map(|m| m.len()).unwrap_or(0);
        biggest = biggest.max(size);
        let zip = zipped_size(&bin).map_or("-".into(), bytes);
        let mut row = vec![function.to_string(), bytes(size), mib(size), zip];
        if *function == "migrate" {
            row.extend([
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
            ]);
        } else {
            let warm = warm_instance(settings, fx, function, pool).await;
            row.extend([
                mib(warm.rss_init_kib * 1024),
                mib(warm.hwm_kib * 1024),
                us(warm.invoke.p50()),
                us(warm.invoke.p99()),
                us(warm.cpu_per_invoke_us),
                format!("{:.1}", warm.switches_per_invoke),
                warm.db_connections.to_string(),
            ]);
        }
        size_table.row(row);
    }
    size_table.note("warm invoke = event queued on the Runtime API -> response received: the whole instance loop (HTTP to the runtime API, parse, handler, SQL, response JSON)");
    size_table.note("CPU us/invoke = the function process's CPU time over the warm invocations / their number (all threads, /proc schedstat); ctx sw = its threads' context switches per invocation; DB conns = connections it holds at the end (DB_MAX_CONNECTIONS, default 1)");
    size_table.note("these instances run with BCRYPT_COST=4 (register makes 1,000 accounts); login's user is hashed at cost 4");
    size_table.note(&format!(
        "target: each stripped binary < 8 MB. Largest: {} bytes ({} MiB)",
        bytes(biggest),
        mib(biggest)
    ));
    size_table.print();

    biggest
}
