//! `make soak` (`bench soak`): a steady mix of register, login, send, fetch and confirm through
//! the real handlers, in process, from 8 instances in the deployed configuration (each its own
//! thread and current-thread runtime, as a Lambda instance is its own process, with its own pool
//! of one connection and no statement cache), with a short message TTL and the purge invoked every
//! few seconds, so that the table turns over many times within the run. Every 20-second slice it
//! prints the throughput, p50/p99 per operation, and the on-disk size of `messages` (heap, TOAST,
//! indexes) with its live and dead tuples and autovacuum runs.
//!
//! Environment: SOAK_S (run length, default 120), SOAK_SLICE_S (20), SOAK_INSTANCES (8),
//! SOAK_RATE (operations per second over all instances, default 300; paced, so latency is not
//! queueing on a saturated machine), SOAK_TTL_S (30), SOAK_PURGE_S (5), SOAK_USERS (200). The
//! database is DATABASE_URL (make soak: scripts/soak-database.sh, a cluster of its own); its name
//! must contain "soak", since the run empties its tables.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use common::AppState;
use common::config::Config;
use common::db::{Database, MIGRATOR};
use functions::api_event::ApiEvent;
use serde_json::{Value, json};

use crate::fixture::{ED25519, JWT_SECRET, PASSWORD, fresh_name, next_ip};
use crate::report::{Samples, Table, bytes, us};

#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Op {
    Register,
    Login,
    Send,
    Fetch,
    ConfirmBatch,
    ConfirmOne,
    Purge,
}

impl Op {
    const ALL: [Op; 7] = [
        Op::Register,
        Op::Login,
        Op::Send,
        Op::Fetch,
        Op::ConfirmBatch,
        Op::ConfirmOne,
        Op::Purge,
    ];

    fn label(self) -> &'static str {
        match self {
            Op::Register => "register",
            Op::Login => "login",
            Op::Send => "send",
            Op::Fetch => "fetch",
            Op::ConfirmBatch => "confirm batch",
            Op::ConfirmOne => "confirm one",
            Op::Purge => "purge run",
        }
    }
}

struct User {
    id: String,
    name: String,
    token: String,
    /// The id of the last message fetched: the next fetch starts after it (a page left
    /// unconfirmed is not fetched again, and expires).
    cursor: Option<String>,
}

#[derive(Default)]
struct Shared {
    users: Mutex<Vec<User>>,
    /// (operation, microseconds, HTTP status) since the last slice.
    samples: Mutex<Vec<(Op, f64, u16)>>,
    purged: Mutex<(u64, u64)>,
}

struct SoakSettings {
    url: String,
    seconds: u64,
    slice: u64,
    instances: usize,
    rate: f64,
    ttl: u64,
    purge_every: u64,
    users: usize,
}

fn number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

/// A small xorshift generator: the mix needs no more than that.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    fn percent(&mut self) -> u64 {
        self.next() % 100
    }
}

fn state(settings: &SoakSettings) -> AppState {
    let vars: HashMap<&str, String> = HashMap::from([
        ("DATABASE_URL", settings.url.clone()),
        ("JWT_SECRET", JWT_SECRET.to_string()),
        // The database is measured here, not bcrypt (at cost 12 logins would be most of the CPU).
        ("BCRYPT_COST", "4".to_string()),
        ("MESSAGE_TTL_SECONDS", settings.ttl.to_string()),
        // One sender may go faster than a person would; the mailbox limits stay as deployed.
        ("SEND_MAX_PER_WINDOW", "1000000".to_string()),
        ("REGISTER_MAX_PER_ADDRESS", "1000000".to_string()),
    ]);
    let config = Config::from_lookup(|k| vars.get(k).cloned()).expect("soak config is valid");
    let db = Database::connect(&config.database).expect("DATABASE_URL is valid");
    AppState::new(config, db)
}

async fn call(state: &'static AppState, request: ApiEvent) -> (f64, u16, String) {
    let (function, event) = request.event();
    let started = Instant::now();
    let parsed = lambda_http::request::from_str(&event).expect("a valid event");
    let response = common::runtime::respond(function, state, parsed, move |s, r| {
        functions::dispatch(function, s, r)
    })
    .await;
    let took = started.elapsed().as_secs_f64() * 1e6;
    let text = match response.body() {
        lambda_http::Body::Text(t) => t.clone(),
        lambda_http::Body::Binary(b) => String::from_utf8_lossy(b).into_owned(),
        _ => String::new(),
    };
    (took, response.status().as_u16(), text)
}

async fn register_user(state: &'static AppState) -> Option<User> {
    let name = fresh_name("s");
    let (_, status, text) = call(
        state,
        ApiEvent::new("POST", "/register")
            .source_ip(&next_ip())
            .json(json!({"name": name, "password": PASSWORD, "public_key": ED25519})),
    )
    .await;
    if status != 201 {
        return None;
    }
    let id = serde_json::from_str::<Value>(&text).ok()?["id"]
        .as_str()?
        .to_string();
    let token = state
        .jwt()
        .ok()?
        .issue(id.parse().ok()?, 1)
        .ok()?
        .access_token;
    Some(User {
        id,
        name,
        token,
        cursor: None,
    })
}

/// One instance: operations at its share of the rate until `stop`.
async fn instance(
    n: usize,
    settings: Arc<SoakSettings>,
    shared: Arc<Shared>,
    stop: Arc<AtomicBool>,
) {
    let state: &'static AppState = Box::leak(Box::new(state(&settings)));
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ (n as u64 + 1).wrapping_mul(0x2545_F491_4F6C_DD1D));
    // Ciphertext does not compress: random bytes, so 4 KiB stays over the TOAST threshold.
    let mut noise =
        |n: usize| -> String { B64.encode((0..n).map(|_| rng.next() as u8).collect::<Vec<u8>>()) };
    let small = noise(512);
    let large = noise(4096);
    let interval = Duration::from_secs_f64(settings.instances as f64 / settings.rate);
    let mut next = Instant::now();
    let record = |op: Op, took: f64, status: u16| {
        shared.samples.lock().unwrap().push((op, took, status));
    };
    while !stop.load(Ordering::Relaxed) {
        next += interval;
        let roll = rng.percent();
        // The active users are the newest `users`: a registration retires the oldest, who stops
        // sending and fetching (what was left for them expires), so the population, and with it
        // how long a message waits for its fetch, stays steady over the run.
        let user_count = shared.users.lock().unwrap().len();
        let first_active = user_count.saturating_sub(settings.users);
        let me = first_active + rng.below(user_count - first_active);
        let token = shared.users.lock().unwrap()[me].token.clone();
        if roll < 2 {
            let started = Instant::now();
            let user = register_user(state).await;
            let ok = user.is_some();
            if let Some(user) = user {
                shared.users.lock().unwrap().push(user);
            }
            record(
                Op::Register,
                started.elapsed().as_secs_f64() * 1e6,
                if ok { 201 } else { 500 },
            );
        } else if roll < 5 {
            let name = shared.users.lock().unwrap()[me].name.clone();
            let (took, status, _) = call(
                state,
                ApiEvent::new("POST", "/login").json(json!({"name": name, "password": PASSWORD})),
            )
            .await;
            record(Op::Login, took, status);
        } else if roll < 60 {
            let to = shared.users.lock().unwrap()
                [first_active + rng.below(user_count - first_active)]
            .id
            .clone();
            // One message in five is 4 KiB, over the TOAST threshold (about 2 KiB).
            let data = if rng.percent() < 20 { &large } else { &small };
            let mut request = ApiEvent::new("POST", "/messages")
                .bearer(&token)
                .json(json!({"recipient_id": to, "encrypted_data": data}));
            if rng.percent() < 30 {
                request = request.header("idempotency-key", &fresh_name("k"));
            }
            let (took, status, _) = call(state, request).await;
            record(Op::Send, took, status);
        } else {
            let cursor = shared.users.lock().unwrap()[me].cursor.clone();
            let path = match cursor {
                Some(after) => format!("/messages?limit=50&after={after}"),
                None => "/messages?limit=50".to_string(),
            };
            let (took, status, text) = call(state, ApiEvent::new("GET", path).bearer(&token)).await;
            record(Op::Fetch, took, status);
            let ids: Vec<String> = serde_json::from_str::<Value>(&text)
                .ok()
                .and_then(|v| {
                    v["messages"].as_array().map(|m| {
                        m.iter()
                            .filter_map(|m| m["id"].as_str().map(str::to_string))
                            .collect()
                    })
                })
                .unwrap_or_default();
            if let Some(last) = ids.last() {
                shared.users.lock().unwrap()[me].cursor = Some(last.clone());
                // 70% of pages confirmed at once, 10% one by one, 20% left to expire.
                let what = rng.percent();
                if what < 70 {
                    let (took, status, _) = call(
                        state,
                        ApiEvent::new("POST", "/messages/delivered")
                            .bearer(&token)
                            .json(json!({ "ids": ids })),
                    )
                    .await;
                    record(Op::ConfirmBatch, took, status);
                } else if what < 80 {
                    for id in &ids {
                        let (took, status, _) = call(
                            state,
                            ApiEvent::new("PUT", format!("/messages/{id}/delivered"))
                                .bearer(&token),
                        )
                        .await;
                        record(Op::ConfirmOne, took, status);
                    }
                }
            }
        }
        let now = Instant::now();
        if next > now {
            tokio::time::sleep(next - now).await;
        } else if now - next > Duration::from_secs(1) {
            // Far behind (a slow stretch): do not make up for it in a burst.
            next = now;
        }
    }
}

/// The purge, as the schedule would invoke it, every `purge_every` seconds.
async fn purger(settings: Arc<SoakSettings>, shared: Arc<Shared>, stop: Arc<AtomicBool>) {
    let state: &'static AppState = Box::leak(Box::new(state(&settings)));
    while !stop.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_secs(settings.purge_every)).await;
        let started = Instant::now();
        let stop_by = started + Duration::from_secs(settings.purge_every.max(2) - 1);
        match functions::purge::purge(state, stop_by, functions::purge::DEFAULT_BATCH_SIZE).await {
            Ok(report) => {
                let mut p = shared.purged.lock().unwrap();
                p.0 += 1;
                p.1 += report.messages_deleted;
                shared.samples.lock().unwrap().push((
                    Op::Purge,
                    started.elapsed().as_secs_f64() * 1e6,
                    200,
                ));
            }
            Err(error) => eprintln!("purge failed: {error}"),
        }
    }
}

#[derive(sqlx::FromRow)]
struct TableState {
    heap: i64,
    toast: i64,
    indexes: i64,
    live: i64,
    dead: i64,
    autovacuums: i64,
    autoanalyzes: i64,
    toast_dead: i64,
    toast_autovacuums: i64,
    pending: i64,
}

/// How full the pages are (pgstattuple, when the extension can be created): the heap's share of
/// live tuples, and the indexes' average leaf density weighted by their leaf pages.
#[derive(sqlx::FromRow)]
struct Density {
    heap_live_percent: Option<f64>,
    index_leaf_density: Option<f64>,
}

const DENSITY_SQL: &str = r#"
SELECT (SELECT tuple_percent FROM pgstattuple('messages')) AS heap_live_percent,
       (SELECT sum(s.avg_leaf_density * s.leaf_pages) / nullif(sum(s.leaf_pages), 0)
        FROM pg_index i, LATERAL pgstatindex(i.indexrelid::regclass) s
        WHERE i.indrelid = 'messages'::regclass) AS index_leaf_density
"#;

const TABLE_STATE_SQL: &str = r#"
SELECT pg_relation_size(c.oid) AS heap,
       coalesce(pg_total_relation_size(nullif(c.reltoastrelid, 0)), 0) AS toast,
       pg_indexes_size(c.oid) AS indexes,
       s.n_live_tup AS live, s.n_dead_tup AS dead,
       s.autovacuum_count AS autovacuums, s.autoanalyze_count AS autoanalyzes,
       coalesce(t.n_dead_tup, 0) AS toast_dead, coalesce(t.autovacuum_count, 0) AS toast_autovacuums,
       (SELECT count(*) FROM messages WHERE NOT is_delivered AND expires_at > now()) AS pending
FROM pg_class c JOIN pg_stat_user_tables s ON s.relid = c.oid
LEFT JOIN pg_stat_all_tables t ON t.relid = c.reltoastrelid
WHERE c.oid = 'messages'::regclass
"#;

fn spawn_instance<F, Fut>(make: F) -> std::thread::JoinHandle<()>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()>,
{
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime")
            .block_on(make());
    })
}

pub(crate) async fn run(url: String) {
    let settings = Arc::new(SoakSettings {
        url,
        seconds: number("SOAK_S", 120),
        slice: number("SOAK_SLICE_S", 20).max(1),
        instances: number("SOAK_INSTANCES", 8).max(1) as usize,
        rate: number("SOAK_RATE", 300).max(1) as f64,
        ttl: number("SOAK_TTL_S", 30).max(1),
        purge_every: number("SOAK_PURGE_S", 5).max(1),
        users: number("SOAK_USERS", 200).max(2) as usize,
    });
    let admin = state(&settings);
    let pool = admin.pool();
    let database: String = admin
        .db
        .query_scalar("SELECT current_database()::text")
        .fetch_one(pool)
        .await
        .expect("connecting to the soak database");
    assert!(
        database.contains("soak"),
        "DATABASE_URL names database {database:?}; the soak empties its tables, so it only runs \
         on a database whose name contains \"soak\" (make soak uses messenger_soak)"
    );
    MIGRATOR.run(pool).await.expect("applying migrations");
    admin
        .db
        .query("TRUNCATE users, messages, rate_limits, purge_runs CASCADE")
        .execute(pool)
        .await
        .expect("emptying the soak database");
    let options: String = admin
        .db
        .query_scalar(
            "SELECT coalesce(array_to_string(reloptions, ', '), 'defaults') FROM pg_class \
             WHERE oid = 'messages'::regclass",
        )
        .fetch_one(pool)
        .await
        .expect("reloptions");
    let server: Vec<(String, String)> = sqlx::query_as(
        "SELECT name, setting FROM pg_settings WHERE name IN ('autovacuum', 'autovacuum_naptime', \
         'autovacuum_vacuum_scale_factor', 'autovacuum_vacuum_threshold', 'autovacuum_vacuum_cost_delay', \
         'autovacuum_vacuum_insert_scale_factor') ORDER BY name",
    )
    .fetch_all(pool)
    .await
    .expect("settings");
    let stattuple = admin
        .db
        .query("CREATE EXTENSION IF NOT EXISTS pgstattuple")
        .execute(pool)
        .await
        .is_ok();
    let shared = Arc::new(Shared::default());
    let leak: &'static AppState = Box::leak(Box::new(admin));
    for _ in 0..settings.users {
        let user = register_user(leak)
            .await
            .expect("registering the soak's users");
        shared.users.lock().unwrap().push(user);
    }

    println!(
        "soak: {} s, {} instances (own connection each, statement cache 0), {} ops/s target, TTL {} s, purge every {} s, {} users to start",
        settings.seconds,
        settings.instances,
        settings.rate,
        settings.ttl,
        settings.purge_every,
        settings.users
    );
    println!(
        "mix : 55% send (1 in 5 of 4 KiB, TOASTed; 30% with Idempotency-Key), 40% fetch ?limit=50 from the user's cursor then 70% batch confirm / 10% one PUT per id / 20% left to expire, 3% login, 2% register (each retiring the oldest of the SOAK_USERS active users)"
    );
    println!("messages reloptions: {options}");
    println!(
        "server: {}",
        server
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(" ")
    );

    let stop = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    for n in 0..settings.instances {
        let (settings, shared, stop) = (settings.clone(), shared.clone(), stop.clone());
        threads.push(spawn_instance(move || instance(n, settings, shared, stop)));
    }
    {
        let (settings, shared, stop) = (settings.clone(), shared.clone(), stop.clone());
        threads.push(spawn_instance(move || purger(settings, shared, stop)));
    }

    let mut overview = Table::new(
        &format!(
            "Soak, per {}-second slice (latency in us: handler in process, p50/p99)",
            settings.slice
        ),
        &[
            "slice end s",
            "ops/s",
            "send p50",
            "p99",
            "fetch p50",
            "p99",
            "batch p50",
            "p99",
            "one p50",
            "p99",
            "login p50",
            "non-2xx",
            "purged",
            "heap MiB",
            "toast MiB",
            "idx MiB",
            "live",
            "dead",
            "autovac",
            "autoanalyze",
            "toast dead",
            "toast autovac",
            "pending",
            "heap live %",
            "idx leaf %",
        ],
    );
    // pg_stat counters outlive TRUNCATE: the table shows the runs since this start.
    let baseline: TableState = leak
        .db
        .query_as(TABLE_STATE_SQL)
        .fetch_one(leak.pool())
        .await
        .expect("table state");
    let started = Instant::now();
    let mut purged_before = 0u64;
    let slices = settings.seconds.div_ceil(settings.slice);
    for slice in 1..=slices {
        let end = started + Duration::from_secs((slice * settings.slice).min(settings.seconds));
        tokio::time::sleep_until(end.into()).await;
        let samples = std::mem::take(&mut *shared.samples.lock().unwrap());
        let elapsed = settings
            .slice
            .min(settings.seconds - (slice - 1) * settings.slice) as f64;
        let mut by_op: HashMap<Op, Vec<f64>> = HashMap::new();
        let mut errors = 0;
        let mut ops = 0;
        for (op, took, status) in samples {
            if op != Op::Purge {
                ops += 1;
                if !(200..300).contains(&status) {
                    errors += 1;
                }
            }
            by_op.entry(op).or_default().push(took);
        }
        let stat = |op: Op| -> (String, String) {
            match by_op.get(&op) {
                Some(v) if !v.is_empty() => {
                    let s = Samples::from_us(v.clone());
                    (us(s.p50()), us(s.p99()))
                }
                _ => ("-".into(), "-".into()),
            }
        };
        let purged = shared.purged.lock().unwrap().1;
        let t: TableState = leak
            .db
            .query_as(TABLE_STATE_SQL)
            .fetch_one(leak.pool())
            .await
            .expect("table state");
        let density: Option<Density> = if stattuple {
            leak.db
                .query_as(DENSITY_SQL)
                .fetch_one(leak.pool())
                .await
                .ok()
        } else {
            None
        };
        let mib = |b: i64| format!("{:.1}", b as f64 / 1048576.0);
        let (send, fetch, batch, one, login) = (
            stat(Op::Send),
            stat(Op::Fetch),
            stat(Op::ConfirmBatch),
            stat(Op::ConfirmOne),
            stat(Op::Login),
        );
        let row = vec![
            format!("{}", (slice * settings.slice).min(settings.seconds)),
            format!("{:.0}", ops as f64 / elapsed),
            send.0,
            send.1,
            fetch.0,
            fetch.1,
            batch.0,
            batch.1,
            one.0,
            one.1,
            login.0,
            errors.to_string(),
            bytes(purged - purged_before),
            mib(t.heap),
            mib(t.toast),
            mib(t.indexes),
            bytes(t.live.max(0) as u64),
            bytes(t.dead.max(0) as u64),
            (t.autovacuums - baseline.autovacuums).to_string(),
            (t.autoanalyzes - baseline.autoanalyzes).to_string(),
            bytes(t.toast_dead.max(0) as u64),
            (t.toast_autovacuums - baseline.toast_autovacuums).to_string(),
            bytes(t.pending.max(0) as u64),
            density
                .as_ref()
                .and_then(|d| d.heap_live_percent)
                .map_or("-".into(), |v| format!("{v:.0}")),
            density
                .as_ref()
                .and_then(|d| d.index_leaf_density)
                .map_or("-".into(), |v| format!("{v:.0}")),
        ];
        purged_before = purged;
        println!("{}", row.join("  "));
        overview.row(row);
        let counts: Vec<String> = Op::ALL
            .iter()
            .filter_map(|op| by_op.get(op).map(|v| format!("{} {}", op.label(), v.len())))
            .collect();
        overview.note(&format!("slice {slice}: {}", counts.join(", ")));
    }
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        let _ = t.join();
    }
    let index_sizes: Vec<(String, i64)> = sqlx::query_as(
        "SELECT indexrelid::regclass::text, pg_relation_size(indexrelid) FROM pg_index \
         WHERE indrelid = 'messages'::regclass ORDER BY 1",
    )
    .fetch_all(leak.pool())
    .await
    .unwrap_or_default();
    overview.note(&format!(
        "indexes at the end: {}",
        index_sizes
            .iter()
            .map(|(name, size)| format!("{name} {}", bytes(*size as u64)))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    overview.note("ops/s: handler calls finished in the slice (the purge not counted); non-2xx: answers outside 200-299 (429 mailbox_full would show here); purged: messages the purge deleted in the slice");
    overview.note("pending: undelivered, unexpired messages; heap live %: pgstattuple's tuple_percent (the rest is dead tuples and free space); idx leaf %: pgstatindex's avg_leaf_density over the table's indexes, weighted by leaf pages");
    overview.note("heap/toast/idx: pg_relation_size, the TOAST table with its index, pg_indexes_size; live/dead/autovac: pg_stat_user_tables (n_live_tup, n_dead_tup, autovacuum_count, autoanalyze_count, counted from the start of the run)");
    overview.print();
}
