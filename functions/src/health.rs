//! GET /health (liveness: touches nothing) and GET /health/ready (the database answers).

use common::response::json_response;
use common::runtime::HandlerResult;
use common::{ApiError, AppState};
use lambda_http::Request;
use lambda_http::http::StatusCode;
use serde_json::json;

pub async fn handler(state: &AppState, request: Request) -> HandlerResult {
    if !request
        .uri()
        .path()
        .trim_end_matches('/')
        .ends_with("/ready")
    {
        return Ok(json_response(StatusCode::OK, &json!({"status": "ok"})));
    }
    match state.db.query("SELECT 1").execute(state.pool()).await {
        Ok(_) => Ok(json_response(
            StatusCode::OK,
            &json!({"status": "ok", "database": "ok"}),
        )),
        Err(error) => {
            let reason = common::db::short_reason(&error);
            let unavailable = ApiError::Unavailable(reason.clone());
            let mut body = unavailable.body();
            body["status"] = json!("unavailable");
            body["database"] = json!(reason);
            Ok(unavailable.response_with_body(body))
        }
    }
}
