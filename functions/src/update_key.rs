//! PUT /update-key: re-key the token's device (device 1's key is the account's, which `GET /me`,
//! `GET /public-key` and `GET /users` show). The device's signing key, prekeys and last-resort
//! key go with the old key, unless a `binding_sig` by the current signing key binds the new key
//! to it.

use chrono::{DateTime, Utc};
use common::domain::PublicKeyPem;
use common::http::{Caller, authenticate, json_body};
use common::response::json_response;
use common::runtime::HandlerResult;
use common::{ApiError, AppState};
use lambda_http::Request;
use lambda_http::http::StatusCode;
use uuid::Uuid;

use crate::signatures::{Context, Signature, SigningKey, signed_message};
use crate::users::Profile;

/// The new key (`$3`) for device `$2` of `$1`, through `rekey_device()` (the migration): the
/// device row locked, then its signing key and prekeys kept with a binding signature (`$4`) made
/// under signing key `$5` (still the device's, or nothing changes), dropped without one.
pub const UPDATE_SQL: &str = "SELECT outcome, id, name, public_key, created_at, key_updated_at \
                              FROM rekey_device($1, $2, $3, $4, $5)";

#[derive(sqlx::FromRow)]
struct Updated {
    outcome: String,
    id: Option<Uuid>,
    name: Option<String>,
    public_key: Option<String>,
    created_at: Option<DateTime<Utc>>,
    key_updated_at: Option<DateTime<Utc>>,
}

impl Updated {
    fn profile(self) -> Option<Profile> {
        Some(Profile {
            id: self.id?,
            name: self.name?,
            public_key: self.public_key?,
            created_at: self.created_at?,
            key_updated_at: self.key_updated_at?,
        })
    }
}

pub async fn handler(state: &AppState, request: Request) -> HandlerResult {
    let caller = authenticate(&request, state.jwt()?)?;
    let body = json_body(&request, crate::MAX_ACCOUNT_BODY_BYTES)?;
    let public_key = PublicKeyPem::parse(body.required_str("public_key")?)?;
    let binding = match body.optional_str("binding_sig")? {
        Some(raw) => Some(Signature::parse("binding_sig", raw)?),
        None => None,
    };
    let signing_key = match &binding {
        Some(signature) => Some(binding_signing_key(state, caller, &public_key, signature).await?),
        None => None,
    };
    let updated: Updated = state
        .db
        .query_as(UPDATE_SQL)
        .bind(caller.user_id)
        .bind(caller.device_id)
        .bind(public_key.as_str())
        .bind(binding.map(|s| s.0.to_vec()))
        .bind(signing_key)
        .fetch_one(state.pool())
        .await?;
    match updated.outcome.as_str() {
        "updated" => updated
            .profile()
            .map(|profile| json_response(StatusCode::OK, &profile))
            .ok_or_else(|| ApiError::internal("rekey_device() answered an incomplete row")),
        "no_device" => Err(ApiError::Unauthorized),
        // The signing key changed between the check and the update: the signature no longer
        // binds the new key to the device's signing key.
        "signing_key_changed" => Err(ApiError::InvalidSignature {
            field: "binding_sig",
        }),
        other => Err(ApiError::internal(format!(
            "rekey_device() answered {other:?}"
        ))),
    }
}

/// The device's signing key (as stored) when `signature` binds `public_key` to it; otherwise
/// 422 `invalid_signature`, or 401 for a removed device.
async fn binding_signing_key(
    state: &AppState,
    caller: Caller,
    public_key: &PublicKeyPem,
    signature: &Signature,
) -> Result<String, ApiError> {
    let invalid = ApiError::InvalidSignature {
        field: "binding_sig",
    };
    let stored = crate::signatures::device_signing_key(state, caller)
        .await?
        .ok_or(invalid)?;
    let signing_key = SigningKey::parse("signing_key", &stored).map_err(ApiError::internal)?;
    let x25519 = public_key.x25519().ok_or(ApiError::InvalidSignature {
        field: "binding_sig",
    })?;
    let message = signed_message(
        Context::Bind,
        caller.user_id,
        caller.device_id,
        &[&x25519, signing_key.raw()],
    );
    if signing_key.verifies(&message, signature) {
        Ok(stored)
    } else {
        Err(ApiError::InvalidSignature {
            field: "binding_sig",
        })
    }
}
