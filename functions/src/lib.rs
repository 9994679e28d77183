//! The Secure Messenger functions: one handler module per Lambda binary (`src/bin/<name>.rs`),
//! compiled once as this library so the binaries only link it.

/// API Gateway events for tests and the bench, not shipped in the Lambda binaries.
#[cfg(feature = "test-support")]
pub mod api_event;
pub mod confirm_deliveries;
pub mod confirm_delivery;
pub mod credentials;
pub mod delete_account;
pub mod get_messages;
pub mod get_public_key;
pub mod health;
pub mod login;
pub mod lookup_user;
pub mod me;
pub mod metrics;
pub mod migrate;
pub mod not_found;
pub mod purge;
pub mod rate_limit;
pub mod register;
pub mod routes;
pub mod send_message;
pub mod setup_roles;
pub mod update_key;
pub mod users;

use common::AppState;
use common::runtime::HandlerResult;
use lambda_http::Request;

/// Largest body of the account endpoints: a name, a password and an 8 KiB PEM fit easily.
pub const MAX_ACCOUNT_BODY_BYTES: usize = 16 * 1024;

/// Runs the HTTP function named `function` (a binary name from `routes::ROUTES`). Each binary
/// calls its own handler directly; this is for tests and tools that address functions by name.
pub async fn dispatch(function: &str, state: &'static AppState, request: Request) -> HandlerResult {
    match function {
        "register" => register::handler(state, request).await,
        "login" => login::handler(state, request).await,
        "me" => me::handler(state, request).await,
        "delete-account" => delete_account::handler(state, request).await,
        "get-public-key" => get_public_key::handler(state, request).await,
        "update-key" => update_key::handler(state, request).await,
        "lookup-user" => lookup_user::handler(state, request).await,
        "health" => health::handler(state, request).await,
        "send-message" => send_message::handler(state, request).await,
        "get-messages" => get_messages::handler(state, request).await,
        "confirm-delivery" => confirm_delivery::handler(state, request).await,
        "confirm-deliveries" => confirm_deliveries::handler(state, request).await,
        "metrics" => metrics::handler(state, request).await,
        _ => not_found::handler(state, request).await,
    }
}
