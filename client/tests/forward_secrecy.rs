//! Forward secrecy, ENVELOPE.md version 2 against version 1: an attacker who records ciphertexts
//! and later copies everything the recipient device holds (its Olm state file and its X25519
//! private key) opens no version 2 message the device had already read; with version 1 the same
//! copy opens every recorded message.

mod olm_devices;

use messenger_client::envelope::{self, Plaintext};
use messenger_client::keys::PrivateKey;
use messenger_client::olm::{OlmError, OlmState};
use olm_devices::{Device, claim, device};

/// Everything a stolen device gives away: its files, as text.
struct Loot {
    state_json: String,
    key_pem: String,
}

fn steal(device: &Device) -> Loot {
    Loot {
        state_json: device.state.to_json().to_string(),
        key_pem: device.key.to_pkcs8_pem(),
    }
}

/// The attacker's device, rebuilt from the loot.
fn restore(loot: &Loot) -> OlmState {
    let key = PrivateKey::from_pkcs8_pem(&loot.key_pem).unwrap();
    OlmState::from_json(&loot.state_json, &key.public_key()).unwrap()
}

#[test]
fn version_2_messages_once_read_do_not_open_from_a_copy_of_the_recipient() {
    let (mut alice, mut bob) = (device(1), device(2));
    let upload = bob.state.prekey_upload(5, true).unwrap();
    bob.state.mark_prekeys_published();
    let prekey = claim(&upload.prekeys[0], false, &bob);
    alice
        .state
        .start_session(&bob.key.public_key(), &prekey)
        .unwrap();

    // Recorded on the wire (or on the server): a pre-key message, then a normal one after a
    // ratchet step.
    let captured_pre_key = alice
        .state
        .encrypt(
            bob.address,
            &bob.key.public_key(),
            &Plaintext::new("secret one"),
        )
        .unwrap();
    let before_reading = steal(&bob);
    let opened = bob
        .state
        .decrypt(&captured_pre_key, alice.address, &alice.key.public_key())
        .unwrap();
    assert_eq!(opened.plaintext.text, "secret one");
    let reply = bob
        .state
        .encrypt(
            alice.address,
            &alice.key.public_key(),
            &Plaintext::new("ok"),
        )
        .unwrap();
    alice
        .state
        .decrypt(&reply, bob.address, &bob.key.public_key())
        .unwrap();
    let captured_normal = alice
        .state
        .encrypt(
            bob.address,
            &bob.key.public_key(),
            &Plaintext::new("secret two"),
        )
        .unwrap();
    assert_eq!(captured_normal[1], 0x01);
    assert_eq!(
        bob.state
            .decrypt(&captured_normal, alice.address, &alice.key.public_key())
            .unwrap()
            .plaintext
            .text,
        "secret two"
    );

    // The control: a copy taken before Bob read the first message opens it, so the attack below
    // is a real one and fails only because Bob forgot.
    assert_eq!(
        restore(&before_reading)
            .decrypt(&captured_pre_key, alice.address, &alice.key.public_key())
            .unwrap()
            .plaintext
            .text,
        "secret one"
    );

    // The device is stolen after reading: nothing in its files opens either recorded message.
    let loot = steal(&bob);
    for (captured, name) in [(&captured_pre_key, "pre-key"), (&captured_normal, "normal")] {
        let mut thief = restore(&loot);
        assert_eq!(
            thief.decrypt(captured, alice.address, &alice.key.public_key()),
            Err(OlmError::DoesNotOpen),
            "the {name} message opened from a copy of the device taken after it was read"
        );
        // Not through a new session either: the one-time key the pre-key message used is gone.
        thief.forget_sessions(alice.address);
        assert!(
            thief
                .decrypt(captured, alice.address, &alice.key.public_key())
                .is_err(),
            "the {name} message opened from a copy with its sessions dropped"
        );
    }
    let mut thief = restore(&loot);
    thief.forget_sessions(alice.address);
    assert_eq!(
        thief.decrypt(&captured_pre_key, alice.address, &alice.key.public_key()),
        Err(OlmError::UnknownOneTimeKey)
    );
    // Nor does the state file hold the plaintexts themselves.
    assert!(!loot.state_json.contains("secret"));
}

#[test]
fn version_1_messages_open_from_a_copy_of_the_recipients_key() {
    let (alice, bob) = (device(1), device(2));
    let captured = envelope::seal(
        &Plaintext::new("secret one"),
        alice.address.user_id,
        &alice.key,
        bob.address.user_id,
        &bob.key.public_key(),
    );
    let open = |key: &PrivateKey| {
        envelope::open(
            &captured,
            alice.address.user_id,
            bob.address.user_id,
            &[key],
            &[alice.key.public_key()],
        )
    };
    assert_eq!(open(&bob.key).unwrap().plaintext.text, "secret one");
    // Stolen after reading: the same long-term key opens the recorded message again.
    let loot = steal(&bob);
    let thief_key = PrivateKey::from_pkcs8_pem(&loot.key_pem).unwrap();
    assert_eq!(open(&thief_key).unwrap().plaintext.text, "secret one");
}
