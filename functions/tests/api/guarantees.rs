//! The promises that only show under concurrency, each with many Lambda instances at once (one
//! `TestApp` per instance: its own pool of one connection, in the deployed configuration):
//! a cursor never skips, retries never duplicate, limits and quotas cannot be raced.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde_json::{Value, json};
use sqlx::PgPool;

use crate::support::{PASSWORD, TestApp, TestResponse};

/// `count` instances over the same database, each with its own pool and these settings.
fn instances(pool: &PgPool, count: usize, vars: &[(&str, &str)]) -> Vec<Arc<TestApp>> {
    (0..count)
        .map(|_| Arc::new(TestApp::with_env(pool.clone(), vars)))
        .collect()
}

async fn send(
    app: &TestApp,
    token: &str,
    to: &str,
    data: &[u8],
    key: Option<&str>,
) -> TestResponse {
    let mut request = app
        .request("POST", "/messages")
        .bearer(token)
        .json(json!({"recipient_id": to, "encrypted_data": BASE64.encode(data)}));
    if let Some(key) = key {
        request = request.header("idempotency-key", key);
    }
    request.send().await
}

async fn confirm_batch(app: &TestApp, token: &str, ids: Value) -> TestResponse {
    app.request("POST", "/messages/delivered")
        .bearer(token)
        .json(json!({ "ids": ids }))
        .send()
        .await
}

/// 16 senders on 16 instances send 200 messages each to one recipient while the recipient, on
/// its own instance, only ever polls with the last id it received and confirms each page in one
/// batch. It gets all 3,200, each once, with its content. Before the mailbox lock (ids from
/// each instance's clock, committed in any order), some were skipped for good.
#[sqlx::test(migrator = "common::db::MIGRATOR")]
async fn a_cursor_never_skips_under_concurrent_senders(pool: PgPool) {
    const SENDERS: usize = 16;
    const EACH: usize = 200;
    let setup = TestApp::new(pool.clone());
    let (recipient, recipient_token) = setup.user("recipient").await;
    let mut senders = Vec::new();
    for i in 0..SENDERS {
        senders.push(setup.user(&format!("sender{i}")).await.1);
    }
    let apps = instances(&pool, SENDERS + 1, &[]);

    let mut tasks = Vec::new();
    for (i, token) in senders.into_iter().enumerate() {
        let (app, recipient) = (apps[i].clone(), recipient.clone());
        tasks.push(tokio::spawn(async move {
            for n in 0..EACH {
                let r = send(
                    &app,
                    &token,
                    &recipient,
                    format!("{i}:{n}").as_bytes(),
                    None,
                )
                .await;
                assert_eq!(r.status, 201, "{}", r.text);
            }
        }));
    }
    let reader = &apps[SENDERS];
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut cursor: Option<String> = None;
    let mut received: HashMap<String, String> = HashMap::new();
    let mut senders_done = false;
    let mut empty_polls_after_done = 0;
    while received.len() < SENDERS * EACH && Instant::now() < deadline {
        let query = match &cursor {
            Some(after) => format!("/messages?limit=100&after={after}"),
            None => "/messages?limit=100".to_string(),
        };
        let page = reader
            .request("GET", &query)
            .bearer(&recipient_token)
            .send()
            .await;
        assert_eq!(page.status, 200, "{}", page.text);
        let messages = page.body["messages"].as_array().unwrap();
        let mut ids = Vec::new();
        for m in messages {
            let id = m["id"].as_str().unwrap().to_string();
            let data = BASE64
                .decode(m["encrypted_data"].as_str().unwrap())
                .unwrap();
            let previous = received.insert(id.clone(), String::from_utf8(data).unwrap());
            assert!(previous.is_none(), "message {id} delivered twice");
            ids.push(id);
        }
        if let Some(last) = ids.last() {
            cursor = Some(last.clone());
            let r = confirm_batch(reader, &recipient_token, json!(ids)).await;
            assert_eq!(r.status, 200, "{}", r.text);
            assert_eq!(r.body["confirmed"], ids.len());
        } else if senders_done {
            // Everything is committed: one empty poll with the cursor is the final answer.
            empty_polls_after_done += 1;
            if empty_polls_after_done > 1 {
                break;
            }
        }
        senders_done = senders_done || tasks.iter().all(|t| t.is_finished());
        tokio::task::yield_now().await;
    }
    for task in tasks {
        task.await.unwrap();
    }
    let expected: HashSet<String> = (0..SENDERS)
        .flat_map(|i| (0..EACH).map(move |n| format!("{i}:{n}")))
        .collect();
    let got: HashSet<String> = received.values().cloned().collect();
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM messages")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(stored, (SENDERS * EACH) as i64, "every send was stored");
    assert_eq!(
        expected.difference(&got).count(),
        0,
        "{} of {} messages were skipped by the cursor",
        expected.difference(&got).count(),
        expected.len()
    );
    assert_eq!(received.len(), SENDERS * EACH);
}

/// Retries with one `Idempotency-Key`: one row, the first answer again (also for 20 retries
/// racing on 20 instances, and after the message was confirmed), 422 for the key with another
/// request, keys of different senders independent, malformed keys 400.
#[sqlx::test(migrator = "common::db::MIGRATOR")]
async fn retries_with_one_key_store_one_message(pool: PgPool) {
    let app = TestApp::new(pool.clone());
    let (alice, alice_token) = app.user("alice").await;
    let (bob, bob_token) = app.user("bob").await;

    let first = send(&app, &alice_token, &bob, b"hello", Some("k-1")).await;
    assert_eq!(first.status, 201, "{}", first.text);
    assert!(!first.headers.contains_key("idempotent-replayed"));
    let again = send(&app, &alice_token, &bob, b"hello", Some("k-1")).await;
    assert_eq!(again.status, 201, "{}", again.text);
    assert_eq!(again.headers["idempotent-replayed"], "true");
    assert_eq!(again.body, first.body, "the first answer, field for field");

    // The same key for another request.
    send(&app, &alice_token, &bob, b"other", Some("k-1"))
        .await
        .assert_error(422, "idempotency_key_reused");
    send(&app, &alice_token, &alice, b"hello", Some("k-1"))
        .await
        .assert_error(422, "idempotency_key_reused");
    // Another sender's key space.
    let bobs = send(&app, &bob_token, &alice, b"hello", Some("k-1")).await;
    assert_eq!(bobs.status, 201);
    assert!(!bobs.headers.contains_key("idempotent-replayed"));
    // Malformed keys.
    for bad in ["", "has space", "dot.ted", &"k".repeat(65)] {
        send(&app, &alice_token, &bob, b"hello", Some(bad))
            .await
            .assert_error(400, "bad_request");
    }

    // 20 retries at once, on 20 instances: one row, one id, 19 replays.
    let apps = instances(&pool, 20, &[]);
    let mut racing = Vec::new();
    for app in apps {
        let (token, bob) = (alice_token.clone(), bob.clone());
        racing.push(tokio::spawn(async move {
            send(&app, &token, &bob, b"raced", Some("race-key")).await
        }));
    }
    let mut ids = HashSet::new();
    let mut replayed = 0;
    for r in racing {
        let r = r.await.unwrap();
        assert_eq!(r.status, 201, "{}", r.text);
        replayed += usize::from(r.headers.contains_key("idempotent-replayed"));
        ids.insert(r.body["id"].as_str().unwrap().to_string());
    }
    assert_eq!((ids.len(), replayed), (1, 19));
    let rows: i64 =
        sqlx::query_scalar("SELECT count(*) FROM messages WHERE idempotency_key = 'race-key'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(rows, 1);

    // Confirmed: the ciphertext is erased, the key is still remembered.
    let id = first.body["id"].as_str().unwrap();
    let r = confirm_batch(&app, &bob_token, json!([id])).await;
    assert_eq!(r.body["confirmed"], 1);
    let kept: (Option<Vec<u8>>, Option<Vec<u8>>) =
        sqlx::query_as("SELECT encrypted_data, request_digest FROM messages WHERE id = $1::uuid")
            .bind(id)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(kept.0, None, "ciphertext erased at confirmation");
    assert_eq!(kept.1.map(|d| d.len()), Some(32), "only a digest is kept");
    let late = send(&app, &alice_token, &bob, b"hello", Some("k-1")).await;
    assert_eq!(late.status, 201);
    assert_eq!(late.headers["idempotent-replayed"], "true");
    assert_eq!(late.body, first.body);
    let page = app
        .request("GET", "/messages")
        .bearer(&bob_token)
        .send()
        .await;
    let ids: Vec<&str> = page.body["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert!(!ids.contains(&id), "a replay does not bring a message back");
}

/// `POST /messages/delivered`: the caller's ids confirmed and erased in one call, the others
/// reported once each in request order; bad lists refused whole.
#[sqlx::test(migrator = "common::db::MIGRATOR")]
async fn batch_confirmation(pool: PgPool) {
    let app = TestApp::new(pool.clone());
    let (alice, alice_token) = app.user("alice").await;
    let (bob, bob_token) = app.user("bob").await;
    let mut to_bob = Vec::new();
    for n in 0..3 {
        let r = send(&app, &alice_token, &bob, format!("m{n}").as_bytes(), None).await;
        to_bob.push(r.body["id"].as_str().unwrap().to_string());
    }
    let to_alice = send(&app, &bob_token, &alice, b"x", None).await.body["id"]
        .as_str()
        .unwrap()
        .to_string();
    let unknown = uuid::Uuid::now_v7().to_string();

    // Refused whole: nothing is confirmed.
    for (body, status, code) in [
        (json!({"ids": [to_bob[0], "nope"]}), 400, "bad_request"),
        (json!({"ids": [to_bob[0], 7]}), 400, "bad_request"),
        (json!({"ids": to_bob[0]}), 400, "bad_request"),
        (json!({"ids": []}), 422, "validation_failed"),
        (
            json!({"ids": vec![unknown.clone(); 501]}),
            422,
            "validation_failed",
        ),
        (json!({}), 422, "validation_failed"),
    ] {
        app.request("POST", "/messages/delivered")
            .bearer(&bob_token)
            .json(body)
            .send()
            .await
            .assert_error(status, code);
    }
    let pending: i64 = sqlx::query_scalar("SELECT count(*) FROM messages WHERE NOT is_delivered")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(pending, 4);

    let r = confirm_batch(
        &app,
        &bob_token,
        json!([to_bob[0], unknown, to_bob[1], to_alice, to_bob[0], unknown]),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(
        r.body,
        json!({"confirmed": 2, "not_found": [unknown, to_alice]})
    );
    // Idempotent, and the single confirm agrees.
    let r = confirm_batch(&app, &bob_token, json!([to_bob[0], to_bob[1]])).await;
    assert_eq!(r.body, json!({"confirmed": 2, "not_found": []}));
    let r = app
        .request("PUT", &format!("/messages/{}/delivered", to_bob[0]))
        .bearer(&bob_token)
        .send()
        .await;
    assert_eq!(r.status, 204);
    let erased: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM messages WHERE is_delivered AND encrypted_data IS NULL",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(erased, 2);
    let page = app
        .request("GET", "/messages")
        .bearer(&bob_token)
        .send()
        .await;
    assert_eq!(page.body["messages"].as_array().unwrap().len(), 1);
    // Alice's message was not Bob's to confirm.
    let page = app
        .request("GET", "/messages")
        .bearer(&alice_token)
        .send()
        .await;
    assert_eq!(page.body["messages"][0]["id"], to_alice.as_str());
}

/// 50 wrong passwords at once for one name, on 25 instances: at most `LOGIN_MAX_FAILURES` are
/// checked (401), the rest are 429. The same for one address across 50 names. Before, every
/// attempt read the old count and all 50 were checked.
#[sqlx::test(migrator = "common::db::MIGRATOR")]
async fn login_limits_hold_under_concurrency(pool: PgPool) {
    let vars = [
        ("LOGIN_MAX_FAILURES", "5"),
        ("LOGIN_MAX_FAILURES_PER_ADDRESS", "5"),
    ];
    let setup = TestApp::with_env(pool.clone(), &vars);
    setup.register("target").await;
    let apps = instances(&pool, 25, &vars);

    async fn attempts(apps: &[Arc<TestApp>], names: Vec<String>, ip: &str) -> (usize, usize) {
        let tasks: Vec<_> = names
            .into_iter()
            .enumerate()
            .map(|(i, name)| {
                let (app, ip) = (apps[i % apps.len()].clone(), ip.to_string());
                tokio::spawn(async move {
                    app.request("POST", "/login")
                        .with_source_ip(&ip)
                        .json(json!({"name": name, "password": "wrong-password"}))
                        .send()
                        .await
                })
            })
            .collect();
        let (mut checked, mut limited) = (0, 0);
        for task in tasks {
            let r = task.await.unwrap();
            match r.status {
                401 => checked += 1,
                429 => {
                    r.assert_error(429, "rate_limited");
                    limited += 1;
                }
                other => panic!("unexpected {other}: {}", r.text),
            }
        }
        (checked, limited)
    }

    let (checked, limited) = attempts(&apps, vec!["target".into(); 50], "203.0.113.1").await;
    assert!(
        checked <= 5,
        "{checked} of 50 were checked against the password"
    );
    assert_eq!(checked + limited, 50);
    let names = (0..50).map(|i| format!("name{i}")).collect();
    let (checked, limited) = attempts(&apps, names, "203.0.113.2").await;
    assert!(
        checked <= 5,
        "{checked} of 50 names were tried from one address"
    );
    assert_eq!(checked + limited, 50);
}

/// The three counters: a stranger's guesses from other addresses do not lock the user out of
/// her own address until `LOGIN_MAX_FAILURES_PER_NAME`; an IPv6 client counts by its /64.
#[sqlx::test(migrator = "common::db::MIGRATOR")]
async fn login_failures_are_counted_three_ways(pool: PgPool) {
    let app = TestApp::with_env(
        pool,
        &[
            ("LOGIN_MAX_FAILURES", "2"),
            ("LOGIN_MAX_FAILURES_PER_NAME", "6"),
            ("LOGIN_MAX_FAILURES_PER_ADDRESS", "4"),
        ],
    );
    app.register("carol").await;
    app.register("dave").await;
    let login = |name: &'static str, password: &'static str, ip: &'static str| {
        app.request("POST", "/login")
            .with_source_ip(ip)
            .json(json!({"name": name, "password": password}))
            .send()
    };
    // Two failures lock carol from that address only. (An attempt counts in all three counters;
    // one refused by a limit, and a success, give their count back to the others.)
    for _ in 0..2 {
        login("carol", "wrong-password", "198.51.100.1")
            .await
            .assert_error(401, "invalid_credentials");
    }
    login("carol", PASSWORD, "198.51.100.1")
        .await
        .assert_error(429, "rate_limited");
    assert_eq!(login("carol", PASSWORD, "192.0.2.10").await.status, 200);
    // A stranger's failures from other addresses: with these four the name has seen six.
    for ip in [
        "198.51.100.2",
        "198.51.100.2",
        "198.51.100.3",
        "198.51.100.3",
    ] {
        login("carol", "wrong-password", ip)
            .await
            .assert_error(401, "invalid_credentials");
    }
    login("carol", PASSWORD, "192.0.2.10")
        .await
        .assert_error(429, "rate_limited");
    // One IPv6 /64 is one address: four names, four addresses of the prefix.
    for (name, ip) in [
        ("name1", "2001:db8:7:7::1"),
        ("name2", "2001:db8:7:7::2"),
        ("name3", "2001:db8:7:7:ffff::3"),
        ("name4", "2001:db8:7:7::4"),
    ] {
        login(name, "wrong-password", ip)
            .await
            .assert_error(401, "invalid_credentials");
    }
    login("dave", PASSWORD, "2001:db8:7:7::99")
        .await
        .assert_error(429, "rate_limited");
    assert_eq!(login("dave", PASSWORD, "2001:db8:7:8::1").await.status, 200);
}

/// One address hammering a name is locked after `LOGIN_MAX_FAILURES`, and its refused attempts
/// do not count toward the name's limit for every address: the user still logs in from her own.
#[sqlx::test(migrator = "common::db::MIGRATOR")]
async fn one_address_cannot_lock_a_name_for_everyone(pool: PgPool) {
    let app = TestApp::with_env(
        pool.clone(),
        &[
            ("LOGIN_MAX_FAILURES", "3"),
            ("LOGIN_MAX_FAILURES_PER_NAME", "10"),
        ],
    );
    app.register("gina").await;
    let mut statuses = Vec::new();
    for _ in 0..30 {
        let r = app
            .request("POST", "/login")
            .with_source_ip("203.0.113.66")
            .json(json!({"name": "gina", "password": "wrong-password"}))
            .send()
            .await;
        statuses.push(r.status);
    }
    assert_eq!(statuses[..3], [401, 401, 401]);
    assert!(statuses[3..].iter().all(|s| *s == 429), "{statuses:?}");
    let r = app
        .request("POST", "/login")
        .with_source_ip("192.0.2.44")
        .json(json!({"name": "gina", "password": PASSWORD}))
        .send()
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let name_count: i32 = sqlx::query_scalar(
        "SELECT attempts FROM rate_limits WHERE bucket = 'login_name' AND key = 'gina'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(name_count, 3, "only the checked guesses count for the name");
}

/// Send quotas: per sender per window, per recipient in messages and bytes, never raced, and
/// room made at once by a confirmation or an expiry.
#[sqlx::test(migrator = "common::db::MIGRATOR")]
async fn send_quotas(pool: PgPool) {
    let vars = [
        ("SEND_MAX_PER_WINDOW", "3"),
        ("SEND_WINDOW_SECONDS", "60"),
        ("MAX_PENDING_PER_RECIPIENT", "5"),
        ("MAX_PENDING_BYTES_PER_RECIPIENT", "100"),
        ("REGISTER_MAX_PER_ADDRESS", "1000"),
    ];
    let app = TestApp::with_env(pool.clone(), &vars);
    let (alice, alice_token) = app.user("alice").await;
    let (bob, bob_token) = app.user("bob").await;

    // The sender's rate: the 4th in the window is refused, and not stored.
    for _ in 0..3 {
        assert_eq!(send(&app, &alice_token, &bob, b"x", None).await.status, 201);
    }
    let r = send(&app, &alice_token, &bob, b"x", None).await;
    r.assert_error(429, "rate_limited");
    let retry: u64 = r.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry), "{retry}");
    let stored = |pool: PgPool| async move {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM messages")
            .fetch_one(&pool)
            .await
            .unwrap()
    };
    assert_eq!(stored(pool.clone()).await, 3);
    // A retry of a stored request is a replay, not a new send: it passes a spent quota.
    sqlx::query("DELETE FROM rate_limits")
        .execute(&pool)
        .await
        .unwrap();
    assert_eq!(
        send(&app, &alice_token, &bob, b"k", Some("k")).await.status,
        201
    );
    for _ in 0..3 {
        send(&app, &alice_token, &bob, b"y", None).await;
    }
    let replay = send(&app, &alice_token, &bob, b"k", Some("k")).await;
    assert_eq!(
        (
            replay.status,
            replay.headers.contains_key("idempotent-replayed")
        ),
        (201, true)
    );

    // Bob's mailbox is full (5: "x" three times, "k", one "y"; the next "y" was mailbox_full).
    // A confirmation makes room for one, and of 20 senders at once on 20 instances exactly
    // one gets in.
    sqlx::query("DELETE FROM rate_limits")
        .execute(&pool)
        .await
        .unwrap();
    let pending = |pool: PgPool, bob: String| async move {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM messages WHERE recipient_id = $1::uuid AND NOT is_delivered",
        )
        .bind(bob)
        .fetch_one(&pool)
        .await
        .unwrap()
    };
    assert_eq!(pending(pool.clone(), bob.clone()).await, 5);
    let page = app
        .request("GET", "/messages")
        .bearer(&bob_token)
        .send()
        .await;
    let first = page.body["messages"][0]["id"].as_str().unwrap().to_string();
    confirm_batch(&app, &bob_token, json!([first])).await;
    let mut tokens = Vec::new();
    for i in 0..20 {
        tokens.push(app.user(&format!("sender{i}")).await.1);
    }
    let apps = instances(&pool, 20, &vars);
    let tasks: Vec<_> = tokens
        .into_iter()
        .zip(apps)
        .map(|(token, app)| {
            let bob = bob.clone();
            tokio::spawn(async move { send(&app, &token, &bob, b"z", None).await })
        })
        .collect();
    let mut statuses = Vec::new();
    for task in tasks {
        let r = task.await.unwrap();
        if r.status == 429 {
            r.assert_error(429, "mailbox_full");
            assert!(r.headers.contains_key("retry-after"));
        }
        statuses.push(r.status);
    }
    assert_eq!(
        statuses.iter().filter(|s| **s == 201).count(),
        1,
        "{statuses:?}"
    );
    assert_eq!(pending(pool.clone(), bob.clone()).await, 5);

    // A confirmation makes room at once; so does an expiry, before any purge.
    let page = app
        .request("GET", "/messages")
        .bearer(&bob_token)
        .send()
        .await;
    let first = page.body["messages"][0]["id"].as_str().unwrap().to_string();
    confirm_batch(&app, &bob_token, json!([first])).await;
    let carol = app.user("carol").await.1;
    assert_eq!(send(&app, &carol, &bob, b"c", None).await.status, 201);
    send(&app, &carol, &bob, b"c", None)
        .await
        .assert_error(429, "mailbox_full");
    sqlx::query("UPDATE messages SET expires_at = now() - interval '1 second', \"timestamp\" = now() - interval '2 seconds' WHERE recipient_id = $1::uuid")
        .bind(&bob)
        .execute(&pool)
        .await
        .unwrap();
    assert_eq!(send(&app, &carol, &bob, b"c", None).await.status, 201);

    // Bytes: 100 per recipient; 60 + 41 does not fit, 60 + 40 does.
    let dave = app.user("dave").await.1;
    assert_eq!(send(&app, &dave, &alice, &[1; 60], None).await.status, 201);
    send(&app, &dave, &alice, &[1; 41], None)
        .await
        .assert_error(429, "mailbox_full");
    assert_eq!(send(&app, &dave, &alice, &[1; 40], None).await.status, 201);
}

/// `DELETE /me`: the password is required (and counted as a login attempt); the account, its
/// key and every message to or from it go at once; its tokens die; the name is free again.
#[sqlx::test(migrator = "common::db::MIGRATOR")]
async fn deleting_an_account(pool: PgPool) {
    let app = TestApp::with_env(pool.clone(), &[("LOGIN_MAX_FAILURES", "3")]);
    let (erin, erin_token) = app.user("erin").await;
    let (frank, frank_token) = app.user("frank").await;
    send(&app, &erin_token, &frank, b"to frank", None).await;
    send(&app, &frank_token, &erin, b"to erin", None).await;
    let delete = |token: &str, password: &str| {
        app.request("DELETE", "/me")
            .bearer(token)
            .json(json!({ "password": password }))
            .send()
    };

    app.request("DELETE", "/me")
        .json(json!({"password": PASSWORD}))
        .send()
        .await
        .assert_error(401, "unauthorized");
    let r = delete(&erin_token, "wrong-password").await;
    r.assert_error(401, "invalid_credentials");
    assert_eq!(r.headers["www-authenticate"], "Bearer");
    delete(&erin_token, "short")
        .await
        .assert_error(422, "validation_failed");
    app.request("DELETE", "/me")
        .bearer(&erin_token)
        .json(json!({}))
        .send()
        .await
        .assert_error(422, "validation_failed");

    let r = delete(&erin_token, PASSWORD).await;
    assert_eq!(r.status, 204, "{}", r.text);
    for (method, path) in [("GET", "/me"), ("GET", "/messages")] {
        app.request(method, path)
            .bearer(&erin_token)
            .send()
            .await
            .assert_error(401, "unauthorized");
    }
    delete(&erin_token, PASSWORD)
        .await
        .assert_error(401, "unauthorized");
    let left: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM messages WHERE sender_id = $1::uuid OR recipient_id = $1::uuid",
    )
    .bind(&erin)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(left, 0, "no message to or from the account is left");
    let page = app
        .request("GET", "/messages")
        .bearer(&frank_token)
        .send()
        .await;
    assert_eq!(
        page.body["messages"],
        json!([]),
        "undelivered mail from erin is gone too"
    );
    app.request("GET", &format!("/public-key/{erin}"))
        .bearer(&frank_token)
        .send()
        .await
        .assert_error(404, "not_found");
    // The name is free again, and wrong passwords count toward the login limit.
    let (_, new_token) = app.user("ERIN").await;
    for _ in 0..3 {
        delete(&new_token, "wrong-password")
            .await
            .assert_error(401, "invalid_credentials");
    }
    app.request("POST", "/login")
        .json(json!({"name": "erin", "password": PASSWORD}))
        .send()
        .await
        .assert_error(429, "rate_limited");
    delete(&new_token, PASSWORD)
        .await
        .assert_error(429, "rate_limited");
}

/// A successful login re-hashes a password hashed at another cost, so after a change of
/// `BCRYPT_COST` every known name converges on the cost unknown names are checked at.
#[sqlx::test(migrator = "common::db::MIGRATOR")]
async fn a_login_rehashes_at_the_configured_cost(pool: PgPool) {
    TestApp::new(pool.clone()).register("grace").await;
    let cost = |pool: PgPool| async move {
        sqlx::query_scalar::<_, String>("SELECT substr(hashed_password, 1, 7) FROM users")
            .fetch_one(&pool)
            .await
            .unwrap()
    };
    assert_eq!(cost(pool.clone()).await, "$2b$04$");
    let raised = TestApp::with_env(pool.clone(), &[("BCRYPT_COST", "5")]);
    raised.login("grace").await;
    assert_eq!(cost(pool.clone()).await, "$2b$05$");
    raised.login("grace").await;
}

/// Names compare without the database's locale: in a Turkish collation `lower('I')` is not
/// `i`, but `Iris` and `iris` are still one name.
#[sqlx::test(migrator = "common::db::MIGRATOR")]
async fn names_compare_without_the_locale(pool: PgPool) {
    let app = TestApp::new(pool);
    app.register("Iris").await;
    let r = app
        .request("POST", "/register")
        .json(json!({"name": "iris", "password": PASSWORD, "public_key": crate::support::key("ed25519.pem")}))
        .send()
        .await;
    r.assert_error(409, "conflict");
    app.login("IRIS").await;
}

/// 1,000 requests on one warm instance in the deployed configuration (no statement cache, one
/// connection): no prepared statement is left on its connection and the backend does not grow.
/// With sqlx 0.9's persistent queries every execution left a named statement behind.
#[sqlx::test(migrator = "common::db::MIGRATOR")]
async fn no_statement_is_left_on_the_connection(pool: PgPool) {
    let app = TestApp::new(pool);
    let (_, token) = app.user("henry").await;
    async fn backend(app: &TestApp) -> (i32, i64, i64) {
        app.state
            .db
            .query_as(
                "SELECT pg_backend_pid(), (SELECT count(*) FROM pg_prepared_statements), \
                 (SELECT sum(total_bytes)::bigint FROM pg_backend_memory_contexts)",
            )
            .fetch_one(app.state.pool())
            .await
            .unwrap()
    }
    for _ in 0..100 {
        app.request("GET", "/me").bearer(&token).send().await;
    }
    let (pid, _, warm_bytes) = backend(&app).await;
    // LEAK_REQUESTS=20000 for the figure in docs/PERFORMANCE.md (1,000 in make test).
    let requests: usize = std::env::var("LEAK_REQUESTS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(1000);
    for i in 0..requests {
        let path = ["/me", "/health/ready", "/messages?limit=5"][i % 3];
        let r = app.request("GET", path).bearer(&token).send().await;
        assert_eq!(r.status, 200, "{}", r.text);
    }
    let (same_pid, statements, bytes) = backend(&app).await;
    println!(
        "{requests} requests on one connection: {statements} prepared statements left, \
         backend memory {warm_bytes} -> {bytes} bytes"
    );
    assert_eq!(pid, same_pid, "one connection served every request");
    assert_eq!(statements, 0, "prepared statements left on the connection");
    assert!(
        bytes - warm_bytes < 1024 * 1024,
        "the backend grew by {} bytes over {requests} requests",
        bytes - warm_bytes
    );
}

/// One stranger cannot fill a mailbox that others need: with MAX_PENDING_FROM_ONE_SENDER=5 of
/// MAX_PENDING_PER_RECIPIENT=8, a stranger sending 30 at once from 10 instances gets 5 stored
/// and the rest `mailbox_full`; a friend then still delivers, up to the mailbox's own cap.
#[sqlx::test(migrator = "common::db::MIGRATOR")]
async fn one_sender_cannot_fill_a_mailbox(pool: PgPool) {
    let vars = [
        ("MAX_PENDING_FROM_ONE_SENDER", "5"),
        ("MAX_PENDING_PER_RECIPIENT", "8"),
    ];
    let app = TestApp::with_env(pool.clone(), &vars);
    let (bob, _) = app.user("bob").await;
    let (_, stranger) = app.user("stranger").await;
    let (_, friend) = app.user("friend").await;

    let apps = instances(&pool, 10, &vars);
    let mut racing = Vec::new();
    for (i, app) in apps.into_iter().enumerate() {
        let (token, bob) = (stranger.clone(), bob.clone());
        racing.push(tokio::spawn(async move {
            let mut statuses = Vec::new();
            for n in 0..3 {
                let data = format!("spam {i} {n}");
                let r = send(&app, &token, &bob, data.as_bytes(), None).await;
                if r.status == 429 {
                    assert_eq!(r.error_code(), "mailbox_full", "{}", r.text);
                    assert!(r.headers.contains_key("retry-after"));
                }
                statuses.push(r.status);
            }
            statuses
        }));
    }
    let mut stored = 0;
    for r in racing {
        for status in r.await.unwrap() {
            assert!(status == 201 || status == 429, "{status}");
            stored += usize::from(status == 201);
        }
    }
    assert_eq!(stored, 5, "the stranger's share of bob's mailbox");
    for n in 0..3 {
        let r = send(&app, &friend, &bob, format!("hello {n}").as_bytes(), None).await;
        assert_eq!(r.status, 201, "{}", r.text);
    }
    send(&app, &friend, &bob, b"one too many", None)
        .await
        .assert_error(429, "mailbox_full");
}
