//! POST /devices: a new device joins an account with the account's password and a link code
//! shown on one of its devices (no token: the new device has none yet). The password is checked
//! first, as a login attempt (so a wrong one is 401 whatever the code); then `link_device()`
//! (migrations/20261204000001) settles the rest under the account's row lock: the failure
//! lock-out, the code (single use, used up only by a link), the device limit, and the id from the
//! account's counter, which never hands out an id twice.

use chrono::{DateTime, Utc};
use common::domain::{Password, PublicKeyPem, UserName};
use common::http::{client_address, json_body};
use common::response::json_response;
use common::runtime::HandlerResult;
use common::{ApiError, AppState};
use lambda_http::Request;
use lambda_http::http::StatusCode;
use serde::Serialize;
use sqlx::FromRow;
use sqlx::postgres::PgRow;

use crate::create_link_code::{code_hash, normalise};
use crate::credentials::{self, forgiven_cte};

/// Longest label, in characters.
pub const MAX_LABEL_CHARS: usize = 64;

#[derive(Debug, Serialize)]
pub struct Linked {
    pub device_id: i32,
    pub label: String,
    pub public_key: String,
    pub created_at: DateTime<Utc>,
}

/// One call: lock, lock-out, code, limit, id and insert (see the function in the migration);
/// with the login counters the password check raised given back, in the one statement after
/// bcrypt (`credentials::Verified::bind_forgiven` binds `$1` to `$3`).
pub const LINK_SQL: &str = concat!(
    forgiven_cte!(),
    "SELECT outcome, device_id, created_at, retry_after ",
    "FROM link_device($4, $5, $6, $7, $8, $9, $10)"
);

#[derive(sqlx::FromRow)]
struct Outcome {
    outcome: String,
    device_id: Option<i32>,
    created_at: Option<DateTime<Utc>>,
    retry_after: i64,
}

/// A device's label: 1 to 64 characters, none of them a control character.
pub fn parse_label(raw: &str) -> Result<&str, ApiError> {
    if !(1..=MAX_LABEL_CHARS).contains(&raw.chars().count()) {
        return Err(ApiError::validation(
            "label",
            "label must be 1 to 64 characters",
        ));
    }
    if raw.chars().any(char::is_control) {
        return Err(ApiError::validation(
            "label",
            "label must not contain control characters",
        ));
    }
    Ok(raw)
}

pub async fn handler(state: &AppState, request: Request) -> HandlerResult {
    let body = json_body(&request, crate::MAX_ACCOUNT_BODY_BYTES)?;
    let name = UserName::parse(body.required_str("name")?)?;
    let password = Password::parse(body.required_str("password")?)?;
    // A code that cannot be one is simply a wrong code (403 below), never a 422: it matches
    // nothing (NULL), and still counts as a failure.
    let hash = normalise(body.required_str("link_code")?).map(|code| code_hash(&code));
    let public_key = PublicKeyPem::parse(body.required_str("public_key")?)?;
    let label = parse_label(body.required_str("label")?)?;
    let config = &state.config;

    // Device 1 exists as long as the account does. One statement counts the attempt and finds
    // the hash, one after bcrypt links: two round trips, the floor with bcrypt between them.
    let address = client_address(&request);
    let verified = credentials::verify_login(state, &name.key(), &password, &address, 1).await?;
    let outcome: Outcome = verified
        .bind_forgiven(state.db.query(LINK_SQL))
        .bind(verified.user_id)
        .bind(hash)
        .bind(label)
        .bind(public_key.as_str())
        .bind(i32::try_from(config.max_devices_per_account).unwrap_or(i32::MAX))
        .bind(i32::try_from(config.link_max_failures).unwrap_or(i32::MAX))
        .bind(config.link_window_seconds as f64)
        .try_map(|row: PgRow| Outcome::from_row(&row))
        .fetch_one(state.pool())
        .await?;
    match outcome.outcome.as_str() {
        "linked" => {
            let incomplete = || ApiError::internal("link_device() answered an incomplete row");
            let linked = Linked {
                device_id: outcome.device_id.ok_or_else(incomplete)?,
                label: label.to_string(),
                public_key: public_key.as_str().to_string(),
                created_at: outcome.created_at.ok_or_else(incomplete)?,
            };
            Ok(json_response(StatusCode::CREATED, &linked))
        }
        "invalid" => Err(ApiError::LinkCodeInvalid),
        "device_limit" => Err(ApiError::DeviceLimit),
        "rate_limited" => Err(ApiError::RateLimited {
            retry_after_seconds: outcome.retry_after.max(1) as u64,
        }),
        // The account was deleted after its password was checked.
        "no_account" => Err(ApiError::InvalidCredentials),
        other => Err(ApiError::internal(format!(
            "link_device() answered {other:?}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels() {
        for ok in ["x", "Alice's phone", "日本語のラベル", &"é".repeat(64)] {
            assert_eq!(parse_label(ok).unwrap(), ok);
        }
        for bad in [
            "",
            &"x".repeat(65),
            "tab\there",
            "new\nline",
            "nul\0",
            "del\u{7f}",
            "c1\u{85}",
        ] {
            assert_eq!(parse_label(bad).unwrap_err().status(), 422, "{bad:?}");
        }
    }
}
