//! The mailbox counters of `send_envelopes()` (migrations/20261204000007): a send reads its
//! quotas from counters kept under the device lock, and counts the mail only when a counter says
//! full. The quotas must still mean what API.md says (undelivered, unexpired mail), under
//! concurrency, whatever made the mail smaller since the counters were set.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde_json::{Value, json};
use sqlx::PgPool;
use uuid::Uuid;

use crate::support::{PASSWORD, TestApp, TestResponse};

async fn send(app: &TestApp, token: &str, to: &str, data: &[u8]) -> TestResponse {
    app.request("POST", "/messages")
        .bearer(token)
        .json(json!({"recipient_id": to, "encrypted_data": BASE64.encode(data)}))
        .send()
        .await
}

/// Sends `count` messages of `data`; every one must be stored.
async fn send_stored(app: &TestApp, token: &str, to: &str, data: &[u8], count: usize) {
    for _ in 0..count {
        let r = send(app, token, to, data).await;
        assert_eq!(r.status, 201, "{}", r.text);
    }
}

/// The mail that counts against the quotas of `recipient`'s device 1: (messages, bytes), and
/// the largest share of one sender.
async fn exact_pending(pool: &PgPool, recipient: &str) -> (i64, i64, i64) {
    sqlx::query_as(
        "SELECT coalesce(sum(n), 0)::int8, coalesce(sum(b), 0)::int8, coalesce(max(n), 0)::int8 \
         FROM (SELECT count(*) AS n, sum(size) AS b FROM messages \
               WHERE recipient_id = $1::uuid AND recipient_device_id = 1 \
                 AND NOT is_delivered AND expires_at > now() \
               GROUP BY sender_id) AS shares",
    )
    .bind(recipient)
    .fetch_one(pool)
    .await
    .unwrap()
}

/// Expiry as time brings it, without the purge: every message to `recipient` is past its
/// expires_at.
async fn expire_all(pool: &PgPool, recipient: &str) {
    sqlx::query(
        "UPDATE messages SET \"timestamp\" = now() - interval '2 seconds', \
         expires_at = now() - interval '1 second' WHERE recipient_id = $1::uuid",
    )
    .bind(recipient)
    .execute(pool)
    .await
    .unwrap();
}

/// In one snapshot, a counter is never below the mail it counts (device 1 of every account):
/// the quotas are decided by the counters only when this holds.
async fn assert_counters_never_under(pool: &PgPool) {
    let under: Vec<(Uuid, i32, Option<Uuid>)> = sqlx::query_as(
        "WITH live AS (SELECT recipient_id, recipient_device_id, sender_id, size FROM messages \
                       WHERE NOT is_delivered AND expires_at > now()) \
         SELECT d.user_id, d.device_id, NULL::uuid FROM devices d \
         WHERE d.pending_messages IS NOT NULL \
           AND (d.pending_messages < (SELECT count(*) FROM live l WHERE l.recipient_id = d.user_id \
                                       AND l.recipient_device_id = d.device_id) \
             OR d.pending_bytes < (SELECT coalesce(sum(size), 0) FROM live l \
                                   WHERE l.recipient_id = d.user_id \
                                     AND l.recipient_device_id = d.device_id)) \
         UNION ALL \
         SELECT d.user_id, d.device_id, l.sender_id FROM devices d \
         JOIN live l ON l.recipient_id = d.user_id AND l.recipient_device_id = d.device_id \
         LEFT JOIN mailbox_senders s ON s.recipient_id = d.user_id \
             AND s.recipient_device_id = d.device_id AND s.sender_id = l.sender_id \
         WHERE d.pending_messages IS NOT NULL \
         GROUP BY d.user_id, d.device_id, l.sender_id, s.pending \
         HAVING coalesce(s.pending, 0) < count(*)",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    assert!(under.is_empty(), "counters below the mail: {under:?}");
}

/// Four senders on their own instances send to one mailbox while the recipient, on another,
/// fetches and confirms, and a third expires the oldest pending message and purges, over and
/// over. Throughout, the mailbox never holds more than its quotas allow, and no counter is ever
/// below the mail it counts. Afterwards, the counters far above the mail (every send added one,
/// nothing took any away), the mailbox still takes exactly its quotas: the recount decides.
#[sqlx::test(migrator = "common::db::MIGRATOR")]
async fn quotas_hold_under_concurrent_sends_confirms_and_purge(pool: PgPool) {
    const SENDERS: usize = 4;
    const EACH: usize = 40;
    let vars = [
        ("MAX_PENDING_PER_RECIPIENT", "12"),
        ("MAX_PENDING_FROM_ONE_SENDER", "5"),
    ];
    let setup = TestApp::with_env(pool.clone(), &vars);
    let (bob, bob_token) = setup.user("bob").await;
    let mut senders = Vec::new();
    for i in 0..SENDERS {
        senders.push(setup.user(&format!("sender{i}")).await.1);
    }

    let mut tasks = Vec::new();
    for (i, token) in senders.iter().cloned().enumerate() {
        let (app, bob) = (
            Arc::new(TestApp::with_env(pool.clone(), &vars)),
            bob.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut stored = 0;
            for n in 0..EACH {
                let r = send(&app, &token, &bob, format!("{i}:{n}").as_bytes()).await;
                match r.status {
                    201 => stored += 1,
                    429 => assert_eq!(r.error_code(), "mailbox_full", "{}", r.text),
                    _ => panic!("{}", r.text),
                }
            }
            stored
        }));
    }
    let running = Arc::new(AtomicBool::new(true));
    let reader = {
        let (app, token, running) = (
            TestApp::with_env(pool.clone(), &vars),
            bob_token.clone(),
            running.clone(),
        );
        tokio::spawn(async move {
            let mut confirmed = 0;
            while running.load(Ordering::Relaxed) {
                let page = app.request("GET", "/messages").bearer(&token).send().await;
                assert_eq!(page.status, 200, "{}", page.text);
                let ids: Vec<Value> = page.body["messages"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|m| m["id"].clone())
                    .collect();
                if !ids.is_empty() {
                    let r = app
                        .request("POST", "/messages/delivered")
                        .bearer(&token)
                        .json(json!({ "ids": ids }))
                        .send()
                        .await;
                    assert_eq!(r.status, 200, "{}", r.text);
                    confirmed += r.body["confirmed"].as_u64().unwrap();
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            confirmed
        })
    };
    let purger = {
        let (app, bob, running) = (
            TestApp::with_env(pool.clone(), &vars),
            bob.clone(),
            running.clone(),
        );
        tokio::spawn(async move {
            // The whole instance, not only its state: dropping it closes its pool.
            let app = app;
            let mut purged = 0;
            while running.load(Ordering::Relaxed) {
                sqlx::query(
                    "UPDATE messages SET \"timestamp\" = now() - interval '2 seconds', \
                     expires_at = now() - interval '1 second' \
                     WHERE id = (SELECT id FROM messages WHERE recipient_id = $1::uuid \
                                 AND NOT is_delivered AND expires_at > now() ORDER BY id LIMIT 1)",
                )
                .bind(&bob)
                .execute(app.state.pool())
                .await
                .unwrap();
                let report =
                    functions::purge::purge(app.state, Instant::now() + Duration::from_secs(30), 3)
                        .await
                        .unwrap();
                purged += report.messages_deleted;
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
            purged
        })
    };

    let deadline = Instant::now() + Duration::from_secs(120);
    while !tasks.iter().all(|t| t.is_finished()) {
        assert!(Instant::now() < deadline, "the senders did not finish");
        let (messages, _, largest_share) = exact_pending(&pool, &bob).await;
        assert!(messages <= 12, "{messages} pending of at most 12");
        assert!(
            largest_share <= 5,
            "{largest_share} from one sender of at most 5"
        );
        assert_counters_never_under(&pool).await;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut stored = 0;
    for task in tasks {
        stored += task.await.unwrap();
    }
    running.store(false, Ordering::Relaxed);
    let (confirmed, purged) = (reader.await.unwrap(), purger.await.unwrap());
    assert!(
        confirmed > 0 && purged > 0,
        "{stored} stored, {confirmed} confirmed, {purged} purged: both must have made room"
    );
    assert!(
        stored > 12,
        "only {stored} stored: the mailbox never made room"
    );
    assert_counters_never_under(&pool).await;

    // Everything confirmed: the counters say far more than the mailbox holds.
    let ids: Vec<Uuid> = sqlx::query_scalar(
        "SELECT id FROM messages WHERE recipient_id = $1::uuid AND NOT is_delivered",
    )
    .bind(&bob)
    .fetch_all(&pool)
    .await
    .unwrap();
    if !ids.is_empty() {
        let r = setup
            .request("POST", "/messages/delivered")
            .bearer(&bob_token)
            .json(json!({ "ids": ids }))
            .send()
            .await;
        assert_eq!(r.status, 200, "{}", r.text);
    }
    assert_eq!(exact_pending(&pool, &bob).await.0, 0);
    // The quotas, exactly: 5 from one sender, 12 in all.
    send_stored(&setup, &senders[0], &bob, b"a", 5).await;
    send(&setup, &senders[0], &bob, b"a")
        .await
        .assert_error(429, "mailbox_full");
    send_stored(&setup, &senders[1], &bob, b"b", 5).await;
    send_stored(&setup, &senders[2], &bob, b"c", 2).await;
    send(&setup, &senders[3], &bob, b"d")
        .await
        .assert_error(429, "mailbox_full");
    assert_eq!(exact_pending(&pool, &bob).await.0, 12);
    assert_counters_never_under(&pool).await;
}

/// Mail past its expiry but not yet purged counts against no quota (API.md: undelivered,
/// unexpired), nor does the mail of a sender whose account is gone: a mailbox full of either
/// refuses no send. The counters still count it (nothing takes it away from them); the recount
/// on "full" finds the mailbox empty and lets the send through.
#[sqlx::test(migrator = "common::db::MIGRATOR")]
async fn an_expired_or_orphaned_backlog_refuses_no_send(pool: PgPool) {
    let app = TestApp::with_env(
        pool.clone(),
        &[
            ("MAX_PENDING_PER_RECIPIENT", "5"),
            ("MAX_PENDING_FROM_ONE_SENDER", "3"),
            ("MAX_PENDING_BYTES_PER_RECIPIENT", "100"),
        ],
    );
    let (bob, _) = app.user("bob").await;
    let (_, carol) = app.user("carol").await;
    let (_, dave) = app.user("dave").await;
    let (_, erin) = app.user("erin").await;

    // Full three ways: carol's share, the count, then (another mailbox) the bytes.
    send_stored(&app, &carol, &bob, b"c", 3).await;
    send(&app, &carol, &bob, b"c")
        .await
        .assert_error(429, "mailbox_full");
    send_stored(&app, &dave, &bob, b"d", 2).await;
    send(&app, &erin, &bob, b"e")
        .await
        .assert_error(429, "mailbox_full");
    expire_all(&pool, &bob).await;
    send_stored(&app, &carol, &bob, b"c", 3).await;
    send_stored(&app, &erin, &bob, b"e", 2).await;
    send(&app, &dave, &bob, b"d")
        .await
        .assert_error(429, "mailbox_full");
    assert_eq!(exact_pending(&pool, &bob).await, (5, 5, 3));

    let (frank, _) = app.user("frank").await;
    send_stored(&app, &carol, &frank, &[1; 60], 1).await;
    send(&app, &dave, &frank, &[1; 41])
        .await
        .assert_error(429, "mailbox_full");
    expire_all(&pool, &frank).await;
    send_stored(&app, &dave, &frank, &[1; 100], 1).await;
    assert_eq!(exact_pending(&pool, &frank).await, (1, 100, 1));

    // The sender's account goes, and its mail with it.
    let (grace, _) = app.user("grace").await;
    let (_, heidi) = app.user("heidi").await;
    send_stored(&app, &heidi, &grace, b"h", 3).await;
    send_stored(&app, &dave, &grace, b"d", 2).await;
    let r = app
        .request("DELETE", "/me")
        .bearer(&heidi)
        .json(json!({ "password": PASSWORD }))
        .send()
        .await;
    assert_eq!(r.status, 204, "{}", r.text);
    send_stored(&app, &erin, &grace, b"e", 3).await;
    send(&app, &carol, &grace, b"c")
        .await
        .assert_error(429, "mailbox_full");
    assert_counters_never_under(&pool).await;
}

/// The common path reads the counters, not the mail: mail that reached the mailbox without a
/// send (here an INSERT of the test's own) is not seen while the counters are under their
/// limits. That is the O(1) the counters are for. When a counter says full, the mail is counted
/// exactly, which decides, and the counters take the exact figures. (Before the counters, every
/// send counted the mail, so the first send below was refused.)
#[sqlx::test(migrator = "common::db::MIGRATOR")]
async fn a_send_under_its_counters_does_not_count_the_mail(pool: PgPool) {
    let app = TestApp::with_env(pool.clone(), &[("MAX_PENDING_PER_RECIPIENT", "5")]);
    let (bob, _) = app.user("bob").await;
    let (carol_id, carol) = app.user("carol").await;
    send_stored(&app, &carol, &bob, b"c", 1).await;
    sqlx::query(
        "INSERT INTO messages (id, sender_id, recipient_id, encrypted_data, size, expires_at) \
         SELECT gen_random_uuid(), $1::uuid, $2::uuid, '\\x01', 1, now() + interval '1 day' \
         FROM generate_series(1, 10)",
    )
    .bind(&carol_id)
    .bind(&bob)
    .execute(&pool)
    .await
    .unwrap();

    // Counters at 1 (and 2 after it) of 5: stored without counting the 11 pending.
    send_stored(&app, &carol, &bob, b"c", 1).await;
    let counters = || async {
        sqlx::query_as::<_, (Option<i32>, Option<i64>, Option<i32>)>(
            "SELECT d.pending_messages, d.pending_bytes, s.pending FROM devices d \
             LEFT JOIN mailbox_senders s ON s.recipient_id = d.user_id \
                 AND s.recipient_device_id = d.device_id AND s.sender_id = $2::uuid \
             WHERE d.user_id = $1::uuid AND d.device_id = 1",
        )
        .bind(&bob)
        .bind(&carol_id)
        .fetch_one(&pool)
        .await
        .unwrap()
    };
    assert_eq!(counters().await, (Some(2), Some(2), Some(2)));

    // Said full: counted (12 pending), refused, and the counters are the exact figures.
    sqlx::query("UPDATE devices SET pending_messages = 5 WHERE user_id = $1::uuid")
        .bind(&bob)
        .execute(&pool)
        .await
        .unwrap();
    send(&app, &carol, &bob, b"c")
        .await
        .assert_error(429, "mailbox_full");
    assert_eq!(counters().await, (Some(12), Some(12), Some(12)));

    // Unknown (as every mailbox is after the migration): counted on the next send.
    for sql in [
        "UPDATE devices SET pending_messages = NULL, pending_bytes = NULL WHERE user_id = $1::uuid",
        "UPDATE messages SET is_delivered = true, encrypted_data = NULL WHERE recipient_id = $1::uuid",
    ] {
        sqlx::query(sql).bind(&bob).execute(&pool).await.unwrap();
    }
    send_stored(&app, &carol, &bob, b"c", 1).await;
    assert_eq!(counters().await, (Some(1), Some(1), Some(1)));
}
