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

use crate::credentials;

pub const DELETE_SQL: &str = "DELETE FROM users WHERE id = $1";

pub async fn handler(state: &AppState, request: Request) -> HandlerResult {
    let caller = authenticate(&request, state.jwt()?)?;
    let body = json_body(&request, crate::MAX_ACCOUNT_BODY_BYTES)?;
    let password = Password::parse(body.required_str("password")?)?;
    let name_key = credentials::caller_name_key(state, caller).await?;
    credentials::check_caller(state, &request, caller, &name_key, &password).await?;
    state
        .db
        .query(DELETE_SQL)
        .bind(caller.user_id)
        .execute(state.pool())
        .await?;
    Ok(no_content())
}
