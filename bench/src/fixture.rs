//! The bench's database, application states and fixture: users and messages made through the
//! handlers themselves, and one request through the production path.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use common::AppState;
use common::config::Config;
use common::db::Database;
use common::domain::PublicKeyPem;
use functions::api_event::ApiEvent;
use serde_json::{Value, json};
use sqlx::PgPool;
use uuid::Uuid;

pub(crate) const JWT_SECRET: &str = "bench-jwt-secret-0123456789abcdef0123456789";
pub(crate) const PASSWORD: &str = "correct horse battery staple";
pub(crate) const ED25519: &str = include_str!("../../testdata/keys/ed25519.pem");
pub(crate) const EVENTBRIDGE: &str = include_str!("../fixtures/example-eventbridge-schedule.json");
/// Ciphertext per message, and messages waiting in the caller's inbox for GET /messages.
pub(crate) const CIPHERTEXT_BYTES: usize = 1024;
pub(crate) const INBOX: usize = 10;
pub(crate) const BIG_CIPHERTEXT_BYTES: usize = 60 * 1024;
pub(crate) const PAGE_LIMIT: i64 = 100;
/// `me.rs` and `health.rs` keep their SQL inline; these are copies of it.
pub(crate) const ME_SQL: &str = functions::me::SQL;
pub(crate) const READY_SQL: &str = "SELECT 1";

/// A unique client address per call, so registration's per-address limit never trips.
pub(crate) fn next_ip() -> String {
    static N: AtomicU32 = AtomicU32::new(1);
    let n = N.fetch_add(1, Ordering::Relaxed);
    format!("10.{}.{}.{}", (n >> 16) & 255, (n >> 8) & 255, n & 255)
}

/// A short name no earlier run used (names are 3..32 of [A-Za-z0-9_.-]).
pub(crate) fn fresh_name(prefix: &str) -> String {
    let id = Uuid::now_v7().simple().to_string();
    format!("{prefix}{}", &id[id.len() - 16..])
}

pub(crate) async fn app_state(
    url: &str,
    bcrypt_cost: u32,
    pool: Option<&PgPool>,
) -> &'static AppState {
    app_state_with(url, bcrypt_cost, pool, &[]).await
}

/// An application state as a function instance builds it, from these variables. The bench
/// measures cost, not quotas: the sender's rate and the mailbox size are lifted so thousands of
/// sends from one user to another go through (their counting is still paid for).
pub(crate) async fn app_state_with(
    url: &str,
    bcrypt_cost: u32,
    pool: Option<&PgPool>,
    extra: &[(&'static str, String)],
) -> &'static AppState {
    let mut vars: HashMap<&str, String> = HashMap::from([
        ("DATABASE_URL", url.to_string()),
        ("JWT_SECRET", JWT_SECRET.to_string()),
        ("BCRYPT_COST", bcrypt_cost.to_string()),
        ("SEND_MAX_PER_WINDOW", "1000000".to_string()),
        ("MAX_PENDING_PER_RECIPIENT", "1000000".to_string()),
        ("MAX_PENDING_FROM_ONE_SENDER", "1000000".to_string()),
    ]);
    vars.extend(extra.iter().cloned());
    let config = Config::from_lookup(|k| vars.get(k).cloned()).expect("bench config is valid");
    let db = match pool {
        Some(pool) => Database::connect_with(&config.database, (*pool.connect_options()).clone()),
        None => Database::connect(&config.database).expect("DATABASE_URL is valid"),
    };
    Box::leak(Box::new(AppState::new(config, db)))
}

/// One request through the production path: event JSON -> Request -> respond(dispatch).
pub(crate) async fn call(
    state: &'static AppState,
    function: &'static str,
    event: &str,
) -> (u16, String) {
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

pub(crate) async fn call_ok(state: &'static AppState, request: ApiEvent, expect: u16) -> Value {
    let (function, event) = request.event();
    let (status, text) = call(state, function, &event).await;
    assert_eq!(status, expect, "{function}: {text}");
    serde_json::from_str(&text).unwrap_or(Value::Null)
}

/// The users and messages every measurement uses, made through the handlers themselves.
pub(crate) struct Fixture {
    pub(crate) alice: Uuid,
    pub(crate) alice_token: String,
    pub(crate) bob: Uuid,
    pub(crate) bob_name: String,
    pub(crate) carol: Uuid,
    /// Registered at the configured cost, and at cost 4.
    pub(crate) login_cfg: String,
    pub(crate) login_4: String,
    pub(crate) ciphertext: Vec<u8>,
    pub(crate) ciphertext_b64: String,
    /// 60 KiB: a TLS write of several TCP segments.
    pub(crate) big_ciphertext: Vec<u8>,
    pub(crate) pem: String,
    pub(crate) confirmed_id: Uuid,
}

pub(crate) async fn register(state: &'static AppState, name: &str) -> Uuid {
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
pub(crate) async fn check_bench_database(pool: &PgPool) {
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

pub(crate) async fn setup(state: &'static AppState, state4: &'static AppState) -> Fixture {
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
    let bob_token = state.jwt().unwrap().issue(bob, 1).unwrap().access_token;
    let alice_token = state.jwt().unwrap().issue(alice, 1).unwrap().access_token;
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
