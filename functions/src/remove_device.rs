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

use crate::credentials;

/// One call of `remove_device()` (migrations/20261204000001): the account row, then the device
/// row (the lock order), the count, and the device's undelivered mail.
pub const REMOVE_SQL: &str = "SELECT remove_device($1, $2, $3)";

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
    let name_key = credentials::caller_name_key(state, caller).await?;
    // Refused before bcrypt spends its time: the account itself is removed with DELETE /me.
    if device_id == 1 {
        return Err(ApiError::Forbidden(
            "device 1 cannot be removed: DELETE /me removes the account",
        ));
    }
    credentials::check_caller(state, &request, caller, &name_key, &password).await?;
    let outcome: String = state
        .db
        .query_scalar(REMOVE_SQL)
        .bind(caller.user_id)
        .bind(caller.device_id)
        .bind(device_id)
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
