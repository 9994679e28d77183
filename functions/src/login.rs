//! POST /login: name and password for a short-lived access token.

use common::AppState;
use common::domain::{Password, UserName};
use common::http::{client_address, json_body};
use common::response::json_response;
use common::runtime::HandlerResult;
use lambda_http::Request;
use lambda_http::http::StatusCode;
use serde::Serialize;

use crate::credentials;

#[derive(Debug, Serialize)]
pub struct TokenResponse {
    pub access_token: String,
    pub token_type: &'static str,
    pub expires_in: u64,
}

pub async fn handler(state: &AppState, request: Request) -> HandlerResult {
    let body = json_body(&request, crate::MAX_ACCOUNT_BODY_BYTES)?;
    let name = UserName::parse(body.required_str("name")?)?;
    let password = Password::parse(body.required_str("password")?)?;
    let user_id =
        credentials::check(state, &name.key(), &password, &client_address(&request)).await?;
    let token = state.jwt()?.issue(user_id)?;
    Ok(json_response(
        StatusCode::OK,
        &TokenResponse {
            access_token: token.access_token,
            token_type: "bearer",
            expires_in: token.expires_in,
        },
    ))
}
