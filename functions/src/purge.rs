//! The scheduled purge: deletes expired messages (and ended rate-limit windows) in bounded
//! batches, each its own short transaction, and stops before the Lambda deadline so a backlog
//! of millions is cleared over several runs without long locks or a timeout.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use chrono::{DateTime, Utc};
use common::AppState;
use serde::Serialize;

/// Rows per delete: large enough to be efficient, small enough to keep each transaction short.
pub const DEFAULT_BATCH_SIZE: i64 = 5_000;

/// Time left before an invocation's deadline (`Lambda-Runtime-Deadline-Ms`, Unix milliseconds).
/// `cargo lambda watch` sends the timeout itself there (e.g. 600000), a value no real deadline
/// can have, so anything before 2001 is read as the time left.
pub fn time_left(deadline_ms: u64) -> Duration {
    const YEAR_2001_MS: u64 = 978_307_200_000;
    if deadline_ms < YEAR_2001_MS {
        return Duration::from_millis(deadline_ms);
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    Duration::from_millis(deadline_ms).saturating_sub(now)
}

/// Time kept free before the Lambda deadline, to record the run and return: a quarter of the
/// time left, at most 10 s (so a 300 s run deletes for 290 s, and a 3 s run still for 2.25 s).
pub fn stop_by(time_left: Duration) -> Instant {
    let margin = (time_left / 4).min(Duration::from_secs(10));
    Instant::now() + time_left.saturating_sub(margin)
}

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

/// Ended windows, each bucket by its own window (a counter deleted before its window ends would
/// reset the limit); and expired link codes, which are few (a handful per account per hour).
pub const DELETE_RATE_LIMITS_SQL: &str = r#"
WITH expired_codes AS (DELETE FROM link_codes WHERE expires_at <= now())
DELETE FROM rate_limits
WHERE ctid = ANY (ARRAY (
    SELECT ctid FROM rate_limits
    WHERE window_start <= now() - make_interval(
        secs => CASE bucket WHEN 'register_address' THEN $2::float8
                            WHEN 'send_sender' THEN $4::float8
                            WHEN 'link_code_account' THEN $5::float8
                            WHEN 'link_failure_account' THEN $5::float8
                            WHEN 'prekey_claim_requester' THEN $6::float8
                            WHEN 'prekey_claim_target' THEN $6::float8
                            ELSE $3::float8 END)
    LIMIT $1
    FOR UPDATE SKIP LOCKED
))
"#;

/// Records the run and forgets runs older than 30 days, in one statement.
pub const RECORD_RUN_SQL: &str = r#"
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
            state
                .db
                .query(DELETE_RATE_LIMITS_SQL)
                .bind(batch_size)
                .bind(config.register_window_seconds as f64)
                .bind(config.login_window_seconds as f64)
                .bind(config.send_window_seconds as f64)
                .bind(config.link_window_seconds as f64)
                .bind(config.prekey_claim_window_seconds as f64)
        } else {
            state.db.query(DELETE_MESSAGES_SQL).bind(batch_size)
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
    state
        .db
        .query(RECORD_RUN_SQL)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_margin_is_a_quarter_of_the_time_left_at_most_ten_seconds() {
        let close = |a: Instant, b: Duration| {
            let d = a.saturating_duration_since(Instant::now());
            (b.saturating_sub(Duration::from_millis(50))..=b).contains(&d)
        };
        assert!(close(
            stop_by(Duration::from_secs(300)),
            Duration::from_secs(290)
        ));
        assert!(close(
            stop_by(Duration::from_secs(3)),
            Duration::from_millis(2250)
        ));
        assert!(close(stop_by(Duration::ZERO), Duration::ZERO));
    }

    #[test]
    fn time_left_from_a_deadline_or_the_emulators_timeout() {
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        let left = time_left(now_ms + 30_000);
        assert!(
            (Duration::from_secs(29)..=Duration::from_secs(30)).contains(&left),
            "{left:?}"
        );
        assert_eq!(time_left(now_ms - 1_000), Duration::ZERO);
        assert_eq!(time_left(600_000), Duration::from_secs(600));
    }
}
