//! Devices: link codes, linking, the device lists and removal (API.md "Devices"), each status the
//! contract names, and the races the database settles: the device limit and ids under many links
//! at once, one code claimed twice, links racing removals, and the link failure lock-out.

use std::collections::BTreeSet;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use functions::create_link_code::ALPHABET;
use functions::signatures::x25519_pem;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use uuid::Uuid;

use crate::support::{PASSWORD, TestApp, TestResponse, key};

/// A distinct X25519 key per seed (never a small-order point: those are all but 0 and 1 at byte 0
/// with the rest zero, or have the top bytes set in patterns this never makes).
fn device_key(seed: u8) -> String {
    let mut raw = [0u8; 32];
    for (i, b) in raw.iter_mut().enumerate() {
        *b = seed.wrapping_mul(31).wrapping_add(i as u8).wrapping_add(7);
    }
    raw[31] &= 0x7f;
    assert!(!common::domain::is_small_order_x25519(&raw));
    x25519_pem(&raw)
}

/// Instances of the API, each with its own one-connection pool (one Lambda instance each). The
/// login limits are lifted: racing requests that all know the password would otherwise be held
/// back by the provisional count of the login limits, which is not what these tests look at.
fn instances(pool: &PgPool, count: usize, vars: &[(&str, &str)]) -> Vec<Arc<TestApp>> {
    let mut vars = vars.to_vec();
    vars.push(("LOGIN_MAX_FAILURES", "1000"));
    (0..count)
        .map(|_| Arc::new(TestApp::with_env(pool.clone(), &vars)))
        .collect()
}

async fn new_code(app: &TestApp, token: &str) -> TestResponse {
    app.request("POST", "/devices/link-codes")
        .bearer(token)
        .send()
        .await
}

async fn fresh_code(app: &TestApp, token: &str) -> String {
    let r = new_code(app, token).await;
    assert_eq!(r.status, 201, "{}", r.text);
    r.body["code"].as_str().unwrap().to_string()
}

async fn link_as(
    app: &TestApp,
    name: &str,
    password: &str,
    code: &str,
    label: &str,
) -> TestResponse {
    app.request("POST", "/devices")
        .json(json!({
            "name": name,
            "password": password,
            "link_code": code,
            "public_key": device_key(label.len() as u8),
            "label": label,
        }))
        .send()
        .await
}

async fn link(app: &TestApp, name: &str, code: &str, label: &str) -> TestResponse {
    link_as(app, name, PASSWORD, code, label).await
}

/// Links a device and returns its id.
async fn linked(app: &TestApp, name: &str, token: &str, label: &str) -> i64 {
    let code = fresh_code(app, token).await;
    let r = link(app, name, &code, label).await;
    assert_eq!(r.status, 201, "{}", r.text);
    r.body["device_id"].as_i64().unwrap()
}

async fn login_device(app: &TestApp, name: &str, device_id: i64) -> TestResponse {
    app.request("POST", "/login")
        .json(json!({"name": name, "password": PASSWORD, "device_id": device_id}))
        .send()
        .await
}

async fn device_token(app: &TestApp, name: &str, device_id: i64) -> String {
    let r = login_device(app, name, device_id).await;
    assert_eq!(r.status, 200, "{}", r.text);
    r.body["access_token"].as_str().unwrap().to_string()
}

async fn remove(app: &TestApp, token: &str, device_id: &str, password: &str) -> TestResponse {
    app.request("DELETE", &format!("/devices/{device_id}"))
        .bearer(token)
        .json(json!({ "password": password }))
        .send()
        .await
}

async fn my_devices(app: &TestApp, token: &str) -> TestResponse {
    app.request("GET", "/me/devices").bearer(token).send().await
}

fn ids(devices: &Value) -> Vec<i64> {
    devices
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["device_id"].as_i64().unwrap())
        .collect()
}

/// users.device_count and next_device_id, and the rows of devices, for one account.
async fn account_devices(pool: &PgPool, user: &str) -> (i32, i32, Vec<i32>) {
    let user = Uuid::parse_str(user).unwrap();
    let (count, next): (i32, i32) =
        sqlx::query_as("SELECT device_count, next_device_id FROM users WHERE id = $1")
            .bind(user)
            .fetch_one(pool)
            .await
            .unwrap();
    let rows: Vec<i32> =
        sqlx::query_scalar("SELECT device_id FROM devices WHERE user_id = $1 ORDER BY device_id")
            .bind(user)
            .fetch_all(pool)
            .await
            .unwrap();
    (count, next, rows)
}

async fn open_codes(pool: &PgPool, user: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM link_codes WHERE user_id = $1")
        .bind(Uuid::parse_str(user).unwrap())
        .fetch_one(pool)
        .await
        .unwrap()
}

fn retry_after(r: &TestResponse) -> u64 {
    r.headers["retry-after"].to_str().unwrap().parse().unwrap()
}

// ---------------------------------------------------------------- POST /devices/link-codes

#[sqlx::test(migrator = "common::db::MIGRATOR")]
async fn a_link_code_is_crockford_base32_kept_only_as_a_hash(pool: PgPool) {
    let app = TestApp::new(pool);
    let (alice, token) = app.user("alice").await;
    let before = Utc::now();
    let r = new_code(&app, &token).await;
    assert_eq!(r.status, 201, "{}", r.text);
    let code = r.body["code"].as_str().unwrap();
    assert_eq!(code.len(), 12);
    assert!(code.bytes().all(|c| ALPHABET.contains(&c)), "{code}");
    let expires_at: DateTime<Utc> = r.body["expires_at"].as_str().unwrap().parse().unwrap();
    let ttl = (expires_at - before).num_seconds();
    assert!(
        (598..=602).contains(&ttl),
        "LINK_CODE_TTL_SECONDS default 600: {ttl}"
    );

    // Only SHA-256 of the code is stored.
    let stored: Vec<u8> = sqlx::query_scalar("SELECT code_hash FROM link_codes WHERE user_id = $1")
        .bind(Uuid::parse_str(&alice).unwrap())
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(stored, Sha256::digest(code.as_bytes()).to_vec());

    // Codes differ.
    let other = new_code(&app, &token).await;
    assert_ne!(other.body["code"], r.body["code"]);

    // No token, or a tampered one: 401.
    app.request("POST", "/devices/link-codes")
        .send()
        .await
        .assert_error(401, "unauthorized");
    new_code(&app, &format!("{token}x"))
        .await
        .assert_error(401, "unauthorized");
}

#[sqlx::test(migrator = "common::db::MIGRATOR")]
async fn link_codes_are_limited_per_account(pool: PgPool) {
    let app = TestApp::with_env(pool, &[("LINK_CODES_MAX_PER_WINDOW", "2")]);
    let (alice, token) = app.user("alice").await;
    let (_, bob) = app.user("bob").await;
    for _ in 0..2 {
        assert_eq!(new_code(&app, &token).await.status, 201);
    }
    let r = new_code(&app, &token).await;
    r.assert_error(429, "rate_limited");
    assert!((1..=3600).contains(&retry_after(&r)), "{:?}", r.headers);
    assert_eq!(
        open_codes(&app.pool, &alice).await,
        2,
        "nothing stored on a 429"
    );
    // Per account: another account is not held back.
    assert_eq!(new_code(&app, &bob).await.status, 201);
    // The window passes: codes again.
    sqlx::query("UPDATE rate_limits SET window_start = now() - interval '2 hours' WHERE bucket = 'link_code_account'")
        .execute(&app.pool)
        .await
        .unwrap();
    assert_eq!(new_code(&app, &token).await.status, 201);
}

#[sqlx::test(migrator = "common::db::MIGRATOR")]
async fn a_full_account_gets_no_link_code(pool: PgPool) {
    let app = TestApp::with_env(pool, &[("MAX_DEVICES_PER_ACCOUNT", "2")]);
    let (alice, token) = app.user("alice").await;
    assert_eq!(linked(&app, "alice", &token, "phone").await, 2);
    new_code(&app, &token)
        .await
        .assert_error(409, "device_limit");
    assert_eq!(open_codes(&app.pool, &alice).await, 0);
    // A full account's refusals do not count against its code limit.
    let counted: Option<i32> = sqlx::query_scalar(
        "SELECT attempts FROM rate_limits WHERE bucket = 'link_code_account' AND key = $1",
    )
    .bind(&alice)
    .fetch_optional(&app.pool)
    .await
    .unwrap();
    assert_eq!(counted, Some(1));
}

// ---------------------------------------------------------------- POST /devices

#[sqlx::test(migrator = "common::db::MIGRATOR")]
async fn a_linked_device_logs_in_as_itself(pool: PgPool) {
    let app = TestApp::new(pool);
    let (alice, token) = app.user("alice").await;
    let (_, bob) = app.user("bob").await;
    let code = fresh_code(&app, &token).await;
    // Read back without regard to case or hyphens.
    let shown = format!("{}-{}-{}", &code[..4], &code[4..8], &code[8..]).to_lowercase();
    let key = device_key(42);
    let r = app
        .request("POST", "/devices")
        .json(
            json!({"name": "ALICE", "password": PASSWORD, "link_code": shown,
                     "public_key": key, "label": "Alice's phone 📱"}),
        )
        .send()
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    assert_eq!(r.body["device_id"], 2);
    assert_eq!(r.body["label"], "Alice's phone 📱");
    assert_eq!(r.body["public_key"], key);
    let created_at: DateTime<Utc> = r.body["created_at"].as_str().unwrap().parse().unwrap();
    assert!((Utc::now() - created_at).num_seconds().abs() < 60);
    assert_eq!(account_devices(&app.pool, &alice).await, (2, 3, vec![1, 2]));

    // Used up: a second use is 403.
    link(&app, "alice", &code, "again")
        .await
        .assert_error(403, "link_code_invalid");

    // The new device logs in as device 2; GET /me/devices marks it current.
    let phone = device_token(&app, "alice", 2).await;
    let r = my_devices(&app, &phone).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let devices = r.body["devices"].as_array().unwrap();
    assert_eq!(ids(&r.body["devices"]), [1, 2]);
    assert_eq!(devices[0]["current"], false);
    assert_eq!(devices[1]["current"], true);
    assert_eq!(devices[0]["label"], "device 1");
    assert_eq!(devices[0]["public_key"], key_of_device_one());
    assert_eq!(devices[1]["label"], "Alice's phone 📱");
    assert_eq!(devices[1]["public_key"], key);
    assert_eq!(devices[1]["key_fingerprint"], fingerprint(&key));
    assert_eq!(devices[1]["created_at"], devices[1]["key_updated_at"]);
    // From device 1, device 1 is current.
    let r = my_devices(&app, &token).await;
    assert_eq!(r.body["devices"][0]["current"], true);
    assert_eq!(r.body["devices"][1]["current"], false);

    // Another user sees both devices, without labels.
    let r = app
        .request("GET", &format!("/users/{alice}/devices"))
        .bearer(&bob)
        .send()
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["user_id"], alice);
    assert_eq!(ids(&r.body["devices"]), [1, 2]);
    let listed = &r.body["devices"][1];
    assert_eq!(listed["public_key"], key);
    assert_eq!(listed["key_fingerprint"], fingerprint(&key));
    assert!(listed["key_updated_at"].is_string());
    assert!(listed.get("label").is_none() && listed.get("current").is_none());

    // Mail for device 1 is not device 2's.
    let sent = app
        .request("POST", "/messages")
        .bearer(&bob)
        .json(json!({"recipient_id": alice, "encrypted_data": "aGVsbG8="}))
        .send()
        .await;
    assert_eq!(sent.status, 201, "{}", sent.text);
    let r = app.request("GET", "/messages").bearer(&phone).send().await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["messages"], json!([]));
}

fn key_of_device_one() -> String {
    key("ed25519.pem")
}

/// ENVELOPE.md's fingerprint: SHA-256 of the SPKI DER, lowercase hex.
fn fingerprint(pem: &str) -> String {
    use base64::Engine;
    let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    let der = base64::engine::general_purpose::STANDARD
        .decode(body)
        .unwrap();
    Sha256::digest(der)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[sqlx::test(migrator = "common::db::MIGRATOR")]
async fn the_password_is_checked_first_and_counts_as_a_login(pool: PgPool) {
    let app = TestApp::with_env(pool, &[("LOGIN_MAX_FAILURES", "2")]);
    let (alice, token) = app.user("alice").await;
    let code = fresh_code(&app, &token).await;
    // Wrong password with a good code, or an unknown name: the same 401, and the code is kept.
    link_as(&app, "alice", "wrong password", &code, "x")
        .await
        .assert_error(401, "invalid_credentials");
    link_as(&app, "nobody", PASSWORD, &code, "x")
        .await
        .assert_error(401, "invalid_credentials");
    // Wrong password with a wrong code: 401 still, and no link failure counted.
    link_as(&app, "alice", "wrong password", "0000-0000-0000", "x")
        .await
        .assert_error(401, "invalid_credentials");
    assert_eq!(open_codes(&app.pool, &alice).await, 1);
    let failures: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM rate_limits WHERE bucket = 'link_failure_account'",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(failures, 0);
    // Two failed logins for alice from this address: the login limit holds, even for the
    // right password.
    let r = link(&app, "alice", &code, "x").await;
    r.assert_error(429, "rate_limited");
    assert!(retry_after(&r) >= 1);
    app.request("POST", "/login")
        .json(json!({"name": "alice", "password": PASSWORD}))
        .send()
        .await
        .assert_error(429, "rate_limited");
}

#[sqlx::test(migrator = "common::db::MIGRATOR")]
async fn wrong_used_expired_and_foreign_codes_are_403(pool: PgPool) {
    let app = TestApp::new(pool);
    let (alice, token) = app.user("alice").await;
    let (_, bob) = app.user("bob").await;
    let bobs = fresh_code(&app, &bob).await;
    // Another account's code.
    link(&app, "alice", &bobs, "x")
        .await
        .assert_error(403, "link_code_invalid");
    // Unknown, and not even a code (wrong length, letters outside the alphabet).
    for wrong in ["0000-0000-0000", "ABC", "UUUUUUUUUUUU", "", "ABCDEFGHJKMNP"] {
        link(&app, "alice", wrong, "x")
            .await
            .assert_error(403, "link_code_invalid");
    }
    // Expired.
    let expiring = fresh_code(&app, &token).await;
    sqlx::query(
        "UPDATE link_codes SET expires_at = now() - interval '1 second' WHERE user_id = $1",
    )
    .bind(Uuid::parse_str(&alice).unwrap())
    .execute(&app.pool)
    .await
    .unwrap();
    link(&app, "alice", &expiring, "x")
        .await
        .assert_error(403, "link_code_invalid");
    // Bob's code still works for bob: a failure of alice's never touches it.
    assert_eq!(link(&app, "bob", &bobs, "x").await.status, 201);
    assert_eq!(account_devices(&app.pool, &alice).await, (1, 2, vec![1]));
    // Each was counted against alice's link failures.
    let attempts: i32 = sqlx::query_scalar(
        "SELECT attempts FROM rate_limits WHERE bucket = 'link_failure_account' AND key = $1",
    )
    .bind(&alice)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(attempts, 7);
}

#[sqlx::test(migrator = "common::db::MIGRATOR")]
async fn link_bodies_follow_the_field_rules(pool: PgPool) {
    let app = TestApp::new(pool);
    let (alice, token) = app.user("alice").await;
    let code = fresh_code(&app, &token).await;
    let good = json!({"name": "alice", "password": PASSWORD, "link_code": code,
                      "public_key": device_key(1), "label": "phone"});
    let with = |field: &str, value: Value| {
        let mut body = good.clone();
        body[field] = value;
        body
    };
    let without = |field: &str| {
        let mut body = good.clone();
        body.as_object_mut().unwrap().remove(field);
        body
    };
    let cases = [
        (with("label", json!("")), 422, "label"),
        (with("label", json!("x".repeat(65))), 422, "label"),
        (with("label", json!("tab\there")), 422, "label"),
        (with("label", json!("bell\u{7}")), 422, "label"),
        (with("label", json!(7)), 400, "label"),
        (without("label"), 422, "label"),
        (
            with("public_key", json!(key("rsa1024.pem"))),
            422,
            "public_key",
        ),
        (
            with("public_key", json!(key("secp256k1.pem"))),
            422,
            "public_key",
        ),
        (
            with("public_key", json!(x25519_pem(&[0; 32]))),
            422,
            "public_key",
        ),
        (with("public_key", json!("not a key")), 422, "public_key"),
        (without("public_key"), 422, "public_key"),
        (with("link_code", json!(123456789012_i64)), 400, "link_code"),
        (without("link_code"), 422, "link_code"),
        (with("name", json!("a")), 422, "name"),
        (with("password", json!("short")), 422, "password"),
        (without("password"), 422, "password"),
    ];
    for (body, status, field) in cases {
        let r = app
            .request("POST", "/devices")
            .json(body.clone())
            .send()
            .await;
        let code = if status == 400 {
            "bad_request"
        } else {
            "validation_failed"
        };
        r.assert_error(status, code);
        assert_eq!(r.body["field"], field, "{body}");
    }
    for raw in ["", "[]", "{", "\"x\""] {
        app.request("POST", "/devices")
            .raw_body(raw)
            .send()
            .await
            .assert_error(400, "bad_request");
    }
    // None of that touched the code or counted a failure.
    assert_eq!(open_codes(&app.pool, &alice).await, 1);
    // 64 characters of any script, and every kind of key the rules accept.
    let r = app
        .request("POST", "/devices")
        .json(with("label", json!("é".repeat(64))))
        .send()
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    for pem in ["rsa2048.pem", "p256.pem", "ed25519.pem"] {
        let code = fresh_code(&app, &token).await;
        let body = json!({"name": "alice", "password": PASSWORD, "link_code": code,
                          "public_key": key(pem), "label": pem});
        let r = app.request("POST", "/devices").json(body).send().await;
        assert_eq!(r.status, 201, "{pem}: {}", r.text);
    }
}

#[sqlx::test(migrator = "common::db::MIGRATOR")]
async fn a_full_account_keeps_its_code(pool: PgPool) {
    let app = TestApp::with_env(pool, &[("MAX_DEVICES_PER_ACCOUNT", "2")]);
    let (alice, token) = app.user("alice").await;
    let first = fresh_code(&app, &token).await;
    let second = fresh_code(&app, &token).await;
    assert_eq!(link(&app, "alice", &first, "a").await.status, 201);
    // Full: 409, and the code is not used up.
    link(&app, "alice", &second, "b")
        .await
        .assert_error(409, "device_limit");
    link(&app, "alice", &second, "b")
        .await
        .assert_error(409, "device_limit");
    assert_eq!(open_codes(&app.pool, &alice).await, 1);
    // A wrong code on a full account is still a wrong code.
    link(&app, "alice", "0000-0000-0000", "b")
        .await
        .assert_error(403, "link_code_invalid");
    // Room again: the same code links, with a new id.
    assert_eq!(remove(&app, &token, "2", PASSWORD).await.status, 204);
    let r = link(&app, "alice", &second, "b").await;
    assert_eq!(r.status, 201, "{}", r.text);
    assert_eq!(r.body["device_id"], 3);
    assert_eq!(account_devices(&app.pool, &alice).await, (2, 4, vec![1, 3]));
}

#[sqlx::test(migrator = "common::db::MIGRATOR")]
async fn the_last_allowed_failure_voids_the_codes_then_429(pool: PgPool) {
    let app = TestApp::with_env(pool, &[("LINK_MAX_FAILURES", "3")]);
    let (alice, token) = app.user("alice").await;
    let good = fresh_code(&app, &token).await;
    let spare = fresh_code(&app, &token).await;
    for _ in 0..2 {
        link(&app, "alice", "0000-0000-0000", "x")
            .await
            .assert_error(403, "link_code_invalid");
    }
    assert_eq!(open_codes(&app.pool, &alice).await, 2, "not yet void");
    // The third: still 403, and every open code of the account is void.
    link(&app, "alice", "0000-0000-0000", "x")
        .await
        .assert_error(403, "link_code_invalid");
    assert_eq!(open_codes(&app.pool, &alice).await, 0);
    // Then 429, whatever the code (a fresh one too), until the window passes.
    let fresh = fresh_code(&app, &token).await;
    for attempt in [&good, &spare, &fresh] {
        let r = link(&app, "alice", attempt, "x").await;
        r.assert_error(429, "rate_limited");
        let wait = retry_after(&r);
        assert!(
            (3590..=3600).contains(&wait),
            "LINK_WINDOW_SECONDS default 3600: {wait}"
        );
    }
    assert_eq!(
        open_codes(&app.pool, &alice).await,
        1,
        "a 429 takes no code"
    );
    // The window passes: the fresh code links.
    sqlx::query("UPDATE rate_limits SET window_start = now() - interval '2 hours' WHERE bucket = 'link_failure_account'")
        .execute(&app.pool)
        .await
        .unwrap();
    let r = link(&app, "alice", &fresh, "x").await;
    assert_eq!(r.status, 201, "{}", r.text);
}

// ---------------------------------------------------------------- GET /me/devices, /users/{id}/devices

#[sqlx::test(migrator = "common::db::MIGRATOR")]
async fn device_lists(pool: PgPool) {
    let app = TestApp::new(pool);
    let (alice, token) = app.user("alice").await;
    let (_, bob) = app.user("bob").await;
    let r = my_devices(&app, &token).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(
        r.body["devices"][0],
        json!({
            "device_id": 1,
            "label": "device 1",
            "public_key": key_of_device_one(),
            "key_fingerprint": fingerprint(&key_of_device_one()),
            "created_at": r.body["devices"][0]["created_at"],
            "key_updated_at": r.body["devices"][0]["key_updated_at"],
            "current": true,
        })
    );
    for label in ["b", "c", "d"] {
        linked(&app, "alice", &token, label).await;
    }
    assert_eq!(remove(&app, &token, "3", PASSWORD).await.status, 204);
    let r = my_devices(&app, &token).await;
    assert_eq!(ids(&r.body["devices"]), [1, 2, 4]);
    let r = app
        .request("GET", &format!("/users/{alice}/devices"))
        .bearer(&bob)
        .send()
        .await;
    assert_eq!(ids(&r.body["devices"]), [1, 2, 4]);
    // One's own list through the directory too.
    let r = app
        .request("GET", &format!("/users/{alice}/devices"))
        .bearer(&token)
        .send()
        .await;
    assert_eq!(r.status, 200);

    // Unknown user: 404; a malformed id: 400; no token: 401.
    app.request("GET", &format!("/users/{}/devices", Uuid::now_v7()))
        .bearer(&bob)
        .send()
        .await
        .assert_error(404, "not_found");
    for bad in [
        "abc",
        "0190e5a2-0000-7000-8000",
        "0190E5A200007000800000000000000X",
    ] {
        app.request("GET", &format!("/users/{bad}/devices"))
            .bearer(&bob)
            .send()
            .await
            .assert_error(400, "bad_request");
    }
    app.request("GET", &format!("/users/{alice}/devices"))
        .send()
        .await
        .assert_error(401, "unauthorized");
    app.request("GET", "/me/devices")
        .send()
        .await
        .assert_error(401, "unauthorized");

    // A deleted account's token: 401 on both, and its devices are gone from the directory.
    let bob_id: String = sqlx::query_scalar("SELECT id::text FROM users WHERE name = 'bob'")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    let r = app
        .request("DELETE", "/me")
        .bearer(&bob)
        .json(json!({"password": PASSWORD}))
        .send()
        .await;
    assert_eq!(r.status, 204);
    my_devices(&app, &bob)
        .await
        .assert_error(401, "unauthorized");
    app.request("GET", &format!("/users/{alice}/devices"))
        .bearer(&bob)
        .send()
        .await
        .assert_error(401, "unauthorized");
    app.request("GET", &format!("/users/{bob_id}/devices"))
        .bearer(&token)
        .send()
        .await
        .assert_error(404, "not_found");
}

// ---------------------------------------------------------------- DELETE /devices/{id}

#[sqlx::test(migrator = "common::db::MIGRATOR")]
async fn a_removed_device_is_gone_everywhere(pool: PgPool) {
    let app = TestApp::new(pool);
    let (alice, token) = app.user("alice").await;
    let (bob_id, bob) = app.user("bob").await;
    assert_eq!(linked(&app, "alice", &token, "phone").await, 2);
    assert_eq!(linked(&app, "alice", &token, "tablet").await, 3);
    let phone = device_token(&app, "alice", 2).await;
    let alice_id = Uuid::parse_str(&alice).unwrap();

    // Undelivered mail for the phone and for device 1, a prekey of the phone's.
    for device in [1, 2, 2] {
        sqlx::query(
            "INSERT INTO messages (id, sender_id, recipient_id, recipient_device_id, encrypted_data, size, expires_at) \
             VALUES ($1, $2, $3, $4, '\\x01', 1, now() + interval '1 day')",
        )
        .bind(Uuid::now_v7())
        .bind(Uuid::parse_str(&bob_id).unwrap())
        .bind(alice_id)
        .bind(device)
        .execute(&app.pool)
        .await
        .unwrap();
    }
    sqlx::query(
        "INSERT INTO prekeys (user_id, device_id, last_resort, key_id, public_key, signature) \
         VALUES ($1, 2, false, 1, decode(repeat('11', 32), 'hex'), decode(repeat('22', 64), 'hex'))",
    )
    .bind(alice_id)
    .execute(&app.pool)
    .await
    .unwrap();
    let r = app.request("GET", "/messages").bearer(&phone).send().await;
    assert_eq!(r.body["messages"].as_array().unwrap().len(), 2);

    // Device 3 removes the phone.
    let tablet = device_token(&app, "alice", 3).await;
    let r = remove(&app, &tablet, "2", PASSWORD).await;
    assert_eq!(r.status, 204, "{}", r.text);
    assert!(r.text.is_empty());
    assert_eq!(account_devices(&app.pool, &alice).await, (2, 4, vec![1, 3]));
    let pending: Vec<i32> = sqlx::query_scalar(
        "SELECT recipient_device_id FROM messages WHERE recipient_id = $1 AND NOT is_delivered",
    )
    .bind(alice_id)
    .fetch_all(&app.pool)
    .await
    .unwrap();
    assert_eq!(pending, [1], "the phone's mail is erased, device 1's kept");
    let prekeys: i64 = sqlx::query_scalar("SELECT count(*) FROM prekeys WHERE user_id = $1")
        .bind(alice_id)
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(prekeys, 0);

    // Its token is 401 everywhere.
    app.request("GET", "/me")
        .bearer(&phone)
        .send()
        .await
        .assert_error(401, "unauthorized");
    app.request("GET", "/messages")
        .bearer(&phone)
        .send()
        .await
        .assert_error(401, "unauthorized");
    app.request("POST", "/messages")
        .bearer(&phone)
        .json(json!({"recipient_id": bob_id, "encrypted_data": "aGVsbG8="}))
        .send()
        .await
        .assert_error(401, "unauthorized");
    my_devices(&app, &phone)
        .await
        .assert_error(401, "unauthorized");
    new_code(&app, &phone)
        .await
        .assert_error(401, "unauthorized");
    app.request("GET", &format!("/users/{bob_id}/devices"))
        .bearer(&phone)
        .send()
        .await
        .assert_error(401, "unauthorized");
    remove(&app, &phone, "3", PASSWORD)
        .await
        .assert_error(401, "unauthorized");
    // Nor can it log in again.
    login_device(&app, "alice", 2)
        .await
        .assert_error(401, "invalid_credentials");
    // Others are untouched.
    assert_eq!(my_devices(&app, &tablet).await.status, 200);
    assert_eq!(my_devices(&app, &bob).await.status, 200);

    // Already removed, or never there: 404.
    remove(&app, &token, "2", PASSWORD)
        .await
        .assert_error(404, "not_found");
    remove(&app, &token, "4", PASSWORD)
        .await
        .assert_error(404, "not_found");
    remove(&app, &token, "2147483647", PASSWORD)
        .await
        .assert_error(404, "not_found");
    // Another account's device is never found.
    linked(&app, "bob", &bob, "bob's phone").await;
    remove(&app, &token, "2", PASSWORD)
        .await
        .assert_error(404, "not_found");

    // A device may remove itself.
    let r = remove(&app, &tablet, "3", PASSWORD).await;
    assert_eq!(r.status, 204, "{}", r.text);
    my_devices(&app, &tablet)
        .await
        .assert_error(401, "unauthorized");
    assert_eq!(account_devices(&app.pool, &alice).await, (1, 4, vec![1]));
    // An id is never handed out twice.
    assert_eq!(linked(&app, "alice", &token, "new phone").await, 4);
}

#[sqlx::test(migrator = "common::db::MIGRATOR")]
async fn removal_refusals(pool: PgPool) {
    let app = TestApp::with_env(pool, &[("LOGIN_MAX_FAILURES", "2")]);
    let (alice, token) = app.user("alice").await;
    linked(&app, "alice", &token, "phone").await;
    let phone = device_token(&app, "alice", 2).await;

    // Device 1: 403, from any device; DELETE /me removes the account.
    remove(&app, &token, "1", PASSWORD)
        .await
        .assert_error(403, "forbidden");
    remove(&app, &phone, "1", "wrong password")
        .await
        .assert_error(403, "forbidden");
    // Malformed ids: 400.
    for bad in [
        "0",
        "-1",
        "abc",
        "1.5",
        "2147483648",
        "99999999999999999999",
        "%2B2",
    ] {
        remove(&app, &token, bad, PASSWORD)
            .await
            .assert_error(400, "bad_request");
    }
    // No token: 401; no password: 422; not JSON: 400.
    app.request("DELETE", "/devices/2")
        .json(json!({"password": PASSWORD}))
        .send()
        .await
        .assert_error(401, "unauthorized");
    app.request("DELETE", "/devices/2")
        .bearer(&token)
        .json(json!({}))
        .send()
        .await
        .assert_error(422, "validation_failed");
    app.request("DELETE", "/devices/2")
        .bearer(&token)
        .raw_body("nope")
        .send()
        .await
        .assert_error(400, "bad_request");
    // A wrong password: 401 invalid_credentials, counted as a failed login.
    for _ in 0..2 {
        remove(&app, &token, "2", "wrong password")
            .await
            .assert_error(401, "invalid_credentials");
    }
    assert_eq!(account_devices(&app.pool, &alice).await, (2, 3, vec![1, 2]));
    remove(&app, &token, "2", PASSWORD)
        .await
        .assert_error(429, "rate_limited");
    app.request("POST", "/login")
        .json(json!({"name": "alice", "password": PASSWORD}))
        .send()
        .await
        .assert_error(429, "rate_limited");
    assert_eq!(account_devices(&app.pool, &alice).await, (2, 3, vec![1, 2]));
}

// ---------------------------------------------------------------- races

/// (a) Many links at once on an account with room for two: exactly two succeed, the rest are
/// 409 with their codes kept, the ids are distinct, and an id freed by a removal is never reused.
#[sqlx::test(migrator = "common::db::MIGRATOR")]
async fn racing_links_stop_at_the_limit_and_never_reuse_ids(pool: PgPool) {
    const RACERS: usize = 8;
    let vars = [
        ("MAX_DEVICES_PER_ACCOUNT", "3"),
        ("LINK_CODES_MAX_PER_WINDOW", "100"),
    ];
    let apps = instances(&pool, RACERS, &vars);
    let (alice, token) = apps[0].user("alice").await;
    for round in 0..3 {
        let mut codes = Vec::new();
        for _ in 0..RACERS {
            codes.push(fresh_code(&apps[0], &token).await);
        }
        let tasks: Vec<_> = apps
            .iter()
            .zip(codes)
            .enumerate()
            .map(|(i, (app, code))| {
                let app = app.clone();
                tokio::spawn(async move { link(&app, "alice", &code, &format!("racer {i}")).await })
            })
            .collect();
        let mut linked_ids = BTreeSet::new();
        let mut full = 0;
        for task in tasks {
            let r = task.await.unwrap();
            match r.status {
                201 => assert!(linked_ids.insert(r.body["device_id"].as_i64().unwrap())),
                _ => {
                    r.assert_error(409, "device_limit");
                    full += 1;
                }
            }
        }
        assert_eq!(
            linked_ids.len(),
            2,
            "round {round}: exactly the room there was"
        );
        let (count, next, rows) = account_devices(&pool, &alice).await;
        assert_eq!(count, 3, "round {round}: the limit holds");
        assert_eq!(rows.len(), 3);
        assert_eq!(full, RACERS - linked_ids.len());
        // The codes of the 409s are kept (a code is used up only by a 201).
        assert_eq!(open_codes(&pool, &alice).await, full as i64);
        sqlx::query("DELETE FROM link_codes")
            .execute(&pool)
            .await
            .unwrap();
        // Each round's ids are new: above every id handed out before.
        let expected: BTreeSet<i64> =
            (next as i64 - linked_ids.len() as i64..next as i64).collect();
        assert_eq!(linked_ids, expected, "round {round}");
        // Free the room again: remove every device but 1.
        for id in rows.into_iter().filter(|&id| id != 1) {
            assert_eq!(
                remove(&apps[0], &token, &id.to_string(), PASSWORD)
                    .await
                    .status,
                204
            );
        }
    }
    // After removals, a new link never gets a removed id.
    let (_, next, _) = account_devices(&pool, &alice).await;
    assert_eq!(next, 8, "three rounds of two links");
    assert_eq!(linked(&apps[0], "alice", &token, "last").await, 8);
}

/// (b) One code claimed by two instances at once: exactly one 201, the other 403.
#[sqlx::test(migrator = "common::db::MIGRATOR")]
async fn one_code_links_one_device(pool: PgPool) {
    let apps = instances(
        &pool,
        2,
        &[
            ("MAX_DEVICES_PER_ACCOUNT", "100"),
            ("LINK_CODES_MAX_PER_WINDOW", "100"),
            ("LINK_MAX_FAILURES", "100"),
        ],
    );
    let (alice, token) = apps[0].user("alice").await;
    for round in 0..10 {
        let code = fresh_code(&apps[0], &token).await;
        let tasks: Vec<_> = apps
            .iter()
            .map(|app| {
                let (app, code) = (app.clone(), code.clone());
                tokio::spawn(async move { link(&app, "alice", &code, "twin").await })
            })
            .collect();
        let mut statuses = Vec::new();
        for task in tasks {
            let r = task.await.unwrap();
            if r.status != 201 {
                r.assert_error(403, "link_code_invalid");
            }
            statuses.push(r.status);
        }
        statuses.sort();
        assert_eq!(statuses, [201, 403], "round {round}");
    }
    let (count, next, rows) = account_devices(&pool, &alice).await;
    assert_eq!((count, next, rows.len()), (11, 12, 11));
}

/// (c) Links racing removals: the account's count always matches its device rows.
#[sqlx::test(migrator = "common::db::MIGRATOR")]
async fn links_racing_removals_keep_the_count(pool: PgPool) {
    let apps = instances(
        &pool,
        4,
        &[
            ("MAX_DEVICES_PER_ACCOUNT", "3"),
            ("LINK_CODES_MAX_PER_WINDOW", "100"),
        ],
    );
    let (alice, token) = apps[0].user("alice").await;
    assert_eq!(linked(&apps[0], "alice", &token, "first").await, 2);
    // Codes for every round, made while the account has room (a full one gets none).
    let mut codes = Vec::new();
    for _ in 0..20 {
        codes.push(fresh_code(&apps[0], &token).await);
    }
    for (round, pair) in codes.chunks(2).enumerate() {
        let (_, _, rows) = account_devices(&pool, &alice).await;
        let victims: Vec<i32> = rows.into_iter().filter(|&id| id != 1).collect();
        let mut tasks = Vec::new();
        for (i, code) in pair.iter().cloned().enumerate() {
            let app = apps[i].clone();
            tasks.push(tokio::spawn(async move {
                link(&app, "alice", &code, "racer").await
            }));
        }
        for (i, victim) in victims.into_iter().enumerate() {
            let (app, token) = (apps[2 + i % 2].clone(), token.clone());
            tasks.push(tokio::spawn(async move {
                remove(&app, &token, &victim.to_string(), PASSWORD).await
            }));
        }
        for task in tasks {
            let r = task.await.unwrap();
            assert!(
                [201, 204].contains(&r.status) || r.error_code() == "device_limit",
                "round {round}: {} {}",
                r.status,
                r.text
            );
        }
        let consistent: (i32, i64) = sqlx::query_as(
            "SELECT u.device_count, (SELECT count(*) FROM devices d WHERE d.user_id = u.id) \
             FROM users u WHERE u.id = $1",
        )
        .bind(Uuid::parse_str(&alice).unwrap())
        .fetch_one(&pool)
        .await
        .unwrap();
        assert_eq!(consistent.0 as i64, consistent.1, "round {round}");
        assert!(
            (1..=3).contains(&consistent.0),
            "round {round}: {consistent:?}"
        );
    }
    // And the ids were never reused.
    let (_, next, rows) = account_devices(&pool, &alice).await;
    assert!(rows.iter().all(|&id| id < next));
    assert!(rows.windows(2).all(|w| w[0] < w[1]));
}

/// (d) Wrong codes at once: exactly LINK_MAX_FAILURES of them are looked at (403, the last one
/// voiding the open codes), the rest are 429.
#[sqlx::test(migrator = "common::db::MIGRATOR")]
async fn racing_wrong_codes_stop_at_the_failure_limit(pool: PgPool) {
    const RACERS: usize = 10;
    let apps = instances(&pool, RACERS, &[("LINK_MAX_FAILURES", "3")]);
    let (alice, token) = apps[0].user("alice").await;
    let good = fresh_code(&apps[0], &token).await;
    let tasks: Vec<_> = apps
        .iter()
        .enumerate()
        .map(|(i, app)| {
            let app = app.clone();
            let wrong = format!("{:012}", i);
            tokio::spawn(async move { link(&app, "alice", &wrong, "guess").await })
        })
        .collect();
    let mut invalid = 0;
    for task in tasks {
        let r = task.await.unwrap();
        if r.status == 403 {
            r.assert_error(403, "link_code_invalid");
            invalid += 1;
        } else {
            r.assert_error(429, "rate_limited");
            assert!(retry_after(&r) >= 1);
        }
    }
    assert_eq!(
        invalid, 3,
        "exactly LINK_MAX_FAILURES wrong codes are looked at"
    );
    assert_eq!(
        open_codes(&pool, &alice).await,
        0,
        "the open codes are void"
    );
    let attempts: i32 = sqlx::query_scalar(
        "SELECT attempts FROM rate_limits WHERE bucket = 'link_failure_account' AND key = $1",
    )
    .bind(&alice)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(attempts, 3);
    link(&apps[0], "alice", &good, "late")
        .await
        .assert_error(429, "rate_limited");
}
