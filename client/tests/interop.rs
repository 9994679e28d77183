//! Cross-language: envelopes sealed by Python's `pyhpke` (client/tests/interop/envelope.py, an
//! independent implementation of ENVELOPE.md) open in this client, and this client's envelopes
//! open in Python. Needs the venv made by `scripts/client-interop-venv.sh` (`make test-client`
//! makes it and sets MESSENGER_INTEROP_REQUIRED=1): without it the test says so and passes,
//! unless required.

use base64::Engine as _;
use messenger_client::envelope::{self, OpenError, Plaintext};
use messenger_client::keys::PrivateKey;
use serde_json::{Value, json};
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use uuid::Uuid;

fn python() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("MESSENGER_INTEROP_PYTHON") {
        return Some(PathBuf::from(p));
    }
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.venv-client-interop/bin/python");
    if venv.exists() {
        return Some(venv);
    }
    assert!(
        std::env::var_os("MESSENGER_INTEROP_REQUIRED").is_none(),
        "MESSENGER_INTEROP_REQUIRED is set but there is no interop venv: run scripts/client-interop-venv.sh"
    );
    eprintln!(
        "interop: no .venv-client-interop (scripts/client-interop-venv.sh makes it); not run"
    );
    None
}

fn py(python: &PathBuf, req: Value) -> Value {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/interop/envelope.py");
    let mut child = Command::new(python)
        .arg(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("python starts");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(req.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "envelope.py failed");
    serde_json::from_slice(&out.stdout).expect("envelope.py answers JSON")
}

struct Party {
    id: Uuid,
    key: PrivateKey,
}

fn party() -> Party {
    Party {
        id: Uuid::now_v7(),
        key: PrivateKey::generate(),
    }
}

fn texts() -> Vec<String> {
    let mut t: Vec<String> = vec![
        "hello from the other side".into(),
        "ünïcödé, emoji 🔐, CJK 秘密, RTL שלום".into(),
        "line one\nline two\r\n\ttabbed \"quoted\" \\ backslash".into(),
        "x".into(),
        "a".repeat(60_000),
    ];
    t.extend((0..15).map(|i| format!("message number {i}")));
    t
}

#[test]
fn python_seals_rust_opens() {
    let Some(python) = python() else { return };
    let (alice, bob, carol) = (party(), party(), party());
    let texts = texts();
    let answer = py(
        &python,
        json!({"op": "seal", "sender_sk_pem": alice.key.to_pkcs8_pem(),
               "sender_pk_pem": alice.key.public_key().to_pem(),
               "recipient_pk_pem": bob.key.public_key().to_pem(),
               "sender_id": alice.id, "recipient_id": bob.id, "texts": texts}),
    );
    let envelopes = answer["envelopes"].as_array().unwrap();
    let ids = answer["ids"].as_array().unwrap();
    assert_eq!(envelopes.len(), texts.len());
    for ((b64, text), id) in envelopes.iter().zip(&texts).zip(ids) {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(b64.as_str().unwrap())
            .unwrap();
        let opened = envelope::open(
            &bytes,
            alice.id,
            bob.id,
            &[&bob.key],
            &[alice.key.public_key()],
        )
        .expect("a pyhpke envelope opens in Rust");
        assert_eq!(&opened.plaintext.text, text);
        assert_eq!(opened.plaintext.id.to_string(), id.as_str().unwrap());
        // Bound to the pair: it opens for no other pair, nor with another sender key.
        assert_eq!(
            envelope::open(
                &bytes,
                carol.id,
                bob.id,
                &[&bob.key],
                &[alice.key.public_key()]
            ),
            Err(OpenError::DoesNotOpen)
        );
        assert_eq!(
            envelope::open(
                &bytes,
                alice.id,
                bob.id,
                &[&bob.key],
                &[carol.key.public_key()]
            ),
            Err(OpenError::DoesNotOpen)
        );
    }
}

#[test]
fn rust_seals_python_opens() {
    let Some(python) = python() else { return };
    let (alice, bob, carol) = (party(), party(), party());
    let texts = texts();
    let plaintexts: Vec<Plaintext> = texts.iter().map(|t| Plaintext::new(t.clone())).collect();
    let mut envelopes: Vec<String> = plaintexts
        .iter()
        .map(|pt| {
            base64::engine::general_purpose::STANDARD.encode(envelope::seal(
                pt,
                alice.id,
                &alice.key,
                bob.id,
                &bob.key.public_key(),
            ))
        })
        .collect();
    // Two that must not open: one for Carol's account id, one tampered.
    envelopes.push(
        base64::engine::general_purpose::STANDARD.encode(envelope::seal(
            &Plaintext::new("for carol"),
            alice.id,
            &alice.key,
            carol.id,
            &bob.key.public_key(),
        )),
    );
    let mut tampered = envelope::seal(
        &Plaintext::new("t"),
        alice.id,
        &alice.key,
        bob.id,
        &bob.key.public_key(),
    );
    tampered[40] ^= 0x20;
    envelopes.push(base64::engine::general_purpose::STANDARD.encode(tampered));

    let answer = py(
        &python,
        json!({"op": "open", "recipient_sk_pem": bob.key.to_pkcs8_pem(),
               "sender_pk_pem": alice.key.public_key().to_pem(),
               "sender_id": alice.id, "recipient_id": bob.id, "envelopes": envelopes}),
    );
    let results = answer["results"].as_array().unwrap();
    assert_eq!(results.len(), texts.len() + 2);
    for (r, pt) in results.iter().zip(&plaintexts) {
        assert_eq!(r["ok"], json!(true), "a Rust envelope opens in pyhpke: {r}");
        assert_eq!(r["plaintext"]["text"].as_str().unwrap(), pt.text);
        assert_eq!(r["plaintext"]["id"].as_str().unwrap(), pt.id.to_string());
        assert_eq!(r["plaintext"]["v"], json!(1));
        let sent_at = r["plaintext"]["sent_at"].as_str().unwrap();
        assert!(sent_at.ends_with('Z') && chrono::DateTime::parse_from_rfc3339(sent_at).is_ok());
    }
    for r in &results[texts.len()..] {
        assert_eq!(r["ok"], json!(false), "refused by pyhpke too: {r}");
    }
}
