//! Phase 2, cold start of each release binary against a minimal Runtime API: spawn -> first `next`
//! poll (init), spawn -> first response (with the first database connection).

use std::time::{Duration, Instant};

use crate::binaries::{
    check_answer, event_for, lambda_env, spawn, stop, wait_for_next, wait_for_response,
};
use crate::fixture::Fixture;
use crate::footprint::cpu_ns;
use crate::report::{Samples, Table, ms};
use crate::runtime_api::RuntimeApi;
use crate::{HTTP_FUNCTIONS, Settings};

pub(crate) struct Cold {
    init: Samples,
    first: Samples,
    init_cpu: Samples,
}

/// The database settings of IAM mode (DB_IAM_AUTH=true), pointed at the same server: the local
/// server ignores the token under trust auth, so the whole IAM path (token signing,
/// TLS required) runs.
pub(crate) fn iam_env(settings: &Settings, env: &mut Vec<(String, String)>) {
    let options: sqlx::postgres::PgConnectOptions =
        settings.database_url.parse().expect("a PostgreSQL URL");
    env.retain(|(k, _)| k != "DATABASE_URL");
    for (k, v) in [
        ("DB_IAM_AUTH", "true".to_string()),
        ("DB_HOST", options.get_host().to_string()),
        ("DB_PORT", options.get_port().to_string()),
        (
            "DB_NAME",
            options.get_database().unwrap_or("postgres").to_string(),
        ),
        ("DB_USER", options.get_username().to_string()),
        // What Lambda puts in the environment of every function (example values).
        ("AWS_REGION", "us-east-1".to_string()),
        ("AWS_ACCESS_KEY_ID", "AKIAIOSFODNN7EXAMPLE".to_string()),
        (
            "AWS_SECRET_ACCESS_KEY",
            "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY".to_string(),
        ),
        ("AWS_SESSION_TOKEN", "IQoJb3JpZ2luX2VjEXAMPLE".to_string()),
    ] {
        env.push((k.to_string(), v));
    }
}

pub(crate) async fn cold_start(
    settings: &Settings,
    fx: &Fixture,
    function: &str,
    iam: bool,
) -> Result<Cold, String> {
    let bin = settings.binary(function);
    let mut init = Vec::new();
    let mut first = Vec::new();
    let mut init_cpu = Vec::new();
    for run in 0..settings.cold_runs {
        let mut api = RuntimeApi::start(function).await.expect("runtime API");
        let (event, status) = event_for(function, fx, run, false);
        api.invoke(event);
        let mut env = lambda_env(settings, function, &api.address, settings.bcrypt_cost);
        if iam {
            iam_env(settings, &mut env);
        }
        let started = Instant::now();
        let child = spawn(&bin, env);
        let polled = wait_for_next(&mut api, function).await;
        // The event is already queued, so the process is answering it now: this CPU figure may
        // include the first microseconds of the invocation.
        let cpu = cpu_ns(child.id());
        let (answered, body) = wait_for_response(&mut api, function).await;
        stop(child);
        check_answer(function, &body, status)?;
        init.push(polled - started);
        first.push(answered - started);
        init_cpu.push(Duration::from_nanos(cpu));
    }
    Ok(Cold {
        init: Samples::new(&init),
        first: Samples::new(&first),
        init_cpu: Samples::new(&init_cpu),
    })
}

pub(crate) async fn phase2(settings: &Settings, fx: &Fixture) -> f64 {
    // 2.
    let mut cold_table = Table::new(
        &format!(
            "2. Cold start of the release binaries (ms; median of {} runs; spawn -> first `next` poll, spawn -> first response)",
            settings.cold_runs
        ),
        &[
            "function",
            "init p50",
            "init p90",
            "init CPU p50",
            "first response p50",
            "p90",
            "first invoke p50",
        ],
    );
    let mut worst_init: f64 = 0.0;
    let mut cold_fns: Vec<&str> = HTTP_FUNCTIONS.to_vec();
    cold_fns.push("purge");
    let mut runs: Vec<(&str, bool)> = cold_fns.iter().map(|f| (*f, false)).collect();
    runs.extend([("me", true), ("health", true)]);
    runs.retain(|(f, _)| settings.selected(f));
    for (function, iam) in runs {
        let label = if iam {
            format!("{function} (IAM auth mode)")
        } else {
            function.to_string()
        };
        match cold_start(settings, fx, function, iam).await {
            Ok(c) => {
                if !iam {
                    worst_init = worst_init.max(c.init.p50());
                }
                cold_table.row(vec![
                    label,
                    ms(c.init.p50()),
                    ms(c.init.pct(90.0)),
                    ms(c.init_cpu.p50()),
                    ms(c.first.p50()),
                    ms(c.first.pct(90.0)),
                    ms(c.first.p50() - c.init.p50()),
                ]);
            }
            Err(error) => {
                cold_table.row(vec![
                    label,
                    "-".into(),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                ]);
                cold_table.note(&format!("{function}: {error}"));
            }
        }
    }
    cold_table.note("init CPU = CPU time of all the process's threads at its first `next` poll (/proc schedstat): the work, without waits for a busy CPU");
    cold_table.note("first response includes the first database connection (TCP + TLS + auth) and the first statement prepare");
    cold_table.note("IAM auth mode (production's DB_IAM_AUTH=true): the function signs an RDS token (SigV4, offline) at init; same server, trust auth ignores the token");
    cold_table.note(&format!(
        "register and login include one bcrypt at cost {}; target init < 20 ms median. Worst init p50: {:.1} ms",
        settings.bcrypt_cost,
        worst_init / 1000.0
    ));
    cold_table.print();

    worst_init
}
