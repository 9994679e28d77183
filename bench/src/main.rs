//! `make bench`: what the functions cost, measured on this machine against the local PostgreSQL.
//!
//! 1. Handler cost over the database's own cost: each endpoint's warm in-process time (event
//!    JSON parse + `common::runtime::respond` + `functions::dispatch`) against the same SQL run
//!    bare through sqlx on the same pool with the same binds, interleaved, p50 and p99.
//! 2. Cold start: each release binary started as Lambda starts it, against a minimal Runtime API
//!    server: spawn -> first `next` poll (init), spawn -> first response (with the DB connect).
//! 3. Size and memory: stripped binary, zipped `bootstrap`, RSS at init and peak after 1,000
//!    warm invocations.
//! 4. bcrypt: login and register at the configured cost and at cost 4.
//! 5. Unnamed statements (the deployed DB_STATEMENT_CACHE_CAPACITY=0) against cached named ones
//!    on the cheap reads.
//! 6. POST /messages through send_envelopes() against the single INSERT it replaced.
//! 7. The delivery cycle at page sizes 1, 10 and 100, batch confirm against per-id PUTs, and
//!    the API calls and dollars per million delivered messages.
//! 8. /metrics at 10 and 1,000,000 messages (BENCH_METRICS_ROWS), now and before; it empties
//!    `messages`, so it runs last.
//! 9. At a deployment's latency: every endpoint through a proxy that adds a set delay each way
//!    (BENCH_RTT_US, default 1000: 1 ms round trip) and counts round trips and statements; the
//!    warm p50 against the floor, statements x RTT (latency.rs).
//!
//! Phase a: envelope versions 1 and 2 (issue 20): the client's seal and open per message, a v2
//! session's set-up, the Olm state's JSON, POST /keys/claim against a send, and the requests per
//! message counted from the client's code (envelopes.rs).
//!
//! `bench soak` (make soak) is the soak run instead: see soak.rs.
//!
//! Environment: DATABASE_URL (else `scripts/database-url.sh messenger_bench`; the database's
//! name must contain "bench", since the bench empties its tables), BCRYPT_COST (default 12),
//! BENCH_ITERATIONS (2000), BENCH_COLD_RUNS (20), BENCH_WARM_INVOCATIONS (1000),
//! BENCH_BCRYPT_RUNS (10). For experiments: BENCH_PHASES (default "123456789a"), BENCH_FUNCTIONS
//! (e.g. "me,health"), BENCH_BIN_DIR (another build's binaries), BENCH_FUNCTION_ENV ("K=V,K=V" added
//! to the functions' environment). The binaries are read from the directory of this executable
//! (target/release after `cargo build --release --bins`).

// The bench times bare SQL against the handlers, and sets up and empties its own database.
#![allow(clippy::disallowed_methods)]

mod bcrypt;
mod binaries;
mod cold_start;
mod delivery;
mod envelopes;
mod fixture;
mod footprint;
mod handler_cost;
mod latency;
mod machine;
mod metrics_scale;
mod report;
mod runtime_api;
mod sends;
mod soak;
mod statements;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::db::MIGRATOR;
use report::mib;

/// The HTTP functions (every binary but purge and migrate).
pub(crate) const HTTP_FUNCTIONS: &[&str] = &[
    "register",
    "login",
    "me",
    "get-public-key",
    "update-key",
    "lookup-user",
    "health",
    "send-message",
    "get-messages",
    "confirm-delivery",
    "metrics",
    "not-found",
];

pub(crate) struct Settings {
    pub(crate) database_url: String,
    pub(crate) bcrypt_cost: u32,
    pub(crate) iterations: usize,
    pub(crate) cold_runs: usize,
    pub(crate) warm_invocations: usize,
    pub(crate) bcrypt_runs: usize,
    pub(crate) bin_dir: PathBuf,
    /// Which parts to run ("123456789a" by default) and, for 2 and 3, which functions.
    pub(crate) phases: String,
    pub(crate) only: Option<Vec<String>>,
}

pub(crate) fn env_number<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

pub(crate) fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("bench/ is inside the workspace")
        .to_path_buf()
}

impl Settings {
    fn from_env() -> Self {
        let database_url = match std::env::var("DATABASE_URL") {
            Ok(url) if !url.trim().is_empty() => url,
            _ => {
                let out = Command::new("bash")
                    .arg("scripts/database-url.sh")
                    .arg("messenger_bench")
                    .current_dir(workspace_root())
                    .stderr(Stdio::inherit())
                    .output()
                    .expect("running scripts/database-url.sh");
                assert!(out.status.success(), "scripts/database-url.sh failed");
                String::from_utf8(out.stdout).unwrap().trim().to_string()
            }
        };
        let bin_dir = match std::env::var("BENCH_BIN_DIR") {
            Ok(dir) if !dir.is_empty() => PathBuf::from(dir),
            _ => std::env::current_exe()
                .ok()
                .and_then(|p| p.parent().map(Path::to_path_buf))
                .expect("the directory of the bench binary"),
        };
        Self {
            database_url,
            bcrypt_cost: env_number("BCRYPT_COST", 12),
            iterations: env_number("BENCH_ITERATIONS", 2000).max(10),
            cold_runs: env_number("BENCH_COLD_RUNS", 20).max(1),
            warm_invocations: env_number("BENCH_WARM_INVOCATIONS", 1000).max(2),
            bcrypt_runs: env_number("BENCH_BCRYPT_RUNS", 10).max(1),
            bin_dir,
            phases: std::env::var("BENCH_PHASES").unwrap_or_else(|_| "123456789a".into()),
            only: std::env::var("BENCH_FUNCTIONS")
                .ok()
                .filter(|v| !v.trim().is_empty())
                .map(|v| v.split(',').map(|f| f.trim().to_string()).collect()),
        }
    }

    fn phase(&self, n: char) -> bool {
        self.phases.contains(n)
    }

    fn selected(&self, function: &str) -> bool {
        self.only
            .as_ref()
            .is_none_or(|only| only.iter().any(|f| f == function))
    }

    fn binary(&self, name: &str) -> PathBuf {
        self.bin_dir.join(name)
    }
}

// ------------------------------------------------------------------ main

// The functions' own runtime flavour, so in-process figures match what Lambda runs.
#[tokio::main(flavor = "current_thread")]
async fn main() {
    // The production log format, written (and paid for) per request, to /dev/null.
    let devnull = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/null")
        .expect("/dev/null");
    let _ =
        lambda_http::tracing::dispatcher::set_global_default(lambda_http::tracing::Dispatch::new(
            common::telemetry::json_subscriber(std::sync::Mutex::new(devnull)),
        ));
    if std::env::args().nth(1).as_deref() == Some("soak") {
        let url = std::env::var("DATABASE_URL").expect("DATABASE_URL (make soak sets it)");
        soak::run(url).await;
        return;
    }
    let settings = Settings::from_env();
    if cfg!(debug_assertions) {
        eprintln!("warning: a debug build; run `cargo run --release -p bench` for real figures");
    }
    let mut functions_all: Vec<&str> = HTTP_FUNCTIONS.to_vec();
    functions_all.extend(["purge", "migrate"]);
    functions_all.retain(|f| settings.selected(f));
    let missing: Vec<&&str> = functions_all
        .iter()
        .filter(|f| (settings.phase('2') || settings.phase('3')) && !settings.binary(f).is_file())
        .collect();
    assert!(
        missing.is_empty(),
        "missing {missing:?} in {}: run `cargo build --release --bins` first",
        settings.bin_dir.display()
    );

    let state = fixture::app_state(&settings.database_url, settings.bcrypt_cost, None).await;
    fixture::check_bench_database(state.pool()).await;
    MIGRATOR
        .run(state.pool())
        .await
        .expect("applying migrations to the bench database");
    let state4 = fixture::app_state(&settings.database_url, 4, Some(state.pool())).await;
    machine::machine(state.pool()).await;
    let fx = fixture::setup(state, state4).await;

    let mut worst_ratio = None;
    let mut worst_init = None;
    let mut biggest = None;
    if settings.phase('1') {
        worst_ratio = Some(handler_cost::phase1(&settings, state, &fx).await);
    }
    if settings.phase('2') {
        worst_init = Some(cold_start::phase2(&settings, &fx).await);
    }
    if settings.phase('3') {
        biggest = Some(footprint::phase3(&settings, &fx, &functions_all, state.pool()).await);
    }
    if settings.phase('4') {
        bcrypt::bcrypt_table(&settings, state, state4, &fx)
            .await
            .print();
    }
    if settings.phase('5') {
        statements::phase5(&settings, &fx).await;
    }
    if settings.phase('6') {
        sends::phase6(&settings, state, state4, &fx).await;
    }
    if settings.phase('7') {
        delivery::phase7(&settings, state, state4, &fx).await;
    }
    if settings.phase('a') {
        envelopes::phase_a(&settings, &fx).await;
    }
    // Before 8, which empties `messages` (the confirm case needs its message).
    if settings.phase('9') {
        latency::phase9(&settings, &fx).await;
    }
    if settings.phase('8') {
        metrics_scale::phase8(&settings, state, &fx).await;
    }

    println!();
    println!("load avg    : {} (at the end)", machine::loadavg());
    let show = |v: Option<String>| v.unwrap_or_else(|| "not run".into());
    println!(
        "summary     : handler/SQL p50 worst {} (target <= 1.30) | init p50 worst {} ms (target < 20) | largest binary {} MiB (target < 8 MB = 7.63 MiB)",
        show(worst_ratio.map(|r| format!("{r:.2}"))),
        show(worst_init.map(|v| format!("{:.1}", v / 1000.0))),
        show(biggest.map(mib)),
    );
}
