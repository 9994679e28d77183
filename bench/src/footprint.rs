//! Phase 3, size and memory: stripped binary, zipped `bootstrap`, RSS at init and peak after warm
//! invocations, CPU and context switches per invocation.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use sqlx::PgPool;

use crate::Settings;
use crate::binaries::{
    check_answer, event_for, lambda_env, spawn, stop, wait_for_next, wait_for_response,
};
use crate::fixture::Fixture;
use crate::report::{Samples, Table, bytes, mib, us};
use crate::runtime_api::RuntimeApi;

/// CPU time the process has used so far, all threads (ns, from /proc/<pid>/task/*/schedstat):
/// unlike wall-clock time, not inflated by other load on the machine.
pub(crate) fn cpu_ns(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("schedstat")).ok())
        .filter_map(|s| {
            s.split_whitespace()
                .next()
                .and_then(|v| v.parse::<u64>().ok())
        })
        .sum()
}

/// Context switches of all the process's threads so far (voluntary + involuntary): each is a
/// thread going to sleep or being woken, the cost of hopping between runtime threads.
pub(crate) fn context_switches(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("status")).ok())
        .map(|s| {
            s.lines()
                .filter(|l| l.contains("ctxt_switches:"))
                .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                .sum::<u64>()
        })
        .sum()
}

pub(crate) fn proc_status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

pub(crate) struct Warm {
    rss_init_kib: u64,
    hwm_kib: u64,
    invoke: Samples,
    /// CPU time per warm invocation, whole process (us).
    cpu_per_invoke_us: f64,
    switches_per_invoke: f64,
    /// Database connections the instance holds after the warm invocations.
    db_connections: i64,
}

/// Connections to the bench database from the functions (their application_name).
pub(crate) async fn function_connections(pool: &PgPool) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity \
         WHERE datname = current_database() AND application_name = 'secure-messenger' \
           AND pid <> pg_backend_pid()",
    )
    .fetch_one(pool)
    .await
    .unwrap_or(-1)
}

/// One instance, `n` invocations through the Runtime API; the first is the cold one.
pub(crate) async fn warm_instance(
    settings: &Settings,
    fx: &Fixture,
    function: &str,
    pool: &PgPool,
) -> Warm {
    let n = settings.warm_invocations;
    let events: Vec<(String, u16)> = (0..n).map(|i| event_for(function, fx, i, true)).collect();
    let before = function_connections(pool).await;
    let mut api = RuntimeApi::start(function).await.expect("runtime API");
    // Cost 4 so that 1,000 registrations take seconds; bcrypt's memory does not depend on it.
    let env = lambda_env(settings, function, &api.address, 4);
    let child = spawn(&settings.binary(function), env);
    let pid = child.id();
    wait_for_next(&mut api, function).await;
    let rss_init_kib = proc_status_kib(pid, "VmRSS:");
    let mut times = Vec::with_capacity(n);
    let mut cpu_after_first = 0;
    let mut switches_after_first = 0;
    for (i, (event, status)) in events.into_iter().enumerate() {
        let queued = Instant::now();
        api.invoke(event);
        let (answered, body) = wait_for_response(&mut api, function).await;
        if i == 0 || i == n - 1 {
            check_answer(function, &body, status).unwrap_or_else(|e| panic!("{e}"));
        }
        if i == 0 {
            cpu_after_first = cpu_ns(pid);
            switches_after_first = context_switches(pid);
        } else {
            times.push(answered - queued);
        }
    }
    let cpu_total = cpu_ns(pid).saturating_sub(cpu_after_first);
    let switches = context_switches(pid).saturating_sub(switches_after_first);
    let hwm_kib = proc_status_kib(pid, "VmHWM:");
    let db_connections = function_connections(pool).await - before;
    stop(child);
    Warm {
        rss_init_kib,
        hwm_kib,
        invoke: Samples::new(&times),
        cpu_per_invoke_us: cpu_total as f64 / 1000.0 / (n - 1) as f64,
        switches_per_invoke: switches as f64 / (n - 1) as f64,
        db_connections,
    }
}

/// Zipped size of the binary as Lambda's `bootstrap`: the `zip` CLI, else python3's zipfile.
pub(crate) fn zipped_size(bin: &Path) -> Option<u64> {
    let dir = std::env::temp_dir().join(format!("bench-zip-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).ok()?;
    std::fs::copy(bin, dir.join("bootstrap")).ok()?;
    let zipped = Command::new("zip")
        .args(["-q", "-X", "bootstrap.zip", "bootstrap"])
        .current_dir(&dir)
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
        || Command::new("python3")
            .args(["-m", "zipfile", "-c", "bootstrap.zip", "bootstrap"])
            .current_dir(&dir)
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
    let size = zipped
        .then(|| std::fs::metadata(dir.join("bootstrap.zip")).ok())
        .flatten()
        .map(|m| m.len());
    let _ = std::fs::remove_dir_all(&dir);
    size
}

pub(crate) async fn phase3(
    settings: &Settings,
    fx: &Fixture,
    functions_all: &[&str],
    pool: &PgPool,
) -> u64 {
    // 3.
    let w = settings.warm_invocations;
    let mut size_table = Table::new(
        &format!(
            "3. Size and memory (stripped release binary; zip of it as `bootstrap`; RSS via /proc after init and peak after {w} invocations)"
        ),
        &[
            "function",
            "binary bytes",
            "MiB",
            "zip bytes",
            "RSS init MiB",
            "peak RSS MiB",
            "warm invoke p50 us",
            "p99 us",
            "CPU us/invoke",
            "ctx sw/invoke",
            "DB conns",
        ],
    );
    let mut biggest = 0u64;
    for function in functions_all {
        let bin = settings.binary(function);
        let size = std::fs::metadata(&bin).map(|m| m.len()).unwrap_or(0);
        biggest = biggest.max(size);
        let zip = zipped_size(&bin).map_or("-".into(), bytes);
        let mut row = vec![function.to_string(), bytes(size), mib(size), zip];
        if *function == "migrate" {
            row.extend([
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
            ]);
        } else {
            let warm = warm_instance(settings, fx, function, pool).await;
            row.extend([
                mib(warm.rss_init_kib * 1024),
                mib(warm.hwm_kib * 1024),
                us(warm.invoke.p50()),
                us(warm.invoke.p99()),
                us(warm.cpu_per_invoke_us),
                format!("{:.1}", warm.switches_per_invoke),
                warm.db_connections.to_string(),
            ]);
        }
        size_table.row(row);
    }
    size_table.note("warm invoke = event queued on the Runtime API -> response received: the whole instance loop (HTTP to the runtime API, parse, handler, SQL, response JSON)");
    size_table.note("CPU us/invoke = the function process's CPU time over the warm invocations / their number (all threads, /proc schedstat); ctx sw = its threads' context switches per invocation; DB conns = connections it holds at the end (DB_MAX_CONNECTIONS, default 1)");
    size_table.note("these instances run with BCRYPT_COST=4 (register makes 1,000 accounts); login's user is hashed at cost 4");
    size_table.note(&format!(
        "target: each stripped binary < 8 MB. Largest: {} bytes ({} MiB)",
        bytes(biggest),
        mib(biggest)
    ));
    size_table.print();

    biggest
}
