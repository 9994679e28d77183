//! Phase 7, the delivery cycle per page size: `GET /messages?limit=k`, then the page confirmed by
//! one `POST /messages/delivered` or by `k` `PUT /messages/{id}/delivered`; and from those
//! durations (and the send's), API calls and dollars per million delivered messages.

use common::AppState;
use functions::api_event::ApiEvent;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::Settings;
use crate::fixture::{CIPHERTEXT_BYTES, Fixture, fresh_name, register};
use crate::report::{Samples, Table, us};
use crate::statements::timed;

/// List prices (us-east-1, first tier): HTTP API requests, Lambda requests, Lambda arm64 compute.
const API_PER_MILLION: f64 = 1.00;
const LAMBDA_REQUESTS_PER_MILLION: f64 = 0.20;
const LAMBDA_GB_SECOND: f64 = 0.000_013_333_4;
/// template.yaml's MemorySize for the message functions.
const MEMORY_GB: f64 = 256.0 / 1024.0;

/// Lambda bills each invocation's duration rounded up to the millisecond.
fn billed_ms(us: f64) -> f64 {
    (us / 1000.0).ceil().max(1.0)
}

/// Dollars per million invocations of `us` each (API Gateway + Lambda requests + compute).
fn per_million_calls(us: f64) -> f64 {
    API_PER_MILLION
        + LAMBDA_REQUESTS_PER_MILLION
        + MEMORY_GB * billed_ms(us) / 1000.0 * LAMBDA_GB_SECOND * 1e6
}

async fn fill(state: &AppState, from: Uuid, to: Uuid, k: usize) {
    state
        .db
        .query(
            "INSERT INTO messages (id, sender_id, recipient_id, encrypted_data, size, expires_at) \
             SELECT gen_random_uuid(), $1, $2, $3, octet_length($3), now() + interval '7 days' \
             FROM generate_series(1, $4)",
        )
        .bind(from)
        .bind(to)
        .bind(vec![7u8; CIPHERTEXT_BYTES])
        .bind(k as i32)
        .execute(state.pool())
        .await
        .expect("filling the inbox");
}

/// Fetches a page of `k` (timed) and returns its time and ids.
async fn page(state: &'static AppState, token: &str, k: usize) -> (f64, Vec<String>) {
    let request = ApiEvent::new("GET", format!("/messages?limit={k}")).bearer(token);
    let (function, event) = request.event();
    let took = timed(state, &request, 200).await;
    // The same page again, untimed, for its ids (nothing was confirmed in between).
    let (_, text) = crate::fixture::call(state, function, &event).await;
    let body: Value = serde_json::from_str(&text).expect("a page");
    let ids: Vec<String> = body["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids.len(), k, "a full page");
    (took, ids)
}

pub(crate) async fn phase7(
    settings: &Settings,
    state: &'static AppState,
    state4: &'static AppState,
    fx: &Fixture,
) {
    let reader = register(state4, &fresh_name("frank")).await;
    let token = state.jwt().unwrap().issue(reader, 1).unwrap().access_token;
    let mut table = Table::new(
        "7. Delivery cycle per page of k messages: fetch, then confirm by one batch or k single calls (us; in process, deployed settings)",
        &[
            "k",
            "runs",
            "GET ?limit=k p50",
            "POST /delivered p50",
            "p99",
            "k x PUT p50 (sum)",
            "batch / k PUTs",
        ],
    );
    let mut per_page = Vec::new();
    for k in [1usize, 10, 100] {
        let runs = (settings.iterations / (k * 4).max(10)).clamp(20, 500);
        let (mut get, mut batch, mut singles) = (Vec::new(), Vec::new(), Vec::new());
        for i in 0..runs + 5 {
            fill(state, fx.alice, reader, k).await;
            let (g, ids) = page(state, &token, k).await;
            let confirm = ApiEvent::new("POST", "/messages/delivered")
                .bearer(&token)
                .json(json!({ "ids": ids }));
            let b = timed(state, &confirm, 200).await;

            fill(state, fx.alice, reader, k).await;
            let (_, ids) = page(state, &token, k).await;
            let mut sum = 0.0;
            for id in &ids {
                let put = ApiEvent::new("PUT", format!("/messages/{id}/delivered")).bearer(&token);
                sum += timed(state, &put, 204).await;
            }
            if i >= 5 {
                get.push(g);
                batch.push(b);
                singles.push(sum);
            }
        }
        let (get, batch, singles) = (
            Samples::from_us(get),
            Samples::from_us(batch),
            Samples::from_us(singles),
        );
        table.row(vec![
            k.to_string(),
            runs.to_string(),
            us(get.p50()),
            us(batch.p50()),
            us(batch.p99()),
            us(singles.p50()),
            format!("{:.2}", batch.p50() / singles.p50()),
        ]);
        per_page.push((k, get.p50(), batch.p50(), singles.p50()));
    }
    table.note("each run: k pending messages of 1 KiB put in the reader's inbox (untimed), a page fetched, and confirmed; the PUT column is the sum of k calls");
    table.print();

    // The send's handler time, for the cost table: measured here on a fresh mailbox.
    let to = register(state4, &fresh_name("gina")).await;
    let send = ApiEvent::new("POST", "/messages")
        .bearer(&fx.alice_token)
        .json(json!({"recipient_id": to, "encrypted_data": fx.ciphertext_b64}));
    let mut v = Vec::new();
    for i in 0..220 {
        let t = timed(state, &send, 201).await;
        if i >= 20 {
            v.push(t);
        }
    }
    let send_us = Samples::from_us(v).p50();

    let mut cost = Table::new(
        "7b. API calls and dollars per million delivered messages (1 KiB; durations: the p50s above, billed rounded up to 1 ms at 256 MB arm64)",
        &[
            "page size k",
            "confirm",
            "calls/message",
            "billed ms/message",
            "HTTP API $",
            "Lambda req $",
            "Lambda compute $",
            "total $",
        ],
    );
    for (k, get, batch, single_sum) in per_page {
        let kf = k as f64;
        for (label, calls, billed, compute) in [
            (
                "batch",
                1.0 + 2.0 / kf,
                billed_ms(send_us) + (billed_ms(get) + billed_ms(batch)) / kf,
                per_million_calls(send_us)
                    + (per_million_calls(get) + per_million_calls(batch)) / kf,
            ),
            (
                "per id",
                2.0 + 1.0 / kf,
                // Each PUT is billed on its own: k invocations of (sum / k).
                billed_ms(send_us) + billed_ms(get) / kf + billed_ms(single_sum / kf),
                per_million_calls(send_us)
                    + per_million_calls(get) / kf
                    + per_million_calls(single_sum / kf),
            ),
        ] {
            let api = calls * API_PER_MILLION;
            let requests = calls * LAMBDA_REQUESTS_PER_MILLION;
            cost.row(vec![
                k.to_string(),
                label.into(),
                format!("{calls:.2}"),
                format!("{billed:.2}"),
                format!("{api:.2}"),
                format!("{requests:.2}"),
                format!("{:.4}", compute - api - requests),
                format!("{compute:.2}"),
            ]);
        }
    }
    cost.note(&format!(
        "send p50 {} us here; prices: HTTP API $1.00/M requests, Lambda $0.20/M requests + $0.0000133334/GB-s (arm64); logs, X-Ray, data transfer and the fixed monthly costs (RDS, proxy, secrets) not included",
        us(send_us)
    ));
    cost.note("durations are this machine's in-process handler times (x86_64, database on loopback); in AWS add the network to RDS Proxy (about 0.3 to 1 ms per round trip), which can cross the 1 ms billing step");
    cost.print();
}
