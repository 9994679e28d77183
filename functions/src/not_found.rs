//! The API's fallback (`$default` in API Gateway, the catch-all in the watch router): any path or
//! method without a route gets the contract's error body, 405 with `Allow` for a known path.
//! It also answers CORS preflights, which a `$default` route receives instead of API Gateway.

use common::response::no_content;
use common::runtime::{CORS_ALLOW_HEADERS, HandlerResult};
use common::{ApiError, AppState};
use lambda_http::Request;
use lambda_http::http::{HeaderValue, Method, header};

use crate::routes;

/// How long a browser may cache a preflight answer, in seconds.
const PREFLIGHT_MAX_AGE: &str = "600";

pub async fn handler(state: &AppState, request: Request) -> HandlerResult {
    match routes::find(request.method().as_str(), request.uri().path()) {
        Err(allowed) if allowed.is_empty() => Err(ApiError::NotFound("no such route")),
        Err(allowed) if request.method() == Method::OPTIONS && is_preflight(&request) => {
            Ok(preflight(state, &request, &allowed))
        }
        Err(allowed) => Err(ApiError::MethodNotAllowed {
            allow: allowed.join(", "),
        }),
        // A routed request reached the fallback: the router and the route table disagree.
        // The client still gets the contract's 404; the mismatch goes to the log.
        Ok(route) => {
            tracing::warn!(
                route = route.template,
                function = route.function,
                "routed request reached not-found"
            );
            Err(ApiError::NotFound("no such route"))
        }
    }
}

/// A browser's CORS preflight: `OPTIONS` with `Origin` and `Access-Control-Request-Method`. Any
/// other `OPTIONS` is a method the API does not have (405).
fn is_preflight(request: &Request) -> bool {
    let headers = request.headers();
    headers.contains_key(header::ORIGIN)
        && headers.contains_key(header::ACCESS_CONTROL_REQUEST_METHOD)
}

/// 204 with `Allow`; for an allowed origin also the CORS preflight headers (the runtime adds
/// `Access-Control-Allow-Origin` itself).
fn preflight(
    state: &AppState,
    request: &Request,
    allowed: &[&str],
) -> lambda_http::Response<lambda_http::Body> {
    let mut response = no_content();
    let methods = format!("{}, OPTIONS", allowed.join(", "));
    let headers = response.headers_mut();
    if let Ok(value) = HeaderValue::from_str(&methods) {
        headers.insert(header::ALLOW, value.clone());
        let origin = request
            .headers()
            .get(header::ORIGIN)
            .and_then(|o| o.to_str().ok());
        if origin.is_some_and(|o| state.config.allows_origin(o)) {
            headers.insert(header::ACCESS_CONTROL_ALLOW_METHODS, value);
            headers.insert(
                header::ACCESS_CONTROL_ALLOW_HEADERS,
                HeaderValue::from_static(CORS_ALLOW_HEADERS),
            );

            headers.insert(
                header::ACCESS_CONTROL_MAX_AGE,
                HeaderValue::from_static(PREFLIGHT_MAX_AGE),
            );
        }
    }
    response
}
