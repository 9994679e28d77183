//! JSON log lines on stdout (Lambda's JSON log format passes them through as they are).

use tracing_subscriber::EnvFilter;

/// Installs the JSON subscriber once; `RUST_LOG` filters it (default `info`). sqlx is held at
/// `warn` by default: its statement logs are noise here, and parameters are never logged anyway.
pub fn init() {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn"));
    let _ = tracing_subscriber::fmt()
        .json()
        .with_env_filter(filter)
        .with_target(false)
        .with_current_span(false)
        .with_span_list(false)
        .flatten_event(true)
        .with_ansi(false)
        .try_init();
}
