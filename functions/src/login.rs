//! POST /login: name and password (and optionally which device) for a short-lived access token.

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
    let device_id = body
        .optional_int("device_id", 1, i64::from(i32::MAX))?
        .unwrap_or(1) as i32;
    let address = client_address(&request);
    let user_id = credentials::check(state, &name.key(), &password, &address, device_id).await?;
    let token = state.jwt()?.issue(user_id, device_id as u32)?;
    Ok(json_response(
        StatusCode::OK,
        &TokenResponse {
            access_token: token.access_token,
            token_type: "bearer",
            expires_in: token.expires_in,
        },
    ))
}
