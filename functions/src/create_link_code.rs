//! POST /devices/link-codes: a single-use code, shown on a device the user already has, that lets
//! a new device join the account (with the password, at POST /devices). 12 characters of
//! Crockford base32 from the OS CSPRNG (60 bits), valid `LINK_CODE_TTL_SECONDS`, kept only as
//! SHA-256 of its normalised form. At most `LINK_CODES_MAX_PER_WINDOW` per account per
//! `LINK_WINDOW_SECONDS`, and none while the account is full.

use chrono::{DateTime, Utc};
use common::http::authenticate;
use common::response::json_response;
use common::runtime::HandlerResult;
use common::{ApiError, AppState};
use lambda_http::Request;
use lambda_http::http::StatusCode;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::rate_limit::Bucket;

/// Characters in a code.
pub const CODE_LEN: usize = 12;

/// Crockford's base32: the digits and the letters but I, L, O and U.
pub const ALPHABET: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";

#[derive(Debug, Serialize)]
pub struct LinkCode {
    pub code: String,
    pub expires_at: DateTime<Utc>,
}

/// The caller's device and the account's device count; then, when the account has room, the
/// attempt counted (`$4` bucket, the user id as key, `$3` window) and, under the limit (`$8`),
/// the code's hash (`$6`) stored with its expiry (`$7` seconds). One round trip: a removed
/// device's token counts nothing, a full account counts nothing.
pub const CREATE_SQL: &str = concat!(
    "WITH caller AS (SELECT u.device_count FROM users u ",
    "JOIN devices d ON d.user_id = u.id AND d.device_id = $2 WHERE u.id = $1), ",
    "attempt_keys AS (SELECT $4::text AS bucket, $1::text AS key FROM caller ",
    "WHERE caller.device_count < $5), ",
    "attempt AS (\n",
    include_str!("sql/record_attempt.sql"),
    "), code AS (INSERT INTO link_codes (user_id, code_hash, expires_at) ",
    "SELECT $1, $6, now() + make_interval(secs => $7) FROM attempt WHERE attempt.attempts <= $8 ",
    "RETURNING expires_at)\n",
    "SELECT (SELECT device_count FROM caller) AS device_count, attempt.attempts, ",
    "attempt.retry_after, code.expires_at ",
    "FROM (SELECT 1) AS one LEFT JOIN attempt ON true LEFT JOIN code ON true"
);

#[derive(sqlx::FromRow)]
struct Created {
    device_count: Option<i32>,
    attempts: Option<i32>,
    retry_after: Option<i64>,
    expires_at: Option<DateTime<Utc>>,
}

/// A fresh code. Each character takes 5 bits of one random byte: 256 is a multiple of 32, so
/// every character is uniform.
pub fn new_code() -> Result<String, ApiError> {
    let mut bytes = [0u8; CODE_LEN];
    getrandom::fill(&mut bytes).map_err(ApiError::internal)?;
    Ok(bytes
        .iter()
        .map(|b| char::from(ALPHABET[usize::from(b & 31)]))
        .collect())
}

/// A code as read back: case and hyphens ignored, and Crockford's look-alikes (I and L for 1, O
/// for 0) read as what they stand for. None when it cannot be a code (it then matches nothing).
pub fn normalise(raw: &str) -> Option<String> {
    let code: String = raw
        .chars()
        .filter(|&c| c != '-')
        .map(|c| match c.to_ascii_uppercase() {
            'I' | 'L' => '1',
            'O' => '0',
            c => c,
        })
        .collect();
    let well_formed = code.len() == CODE_LEN && code.bytes().all(|b| ALPHABET.contains(&b));
    well_formed.then_some(code)
}

/// What is stored of a normalised code.
pub fn code_hash(normalised: &str) -> Vec<u8> {
    Sha256::digest(normalised.as_bytes()).to_vec()
}

pub async fn handler(state: &AppState, request: Request) -> HandlerResult {
    let caller = authenticate(&request, state.jwt()?)?;
    let config = &state.config;
    let code = new_code()?;
    let max_devices = i32::try_from(config.max_devices_per_account).unwrap_or(i32::MAX);
    let max_codes = i32::try_from(config.link_codes_max_per_window).unwrap_or(i32::MAX);
    let created: Created = state
        .db
        .query_as(CREATE_SQL)
        .bind(caller.user_id)
        .bind(caller.device_id)
        .bind(config.link_window_seconds as f64)
        .bind(Bucket::LinkCodeAccount.as_str())
        .bind(max_devices)
        .bind(code_hash(&code))
        .bind(config.link_code_ttl_seconds as f64)
        .bind(max_codes)
        .fetch_one(state.pool())
        .await?;
    // No caller row: the token's device (or account) is gone.
    let device_count = created.device_count.ok_or(ApiError::Unauthorized)?;
    if device_count >= max_devices {
        return Err(ApiError::DeviceLimit);
    }
    if created.attempts.unwrap_or(0) > max_codes {
        return Err(ApiError::RateLimited {
            retry_after_seconds: created.retry_after.unwrap_or(1).max(1) as u64,
        });
    }
    let expires_at = created
        .expires_at
        .ok_or_else(|| ApiError::internal("link code not stored"))?;
    Ok(json_response(
        StatusCode::CREATED,
        &LinkCode { code, expires_at },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_crockford_base32() {
        let a = new_code().unwrap();
        let b = new_code().unwrap();
        assert_ne!(a, b);
        for code in [&a, &b] {
            assert_eq!(code.len(), CODE_LEN);
            assert!(code.bytes().all(|c| ALPHABET.contains(&c)), "{code}");
            assert_eq!(normalise(code).as_deref(), Some(code.as_str()));
        }
    }

    #[test]
    fn read_back_ignores_case_hyphens_and_look_alikes() {
        assert_eq!(normalise("abcd-efgh-jkmn").as_deref(), Some("ABCDEFGHJKMN"));
        assert_eq!(normalise("ABCDEFGHJKMN").as_deref(), Some("ABCDEFGHJKMN"));
        assert_eq!(normalise("ilo0-1234-5678").as_deref(), Some("110012345678"));
        for bad in [
            "",
            "ABCDEFGHJKM",
            "ABCDEFGHJKMNP",
            "ABCDEFGHJKMU",
            "ABCD EFGH JKMN",
            "ABCDEFGHJKM!",
            "ABCDEFGHJKMÉ",
        ] {
            assert_eq!(normalise(bad), None, "{bad}");
        }
        assert_eq!(code_hash("ABCDEFGHJKMN").len(), 32);
    }
}
