//! The Secure Messenger functions: one handler module per Lambda binary (`src/bin/<name>.rs`),
//! compiled once as this library so the binaries only link it.

/// API Gateway events for tests and the bench, not shipped in the Lambda binaries.
#[cfg(feature = "test-support")]
pub mod api_event;
pub mod claim_prekeys;
pub mod confirm_deliveries;
pub mod confirm_delivery;
pub mod create_link_code;
pub mod credentials;
pub mod delete_account;
pub mod get_keys;
pub mod get_messages;
pub mod get_public_key;
pub mod health;
pub mod link_device;
pub mod login;
pub mod lookup_user;
pub mod me;
pub mod metrics;
pub mod migrate;
pub mod my_devices;
pub mod not_found;
pub mod prekey_count;
pub mod purge;
pub mod rate_limit;
pub mod register;
pub mod remove_device;
pub mod routes;
pub mod send_message;
pub mod send_to_devices;
pub mod set_signing_key;
pub mod setup_roles;
pub mod signatures;
pub mod update_key;
pub mod upload_prekeys;
pub mod user_devices;
pub mod users;

pub use routes::dispatch;

/// Largest body of the account endpoints: a name, a password and an 8 KiB PEM fit easily.
pub const MAX_ACCOUNT_BODY_BYTES: usize = 16 * 1024;
