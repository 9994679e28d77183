//! Database faults against a throwaway PostgreSQL cluster each test starts and stops itself
//! (never the machine's shared server): every endpoint answers 503 within 2 s while it is down
//! or has no connection left to give, liveness stays 200, the same warm instance serves again
//! once it is back, and no message that got a 201 is lost.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::support::TestApp;

struct Cluster {
    dir: PathBuf,
    port: u16,
    settings: String,
}

fn pg_bin(name: &str) -> PathBuf {
    if let Ok(out) = Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .output()
        && out.status.success()
    {
        return PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL's server binaries (initdb, pg_ctl) are needed for the fault tests")
        .filter_map(|e| e.ok().map(|e| e.path().join("bin").join(name)))
        .filter(|p| p.exists())
        .collect();
    found.sort();
    found.pop().unwrap_or_else(|| panic!("{name} not found"))
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0\n"))
}

/// Runs a PostgreSQL tool, as the `postgres` user when we are root (PostgreSQL refuses root).
fn run_pg(program: &Path, args: &[&str]) {
    let status = if is_root() {
        Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(program)
            .args(args)
            .status()
    } else {
        Command::new(program).args(args).status()
    }
    .expect("run a PostgreSQL tool");
    assert!(status.success(), "{} {args:?} failed", program.display());
}

impl Cluster {
    fn start() -> Self {
        Self::start_with("")
    }

    /// With extra server settings (`-c name=value ...`).
    fn start_with(settings: &str) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir =
            std::env::temp_dir().join(format!("messenger-fault-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        if is_root() {
            assert!(
                Command::new("chown")
                    .args(["postgres:", dir.to_str().unwrap()])
                    .status()
                    .unwrap()
                    .success()
            );
        }
        let data = dir.join("data");
        run_pg(
            &pg_bin("initdb"),
            &[
                "-D",
                data.to_str().unwrap(),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "-N",
            ],
        );
        let cluster = Self {
            dir,
            port,
            settings: settings.to_string(),
        };
        cluster.pg_ctl_start();
        cluster
    }

    fn pg_ctl_start(&self) {
        let data = self.dir.join("data");
        let log = self.dir.join("server.log");
        let opts = format!(
            "-p {} -c listen_addresses=127.0.0.1 -k {} -c fsync=off {}",
            self.port,
            self.dir.display(),
            self.settings
        );
        run_pg(
            &pg_bin("pg_ctl"),
            &[
                "-D",
                data.to_str().unwrap(),
                "-l",
                log.to_str().unwrap(),
                "-w",
                "-o",
                &opts,
                "start",
            ],
        );
    }

    fn stop(&self) {
        let data = self.dir.join("data");
        run_pg(
            &pg_bin("pg_ctl"),
            &[
                "-D",
                data.to_str().unwrap(),
                "-m",
                "immediate",
                "-w",
                "stop",
            ],
        );
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let data = self.dir.join("data");
        if data.join("postmaster.pid").exists() {
            let _ = std::panic::catch_unwind(|| {
                run_pg(
                    &pg_bin("pg_ctl"),
                    &["-D", data.to_str().unwrap(), "-m", "immediate", "stop"],
                )
            });
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test]
async fn database_outage_and_recovery() {
    let cluster = Cluster::start();
    let url = cluster.url();
    let app = TestApp::connect(&[("DATABASE_URL", &url)]).await;
    functions::migrate::run(&app.state.db).await.unwrap();
    let (_, alice_token) = app.user("alice").await;
    let (bob, bob_token) = app.user("bob").await;
    let send = |n: u32| {
        app.request("POST", "/messages")
            .bearer(&alice_token)
            .json(json!({"recipient_id": bob, "encrypted_data": base64_of(n)}))
            .send()
    };
    let mut acknowledged = Vec::new();
    for n in 0..5 {
        let r = send(n).await;
        assert_eq!(r.status, 201);
        acknowledged.push(r.body["id"].as_str().unwrap().to_string());
    }

    cluster.stop();
    let calls = every_database_endpoint(&bob, &acknowledged[0]);
    let slowest = all_unavailable_within_2s(&app, &alice_token, &calls).await;
    assert_eq!(
        app.request("GET", "/health").send().await.status,
        200,
        "liveness touches nothing"
    );
    println!(
        "database down: {} endpoints answered 503, slowest in {} ms",
        calls.len(),
        slowest.as_millis()
    );

    cluster.pg_ctl_start();
    let restarted = Instant::now();
    loop {
        let r = app.request("GET", "/health/ready").send().await;
        if r.status == 200 {
            break;
        }
        assert!(
            restarted.elapsed() < Duration::from_secs(30),
            "the pool did not recover"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!(
        "recovered {} ms after the database came back, same instance",
        restarted.elapsed().as_millis()
    );

    // Every message that got a 201 survived the outage; the warm instance serves as before.
    let r = app
        .request("GET", "/messages")
        .bearer(&bob_token)
        .send()
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let ids: Vec<&str> = r.body["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        acknowledged.iter().map(String::as_str).collect::<Vec<_>>()
    );
    assert_eq!(send(99).await.status, 201);
}

type Call = (&'static str, String, Option<serde_json::Value>);

/// One request for every endpoint that needs the database.
fn every_database_endpoint(bob: &str, message: &str) -> Vec<Call> {
    vec![
        (
            "POST",
            "/register".into(),
            Some(
                json!({"name": "carol", "password": "long-enough-pw", "public_key": crate::support::key("p256.pem")}),
            ),
        ),
        (
            "POST",
            "/login".into(),
            Some(json!({"name": "alice", "password": crate::support::PASSWORD})),
        ),
        ("GET", "/me".into(), None),
        (
            "DELETE",
            "/me".into(),
            Some(json!({"password": crate::support::PASSWORD})),
        ),
        ("GET", format!("/public-key/{bob}"), None),
        (
            "PUT",
            "/update-key".into(),
            Some(json!({"public_key": crate::support::key("p256.pem")})),
        ),
        ("GET", "/users?name=bob".into(), None),
        (
            "POST",
            "/messages".into(),
            Some(json!({"recipient_id": bob, "encrypted_data": "aGk="})),
        ),
        ("GET", "/messages".into(), None),
        ("PUT", format!("/messages/{message}/delivered"), None),
        (
            "POST",
            "/messages/delivered".into(),
            Some(json!({ "ids": [message] })),
        ),
        ("GET", "/metrics".into(), None),
        ("GET", "/health/ready".into(), None),
    ]
}

/// Each call answers 503 `unavailable` within 2 s; the slowest answer.
async fn all_unavailable_within_2s(app: &TestApp, token: &str, calls: &[Call]) -> Duration {
    let mut slowest = Duration::ZERO;
    for (method, path, body) in calls {
        let started = Instant::now();
        let mut request = app.request(method, path).bearer(token);
        if let Some(body) = body {
            request = request.json(body.clone());
        }
        let r = request.send().await;
        let took = started.elapsed();
        r.assert_error(503, "unavailable");
        assert!(
            took < Duration::from_secs(2),
            "{method} {path}: 503 after {took:?}"
        );
        slowest = slowest.max(took);
    }
    slowest
}

/// A database with no connection left to give (a spike of instances, say): a new instance
/// answers 503 within 2 s on every endpoint instead of hanging until the Lambda times out, and
/// serves again as soon as connections are free.
#[tokio::test]
async fn a_database_at_its_connection_limit_answers_503_fast() {
    use sqlx::Connection;
    let cluster = Cluster::start_with("-c max_connections=6 -c superuser_reserved_connections=0");
    let url = cluster.url();
    let setup = TestApp::connect(&[("DATABASE_URL", &url)]).await;
    functions::migrate::run(&setup.state.db).await.unwrap();
    let (_, alice_token) = setup.user("alice").await;
    let (bob, bob_token) = setup.user("bob").await;
    let sent = setup
        .request("POST", "/messages")
        .bearer(&alice_token)
        .json(json!({"recipient_id": bob, "encrypted_data": "aGk="}))
        .send()
        .await;
    let message = sent.body["id"].as_str().unwrap().to_string();

    // Every connection the server allows is taken.
    let mut taken = Vec::new();
    while let Ok(connection) = sqlx::PgConnection::connect(&url).await {
        taken.push(connection);
        assert!(taken.len() < 10, "max_connections is not in force");
    }
    let app = TestApp::connect(&[("DATABASE_URL", &url)]).await;
    let calls = every_database_endpoint(&bob, &message);
    let slowest = all_unavailable_within_2s(&app, &alice_token, &calls).await;
    assert_eq!(app.request("GET", "/health").send().await.status, 200);
    println!(
        "database full: {} endpoints answered 503, slowest in {} ms",
        calls.len(),
        slowest.as_millis()
    );

    for connection in taken {
        connection.close().await.unwrap();
    }
    let r = app
        .request("GET", "/messages")
        .bearer(&bob_token)
        .send()
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["messages"][0]["id"], message.as_str());
}

fn base64_of(n: u32) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(format!("message {n}"))
}
