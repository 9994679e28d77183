//! JSON log lines on stdout (Lambda's JSON log format passes them through as they are).

use tracing::level_filters::LevelFilter;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt;

/// What is logged unless `RUST_LOG` says otherwise. sqlx is held at `warn`: its statement logs
/// are noise here (and never hold bound parameters anyway).
const DEFAULT_FILTER: &str = "info,sqlx=warn";

/// Libraries that log whole requests or responses at `trace` (lambda_runtime logs the raw
/// event, passwords and tokens included): held at `debug` whatever `RUST_LOG` says, so no
/// setting can put a secret in the logs.
const CAPPED_AT_DEBUG: &[&str] = &[
    "lambda_runtime",
    "lambda_runtime_api_client",
    "lambda_http",
    "hyper",
    "hyper_util",
    "h2",
    "tower",
];

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
        // The builder alone would stop at INFO; RUST_LOG and the cap below decide.
        .with_max_level(LevelFilter::TRACE)
        .json()
        .with_target(false)
        .with_current_span(false)
        .with_span_list(false)
        .flatten_event(true)
        .with_ansi(false)
        .with_writer(writer)
        .finish()
        .with(filter)
        .with(secret_safe_cap())
}

/// A second filter over `RUST_LOG`'s: both must let an event through.
fn secret_safe_cap() -> Targets {
    CAPPED_AT_DEBUG.iter().fold(
        Targets::new().with_default(LevelFilter::TRACE),
        |cap, target| cap.with_target(*target, LevelFilter::DEBUG),
    )
}

/// Installs the JSON subscriber on stdout, once per process.
pub fn init() {
    let _ = tracing::subscriber::set_global_default(json_subscriber(std::io::stdout));
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing::Level;

    #[test]
    fn runtime_targets_never_log_at_trace() {
        let cap = secret_safe_cap();
        assert!(!cap.would_enable("lambda_runtime::layers::api_response", &Level::TRACE));
        assert!(!cap.would_enable("lambda_http", &Level::TRACE));
        assert!(cap.would_enable("lambda_runtime", &Level::DEBUG));
        assert!(cap.would_enable("functions::login", &Level::TRACE));
    }
}
