//! Cross-language: ENVELOPE.md version 2 between this client (vodozemac) and libolm 3 through
//! python-olm (client/tests/interop/olm_peer.py, which builds the API.md signatures on its own).
//! Sessions started from either side, pre-key and normal messages both ways, prekey signatures
//! checked by the other implementation. Needs the venv of `scripts/client-interop-venv.sh`;
//! without it the tests say so and pass, unless MESSENGER_INTEROP_REQUIRED is set.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use messenger_client::envelope::Plaintext;
use messenger_client::keys::{PrivateKey, PublicKey};
use messenger_client::olm::{
    ClaimedPrekey, DeviceAddress, MessageKind, OlmError, OlmState, SigningPublicKey, verify_prekey,
};
use serde_json::{Value, json};
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
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
        "olm interop: no .venv-client-interop (scripts/client-interop-venv.sh makes it); not run"
    );
    None
}

/// The libolm device: a running olm_peer.py.
struct LibolmPeer {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    address: DeviceAddress,
    identity: PublicKey,
    signing_key: SigningPublicKey,
}

impl LibolmPeer {
    fn start(python: &PathBuf, device_id: u32) -> Self {
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/interop/olm_peer.py");
        let mut child = Command::new(python)
            .arg(script)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("python starts");
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let address = DeviceAddress::new(Uuid::now_v7(), device_id);
        let mut peer = LibolmPeer {
            child,
            stdin,
            stdout,
            address,
            identity: PublicKey([0; 32]),
            signing_key: SigningPublicKey([0; 32]),
        };
        let keys =
            peer.call(json!({"op": "init", "user_id": address.user_id, "device_id": device_id}));
        peer.identity = PublicKey(raw(&keys["curve25519"]));
        peer.signing_key = SigningPublicKey(raw(&keys["ed25519"]));
        peer
    }

    fn try_call(&mut self, request: Value) -> Result<Value, String> {
        writeln!(self.stdin, "{request}").unwrap();
        self.stdin.flush().unwrap();
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        let answer: Value = serde_json::from_str(&line).expect("olm_peer.py answers JSON");
        match answer.get("error") {
            Some(error) => Err(error.to_string()),
            None => Ok(answer),
        }
    }

    fn call(&mut self, request: Value) -> Value {
        let op = request["op"].clone();
        self.try_call(request)
            .unwrap_or_else(|e| panic!("olm_peer.py {op} failed: {e}"))
    }

    fn encrypt(&mut self, to: &RustDevice, text: &str) -> (Vec<u8>, u64) {
        let answer = self.call(json!({"op": "encrypt", "peer": "rust", "text": text,
            "to": {"user_id": to.address.user_id, "device_id": to.address.device_id}}));
        let envelope = BASE64.decode(answer["envelope"].as_str().unwrap()).unwrap();
        (envelope, answer["type"].as_u64().unwrap())
    }

    fn decrypt(&mut self, from: &RustDevice, envelope: &[u8]) -> Value {
        self.call(
            json!({"op": "decrypt", "peer": "rust", "envelope": BASE64.encode(envelope),
            "identity_key": BASE64.encode(from.key.public_key().0)}),
        )
    }
}

impl Drop for LibolmPeer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn raw<const N: usize>(value: &Value) -> [u8; N] {
    BASE64
        .decode(value.as_str().expect("a base64 string"))
        .unwrap()
        .try_into()
        .unwrap()
}

struct RustDevice {
    address: DeviceAddress,
    key: PrivateKey,
    state: OlmState,
}

fn rust_device(device_id: u32) -> RustDevice {
    let address = DeviceAddress::new(Uuid::now_v7(), device_id);
    let key = PrivateKey::generate();
    let state = OlmState::new(address, &key, None).unwrap();
    RustDevice {
        address,
        key,
        state,
    }
}

fn claim(prekey: &Value, last_resort: bool) -> ClaimedPrekey {
    ClaimedPrekey {
        key_id: prekey["key_id"].as_u64().unwrap() as u32,
        public_key: prekey["public_key"].as_str().unwrap().into(),
        signature: prekey["signature"].as_str().unwrap().into(),
        last_resort,
    }
}

fn open(
    rust: &mut RustDevice,
    peer: &LibolmPeer,
    envelope: &[u8],
) -> Result<(String, MessageKind), OlmError> {
    rust.state
        .decrypt(envelope, peer.address, &peer.identity)
        .map(|d| (d.plaintext.text, d.kind))
}

fn seal(rust: &mut RustDevice, peer: &LibolmPeer, text: &str) -> Vec<u8> {
    rust.state
        .encrypt(peer.address, &peer.identity, &Plaintext::new(text))
        .unwrap()
}

/// What libolm read, checked field by field (from/to as ENVELOPE.md version 2 has them).
fn assert_read(answer: &Value, text: &str, from: &RustDevice, to: &LibolmPeer) {
    let plaintext = &answer["plaintext"];
    assert_eq!(plaintext["v"], json!(1));
    assert_eq!(plaintext["text"].as_str().unwrap(), text);
    assert_eq!(
        plaintext["from"],
        json!({"user_id": from.address.user_id, "device_id": from.address.device_id})
    );
    assert_eq!(
        plaintext["to"],
        json!({"user_id": to.address.user_id, "device_id": to.address.device_id})
    );
}

#[test]
fn rust_starts_a_session_with_libolm() {
    let Some(python) = python() else { return };
    let mut peer = LibolmPeer::start(&python, 3);
    let mut rust = rust_device(1);

    // libolm's prekeys, signed by olm_peer.py's own layout code, verify here under its key.
    let upload = peer.call(json!({"op": "upload", "count": 3, "last_resort": true}));
    let prekeys = upload["prekeys"].as_array().unwrap();
    assert_eq!(prekeys.len(), 3);
    for prekey in prekeys {
        verify_prekey(&claim(prekey, false), peer.address, &peer.signing_key).unwrap();
        // Not for another device id, nor as a last-resort key.
        let elsewhere = DeviceAddress::new(peer.address.user_id, 4);
        assert_eq!(
            verify_prekey(&claim(prekey, false), elsewhere, &peer.signing_key),
            Err(OlmError::BadPrekeySignature)
        );
        assert_eq!(
            verify_prekey(&claim(prekey, true), peer.address, &peer.signing_key),
            Err(OlmError::BadPrekeySignature)
        );
    }
    verify_prekey(
        &claim(&upload["last_resort"], true),
        peer.address,
        &peer.signing_key,
    )
    .unwrap();

    let prekey =
        verify_prekey(&claim(&prekeys[0], false), peer.address, &peer.signing_key).unwrap();
    rust.state.start_session(&peer.identity, &prekey).unwrap();
    for text in [
        "first, a pre-key message",
        "second, still pre-key",
        "ünïcödé 🔐",
    ] {
        let envelope = seal(&mut rust, &peer, text);
        assert_eq!(&envelope[..2], &[0x02, 0x00]);
        let answer = peer.decrypt(&rust, &envelope);
        assert_read(&answer, text, &rust, &peer);
    }
    // libolm answers on that session: normal messages from now on, both ways, many ratchet steps.
    for i in 0..5 {
        let text = format!("libolm {i}");
        let (envelope, kind) = peer.encrypt(&rust, &text);
        assert_eq!(kind, 1);
        assert_eq!(
            open(&mut rust, &peer, &envelope).unwrap(),
            (text, MessageKind::Normal)
        );
        let text = format!("rust {i}");
        let envelope = seal(&mut rust, &peer, &text);
        assert_eq!(envelope[1], 0x01);
        assert_read(&peer.decrypt(&rust, &envelope), &text, &rust, &peer);
    }
    // A second session from libolm's last-resort key also works.
    let mut other = rust_device(2);
    let last_resort = verify_prekey(
        &claim(&upload["last_resort"], true),
        peer.address,
        &peer.signing_key,
    )
    .unwrap();
    other
        .state
        .start_session(&peer.identity, &last_resort)
        .unwrap();
    let envelope = seal(&mut other, &peer, "from the last-resort key");
    let answer = peer.call(
        json!({"op": "decrypt", "peer": "other", "envelope": BASE64.encode(&envelope),
        "identity_key": BASE64.encode(other.key.public_key().0)}),
    );
    assert_eq!(answer["plaintext"]["text"], "from the last-resort key");
    assert_eq!(answer["new_session"], true);
}

#[test]
fn libolm_starts_a_session_with_rust() {
    let Some(python) = python() else { return };
    let mut peer = LibolmPeer::start(&python, 7);
    let mut rust = rust_device(2);

    // This client's prekeys verify in libolm's ed25519_verify over the layout olm_peer.py builds.
    let upload = rust.state.prekey_upload(4, true).unwrap();
    rust.state.mark_prekeys_published();
    let upload = serde_json::to_value(&upload).unwrap();
    let signing_key = BASE64.encode(rust.state.signing_key().0);
    let verify = |peer: &mut LibolmPeer, prekey: &Value, device_id: u32, last_resort: bool| {
        peer.call(
            json!({"op": "verify_prekey", "user_id": rust.address.user_id, "device_id": device_id,
            "signing_key": signing_key, "prekey": prekey, "last_resort": last_resort}),
        )["ok"]
            .as_bool()
            .unwrap()
    };
    for prekey in upload["prekeys"].as_array().unwrap() {
        assert!(
            verify(&mut peer, prekey, 2, false),
            "libolm verifies {prekey}"
        );
        assert!(
            !verify(&mut peer, prekey, 3, false),
            "not for another device id"
        );
        assert!(
            !verify(&mut peer, prekey, 2, true),
            "not as a last-resort key"
        );
    }
    assert!(verify(&mut peer, &upload["last_resort"], 2, true));
    assert!(!verify(&mut peer, &upload["last_resort"], 2, false));

    let held = rust.state.one_time_keys_held();
    peer.call(json!({"op": "start", "peer": "rust", "identity_key": BASE64.encode(rust.key.public_key().0),
        "one_time_key": upload["prekeys"][1]["public_key"]}));
    let (first, kind) = peer.encrypt(&rust, "hello from libolm");
    assert_eq!((kind, &first[..2]), (0, &[0x02u8, 0x00][..]));
    let (second, _) = peer.encrypt(&rust, "again, unanswered");
    // Refused first (and nothing used up) when the sender device's pinned key is another one,
    // or the delivery names another device.
    assert_eq!(
        rust.state
            .decrypt(&first, peer.address, &PrivateKey::generate().public_key()),
        Err(OlmError::IdentityKeyMismatch)
    );
    assert_eq!(
        rust.state.decrypt(
            &first,
            DeviceAddress::new(peer.address.user_id, 8),
            &peer.identity
        ),
        Err(OlmError::Misaddressed("from"))
    );
    assert_eq!(rust.state.one_time_keys_held(), held);
    let opened = rust
        .state
        .decrypt(&first, peer.address, &peer.identity)
        .unwrap();
    assert_eq!(
        (
            opened.plaintext.text.as_str(),
            opened.kind,
            opened.new_session
        ),
        ("hello from libolm", MessageKind::PreKey, true)
    );
    assert_eq!(
        rust.state.one_time_keys_held(),
        held - 1,
        "the one-time key is used up"
    );
    assert_eq!(
        open(&mut rust, &peer, &second).unwrap(),
        ("again, unanswered".into(), MessageKind::PreKey)
    );
    let (third, _) = peer.encrypt(&rust, "third");
    assert_eq!(open(&mut rust, &peer, &third).unwrap().0, "third");

    // Rust answers; the state goes through its JSON in between, as the CLI saves it.
    rust.state = OlmState::from_json(&rust.state.to_json(), &rust.key.public_key()).unwrap();
    for i in 0..5 {
        let text = format!("rust {i}");
        let envelope = seal(&mut rust, &peer, &text);
        assert_eq!(
            envelope[1], 0x01,
            "an answered inbound session sends normal messages"
        );
        assert_read(&peer.decrypt(&rust, &envelope), &text, &rust, &peer);
        let text = format!("libolm {i}");
        let (envelope, kind) = peer.encrypt(&rust, &text);
        assert_eq!(kind, 1);
        assert_eq!(
            open(&mut rust, &peer, &envelope).unwrap(),
            (text, MessageKind::Normal)
        );
    }

    // libolm also starts from this client's last-resort key, which stays for further sessions.
    let mut second_peer = LibolmPeer::start(&python, 9);
    second_peer.call(json!({"op": "start", "peer": "rust", "identity_key": BASE64.encode(rust.key.public_key().0),
        "one_time_key": upload["last_resort"]["public_key"]}));
    let (envelope, _) = second_peer.encrypt(&rust, "via last resort");
    assert_eq!(
        open(&mut rust, &second_peer, &envelope).unwrap().0,
        "via last resort"
    );
}
