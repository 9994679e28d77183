//! JSON log lines on stdout (Lambda's JSON log format passes them through as they are).

use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;

/// The production log format, writing to `writer`; tests capture it to check what is logged.
/// `RUST_LOG` filters it (default `info`). sqlx is held at `warn` by default: its statement logs
/// are noise here (and never hold bound parameters anyway).
pub fn json_subscriber<W>(writer: W) -> impl tracing::Subscriber + Send + Sync + 'static
where
    W: for<'a> MakeWriter<'a> + Send + Sync + 'static,
{
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn"));
    tracing_subscriber::fmt()
        .json()
        .with_env_filter(filter)
        .with_target(false)
        .with_current_span(false)
        .with_span_list(false)
        .flatten_event(true)
        .with_ansi(false)
        .with_writer(writer)
        .finish()
}

/// Installs the JSON subscriber on stdout, once per process.
pub fn init() {
    let _ = tracing::subscriber::set_global_default(json_subscriber(std::io::stdout));
}
