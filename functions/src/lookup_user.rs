//! GET /users?name=<name>: find a recipient by name (any case).

use common::domain::UserName;
use common::http::{authenticate, query_param};
use common::runtime::HandlerResult;
use common::{ApiError, AppState};
use lambda_http::Request;

use crate::users::{directory_entry, directory_sql};

/// By the locale-free name key, on `users_name_key`.
pub const SQL: &str = directory_sql!(r#"lower(u.name COLLATE "C") = $2"#);

pub async fn handler(state: &AppState, request: Request) -> HandlerResult {
    let caller = authenticate(&request, state.jwt()?)?;
    let raw = query_param(&request, "name")
        .ok_or_else(|| ApiError::validation("name", "name is required"))?;
    let name = UserName::parse(&raw)?;
    directory_entry(state, SQL, caller, name.key()).await
}
