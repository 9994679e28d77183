//! In-process calls through the real request path: API Gateway HTTP API (v2) event JSON, parsed
//! by `lambda_http::request::from_str`, through `common::runtime::respond` and the function's
//! handler, against the fresh database `#[sqlx::test]` made for the test.

use std::collections::HashMap;

use common::AppState;
use common::config::Config;
use common::db::Database;
use functions::api_event::{ApiEvent, DEFAULT_SOURCE_IP};
use serde_json::{Value, json};
use sqlx::PgPool;

pub const JWT_SECRET: &str = "integration-test-secret-0123456789abcdef";
pub const PASSWORD: &str = "correct horse battery staple";
pub const CLIENT_IP: &str = DEFAULT_SOURCE_IP;

pub fn key(name: &str) -> String {
    std::fs::read_to_string(format!(
        "{}/../testdata/keys/{name}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
}

/// Test defaults overridden by `vars`: bcrypt cost 4, and otherwise the settings template.yaml
/// deploys (no statement cache, one connection per instance).
fn test_config(vars: &[(&str, &str)]) -> Config {
    let mut env: HashMap<String, String> = [
        ("JWT_SECRET", JWT_SECRET),
        ("DATABASE_URL", "postgres://unused-the-pool-is-given"),
        ("BCRYPT_COST", "4"),
        ("DB_STATEMENT_CACHE_CAPACITY", "0"),
        ("DB_MAX_CONNECTIONS", "1"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    env.extend(vars.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    Config::from_lookup(|k| env.get(k).cloned()).expect("test config is valid")
}

pub struct TestApp {
    pub state: &'static AppState,
    pub pool: PgPool,
}

impl TestApp {
    pub fn new(pool: PgPool) -> Self {
        Self::with_env(pool, &[])
    }

    /// A state as a Lambda instance builds it, from these variables over test defaults: the
    /// pool `Database::connect` makes (one connection, unnamed statements, as deployed) to the
    /// test's database. `pool` stays the test's own, for setting up and checking.
    pub fn with_env(pool: PgPool, vars: &[(&str, &str)]) -> Self {
        let config = test_config(vars);
        let db = Database::connect_with(&config.database, (*pool.connect_options()).clone());
        let state = Box::leak(Box::new(AppState::new(config, db)));
        Self { state, pool }
    }

    /// A state built exactly as in production, including the pool (lazy, with its timeouts),
    /// from these variables (which must include `DATABASE_URL`).
    pub async fn connect(vars: &[(&str, &str)]) -> Self {
        let config = test_config(vars);
        let db = Database::connect(&config.database).expect("database config is valid");
        let pool = db.pool().clone();
        let state = Box::leak(Box::new(AppState::new(config, db)));
        Self { state, pool }
    }

    pub fn request(&self, method: &str, path_and_query: &str) -> RequestBuilder<'_> {
        RequestBuilder {
            app: self,
            event: ApiEvent::new(method, path_and_query).header("content-type", "application/json"),
        }
    }

    /// Registers `name` with the test password and an Ed25519 key; returns its id.
    pub async fn register(&self, name: &str) -> String {
        let r = self
            .request("POST", "/register")
            .json(json!({"name": name, "password": PASSWORD, "public_key": key("ed25519.pem")}))
            .send()
            .await;
        assert_eq!(r.status, 201, "register {name}: {}", r.body);
        r.body["id"].as_str().unwrap().to_string()
    }

    pub async fn login(&self, name: &str) -> String {
        let r = self
            .request("POST", "/login")
            .json(json!({"name": name, "password": PASSWORD}))
            .send()
            .await;
        assert_eq!(r.status, 200, "login {name}: {}", r.body);
        r.body["access_token"].as_str().unwrap().to_string()
    }

    /// Registers and logs in: (id, token).
    pub async fn user(&self, name: &str) -> (String, String) {
        let id = self.register(name).await;
        (id, self.login(name).await)
    }
}

/// An instance's connections close when the test is done with it, so the harness can drop the
/// test's database at once (PostgreSQL waits 5 s for sessions still connected, then gives up).
impl Drop for TestApp {
    fn drop(&mut self) {
        let pool = self.state.pool().clone();
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move { pool.close().await });
        }
    }
}

/// A request as API Gateway would deliver it (`ApiEvent`), sent to this app's state.
pub struct RequestBuilder<'a> {
    app: &'a TestApp,
    event: ApiEvent,
}

#[derive(Debug)]
pub struct TestResponse {
    pub status: u16,
    pub headers: lambda_http::http::HeaderMap,
    pub text: String,
    pub body: Value,
}

impl TestResponse {
    pub fn error_code(&self) -> &str {
        self.body["error"].as_str().unwrap_or("")
    }

    /// Asserts the contract's error body and status.
    pub fn assert_error(&self, status: u16, code: &str) {
        assert_eq!(
            (self.status, self.error_code()),
            (status, code),
            "body: {}",
            self.text
        );
        assert!(
            self.body["message"].is_string(),
            "error body needs a message: {}",
            self.text
        );
        assert_eq!(self.headers["content-type"], "application/json");
    }
}

impl RequestBuilder<'_> {
    pub fn json(mut self, body: Value) -> Self {
        self.event = self.event.json(body);
        self
    }

    pub fn raw_body(mut self, body: &str) -> Self {
        self.event = self.event.raw_body(body);
        self
    }

    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.event = self.event.header(name, value);
        self
    }

    pub fn bearer(mut self, token: &str) -> Self {
        self.event = self.event.bearer(token);
        self
    }

    pub fn with_source_ip(mut self, ip: &str) -> Self {
        self.event = self.event.source_ip(ip);
        self
    }

    pub async fn send(self) -> TestResponse {
        let (function, event) = self.event.event();
        let request = lambda_http::request::from_str(&event).expect("a valid API Gateway v2 event");
        let state = self.app.state;
        let response = common::runtime::respond(function, state, request, move |state, request| {
            functions::dispatch(function, state, request)
        })
        .await;
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let text = match response.body() {
            lambda_http::Body::Empty => String::new(),
            lambda_http::Body::Text(t) => t.clone(),
            lambda_http::Body::Binary(b) => String::from_utf8_lossy(b).into_owned(),
            _ => String::new(),
        };
        let body = serde_json::from_str(&text).unwrap_or(Value::Null);
        TestResponse {
            status,
            headers,
            text,
            body,
        }
    }
}

/// Waits until `sessions` sessions of the test's database wait on a lock, for up to `within`;
/// false when they never did.
pub async fn until_waiting_on_locks(
    pool: &PgPool,
    sessions: usize,
    within: std::time::Duration,
) -> bool {
    let deadline = std::time::Instant::now() + within;
    loop {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        .fetch_one(pool)
        .await
        .unwrap();
        if waiting as usize >= sessions {
            return true;
        }
        if std::time::Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}
