//! Running the release binaries as Lambda runs them: their environment, events for each
//! function, and the Runtime API exchanges (used by the cold-start and footprint phases).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use functions::api_event::ApiEvent;
use serde_json::{Value, json};

use crate::Settings;
use crate::fixture::{ED25519, EVENTBRIDGE, Fixture, JWT_SECRET, PASSWORD, fresh_name, next_ip};
use crate::runtime_api::{Report, RuntimeApi};

pub(crate) fn lambda_env(
    settings: &Settings,
    function: &str,
    api: &str,
    bcrypt_cost: u32,
) -> Vec<(String, String)> {
    [
        ("PATH", "/usr/local/bin:/usr/bin:/bin".to_string()),
        ("LANG", "en_US.UTF-8".into()),
        ("TZ", ":UTC".into()),
        ("AWS_LAMBDA_RUNTIME_API", api.to_string()),
        ("AWS_LAMBDA_FUNCTION_NAME", function.to_string()),
        ("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "256".into()),
        ("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST".into()),
        (
            "AWS_LAMBDA_LOG_STREAM_NAME",
            "2026/11/28/[$LATEST]0123456789abcdef0123456789abcdef".into(),
        ),
        (
            "AWS_LAMBDA_LOG_GROUP_NAME",
            format!("/aws/lambda/{function}"),
        ),
        ("AWS_REGION", "us-east-1".into()),
        ("AWS_DEFAULT_REGION", "us-east-1".into()),
        ("AWS_EXECUTION_ENV", "AWS_Lambda_provided.al2023".into()),
        ("DATABASE_URL", settings.database_url.clone()),
        ("JWT_SECRET", JWT_SECRET.into()),
        ("BCRYPT_COST", bcrypt_cost.to_string()),
        // Cost, not quotas: the fixture's sender has sent thousands by now (fixture.rs).
        ("SEND_MAX_PER_WINDOW", "1000000".to_string()),
        ("MAX_PENDING_PER_RECIPIENT", "1000000".to_string()),
        ("MAX_PENDING_FROM_ONE_SENDER", "1000000".to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    // Extra variables for experiments: BENCH_FUNCTION_ENV="DB_MAX_CONNECTIONS=1,RUST_LOG=warn".
    .chain(
        std::env::var("BENCH_FUNCTION_ENV")
            .unwrap_or_default()
            .split(',')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect::<Vec<_>>(),
    )
    .collect()
}

pub(crate) fn spawn(bin: &Path, env: Vec<(String, String)>) -> std::process::Child {
    Command::new(bin)
        .env_clear()
        .envs(env)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {}: {e}", bin.display()))
}

pub(crate) fn stop(mut child: std::process::Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// A real-route event for `function`, fresh for each call (`n`) where it must be.
pub(crate) fn event_for(function: &str, fx: &Fixture, n: usize, warm: bool) -> (String, u16) {
    let t = fx.alice_token.as_str();
    let request = match function {
        "register" => ApiEvent::new("POST", "/register").source_ip(&next_ip()).json(
            json!({"name": fresh_name(&format!("r{n}x")), "password": PASSWORD, "public_key": ED25519}),
        ),
        "login" => {
            let name = if warm { &fx.login_4 } else { &fx.login_cfg };
            ApiEvent::new("POST", "/login").json(json!({"name": name, "password": PASSWORD}))
        }
        "me" => ApiEvent::new("GET", "/me").bearer(t),
        "get-public-key" => ApiEvent::new("GET", format!("/public-key/{}", fx.bob)).bearer(t),
        "update-key" => ApiEvent::new("PUT", "/update-key")
            .bearer(t)
            .json(json!({"public_key": ED25519})),
        "lookup-user" => ApiEvent::new("GET", format!("/users?name={}", fx.bob_name)).bearer(t),
        "health" => ApiEvent::new("GET", "/health/ready"),
        "send-message" => ApiEvent::new("POST", "/messages")
            .bearer(t)
            .json(json!({"recipient_id": fx.carol, "encrypted_data": fx.ciphertext_b64})),
        "get-messages" => ApiEvent::new("GET", "/messages").bearer(t),
        "confirm-delivery" => {
            ApiEvent::new("PUT", format!("/messages/{}/delivered", fx.confirmed_id)).bearer(t)
        }
        "metrics" => ApiEvent::new("GET", "/metrics"),
        "not-found" => ApiEvent::new("GET", "/nowhere"),
        "purge" => return (EVENTBRIDGE.to_string(), 0),
        other => panic!("no event for {other}"),
    };
    let status = match function {
        "register" | "send-message" => 201,
        "confirm-delivery" => 204,
        "not-found" => 404,
        _ => 200,
    };
    (request.event().1, status)
}

/// Checks the function's answer: the HTTP status inside the API Gateway response, or, for the
/// purge, a report.
pub(crate) fn check_answer(function: &str, body: &[u8], expect: u16) -> Result<(), String> {
    let value: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let ok = if function == "purge" {
        value.get("complete").is_some()
    } else {
        value["statusCode"].as_u64() == Some(u64::from(expect))
    };
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{function} answered {}",
            String::from_utf8_lossy(body)
        ))
    }
}

pub(crate) const REPORT_TIMEOUT: Duration = Duration::from_secs(30);

pub(crate) async fn wait_for_next(api: &mut RuntimeApi, function: &str) -> Instant {
    loop {
        match api.report(REPORT_TIMEOUT).await {
            Some(Report::Next(at)) => return at,
            Some(Report::InitError(body) | Report::Error(body)) => {
                panic!("{function}: {}", String::from_utf8_lossy(&body))
            }
            Some(Report::Response(..)) => {}
            None => panic!("{function}: no `next` poll within {REPORT_TIMEOUT:?}"),
        }
    }
}

pub(crate) async fn wait_for_response(api: &mut RuntimeApi, function: &str) -> (Instant, Vec<u8>) {
    loop {
        match api.report(REPORT_TIMEOUT).await {
            Some(Report::Response(at, body)) => return (at, body),
            Some(Report::InitError(body) | Report::Error(body)) => {
                panic!("{function}: {}", String::from_utf8_lossy(&body))
            }
            Some(Report::Next(_)) => {}
            None => panic!("{function}: no response within {REPORT_TIMEOUT:?}"),
        }
    }
}
