//! GET /public-key/{user_id}: another user's public key.

use common::domain::parse_id;
use common::http::{authenticate, path_param};
use common::runtime::HandlerResult;
use common::{ApiError, AppState};
use lambda_http::Request;

use crate::users::{directory_entry, directory_sql};

pub const SQL: &str = directory_sql!("u.id = $2");

pub async fn handler(state: &AppState, request: Request) -> HandlerResult {
    let caller = authenticate(&request, state.jwt()?)?;
    let raw = path_param(&request, "user_id")
        .ok_or_else(|| ApiError::bad_field("user_id", "user_id is required"))?;
    let user_id = parse_id(&raw, "user_id")?;
    directory_entry(state, SQL, caller, user_id).await
}
