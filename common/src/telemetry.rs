//! JSON log lines on stdout (Lambda's JSON log format passes them through as they are).

use tracing_subscriber::filter::Targets;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt;

/// What is logged unless `RUST_LOG` says otherwise. sqlx is held at `warn`: its statement logs
/// are noise here (and never hold bound parameters anyway).
const DEFAULT_FILTER: &str = "info,sqlx=warn";

/// The production log format, writing to `writer`; tests capture it to check what is logged.
/// `RUST_LOG` filters it with `target=level` directives (`Targets`, not `EnvFilter`: no span
/// filters, and no regex engine in every binary); an unreadable value falls back to the default.
pub fn json_subscriber<W>(writer: W) -> impl tracing::Subscriber + Send + Sync + 'static
where
    W: for<'a> MakeWriter<'a> + Send + Sync + 'static,
{
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|directives| directives.parse::<Targets>().ok())
        .unwrap_or_else(|| DEFAULT_FILTER.parse().expect("the default filter parses"));
    tracing_subscriber::fmt()
        .json()
        .with_target(false)
        .with_current_span(false)
        .with_span_list(false)
        .flatten_event(true)
        .with_ansi(false)
        .with_writer(writer)
        .finish()
        .with(filter)
}

/// Installs the JSON subscriber on stdout, once per process.
pub fn init() {
    let _ = tracing::subscriber::set_global_default(json_subscriber(std::io::stdout));
}
