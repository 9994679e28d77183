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
