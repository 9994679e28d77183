//! `send` retries safely: a lost answer (the connection closes) and a 503 are retried with the
//! same body and the same `Idempotency-Key`, so the server can store the message once. Against
//! a small scripted HTTP server on the loopback.

use messenger_client::app::{App, Output};
use messenger_client::keys::PrivateKey;
use messenger_client::store::{Account, CachedToken, Keyring, Profile};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use uuid::Uuid;

#[derive(Debug, Clone)]
struct Seen {
    line: String,
    idempotency_key: Option<String>,
    body: String,
}

#[test]
fn send_retries_with_the_same_body_and_key() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let bob_id = Uuid::now_v7();
    let bob_public = PrivateKey::generate().public_key();
    let (bob_key, bob_fp) = (bob_public.to_pem(), bob_public.fingerprint());
    let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
    let log = seen.clone();
    std::thread::spawn(move || {
        let mut posts = 0;
        for stream in listener.incoming() {
            let mut stream = stream.unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 {
                    break;
                }
                let (mut len, mut key) = (0usize, None);
                loop {
                    let mut h = String::new();
                    reader.read_line(&mut h).unwrap();
                    let h = h.trim_end();
                    if h.is_empty() {
                        break;
                    }
                    let (name, value) = h.split_once(':').unwrap();
                    match name.to_ascii_lowercase().as_str() {
                        "content-length" => len = value.trim().parse().unwrap(),
                        "idempotency-key" => key = Some(value.trim().to_string()),
                        _ => {}
                    }
                }
                let mut body = vec![0; len];
                reader.read_exact(&mut body).unwrap();
                let line = line.trim_end().to_string();
                log.lock().unwrap().push(Seen {
                    line: line.clone(),
                    idempotency_key: key,
                    body: String::from_utf8(body).unwrap(),
                });
                let (status, json) = if line.starts_with("GET /users?name=bob") {
                    (
                        "200 OK",
                        serde_json::json!({"user_id": bob_id, "name": "bob", "public_key": bob_key})
                            .to_string(),
                    )
                } else if line.starts_with(&format!("GET /users/{bob_id}/devices "))
                    || line.starts_with(&format!("GET /keys/{bob_id} "))
                {
                    (
                        "200 OK",
                        serde_json::json!({"user_id": bob_id, "devices": [{"device_id": 1,
                            "public_key": bob_key, "key_fingerprint": bob_fp}]})
                        .to_string(),
                    )
                } else if line.starts_with("POST /messages/devices ") {
                    posts += 1;
                    match posts {
                        // The answer is lost: the connection closes without one.
                        1 => break,
                        2 => (
                            "503 Service Unavailable",
                            r#"{"error":"unavailable","message":"database unreachable"}"#
                                .to_string(),
                        ),
                        _ => (
                            "201 Created",
                            serde_json::json!({"sender_id": Uuid::now_v7(), "sender_device_id": 1,
                                "recipient_id": bob_id, "timestamp": "2026-01-01T00:00:00Z",
                                "expires_at": "2026-01-08T00:00:00Z",
                                "messages": [{"device_id": 1, "id": Uuid::now_v7()}]})
                            .to_string(),
                        ),
                    }
                } else {
                    (
                        "404 Not Found",
                        r#"{"error":"not_found","message":"no"}"#.to_string(),
                    )
                };
                let resp = format!(
                    "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{json}",
                    json.len()
                );
                stream.write_all(resp.as_bytes()).unwrap();
            }
        }
    });

    let home = std::env::temp_dir().join(format!("messenger-retry-{}", Uuid::now_v7()));
    // SAFETY: the only test in this binary; nothing else reads the environment concurrently.
    unsafe { std::env::set_var("MESSENGER_HOME", &home) };
    let profile = Profile::at(&home, "alice").unwrap();
    {
        let _lock = profile.lock().unwrap();
        profile
            .save_keyring(&Keyring::new(&PrivateKey::generate()))
            .unwrap();
        profile
            .save_account(&Account {
                api: base.clone(),
                name: "alice".into(),
                user_id: Uuid::now_v7(),
                device_id: 1,
                registered_at: chrono::Utc::now(),
            })
            .unwrap();
        profile
            .save_token(&CachedToken {
                access_token: "a-token".into(),
                expires_at: chrono::Utc::now() + chrono::TimeDelta::minutes(10),
                api: base.clone(),
            })
            .unwrap();
    }
    let app = App::new("alice", Some(&base), Output { json: true }).unwrap();
    let result = app.send("bob", "hello through a flaky network").unwrap();
    assert_eq!(result["attempts"], 3, "{result}");

    let seen = seen.lock().unwrap().clone();
    let posts: Vec<&Seen> = seen
        .iter()
        .filter(|s| s.line.starts_with("POST /messages/devices "))
        .collect();
    assert_eq!(posts.len(), 3, "{seen:?}");
    let key = posts[0]
        .idempotency_key
        .clone()
        .expect("an Idempotency-Key");
    assert_eq!(
        result["message_id"].as_str(),
        Some(key.as_str()),
        "the key is the plaintext id"
    );
    for p in &posts {
        assert_eq!(p.idempotency_key.as_deref(), Some(key.as_str()));
        assert_eq!(
            p.body, posts[0].body,
            "every attempt carries the same ciphertext"
        );
    }
    assert!(
        !posts[0].body.contains("hello"),
        "only ciphertext on the wire"
    );
    std::fs::remove_dir_all(home).unwrap();
}
