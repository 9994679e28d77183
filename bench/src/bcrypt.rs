//! Phase 4, bcrypt: login and register at the configured cost and at cost 4.

use std::time::Instant;

use common::AppState;
use functions::api_event::ApiEvent;
use serde_json::json;

use crate::Settings;
use crate::fixture::{ED25519, Fixture, PASSWORD, call, fresh_name, next_ip};
use crate::report::{Samples, Table, ms};

pub(crate) async fn bcrypt_table(
    settings: &Settings,
    state: &'static AppState,
    state4: &'static AppState,
    fx: &Fixture,
) -> Table {
    let time = |state: &'static AppState, request: ApiEvent, expect: u16| async move {
        let (function, event) = request.event();
        let started = Instant::now();
        let (status, text) = call(state, function, &event).await;
        let elapsed = started.elapsed();
        assert_eq!(status, expect, "{function}: {text}");
        elapsed
    };
    let login = |name: &str| {
        ApiEvent::new("POST", "/login").json(json!({"name": name, "password": PASSWORD}))
    };
    let register = || {
        ApiEvent::new("POST", "/register")
            .source_ip(&next_ip())
            .json(json!({"name": fresh_name("bc"), "password": PASSWORD, "public_key": ED25519}))
    };
    let mut t = Table::new(
        "bcrypt: handler time in process (ms; the hash dominates, it is not overhead)",
        &["call", "cost", "median", "min", "max"],
    );
    let cost = settings.bcrypt_cost;
    let runs = settings.bcrypt_runs;
    for (label, st, user, c) in [
        ("POST /login", state, &fx.login_cfg, cost),
        ("POST /login", state4, &fx.login_4, 4),
    ] {
        let mut v = Vec::new();
        for _ in 0..runs {
            v.push(time(st, login(user), 200).await);
        }
        let s = Samples::new(&v);
        t.row(vec![
            label.into(),
            c.to_string(),
            ms(s.p50()),
            ms(s.pct(0.0)),
            ms(s.pct(100.0)),
        ]);
    }
    for (st, c) in [(state, cost), (state4, 4)] {
        let mut v = Vec::new();
        for _ in 0..runs {
            v.push(time(st, register(), 201).await);
        }
        let s = Samples::new(&v);
        t.row(vec![
            "POST /register".into(),
            c.to_string(),
            ms(s.p50()),
            ms(s.pct(0.0)),
            ms(s.pct(100.0)),
        ]);
    }
    t.note(&format!(
        "median of {runs}; login verifies against the user's stored hash (made at that cost); BCRYPT_COST={cost} here"
    ));
    t
}
