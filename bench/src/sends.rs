//! Phase 6, what a send costs now: `POST /messages` through `send_envelopes()` (the replay check,
//! the sender's rate upsert, the recipient device's row lock, the mailbox count, the insert and the
//! cursor update) against the single INSERT it replaced, both bare on the same connection, at an
//! empty mailbox and at one of 10,000 pending messages.

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

async fn send_now(state: &AppState, from: Uuid, to: Uuid, data: &[u8]) -> f64 {
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
    functions::send_message::send(state, sender, to, false, vec![envelope], None, None)
        .await
        .expect("send_envelopes() stored the message");
    started.elapsed().as_secs_f64() * 1e6
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

    // The mailbox count reads the recipient's pending entries from the index: a full mailbox.
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
    let m = (n / 5).max(10);
    let (mut now, mut before) = (Vec::new(), Vec::new());
    for i in 0..m + 20 {
        let a = send_now(state, fx.alice, full, &fx.ciphertext).await;
        let b = send_before(state, fx.alice, full, &fx.ciphertext).await;
        if i >= 20 {
            now.push(a);
            before.push(b);
        }
    }
    for (what, v) in [
        ("bare SQL, send_envelopes()", now),
        ("bare SQL, the previous INSERT", before),
    ] {
        let s = Samples::from_us(v);
        table.row(vec![
            what.into(),
            "10,000 pending".into(),
            us(s.p50()),
            us(s.p99()),
        ]);
    }
    table.note("send_envelopes() (plain send): sender's row lock and device, replay check (no key here), sender-rate upsert, FOR NO KEY UPDATE on the recipient device's row, count, bytes and per-sender count of its pending mail from messages_pending_by_device, insert, cursor update; one round trip");
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
