//! The shell around every HTTP handler: state built once per instance, then per request the IAM
//! token check, the handler, error mapping, CORS, and one JSON log line.

use std::future::Future;
use std::time::Instant;

use lambda_http::http::{HeaderValue, header};
use lambda_http::request::RequestContext;
use lambda_http::{Body, Request, RequestExt, Response, service_fn};

use crate::config::Config;
use crate::error::ApiError;
use crate::state::{AppState, Tokens};

pub type HandlerResult = Result<Response<Body>, ApiError>;

/// The request headers the contract uses, which a preflight allows.
pub const CORS_ALLOW_HEADERS: &str = "authorization, content-type, idempotency-key";
/// The response headers of the contract a browser script may read.
pub const CORS_EXPOSE_HEADERS: &str = "retry-after, www-authenticate, idempotent-replayed";

/// Builds the state (failing init with a clear message when config is wrong) and serves.
///
/// `run_concurrent` (lambda_runtime's `concurrency-tokio` feature) reads
/// `AWS_LAMBDA_MAX_CONCURRENCY`: unset or 1, as on classic Lambda and under `cargo lambda watch`
/// (which sets it to 1 for every instance), it serves one request at a time, which is what the
/// pool of one connection is sized for. Plain `run` serves the same way but warns whenever the
/// variable is set at all.
pub async fn run_http<F, Fut>(
    function: &'static str,
    tokens: Tokens,
    handler: F,
) -> Result<(), lambda_http::Error>
where
    F: Fn(&'static AppState, Request) -> Fut + Copy + Send + Sync + 'static,
    Fut: Future<Output = HandlerResult> + Send + 'static,
{
    let state = init(function, tokens)?;
    lambda_http::run_concurrent(service_fn(move |request| async move {
        Ok::<_, std::convert::Infallible>(respond(function, state, request, handler).await)
    }))
    .await
}

/// Logging and state for any function (HTTP or not). The state lives as long as the instance.
pub fn init(
    function: &'static str,
    tokens: Tokens,
) -> Result<&'static AppState, lambda_http::Error> {
    crate::telemetry::init();
    match AppState::from_env(tokens) {
        Ok(state) => Ok(Box::leak(Box::new(state))),
        Err(error) => {
            tracing::error!(function, error = %error, "start-up failed");
            Err(error.into())
        }
    }
}

/// One request through `handler`, as in production; tests call this too.
pub async fn respond<F, Fut>(
    function: &'static str,
    state: &'static AppState,
    request: Request,
    handler: F,
) -> Response<Body>
where
    F: FnOnce(&'static AppState, Request) -> Fut,
    Fut: Future<Output = HandlerResult>,
{
    let started = Instant::now();
    let method = request.method().to_string();
    let route = route_of(&request);
    let request_id = request.lambda_context_ref().map(|c| c.request_id.clone());
    let origin = request.headers().get(header::ORIGIN).cloned();
    let authorization = request.headers().get(header::AUTHORIZATION).cloned();
    state.db.refresh_credentials();
    let (result, statements) = crate::db::counting_statements(handler(state, request)).await;
    let result = match result {
        Err(error) if statements == 0 && refused_before_the_caller_was_checked(&error) => {
            Err(caller_gone_or(state, authorization.as_ref(), error).await)
        }
        other => other,
    };
    let (mut response, error_code) = match result {
        Ok(response) => (response, None),
        Err(error) => {
            let code = error.code();
            (error.into_response(), Some(code))
        }
    };
    allow_origin(&state.config, origin, &mut response);
    tracing::info!(
        function,
        method,
        route,
        status = response.status().as_u16(),
        error = error_code,
        duration_ms = started.elapsed().as_secs_f64() * 1000.0,
        request_id,
        "request"
    );
    response
}

/// Whether the token's device (and so its account) still exists.
pub const DEVICE_EXISTS_SQL: &str =
    "SELECT EXISTS (SELECT 1 FROM devices WHERE user_id = $1 AND device_id = $2)";

/// A refusal other than 401 and the router's own answers, given before any statement ran (a
/// malformed body, say): nothing has checked the token's device yet. (After a statement,
/// something has: every statement of an authenticated request checks it, so a 404 or a 409 found
/// by one, or a 429, costs no second round trip.)
fn refused_before_the_caller_was_checked(error: &ApiError) -> bool {
    error.status().is_client_error()
        && !matches!(
            error,
            ApiError::Unauthorized
                | ApiError::InvalidCredentials
                | ApiError::MethodNotAllowed { .. }
        )
}

/// A token whose device or account no longer exists is 401 on every endpoint, whatever else is
/// wrong with the request (API.md "Conventions"). Each handler's statements check the device, in
/// the round trip they make anyway; a refusal found before any of them is checked here, on the
/// error path only. Nothing was counted for such a caller: every counting statement checks the
/// device first.
async fn caller_gone_or(
    state: &AppState,
    authorization: Option<&HeaderValue>,
    error: ApiError,
) -> ApiError {
    let Some(caller) = state
        .jwt()
        .ok()
        .and_then(|jwt| crate::http::caller_of(authorization, jwt).ok())
    else {
        return error;
    };
    let exists: Result<bool, _> = state
        .db
        .query_scalar(DEVICE_EXISTS_SQL)
        .bind(caller.user_id)
        .bind(caller.device_id)
        .fetch_one(state.pool())
        .await;
    match exists {
        Ok(false) => ApiError::Unauthorized,
        _ => error,
    }
}

/// The route template (API Gateway's route key) rather than the raw path where we have it.
fn route_of(request: &Request) -> String {
    if let Some(RequestContext::ApiGatewayV2(ctx)) = request.request_context_ref()
        && let Some(key) = ctx.route_key.as_deref()
        && key != "$default"
    {
        return key
            .split_once(' ')
            .map_or(key, |(_, path)| path)
            .to_string();
    }
    request.uri().path().to_string()
}

/// API Gateway's CORS configuration answers in AWS; this covers local runs and direct
/// invocations with the same allow-list. Never `*`.
fn allow_origin(config: &Config, origin: Option<HeaderValue>, response: &mut Response<Body>) {
    let Some(origin) = origin else { return };
    if origin.to_str().is_ok_and(|o| config.allows_origin(o)) {
        let headers = response.headers_mut();
        headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        headers.insert(
            header::ACCESS_CONTROL_EXPOSE_HEADERS,
            HeaderValue::from_static(CORS_EXPOSE_HEADERS),
        );
        headers.append(header::VARY, HeaderValue::from_static("Origin"));
    }
}
