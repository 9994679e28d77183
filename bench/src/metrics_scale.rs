//! Phase 8, `/metrics` against the size of the data: the scrape at 10 messages and at 1,000,000,
//! now (exact counts up to 1,000 rows, the planner's estimates above) and as it was (four
//! counts over the whole table). Runs last: it empties `messages`.

use std::time::Instant;

use common::AppState;
use functions::api_event::ApiEvent;

use crate::Settings;
use crate::fixture::Fixture;
use crate::handler_cost::quiesce;
use crate::report::{Samples, Table, us};
use crate::statements::timed;

/// The scrape's statement before this change (commit 9c72865): three sequential scans.
const PREVIOUS_SNAPSHOT_SQL: &str = r#"
SELECT
    (SELECT count(*) FROM users) AS users,
    (SELECT count(*) FROM messages WHERE NOT is_delivered AND expires_at > now()) AS messages_pending,
    (SELECT count(*) FROM messages WHERE is_delivered) AS messages_delivered_awaiting_expiry,
    (SELECT count(*) FROM messages WHERE expires_at <= now()) AS messages_expired_awaiting_purge,
    coalesce((SELECT extract(epoch FROM now() - min("timestamp"))::float8 FROM messages
              WHERE NOT is_delivered AND expires_at > now()), 0) AS oldest_pending_age_seconds
"#;

/// `rows` messages between the fixture's users: a third pending, a third delivered, a third
/// expired awaiting the purge; 64 bytes of ciphertext each.
async fn seed(state: &AppState, fx: &Fixture, rows: i64) {
    state
        .db
        .query(
            r#"INSERT INTO messages (id, sender_id, recipient_id, encrypted_data, size, is_delivered,
                                   "timestamp", expires_at)
               SELECT gen_random_uuid(), $1, $2,
                      CASE WHEN g % 3 = 1 THEN NULL ELSE decode(repeat('ab', 64), 'hex') END,
                      64, g % 3 = 1,
                      now() - interval '8 days' * (g % 3 = 2)::int - interval '1 second',
                      CASE WHEN g % 3 = 2 THEN now() - interval '1 day' ELSE now() + interval '7 days' END
               FROM generate_series(1, $3) AS g"#,
        )
        .bind(fx.bob)
        .bind(fx.carol)
        .bind(rows)
        .execute(state.pool())
        .await
        .expect("seeding messages");
    // What autovacuum does after such a change; the estimates read its statistics.
    state
        .db
        .query("VACUUM ANALYZE messages")
        .execute(state.pool())
        .await
        .expect("vacuum");
}

async fn previous(state: &AppState) -> f64 {
    quiesce(state.pool()).await;
    let started = Instant::now();
    state
        .db
        .query(PREVIOUS_SNAPSHOT_SQL)
        .fetch_one(state.pool())
        .await
        .expect("the previous snapshot");
    started.elapsed().as_secs_f64() * 1e6
}

pub(crate) async fn phase8(settings: &Settings, state: &'static AppState, fx: &Fixture) {
    let scrape = ApiEvent::new("GET", "/metrics");
    let mut table = Table::new(
        "8. GET /metrics against the number of messages (us; in process, deployed settings)",
        &[
            "messages",
            "now p50",
            "p99",
            "previous SQL p50",
            "runs (now / previous)",
        ],
    );
    let big: i64 = std::env::var("BENCH_METRICS_ROWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    for rows in [10, big] {
        state
            .db
            .query("TRUNCATE messages")
            .execute(state.pool())
            .await
            .expect("emptying messages");
        let started = Instant::now();
        seed(state, fx, rows).await;
        let seeded = started.elapsed();
        let n = settings.iterations / 4;
        let mut now = Vec::new();
        for i in 0..n + 20 {
            let t = timed(state, &scrape, 200).await;
            if i >= 20 {
                now.push(t);
            }
        }
        let m = if rows > 10_000 { 5 } else { n };
        let mut before = Vec::new();
        for _ in 0..m {
            before.push(previous(state).await);
        }
        let (now, before) = (Samples::from_us(now), Samples::from_us(before));
        table.row(vec![
            crate::report::bytes(rows as u64),
            us(now.p50()),
            us(now.p99()),
            us(before.p50()),
            format!("{n} / {m}"),
        ]);
        if rows > 10 {
            table.note(&format!(
                "{} rows seeded and VACUUM ANALYZEd in {:.1} s (a third each pending, delivered, expired; 64-byte ciphertext)",
                crate::report::bytes(rows as u64),
                seeded.as_secs_f64()
            ));
        }
    }
    table.note("now: metrics_counts(1000): a count of at most 1,001 rows per table, then the planner's estimates (EXPLAIN) when over; the oldest pending message from messages_pending_by_expiry");
    table.note("previous: count(*) of three predicates over the whole table and min(timestamp) of the pending (sequential scans)");
    table.print();
    let _ = state
        .db
        .query("TRUNCATE messages")
        .execute(state.pool())
        .await;
}
