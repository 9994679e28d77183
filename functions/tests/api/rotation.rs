//! Rotating the JWT secret under live traffic, as `make rotate-jwt-secret` does it: a fleet of
//! instances is updated one by one, three times (accept the new secret; sign with it, still
//! accepting the old one; after a token lifetime, drop the old one), while clients log in at
//! one instance and call another. Not one unexpired token is refused. The one-step rotation,
//! updated the same way, refuses many.

use std::time::{Duration, Instant};

use sqlx::PgPool;

use crate::support::TestApp;

const OLD: &str = "the-old-jwt-secret-0123456789abcdef";
const NEW: &str = "the-new-jwt-secret-0123456789abcdef";
const TTL_SECONDS: u64 = 3;
const FLEET: usize = 6;

fn instance(pool: &PgPool, secret: &str, previous: Option<&str>) -> TestApp {
    let ttl = TTL_SECONDS.to_string();
    let mut vars = vec![("JWT_SECRET", secret), ("JWT_TTL_SECONDS", ttl.as_str())];
    if let Some(previous) = previous {
        vars.push(("JWT_PREVIOUS_SECRET", previous));
    }
    TestApp::with_env(pool.clone(), &vars)
}

/// Rolls the fleet through `phases` (JWT_SECRET, JWT_PREVIOUS_SECRET) one instance at a time,
/// waiting a token lifetime before a phase that drops a secret. Between two replacements every
/// client logs in at one instance and calls `GET /me` with each token it holds that is still
/// unexpired (with a second to spare) at every instance. Returns (calls, 401s).
async fn rolling_rotation(pool: &PgPool, phases: &[(&str, Option<&str>)]) -> (usize, usize) {
    let mut fleet: Vec<TestApp> = (0..FLEET).map(|_| instance(pool, OLD, None)).collect();
    let mut tokens: Vec<(Instant, String)> = Vec::new();
    let (mut calls, mut refused) = (0, 0);
    let mut previous_phase_accepted_old = true;
    for &(secret, previous) in phases {
        if previous_phase_accepted_old && secret != OLD && previous != Some(OLD) {
            // The old secret is dropped only once every token it signed has expired.
            tokio::time::sleep(Duration::from_secs(TTL_SECONDS) + Duration::from_millis(200)).await;
        }
        previous_phase_accepted_old = secret == OLD || previous == Some(OLD);
        for replaced in 0..FLEET {
            fleet[replaced] = instance(pool, secret, previous);
            for (n, login_at) in fleet.iter().enumerate() {
                if (n + replaced) % 2 == 0 {
                    tokens.push((Instant::now(), login_at.login("alice").await));
                }
            }
            tokens.retain(|(at, _)| at.elapsed() < Duration::from_secs(TTL_SECONDS - 1));
            for app in &fleet {
                for (_, token) in &tokens {
                    let r = app.request("GET", "/me").bearer(token).send().await;
                    calls += 1;
                    match r.status {
                        200 => {}
                        401 => refused += 1,
                        other => panic!("{other}: {}", r.text),
                    }
                }
            }
        }
    }
    (calls, refused)
}

#[sqlx::test(migrator = "common::db::MIGRATOR")]
async fn rotating_the_jwt_secret_refuses_no_live_token(pool: PgPool) {
    let app = TestApp::with_env(pool.clone(), &[("JWT_SECRET", OLD)]);
    app.register("alice").await;

    // make rotate-jwt-secret: three rolling updates.
    let staged = [(OLD, Some(NEW)), (NEW, Some(OLD)), (NEW, None)];
    let (calls, refused) = rolling_rotation(&pool, &staged).await;
    println!("staged rotation: {calls} calls, {refused} refused");
    assert!(calls > 500, "{calls} calls");
    assert_eq!(
        refused, 0,
        "a live token was refused during the staged rotation"
    );

    // The one-step rotation (the new secret alone, rolled out the same way, even after every
    // old token expired) refuses tokens while it rolls: an instance not yet updated does not
    // know the secret the updated ones sign with.
    let (calls, refused) = rolling_rotation(&pool, &[(NEW, None)]).await;
    println!("one-step rotation: {calls} calls, {refused} refused");
    assert!(refused > 0);
}
