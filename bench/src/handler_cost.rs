//! Phase 1, handler cost over the database's own cost: each endpoint's warm in-process time against
//! the same SQL run bare on the same pool, interleaved; and the per-request pieces that are not
//! SQL.

use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use common::AppState;
use functions::api_event::ApiEvent;
use serde_json::json;
use sqlx::PgPool;
use uuid::Uuid;

use crate::Settings;
use crate::fixture::{ED25519, Fixture, ME_SQL, PAGE_LIMIT, READY_SQL};
use crate::report::{Samples, Table, us};

#[derive(Clone, Copy)]
pub(crate) enum Sql {
    Me,
    PublicKey,
    Lookup,
    UpdateKey,
    Send,
    SendBig,
    Page,
    Confirm,
    Nothing,
    Ready,
    Metrics,
}

pub(crate) struct Case {
    label: &'static str,
    request: ApiEvent,
    status: u16,
    sql: Sql,
    /// Runs iterations / this (big writes fill the database quickly).
    divisor: usize,
}

pub(crate) fn cases(fx: &Fixture) -> Vec<Case> {
    let t = fx.alice_token.as_str();
    vec![
        Case {
            label: "GET /me",
            request: ApiEvent::new("GET", "/me").bearer(t),
            status: 200,
            sql: Sql::Me,
            divisor: 1,
        },
        Case {
            label: "GET /public-key/{id}",
            request: ApiEvent::new("GET", format!("/public-key/{}", fx.bob)).bearer(t),
            status: 200,
            sql: Sql::PublicKey,
            divisor: 1,
        },
        Case {
            label: "GET /users?name=",
            request: ApiEvent::new("GET", format!("/users?name={}", fx.bob_name)).bearer(t),
            status: 200,
            sql: Sql::Lookup,
            divisor: 1,
        },
        Case {
            label: "PUT /update-key",
            request: ApiEvent::new("PUT", "/update-key")
                .bearer(t)
                .json(json!({"public_key": ED25519})),
            status: 200,
            sql: Sql::UpdateKey,
            divisor: 1,
        },
        Case {
            label: "POST /messages (1 KiB)",
            request: ApiEvent::new("POST", "/messages")
                .bearer(t)
                .json(json!({"recipient_id": fx.carol, "encrypted_data": fx.ciphertext_b64})),
            status: 201,
            sql: Sql::Send,
            divisor: 1,
        },
        Case {
            label: "POST /messages (60 KiB)",
            request: ApiEvent::new("POST", "/messages").bearer(t).json(
                json!({"recipient_id": fx.carol, "encrypted_data": B64.encode(&fx.big_ciphertext)}),
            ),
            status: 201,
            sql: Sql::SendBig,
            divisor: 10,
        },
        Case {
            label: "GET /messages (10 x 1 KiB)",
            request: ApiEvent::new("GET", "/messages").bearer(t),
            status: 200,
            sql: Sql::Page,
            divisor: 1,
        },
        Case {
            label: "PUT /messages/{id}/delivered",
            request: ApiEvent::new("PUT", format!("/messages/{}/delivered", fx.confirmed_id))
                .bearer(t),
            status: 204,
            sql: Sql::Confirm,
            divisor: 1,
        },
        Case {
            label: "GET /health",
            request: ApiEvent::new("GET", "/health"),
            status: 200,
            sql: Sql::Nothing,
            divisor: 1,
        },
        Case {
            label: "GET /health/ready",
            request: ApiEvent::new("GET", "/health/ready"),
            status: 200,
            sql: Sql::Ready,
            divisor: 1,
        },
        Case {
            label: "GET /metrics",
            request: ApiEvent::new("GET", "/metrics"),
            status: 200,
            sql: Sql::Metrics,
            divisor: 1,
        },
    ]
}

/// The statement(s) the handler runs, bare, with the same binds. None when there are none.
pub(crate) async fn run_sql(sql: Sql, state: &AppState, fx: &Fixture) -> Option<()> {
    let (db, pool) = (&state.db, state.pool());
    let result = match sql {
        Sql::Me => db
            .query(ME_SQL)
            .bind(fx.alice)
            .bind(1i32)
            .fetch_optional(pool)
            .await
            .map(drop),
        Sql::PublicKey => db
            .query(functions::get_public_key::SQL)
            .bind(fx.alice)
            .bind(fx.bob)
            .bind(1i32)
            .fetch_one(pool)
            .await
            .map(drop),
        Sql::Lookup => db
            .query(functions::lookup_user::SQL)
            .bind(fx.alice)
            .bind(fx.bob_name.as_str())
            .bind(1i32)
            .fetch_one(pool)
            .await
            .map(drop),
        Sql::UpdateKey => db
            .query(functions::update_key::UPDATE_SQL)
            .bind(fx.alice)
            .bind(1i32)
            .bind(fx.pem.as_str())
            .bind(None::<Vec<u8>>)
            .bind(None::<&str>)
            .fetch_optional(pool)
            .await
            .map(drop),
        Sql::Send | Sql::SendBig => {
            let ciphertext = match sql {
                Sql::SendBig => &fx.big_ciphertext,
                _ => &fx.ciphertext,
            };
            // The handler's own call of send_envelopes(), without the request around it.
            let envelope = functions::send_message::Envelope {
                device_id: 1,
                key_fingerprint: None,
                ciphertext: ciphertext.clone(),
            };
            let sender = common::http::Caller {
                user_id: fx.alice,
                device_id: 1,
            };
            functions::send_message::send(
                state,
                sender,
                fx.carol,
                false,
                vec![envelope],
                None,
                None,
            )
            .await
            .map(drop)
            .map_err(|e| sqlx::Error::Protocol(e.to_string()))
        }
        Sql::Page => db
            .query(functions::get_messages::PAGE_SQL)
            .bind(fx.alice)
            .bind(Uuid::nil())
            .bind(PAGE_LIMIT)
            .bind(functions::get_messages::PAGE_CIPHERTEXT_BUDGET)
            .bind(1i32)
            .fetch_all(pool)
            .await
            .map(drop),
        Sql::Confirm => db
            .query(functions::confirm_deliveries::CONFIRM_SQL)
            .bind(fx.alice)
            .bind([fx.confirmed_id])
            .bind(1i32)
            .fetch_one(pool)
            .await
            .map(drop),
        Sql::Nothing => return None,
        Sql::Ready => db.query(READY_SQL).execute(pool).await.map(drop),
        Sql::Metrics => db
            .query(functions::metrics::SNAPSHOT_SQL)
            .bind(functions::metrics::EXACT_COUNTS_UP_TO)
            .fetch_one(pool)
            .await
            .map(drop),
    };
    result.expect("bare SQL");
    Some(())
}

pub(crate) struct Measured {
    full: Samples,
    dispatch: Samples,
    parse: Samples,
    sql: Option<Samples>,
    /// Median of the per-iteration differences handler - SQL (paired, so less noisy).
    paired_overhead: f64,
}

/// Waits (untimed) until every pooled connection is idle: sqlx pings a connection when it goes
/// back to the pool (a Sync round trip, in a background task), and a measurement that started
/// during the previous one's ping would pay for it. Requests to a Lambda instance are that far
/// apart too.
pub(crate) async fn quiesce(pool: &PgPool) {
    let deadline = Instant::now() + Duration::from_millis(20);
    while pool.num_idle() < pool.size() as usize && Instant::now() < deadline {
        tokio::task::yield_now().await;
    }
}

/// Interleaved: full handler, handler without the shell, bare SQL; so drift (other load on the
/// machine, table growth) hits all three alike.
pub(crate) async fn measure_case(
    state: &'static AppState,
    fx: &Fixture,
    case: &Case,
    warmup: usize,
    iterations: usize,
) -> Measured {
    let (function, event) = case.request.event();
    let mut full = Vec::with_capacity(iterations);
    let mut dispatch = Vec::with_capacity(iterations);
    let mut parse = Vec::with_capacity(iterations);
    let mut sql = Vec::with_capacity(iterations);
    for i in 0..warmup + iterations {
        // Parse + respond + dispatch: the whole in-process cost of one invocation.
        quiesce(state.pool()).await;
        let started = Instant::now();
        let request = lambda_http::request::from_str(&event).expect("valid event");
        let response = common::runtime::respond(function, state, request, move |s, r| {
            functions::dispatch(function, s, r)
        })
        .await;
        let elapsed = started.elapsed();
        let status = response.status().as_u16();
        assert_eq!(status, case.status, "{}: {:?}", case.label, response.body());
        drop(response);

        // The parse alone, then the handler without the shell (no log line, no CORS).
        quiesce(state.pool()).await;
        let started = Instant::now();
        let request = lambda_http::request::from_str(&event).expect("valid event");
        let parsed = started.elapsed();
        let started = Instant::now();
        let result = functions::dispatch(function, state, request).await;
        let dispatched = started.elapsed();
        assert!(result.is_ok(), "{}", case.label);
        drop(result);

        quiesce(state.pool()).await;
        let started = Instant::now();
        let ran = run_sql(case.sql, state, fx).await;
        let bare = started.elapsed();

        if i >= warmup {
            full.push(elapsed);
            parse.push(parsed);
            dispatch.push(dispatched);
            if ran.is_some() {
                sql.push(bare);
            }
        }
    }
    let mut diffs: Vec<f64> = if sql.is_empty() {
        full.iter().map(|d| d.as_secs_f64() * 1e6).collect()
    } else {
        full.iter()
            .zip(&sql)
            .map(|(f, q)| (f.as_secs_f64() - q.as_secs_f64()) * 1e6)
            .collect()
    };
    diffs.sort_by(f64::total_cmp);
    Measured {
        full: Samples::new(&full),
        dispatch: Samples::new(&dispatch),
        parse: Samples::new(&parse),
        sql: (!sql.is_empty()).then(|| Samples::new(&sql)),
        paired_overhead: diffs[diffs.len() / 2],
    }
}

/// The pieces of the shell that are not SQL: JWT verification and the request log line.
pub(crate) async fn micro(
    state: &'static AppState,
    fx: &Fixture,
    iterations: usize,
    database_url: &str,
) -> Table {
    let time = |f: &dyn Fn()| {
        let mut v = Vec::with_capacity(iterations);
        for i in 0..iterations + iterations / 10 {
            let started = Instant::now();
            f();
            if i >= iterations / 10 {
                v.push(started.elapsed());
            }
        }
        Samples::new(&v)
    };
    let mut parse_rows = Vec::new();
    for (label, request) in [
        (
            "GET /me",
            ApiEvent::new("GET", "/me").bearer(&fx.alice_token),
        ),
        (
            "POST /messages (1 KiB)",
            ApiEvent::new("POST", "/messages")
                .bearer(&fx.alice_token)
                .json(json!({"recipient_id": fx.carol, "encrypted_data": fx.ciphertext_b64})),
        ),
    ] {
        let (_, event) = request.event();
        let event = event.as_str();
        let current = time(&|| {
            std::hint::black_box(lambda_http::request::from_str(event).unwrap());
        });
        parse_rows.push(vec![
            format!(
                "event parse {label} ({} B): lambda_http::request::from_str",
                event.len()
            ),
            us(current.p50()),
            us(current.p99()),
        ]);
    }
    let mut jwt = Vec::with_capacity(iterations);
    let mut log = Vec::with_capacity(iterations);
    for _ in 0..iterations + iterations / 10 {
        let started = Instant::now();
        let claims = state
            .jwt()
            .unwrap()
            .verify(&fx.alice_token)
            .expect("valid token");
        jwt.push(started.elapsed());
        std::hint::black_box(claims);
        // The same event respond() logs per request.
        let started = Instant::now();
        lambda_http::tracing::info!(
            function = "me",
            method = "GET".to_string(),
            route = "/me".to_string(),
            status = 200u16,
            error = None::<&str>,
            duration_ms = 0.123,
            request_id = Some("00000000-0000-4000-8000-000000000001".to_string()),
            "request"
        );
        log.push(started.elapsed());
    }
    // A new database connection, as the first invocation of an instance opens one.
    let mut connect_rows = Vec::new();
    let options: sqlx::postgres::PgConnectOptions = database_url.parse().expect("a PostgreSQL URL");
    for (label, options) in [
        (
            "new DB connection, TLS (sslmode=prefer/require)",
            options.clone(),
        ),
        (
            "new DB connection, no TLS (sslmode=disable)",
            options.ssl_mode(sqlx::postgres::PgSslMode::Disable),
        ),
    ] {
        let mut v = Vec::new();
        for _ in 0..20 {
            use sqlx::Connection as _;
            let started = Instant::now();
            let mut conn = sqlx::PgConnection::connect_with(&options)
                .await
                .expect("connecting");
            sqlx::query(READY_SQL)
                .execute(&mut conn)
                .await
                .expect("SELECT 1");
            v.push(started.elapsed());
            let _ = conn.close().await;
        }
        let s = Samples::new(&v);
        connect_rows.push(vec![
            format!("{label} + SELECT 1"),
            us(s.p50()),
            us(s.pct(90.0)),
        ]);
    }
    let jwt = Samples::new(&jwt[iterations / 10..]);
    let log = Samples::new(&log[iterations / 10..]);
    let mut t = Table::new(
        "Per-request pieces, in process (us)",
        &["piece", "p50", "p99"],
    );
    t.row(vec![
        "JWT verify (HS256, jsonwebtoken)".into(),
        us(jwt.p50()),
        us(jwt.p99()),
    ]);
    t.row(vec![
        "request log line (tracing JSON, to /dev/null)".into(),
        us(log.p50()),
        us(log.p99()),
    ]);
    for row in parse_rows.into_iter().chain(connect_rows) {
        t.row(row);
    }
    t
}

pub(crate) async fn phase1(settings: &Settings, state: &'static AppState, fx: &Fixture) -> f64 {
    // 1.
    let n = settings.iterations;
    let warmup = (n / 10).max(50);
    let mut main_table = Table::new(
        &format!(
            "1. Handler cost over the database's own cost (us; warm, in process, {n} interleaved iterations after {warmup} warm-up)"
        ),
        &[
            "endpoint",
            "handler p50",
            "p99",
            "SQL p50",
            "p99",
            "overhead p50",
            "paired",
            "ratio p50",
            "ratio p99",
        ],
    );
    let mut breakdown = Table::new(
        "1b. Where the non-SQL time goes (p50, us)",
        &[
            "endpoint",
            "event parse",
            "dispatch",
            "of it SQL",
            "handler code",
            "shell",
        ],
    );
    let mut worst_ratio: f64 = 0.0;
    for case in cases(fx) {
        let m = measure_case(
            state,
            fx,
            &case,
            warmup / case.divisor,
            (n / case.divisor).max(10),
        )
        .await;
        let (sql50, sql99) = m
            .sql
            .as_ref()
            .map_or((f64::NAN, f64::NAN), |s| (s.p50(), s.p99()));
        let ratio50 = m.full.p50() / sql50;
        if ratio50.is_finite() {
            worst_ratio = worst_ratio.max(ratio50);
        }
        main_table.row(vec![
            case.label.into(),
            us(m.full.p50()),
            us(m.full.p99()),
            us(sql50),
            us(sql99),
            us(m.full.p50() - if sql50.is_nan() { 0.0 } else { sql50 }),
            us(m.paired_overhead),
            if ratio50.is_finite() {
                format!("{ratio50:.2}")
            } else {
                "-".into()
            },
            if sql99.is_nan() {
                "-".into()
            } else {
                format!("{:.2}", m.full.p99() / sql99)
            },
        ]);
        breakdown.row(vec![
            case.label.into(),
            us(m.parse.p50()),
            us(m.dispatch.p50()),
            us(sql50),
            us(m.dispatch.p50() - if sql50.is_nan() { 0.0 } else { sql50 }),
            us(m.full.p50() - m.parse.p50() - m.dispatch.p50()),
        ]);
    }
    main_table.note("handler = lambda_http::request::from_str(event) + common::runtime::respond(functions::dispatch), JWT check and log line included");
    main_table.note("SQL = the handler's statement(s) through sqlx on the same pool (same prepared-statement cache, same binds)");
    main_table.note("overhead p50 = handler p50 - SQL p50; paired = median over iterations of (handler - SQL), the steadier estimate on a busy machine");
    main_table.note(&format!(
        "physical limit 1.00; target <= 1.30 at p50. Worst ratio p50: {worst_ratio:.2}"
    ));
    breakdown.note("dispatch = functions::dispatch on a parsed request (no log line, no CORS); handler code = dispatch - SQL");
    breakdown.note("shell = full - parse - dispatch (respond(): method/route strings, the JSON log line, CORS)");
    main_table.print();
    breakdown.print();
    micro(state, fx, n, &settings.database_url).await.print();

    worst_ratio
}
