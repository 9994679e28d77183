//! A password check that counts as a login attempt, for `POST /login`, `POST /devices`,
//! `DELETE /me` and the other requests a password authorises.
//!
//! The attempt is counted in its three buckets before bcrypt runs, in the same statement that
//! finds the user: however many attempts arrive at once, on however many instances, no more than
//! each limit are ever checked against the password. An attempt refused by one limit gives its
//! count back to the others (it guessed nothing), in that same statement, so one address locked
//! out after `LOGIN_MAX_FAILURES` cannot go on filling the name's counter for every address. A
//! success gives its provisional count back too, and clears the name-and-address counter, its
//! own: that is the one statement after bcrypt, where every request but a login writes its own
//! outcome too (the delete, the link, the removal, the new signing key: `forgiven_cte!`). So a
//! refusal or a wrong password costs one round trip and a success two, the least a check with
//! bcrypt between two statements can take.

use common::domain::Password;
use common::http::{Caller, client_address};
use common::{ApiError, AppState, password};
use lambda_http::Request;
use sqlx::Postgres;
use sqlx::postgres::PgArguments;
use sqlx::query::Query;
use uuid::Uuid;

use crate::rate_limit::Bucket;

/// Counts the attempt against the name key `$1` from the address `$2` (`count_login_attempt()`,
/// migrations/20261204000009: `$3` the limits of name and address, name, and address, `$4` the
/// window), refusing it there when a limit is passed, and finds the user by its name key (on
/// `users_name_key`) with its device `$5`: `id` is NULL when either is missing, while the hash is
/// still the user's, so an unknown device costs the same bcrypt time as a wrong password.
pub const ATTEMPT_SQL: &str = r#"
SELECT CASE WHEN d.device_id IS NOT NULL THEN u.id END AS id, u.hashed_password,
       a.buckets, a.keys, a.retry_after
FROM count_login_attempt($1, $2, $3, $4) AS a
LEFT JOIN users u ON lower(u.name COLLATE "C") = $1
LEFT JOIN devices d ON d.user_id = u.id AND d.device_id = $5
"#;

/// The same for a caller who gives its password again: the user `$1` whose device `$2` exists,
/// counted under its name key from the address `$3` (`$4` limits, `$5` window). No row, and
/// nothing counted, when the device or the account is gone: the contract's 401 `unauthorized`
/// for such a token, before anything is counted. (`MATERIALIZED`: the caller is found before
/// the count, whatever join order the planner would otherwise pick.)
pub const CALLER_ATTEMPT_SQL: &str = r#"
WITH caller AS MATERIALIZED (
    SELECT u.id, u.hashed_password, lower(u.name COLLATE "C") AS name_key
    FROM users u JOIN devices d ON d.user_id = u.id AND d.device_id = $2
    WHERE u.id = $1
)
SELECT c.id, c.hashed_password, a.buckets, a.keys, a.retry_after
FROM caller c CROSS JOIN LATERAL count_login_attempt(c.name_key, $3, $4, $5) AS a
"#;

/// The success's give-back as a CTE named `forgiven`, for the statement after bcrypt: the
/// name-and-address counter (`$3`) back to zero, the others one less, among the (`$1` bucket,
/// `$2` key) pairs the attempt counted. `Verified::bind_forgiven` binds the three.
///
/// The rows are locked first in the order the attempt gave them, which is the order
/// `count_login_attempt()` locks them in: an UPDATE alone locks in whatever order its plan
/// visits them (a hash join over the table: heap order), and a success and an attempt on the
/// same name and address could then wait for each other. PostgreSQL runs an unreferenced
/// data-modifying CTE after the main query, so these locks come after the request's own (a
/// users row, then device rows), as in every statement that gives back.
macro_rules! forgiven_cte {
    () => {
        r#"
WITH locked AS MATERIALIZED (
    SELECT r.bucket, r.key
    FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS k(bucket, key, n)
    JOIN rate_limits r ON r.bucket = k.bucket AND r.key = k.key
    ORDER BY k.n
    FOR NO KEY UPDATE OF r
), forgiven AS (
    UPDATE rate_limits AS r
    SET attempts = CASE WHEN r.bucket = $3 THEN 0 ELSE greatest(r.attempts - 1, 0) END
    FROM locked l
    WHERE r.bucket = l.bucket AND r.key = l.key
)
"#
    };
}
pub(crate) use forgiven_cte;

/// After a success: the counters given back (`forgiven_cte!`), and the hash replaced when it was
/// made at another cost (`$5`, or NULL).
pub const FORGIVE_SQL: &str = concat!(
    forgiven_cte!(),
    "UPDATE users SET hashed_password = $5 WHERE id = $4 AND $5::text IS NOT NULL"
);

/// What the statement before bcrypt counted and found.
#[derive(sqlx::FromRow)]
struct Attempt {
    id: Option<Uuid>,
    hashed_password: Option<String>,
    buckets: Vec<String>,
    keys: Vec<String>,
    retry_after: Option<i64>,
}

/// A password found right, whose success is still to be written by the request's next
/// statement: the counters the attempt raised, given back there (`forgiven_cte!`, bound by
/// `bind_forgiven`), so that the bookkeeping costs no round trip of its own.
pub struct Verified {
    pub user_id: Uuid,
    buckets: Vec<String>,
    keys: Vec<String>,
    stored_hash: String,
}

impl Verified {
    /// Binds `forgiven_cte!`'s `$1` to `$3`; the statement's own parameters follow from `$4`.
    pub fn bind_forgiven<'q>(
        &'q self,
        query: Query<'q, Postgres, PgArguments>,
    ) -> Query<'q, Postgres, PgArguments> {
        query
            .bind(&self.buckets)
            .bind(&self.keys)
            .bind(Bucket::LoginNameAddress.as_str())
    }

    /// Binds `forgiven_cte!`'s `$1` to `$3` so that it gives nothing back: for a statement that
    /// a request runs with or without a password checked before it (`PUT /keys/signing-key`).
    pub fn bind_nothing<'q>(
        query: Query<'q, Postgres, PgArguments>,
    ) -> Query<'q, Postgres, PgArguments> {
        query
            .bind(Vec::<String>::new())
            .bind(Vec::<String>::new())
            .bind(Bucket::LoginNameAddress.as_str())
    }

    /// The success written on its own (`FORGIVE_SQL`), with the hash replaced when it was made
    /// at another cost than the configured one.
    async fn forgive(self, state: &AppState, password: &Password) -> Result<Uuid, ApiError> {
        let cost = state.config.bcrypt_cost;
        let rehashed = if password::needs_rehash(&self.stored_hash, cost) {
            Some(password::hash(password, cost).await?)
        } else {
            None
        };
        self.bind_forgiven(state.db.query(FORGIVE_SQL))
            .bind(self.user_id)
            .bind(rehashed)
            .execute(state.pool())
            .await?;
        Ok(self.user_id)
    }
}

/// The login limits in `count_login_attempt()`'s order: name and address, name, address.
fn login_limits(state: &AppState) -> Vec<i32> {
    let config = &state.config;
    [
        config.login_max_failures,
        config.login_max_failures_per_name,
        config.login_max_failures_per_address,
    ]
    .iter()
    .map(|max| i32::try_from(*max).unwrap_or(i32::MAX))
    .collect()
}

/// The attempt's outcome once counted: 429 when a limit refused it (the password not looked
/// at); else the password checked against the hash, 401 `invalid_credentials` when it is wrong
/// or the user or device unknown (an unknown name is checked against a dummy hash, in the same
/// time).
async fn verify(
    state: &AppState,
    attempt: Attempt,
    password: &Password,
) -> Result<Verified, ApiError> {
    if let Some(retry_after) = attempt.retry_after {
        return Err(ApiError::RateLimited {
            retry_after_seconds: retry_after.max(1) as u64,
        });
    }
    let stored = attempt.hashed_password;
    let verified = password::verify(password, stored.clone(), state.config.bcrypt_cost).await?;
    let (true, Some(user_id), Some(stored_hash)) = (verified, attempt.id, stored) else {
        return Err(ApiError::InvalidCredentials);
    };
    Ok(Verified {
        user_id,
        buckets: attempt.buckets,
        keys: attempt.keys,
        stored_hash,
    })
}

/// The id of the user named `name_key` when `password` is theirs and `device_id` is one of its
/// devices (`POST /login`), its success written at once. Over a limit: 429 before the password
/// is looked at; a wrong password, an unknown name or an unknown device: 401
/// `invalid_credentials`, in the same time.
pub async fn check(
    state: &AppState,
    name_key: &str,
    password: &Password,
    address: &str,
    device_id: i32,
) -> Result<Uuid, ApiError> {
    verify_login(state, name_key, password, address, device_id)
        .await?
        .forgive(state, password)
        .await
}

/// `check` for a request that writes the success in its own next statement (`POST /devices`),
/// with `forgiven_cte!`: the hash is then left at its cost, for the next login to replace.
pub async fn verify_login(
    state: &AppState,
    name_key: &str,
    password: &Password,
    address: &str,
    device_id: i32,
) -> Result<Verified, ApiError> {
    let attempt: Attempt = state
        .db
        .query_as(ATTEMPT_SQL)
        .bind(name_key)
        .bind(address)
        .bind(login_limits(state))
        .bind(state.config.login_window_seconds as f64)
        .bind(device_id)
        .fetch_one(state.pool())
        .await?;
    verify(state, attempt, password).await
}

/// The caller's own password, checked as a login attempt from the request's address and
/// counted under the account's name, for a request that then writes its success itself
/// (`DELETE /me`, `DELETE /devices/{id}`, a signing-key reset). 401 `unauthorized`, nothing
/// counted, when the token's device or account is gone.
pub async fn verify_caller(
    state: &AppState,
    request: &Request,
    caller: Caller,
    password: &Password,
) -> Result<Verified, ApiError> {
    let attempt: Option<Attempt> = state
        .db
        .query_as(CALLER_ATTEMPT_SQL)
        .bind(caller.user_id)
        .bind(caller.device_id)
        .bind(client_address(request))
        .bind(login_limits(state))
        .bind(state.config.login_window_seconds as f64)
        .fetch_optional(state.pool())
        .await?;
    verify(state, attempt.ok_or(ApiError::Unauthorized)?, password).await
}
