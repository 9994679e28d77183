//! DELETE /devices/{device_id}: any device of the account removes itself or another, with the
//! account's password. At once: its undelivered mail is erased, its key and prekeys are gone, its
//! tokens are refused (every endpoint checks the token's device row). Device 1 leaves only with
//! the account (`DELETE /me`). Its id is never handed out again.

use common::domain::Password;
use common::http::{authenticate, json_body, path_param};
use common::response::no_content;
use common::runtime::HandlerResult;
use common::{ApiError, AppState};
use lambda_http::Request;
use sqlx::Row;
use sqlx::postgres::PgRow;

use crate::credentials::{self, forgiven_cte};

/// One call of `remove_device()` (migrations/20261204000001): the account row, then the device
/// row (the lock order), the count, and the device's undelivered mail; with the login counters
/// the password check raised given back, in the one statement after bcrypt
/// (`credentials::Verified::bind_forgiven` binds `$1` to `$3`).
pub const REMOVE_SQL: &str = concat!(forgiven_cte!(), "SELECT remove_device($4, $5, $6)");

/// A device id from the path: a positive whole number in the database's `integer`; anything
/// else is 400.
pub fn parse_device_id(raw: &str) -> Result<i32, ApiError> {
    raw.bytes()
        .all(|b| b.is_ascii_digit())
        .then(|| raw.parse::<i32>().ok())
        .flatten()
        .filter(|&id| id >= 1)
        .ok_or_else(|| {
            ApiError::bad_field("device_id", "device_id must be a positive whole number")
        })
}

pub async fn handler(state: &AppState, request: Request) -> HandlerResult {
    crate::routes::refuse_shadowed(&request)?;
    let caller = authenticate(&request, state.jwt()?)?;
    let raw = path_param(&request, "device_id")
        .ok_or_else(|| ApiError::bad_field("device_id", "device_id is required"))?;
    let device_id = parse_device_id(&raw)?;
    let body = json_body(&request, crate::MAX_ACCOUNT_BODY_BYTES)?;
    let password = Password::parse(body.required_str("password")?)?;
    // Refused before anything is counted or bcrypt spends its time: the account itself is
    // removed with DELETE /me. (A token whose device is gone gets its 401 from the runtime.)
    if device_id == 1 {
        return Err(ApiError::Forbidden(
            "device 1 cannot be removed: DELETE /me removes the account",
        ));
    }
    // One statement counts the attempt and finds the caller's hash, one after bcrypt removes:
    // two round trips, the floor with bcrypt between them.
    let verified = credentials::verify_caller(state, &request, caller, &password).await?;
    let outcome: String = verified
        .bind_forgiven(state.db.query(REMOVE_SQL))
        .bind(caller.user_id)
        .bind(caller.device_id)
        .bind(device_id)
        .try_map(|row: PgRow| row.try_get(0))
        .fetch_one(state.pool())
        .await?;
    match outcome.as_str() {
        "removed" => Ok(no_content()),
        "not_found" => Err(ApiError::NotFound("no such device")),
        "unauthorized" => Err(ApiError::Unauthorized),
        other => Err(ApiError::internal(format!(
            "remove_device() answered {other:?}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_ids_in_the_path() {
        for (raw, id) in [("1", 1), ("2", 2), ("007", 7), ("2147483647", i32::MAX)] {
            assert_eq!(parse_device_id(raw).unwrap(), id);
        }
        for bad in [
            "",
            "0",
            "-1",
            "+2",
            "2147483648",
            "99999999999",
            "1.0",
            "abc",
            " 2",
            "2 ",
        ] {
            assert_eq!(parse_device_id(bad).unwrap_err().status(), 400, "{bad:?}");
        }
    }
}
