//! POST /messages/devices (one envelope per device, all or nothing), per-device mailboxes, and
//! the races of a fan-out with a re-key of the recipient's device, on separate instances.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde_json::{Value, json};
use sqlx::PgPool;

use crate::support::{PASSWORD, TestApp, TestResponse};

/// A second (third, ...) device for `user`, added in SQL as a link would (the counter moves),
/// with an X25519 key made from `seed`; returns its id and a token for it.
pub async fn add_device(app: &TestApp, user: &str, seed: u8) -> (i32, String) {
    let key = functions::signatures::x25519_pem(&[seed; 32]);
    let device_id: i32 = sqlx::query_scalar(
        "WITH counter AS (
             UPDATE users SET next_device_id = next_device_id + 1, device_count = device_count + 1
             WHERE id = $1::uuid RETURNING next_device_id - 1 AS device_id)
         INSERT INTO devices (user_id, device_id, label, public_key)
         SELECT $1::uuid, device_id, 'test device', $2 FROM counter
         RETURNING device_id",
    )
    .bind(user)
    .bind(key)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    let r = app
        .request("POST", "/login")
        .json(
            json!({"name": name_of(app, user).await, "password": PASSWORD, "device_id": device_id}),
        )
        .send()
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    (
        device_id,
        r.body["access_token"].as_str().unwrap().to_string(),
    )
}

async fn name_of(app: &TestApp, user: &str) -> String {
    sqlx::query_scalar("SELECT name FROM users WHERE id = $1::uuid")
        .bind(user)
        .fetch_one(&app.pool)
        .await
        .unwrap()
}

/// {device id: key fingerprint} of a user's devices, from the directory the database keeps.
async fn fingerprints(app: &TestApp, user: &str) -> HashMap<i64, String> {
    let rows: Vec<(i32, String)> = sqlx::query_as(
        "SELECT device_id, key_fingerprint FROM devices WHERE user_id = $1::uuid ORDER BY device_id",
    )
    .bind(user)
    .fetch_all(&app.pool)
    .await
    .unwrap();
    rows.into_iter().map(|(d, f)| (i64::from(d), f)).collect()
}

fn envelopes(devices: &[(i64, &str)], data: &str) -> Value {
    Value::Array(
        devices
            .iter()
            .map(|(device_id, fingerprint)| {
                json!({"device_id": device_id, "key_fingerprint": fingerprint,
                       "encrypted_data": BASE64.encode(format!("{data} for {device_id}"))})
            })
            .collect(),
    )
}

async fn fan_out(app: &TestApp, token: &str, to: &str, envelopes: Value) -> TestResponse {
    app.request("POST", "/messages/devices")
        .bearer(token)
        .json(json!({"recipient_id": to, "envelopes": envelopes}))
        .send()
        .await
}

async fn inbox(app: &TestApp, token: &str) -> Vec<Value> {
    let r = app.request("GET", "/messages").bearer(token).send().await;
    assert_eq!(r.status, 200, "{}", r.text);
    r.body["messages"].as_array().unwrap().clone()
}

async fn stored(app: &TestApp) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM messages")
        .fetch_one(&app.pool)
        .await
        .unwrap()
}

#[sqlx::test(migrator = "common::db::MIGRATOR")]
async fn a_fan_out_reaches_each_device_once(pool: PgPool) {
    let app = TestApp::new(pool);
    let (alice, alice_token) = app.user("alice").await;
    let (bob, bob_token) = app.user("bob").await;
    let (bob_2, bob_2_token) = add_device(&app, &bob, 9).await;
    assert_eq!(bob_2, 2);
    let prints = fingerprints(&app, &bob).await;
    let both = [(1, prints[&1].as_str()), (2, prints[&2].as_str())];

    let r = fan_out(&app, &alice_token, &bob, envelopes(&both, "hi")).await;
    assert_eq!(r.status, 201, "{}", r.text);
    assert_eq!(r.body["sender_id"], alice.as_str());
    assert_eq!(r.body["sender_device_id"], 1);
    assert_eq!(r.body["recipient_id"], bob.as_str());
    let messages = r.body["messages"].as_array().unwrap();
    assert_eq!(
        messages
            .iter()
            .map(|m| m["device_id"].as_i64().unwrap())
            .collect::<Vec<_>>(),
        [1, 2]
    );

    // Each device reads only its own envelope, with both devices named.
    for (token, device) in [(&bob_token, 1), (&bob_2_token, 2)] {
        let page = inbox(&app, token).await;
        assert_eq!(page.len(), 1, "{page:?}");
        let m = &page[0];
        assert_eq!(m["recipient_device_id"], device);
        assert_eq!(m["sender_device_id"], 1);
        assert_eq!(m["sender_id"], alice.as_str());
        assert_eq!(
            BASE64
                .decode(m["encrypted_data"].as_str().unwrap())
                .unwrap(),
            format!("hi for {device}").as_bytes()
        );
        assert_eq!(m["id"], messages[device as usize - 1]["id"]);
    }
    // One device cannot confirm the other's envelope; its own it can.
    let id_for_1 = messages[0]["id"].as_str().unwrap();
    app.request("PUT", &format!("/messages/{id_for_1}/delivered"))
        .bearer(&bob_2_token)
        .send()
        .await
        .assert_error(404, "not_found");
    let r = app
        .request("PUT", &format!("/messages/{id_for_1}/delivered"))
        .bearer(&bob_token)
        .send()
        .await;
    assert_eq!(r.status, 204, "{}", r.text);
    assert_eq!(
        inbox(&app, &bob_2_token).await.len(),
        1,
        "device 2 still has its own"
    );

    // A plain send reaches device 1 only, and says so.
    let r = app
        .request("POST", "/messages")
        .bearer(&alice_token)
        .json(json!({"recipient_id": bob, "encrypted_data": BASE64.encode("plain")}))
        .send()
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    assert_eq!(
        (
            r.body["sender_device_id"].as_i64(),
            r.body["recipient_device_id"].as_i64()
        ),
        (Some(1), Some(1))
    );
    assert_eq!(inbox(&app, &bob_2_token).await.len(), 1);

    // Sent from bob's device 2: the recipient sees which device sealed it.
    let alice_prints = fingerprints(&app, &alice).await;
    let r = fan_out(
        &app,
        &bob_2_token,
        &alice,
        envelopes(&[(1, &alice_prints[&1])], "back"),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.text);
    assert_eq!(r.body["sender_device_id"], 2);
    assert_eq!(inbox(&app, &alice_token).await[0]["sender_device_id"], 2);
}

#[sqlx::test(migrator = "common::db::MIGRATOR")]
async fn a_changed_device_list_stores_nothing(pool: PgPool) {
    let app = TestApp::with_env(pool, &[("MAX_PENDING_PER_RECIPIENT", "2")]);
    let (_, alice_token) = app.user("alice").await;
    let (bob, _) = app.user("bob").await;
    add_device(&app, &bob, 9).await;
    let prints = fingerprints(&app, &bob).await;
    let (one, two) = (prints[&1].as_str(), prints[&2].as_str());

    // (envelopes given, [missing, extra, stale] expected)
    type Case<'a> = (&'a [(i64, &'a str)], [&'a [i64]; 3]);
    let cases: [Case; 4] = [
        (&[(1, one)], [&[2], &[], &[]]),
        (&[(1, one), (2, two), (7, two)], [&[], &[7], &[]]),
        (&[(1, one), (2, one)], [&[], &[], &[2]]),
        (&[(2, one), (5, one)], [&[1], &[5], &[2]]),
    ];
    for (given, [missing, extra, stale]) in cases {
        let r = fan_out(&app, &alice_token, &bob, envelopes(given, "x")).await;
        r.assert_error(409, "devices_changed");
        assert_eq!(r.body["missing"], json!(missing), "{}", r.text);
        assert_eq!(r.body["extra"], json!(extra), "{}", r.text);
        assert_eq!(r.body["stale"], json!(stale), "{}", r.text);
        let devices = r.body["devices"].as_array().unwrap();
        assert_eq!(devices.len(), 2);
        assert_eq!(devices[1]["device_id"], 2);
        assert_eq!(devices[1]["key_fingerprint"], two);
        assert!(
            devices[1]["public_key"]
                .as_str()
                .unwrap()
                .starts_with("-----BEGIN PUBLIC KEY-----")
        );
        assert!(devices[1]["key_updated_at"].is_string());
    }
    // Upper-case fingerprints are the same fingerprints.
    let upper = (one.to_uppercase(), two.to_uppercase());
    let r = fan_out(
        &app,
        &alice_token,
        &bob,
        envelopes(&[(1, &upper.0), (2, &upper.1)], "x"),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.text);
    assert_eq!(stored(&app).await, 2);

    // Refused before the device list is read: empty, repeated, malformed, oversized.
    for bad in [
        json!([]),
        envelopes(&[(1, one), (1, one)], "x"),
        envelopes(
            &[
                (1, one),
                (2, two),
                (3, two),
                (4, two),
                (5, two),
                (6, two),
                (7, two),
            ],
            "x",
        ),
        json!([{"device_id": 0, "key_fingerprint": one, "encrypted_data": "eA=="}]),
        json!([{"device_id": 1, "key_fingerprint": "abc", "encrypted_data": "eA=="}]),
        json!([{"device_id": 1, "key_fingerprint": one, "encrypted_data": ""}]),
        json!([{"device_id": 1, "key_fingerprint": one}]),
    ] {
        fan_out(&app, &alice_token, &bob, bad)
            .await
            .assert_error(422, "validation_failed");
    }
    for bad in [
        json!([{"device_id": "1", "key_fingerprint": one, "encrypted_data": "eA=="}]),
        json!([{"device_id": 1.5, "key_fingerprint": one, "encrypted_data": "eA=="}]),
        json!(["x"]),
        json!({"device_id": 1}),
    ] {
        fan_out(&app, &alice_token, &bob, bad)
            .await
            .assert_error(400, "bad_request");
    }
    // One envelope too large: 413, and the other is not stored either.
    let big = BASE64.encode(vec![7u8; 65_537]);
    let r = fan_out(
        &app,
        &alice_token,
        &bob,
        json!([{"device_id": 1, "key_fingerprint": one, "encrypted_data": "eA=="},
               {"device_id": 2, "key_fingerprint": two, "encrypted_data": big}]),
    )
    .await;
    r.assert_error(413, "payload_too_large");
    // Device 2's mailbox full (MAX_PENDING_PER_RECIPIENT=2 per device): nothing for device 1.
    let r = fan_out(
        &app,
        &alice_token,
        &bob,
        envelopes(&[(1, one), (2, two)], "y"),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.text);
    sqlx::query("UPDATE messages SET is_delivered = true, encrypted_data = NULL WHERE recipient_device_id = 1")
        .execute(&app.pool)
        .await
        .unwrap();
    let before = stored(&app).await;
    fan_out(
        &app,
        &alice_token,
        &bob,
        envelopes(&[(1, one), (2, two)], "z"),
    )
    .await
    .assert_error(429, "mailbox_full");
    assert_eq!(stored(&app).await, before, "all or nothing");
    // An unknown recipient.
    fan_out(
        &app,
        &alice_token,
        &uuid::Uuid::now_v7().to_string(),
        envelopes(&[(1, one)], "x"),
    )
    .await
    .assert_error(404, "not_found");
}

#[sqlx::test(migrator = "common::db::MIGRATOR")]
async fn a_users_own_send_reaches_her_other_devices(pool: PgPool) {
    let app = TestApp::new(pool);
    let (alice, alice_token) = app.user("alice").await;
    // A lone device has nobody to copy: the list would be empty (422); device 1 itself is extra.
    let mine = fingerprints(&app, &alice).await;
    fan_out(&app, &alice_token, &alice, json!([]))
        .await
        .assert_error(422, "validation_failed");
    let r = fan_out(
        &app,
        &alice_token,
        &alice,
        envelopes(&[(1, &mine[&1])], "x"),
    )
    .await;
    r.assert_error(409, "devices_changed");
    assert_eq!(r.body["extra"], json!([1]));
    assert_eq!(r.body["devices"].as_array().unwrap().len(), 1);

    let (_, laptop_token) = add_device(&app, &alice, 11).await;
    let mine = fingerprints(&app, &alice).await;
    let r = fan_out(
        &app,
        &alice_token,
        &alice,
        envelopes(&[(2, &mine[&2])], "note"),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.text);
    let page = inbox(&app, &laptop_token).await;
    assert_eq!(page.len(), 1);
    assert_eq!(
        (
            page[0]["sender_device_id"].as_i64(),
            page[0]["recipient_device_id"].as_i64()
        ),
        (Some(1), Some(2))
    );
    assert!(
        inbox(&app, &alice_token).await.is_empty(),
        "the sending device gets no copy"
    );
}

#[sqlx::test(migrator = "common::db::MIGRATOR")]
async fn fan_out_retries_answer_the_same_ids(pool: PgPool) {
    let app = TestApp::new(pool.clone());
    let (_, alice_token) = app.user("alice").await;
    let (bob, _) = app.user("bob").await;
    add_device(&app, &bob, 9).await;
    let prints = fingerprints(&app, &bob).await;
    let both = envelopes(&[(1, &prints[&1]), (2, &prints[&2])], "once");
    let send = |app: Arc<TestApp>, key: &'static str, body: Value| {
        let (token, bob) = (alice_token.clone(), bob.clone());
        async move {
            app.request("POST", "/messages/devices")
                .bearer(&token)
                .header("idempotency-key", key)
                .json(json!({"recipient_id": bob, "envelopes": body}))
                .send()
                .await
        }
    };
    let app = Arc::new(app);
    let first = send(app.clone(), "fan-1", both.clone()).await;
    assert_eq!(first.status, 201, "{}", first.text);
    let again = send(app.clone(), "fan-1", both.clone()).await;
    assert_eq!(again.status, 201);
    assert_eq!(again.headers["idempotent-replayed"], "true");
    assert_eq!(again.body, first.body, "the same ids, field for field");
    // A third device since: a retry is still the same request, not a devices_changed.
    add_device(&app, &bob, 12).await;
    let later = send(app.clone(), "fan-1", both.clone()).await;
    assert_eq!(later.body, first.body, "{}", later.text);
    // The same key for other content, or as a plain send: another request.
    send(
        app.clone(),
        "fan-1",
        envelopes(&[(1, &prints[&1]), (2, &prints[&2])], "other"),
    )
    .await
    .assert_error(422, "idempotency_key_reused");
    app.request("POST", "/messages")
        .bearer(&alice_token)
        .header("idempotency-key", "fan-1")
        .json(json!({"recipient_id": bob, "encrypted_data": BASE64.encode("once for 1")}))
        .send()
        .await
        .assert_error(422, "idempotency_key_reused");

    // 12 retries at once on 12 instances: one set of rows, one set of ids.
    let prints = fingerprints(&app, &bob).await;
    let all = envelopes(
        &[(1, &prints[&1]), (2, &prints[&2]), (3, &prints[&3])],
        "raced",
    );
    let racing: Vec<_> = (0..12)
        .map(|_| {
            tokio::spawn(send(
                Arc::new(TestApp::new(pool.clone())),
                "fan-race",
                all.clone(),
            ))
        })
        .collect();
    let mut bodies = Vec::new();
    for r in racing {
        let r = r.await.unwrap();
        assert_eq!(r.status, 201, "{}", r.text);
        bodies.push(r.body);
    }
    assert!(
        bodies
            .iter()
            .all(|b| b["messages"] == bodies[0]["messages"])
    );
    let rows: i64 =
        sqlx::query_scalar("SELECT count(*) FROM messages WHERE idempotency_key = 'fan-race'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(rows, 3);
}

/// The same key sent at the same instant to two recipients, from many instances: one request
/// is stored, every other answer is a replay of it or 422, never a second message.
#[sqlx::test(migrator = "common::db::MIGRATOR")]
async fn one_key_to_two_recipients_at_once_stores_one(pool: PgPool) {
    let app = TestApp::new(pool.clone());
    let (_, alice_token) = app.user("alice").await;
    let (bob, _) = app.user("bob").await;
    let (carol, _) = app.user("carol").await;
    for round in 0..10 {
        let key = format!("both-{round}");
        let racing: Vec<_> = [&bob, &carol, &bob, &carol]
            .into_iter()
            .map(|to| {
                let (app, token, to, key) = (
                    TestApp::new(pool.clone()),
                    alice_token.clone(),
                    to.clone(),
                    key.clone(),
                );
                tokio::spawn(async move {
                    app.request("POST", "/messages")
                        .bearer(&token)
                        .header("idempotency-key", &key)
                        .json(json!({"recipient_id": to, "encrypted_data": BASE64.encode("same")}))
                        .send()
                        .await
                        .status
                })
            })
            .collect();
        for r in racing {
            let status = r.await.unwrap();
            assert!(status == 201 || status == 422, "{status}");
        }
        let rows: i64 =
            sqlx::query_scalar("SELECT count(*) FROM messages WHERE idempotency_key = $1")
                .bind(&key)
                .fetch_one(&pool)
                .await
                .unwrap();
        assert_eq!(rows, 1, "round {round}");
    }
}

/// Senders on 8 instances fan out to bob's two devices while device 2 is re-keyed 16 times on
/// another instance. A send sealed to a key is stored wholly while that key is current, or
/// answered 409 (then resent to the key the 409 names): on device 2 envelopes come in key order
/// (ids follow commit order per mailbox), most keys got some, and no request stored half of
/// itself. (The removal race below is the sharper test of the lock: there a send that
/// did not wait for it leaves mail for a removed device.)
#[sqlx::test(migrator = "common::db::MIGRATOR")]
async fn a_fan_out_racing_a_re_key_is_before_or_after_it(pool: PgPool) {
    const REKEYS: usize = 16;
    let app = TestApp::new(pool.clone());
    let (_, alice_token) = app.user("alice").await;
    let (bob, _) = app.user("bob").await;
    let (_, bob_2_token) = add_device(&app, &bob, 9).await;
    let prints = fingerprints(&app, &bob).await;
    let (one, first) = (prints[&1].clone(), prints[&2].clone());
    let done = Arc::new(AtomicBool::new(false));

    let mut senders = Vec::new();
    for sender in 0..8 {
        let app = TestApp::with_env(pool.clone(), &[("SEND_MAX_PER_WINDOW", "100000")]);
        let (token, bob, one, first, done) = (
            alice_token.clone(),
            bob.clone(),
            one.clone(),
            first.clone(),
            done.clone(),
        );
        senders.push(tokio::spawn(async move {
            let mut fingerprint = first;
            let mut sent = 0;
            // Until the last re-key is done, and 10 sends past it.
            let mut after = 0;
            for n in 0..20_000 {
                let data = BASE64.encode(format!("{fingerprint} {sender} {n}"));
                let body = json!([
                    {"device_id": 1, "key_fingerprint": one, "encrypted_data": data},
                    {"device_id": 2, "key_fingerprint": fingerprint, "encrypted_data": data},
                ]);
                let r = fan_out(&app, &token, &bob, body).await;
                match r.status {
                    201 => sent += 1,
                    409 => {
                        assert_eq!(r.body["stale"], json!([2]), "{}", r.text);
                        fingerprint = r.body["devices"][1]["key_fingerprint"]
                            .as_str()
                            .unwrap()
                            .to_string();
                    }
                    other => panic!("{other}: {}", r.text),
                }
                if done.load(Ordering::SeqCst) {
                    after += 1;
                    if after == 10 {
                        break;
                    }
                }
            }
            sent
        }));
    }
    // The re-keys, on their own instance, while the senders run.
    let rekeyer = TestApp::new(pool.clone());
    let mut generations = vec![first];
    for k in 0..REKEYS {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let new_key = functions::signatures::x25519_pem(&[42 + k as u8; 32]);
        let r = rekeyer
            .request("PUT", "/update-key")
            .bearer(&bob_2_token)
            .json(json!({"public_key": new_key}))
            .send()
            .await;
        assert_eq!(r.status, 200, "{}", r.text);
        generations.push(fingerprints(&app, &bob).await[&2].clone());
    }
    done.store(true, Ordering::SeqCst);
    let mut total_sent = 0;
    for s in senders {
        total_sent += s.await.unwrap();
    }

    // No half request: as many envelopes on device 1 as on device 2.
    let rows: Vec<(i32, Vec<u8>)> = sqlx::query_as(
        r#"SELECT recipient_device_id, encrypted_data FROM messages
           WHERE recipient_id = $1::uuid ORDER BY id"#,
    )
    .bind(&bob)
    .fetch_all(&pool)
    .await
    .unwrap();
    let on = |d: i32| rows.iter().filter(|r| r.0 == d).count();
    assert_eq!((on(1), on(2)), (total_sent, total_sent));
    // Each envelope of device 2 by the generation of the key it was sealed to.
    let generation_of = |data: &[u8]| {
        let fingerprint = String::from_utf8_lossy(&data[..64]).to_string();
        generations
            .iter()
            .position(|f| *f == fingerprint)
            .expect("a key of device 2")
    };
    let mut seen = vec![0; generations.len()];
    let mut last = 0;
    for (_, data) in rows.iter().filter(|r| r.0 == 2) {
        let g = generation_of(data);
        seen[g] += 1;
        assert!(
            g >= last,
            "an envelope for an older key committed after a newer one"
        );
        last = g;
    }
    // The senders met the re-keys: envelopes for several keys, the last among them (a key
    // replaced within 50 ms may get none on a loaded machine).
    assert!(
        seen.iter().filter(|n| **n > 0).count() >= REKEYS / 2 && seen[REKEYS] > 0,
        "keys used: {seen:?}"
    );
}

/// Senders on 8 instances fan out to all of bob's devices while devices are linked and removed
/// (DELETE /devices/{id}) on another instance. A send either comes wholly before a removal (its
/// envelope for the removed device is erased with the device's mail) or after it (409, resent
/// to the list the 409 names): no mail is ever left for a removed device, and every envelope of
/// a 201 for a device that still exists is there.
#[sqlx::test(migrator = "common::db::MIGRATOR")]
async fn a_fan_out_racing_a_removal_leaves_no_mail_for_it(pool: PgPool) {
    const ROUNDS: u8 = 12;
    let app = TestApp::new(pool.clone());
    let (_, alice_token) = app.user("alice").await;
    let (bob, bob_token) = app.user("bob").await;
    let done = Arc::new(AtomicBool::new(false));

    let mut senders = Vec::new();
    for sender in 0..8 {
        let app = TestApp::with_env(pool.clone(), &[("SEND_MAX_PER_WINDOW", "100000")]);
        let (token, bob, done) = (alice_token.clone(), bob.clone(), done.clone());
        let mut devices: Vec<(i64, String)> = fingerprints(&app, &bob).await.into_iter().collect();
        senders.push(tokio::spawn(async move {
            let mut stored = Vec::new();
            let mut after = 0;
            for n in 0..20_000 {
                let list: Vec<(i64, &str)> =
                    devices.iter().map(|(d, f)| (*d, f.as_str())).collect();
                let r = fan_out(
                    &app,
                    &token,
                    &bob,
                    envelopes(&list, &format!("{sender} {n}")),
                )
                .await;
                match r.status {
                    201 => stored.extend(r.body["messages"].as_array().unwrap().iter().map(|m| {
                        (
                            m["device_id"].as_i64().unwrap(),
                            m["id"].as_str().unwrap().to_string(),
                        )
                    })),
                    409 => {
                        devices = r.body["devices"]
                            .as_array()
                            .unwrap()
                            .iter()
                            .map(|d| {
                                let id = d["device_id"].as_i64().unwrap();
                                (id, d["key_fingerprint"].as_str().unwrap().to_string())
                            })
                            .collect();
                    }
                    other => panic!("{other}: {}", r.text),
                }
                if done.load(Ordering::SeqCst) {
                    after += 1;
                    if after == 10 {
                        break;
                    }
                }
            }
            stored
        }));
    }
    // Link a device, let the senders find it, remove it; again.
    let remover = TestApp::new(pool.clone());
    let mut removed = Vec::new();
    for round in 0..ROUNDS {
        let (device, _) = add_device(&app, &bob, 100 + round).await;
        tokio::time::sleep(std::time::Duration::from_millis(40)).await;
        let r = remover
            .request("DELETE", &format!("/devices/{device}"))
            .bearer(&bob_token)
            .json(json!({"password": PASSWORD}))
            .send()
            .await;
        assert_eq!(r.status, 204, "{}", r.text);
        removed.push(device);
    }
    done.store(true, Ordering::SeqCst);
    let mut stored = Vec::new();
    for s in senders {
        stored.extend(s.await.unwrap());
    }

    let left: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM messages WHERE recipient_id = $1::uuid AND recipient_device_id = ANY($2)",
    )
    .bind(&bob)
    .bind(&removed)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(left, 0, "mail left for a removed device");
    let to_removed = stored
        .iter()
        .filter(|(d, _)| removed.contains(&(*d as i32)))
        .count();
    assert!(
        to_removed > 0,
        "the senders reached the short-lived devices"
    );
    let kept: Vec<String> = stored
        .iter()
        .filter(|(d, _)| !removed.contains(&(*d as i32)))
        .map(|(_, id)| id.clone())
        .collect();
    let present: i64 = sqlx::query_scalar("SELECT count(*) FROM messages WHERE id::text = ANY($1)")
        .bind(&kept)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(
        present as usize,
        kept.len(),
        "an envelope of a 201 is missing"
    );
}
