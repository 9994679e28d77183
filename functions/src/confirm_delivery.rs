//! PUT /messages/{id}/delivered: the recipient confirms; the ciphertext is erased at once.

use common::domain::parse_id;
use common::http::{authenticate, path_param};
use common::response::no_content;
use common::runtime::HandlerResult;
use common::{ApiError, AppState};
use lambda_http::Request;

use crate::confirm_deliveries::confirm;

pub async fn handler(state: &AppState, request: Request) -> HandlerResult {
    let caller = authenticate(&request, state.jwt()?)?;
    let raw =
        path_param(&request, "id").ok_or_else(|| ApiError::bad_field("id", "id is required"))?;
    let id = parse_id(&raw, "id")?;
    if confirm(state, caller, &[id]).await?.contains(&id) {
        Ok(no_content())
    } else {
        // Unknown, someone else's, or already purged: indistinguishable on purpose.
        Err(ApiError::NotFound("no such message"))
    }
}
