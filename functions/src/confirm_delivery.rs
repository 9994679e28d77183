//! PUT /messages/{id}/delivered: the recipient confirms; the ciphertext is erased at once.

use common::domain::parse_id;
use common::http::{authenticate, no_content, path_param};
use common::runtime::HandlerResult;
use common::{ApiError, AppState};
use lambda_http::Request;

/// Marking delivered and erasing the ciphertext is one statement, so no delivered message's
/// content outlives the confirmation. Repeating it matches the same row again (204).
pub const CONFIRM_SQL: &str = r#"
WITH caller AS (SELECT id FROM users WHERE id = $2),
confirmed AS (
    UPDATE messages SET is_delivered = true, encrypted_data = NULL
    WHERE id = $1 AND recipient_id = (SELECT id FROM caller)
    RETURNING 1
)
SELECT EXISTS (SELECT 1 FROM caller) AS caller_exists, EXISTS (SELECT 1 FROM confirmed) AS confirmed
"#;

pub async fn handler(state: &AppState, request: Request) -> HandlerResult {
    let caller = authenticate(&request, &state.jwt)?;
    let raw =
        path_param(&request, "id").ok_or_else(|| ApiError::bad_field("id", "id is required"))?;
    let id = parse_id(&raw, "id")?;
    let (caller_exists, confirmed): (bool, bool) = sqlx::query_as(CONFIRM_SQL)
        .bind(id)
        .bind(caller)
        .fetch_one(state.pool())
        .await?;
    match (caller_exists, confirmed) {
        (false, _) => Err(ApiError::Unauthorized),
        // Unknown, someone else's, or already purged: indistinguishable on purpose.
        (true, false) => Err(ApiError::NotFound("no such message")),
        (true, true) => Ok(no_content()),
    }
}
