//! The scheduled purge: deletes expired messages (and ended rate-limit windows) in bounded
//! batches, each its own short transaction, and stops before the Lambda deadline so a backlog
//! of millions is cleared over several runs without long locks or a timeout.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use common::AppState;
use serde::Serialize;

/// Rows per delete: large enough to be efficient, small enough to keep each transaction short.
pub const DEFAULT_BATCH_SIZE: i64 = 5_000;

/// Time kept free before the Lambda deadline: the run records itself and returns in it.
pub const DEADLINE_MARGIN: Duration = Duration::from_secs(10);

/// The batch's ids are collected first (an index range scan on `messages_expires_at`, skipping
/// rows another run holds), then deleted by primary key. `id IN (subquery)` let the planner pick
/// a hash join over a full scan of the table for every batch; `= ANY(ARRAY(...))` cannot.
pub const DELETE_MESSAGES_SQL: &str = r#"
DELETE FROM messages
WHERE id = ANY (ARRAY (
    SELECT id FROM messages
    WHERE expires_at <= now()
    ORDER BY expires_at
    LIMIT $1
    FOR UPDATE SKIP LOCKED
))
"#;

pub const DELETE_RATE_LIMITS_SQL: &str = r#"
DELETE FROM rate_limits
WHERE ctid = ANY (ARRAY (
    SELECT ctid FROM rate_limits
    WHERE window_start <= now() - make_interval(
        secs => CASE WHEN bucket = 'register_address' THEN $2 ELSE $3 END)
    LIMIT $1
    FOR UPDATE SKIP LOCKED
))
"#;

/// Records the run and forgets runs older than 30 days, in one statement.
const RECORD_RUN_SQL: &str = r#"
WITH forgotten AS (DELETE FROM purge_runs WHERE finished_at < now() - interval '30 days')
INSERT INTO purge_runs (started_at, finished_at, messages_deleted, rate_limits_deleted, complete)
VALUES ($1, now(), $2, $3, $4)
"#;

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct PurgeReport {
    pub messages_deleted: u64,
    pub rate_limits_deleted: u64,
    pub batches: u32,
    /// False when the deadline stopped the run before the backlog was cleared.
    pub complete: bool,
    pub duration_ms: u64,
}

/// Purges until nothing expired is left, starting a batch only while it can finish (judged by
/// twice the slowest batch so far) before `stop_by`; the next run continues where this one
/// stopped.
pub async fn purge(
    state: &AppState,
    stop_by: Instant,
    batch_size: i64,
) -> Result<PurgeReport, sqlx::Error> {
    let started = Instant::now();
    let started_at: DateTime<Utc> = Utc::now();
    let pool = state.pool();
    let config = &state.config;
    let mut report = PurgeReport {
        messages_deleted: 0,
        rate_limits_deleted: 0,
        batches: 0,
        complete: false,
        duration_ms: 0,
    };
    // Expired messages first, then ended rate-limit windows; each batch its own transaction.
    let mut slowest = Duration::ZERO;
    let mut messages_done = false;
    while Instant::now() + slowest * 2 < stop_by {
        let batch_started = Instant::now();
        let query = if messages_done {
            sqlx::query(DELETE_RATE_LIMITS_SQL)
                .bind(batch_size)
                .bind(config.register_window_seconds as f64)
                .bind(config.login_window_seconds as f64)
        } else {
            sqlx::query(DELETE_MESSAGES_SQL).bind(batch_size)
        };
        let deleted = query.execute(pool).await?.rows_affected();
        report.batches += 1;
        slowest = slowest.max(batch_started.elapsed());
        let drained = deleted < batch_size as u64;
        if messages_done {
            report.rate_limits_deleted += deleted;
            if drained {
                report.complete = true;
                break;
            }
        } else {
            report.messages_deleted += deleted;
            messages_done = drained;
        }
    }
    report.duration_ms = started.elapsed().as_millis() as u64;
    sqlx::query(RECORD_RUN_SQL)
        .bind(started_at)
        .bind(report.messages_deleted as i64)
        .bind(report.rate_limits_deleted as i64)
        .bind(report.complete)
        .execute(pool)
        .await?;
    tracing::info!(
        messages_deleted = report.messages_deleted,
        rate_limits_deleted = report.rate_limits_deleted,
        batches = report.batches,
        complete = report.complete,
        duration_ms = report.duration_ms,
        "purge"
    );
    Ok(report)
}
