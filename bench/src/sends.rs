//! Phase 6, what a send costs now: `POST /messages` through `send_envelopes()` (the replay check,
//! the sender's rate upsert, the recipient device's row lock, the quotas from the mailbox's
//! counters, the insert, the cursor and counter update) against the single INSERT it replaced,
//! both bare on the same connection, at an empty mailbox and at one of 10,000 pending messages,
//! and the ratio of the two (issue 21: a send costs the same whatever the mailbox holds).

use std::time::Instant;

use common::AppState;
use functions::api_event::ApiEvent;
use serde_json::json;
use uuid::Uuid;

use crate::Settings;
use crate::fixture::{Fixture, fresh_name, register};
use crate::handler_cost::quiesce;
use crate::report::{Samples, Table, us};
use crate::statements::timed;

/// `POST /messages` before the delivery guarantees (commit 5576fcc): one statement, no quota,
/// no lock, no cursor. It still runs on today's schema (the new columns have defaults).
pub(crate) const PREVIOUS_INSERT_SQL: &str = r#"
INSERT INTO messages (id, sender_id, recipient_id, encrypted_data, "timestamp", expires_at)
SELECT $1, $2, u.id, $4, now(), now() + make_interval(secs => $5)
FROM users u WHERE u.id = $3
RETURNING id, sender_id, recipient_id, "timestamp", expires_at
"#;

/// One send through `send_envelopes()`: (microseconds, the stored message's id).
async fn send_timed(state: &AppState, from: Uuid, to: Uuid, data: &[u8]) -> (f64, Uuid) {
    quiesce(state.pool()).await;
    let started = Instant::now();
    let envelope = functions::send_message::Envelope {
        device_id: 1,
        key_fingerprint: None,
        ciphertext: data.to_vec(),
    };
    let sender = common::http::Caller {
        user_id: from,
        device_id: 1,
    };
    let delivered =
        functions::send_message::send(state, sender, to, false, vec![envelope], None, None)
            .await
            .expect("send_envelopes() stored the message");
    (
        started.elapsed().as_secs_f64() * 1e6,
        delivered.messages[0].1,
    )
}

async fn send_now(state: &AppState, from: Uuid, to: Uuid, data: &[u8]) -> f64 {
    send_timed(state, from, to, data).await.0
}

/// The recipient's confirmation of `id`, untimed, so its mailbox stays empty.
async fn confirm(state: &AppState, id: Uuid) {
    state
        .db
        .query("UPDATE messages SET is_delivered = true, encrypted_data = NULL WHERE id = $1")
        .bind(id)
        .execute(state.pool())
        .await
        .expect("confirming");
}

async fn send_before(state: &AppState, from: Uuid, to: Uuid, data: &[u8]) -> f64 {
    quiesce(state.pool()).await;
    let started = Instant::now();
    state
        .db
        .query(PREVIOUS_INSERT_SQL)
        .bind(Uuid::now_v7())
        .bind(from)
        .bind(to)
        .bind(data)
        .bind(state.config.message_ttl_seconds as f64)
        .fetch_one(state.pool())
        .await
        .expect("the previous INSERT");
    started.elapsed().as_secs_f64() * 1e6
}

pub(crate) async fn phase6(
    settings: &Settings,
    state: &'static AppState,
    state4: &'static AppState,
    fx: &Fixture,
) {
    let n = (settings.iterations / 2).max(10);
    let warmup = (n / 10).max(20);
    let mut table = Table::new(
        &format!(
            "6. POST /messages (1 KiB): send_envelopes() against the previous single INSERT (us; in process, deployed settings, interleaved, {n} iterations)"
        ),
        &["what", "mailbox", "p50", "p99"],
    );
    // A recipient of its own, starting empty.
    let to = register(state4, &fresh_name("dave")).await;
    let request = ApiEvent::new("POST", "/messages")
        .bearer(&fx.alice_token)
        .json(json!({"recipient_id": to, "encrypted_data": fx.ciphertext_b64}));
    let (mut handler, mut now, mut before) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..warmup + n {
        let h = timed(state, &request, 201).await;
        let a = send_now(state, fx.alice, to, &fx.ciphertext).await;
        let b = send_before(state, fx.alice, to, &fx.ciphertext).await;
        if i >= warmup {
            handler.push(h);
            now.push(a);
            before.push(b);
        }
    }
    let grown = 3 * (warmup + n);
    for (what, v) in [
        ("handler, POST /messages (send_envelopes())", handler),
        ("bare SQL, send_envelopes()", now),
        ("bare SQL, the previous INSERT", before),
    ] {
        let s = Samples::from_us(v);
        table.row(vec![
            what.into(),
            format!("0 to {grown}"),
            us(s.p50()),
            us(s.p99()),
        ]);
    }

    // A mailbox of 10,000 pending against one kept empty (each message confirmed after its
    // send, untimed), interleaved so the machine's noise falls on both alike. The 10,000 are
    // inserted without a send: the mailbox's counters are unknown until its first send, which
    // counts them (in the warm-up) as the first send after the migration does.
    let empty = register(state4, &fresh_name("erin")).await;
    let full = register(state4, &fresh_name("erin")).await;
    state
        .db
        .query(
            "INSERT INTO messages (id, sender_id, recipient_id, encrypted_data, size, expires_at) \
             SELECT gen_random_uuid(), $1, $2, $3, octet_length($3), now() + interval '7 days' \
             FROM generate_series(1, 10000)",
        )
        .bind(fx.alice)
        .bind(full)
        .bind(fx.ciphertext.as_slice())
        .execute(state.pool())
        .await
        .expect("filling a mailbox");
    state
        .db
        .query("VACUUM ANALYZE messages")
        .execute(state.pool())
        .await
        .expect("vacuum");
    let m = (n / 2).max(10);
    let (mut at_empty, mut at_full, mut before) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..m + 20 {
        let (e, id) = send_timed(state, fx.alice, empty, &fx.ciphertext).await;
        confirm(state, id).await;
        let a = send_now(state, fx.alice, full, &fx.ciphertext).await;
        let b = send_before(state, fx.alice, full, &fx.ciphertext).await;
        if i >= 20 {
            at_empty.push(e);
            at_full.push(a);
            before.push(b);
        }
    }
    let (at_empty, at_full) = (Samples::from_us(at_empty), Samples::from_us(at_full));
    for (what, mailbox, s) in [
        ("bare SQL, send_envelopes()", "0 pending", &at_empty),
        ("bare SQL, send_envelopes()", "10,000 pending", &at_full),
        (
            "bare SQL, the previous INSERT",
            "10,000 pending",
            &Samples::from_us(before),
        ),
    ] {
        table.row(vec![what.into(), mailbox.into(), us(s.p50()), us(s.p99())]);
    }
    let ratio = at_full.p50() / at_empty.p50();
    table.note(&format!(
        "send_envelopes() p50: {} at 0 pending, {} at 10,000 pending: {ratio:.2}x ({})",
        us(at_empty.p50()),
        us(at_full.p50()),
        if ratio <= 1.10 {
            "within 10%: the same cost whatever the mailbox holds"
        } else {
            "more than 10% apart"
        }
    ));
    table.note("send_envelopes() (plain send): sender's row lock and device, replay check (no key here), sender-rate upsert, FOR NO KEY UPDATE on the recipient device's row, the quotas from its counters and the sender's share (mailbox_senders), insert, cursor and counter update; one round trip. The mail is counted (messages_pending_by_device) only when a counter is unknown or says full");
    table.note("0 pending: each message confirmed (untimed) after its send; 10,000 pending: grows by one per send");
    table.note("the previous INSERT: one statement, no quota, no lock (commit 5576fcc's SQL on today's schema and indexes); the bench lifts the quotas' limits, not their counting");
    table.print();
    fan_out(state, state4, fx, n, warmup).await;
}

/// `POST /messages/devices` to a recipient with 1, 2 and 6 devices against a plain
/// `POST /messages`, through the handler, interleaved: what a message to every device costs.
async fn fan_out(
    state: &'static AppState,
    state4: &'static AppState,
    fx: &Fixture,
    n: usize,
    warmup: usize,
) {
    let mut table = Table::new(
        &format!(
            "6b. POST /messages/devices (1 KiB per device) against POST /messages (us; handler, in process, deployed settings, interleaved, {n} iterations)"
        ),
        &["what", "devices", "p50", "p99", "per device p50"],
    );
    let mut requests = vec![(
        "POST /messages".to_string(),
        1,
        ApiEvent::new("POST", "/messages")
            .bearer(&fx.alice_token)
            .json(json!({"recipient_id": fx.carol, "encrypted_data": fx.ciphertext_b64})),
    )];
    for devices in [1, 2, 6] {
        let to = register(state4, &fresh_name("frank")).await;
        // Devices 2.. as a link makes them (the counter moves), with distinct X25519 keys.
        for device in 2..=devices {
            let key = functions::signatures::x25519_pem(&[device as u8 + 40; 32]);
            state
                .db
                .query(
                    "WITH counter AS (UPDATE users SET next_device_id = next_device_id + 1, \
                     device_count = device_count + 1 WHERE id = $1 RETURNING next_device_id - 1 AS d) \
                     INSERT INTO devices (user_id, device_id, label, public_key) \
                     SELECT $1, d, 'bench', $2 FROM counter",
                )
                .bind(to)
                .bind(key)
                .execute(state.pool())
                .await
                .expect("a device");
        }
        let prints: Vec<(i32, String)> = state
            .db
            .query_as("SELECT device_id, key_fingerprint FROM devices WHERE user_id = $1 ORDER BY device_id")
            .bind(to)
            .fetch_all(state.pool())
            .await
            .expect("the devices");
        let envelopes: Vec<_> = prints
            .iter()
            .map(|(device_id, fingerprint)| {
                json!({"device_id": device_id, "key_fingerprint": fingerprint,
                       "encrypted_data": fx.ciphertext_b64})
            })
            .collect();
        requests.push((
            "POST /messages/devices".to_string(),
            devices,
            ApiEvent::new("POST", "/messages/devices")
                .bearer(&fx.alice_token)
                .json(json!({"recipient_id": to, "envelopes": envelopes})),
        ));
    }
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); requests.len()];
    for i in 0..warmup + n {
        for (k, (_, _, request)) in requests.iter().enumerate() {
            let t = timed(state, request, 201).await;
            if i >= warmup {
                samples[k].push(t);
            }
        }
    }
    let single = Samples::from_us(samples[0].clone()).p50();
    for ((what, devices, _), v) in requests.iter().zip(samples) {
        let s = Samples::from_us(v);
        table.row(vec![
            what.clone(),
            devices.to_string(),
            us(s.p50()),
            us(s.p99()),
            format!(
                "{} ({:.2}x a plain send)",
                us(s.p50() / *devices as f64),
                s.p50() / single
            ),
        ]);
    }
    table.note("one request and one statement (send_envelopes()) whatever the number of devices: the envelopes are inserted by one INSERT ... SELECT FROM unnest(...)");
    table.print();
}
