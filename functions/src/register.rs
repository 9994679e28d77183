//! POST /register: a new account with its public key.

use chrono::{DateTime, Utc};
use common::domain::{Password, PublicKeyPem, UserName};
use common::http::{client_address, json_body};
use common::response::json_response;
use common::runtime::HandlerResult;
use common::{ApiError, AppState, password};
use lambda_http::Request;
use lambda_http::http::StatusCode;
use serde::Serialize;
use uuid::Uuid;

use crate::rate_limit::Bucket;

#[derive(Debug, Serialize, sqlx::FromRow)]
pub struct Registered {
    pub id: Uuid,
    pub name: String,
    pub public_key: String,
    pub created_at: DateTime<Utc>,
}

/// Counts this attempt against the client address and checks the name, in one round trip and
/// before bcrypt spends a quarter second: floods and taken names cost the server almost nothing.
/// So a registration takes two round trips, this and the insert after bcrypt, and a refused one
/// takes one. Hashing first would fold the two into one statement, saving one round trip (about
/// 1 ms behind RDS Proxy) on a request that spends some 220 ms in bcrypt at cost 12, and would
/// make every request past the limit or for a taken name spend that bcrypt time too.
pub const PRECHECK_SQL: &str = concat!(
    "WITH attempt_keys AS (SELECT $1::text AS bucket, $2::text AS key), ",
    "attempt AS (\n",
    include_str!("sql/record_attempt.sql"),
    ")\nSELECT attempt.attempts, attempt.retry_after, ",
    "EXISTS (SELECT 1 FROM users WHERE lower(name COLLATE \"C\") = $4) AS taken FROM attempt"
);

pub const INSERT_SQL: &str = r#"
INSERT INTO users (id, name, hashed_password, public_key)
VALUES ($1, $2, $3, $4)
ON CONFLICT ((lower(name COLLATE "C"))) DO NOTHING
RETURNING id, name, public_key, created_at
"#;

pub async fn handler(state: &AppState, request: Request) -> HandlerResult {
    let body = json_body(&request, crate::MAX_ACCOUNT_BODY_BYTES)?;
    let name = UserName::parse(body.required_str("name")?)?;
    let password = Password::parse(body.required_str("password")?)?;
    let public_key = PublicKeyPem::parse(body.required_str("public_key")?)?;
    let config = &state.config;

    let address = client_address(&request);
    let (attempts, retry_after, taken): (i32, i64, bool) = state
        .db
        .query_as(PRECHECK_SQL)
        .bind(Bucket::RegisterAddress.as_str())
        .bind(address.as_str())
        .bind(config.register_window_seconds as f64)
        .bind(name.key())
        .fetch_one(state.pool())
        .await?;
    if attempts > config.register_max_per_address as i32 {
        return Err(ApiError::RateLimited {
            retry_after_seconds: retry_after.max(1) as u64,
        });
    }
    if taken {
        return Err(ApiError::Conflict("name already taken"));
    }

    let hashed = password::hash(&password, config.bcrypt_cost).await?;
    let registered: Option<Registered> = state
        .db
        .query_as(INSERT_SQL)
        .bind(Uuid::now_v7())
        .bind(name.as_str())
        .bind(&hashed)
        .bind(public_key.as_str())
        .fetch_optional(state.pool())
        .await?;
    // Another request took the name between the check and the insert.
    let registered = registered.ok_or(ApiError::Conflict("name already taken"))?;
    Ok(json_response(StatusCode::CREATED, &registered))
}
