//! Abuse resistance: rate limits shared across instances, log hygiene, hostile bodies.

use std::io::Write;
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use serde_json::json;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

use crate::prekeys;
use crate::support::{JWT_SECRET, PASSWORD, RequestBuilder, TestApp, key, until_waiting_on_locks};

/// A second "Lambda instance": its own pool (own connections) and state over the same database.
async fn second_instance(pool: &PgPool, vars: &[(&str, &str)]) -> TestApp {
    let options = (*pool.connect_options()).clone();
    let own_pool = PgPoolOptions::new()
        .max_connections(2)
        .connect_with(options)
        .await
        .unwrap();
    TestApp::with_env(own_pool, vars)
}

#[sqlx::test(migrator = "common::db::MIGRATOR")]
async fn two_instances_share_one_failure_budget(pool: PgPool) {
    let vars = [
        ("LOGIN_MAX_FAILURES", "4"),
        ("LOGIN_MAX_FAILURES_PER_ADDRESS", "1000"),
        ("LOGIN_WINDOW_SECONDS", "3"),
    ];
    let a = TestApp::with_env(pool.clone(), &vars);
    let b = second_instance(&pool, &vars).await;
    a.register("victim").await;
    a.register("bystander").await;
    let wrong = || json!({"name": "victim", "password": "not-the-password"});
    // Alternate between the instances: the 4 failures add up across them.
    for (i, app) in [&a, &b, &a, &b].into_iter().enumerate() {
        let r = app.request("POST", "/login").json(wrong()).send().await;
        r.assert_error(401, "invalid_credentials");
        let _ = i;
    }
    for app in [&a, &b] {
        let r = app
            .request("POST", "/login")
            .json(json!({"name": "victim", "password": PASSWORD}))
            .send()
            .await;
        r.assert_error(429, "rate_limited");
        let retry: u64 = r.headers["retry-after"].to_str().unwrap().parse().unwrap();
        assert!(
            (1..=3).contains(&retry),
            "Retry-After {retry} must be within the 3 s window"
        );
    }
    // Another name is not locked, on either instance.
    b.login("bystander").await;
    a.login("bystander").await;
    // The window really expires (no clock tampering here).
    tokio::time::sleep(std::time::Duration::from_millis(3100)).await;
    b.login("victim").await;
}

#[sqlx::test(migrator = "common::db::MIGRATOR")]
async fn per_address_limits_hold_across_instances_and_names(pool: PgPool) {
    let vars = [
        ("LOGIN_MAX_FAILURES", "1000"),
        ("LOGIN_MAX_FAILURES_PER_ADDRESS", "6"),
    ];
    let a = TestApp::with_env(pool.clone(), &vars);
    let b = second_instance(&pool, &vars).await;
    a.register("target").await;
    for i in 0..6 {
        let app = if i % 2 == 0 { &a } else { &b };
        let r = app
            .request("POST", "/login")
            .json(json!({"name": format!("spray{i}"), "password": "wrong-password"}))
            .send()
            .await;
        r.assert_error(401, "invalid_credentials");
    }
    for app in [&a, &b] {
        let r = app
            .request("POST", "/login")
            .json(json!({"name": "target", "password": PASSWORD}))
            .send()
            .await;
        r.assert_error(429, "rate_limited");
    }
    let other = b
        .request("POST", "/login")
        .with_source_ip("198.51.100.77")
        .json(json!({"name": "target", "password": PASSWORD}))
        .send()
        .await;
    assert_eq!(other.status, 200, "another address keeps its own budget");
}

#[sqlx::test(migrator = "common::db::MIGRATOR")]
async fn concurrent_failures_are_all_counted(pool: PgPool) {
    let vars = [("LOGIN_MAX_FAILURES", "1000")];
    let a = TestApp::with_env(pool.clone(), &vars);
    let b = second_instance(&pool, &vars).await;
    a.register("racer").await;
    let attempts = (0..20).map(|i| {
        let app = if i % 2 == 0 { &a } else { &b };
        app.request("POST", "/login")
            .json(json!({"name": "racer", "password": "wrong-password"}))
            .send()
    });
    futures::future::join_all(attempts).await;
    let counted: i32 = sqlx::query_scalar(
        "SELECT attempts FROM rate_limits WHERE bucket = 'login_name' AND key = 'racer'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(counted, 20, "the atomic upsert loses no attempt");
}

/// `DELETE /me` checks the password as a login attempt, counted and refused in the one
/// statement before bcrypt: 40 wrong passwords at once on 10 instances are at most
/// `LOGIN_MAX_FAILURES` checked, the refused ones give their count back to the name and the
/// address in that same statement (only the name-and-address counter keeps them), and a token
/// whose account is gone is 401 `unauthorized` with nothing counted.
#[sqlx::test(migrator = "common::db::MIGRATOR")]
async fn password_checks_of_a_caller_hold_the_limit_under_concurrency(pool: PgPool) {
    let vars = [("LOGIN_MAX_FAILURES", "5")];
    let setup = TestApp::with_env(pool.clone(), &vars);
    let (_, token) = setup.user("holder").await;
    let mut apps = Vec::new();
    for _ in 0..10 {
        apps.push(second_instance(&pool, &vars).await);
    }
    let attempts = (0..40).map(|i| {
        apps[i % apps.len()]
            .request("DELETE", "/me")
            .bearer(&token)
            .with_source_ip("198.51.100.9")
            .json(json!({"password": "wrong-password"}))
            .send()
    });
    let (mut checked, mut limited) = (0, 0);
    for r in futures::future::join_all(attempts).await {
        match r.status {
            401 => {
                r.assert_error(401, "invalid_credentials");
                checked += 1;
            }
            429 => limited += 1,
            other => panic!("unexpected {other}: {}", r.text),
        }
    }
    assert!(
        checked <= 5,
        "{checked} of 40 were checked against the password"
    );
    assert_eq!(checked + limited, 40);
    let counters = || async {
        let rows: Vec<(String, String, i32)> = sqlx::query_as(
            "SELECT bucket, key, attempts FROM rate_limits \
             WHERE attempts > 0 AND bucket LIKE 'login%' ORDER BY bucket, key",
        )
        .fetch_all(&pool)
        .await
        .unwrap();
        rows
    };
    assert_eq!(
        counters().await,
        [
            (
                "login_address".to_string(),
                "198.51.100.9".to_string(),
                checked
            ),
            ("login_name".to_string(), "holder".to_string(), checked),
            (
                "login_name_address".to_string(),
                "holder@198.51.100.9".to_string(),
                40
            ),
        ]
    );

    // The account deleted from another address; its token then counts nothing.
    let r = setup
        .request("DELETE", "/me")
        .bearer(&token)
        .with_source_ip("192.0.2.80")
        .json(json!({"password": PASSWORD}))
        .send()
        .await;
    assert_eq!(r.status, 204, "{}", r.text);
    let after_delete = counters().await;
    for app in &apps[..3] {
        app.request("DELETE", "/me")
            .bearer(&token)
            .with_source_ip("192.0.2.80")
            .json(json!({"password": "wrong-password"}))
            .send()
            .await
            .assert_error(401, "unauthorized");
    }
    assert_eq!(counters().await, after_delete);
}

/// The other requests a password authorises check it the same way, with the success written in
/// the statement after bcrypt: per endpoint, 40 wrong passwords at once on 10 instances are at
/// most `LOGIN_MAX_FAILURES` checked, and the right one from another address then succeeds and
/// gives its own count back in the statement that does the work.
#[sqlx::test(migrator = "common::db::MIGRATOR")]
async fn every_password_endpoint_holds_the_limit_under_concurrency(pool: PgPool) {
    #[derive(Clone, Copy, Debug)]
    enum Endpoint {
        RemoveDevice,
        ResetSigningKey,
        LinkDevice,
    }
    fn password_request<'a>(
        app: &'a TestApp,
        endpoint: Endpoint,
        user: &prekeys::Device,
        code: &str,
        password: &str,
    ) -> RequestBuilder<'a> {
        match endpoint {
            Endpoint::RemoveDevice => app
                .request("DELETE", "/devices/2")
                .bearer(&user.token)
                .json(json!({"password": password})),
            Endpoint::ResetSigningKey => {
                let mut body = prekeys::signing_key_body(user, &prekeys::secret(2));
                body["password"] = json!(password);
                prekeys::signing_key_request(app, user, body)
            }
            Endpoint::LinkDevice => app.request("POST", "/devices").json(json!({
                "name": user.name, "password": password, "link_code": code,
                "public_key": key("x25519.pem"), "label": "laptop",
            })),
        }
    }
    let vars = [("LOGIN_MAX_FAILURES", "5")];
    let setup = TestApp::with_env(pool.clone(), &vars);
    let mut apps = Vec::new();
    for _ in 0..10 {
        apps.push(second_instance(&pool, &vars).await);
    }
    for (endpoint, name) in [
        (Endpoint::RemoveDevice, "remover"),
        (Endpoint::ResetSigningKey, "resetter"),
        (Endpoint::LinkDevice, "linker"),
    ] {
        let user = prekeys::x25519_user(&setup, name).await;
        let code = match endpoint {
            Endpoint::RemoveDevice => {
                prekeys::add_device(&setup, &user, prekeys::x25519_raw("second")).await;
                String::new()
            }
            Endpoint::ResetSigningKey => {
                let first = prekeys::signing_key_body(&user, &prekeys::secret(1));
                let r = prekeys::signing_key_request(&setup, &user, first)
                    .send()
                    .await;
                assert_eq!(r.status, 200, "{}", r.text);
                String::new()
            }
            Endpoint::LinkDevice => {
                let r = setup
                    .request("POST", "/devices/link-codes")
                    .bearer(&user.token)
                    .send()
                    .await;
                assert_eq!(r.status, 201, "{}", r.text);
                r.body["code"].as_str().unwrap().to_string()
            }
        };
        let request = |app, password, ip| {
            password_request(app, endpoint, &user, &code, password).with_source_ip(ip)
        };
        let attempts = (0..40)
            .map(|i| request(&apps[i % apps.len()], "wrong-password", "198.51.100.7").send());
        let (mut checked, mut limited) = (0, 0);
        for r in futures::future::join_all(attempts).await {
            match r.status {
                401 => {
                    r.assert_error(401, "invalid_credentials");
                    checked += 1;
                }
                429 => limited += 1,
                other => panic!("{endpoint:?}: unexpected {other}: {}", r.text),
            }
        }
        assert!(checked <= 5, "{endpoint:?}: {checked} of 40 were checked");
        assert_eq!(checked + limited, 40, "{endpoint:?}");

        let r = request(&apps[0], PASSWORD, "192.0.2.81").send().await;
        assert!(
            (200..300).contains(&r.status),
            "{endpoint:?}: {} {}",
            r.status,
            r.text
        );
        let counted: Vec<(String, i32)> = sqlx::query_as(
            "SELECT bucket, attempts FROM rate_limits WHERE bucket LIKE 'login%' \
             AND key IN ($1, $1 || '@192.0.2.81') ORDER BY bucket",
        )
        .bind(name)
        .fetch_all(&pool)
        .await
        .unwrap();
        assert_eq!(
            counted,
            [
                ("login_name".to_string(), checked),
                ("login_name_address".to_string(), 0),
            ],
            "{endpoint:?}"
        );
    }
}

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
    type Writer = Captured;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

/// A full exchange, logged in the production format: no password, token, JWT secret or
/// ciphertext appears in any line, and every request has its line.
#[sqlx::test(migrator = "common::db::MIGRATOR")]
async fn logs_never_hold_secrets(pool: PgPool) {
    let captured = Captured::default();
    let _guard =
        tracing::subscriber::set_default(common::telemetry::json_subscriber(captured.clone()));
    let app = TestApp::with_env(pool, &[("METRICS_TOKEN", "metrics-secret-token-123")]);
    let (_, alice_token) = app.user("alice").await;
    let (bob, bob_token) = app.user("bob").await;
    let plaintext_like = b"ciphertext-bytes-that-must-not-be-logged";
    let ciphertext = base64::engine::general_purpose::STANDARD.encode(plaintext_like);
    let sent = app
        .request("POST", "/messages")
        .bearer(&alice_token)
        .json(json!({"recipient_id": bob, "encrypted_data": ciphertext}))
        .send()
        .await;
    let id = sent.body["id"].as_str().unwrap().to_string();
    app.request("GET", "/messages")
        .bearer(&bob_token)
        .send()
        .await;
    app.request("PUT", &format!("/messages/{id}/delivered"))
        .bearer(&bob_token)
        .send()
        .await;
    app.request("POST", "/login")
        .json(json!({"name": "alice", "password": "wrong-password-xyz"}))
        .send()
        .await;
    app.request("GET", "/metrics")
        .bearer("metrics-secret-token-123")
        .send()
        .await;
    app.request("GET", "/me")
        .bearer(&format!("{alice_token}x"))
        .send()
        .await;
    app.request("POST", "/register")
        .json(json!({"name": "x", "password": "short-pw-secret"}))
        .send()
        .await;

    let logs = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    let lines: Vec<serde_json::Value> = logs
        .lines()
        .map(|l| serde_json::from_str(l).expect("every line is JSON"))
        .collect();
    let requests = lines.iter().filter(|l| l["message"] == "request").count();
    assert_eq!(requests, 11, "one line per request:\n{logs}");
    let line = lines
        .iter()
        .find(|l| l["function"] == "send-message")
        .unwrap();
    for field in ["function", "method", "route", "status", "duration_ms"] {
        assert!(!line[field].is_null(), "{field} missing in {line}");
    }
    let alice_signature = alice_token.rsplit('.').next().unwrap();
    for secret in [
        PASSWORD,
        "wrong-password-xyz",
        "short-pw-secret",
        &alice_token,
        alice_signature,
        &bob_token,
        JWT_SECRET,
        "metrics-secret-token-123",
        &ciphertext,
        "ciphertext-bytes-that-must-not-be-logged",
    ] {
        assert!(
            !logs.contains(secret),
            "a secret reached the logs: {secret}"
        );
    }
}

#[sqlx::test(migrator = "common::db::MIGRATOR")]
async fn hostile_bodies_get_clear_4xx(pool: PgPool) {
    let app = TestApp::new(pool);
    let (_, token) = app.user("alice").await;
    // Unknown fields are ignored, by decision (forward compatibility).
    let r = app
        .request("POST", "/register")
        .json(json!({"name": "bob", "password": PASSWORD, "public_key": key("p256.pem"), "admin": true, "id": "x"}))
        .send()
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    let cases: Vec<(&str, &str, String, u16)> = vec![
        (
            "POST",
            "/login",
            "{\"name\":\"alice\",\"name\":\"bob\",\"password\":\"x\"}".into(),
            400,
        ),
        (
            "POST",
            "/login",
            format!("{}{}", "{\"a\":".repeat(200), "1"),
            400,
        ),
        (
            "POST",
            "/login",
            format!(
                "{{\"name\":\"{}\",\"password\":\"p\"}}",
                "n".repeat(100_000)
            ),
            413,
        ),
        (
            "POST",
            "/register",
            "{\"name\":\"nul\\u0000name\",\"password\":\"long-enough\",\"public_key\":\"k\"}"
                .into(),
            422,
        ),
        (
            "PUT",
            "/update-key",
            "{\"public_key\":\"-----BEGIN PUBLIC KEY-----\\u0000\"}".into(),
            422,
        ),
        ("POST", "/messages", "\u{feff}{}".into(), 400),
        (
            "POST",
            "/messages",
            "{\"recipient_id\":[],\"encrypted_data\":{}}".into(),
            400,
        ),
    ];
    for (method, path, body, status) in cases {
        let r = app
            .request(method, path)
            .bearer(&token)
            .raw_body(&body)
            .send()
            .await;
        assert_eq!(
            r.status,
            status,
            "{method} {path} {}: {}",
            &body[..body.len().min(60)],
            r.text
        );
        assert!(r.body["error"].is_string());
    }
    let r = app
        .request("POST", "/login")
        .header("content-type", "application/x-www-form-urlencoded")
        .raw_body("name=a&password=b")
        .send()
        .await;
    r.assert_error(400, "bad_request");
}

/// A signing-key reset by password racing the account's deletion, on separate instances, for
/// many accounts at once: each ends as one of the two orders (the reset first, or the account
/// gone), never a deadlock (a 500 after PostgreSQL's deadlock_timeout).
#[sqlx::test(migrator = "common::db::MIGRATOR")]
async fn a_reset_racing_the_deletion_of_its_account_never_deadlocks(pool: PgPool) {
    const ACCOUNTS: usize = 32;
    let setup = TestApp::with_env(pool.clone(), &[("REGISTER_MAX_PER_ADDRESS", "1000")]);
    let mut users = Vec::new();
    for i in 0..ACCOUNTS {
        let user = prekeys::x25519_user(&setup, &format!("racer{i}")).await;
        let first = prekeys::signing_key_body(&user, &prekeys::secret(1));
        let r = prekeys::signing_key_request(&setup, &user, first)
            .send()
            .await;
        assert_eq!(r.status, 200, "{}", r.text);
        users.push(user);
    }
    let mut apps = Vec::new();
    for _ in 0..8 {
        apps.push(second_instance(&pool, &[]).await);
    }
    let races = users.iter().enumerate().map(|(i, user)| {
        let resetter = &apps[(2 * i) % apps.len()];
        let deleter = &apps[(2 * i + 1) % apps.len()];
        async move {
            let mut reset = prekeys::signing_key_body(user, &prekeys::secret(2));
            reset["password"] = json!(PASSWORD);
            let reset = prekeys::signing_key_request(resetter, user, reset).send();
            let delete = deleter
                .request("DELETE", "/me")
                .bearer(&user.token)
                .json(json!({"password": PASSWORD}))
                .send();
            futures::future::join(reset, delete).await
        }
    });
    for (reset, delete) in futures::future::join_all(races).await {
        assert!(
            reset.status == 200 || reset.error_code() == "unauthorized",
            "reset: {} {}",
            reset.status,
            reset.text
        );
        assert_eq!(delete.status, 204, "delete: {}", delete.text);
    }
}

/// `DELETE /me` caught between its two halves: its transaction holds the account's row (as the
/// statement's `DELETE FROM users` does) while another request starts, and the cascade to the
/// account's devices comes after.
struct DeletionMidway {
    tx: sqlx::Transaction<'static, sqlx::Postgres>,
    user: uuid::Uuid,
}

impl DeletionMidway {
    async fn hold_account(pool: &PgPool, user: uuid::Uuid) -> Self {
        let mut tx = pool.begin().await.unwrap();
        sqlx::query("SELECT 1 FROM users WHERE id = $1 FOR UPDATE")
            .bind(user)
            .execute(&mut *tx)
            .await
            .unwrap();
        Self { tx, user }
    }

    /// Once `pool` shows the other request waiting on a lock: the cascade to the devices, within
    /// a lock timeout shorter than PostgreSQL's deadlock_timeout (a device row the other request
    /// took first times it out), then rolled back.
    async fn cascade(mut self, pool: &PgPool) -> Result<(), sqlx::Error> {
        assert!(
            until_waiting_on_locks(pool, 1, std::time::Duration::from_secs(5)).await,
            "the other request never waited on a lock"
        );
        sqlx::query("SET LOCAL lock_timeout = '500ms'")
            .execute(&mut *self.tx)
            .await
            .unwrap();
        let cascade = sqlx::query("DELETE FROM devices WHERE user_id = $1")
            .bind(self.user)
            .execute(&mut *self.tx)
            .await
            .map(drop);
        self.tx.rollback().await.unwrap();
        cascade
    }
}

/// The deadlock a reset by password could meet, step by step: a transaction holds the account's
/// row and its login counters, as `DELETE /me`'s statement does just before its cascade reaches
/// the devices; the reset's last statement (`SET_SQL`: `set_signing_key()`, then the counters'
/// give-back) starts. It must wait at the account's row, holding no device row, so the cascade
/// goes through (within a lock timeout shorter than PostgreSQL's deadlock_timeout: with the
/// device row taken first, the two would wait for each other).
#[sqlx::test(migrator = "common::db::MIGRATOR")]
async fn a_reset_waits_for_a_deletion_at_the_account_row(pool: PgPool) {
    let app = TestApp::new(pool.clone());
    let user = prekeys::x25519_user(&app, "holder").await;
    let (first, second) = (prekeys::secret(1), prekeys::secret(2));
    let r = prekeys::signing_key_request(&app, &user, prekeys::signing_key_body(&user, &first))
        .send()
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let pem = |key: &ed25519_dalek::SigningKey| {
        functions::signatures::ed25519_pem(key.verifying_key().as_bytes())
    };

    let mut deleting = DeletionMidway::hold_account(&pool, user.user_id).await;
    let held: Vec<(String, String)> = sqlx::query_as(
        "SELECT bucket, key FROM rate_limits WHERE bucket LIKE 'login%' ORDER BY bucket FOR UPDATE",
    )
    .fetch_all(&mut *deleting.tx)
    .await
    .unwrap();
    assert!(!held.is_empty(), "the login left its counters");

    let (buckets, keys): (Vec<String>, Vec<String>) = held.into_iter().unzip();
    let resetting = {
        let pool = pool.clone();
        let public_key = functions::signatures::x25519_pem(&user.x25519);
        let (seen, new) = (pem(&first), pem(&second));
        let user_id = user.user_id;
        tokio::spawn(async move {
            sqlx::query_as::<_, (String, bool)>(functions::set_signing_key::SET_SQL)
                .bind(buckets)
                .bind(keys)
                .bind("login_name_address")
                .bind(user_id)
                .bind(1i32)
                .bind(public_key)
                .bind(seen)
                .bind(new)
                .bind(vec![0u8; 64])
                .bind(true)
                .fetch_one(&pool)
                .await
        })
    };
    let cascade = deleting.cascade(&pool).await;
    assert!(
        cascade.is_ok(),
        "the deletion's cascade waited for the reset's device row: {cascade:?}"
    );
    let (outcome, _) = resetting.await.unwrap().unwrap();
    assert_eq!(
        outcome, "set",
        "after the deletion rolled back, the reset goes on"
    );
}

/// A login's success gives its counters back in the order the attempt counted them (name and
/// address, name, address), whatever order they lie in: here the address's row was written
/// first. A transaction holds the name-and-address row, as an attempt on the same name and
/// address does while it counts; the success must wait there holding none of the others, so
/// the attempt then takes the address's row (within a lock timeout shorter than PostgreSQL's
/// deadlock_timeout: with the rows taken in table order, the two would wait for each other).
#[sqlx::test(migrator = "common::db::MIGRATOR")]
async fn a_success_gives_back_in_the_order_attempts_count(pool: PgPool) {
    let app = TestApp::new(pool.clone());
    let (user, _) = app.user("holder").await;
    let address = "198.51.100.30";
    let rows = [
        ("login_address", address.to_string()),
        ("login_name", "holder".to_string()),
        ("login_name_address", format!("holder@{address}")),
    ];
    sqlx::query("DELETE FROM rate_limits")
        .execute(&pool)
        .await
        .unwrap();
    for (bucket, key) in &rows {
        sqlx::query("INSERT INTO rate_limits (bucket, key, window_start, attempts) VALUES ($1, $2, now(), 2)")
            .bind(bucket)
            .bind(key)
            .execute(&pool)
            .await
            .unwrap();
    }

    let mut attempt = pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM rate_limits WHERE bucket = 'login_name_address' FOR UPDATE")
        .execute(&mut *attempt)
        .await
        .unwrap();
    let success = {
        let pool = pool.clone();
        let user: uuid::Uuid = user.parse().unwrap();
        let (buckets, keys): (Vec<String>, Vec<String>) = rows
            .iter()
            .rev()
            .map(|(b, k)| (b.to_string(), k.clone()))
            .unzip();
        tokio::spawn(async move {
            // The plan that visits the rows in table order (a hash join over a sequential
            // scan, which the planner picks for this table once its estimates say small).
            let mut conn = pool.acquire().await.unwrap();
            for setting in [
                "SET enable_nestloop = off",
                "SET enable_indexscan = off",
                "SET enable_bitmapscan = off",
            ] {
                sqlx::query(setting).execute(&mut *conn).await.unwrap();
            }
            sqlx::query(functions::credentials::FORGIVE_SQL)
                .bind(buckets)
                .bind(keys)
                .bind("login_name_address")
                .bind(user)
                .bind(None::<String>)
                .execute(&mut *conn)
                .await
        })
    };
    assert!(
        until_waiting_on_locks(&pool, 1, std::time::Duration::from_secs(5)).await,
        "the success never waited on the name-and-address row"
    );
    sqlx::query("SET LOCAL lock_timeout = '500ms'")
        .execute(&mut *attempt)
        .await
        .unwrap();
    let next = sqlx::query("SELECT 1 FROM rate_limits WHERE bucket = 'login_address' FOR UPDATE")
        .execute(&mut *attempt)
        .await;
    assert!(
        next.is_ok(),
        "the success held the address's row while it waited: {next:?}"
    );
    attempt.rollback().await.unwrap();
    success.await.unwrap().unwrap();
    let counted: Vec<(String, i32)> =
        sqlx::query_as("SELECT bucket, attempts FROM rate_limits ORDER BY bucket")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(
        counted,
        [
            ("login_address".to_string(), 1),
            ("login_name".to_string(), 1),
            ("login_name_address".to_string(), 0),
        ]
    );
}

/// `PUT /update-key` of device 1 (whose key is the account's too) against the account's
/// deletion, step by step as for a signing-key reset: while a transaction holds the account's
/// row, as `DELETE /me` does before its cascade, the re-key waits there holding no device row,
/// so the cascade goes through.
#[sqlx::test(migrator = "common::db::MIGRATOR")]
async fn a_rekey_waits_for_a_deletion_at_the_account_row(pool: PgPool) {
    let app = TestApp::new(pool.clone());
    let (user, _) = app.user("holder").await;
    let user: uuid::Uuid = user.parse().unwrap();
    let deleting = DeletionMidway::hold_account(&pool, user).await;
    let rekeying = {
        let pool = pool.clone();
        tokio::spawn(async move {
            sqlx::query(functions::update_key::UPDATE_SQL)
                .bind(user)
                .bind(1i32)
                .bind(key("p256.pem"))
                .bind(None::<Vec<u8>>)
                .bind(None::<String>)
                .execute(&pool)
                .await
        })
    };
    let cascade = deleting.cascade(&pool).await;
    assert!(
        cascade.is_ok(),
        "the deletion's cascade waited for the re-key's device row: {cascade:?}"
    );
    rekeying.await.unwrap().unwrap();
}
