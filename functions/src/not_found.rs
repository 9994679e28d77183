//! The API's fallback (`$default` in API Gateway, the catch-all in the watch router): any path or
//! method without a route gets the contract's error body, 405 with `Allow` for a known path.

use common::ApiError;
use common::AppState;
use common::runtime::HandlerResult;
use lambda_http::Request;

use crate::routes;

pub async fn handler(_state: &AppState, request: Request) -> HandlerResult {
    match routes::find(request.method().as_str(), request.uri().path()) {
        Err(allowed) if allowed.is_empty() => Err(ApiError::NotFound("no such route")),
        Err(allowed) => Err(ApiError::MethodNotAllowed {
            allow: allowed.join(", "),
        }),
        // A routed request reached the fallback: the router and the route table disagree.
        Ok(route) => Err(ApiError::internal(format!(
            "{} {} reached the fallback instead of {}",
            route.method, route.template, route.function
        ))),
    }
}
