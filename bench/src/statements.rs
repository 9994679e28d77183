//! Phase 5, unnamed against named statements: the cheap reads through two instances that differ
//! only in `DB_STATEMENT_CACHE_CAPACITY`: 0 (deployed, every query an unnamed statement: parse,
//! bind and execute in one round trip, planned each time) and 100 (named statements prepared
//! once per connection and cached).

use std::time::Instant;

use common::AppState;
use functions::api_event::ApiEvent;

use crate::Settings;
use crate::fixture::{Fixture, app_state_with};
use crate::handler_cost::quiesce;
use crate::report::{Samples, Table, us};

/// One request through the production path, timed from the parse to the response.
pub(crate) async fn timed(state: &'static AppState, request: &ApiEvent, expect: u16) -> f64 {
    let (function, event) = request.event();
    quiesce(state.pool()).await;
    let started = Instant::now();
    let parsed = lambda_http::request::from_str(&event).expect("a valid event");
    let response = common::runtime::respond(function, state, parsed, move |s, r| {
        functions::dispatch(function, s, r)
    })
    .await;
    let elapsed = started.elapsed();
    assert_eq!(
        response.status().as_u16(),
        expect,
        "{function}: {:?}",
        response.body()
    );
    elapsed.as_secs_f64() * 1e6
}

pub(crate) async fn phase5(settings: &Settings, fx: &Fixture) {
    let unnamed = app_state_with(
        &settings.database_url,
        4,
        None,
        &[("DB_STATEMENT_CACHE_CAPACITY", "0".into())],
    )
    .await;
    let named = app_state_with(
        &settings.database_url,
        4,
        None,
        &[("DB_STATEMENT_CACHE_CAPACITY", "100".into())],
    )
    .await;
    let t = fx.alice_token.as_str();
    let cases = [
        ("GET /me", ApiEvent::new("GET", "/me").bearer(t)),
        (
            "GET /public-key/{id}",
            ApiEvent::new("GET", format!("/public-key/{}", fx.bob)).bearer(t),
        ),
        (
            "GET /users?name=",
            ApiEvent::new("GET", format!("/users?name={}", fx.bob_name)).bearer(t),
        ),
        ("GET /health/ready", ApiEvent::new("GET", "/health/ready")),
    ];
    let n = settings.iterations;
    let warmup = (n / 10).max(50);
    let mut table = Table::new(
        &format!(
            "5. Unnamed statements (cache 0, deployed) against cached named ones (cache 100): handler time (us; in process, own pool of 1 connection each, {n} interleaved iterations)"
        ),
        &[
            "endpoint",
            "unnamed p50",
            "p99",
            "named p50",
            "p99",
            "unnamed - named p50",
            "ratio p50",
        ],
    );
    for (label, request) in &cases {
        let (mut a, mut b) = (Vec::with_capacity(n), Vec::with_capacity(n));
        for i in 0..warmup + n {
            let x = timed(unnamed, request, 200).await;
            let y = timed(named, request, 200).await;
            if i >= warmup {
                a.push(x);
                b.push(y);
            }
        }
        let (a, b) = (Samples::from_us(a), Samples::from_us(b));
        table.row(vec![
            label.to_string(),
            us(a.p50()),
            us(a.p99()),
            us(b.p50()),
            us(b.p99()),
            us(a.p50() - b.p50()),
            format!("{:.2}", a.p50() / b.p50()),
        ]);
    }
    table.note("unnamed: Parse + Bind + Describe + Execute + Sync in one round trip, the statement planned on every execution; named: Bind + Execute + Sync on a statement prepared by the first execution on the connection");
    table.note("behind RDS Proxy named statements pin the client's connection to one database connection for its lifetime, so the deployed setting is 0 whatever this costs");
    table.print();
}
