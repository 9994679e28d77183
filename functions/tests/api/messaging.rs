//! send-message, get-messages, confirm-delivery: delivery exactly once, expiry, paging, errors.

use std::collections::HashSet;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde_json::{Value, json};
use sqlx::PgPool;

use crate::support::TestApp;

async fn send(app: &TestApp, token: &str, to: &str, data: &[u8]) -> Value {
    let r = app
        .request("POST", "/messages")
        .bearer(token)
        .json(json!({"recipient_id": to, "encrypted_data": BASE64.encode(data)}))
        .send()
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    r.body
}

async fn fetch(app: &TestApp, token: &str, query: &str) -> Value {
    let r = app
        .request("GET", &format!("/messages{query}"))
        .bearer(token)
        .send()
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    r.body
}

#[sqlx::test(migrator = "common::db::MIGRATOR")]
async fn a_full_exchange(pool: PgPool) {
    let app = TestApp::new(pool);
    let (alice, alice_token) = app.user("alice").await;
    let (bob, bob_token) = app.user("bob").await;
    let sent = send(&app, &alice_token, &bob, b"ciphertext for bob").await;
    assert_eq!(sent["sender_id"], alice.as_str());
    assert_eq!(sent["recipient_id"], bob.as_str());
    let timestamp =
        chrono::DateTime::parse_from_rfc3339(sent["timestamp"].as_str().unwrap()).unwrap();
    let expires =
        chrono::DateTime::parse_from_rfc3339(sent["expires_at"].as_str().unwrap()).unwrap();
    assert_eq!((expires - timestamp).num_seconds(), 604_800);

    let page = fetch(&app, &bob_token, "").await;
    assert_eq!(page["has_more"], false);
    let messages = page["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 1);
    let m = &messages[0];
    assert_eq!(m["id"], sent["id"]);
    assert_eq!(m["sender_id"], alice.as_str());
    assert_eq!(m["recipient_id"], bob.as_str());
    assert_eq!(
        BASE64
            .decode(m["encrypted_data"].as_str().unwrap())
            .unwrap(),
        b"ciphertext for bob"
    );
    assert_eq!(m["timestamp"], sent["timestamp"]);
    assert_eq!(m["expires_at"], sent["expires_at"]);
    // Nobody else sees it, the sender included.
    assert_eq!(fetch(&app, &alice_token, "").await["messages"], json!([]));

    let id = m["id"].as_str().unwrap();
    let path = format!("/messages/{id}/delivered");
    app.request("PUT", &path)
        .bearer(&alice_token)
        .send()
        .await
        .assert_error(404, "not_found");
    let r = app.request("PUT", &path).bearer(&bob_token).send().await;
    assert_eq!((r.status, r.text.as_str()), (204, ""));
    let r = app.request("PUT", &path).bearer(&bob_token).send().await;
    assert_eq!(r.status, 204, "confirming twice is fine");
    assert_eq!(fetch(&app, &bob_token, "").await["messages"], json!([]));
    // The ciphertext is gone from the database at once, not at expiry.
    let (delivered, data): (bool, Option<Vec<u8>>) =
        sqlx::query_as("SELECT is_delivered, encrypted_data FROM messages WHERE id = $1::uuid")
            .bind(id)
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert!(delivered && data.is_none());
}

#[sqlx::test(migrator = "common::db::MIGRATOR")]
async fn send_errors(pool: PgPool) {
    let app = TestApp::with_env(pool, &[("MAX_MESSAGE_BYTES", "16")]);
    let (_, token) = app.user("alice").await;
    let bob = app.register("bob").await;
    let post = |body: Value| {
        app.request("POST", "/messages")
            .bearer(&token)
            .json(body)
            .send()
    };
    let unknown = uuid::Uuid::now_v7().to_string();
    post(json!({"recipient_id": unknown, "encrypted_data": "aGk="}))
        .await
        .assert_error(404, "not_found");
    for (body, status, code, field) in [
        (
            json!({"recipient_id": bob, "encrypted_data": "not base64!"}),
            422,
            "validation_failed",
            "encrypted_data",
        ),
        (
            json!({"recipient_id": bob, "encrypted_data": ""}),
            422,
            "validation_failed",
            "encrypted_data",
        ),
        (
            json!({"recipient_id": bob, "encrypted_data": BASE64.encode([7u8; 17])}),
            413,
            "payload_too_large",
            "encrypted_data",
        ),
        (
            json!({"recipient_id": "bob", "encrypted_data": "aGk="}),
            422,
            "validation_failed",
            "recipient_id",
        ),
        (
            json!({"recipient_id": bob.replace('-', ""), "encrypted_data": "aGk="}),
            422,
            "validation_failed",
            "recipient_id",
        ),
        (
            json!({"encrypted_data": "aGk="}),
            422,
            "validation_failed",
            "recipient_id",
        ),
        (
            json!({"recipient_id": bob}),
            422,
            "validation_failed",
            "encrypted_data",
        ),
        (
            json!({"recipient_id": bob, "encrypted_data": 5}),
            400,
            "bad_request",
            "encrypted_data",
        ),
        (
            json!({"recipient_id": 5, "encrypted_data": "aGk="}),
            400,
            "bad_request",
            "recipient_id",
        ),
    ] {
        let r = post(body.clone()).await;
        r.assert_error(status, code);
        assert_eq!(r.body["field"], field, "{body}");
    }
    // A body far over the limit is refused before it is parsed.
    let huge = format!(
        "{{\"recipient_id\":\"{bob}\",\"encrypted_data\":\"{}\"}}",
        "A".repeat(200_000)
    );
    app.request("POST", "/messages")
        .bearer(&token)
        .raw_body(&huge)
        .send()
        .await
        .assert_error(413, "payload_too_large");
    post(json!({"recipient_id": bob, "encrypted_data": BASE64.encode([7u8; 16])})).await;
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM messages")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(stored, 1, "only the valid message was stored");
}

#[sqlx::test(migrator = "common::db::MIGRATOR")]
async fn paging_with_limit_and_after(pool: PgPool) {
    let app = TestApp::new(pool);
    let (_, alice_token) = app.user("alice").await;
    let (bob, bob_token) = app.user("bob").await;
    let mut sent = Vec::new();
    for i in 0..7u8 {
        sent.push(
            send(&app, &alice_token, &bob, &[i]).await["id"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    let mut seen = Vec::new();
    let mut after = String::new();
    loop {
        let query = if after.is_empty() {
            "?limit=3".to_string()
        } else {
            format!("?limit=3&after={after}")
        };
        let page = fetch(&app, &bob_token, &query).await;
        let ids: Vec<String> = page["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_str().unwrap().to_string())
            .collect();
        assert!(ids.len() <= 3);
        seen.extend(ids.iter().cloned());
        if page["has_more"] == false {
            break;
        }
        after = ids.last().unwrap().clone();
    }
    assert_eq!(seen, sent, "every message once, oldest first");
    // `after` still works once the message it names is gone.
    app.request("PUT", &format!("/messages/{}/delivered", sent[2]))
        .bearer(&bob_token)
        .send()
        .await;
    let page = fetch(&app, &bob_token, &format!("?after={}&limit=2", sent[2])).await;
    let ids: Vec<&str> = page["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [sent[3].as_str(), sent[4].as_str()]);
    assert_eq!(page["has_more"], true);
    let page = fetch(&app, &bob_token, &format!("?after={}", sent[6])).await;
    assert_eq!(
        (
            page["messages"].as_array().unwrap().len(),
            &page["has_more"]
        ),
        (0, &json!(false))
    );

    let get = |q: &str| {
        app.request("GET", &format!("/messages{q}"))
            .bearer(&bob_token)
            .send()
    };
    for q in ["?limit=0", "?limit=501", "?limit=-1"] {
        let r = get(q).await;
        r.assert_error(422, "validation_failed");
        assert_eq!(r.body["field"], "limit");
    }
    get("?limit=ten").await.assert_error(400, "bad_request");
    get("?after=yesterday")
        .await
        .assert_error(400, "bad_request");
    assert_eq!(
        get("?limit=500").await.body["messages"]
            .as_array()
            .unwrap()
            .len(),
        6
    );
}

#[sqlx::test(migrator = "common::db::MIGRATOR")]
async fn expired_messages_are_never_returned(pool: PgPool) {
    let app = TestApp::new(pool);
    let (_, alice_token) = app.user("alice").await;
    let (bob, bob_token) = app.user("bob").await;
    let old = send(&app, &alice_token, &bob, b"old").await;
    let fresh = send(&app, &alice_token, &bob, b"fresh").await;
    // The purge has not run; the message is simply past its expiry.
    sqlx::query("UPDATE messages SET \"timestamp\" = now() - interval '8 days', expires_at = now() - interval '1 day' WHERE id = $1::uuid")
        .bind(old["id"].as_str().unwrap())
        .execute(&app.pool)
        .await
        .unwrap();
    let page = fetch(&app, &bob_token, "").await;
    let ids: Vec<&Value> = page["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| &m["id"])
        .collect();
    assert_eq!(ids, [&fresh["id"]]);
}

#[sqlx::test(migrator = "common::db::MIGRATOR")]
async fn a_page_stays_under_the_lambda_response_limit(pool: PgPool) {
    let app = TestApp::with_env(pool, &[("MAX_MESSAGE_BYTES", "2097152")]);
    let (_, alice_token) = app.user("alice").await;
    let (bob, bob_token) = app.user("bob").await;
    let big = vec![0x5au8; 2 * 1024 * 1024];
    for _ in 0..3 {
        send(&app, &alice_token, &bob, &big).await;
    }
    let r = app
        .request("GET", "/messages")
        .bearer(&bob_token)
        .send()
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.body["messages"].as_array().unwrap().len(),
        2,
        "4 MiB of ciphertext per page"
    );
    assert_eq!(r.body["has_more"], true);
    assert!(
        r.text.len() < 6_000_000,
        "response is {} bytes",
        r.text.len()
    );
}

#[sqlx::test(migrator = "common::db::MIGRATOR")]
async fn confirm_errors(pool: PgPool) {
    let app = TestApp::new(pool);
    let (_, token) = app.user("alice").await;
    let unknown = uuid::Uuid::now_v7();
    app.request("PUT", &format!("/messages/{unknown}/delivered"))
        .bearer(&token)
        .send()
        .await
        .assert_error(404, "not_found");
    app.request("PUT", "/messages/nope/delivered")
        .bearer(&token)
        .send()
        .await
        .assert_error(400, "bad_request");
}

/// 8 senders x 200 messages to one recipient while the recipient fetches and confirms in pages:
/// every accepted message is delivered exactly once, none lost, none duplicated, none leaked.
#[sqlx::test(migrator = "common::db::MIGRATOR")]
async fn concurrent_senders_and_a_confirming_recipient(pool: PgPool) {
    const SENDERS: usize = 8;
    const EACH: usize = 200;
    let app = TestApp::new(pool);
    let (recipient, recipient_token) = app.user("recipient").await;
    let (_, outsider_token) = app.user("outsider").await;
    let mut senders = Vec::new();
    for i in 0..SENDERS {
        senders.push(app.user(&format!("sender{i}")).await);
    }
    let app = &app;
    let recipient = &recipient;
    let sending = futures::future::join_all(senders.iter().enumerate().map(
        |(i, (_, token))| async move {
            let mut accepted = Vec::new();
            for n in 0..EACH {
                let payload = format!("{i}:{n}");
                let r = app
                .request("POST", "/messages")
                .bearer(token)
                .json(json!({"recipient_id": recipient, "encrypted_data": BASE64.encode(&payload)}))
                .send()
                .await;
                assert_eq!(r.status, 201, "{}", r.text);
                accepted.push((r.body["id"].as_str().unwrap().to_string(), payload));
            }
            accepted
        },
    ));
    let done = std::sync::atomic::AtomicBool::new(false);
    let receiving = async {
        let mut received: Vec<(String, String)> = Vec::new();
        loop {
            let finished = done.load(std::sync::atomic::Ordering::SeqCst);
            let page = fetch(app, &recipient_token, "?limit=50").await;
            let messages = page["messages"].as_array().unwrap().clone();
            for m in &messages {
                assert_eq!(m["recipient_id"], recipient.as_str());
                let id = m["id"].as_str().unwrap().to_string();
                let data = String::from_utf8(
                    BASE64
                        .decode(m["encrypted_data"].as_str().unwrap())
                        .unwrap(),
                )
                .unwrap();
                let r = app
                    .request("PUT", &format!("/messages/{id}/delivered"))
                    .bearer(&recipient_token)
                    .send()
                    .await;
                assert_eq!(r.status, 204);
                received.push((id, data));
            }
            let outsider = fetch(app, &outsider_token, "").await;
            assert_eq!(
                outsider["messages"],
                json!([]),
                "nothing leaks to a third user"
            );
            if finished && messages.is_empty() {
                break;
            }
            tokio::task::yield_now().await;
        }
        received
    };
    let (accepted, received) = tokio::join!(
        async {
            let accepted: Vec<(String, String)> = sending.await.into_iter().flatten().collect();
            done.store(true, std::sync::atomic::Ordering::SeqCst);
            accepted
        },
        receiving
    );
    assert_eq!(accepted.len(), SENDERS * EACH);
    let unique: HashSet<&String> = received.iter().map(|(id, _)| id).collect();
    assert_eq!(unique.len(), received.len(), "no message delivered twice");
    let mut accepted_sorted = accepted.clone();
    accepted_sorted.sort();
    let mut received_sorted = received.clone();
    received_sorted.sort();
    assert_eq!(
        received_sorted, accepted_sorted,
        "every accepted message delivered, with its content"
    );
    let left: i64 =
        sqlx::query_scalar("SELECT count(*) FROM messages WHERE encrypted_data IS NOT NULL")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(left, 0, "no ciphertext kept after confirmation");
}
