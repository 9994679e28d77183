//! POST /login: name and password for a short-lived access token.

use common::domain::{Password, UserName};
use common::http::{client_address, json_body, json_response};
use common::runtime::HandlerResult;
use common::{ApiError, AppState, password};
use lambda_http::Request;
use lambda_http::http::StatusCode;
use serde::Serialize;
use uuid::Uuid;

use crate::rate_limit::{self, Bucket};

#[derive(Debug, Serialize)]
pub struct TokenResponse {
    pub access_token: String,
    pub token_type: &'static str,
    pub expires_in: u64,
}

/// The user (if any) and both failure counters in their current windows, in one round trip.
pub const LOOKUP_SQL: &str = r#"
WITH failures AS (
    SELECT bucket,
           attempts,
           greatest(1, ceil(extract(epoch FROM window_start + make_interval(secs => $3) - now())))::bigint
               AS retry_after
    FROM rate_limits
    WHERE ((bucket = 'login_name' AND key = lower($1)) OR (bucket = 'login_address' AND key = $2))
      AND window_start > now() - make_interval(secs => $3)
)
SELECT u.id,
       u.hashed_password,
       coalesce((SELECT attempts FROM failures WHERE bucket = 'login_name'), 0) AS name_failures,
       coalesce((SELECT retry_after FROM failures WHERE bucket = 'login_name'), 0) AS name_retry_after,
       coalesce((SELECT attempts FROM failures WHERE bucket = 'login_address'), 0) AS address_failures,
       coalesce((SELECT retry_after FROM failures WHERE bucket = 'login_address'), 0) AS address_retry_after
FROM (SELECT 1) AS one
LEFT JOIN users u ON lower(u.name) = lower($1)
"#;

#[derive(sqlx::FromRow)]
struct Lookup {
    id: Option<Uuid>,
    hashed_password: Option<String>,
    name_failures: i32,
    name_retry_after: i64,
    address_failures: i32,
    address_retry_after: i64,
}

pub async fn handler(state: &AppState, request: Request) -> HandlerResult {
    let body = json_body(&request, crate::MAX_ACCOUNT_BODY_BYTES)?;
    let name = UserName::parse(body.required_str("name")?)?;
    let password = Password::parse(body.required_str("password")?)?;
    let config = &state.config;
    let address = client_address(&request);
    let window = config.login_window_seconds;

    let found: Lookup = sqlx::query_as(LOOKUP_SQL)
        .bind(name.as_str())
        .bind(&address)
        .bind(window as f64)
        .fetch_one(state.pool())
        .await?;

    // Locked out: refused before the password is even checked, so a right guess gains nothing.
    let mut retry_after = 0;
    if found.name_failures >= config.login_max_failures as i32 {
        retry_after = found.name_retry_after;
    }
    if found.address_failures >= config.login_max_failures_per_address as i32 {
        retry_after = retry_after.max(found.address_retry_after);
    }
    if retry_after > 0 {
        return Err(ApiError::RateLimited {
            retry_after_seconds: retry_after as u64,
        });
    }

    let verified = password::verify(&password, found.hashed_password, config.bcrypt_cost).await?;
    let name_key = name.as_str().to_ascii_lowercase();
    match (verified, found.id) {
        (true, Some(user_id)) => {
            if found.name_failures > 0 {
                sqlx::query("DELETE FROM rate_limits WHERE bucket = 'login_name' AND key = $1")
                    .bind(&name_key)
                    .execute(state.pool())
                    .await?;
            }
            let token = state.jwt.issue(user_id)?;
            Ok(json_response(
                StatusCode::OK,
                &TokenResponse {
                    access_token: token.access_token,
                    token_type: "bearer",
                    expires_in: token.expires_in,
                },
            ))
        }
        _ => {
            rate_limit::record(
                state.pool(),
                &[
                    (Bucket::LoginName, &name_key),
                    (Bucket::LoginAddress, &address),
                ],
                window,
            )
            .await?;
            Err(ApiError::InvalidCredentials)
        }
    }
}
