//! A key rotation loses no message: a pre-key message made from a prekey of this device claimed
//! before `rotate-key` re-keyed its Olm account opens after it (from the retired account), for as
//! long as messages live on the server (`MESSAGE_TTL`), and the session it starts is an ordinary
//! one. After that the retired account is gone.

mod olm_devices;

use chrono::{TimeDelta, Utc};
use messenger_client::envelope::Plaintext;
use messenger_client::keys::{PrivateKey, PublicKey};
use messenger_client::olm::{
    DeviceAddress, MESSAGE_TYPE_NORMAL, MESSAGE_TYPE_PRE_KEY, MessageKind, OlmError, OlmState,
};
use messenger_client::store::MESSAGE_TTL;
use olm_devices::{Device, claim, device};

fn send(from: &mut Device, to: DeviceAddress, to_identity: &PublicKey, text: &str) -> Vec<u8> {
    from.state
        .encrypt(to, to_identity, &Plaintext::new(text))
        .unwrap()
}

/// Saved and read back with the device's (current) key, as every command does.
fn reload(device: &mut Device) {
    let json = device.state.to_json();
    device.state = OlmState::from_json(&json, &device.key.public_key()).unwrap();
}

#[test]
fn a_prekey_claimed_before_a_rotation_opens_after_it_until_messages_expire() {
    let (mut alice, mut bob, mut carol, mut dave) = (device(1), device(2), device(3), device(4));
    let upload = bob.state.prekey_upload(5, true).unwrap();
    bob.state.mark_prekeys_published();
    let bob_old_key = bob.key.public_key();
    // Alice and Carol each claim a one-time key, Dave the last-resort key, all before Bob
    // rotates.
    let for_alice = claim(&upload.prekeys[0], false, &bob);
    let for_carol = claim(&upload.prekeys[1], false, &bob);
    let for_dave = claim(upload.last_resort.as_ref().unwrap(), true, &bob);
    alice.state.start_session(&bob_old_key, &for_alice).unwrap();
    carol.state.start_session(&bob_old_key, &for_carol).unwrap();
    dave.state.start_session(&bob_old_key, &for_dave).unwrap();

    // Bob rotates as `rotate-key` does: a new device key, the Olm account re-keyed from it.
    let rotated_at = Utc::now();
    let new_key = PrivateKey::generate();
    let (rotated, _) = bob
        .state
        .rotate_signing_key(&new_key, None, rotated_at)
        .unwrap();
    assert_ne!(rotated.identity_key(), bob_old_key);
    bob.state = rotated;
    bob.key = new_key;
    reload(&mut bob);
    assert_eq!(bob.state.retired_account_count(), 1, "kept in olm.json");
    assert_eq!(
        bob.state.one_time_keys_held(),
        0,
        "the new account starts anew"
    );

    // Alice's pre-key message, sent after the rotation, opens and starts an ordinary session.
    let first = send(
        &mut alice,
        bob.address,
        &bob_old_key,
        "sent after the rotation",
    );
    assert_eq!(first[1], MESSAGE_TYPE_PRE_KEY);
    let opened = bob
        .state
        .decrypt(&first, alice.address, &alice.key.public_key())
        .unwrap();
    assert_eq!(opened.plaintext.text, "sent after the rotation");
    assert_eq!(
        (opened.kind, opened.new_session),
        (MessageKind::PreKey, true)
    );
    assert!(
        bob.state
            .has_session(alice.address, &alice.key.public_key())
    );
    reload(&mut bob);
    // Opened once only: the one-time key is gone from the retired account too.
    {
        let mut copy = OlmState::from_json(&bob.state.to_json(), &bob.key.public_key()).unwrap();
        copy.forget_sessions(alice.address);
        assert_eq!(
            copy.decrypt(&first, alice.address, &alice.key.public_key()),
            Err(OlmError::UnknownOneTimeKey)
        );
    }

    // A second message on that session, still unanswered (a pre-key message), then normal ones
    // both ways after Bob answers.
    let second = send(&mut alice, bob.address, &bob_old_key, "second");
    let opened = bob
        .state
        .decrypt(&second, alice.address, &alice.key.public_key())
        .unwrap();
    assert_eq!(
        (opened.plaintext.text.as_str(), opened.new_session),
        ("second", false)
    );
    let reply = send(&mut bob, alice.address, &alice.key.public_key(), "got both");
    assert_eq!(reply[1], MESSAGE_TYPE_NORMAL);
    assert_eq!(
        alice
            .state
            .decrypt(&reply, bob.address, &bob_old_key)
            .unwrap()
            .plaintext
            .text,
        "got both"
    );
    let normal = send(&mut alice, bob.address, &bob_old_key, "a normal one");
    assert_eq!(normal[1], MESSAGE_TYPE_NORMAL);
    let opened = bob
        .state
        .decrypt(&normal, alice.address, &alice.key.public_key())
        .unwrap();
    assert_eq!(
        (opened.plaintext.text.as_str(), opened.kind),
        ("a normal one", MessageKind::Normal)
    );

    // The last-resort key of the retired account starts a session too.
    let from_dave = send(&mut dave, bob.address, &bob_old_key, "via last resort");
    assert_eq!(
        bob.state
            .decrypt(&from_dave, dave.address, &dave.key.public_key())
            .unwrap()
            .plaintext
            .text,
        "via last resort"
    );

    // Kept for as long as a message lives, and no longer.
    assert!(
        !bob.state
            .prune_retired_accounts(rotated_at + MESSAGE_TTL - TimeDelta::seconds(1))
    );
    assert_eq!(bob.state.retired_account_count(), 1);
    assert!(bob.state.prune_retired_accounts(rotated_at + MESSAGE_TTL));
    assert_eq!(bob.state.retired_account_count(), 0);
    reload(&mut bob);
    assert_eq!(bob.state.retired_account_count(), 0);
    // Carol's message, had it lived that long, no longer opens; the failure changes nothing.
    let late = send(&mut carol, bob.address, &bob_old_key, "too late");
    let before = bob.state.to_json();
    assert_eq!(
        bob.state
            .decrypt(&late, carol.address, &carol.key.public_key()),
        Err(OlmError::UnknownOneTimeKey)
    );
    assert_eq!(*bob.state.to_json(), *before);
}

#[test]
fn a_failed_pre_key_message_changes_no_retired_account() {
    let (mut alice, mut bob, carol) = (device(1), device(2), device(3));
    let upload = bob.state.prekey_upload(2, false).unwrap();
    bob.state.mark_prekeys_published();
    let bob_old_key = bob.key.public_key();
    let prekey = claim(&upload.prekeys[0], false, &bob);
    alice.state.start_session(&bob_old_key, &prekey).unwrap();
    let new_key = PrivateKey::generate();
    let (rotated, _) = bob
        .state
        .rotate_signing_key(&new_key, None, Utc::now())
        .unwrap();
    bob.state = rotated;
    bob.key = new_key;
    let first = send(&mut alice, bob.address, &bob_old_key, "hello");
    let before = bob.state.to_json();
    // Delivered as if from Carol's device with Alice's key pinned for it: misaddressed, and the
    // one-time key in the retired account is not used up.
    assert_eq!(
        bob.state
            .decrypt(&first, carol.address, &alice.key.public_key()),
        Err(OlmError::Misaddressed("from"))
    );
    // Tampered: does not open.
    let mut tampered = first.clone();
    let last = tampered.len() - 1;
    tampered[last] ^= 1;
    assert_eq!(
        bob.state
            .decrypt(&tampered, alice.address, &alice.key.public_key()),
        Err(OlmError::DoesNotOpen)
    );
    assert_eq!(*bob.state.to_json(), *before);
    assert_eq!(
        bob.state
            .decrypt(&first, alice.address, &alice.key.public_key())
            .unwrap()
            .plaintext
            .text,
        "hello"
    );
}
