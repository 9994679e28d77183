//! What every Secure Messenger function shares: configuration, errors, the database pool,
//! JWTs, passwords, validated domain values, request helpers and JSON logging.

pub mod config;
pub mod db;
pub mod domain;
pub mod error;
pub mod http;
pub mod jwt;
pub mod password;
pub mod rds_token;
pub mod response;
pub mod runtime;
pub mod secret;
pub mod state;
pub mod telemetry;

pub use config::Config;
pub use error::ApiError;
pub use state::{AppState, Tokens};
