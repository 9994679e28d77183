//! A token whose device was removed, or whose account was deleted, is 401 on every endpoint
//! that takes one, whatever else is wrong with the request, and nothing is counted for it.

use serde_json::json;
use sqlx::PgPool;

use crate::fan_out::add_device;
use crate::support::{CLIENT_IP, PASSWORD, TestApp};

/// Routes that take no token (API.md marks the others `(auth)`).
const OPEN: &[&str] = &["register", "login", "health", "metrics", "link-device"];

/// Every authenticated route, with its path parameters filled with malformed values, a
/// malformed body, a malformed query and a malformed Idempotency-Key.
async fn every_route_is_401(app: &TestApp, token: &str, what: &str) {
    let mut checked = 0;
    for &(method, template, function) in functions::routes::ROUTES {
        if OPEN.contains(&function) {
            continue;
        }
        let path = template
            .replace("{user_id}", "not-a-uuid")
            .replace("{device_id}", "zero")
            .replace("{id}", "nope");
        let r = app
            .request(method, &format!("{path}?limit=0&after=bad&name=x"))
            .bearer(token)
            .header("idempotency-key", "not valid")
            .raw_body(r#"{"broken":"#)
            .send()
            .await;
        r.assert_error(401, "unauthorized");
        assert_eq!(r.headers["www-authenticate"], "Bearer", "{method} {path}");
        checked += 1;
    }
    assert!(checked >= 19, "{what}: {checked} routes");
}

/// A device of `owner` linked and then removed by `owner_token` with the password (from
/// `address`): the token the device had.
async fn removed_device(
    app: &TestApp,
    owner: &str,
    owner_token: &str,
    seed: u8,
    address: &str,
) -> String {
    let (device, device_token) = add_device(app, owner, seed).await;
    let r = app
        .request("DELETE", &format!("/devices/{device}"))
        .bearer(owner_token)
        .with_source_ip(address)
        .json(json!({"password": PASSWORD}))
        .send()
        .await;
    assert_eq!(r.status, 204, "{}", r.text);
    device_token
}

#[sqlx::test(migrator = "common::db::MIGRATOR")]
async fn a_gone_callers_token_is_401_whatever_the_request(pool: PgPool) {
    let app = TestApp::new(pool.clone());
    let (alice, alice_token) = app.user("alice").await;
    let device_token = removed_device(&app, &alice, &alice_token, 7, CLIENT_IP).await;
    every_route_is_401(&app, &device_token, "removed device").await;

    let r = app
        .request("DELETE", "/me")
        .bearer(&alice_token)
        .json(json!({"password": PASSWORD}))
        .send()
        .await;
    assert_eq!(r.status, 204, "{}", r.text);
    every_route_is_401(&app, &alice_token, "deleted account").await;

    // Well-formed requests of a deleted account count nothing against any limit.
    let (bob, _) = app.user("bob").await;
    for _ in 0..3 {
        app.request("POST", "/messages")
            .bearer(&alice_token)
            .json(json!({"recipient_id": bob, "encrypted_data": "eA=="}))
            .send()
            .await
            .assert_error(401, "unauthorized");
        app.request("POST", "/keys/claim")
            .bearer(&alice_token)
            .json(json!({"user_id": bob}))
            .send()
            .await
            .assert_error(401, "unauthorized");
        app.request("POST", "/devices/link-codes")
            .bearer(&alice_token)
            .send()
            .await
            .assert_error(401, "unauthorized");
    }
    let counted: i64 =
        sqlx::query_scalar("SELECT count(*) FROM rate_limits WHERE key LIKE $1 || '%'")
            .bind(&alice)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(counted, 0, "a deleted account's requests were counted");
}

/// A removed device's token is 401 even where its account is over every limit: each counting
/// statement checks the token's device before it counts (the runtime relies on it: it checks the
/// device itself only for a refusal given before any statement ran).
#[sqlx::test(migrator = "common::db::MIGRATOR")]
async fn a_removed_devices_token_is_401_where_its_account_is_over_a_limit(pool: PgPool) {
    let app = TestApp::with_env(
        pool.clone(),
        &[
            ("SEND_MAX_PER_WINDOW", "1"),
            ("LINK_CODES_MAX_PER_WINDOW", "1"),
            ("PREKEY_CLAIMS_PER_WINDOW", "1"),
            ("LOGIN_MAX_FAILURES", "1"),
        ],
    );
    let (alice, alice_token) = app.user("alice").await;
    let (bob, _) = app.user("bob").await;
    let send = |token: &str| {
        app.request("POST", "/messages")
            .bearer(token)
            .json(json!({"recipient_id": bob, "encrypted_data": "eA=="}))
    };
    let link_code = |token: &str| app.request("POST", "/devices/link-codes").bearer(token);
    let claim = |token: &str| {
        app.request("POST", "/keys/claim")
            .bearer(token)
            .json(json!({"user_id": bob}))
    };
    let delete_me = |token: &str, password: &str| {
        app.request("DELETE", "/me")
            .bearer(token)
            .with_source_ip("198.51.100.20")
            .json(json!({"password": password}))
    };
    // Device 1 uses up the account's limits: each second request is 429.
    for (what, first, second) in [
        ("send", send(&alice_token), send(&alice_token)),
        (
            "link code",
            link_code(&alice_token),
            link_code(&alice_token),
        ),
        ("claim", claim(&alice_token), claim(&alice_token)),
        (
            "password",
            delete_me(&alice_token, "wrong-password"),
            delete_me(&alice_token, "wrong-password"),
        ),
    ] {
        let r = first.send().await;
        assert!(
            [200, 201, 401].contains(&r.status),
            "{what}, first: {}",
            r.text
        );
        second.send().await.assert_error(429, "rate_limited");
    }
    let device_token = removed_device(&app, &alice, &alice_token, 9, "192.0.2.50").await;

    for (what, request) in [
        ("send", send(&device_token)),
        ("link code", link_code(&device_token)),
        ("claim", claim(&device_token)),
        ("password", delete_me(&device_token, PASSWORD)),
    ] {
        let r = request.send().await;
        assert_eq!(r.status, 401, "{what}: {}", r.text);
        r.assert_error(401, "unauthorized");
    }
}

/// Well-formed requests to every authenticated route, each one a live token gets a refusal or a
/// success for: a removed device's token gets 401 `unauthorized` on every one. Every statement
/// of an authenticated request checks the token's device, so a refusal found by a statement is
/// never a gone device's (the runtime checks the device only when no statement ran).
#[sqlx::test(migrator = "common::db::MIGRATOR")]
async fn well_formed_requests_of_a_removed_device_are_401(pool: PgPool) {
    use base64::Engine as _;
    let app = TestApp::new(pool.clone());
    let (alice, alice_token) = app.user("alice").await;
    let device_token = removed_device(&app, &alice, &alice_token, 11, CLIENT_IP).await;

    let nobody = "01a24110-0000-7000-8000-000000000000";
    let key = functions::signatures::ed25519_pem(
        ed25519_dalek::SigningKey::from_bytes(&[1; 32])
            .verifying_key()
            .as_bytes(),
    );
    let signature = base64::engine::general_purpose::STANDARD.encode([7u8; 64]);
    let prekey = json!({"key_id": 1, "public_key": base64::engine::general_purpose::STANDARD.encode([9u8; 32]), "signature": signature});
    let requests: Vec<(&str, String, Option<serde_json::Value>)> = vec![
        ("GET", "/me".into(), None),
        (
            "DELETE",
            "/me".into(),
            Some(json!({"password": "wrong-password"})),
        ),
        ("GET", format!("/public-key/{nobody}"), None),
        (
            "PUT",
            "/update-key".into(),
            Some(json!({"public_key": crate::support::key("ed25519.pem")})),
        ),
        ("GET", "/users?name=nobody".into(), None),
        (
            "POST",
            "/messages".into(),
            Some(json!({"recipient_id": nobody, "encrypted_data": "eA=="})),
        ),
        ("GET", "/messages".into(), None),
        ("PUT", format!("/messages/{nobody}/delivered"), None),
        (
            "POST",
            "/messages/delivered".into(),
            Some(json!({"ids": [nobody]})),
        ),
        (
            "POST",
            "/messages/devices".into(),
            Some(
                json!({"recipient_id": nobody, "envelopes": [{"device_id": 1, "key_fingerprint": "00".repeat(32), "encrypted_data": "eA=="}]}),
            ),
        ),
        ("POST", "/devices/link-codes".into(), None),
        ("GET", "/me/devices".into(), None),
        ("GET", format!("/users/{nobody}/devices"), None),
        (
            "DELETE",
            "/devices/9".into(),
            Some(json!({"password": "wrong-password"})),
        ),
        (
            "PUT",
            "/keys/signing-key".into(),
            Some(json!({"signing_key": key, "binding_sig": signature})),
        ),
        (
            "POST",
            "/keys/prekeys".into(),
            Some(json!({"prekeys": [prekey]})),
        ),
        ("GET", "/keys/prekeys/count".into(), None),
        ("GET", format!("/keys/{nobody}"), None),
        (
            "POST",
            "/keys/claim".into(),
            Some(json!({"user_id": nobody})),
        ),
    ];
    let authenticated = functions::routes::ROUTES
        .iter()
        .filter(|(_, _, f)| !OPEN.contains(f))
        .count();
    assert_eq!(
        requests.len(),
        authenticated,
        "a request for every authenticated route"
    );
    for (method, path, body) in requests {
        let send = |token: &str| {
            let mut request = app.request(method, &path).bearer(token);
            if let Some(body) = &body {
                request = request.json(body.clone());
            }
            request.send()
        };
        let live = send(&alice_token).await;
        assert_ne!(
            live.error_code(),
            "unauthorized",
            "{method} {path}, live: {}",
            live.text
        );
        let gone = send(&device_token).await;
        assert_eq!(gone.status, 401, "{method} {path}: {}", gone.text);
        gone.assert_error(401, "unauthorized");
    }
}
