//! A token whose device was removed, or whose account was deleted, is 401 on every endpoint
//! that takes one, whatever else is wrong with the request, and nothing is counted for it.

use serde_json::json;
use sqlx::PgPool;

use crate::fan_out::add_device;
use crate::support::{PASSWORD, TestApp};

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

#[sqlx::test(migrator = "common::db::MIGRATOR")]
async fn a_gone_callers_token_is_401_whatever_the_request(pool: PgPool) {
    let app = TestApp::new(pool.clone());
    let (alice, alice_token) = app.user("alice").await;
    let (device, device_token) = add_device(&app, &alice, 7).await;
    let r = app
        .request("DELETE", &format!("/devices/{device}"))
        .bearer(&alice_token)
        .json(json!({"password": PASSWORD}))
        .send()
        .await;
    assert_eq!(r.status, 204, "{}", r.text);
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
/// statement checks the token's device before it counts (the runtime relies on it, and checks
/// the device again only for refusals other than 429).
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
    let (device, device_token) = add_device(&app, &alice, 9).await;
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
    let r = app
        .request("DELETE", &format!("/devices/{device}"))
        .bearer(&alice_token)
        .with_source_ip("192.0.2.50")
        .json(json!({"password": PASSWORD}))
        .send()
        .await;
    assert_eq!(r.status, 204, "{}", r.text);

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
