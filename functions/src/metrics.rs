//! GET /metrics: Prometheus text exposition. Lambda instances share no memory, so the figures
//! come from the database, in one query whose cost does not grow with the tables: exact counts
//! up to `EXACT_COUNTS_UP_TO` rows, the planner's estimates above.

use common::AppState;
use common::http::authenticate_static;
use common::runtime::HandlerResult;
use lambda_http::http::{HeaderValue, StatusCode, header};
use lambda_http::{Body, Request, Response};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

/// Counts are exact while a table holds at most this many rows (read to find out, so the cost
/// is bounded), and the planner's estimates above (see `metrics_counts()` in the migrations):
/// a scrape costs the same at ten rows and at ten million.
pub const EXACT_COUNTS_UP_TO: i32 = 1_000;

pub const SNAPSHOT_SQL: &str = r#"
SELECT
    c.users, c.messages_pending, c.messages_delivered_awaiting_expiry,
    c.messages_expired_awaiting_purge, c.oldest_pending_age_seconds, c.estimated,
    last.finished_at_epoch, last.duration_seconds, last.messages_deleted, last.complete
FROM metrics_counts($1) AS c
LEFT JOIN LATERAL (
    SELECT extract(epoch FROM finished_at)::float8 AS finished_at_epoch,
           extract(epoch FROM finished_at - started_at)::float8 AS duration_seconds,
           messages_deleted,
           complete
    FROM purge_runs ORDER BY finished_at DESC LIMIT 1
) AS last ON true
"#;

#[derive(sqlx::FromRow)]
struct Snapshot {
    users: i64,
    messages_pending: i64,
    messages_delivered_awaiting_expiry: i64,
    messages_expired_awaiting_purge: i64,
    oldest_pending_age_seconds: f64,
    estimated: bool,
    finished_at_epoch: Option<f64>,
    duration_seconds: Option<f64>,
    messages_deleted: Option<i64>,
    complete: Option<bool>,
}

pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

pub async fn handler(state: &AppState, request: Request) -> HandlerResult {
    if let Some(token) = &state.config.metrics_token {
        authenticate_static(&request, token)?;
    }
    let s: Snapshot = state
        .db
        .query_as(SNAPSHOT_SQL)
        .bind(EXACT_COUNTS_UP_TO)
        .fetch_one(state.pool())
        .await?;

    let mut registry = Registry::with_prefix("messenger");
    let int = |registry: &mut Registry, name: &str, help: &str, value: i64| {
        let gauge = Gauge::<i64>::default();
        gauge.set(value);
        registry.register(name, help, gauge);
    };
    let float = |registry: &mut Registry, name: &str, help: &str, value: f64| {
        let gauge = Gauge::<f64, AtomicU64>::default();
        gauge.set(value);
        registry.register(name, help, gauge);
    };
    int(&mut registry, "users", "Registered users", s.users);
    int(
        &mut registry,
        "messages_pending",
        "Undelivered, unexpired messages",
        s.messages_pending,
    );
    int(
        &mut registry,
        "messages_delivered_awaiting_expiry",
        "Delivered messages (ciphertext already erased) kept until expiry",
        s.messages_delivered_awaiting_expiry,
    );
    int(
        &mut registry,
        "messages_expired_awaiting_purge",
        "Expired messages the next purge will delete (never returned)",
        s.messages_expired_awaiting_purge,
    );
    int(
        &mut registry,
        "counts_estimated",
        "1 when the counts above are the planner's estimates (a table over 1,000 rows), 0 when exact",
        i64::from(s.estimated),
    );
    float(
        &mut registry,
        "oldest_pending_message_age_seconds",
        "Age of the oldest undelivered, unexpired message",
        s.oldest_pending_age_seconds,
    );
    if let Some(finished) = s.finished_at_epoch {
        float(
            &mut registry,
            "purge_last_run_timestamp_seconds",
            "When the last purge finished (Unix time)",
            finished,
        );
        float(
            &mut registry,
            "purge_last_run_duration_seconds",
            "How long the last purge ran",
            s.duration_seconds.unwrap_or(0.0),
        );
        int(
            &mut registry,
            "purge_last_run_messages_deleted",
            "Messages the last purge deleted",
            s.messages_deleted.unwrap_or(0),
        );
        int(
            &mut registry,
            "purge_last_run_complete",
            "1 when the last purge cleared everything expired, 0 when the deadline stopped it",
            i64::from(s.complete.unwrap_or(false)),
        );
    }
    let mut text = String::new();
    encode(&mut text, &registry).map_err(common::ApiError::internal)?;
    let mut response = Response::new(Body::Text(text));
    *response.status_mut() = StatusCode::OK;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE));
    Ok(response)
}
