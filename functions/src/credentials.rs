//! A password check that counts as a login attempt, for `POST /login` and `DELETE /me`.
//!
//! The attempt is counted in its three buckets before bcrypt runs, in the same statement that
//! finds the user: however many attempts arrive at once, on however many instances, no more than
//! each limit are ever checked against the password. An attempt refused by one limit gives its
//! count back to the others (it guessed nothing), so one address locked out after
//! `LOGIN_MAX_FAILURES` cannot go on filling the name's counter for every address. A success
//! gives its provisional count back too, and clears the name-and-address counter, its own.

use common::domain::Password;
use common::http::{Caller, client_address};
use common::{ApiError, AppState, password};
use lambda_http::Request;
use uuid::Uuid;

use crate::rate_limit::{Bucket, name_address_key};

/// Counts the attempt (`$1` buckets, `$2` keys, `$3` window, `$4` limits) and finds the user by
/// its name key (`$5`, on `users_name_key`) with its device `$6`: `id` is NULL when either is
/// missing, while the hash is still the user's, so an unknown device costs the same bcrypt time
/// as a wrong password. `over` lists the buckets past their limit, and
/// `retry_after` is the longest wait among them.
pub const ATTEMPT_SQL: &str = concat!(
    "WITH attempt_keys AS (SELECT * FROM unnest($1::text[], $2::text[]) AS k(bucket, key)), ",
    "limits AS (SELECT * FROM unnest($1::text[], $4::int[]) AS l(bucket, max_attempts)), ",
    "attempt AS (\n",
    include_str!("sql/record_attempt.sql"),
    ")\n",
    "SELECT CASE WHEN d.device_id IS NOT NULL THEN u.id END AS id, u.hashed_password, ",
    "ARRAY (SELECT a.bucket FROM attempt a JOIN limits l USING (bucket) ",
    "WHERE a.attempts > l.max_attempts) AS over, ",
    "(SELECT max(a.retry_after) FROM attempt a JOIN limits l USING (bucket) ",
    "WHERE a.attempts > l.max_attempts) AS retry_after ",
    "FROM (SELECT 1) AS one LEFT JOIN users u ON lower(u.name COLLATE \"C\") = $5 ",
    "LEFT JOIN devices d ON d.user_id = u.id AND d.device_id = $6"
);

/// After a success: the name-and-address counter (`$3`) back to zero, the others one less; and
/// the hash replaced when it was made at another cost (`$5`, or NULL).
pub const FORGIVE_SQL: &str = r#"
WITH forgiven AS (
    UPDATE rate_limits AS r
    SET attempts = CASE WHEN r.bucket = $3 THEN 0 ELSE greatest(r.attempts - 1, 0) END
    FROM unnest($1::text[], $2::text[]) AS k(bucket, key)
    WHERE r.bucket = k.bucket AND r.key = k.key
)
UPDATE users SET hashed_password = $5 WHERE id = $4 AND $5::text IS NOT NULL
"#;

/// After a refusal: one less in each (`$1` bucket, `$2` key) given, the counters that were not
/// past their limit.
pub const GIVE_BACK_SQL: &str = r#"
UPDATE rate_limits AS r SET attempts = greatest(r.attempts - 1, 0)
FROM unnest($1::text[], $2::text[]) AS k(bucket, key)
WHERE r.bucket = k.bucket AND r.key = k.key
"#;

/// The caller's name key, which the login limits count by, while the token's device exists.
pub const CALLER_SQL: &str = r#"
SELECT lower(u.name COLLATE "C") FROM users u
JOIN devices d ON d.user_id = u.id AND d.device_id = $2
WHERE u.id = $1
"#;

/// The caller's name key; 401 when the token's device (or account) no longer exists.
pub async fn caller_name_key(state: &AppState, caller: Caller) -> Result<String, ApiError> {
    let name_key: Option<String> = state
        .db
        .query_scalar(CALLER_SQL)
        .bind(caller.user_id)
        .bind(caller.device_id)
        .fetch_optional(state.pool())
        .await?;
    name_key.ok_or(ApiError::Unauthorized)
}

/// The caller's own password, for an authenticated request that needs it too (`DELETE /me`,
/// `DELETE /devices/{id}`, a signing-key reset): checked as a login attempt from the request's
/// address, so a wrong one counts against the same limits.
pub async fn check_caller(
    state: &AppState,
    request: &Request,
    caller: Caller,
    name_key: &str,
    password: &Password,
) -> Result<(), ApiError> {
    let address = client_address(request);
    let owner = check(state, name_key, password, &address, caller.device_id).await?;
    if owner != caller.user_id {
        // The account was deleted and its name taken again while this request ran.
        return Err(ApiError::Unauthorized);
    }
    Ok(())
}

#[derive(sqlx::FromRow)]
struct Attempt {
    id: Option<Uuid>,
    hashed_password: Option<String>,
    over: Vec<String>,
    retry_after: Option<i64>,
}

/// The id of the user named `name_key` when `password` is theirs and `device_id` is one of its
/// devices. Over a limit: 429 before the password is looked at; a wrong password, an unknown
/// name or an unknown device: 401 `invalid_credentials`, in the same time.
pub async fn check(
    state: &AppState,
    name_key: &str,
    password: &Password,
    address: &str,
    device_id: i32,
) -> Result<Uuid, ApiError> {
    let config = &state.config;
    let counters = [
        (
            Bucket::LoginNameAddress,
            name_address_key(name_key, address),
            config.login_max_failures,
        ),
        (
            Bucket::LoginName,
            name_key.to_string(),
            config.login_max_failures_per_name,
        ),
        (
            Bucket::LoginAddress,
            address.to_string(),
            config.login_max_failures_per_address,
        ),
    ];
    let buckets: Vec<&str> = counters.iter().map(|(b, _, _)| b.as_str()).collect();
    let keys: Vec<&str> = counters.iter().map(|(_, k, _)| k.as_str()).collect();
    let limits: Vec<i32> = counters
        .iter()
        .map(|(_, _, max)| i32::try_from(*max).unwrap_or(i32::MAX))
        .collect();

    let attempt: Attempt = state
        .db
        .query_as(ATTEMPT_SQL)
        .bind(&buckets)
        .bind(&keys)
        .bind(config.login_window_seconds as f64)
        .bind(&limits)
        .bind(name_key)
        .bind(device_id)
        .fetch_one(state.pool())
        .await?;
    if let Some(retry_after) = attempt.retry_after {
        let (under_buckets, under_keys): (Vec<&str>, Vec<&str>) = buckets
            .iter()
            .zip(&keys)
            .filter(|(bucket, _)| !attempt.over.iter().any(|over| over == *bucket))
            .map(|(bucket, key)| (*bucket, *key))
            .unzip();
        state
            .db
            .query(GIVE_BACK_SQL)
            .bind(&under_buckets)
            .bind(&under_keys)
            .execute(state.pool())
            .await?;
        return Err(ApiError::RateLimited {
            retry_after_seconds: retry_after.max(1) as u64,
        });
    }

    let cost = config.bcrypt_cost;
    let stored = attempt.hashed_password;
    let verified = password::verify(password, stored.clone(), cost).await?;
    let (true, Some(user_id)) = (verified, attempt.id) else {
        return Err(ApiError::InvalidCredentials);
    };
    let rehashed = match stored {
        Some(hash) if password::needs_rehash(&hash, cost) => {
            Some(password::hash(password, cost).await?)
        }
        _ => None,
    };
    state
        .db
        .query(FORGIVE_SQL)
        .bind(&buckets)
        .bind(&keys)
        .bind(Bucket::LoginNameAddress.as_str())
        .bind(user_id)
        .bind(rehashed)
        .execute(state.pool())
        .await?;
    Ok(user_id)
}
