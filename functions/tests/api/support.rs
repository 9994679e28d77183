//! In-process calls through the real request path: API Gateway HTTP API (v2) event JSON, parsed
//! by `lambda_http::request::from_str`, through `common::runtime::respond` and the function's
//! handler, against the fresh database `#[sqlx::test]` made for the test.

use std::collections::HashMap;

use common::AppState;
use common::config::Config;
use common::db::Database;
use functions::routes;
use serde_json::{Value, json};
use sqlx::PgPool;

pub const JWT_SECRET: &str = "integration-test-secret-0123456789abcdef";
pub const PASSWORD: &str = "correct horse battery staple";
pub const CLIENT_IP: &str = "203.0.113.7";

pub fn key(name: &str) -> String {
    std::fs::read_to_string(format!(
        "{}/../testdata/keys/{name}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
}

/// Test defaults (bcrypt cost 4) overridden by `vars`.
fn test_config(vars: &[(&str, &str)]) -> Config {
    let mut env: HashMap<String, String> = [
        ("JWT_SECRET", JWT_SECRET),
        ("DATABASE_URL", "postgres://unused-the-pool-is-given"),
        ("BCRYPT_COST", "4"),
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

    /// A state as a Lambda instance would build it, from these variables over test defaults.
    pub fn with_env(pool: PgPool, vars: &[(&str, &str)]) -> Self {
        let config = test_config(vars);
        let state = Box::leak(Box::new(AppState::new(
            config,
            Database::from_pool(pool.clone()),
        )));
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
            method: method.to_string(),
            path_and_query: path_and_query.to_string(),
            headers: vec![("content-type".into(), "application/json".into())],
            body: None,
            source_ip: CLIENT_IP.to_string(),
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

pub struct RequestBuilder<'a> {
    app: &'a TestApp,
    method: String,
    path_and_query: String,
    headers: Vec<(String, String)>,
    body: Option<String>,
    source_ip: String,
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
        self.body = Some(body.to_string());
        self
    }

    pub fn raw_body(mut self, body: &str) -> Self {
        self.body = Some(body.to_string());
        self
    }

    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.retain(|(n, _)| !n.eq_ignore_ascii_case(name));
        self.headers
            .push((name.to_ascii_lowercase(), value.to_string()));
        self
    }

    pub fn bearer(self, token: &str) -> Self {
        self.header("authorization", &format!("Bearer {token}"))
    }

    pub fn with_source_ip(mut self, ip: &str) -> Self {
        self.source_ip = ip.to_string();
        self
    }

    /// The event API Gateway would send for this request (payload format 2.0).
    pub fn event(&self) -> (Value, &'static str) {
        let (path, query) = self
            .path_and_query
            .split_once('?')
            .unwrap_or((&self.path_and_query, ""));
        let (route_key, function, path_params) = match routes::find(&self.method, path) {
            Ok(m) => (
                format!("{} {}", m.method, m.template),
                m.function,
                Some(m.params.into_iter().collect::<HashMap<_, _>>()),
            ),
            Err(_) => ("$default".to_string(), "not-found", None),
        };
        let mut query_params: HashMap<String, String> = HashMap::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let v = v.replace('+', " ");
            let v = percent_decode(&v);
            query_params
                .entry(k.to_string())
                .and_modify(|e| {
                    e.push(',');
                    e.push_str(&v)
                })
                .or_insert(v);
        }
        let headers: HashMap<&str, &str> = self
            .headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let mut event = json!({
            "version": "2.0",
            "routeKey": route_key,
            "rawPath": path,
            "rawQueryString": query,
            "headers": headers,
            "requestContext": {
                "accountId": "123456789012",
                "apiId": "testapi",
                "domainName": "testapi.execute-api.eu-west-1.amazonaws.com",
                "domainPrefix": "testapi",
                "http": {
                    "method": self.method,
                    "path": path,
                    "protocol": "HTTP/1.1",
                    "sourceIp": self.source_ip,
                    "userAgent": "integration-test"
                },
                "requestId": "test-request",
                "routeKey": route_key,
                "stage": "$default",
                "time": "28/Nov/2026:12:00:00 +0000",
                "timeEpoch": 1_795_867_200_000u64
            },
            "isBase64Encoded": false
        });
        if !query_params.is_empty() {
            event["queryStringParameters"] = json!(query_params);
        }
        if let Some(params) = path_params.filter(|p| !p.is_empty()) {
            event["pathParameters"] = json!(params);
        }
        if let Some(body) = &self.body {
            event["body"] = json!(body);
        }
        (event, function)
    }

    pub async fn send(self) -> TestResponse {
        let (event, function) = self.event();
        let request = lambda_http::request::from_str(&event.to_string())
            .expect("a valid API Gateway v2 event");
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

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let Ok(b) = u8::from_str_radix(&s[i + 1..i + 3], 16)
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}
