//! DELETE /me: the caller erases the account, from any of its devices, with its password. The
//! devices, keys, and every message to or from the account (delivered or not), go with it in the
//! same statement (the foreign keys cascade); its tokens are refused from then on, and the name
//! is free again.

use common::AppState;
use common::domain::Password;
use common::http::{authenticate, json_body};
use common::response::no_content;
use common::runtime::HandlerResult;
use lambda_http::Request;

use crate::credentials::{self, forgiven_cte};

/// The account deleted (`$4`), and the login counters its password check raised given back, in
/// the one statement after bcrypt (`credentials::Verified::bind_forgiven` binds `$1` to `$3`).
/// A delete that lost a race with another finds no row and answers 204 all the same.
pub const DELETE_SQL: &str = concat!(forgiven_cte!(), "DELETE FROM users WHERE id = $4");

pub async fn handler(state: &AppState, request: Request) -> HandlerResult {
    let caller = authenticate(&request, state.jwt()?)?;
    let body = json_body(&request, crate::MAX_ACCOUNT_BODY_BYTES)?;
    let password = Password::parse(body.required_str("password")?)?;
    // One statement counts the attempt and finds the caller's hash, one after bcrypt deletes:
    // two round trips, the floor with bcrypt between them.
    let verified = credentials::verify_caller(state, &request, caller, &password).await?;
    verified
        .bind_forgiven(state.db.query(DELETE_SQL))
        .bind(verified.user_id)
        .execute(state.pool())
        .await?;
    Ok(no_content())
}
