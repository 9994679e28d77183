//! PUT /keys/signing-key: the token's device publishes its Ed25519 signing key (API.md
//! "Prekeys"). `binding_sig` (`sm-bind`, by the new key) proves the caller holds it and binds it
//! to the device's X25519 key. Replacing a key needs `rotation_sig` (`sm-rotate`, by the current
//! key; `signing_key_reset` becomes false) or, that key lost, the password (counted as a login;
//! `signing_key_reset` becomes true until the next rotation). Any change deletes the device's
//! prekeys and last-resort key and starts key ids afresh.
//!
//! The key the device already has, asked for again (a retried request), is a no-op: the binding
//! signature proves the caller holds it, so neither `rotation_sig` nor the password is needed or
//! checked, and the prekeys and `signing_key_reset` stay as they are.

use common::domain::Password;
use common::http::{Caller, authenticate, json_body};
use common::response::json_response;
use common::runtime::HandlerResult;
use common::{ApiError, AppState};
use lambda_http::http::StatusCode;
use lambda_http::{Body, Request, Response};
use serde::Serialize;
use sqlx::FromRow;
use sqlx::postgres::PgRow;

use crate::credentials::{self, Verified, forgiven_cte};
use crate::signatures::{Context, Signature, SigningKey, signed_message, stored_x25519};

/// The device's keys as the signatures are checked against them; no row when the token's
/// device (or account) is gone.
pub const DEVICE_SQL: &str = r#"
SELECT d.public_key, d.signing_key, d.signing_key_reset
FROM devices d
WHERE d.user_id = $1 AND d.device_id = $2
"#;

/// `set_signing_key()` (migrations/20261204000001): under the device row's lock, the keys must
/// still be the ones checked (`$6` public key, `$7` signing key seen); then the new key
/// (`$8`, `$9` binding signature, `$10` reset) and the prekeys deleted. With the login counters
/// a password check raised given back (`$1` to `$3`, empty without one), so a reset by password
/// writes its success in this statement too.
pub const SET_SQL: &str = concat!(
    forgiven_cte!(),
    "SELECT outcome, signing_key_reset ",
    "FROM set_signing_key($4, $5, $6, $7, $8, $9, $10)"
);

#[derive(sqlx::FromRow)]
struct Device {
    public_key: String,
    signing_key: Option<String>,
    signing_key_reset: bool,
}

#[derive(Debug, Serialize)]
pub struct SigningKeySet {
    pub device_id: i32,
    pub signing_key: String,
    pub signing_key_reset: bool,
}

pub async fn handler(state: &AppState, request: Request) -> HandlerResult {
    let caller = authenticate(&request, state.jwt()?)?;
    let body = json_body(&request, crate::MAX_ACCOUNT_BODY_BYTES)?;
    let signing_key = SigningKey::parse("signing_key", body.required_str("signing_key")?)?;
    let binding = Signature::parse("binding_sig", body.required_str("binding_sig")?)?;
    let rotation = body
        .optional_str("rotation_sig")?
        .map(|raw| Signature::parse("rotation_sig", raw))
        .transpose()?;
    let password = body
        .optional_str("password")?
        .map(Password::parse)
        .transpose()?;

    let device: Device = state
        .db
        .query_as(DEVICE_SQL)
        .bind(caller.user_id)
        .bind(caller.device_id)
        .fetch_optional(state.pool())
        .await?
        .ok_or(ApiError::Unauthorized)?;
    let x25519 = stored_x25519(&device.public_key).ok_or(ApiError::Conflict(
        "only a device whose public_key is X25519 can have a signing key",
    ))?;
    let bind = signed_message(
        Context::Bind,
        caller.user_id,
        caller.device_id,
        &[&x25519, signing_key.raw()],
    );
    if !signing_key.verifies(&bind, &binding) {
        return Err(ApiError::InvalidSignature {
            field: "binding_sig",
        });
    }

    let (reset, verified) = match device.signing_key.as_deref() {
        None => (false, None),
        Some(current) if current == signing_key.pem() => {
            return Ok(answer(caller, &signing_key, device.signing_key_reset));
        }
        Some(current) => {
            let replacement = Replacement {
                current,
                new: &signing_key,
                rotation,
                password,
            };
            replacement.reset(state, &request, caller).await?
        }
    };

    let set = state.db.query(SET_SQL);
    let set = match &verified {
        Some(verified) => verified.bind_forgiven(set),
        None => Verified::bind_nothing(set),
    };
    let (outcome, signing_key_reset): (String, bool) = set
        .bind(caller.user_id)
        .bind(caller.device_id)
        .bind(&device.public_key)
        .bind(device.signing_key.as_deref())
        .bind(signing_key.pem())
        .bind(binding.0.as_slice())
        .bind(reset)
        .try_map(|row: PgRow| <(String, bool)>::from_row(&row))
        .fetch_one(state.pool())
        .await?;
    match outcome.as_str() {
        "set" | "unchanged" => Ok(answer(caller, &signing_key, signing_key_reset)),
        "unauthorized" => Err(ApiError::Unauthorized),
        // Re-keyed, or given another signing key, while this request was checked: what it
        // proved is about keys the device no longer has.
        "changed" => Err(ApiError::Conflict(
            "the device's keys changed while this request ran; read them again",
        )),
        other => Err(ApiError::internal(format!(
            "set_signing_key() answered {other:?}"
        ))),
    }
}

fn answer(caller: Caller, signing_key: &SigningKey, signing_key_reset: bool) -> Response<Body> {
    json_response(
        StatusCode::OK,
        &SigningKeySet {
            device_id: caller.device_id,
            signing_key: signing_key.pem().to_string(),
            signing_key_reset,
        },
    )
}

/// A request to replace the device's `current` signing key with `new`.
struct Replacement<'a> {
    current: &'a str,
    new: &'a SigningKey,
    rotation: Option<Signature>,
    password: Option<Password>,
}

impl Replacement<'_> {
    /// The new `signing_key_reset` when the caller may replace the key: false with a rotation
    /// signature by the current key (tried first: it costs no bcrypt), true with the password,
    /// whose success the statement that sets the key writes (`Verified`).
    async fn reset(
        self,
        state: &AppState,
        request: &Request,
        caller: Caller,
    ) -> Result<(bool, Option<Verified>), ApiError> {
        if let Some(signature) = self.rotation {
            let current =
                SigningKey::parse("signing_key", self.current).map_err(ApiError::internal)?;
            let message = signed_message(
                Context::Rotate,
                caller.user_id,
                caller.device_id,
                &[self.new.raw()],
            );
            return if current.verifies(&message, &signature) {
                Ok((false, None))
            } else {
                Err(ApiError::InvalidSignature {
                    field: "rotation_sig",
                })
            };
        }
        let Some(password) = self.password else {
            return Err(ApiError::validation(
                "rotation_sig",
                "replacing a signing key needs rotation_sig (by the current key) or the password",
            ));
        };
        let verified = credentials::verify_caller(state, request, caller, &password).await?;
        Ok((true, Some(verified)))
    }
}
