//! health, not-found, metrics, purge, migrate, database faults and CORS.

use std::time::{Duration, Instant};

use serde_json::json;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

use crate::support::TestApp;

#[sqlx::test(migrator = "common::db::MIGRATOR")]
async fn health_and_readiness(pool: PgPool) {
    let app = TestApp::new(pool);
    let r = app.request("GET", "/health").send().await;
    assert_eq!((r.status, r.body.clone()), (200, json!({"status": "ok"})));
    let r = app.request("GET", "/health/ready").send().await;
    assert_eq!(
        (r.status, r.body.clone()),
        (200, json!({"status": "ok", "database": "ok"}))
    );
}

#[sqlx::test(migrator = "common::db::MIGRATOR")]
async fn unknown_routes_and_methods(pool: PgPool) {
    let app = TestApp::new(pool);
    app.request("GET", "/me/")
        .send()
        .await
        .assert_error(404, "not_found");
    app.request("GET", "/")
        .send()
        .await
        .assert_error(404, "not_found");
    app.request("GET", "/nope")
        .send()
        .await
        .assert_error(404, "not_found");
    app.request("GET", "/messages/x/y/z")
        .send()
        .await
        .assert_error(404, "not_found");
    let r = app.request("DELETE", "/messages").send().await;
    r.assert_error(405, "method_not_allowed");
    assert_eq!(r.headers["allow"], "POST, GET");
    let r = app.request("GET", "/register").send().await;
    r.assert_error(405, "method_not_allowed");
    assert_eq!(r.headers["allow"], "POST");
    let r = app.request("POST", "/messages/abc/delivered").send().await;
    assert_eq!(r.headers["allow"], "PUT");
    // A literal path is not a parameter of a sibling template: locally the fallback answers,
    // in AWS the parameter's function (API Gateway picks a route per method) answers the same.
    for (method, path, allow) in [
        ("GET", "/keys/claim", "POST"),
        ("GET", "/keys/signing-key", "PUT"),
        ("GET", "/keys/prekeys", "POST"),
        ("DELETE", "/devices/link-codes", "POST"),
        ("OPTIONS", "/keys/claim", "POST"),
    ] {
        let r = app.request(method, path).send().await;
        r.assert_error(405, "method_not_allowed");
        assert_eq!(r.headers["allow"], allow, "{method} {path}");
    }
    let as_api_gateway_routes = |method: &str, path: &str| {
        lambda_http::http::Request::builder()
            .method(method)
            .uri(path)
            .body(lambda_http::Body::Empty)
            .unwrap()
    };
    let refused =
        functions::get_keys::handler(app.state, as_api_gateway_routes("GET", "/keys/claim"))
            .await
            .unwrap_err();
    assert_eq!(refused.status(), 405);
    let refused = functions::remove_device::handler(
        app.state,
        as_api_gateway_routes("DELETE", "/devices/link-codes"),
    )
    .await
    .unwrap_err();
    assert_eq!(refused.status(), 405);
}

/// Every TCP connection to the database has Nagle's algorithm off. sqlx 0.9.0 forgot it
/// (vendor/README.md): with Nagle on, each TLS handshake flight and every message larger than
/// one segment waits for the server's delayed ACK, about 40 ms each.
#[cfg(target_os = "linux")]
#[sqlx::test(migrator = "common::db::MIGRATOR")]
async fn database_connections_disable_nagle(pool: PgPool) {
    let options = pool.connect_options();
    let port = options.get_port();
    assert!(
        !options.get_host().starts_with('/'),
        "this test needs DATABASE_URL over TCP, not a Unix socket"
    );
    // A connection built by the production code path, held open while we look at it.
    let app = TestApp::connect(&[("DATABASE_URL", &database_url_of(&pool).await)]).await;
    let mut connection = app.pool.acquire().await.unwrap();
    sqlx::query("SELECT 1")
        .execute(&mut *connection)
        .await
        .unwrap();

    let mut checked = 0;
    for entry in std::fs::read_dir("/proc/self/fd").unwrap() {
        let Ok(fd) = entry.unwrap().file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        // SAFETY: only borrowed for the duration of the two getsockopt calls below, while
        // `connection` (and the test pools) keep the descriptors open.
        let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
        let socket = socket2::SockRef::from(&fd);
        let Ok(Some(peer)) = socket.peer_addr().map(|a| a.as_socket()) else {
            continue;
        };
        if peer.port() != port {
            continue;
        }
        assert!(
            socket.tcp_nodelay().unwrap(),
            "TCP_NODELAY is off on the connection to {peer}"
        );
        checked += 1;
    }
    assert!(checked >= 1, "found no TCP connection to port {port}");
    drop(connection);
    // Let the test harness drop the database without waiting for this pool.
    app.pool.close().await;
}

/// The URL of the test's own database (the pool's options carry no password under trust auth).
async fn database_url_of(pool: &PgPool) -> String {
    let options = pool.connect_options();
    let name: String = sqlx::query_scalar("SELECT current_database()")
        .fetch_one(pool)
        .await
        .unwrap();
    format!(
        "postgres://{}@{}:{}/{name}",
        options.get_username(),
        options.get_host(),
        options.get_port()
    )
}

/// A database that does not answer: every endpoint that needs it is 503 fast, liveness is 200.
#[tokio::test]
async fn database_down_is_503_quickly() {
    // Nothing listens on port 1; the pool is built exactly as in production, lazily.
    let pool = PgPoolOptions::new()
        .acquire_timeout(Duration::from_millis(1500))
        .connect_lazy("postgres://postgres@127.0.0.1:1/messenger")
        .unwrap();
    let app = TestApp::new(pool);
    let token = app
        .state
        .jwt()
        .unwrap()
        .issue(uuid::Uuid::now_v7(), 1)
        .unwrap()
        .access_token;
    let calls = [
        (
            "POST",
            "/register",
            Some(
                json!({"name": "alice", "password": "long enough pw", "public_key": crate::support::key("p256.pem")}),
            ),
        ),
        (
            "POST",
            "/login",
            Some(json!({"name": "alice", "password": "long enough pw"})),
        ),
        ("GET", "/me", None),
        (
            "GET",
            "/public-key/0190a3c2-7b5e-7c3e-8f00-123456789abc",
            None,
        ),
        (
            "PUT",
            "/update-key",
            Some(json!({"public_key": crate::support::key("p256.pem")})),
        ),
        ("GET", "/users?name=alice", None),
        (
            "POST",
            "/messages",
            Some(
                json!({"recipient_id": "0190a3c2-7b5e-7c3e-8f00-123456789abc", "encrypted_data": "aGk="}),
            ),
        ),
        ("GET", "/messages", None),
        (
            "PUT",
            "/messages/0190a3c2-7b5e-7c3e-8f00-123456789abc/delivered",
            None,
        ),
        ("GET", "/metrics", None),
    ];
    for (method, path, body) in calls {
        let started = Instant::now();
        let mut request = app.request(method, path).bearer(&token);
        if let Some(body) = body {
            request = request.json(body);
        }
        let r = request.send().await;
        r.assert_error(503, "unavailable");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{path} took {:?}",
            started.elapsed()
        );
        assert!(!r.text.contains("127.0.0.1"), "no internals: {}", r.text);
    }
    let r = app.request("GET", "/health").send().await;
    assert_eq!(r.status, 200);
    let r = app.request("GET", "/health/ready").send().await;
    r.assert_error(503, "unavailable");
    assert_eq!(r.body["status"], "unavailable");
    // sqlx retries a refused connect until the acquire timeout, then reports the timeout.
    let reason = r.body["database"].as_str().unwrap();
    assert!(
        ["connection refused", "timed out connecting"].contains(&reason),
        "{reason}"
    );
}

#[sqlx::test(migrator = "common::db::MIGRATOR")]
async fn cors_answers_only_named_origins(pool: PgPool) {
    let app = TestApp::with_env(pool, &[("CORS_ALLOWED_ORIGINS", "https://app.example")]);
    let r = app
        .request("GET", "/health")
        .header("origin", "https://app.example")
        .send()
        .await;
    assert_eq!(
        r.headers["access-control-allow-origin"],
        "https://app.example"
    );
    let r = app
        .request("GET", "/health")
        .header("origin", "https://evil.example")
        .send()
        .await;
    assert!(!r.headers.contains_key("access-control-allow-origin"));
    // Preflights reach the fallback function (API Gateway's `$default` route) and get a 2xx.
    let r = app
        .request("OPTIONS", "/messages")
        .header("origin", "https://app.example")
        .header("access-control-request-method", "POST")
        .send()
        .await;
    assert_eq!(r.status, 204);
    assert_eq!(
        r.headers["access-control-allow-origin"],
        "https://app.example"
    );
    assert_eq!(
        r.headers["access-control-allow-methods"],
        "POST, GET, OPTIONS"
    );
    let allowed = r.headers["access-control-allow-headers"].to_str().unwrap();
    for name in ["authorization", "content-type", "idempotency-key"] {
        assert!(allowed.contains(name), "{name} missing from {allowed}");
    }
    let r = app
        .request("OPTIONS", "/messages")
        .header("origin", "https://evil.example")
        .header("access-control-request-method", "POST")
        .send()
        .await;
    assert_eq!(r.status, 204);
    assert!(!r.headers.contains_key("access-control-allow-origin"));
    assert!(!r.headers.contains_key("access-control-allow-methods"));
    // An OPTIONS that is not a preflight (no Origin, or no Access-Control-Request-Method) is a
    // method the path does not have.
    for (name, value) in [
        ("origin", "https://app.example"),
        ("access-control-request-method", "POST"),
    ] {
        let r = app
            .request("OPTIONS", "/messages")
            .header(name, value)
            .send()
            .await;
        r.assert_error(405, "method_not_allowed");
        assert_eq!(r.headers["allow"], "POST, GET");
    }
    app.request("OPTIONS", "/nowhere")
        .send()
        .await
        .assert_error(404, "not_found");
}

#[sqlx::test(migrator = "common::db::MIGRATOR")]
async fn metrics_from_the_database(pool: PgPool) {
    let app = TestApp::with_env(
        pool.clone(),
        &[("METRICS_TOKEN", "metrics-token-for-tests")],
    );
    let (_, alice_token) = app.user("alice").await;
    let bob = app.register("bob").await;
    for _ in 0..3 {
        app.request("POST", "/messages")
            .bearer(&alice_token)
            .json(json!({"recipient_id": bob, "encrypted_data": "aGk="}))
            .send()
            .await;
    }
    app.request("GET", "/metrics")
        .send()
        .await
        .assert_error(401, "unauthorized");
    app.request("GET", "/metrics")
        .bearer("wrong")
        .send()
        .await
        .assert_error(401, "unauthorized");
    let r = app
        .request("GET", "/metrics")
        .bearer("metrics-token-for-tests")
        .send()
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(
        r.headers["content-type"],
        "text/plain; version=0.0.4; charset=utf-8"
    );
    for line in [
        "# TYPE messenger_users gauge",
        "messenger_users 2",
        "messenger_messages_pending 3",
        "messenger_messages_delivered_awaiting_expiry 0",
    ] {
        assert!(
            r.text.lines().any(|l| l == line),
            "missing {line:?} in\n{}",
            r.text
        );
    }
    assert!(!r.text.contains("purge_last_run"), "no purge has run yet");
    functions::purge::purge(app.state, Instant::now() + Duration::from_secs(60), 100)
        .await
        .unwrap();
    let r = app
        .request("GET", "/metrics")
        .bearer("metrics-token-for-tests")
        .send()
        .await;
    assert!(
        r.text
            .contains("messenger_purge_last_run_messages_deleted 0"),
        "{}",
        r.text
    );
    assert!(
        r.text.contains("messenger_purge_last_run_complete 1"),
        "{}",
        r.text
    );
    // Without METRICS_TOKEN the endpoint is open.
    let open = TestApp::new(pool);
    assert_eq!(open.request("GET", "/metrics").send().await.status, 200);
}

/// Above `EXACT_COUNTS_UP_TO` rows the counts are the planner's estimates, read from the
/// statistics ANALYZE keeps (autovacuum runs it as the table changes), not from the rows.
#[sqlx::test(migrator = "common::db::MIGRATOR")]
async fn metrics_estimate_large_tables(pool: PgPool) {
    let app = TestApp::new(pool.clone());
    seed_messages(&pool, 200, 2_000).await;
    sqlx::query(
        "UPDATE messages SET is_delivered = true, encrypted_data = NULL \
         WHERE ctid = ANY (ARRAY (SELECT ctid FROM messages WHERE expires_at > now() LIMIT 500))",
    )
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query("ANALYZE messages")
        .execute(&pool)
        .await
        .unwrap();
    let r = app.request("GET", "/metrics").send().await;
    assert_eq!(r.status, 200, "{}", r.text);
    let value = |name: &str| -> f64 {
        r.text
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no {name} in\n{}", r.text))
            .parse()
            .unwrap()
    };
    assert_eq!(value("messenger_counts_estimated"), 1.0);
    assert_eq!(value("messenger_users"), 2.0, "users stay exact");
    for (name, exact) in [
        ("messenger_messages_pending", 1_500.0),
        ("messenger_messages_delivered_awaiting_expiry", 500.0),
        ("messenger_messages_expired_awaiting_purge", 200.0),
    ] {
        let estimate = value(name);
        assert!(
            (estimate - exact).abs() <= exact * 0.1,
            "{name} {estimate}, exactly {exact}"
        );
    }
}

async fn seed_messages(pool: &PgPool, expired: i64, live: i64) -> (uuid::Uuid, uuid::Uuid) {
    let a = uuid::Uuid::now_v7();
    let b = uuid::Uuid::now_v7();
    sqlx::query("INSERT INTO users (id, name, hashed_password, public_key) VALUES ($1, 'seed-a', '$2b$04$x', '-----BEGIN PUBLIC KEY-----MCowBQYDK2VuAyEAhSDwCYkwp1R0i33ctD73Wg2/Og0mOBr066SpjqqbTmo=-----END PUBLIC KEY-----'), ($2, 'seed-b', '$2b$04$x', '-----BEGIN PUBLIC KEY-----MCowBQYDK2VuAyEAhSDwCYkwp1R0i33ctD73Wg2/Og0mOBr066SpjqqbTmo=-----END PUBLIC KEY-----')")
        .bind(a)
        .bind(b)
        .execute(pool)
        .await
        .unwrap();
    // Ids made in SQL in the same time-ordered layout as uuid v7.
    sqlx::query(
        r#"INSERT INTO messages (id, sender_id, recipient_id, encrypted_data, "timestamp", expires_at)
           SELECT gen_random_uuid(), $1, $2, '\x01'::bytea, now() - interval '8 days', now() - interval '1 day' + (g * interval '1 ms')
           FROM generate_series(1, $3) AS g
           UNION ALL
           SELECT gen_random_uuid(), $1, $2, '\x02'::bytea, now(), now() + interval '7 days'
           FROM generate_series(1, $4) AS g"#,
    )
    .bind(a)
    .bind(b)
    .bind(expired)
    .bind(live)
    .execute(pool)
    .await
    .unwrap();
    (a, b)
}

#[sqlx::test(migrator = "common::db::MIGRATOR")]
async fn purge_deletes_expired_in_batches_and_keeps_live(pool: PgPool) {
    let app = TestApp::new(pool.clone());
    seed_messages(&pool, 2_500, 300).await;
    // A delivered message that expired goes too; ended rate-limit windows go as well.
    sqlx::query("INSERT INTO rate_limits VALUES ('login_name', 'old', now() - interval '2 hours', 3), ('login_name', 'current', now(), 1)")
        .execute(&pool)
        .await
        .unwrap();
    let report =
        functions::purge::purge(app.state, Instant::now() + Duration::from_secs(120), 1_000)
            .await
            .unwrap();
    assert_eq!(report.messages_deleted, 2_500);
    assert_eq!(report.rate_limits_deleted, 1);
    assert!(report.complete);
    assert_eq!(
        report.batches,
        3 + 1,
        "three message batches, one rate-limit batch"
    );
    let (live, expired): (i64, i64) = sqlx::query_as("SELECT count(*) FILTER (WHERE expires_at > now()), count(*) FILTER (WHERE expires_at <= now()) FROM messages")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!((live, expired), (300, 0));
    let runs: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM purge_runs WHERE messages_deleted = 2500 AND complete",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(runs, 1);
}

#[sqlx::test(migrator = "common::db::MIGRATOR")]
async fn purge_stops_before_the_deadline_and_the_next_run_continues(pool: PgPool) {
    let app = TestApp::new(pool.clone());
    seed_messages(&pool, 1_000, 10).await;
    // No time left before the stop: no batch may start.
    let report = functions::purge::purge(app.state, Instant::now(), 100)
        .await
        .unwrap();
    assert_eq!(
        (report.batches, report.messages_deleted, report.complete),
        (0, 0, false)
    );
    let report = functions::purge::purge(app.state, Instant::now() + Duration::from_secs(60), 100)
        .await
        .unwrap();
    assert_eq!((report.messages_deleted, report.complete), (1_000, true));
}

/// The 1,000,000-row backlog: `make test-purge-backlog` runs it (about a minute here).
#[sqlx::test(migrator = "common::db::MIGRATOR")]
#[ignore = "slow: run with `make test-purge-backlog`"]
async fn purge_clears_a_million_row_backlog(pool: PgPool) {
    let app = TestApp::new(pool.clone());
    let seeded = Instant::now();
    seed_messages(&pool, 1_000_000, 10_000).await;
    println!(
        "seeded 1,000,000 expired + 10,000 live rows in {:.1} s",
        seeded.elapsed().as_secs_f64()
    );
    let started = Instant::now();
    let mut runs = 0;
    let mut total = 0;
    // Each run gets a 1 s budget (a real run gets the Lambda timeout less a margin), so several
    // bounded runs are needed, as on a backlog too large for one Lambda run.
    loop {
        runs += 1;
        let report = functions::purge::purge(
            app.state,
            Instant::now() + Duration::from_secs(1),
            functions::purge::DEFAULT_BATCH_SIZE,
        )
        .await
        .unwrap();
        total += report.messages_deleted;
        println!(
            "run {runs}: {} deleted in {} batches, {} ms, complete={}",
            report.messages_deleted, report.batches, report.duration_ms, report.complete
        );
        if report.complete {
            break;
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    println!(
        "purged {total} rows in {elapsed:.1} s over {runs} runs ({:.0} rows/s)",
        total as f64 / elapsed
    );
    assert_eq!(total, 1_000_000);
    let live: i64 = sqlx::query_scalar("SELECT count(*) FROM messages")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(live, 10_000, "live messages untouched");
}

#[sqlx::test(migrations = false)]
async fn migrate_applies_the_embedded_schema_once(pool: PgPool) {
    let url = database_url_of(&pool).await;
    let config =
        common::config::DatabaseConfig::from_lookup(|k| (k == "DATABASE_URL").then(|| url.clone()))
            .unwrap();
    let db = common::db::Database::connect(&config).unwrap();
    let first = functions::migrate::run(&db).await.unwrap();
    assert!(!first.applied_now.is_empty());
    assert_eq!(first.latest_version, first.applied_now.last().copied());
    let second = functions::migrate::run(&db).await.unwrap();
    assert!(second.applied_now.is_empty());
    assert_eq!(second.latest_version, first.latest_version);
}
