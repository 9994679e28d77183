//! register, login, me, get-public-key, update-key, lookup-user: the contract's rules and errors.

use futures::future::join_all;
use serde_json::json;
use sqlx::PgPool;

use crate::support::{CLIENT_IP, PASSWORD, TestApp, key};

#[sqlx::test(migrator = "common::db::MIGRATOR")]
async fn register_returns_the_account(pool: PgPool) {
    let app = TestApp::new(pool);
    let r = app
        .request("POST", "/register")
        .json(json!({"name": "Alice", "password": PASSWORD, "public_key": key("p256.pem")}))
        .send()
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    assert_eq!(r.body["name"], "Alice");
    assert_eq!(r.body["public_key"], key("p256.pem"));
    let id = uuid::Uuid::parse_str(r.body["id"].as_str().unwrap()).unwrap();
    assert_eq!(id.get_version_num(), 7, "time-ordered ids");
    chrono::DateTime::parse_from_rfc3339(r.body["created_at"].as_str().unwrap()).unwrap();
    assert!(r.body["created_at"].as_str().unwrap().ends_with('Z'), "UTC");
    // The password is stored as a bcrypt hash, never as given.
    let stored: String = sqlx::query_scalar("SELECT hashed_password FROM users WHERE id = $1")
        .bind(id)
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert!(stored.starts_with("$2b$04$") && !stored.contains(PASSWORD));
}

#[sqlx::test(migrator = "common::db::MIGRATOR")]
async fn names_are_unique_without_regard_to_case(pool: PgPool) {
    let app = TestApp::new(pool);
    app.register("Alice").await;
    for name in ["Alice", "alice", "ALICE"] {
        let r = app
            .request("POST", "/register")
            .json(json!({"name": name, "password": PASSWORD, "public_key": key("p256.pem")}))
            .send()
            .await;
        r.assert_error(409, "conflict");
    }
    // Concurrent registrations of one name: exactly one wins.
    let attempts = (0..6).map(|i| {
        app.request("POST", "/register")
            .json(json!({"name": if i % 2 == 0 { "bob" } else { "BOB" }, "password": PASSWORD, "public_key": key("p256.pem")}))
            .send()
    });
    let statuses: Vec<u16> = join_all(attempts).await.iter().map(|r| r.status).collect();
    assert_eq!(
        statuses.iter().filter(|s| **s == 201).count(),
        1,
        "{statuses:?}"
    );
    assert!(
        statuses.iter().all(|s| *s == 201 || *s == 409),
        "{statuses:?}"
    );
}

#[sqlx::test(migrator = "common::db::MIGRATOR")]
async fn register_rules_are_422_with_the_field(pool: PgPool) {
    let app = TestApp::new(pool);
    let good = || json!({"name": "carol", "password": PASSWORD, "public_key": key("ed25519.pem")});
    let cases = [
        ("name", json!("ab")),
        ("name", json!("x".repeat(33))),
        ("name", json!("car ol")),
        ("name", json!("carol\u{0}")),
        ("password", json!("short")),
        ("password", json!("p".repeat(73))),
        ("public_key", json!(key("rsa1024.pem"))),
        ("public_key", json!(key("secp256k1.pem"))),
        ("public_key", json!(key("ed25519-private.pem"))),
        (
            "public_key",
            json!(format!("{}{}", key("p256.pem"), key("p384.pem"))),
        ),
        ("public_key", json!("not a key")),
    ];
    for (field, value) in cases {
        let mut body = good();
        body[field] = value.clone();
        let r = app.request("POST", "/register").json(body).send().await;
        r.assert_error(422, "validation_failed");
        assert_eq!(r.body["field"], field, "{value}");
    }
    for field in ["name", "password", "public_key"] {
        let mut body = good();
        body.as_object_mut().unwrap().remove(field);
        let r = app.request("POST", "/register").json(body).send().await;
        r.assert_error(422, "validation_failed");
        assert_eq!(r.body["field"], field);
        let mut body = good();
        body[field] = json!(12);
        let r = app.request("POST", "/register").json(body).send().await;
        r.assert_error(400, "bad_request");
        assert_eq!(r.body["field"], field);
    }
    // Nothing was stored by any refused request.
    let users: i64 = sqlx::query_scalar("SELECT count(*) FROM users")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(users, 0);
    // A 72-byte password is accepted and works.
    let long = "é".repeat(36);
    let r = app
        .request("POST", "/register")
        .json(json!({"name": "dave", "password": long, "public_key": key("x25519.pem")}))
        .send()
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    let r = app
        .request("POST", "/login")
        .json(json!({"name": "dave", "password": long}))
        .send()
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
}

#[sqlx::test(migrator = "common::db::MIGRATOR")]
async fn malformed_bodies_are_400_and_oversized_413(pool: PgPool) {
    let app = TestApp::new(pool);
    for body in [
        "",
        "not json",
        "[]",
        "\"text\"",
        "{\"name\":",
        "{\"name\":\"a\",\"name\":\"b\"}",
    ] {
        let r = app.request("POST", "/register").raw_body(body).send().await;
        r.assert_error(400, "bad_request");
    }
    let r = app
        .request("POST", "/register")
        .header("content-type", "text/plain")
        .json(json!({"name": "erin", "password": PASSWORD, "public_key": key("p256.pem")}))
        .send()
        .await;
    r.assert_error(400, "bad_request");
    let huge = json!({"name": "erin", "password": PASSWORD, "public_key": "x".repeat(100_000)});
    app.request("POST", "/register")
        .json(huge)
        .send()
        .await
        .assert_error(413, "payload_too_large");
    let deep = format!("{{\"name\":{}{}}}", "[".repeat(5000), "]".repeat(5000));
    app.request("POST", "/login")
        .raw_body(&deep)
        .send()
        .await
        .assert_error(400, "bad_request");
}

#[sqlx::test(migrator = "common::db::MIGRATOR")]
async fn registrations_per_address_are_limited(pool: PgPool) {
    let app = TestApp::with_env(
        pool,
        &[
            ("REGISTER_MAX_PER_ADDRESS", "2"),
            ("REGISTER_WINDOW_SECONDS", "600"),
        ],
    );
    app.register("user1").await;
    app.register("user2").await;
    let r = app
        .request("POST", "/register")
        .json(json!({"name": "user3", "password": PASSWORD, "public_key": key("p256.pem")}))
        .send()
        .await;
    r.assert_error(429, "rate_limited");
    let retry: u64 = r.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((590..=600).contains(&retry), "retry-after {retry}");
    // Another address is not affected.
    let r = app
        .request("POST", "/register")
        .with_source_ip("198.51.100.1")
        .json(json!({"name": "user3", "password": PASSWORD, "public_key": key("p256.pem")}))
        .send()
        .await;
    assert_eq!(r.status, 201);
    // X-Forwarded-For is the client's to forge and is ignored.
    let r = app
        .request("POST", "/register")
        .header("x-forwarded-for", "192.0.2.99")
        .json(json!({"name": "user4", "password": PASSWORD, "public_key": key("p256.pem")}))
        .send()
        .await;
    r.assert_error(429, "rate_limited");
    // Once the window has passed, the address may register again.
    sqlx::query("UPDATE rate_limits SET window_start = now() - interval '601 seconds'")
        .execute(&app.pool)
        .await
        .unwrap();
    app.register("user4").await;
}

#[sqlx::test(migrator = "common::db::MIGRATOR")]
async fn login_issues_a_token_for_either_spelling(pool: PgPool) {
    let app = TestApp::new(pool);
    let id = app.register("Frank").await;
    for spelling in ["Frank", "frank", "FRANK"] {
        let r = app
            .request("POST", "/login")
            .json(json!({"name": spelling, "password": PASSWORD}))
            .send()
            .await;
        assert_eq!(r.status, 200, "{}", r.text);
        assert_eq!(r.body["token_type"], "bearer");
        assert_eq!(r.body["expires_in"], 900);
        let token = r.body["access_token"].as_str().unwrap();
        let claims = app.state.jwt.verify(token).unwrap();
        assert_eq!(claims.sub.to_string(), id);
        let header = jsonwebtoken::decode_header(token).unwrap();
        assert_eq!(header.alg, jsonwebtoken::Algorithm::HS256);
        let me = app.request("GET", "/me").bearer(token).send().await;
        assert_eq!(me.body["id"], id.as_str());
    }
}

#[sqlx::test(migrator = "common::db::MIGRATOR")]
async fn wrong_password_and_unknown_name_look_the_same(pool: PgPool) {
    let app = TestApp::new(pool);
    app.register("grace").await;
    let wrong = app
        .request("POST", "/login")
        .json(json!({"name": "grace", "password": "not the password"}))
        .send()
        .await;
    let unknown = app
        .request("POST", "/login")
        .json(json!({"name": "nobody", "password": PASSWORD}))
        .send()
        .await;
    wrong.assert_error(401, "invalid_credentials");
    assert_eq!(wrong.text, unknown.text);
    assert_eq!(wrong.status, unknown.status);
    app.request("POST", "/login")
        .json(json!({"name": "grace"}))
        .send()
        .await
        .assert_error(422, "validation_failed");
    app.request("POST", "/login")
        .json(json!({"name": "grace", "password": "p".repeat(73)}))
        .send()
        .await
        .assert_error(422, "validation_failed");
}

#[sqlx::test(migrator = "common::db::MIGRATOR")]
async fn repeated_failures_lock_the_name_even_for_the_right_password(pool: PgPool) {
    let app = TestApp::with_env(
        pool,
        &[("LOGIN_MAX_FAILURES", "3"), ("LOGIN_WINDOW_SECONDS", "900")],
    );
    app.register("heidi").await;
    app.register("ivan").await;
    for _ in 0..3 {
        let r = app
            .request("POST", "/login")
            .json(json!({"name": "HEIDI", "password": "wrong-password"}))
            .send()
            .await;
        r.assert_error(401, "invalid_credentials");
    }
    let r = app
        .request("POST", "/login")
        .json(json!({"name": "heidi", "password": PASSWORD}))
        .send()
        .await;
    r.assert_error(429, "rate_limited");
    let retry: u64 = r.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((890..=900).contains(&retry), "retry-after {retry}");
    // Another name from the same address is not locked, and neither is this name from another
    // address: a stranger's guesses do not lock a user out of her own address.
    app.login("ivan").await;
    let r = app
        .request("POST", "/login")
        .with_source_ip("198.51.100.9")
        .json(json!({"name": "heidi", "password": PASSWORD}))
        .send()
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    // The window ends: the right password works again.
    sqlx::query("UPDATE rate_limits SET window_start = now() - interval '901 seconds'")
        .execute(&app.pool)
        .await
        .unwrap();
    app.login("heidi").await;
    // A success clears the failures of its own name and address: two more failures do not add
    // up to three with the old ones.
    for _ in 0..2 {
        app.request("POST", "/login")
            .json(json!({"name": "heidi", "password": "wrong-password"}))
            .send()
            .await;
    }
    app.login("heidi").await;
    let left: i32 = sqlx::query_scalar(
        "SELECT attempts FROM rate_limits WHERE bucket = 'login_name_address' AND key = $1",
    )
    .bind(format!("heidi@{CLIENT_IP}"))
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(left, 0);
    for _ in 0..2 {
        app.request("POST", "/login")
            .json(json!({"name": "heidi", "password": "wrong-password"}))
            .send()
            .await;
    }
    app.login("heidi").await;
}

#[sqlx::test(migrator = "common::db::MIGRATOR")]
async fn failures_from_one_address_are_limited_across_names(pool: PgPool) {
    let app = TestApp::with_env(
        pool,
        &[
            ("LOGIN_MAX_FAILURES_PER_ADDRESS", "4"),
            ("LOGIN_MAX_FAILURES", "100"),
        ],
    );
    app.register("judy").await;
    for i in 0..4 {
        let r = app
            .request("POST", "/login")
            .json(json!({"name": format!("guess{i}"), "password": "wrong-password"}))
            .send()
            .await;
        r.assert_error(401, "invalid_credentials");
    }
    let r = app
        .request("POST", "/login")
        .json(json!({"name": "judy", "password": PASSWORD}))
        .send()
        .await;
    r.assert_error(429, "rate_limited");
    assert!(r.headers.contains_key("retry-after"));
    let r = app
        .request("POST", "/login")
        .with_source_ip("198.51.100.2")
        .json(json!({"name": "judy", "password": PASSWORD}))
        .send()
        .await;
    assert_eq!(r.status, 200, "another address is not limited");
}

#[sqlx::test(migrator = "common::db::MIGRATOR")]
async fn me_returns_the_profile(pool: PgPool) {
    let app = TestApp::new(pool);
    let (id, token) = app.user("mallory").await;
    let r = app.request("GET", "/me").bearer(&token).send().await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["id"], id.as_str());
    assert_eq!(r.body["name"], "mallory");
    assert_eq!(r.body["public_key"], key("ed25519.pem"));
    assert_eq!(r.body["created_at"], r.body["key_updated_at"]);
    assert!(r.body.get("hashed_password").is_none());
}

#[sqlx::test(migrator = "common::db::MIGRATOR")]
async fn every_authenticated_endpoint_refuses_bad_tokens_before_reading_the_body(pool: PgPool) {
    let app = TestApp::new(pool);
    let (id, token) = app.user("niaj").await;
    let expired = {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let claims = json!({"sub": id, "iat": now - 1000, "exp": now - 100, "iss": "secure-messenger",
                            "aud": "secure-messenger-api", "jti": uuid::Uuid::now_v7()});
        let key =
            jsonwebtoken::EncodingKey::from_secret(crate::support::JWT_SECRET.as_bytes()).unwrap();
        jsonwebtoken::encode(&jsonwebtoken::Header::default(), &claims, &key).unwrap()
    };
    let mut tampered = token.clone();
    tampered.pop();
    tampered.push(if token.ends_with('A') { 'B' } else { 'A' });
    let endpoints = [
        ("GET", "/me".to_string()),
        ("GET", format!("/public-key/{id}")),
        ("GET", "/public-key/not-a-uuid".to_string()),
        ("PUT", "/update-key".to_string()),
        ("GET", "/users?name=niaj".to_string()),
        ("POST", "/messages".to_string()),
        ("GET", "/messages?limit=abc".to_string()),
        ("PUT", format!("/messages/{id}/delivered")),
    ];
    for (method, path) in &endpoints {
        let missing = app.request(method, path).raw_body("not json").send().await;
        missing.assert_error(401, "unauthorized");
        assert_eq!(missing.headers["www-authenticate"], "Bearer");
        for bad in [
            "Bearer",
            "Basic abc",
            &format!("Bearer {expired}"),
            &format!("Bearer {tampered}"),
            "Bearer a.b.c",
        ] {
            let r = app
                .request(method, path)
                .header("authorization", bad)
                .raw_body("{")
                .send()
                .await;
            r.assert_error(401, "unauthorized");
        }
    }
}

#[sqlx::test(migrator = "common::db::MIGRATOR")]
async fn a_deleted_users_token_is_refused(pool: PgPool) {
    let app = TestApp::new(pool);
    let (id, token) = app.user("olivia").await;
    let (peer, _) = app.user("peggy").await;
    sqlx::query("DELETE FROM users WHERE id = $1::uuid")
        .bind(&id)
        .execute(&app.pool)
        .await
        .unwrap();
    let calls = [
        app.request("GET", "/me").bearer(&token).send().await,
        app.request("GET", &format!("/public-key/{peer}"))
            .bearer(&token)
            .send()
            .await,
        app.request("GET", "/users?name=peggy")
            .bearer(&token)
            .send()
            .await,
        app.request("PUT", "/update-key")
            .bearer(&token)
            .json(json!({"public_key": key("p256.pem")}))
            .send()
            .await,
        app.request("POST", "/messages")
            .bearer(&token)
            .json(json!({"recipient_id": peer, "encrypted_data": "aGk="}))
            .send()
            .await,
        app.request("GET", "/messages").bearer(&token).send().await,
        app.request("PUT", &format!("/messages/{peer}/delivered"))
            .bearer(&token)
            .send()
            .await,
    ];
    for r in calls {
        r.assert_error(401, "unauthorized");
    }
}

#[sqlx::test(migrator = "common::db::MIGRATOR")]
async fn public_keys_by_id_and_by_name(pool: PgPool) {
    let app = TestApp::new(pool);
    let (_, token) = app.user("quentin").await;
    let rupert = app.register("Rupert").await;
    let by_id = app
        .request("GET", &format!("/public-key/{rupert}"))
        .bearer(&token)
        .send()
        .await;
    assert_eq!(by_id.status, 200, "{}", by_id.text);
    assert_eq!(by_id.body["user_id"], rupert.as_str());
    assert_eq!(by_id.body["name"], "Rupert");
    assert_eq!(by_id.body["public_key"], key("ed25519.pem"));
    assert!(by_id.body["key_updated_at"].is_string());
    let by_name = app
        .request("GET", "/users?name=rUPERT")
        .bearer(&token)
        .send()
        .await;
    assert_eq!(by_name.body, by_id.body);

    let unknown = uuid::Uuid::now_v7();
    app.request("GET", &format!("/public-key/{unknown}"))
        .bearer(&token)
        .send()
        .await
        .assert_error(404, "not_found");
    app.request("GET", "/public-key/12345")
        .bearer(&token)
        .send()
        .await
        .assert_error(400, "bad_request");
    app.request("GET", "/users?name=nobody")
        .bearer(&token)
        .send()
        .await
        .assert_error(404, "not_found");
    app.request("GET", "/users")
        .bearer(&token)
        .send()
        .await
        .assert_error(422, "validation_failed");
    app.request("GET", "/users?name=a%20b")
        .bearer(&token)
        .send()
        .await
        .assert_error(422, "validation_failed");
}

#[sqlx::test(migrator = "common::db::MIGRATOR")]
async fn update_key_replaces_the_key(pool: PgPool) {
    let app = TestApp::new(pool);
    let (id, token) = app.user("sybil").await;
    let before = app.request("GET", "/me").bearer(&token).send().await;
    let r = app
        .request("PUT", "/update-key")
        .bearer(&token)
        .json(json!({"public_key": key("rsa2048.pem")}))
        .send()
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["id"], id.as_str());
    assert_eq!(r.body["public_key"], key("rsa2048.pem"));
    assert_eq!(r.body["created_at"], before.body["created_at"]);
    assert!(
        r.body["key_updated_at"].as_str().unwrap()
            > before.body["key_updated_at"].as_str().unwrap()
    );
    let seen = app
        .request("GET", &format!("/public-key/{id}"))
        .bearer(&token)
        .send()
        .await;
    assert_eq!(seen.body["public_key"], key("rsa2048.pem"));

    let r = app
        .request("PUT", "/update-key")
        .bearer(&token)
        .json(json!({"public_key": key("ed448.pem")}))
        .send()
        .await;
    r.assert_error(422, "validation_failed");
    assert_eq!(r.body["field"], "public_key");
    app.request("PUT", "/update-key")
        .bearer(&token)
        .json(json!({}))
        .send()
        .await
        .assert_error(422, "validation_failed");
    app.request("PUT", "/update-key")
        .bearer(&token)
        .json(json!({"public_key": 1}))
        .send()
        .await
        .assert_error(400, "bad_request");
    // The refused updates changed nothing.
    let after = app.request("GET", "/me").bearer(&token).send().await;
    assert_eq!(after.body["public_key"], key("rsa2048.pem"));
}

#[sqlx::test(migrator = "common::db::MIGRATOR")]
async fn login_address_comes_from_the_request_context(pool: PgPool) {
    let app = TestApp::new(pool);
    let r = app
        .request("POST", "/login")
        .json(json!({"name": "nobody", "password": PASSWORD}))
        .send()
        .await;
    r.assert_error(401, "invalid_credentials");
    let key: String =
        sqlx::query_scalar("SELECT key FROM rate_limits WHERE bucket = 'login_address'")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(key, CLIENT_IP);
}
