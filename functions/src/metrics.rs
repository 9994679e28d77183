//! GET /metrics: Prometheus text exposition. Lambda instances share no memory, so the figures
//! come from the database, in one query.

use common::AppState;
use common::http::authenticate_static;
use common::runtime::HandlerResult;
use lambda_http::http::{HeaderValue, StatusCode, header};
use lambda_http::{Body, Request, Response};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

pub const SNAPSHOT_SQL: &str = r#"
SELECT
    (SELECT count(*) FROM users) AS users,
    (SELECT count(*) FROM messages WHERE NOT is_delivered AND expires_at > now()) AS messages_pending,
    (SELECT count(*) FROM messages WHERE is_delivered) AS messages_delivered_awaiting_expiry,
    (SELECT count(*) FROM messages WHERE expires_at <= now()) AS messages_expired_awaiting_purge,
    coalesce((SELECT extract(epoch FROM now() - min("timestamp"))::float8 FROM messages
              WHERE NOT is_delivered AND expires_at > now()), 0) AS oldest_pending_age_seconds,
    last.finished_at_epoch, last.duration_seconds, last.messages_deleted, last.complete
FROM (SELECT 1) AS one
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
