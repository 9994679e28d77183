//! What the inbox does with each message it receives: open it with the keys pinned for its
//! sender, or refuse it with a reason. Pure: no network, no files (see `app::inbox`).

use crate::api::Message;
use crate::envelope::{self, OpenError, Plaintext};
use crate::keys::{PrivateKey, PublicKey};
use crate::store::{InboxState, SEEN_FOR};
use base64::Engine as _;
use chrono::{DateTime, Utc};
use uuid::Uuid;

/// What the client knows about a message's sender.
#[derive(Debug, Clone)]
pub struct Sender {
    pub name: String,
    /// Keys pinned for this sender that may still open messages (current first).
    pub keys: Vec<PublicKey>,
    /// Fingerprint of a key the directory now returns for the sender that is not pinned.
    pub changed_to: Option<String>,
    /// Since when the sender's device has a signing key pinned: from then on it speaks version 2,
    /// and a version 1 message from it is a downgrade (ENVELOPE.md "Version 2").
    pub v2_since: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Genuine: opened with our key and a key pinned for the sender, not seen before.
    Shown(Plaintext),
    /// Sealed by a key that is not pinned for the sender while the directory shows a changed
    /// key: kept unopened until the user accepts the key (`trust`) or it expires.
    Held { new_fingerprint: String },
    /// Refused and dropped; `reason` is one line for a person, without any plaintext.
    Dropped { reason: String },
}

/// Judges one message for `me`.
pub fn judge(
    msg: &Message,
    me: Uuid,
    my_keys: &[PrivateKey],
    sender: &Sender,
    state: &InboxState,
    now: DateTime<Utc>,
) -> Verdict {
    if msg.recipient_id != me {
        return Verdict::Dropped {
            reason: "it is addressed to another account (the server sent someone else's message)"
                .into(),
        };
    }
    let bytes =
        match base64::engine::general_purpose::STANDARD.decode(msg.encrypted_data.as_bytes()) {
            Ok(b) => b,
            Err(_) => {
                return Verdict::Dropped {
                    reason: "its encrypted_data is not base64".into(),
                };
            }
        };
    let my_refs: Vec<&PrivateKey> = my_keys.iter().collect();
    match envelope::open(&bytes, msg.sender_id, me, &my_refs, &sender.keys) {
        Ok(opened) => judge_opened(msg, opened.plaintext, sender, state, now),
        Err(OpenError::DoesNotOpen) if sender.changed_to.is_some() => Verdict::Held {
            new_fingerprint: sender.changed_to.clone().unwrap_or_default(),
        },
        Err(OpenError::DoesNotOpen) => Verdict::Dropped {
            reason: format!(
                "the envelope does not open with your keys and the key pinned for {}: it was tampered \
                 with, sealed for another recipient, or sealed by a key that is not {}'s",
                sender.name, sender.name
            ),
        },
        Err(e) => Verdict::Dropped {
            reason: e.to_string(),
        },
    }
}

/// The verdict on a message that opened (with either version): shown, unless it replays one
/// already shown or is older than any message lives.
pub fn judge_opened(
    msg: &Message,
    pt: Plaintext,
    sender: &Sender,
    state: &InboxState,
    now: DateTime<Utc>,
) -> Verdict {
    if state
        .seen
        .contains_key(&InboxState::seen_key(msg.sender_id, pt.id))
    {
        return Verdict::Dropped {
            reason: format!(
                "it replays message {} from {}, already shown",
                pt.id, sender.name
            ),
        };
    }
    if pt.sent_at + SEEN_FOR < now {
        return Verdict::Dropped {
            reason: format!(
                "it was sealed at {}, longer ago than any message lives: a replay",
                pt.sent_at.format("%Y-%m-%d %H:%M:%S UTC")
            ),
        };
    }
    Verdict::Shown(pt)
}

/// Records a shown message against replays.
pub fn remember(state: &mut InboxState, sender: Uuid, pt: &Plaintext, now: DateTime<Utc>) {
    let until = std::cmp::max(pt.sent_at, now) + SEEN_FOR;
    state
        .seen
        .insert(InboxState::seen_key(sender, pt.id), until);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::seal;
    use chrono::TimeDelta;

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

    fn message(from: &Party, to: Uuid, bytes: &[u8]) -> Message {
        let now = Utc::now();
        Message {
            sender_device_id: 1,
            recipient_device_id: 1,
            id: Uuid::now_v7(),
            sender_id: from.id,
            recipient_id: to,
            encrypted_data: base64::engine::general_purpose::STANDARD.encode(bytes),
            timestamp: now,
            expires_at: now + TimeDelta::days(7),
        }
    }

    fn sender(p: &Party) -> Sender {
        Sender {
            v2_since: None,
            name: "alice".into(),
            keys: vec![p.key.public_key()],
            changed_to: None,
        }
    }

    fn reason(v: Verdict) -> String {
        match v {
            Verdict::Dropped { reason } => reason,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn a_genuine_message_is_shown_once_and_its_replay_refused() {
        let (alice, bob) = (party(), party());
        let pt = Plaintext::new("the plans are in the usual place");
        let env = seal(&pt, alice.id, &alice.key, bob.id, &bob.key.public_key());
        let mut state = InboxState::default();
        let now = Utc::now();
        let first = message(&alice, bob.id, &env);
        let v = judge(
            &first,
            bob.id,
            std::slice::from_ref(&bob.key),
            &sender(&alice),
            &state,
            now,
        );
        let Verdict::Shown(shown) = v else {
            panic!("{v:?}")
        };
        assert_eq!(shown.text, pt.text);
        remember(&mut state, alice.id, &shown, now);
        // The same envelope again, under a new server id (a replay by the server or the network).
        let again = message(&alice, bob.id, &env);
        let r = reason(judge(
            &again,
            bob.id,
            std::slice::from_ref(&bob.key),
            &sender(&alice),
            &state,
            now,
        ));
        assert!(
            r.contains("replays message") && r.contains(&pt.id.to_string()),
            "{r}"
        );
        assert!(!r.contains(&pt.text));
    }

    #[test]
    fn a_tampered_envelope_is_refused() {
        let (alice, bob) = (party(), party());
        let mut env = seal(
            &Plaintext::new("secret"),
            alice.id,
            &alice.key,
            bob.id,
            &bob.key.public_key(),
        );
        let n = env.len();
        env[n - 20] ^= 1;
        let r = reason(judge(
            &message(&alice, bob.id, &env),
            bob.id,
            std::slice::from_ref(&bob.key),
            &sender(&alice),
            &InboxState::default(),
            Utc::now(),
        ));
        assert!(r.contains("does not open") && r.contains("tampered"), "{r}");
    }

    #[test]
    fn an_envelope_sealed_for_another_recipient_is_refused() {
        let (alice, bob, carol) = (party(), party(), party());
        // Alice sealed it for Carol; the server hands it to Bob, under Bob's id. Even with
        // Carol's key material the info names Carol, and with Bob's the AEAD fails.
        let env = seal(
            &Plaintext::new("for carol"),
            alice.id,
            &alice.key,
            carol.id,
            &carol.key.public_key(),
        );
        let r = reason(judge(
            &message(&alice, bob.id, &env),
            bob.id,
            std::slice::from_ref(&bob.key),
            &sender(&alice),
            &InboxState::default(),
            Utc::now(),
        ));
        assert!(r.contains("sealed for another recipient"), "{r}");
        // Sealed to Bob's key, but for Carol's account id: the info binding refuses it.
        let env = seal(
            &Plaintext::new("for carol"),
            alice.id,
            &alice.key,
            carol.id,
            &bob.key.public_key(),
        );
        let r = reason(judge(
            &message(&alice, bob.id, &env),
            bob.id,
            std::slice::from_ref(&bob.key),
            &sender(&alice),
            &InboxState::default(),
            Utc::now(),
        ));
        assert!(r.contains("does not open"), "{r}");
        // And a message the server labels as addressed to Carol never reaches Bob's screen.
        let r = reason(judge(
            &message(&alice, carol.id, &env),
            bob.id,
            std::slice::from_ref(&bob.key),
            &sender(&alice),
            &InboxState::default(),
            Utc::now(),
        ));
        assert!(r.contains("another account"), "{r}");
    }

    #[test]
    fn a_key_not_pinned_for_the_sender_opens_nothing() {
        let (alice, bob, mallory) = (party(), party(), party());
        // Sealed with Mallory's key under Alice's id, Alice's real key pinned.
        let env = seal(
            &Plaintext::new("trust me"),
            alice.id,
            &mallory.key,
            bob.id,
            &bob.key.public_key(),
        );
        let msg = message(&alice, bob.id, &env);
        let r = reason(judge(
            &msg,
            bob.id,
            std::slice::from_ref(&bob.key),
            &sender(&alice),
            &InboxState::default(),
            Utc::now(),
        ));
        assert!(r.contains("not alice's"), "{r}");
        // When the directory also shows Mallory's key as Alice's, it is held, never opened.
        let changed = Sender {
            v2_since: None,
            changed_to: Some(mallory.key.public_key().fingerprint()),
            ..sender(&alice)
        };
        let v = judge(
            &msg,
            bob.id,
            std::slice::from_ref(&bob.key),
            &changed,
            &InboxState::default(),
            Utc::now(),
        );
        assert_eq!(
            v,
            Verdict::Held {
                new_fingerprint: mallory.key.public_key().fingerprint()
            }
        );
    }

    #[test]
    fn old_and_unknown_versions_are_refused() {
        let (alice, bob) = (party(), party());
        let mut pt = Plaintext::new("old");
        pt.sent_at = Utc::now() - TimeDelta::days(9);
        let env = seal(&pt, alice.id, &alice.key, bob.id, &bob.key.public_key());
        let r = reason(judge(
            &message(&alice, bob.id, &env),
            bob.id,
            std::slice::from_ref(&bob.key),
            &sender(&alice),
            &InboxState::default(),
            Utc::now(),
        ));
        assert!(r.contains("a replay"), "{r}");
        let mut env = seal(
            &Plaintext::new("v"),
            alice.id,
            &alice.key,
            bob.id,
            &bob.key.public_key(),
        );
        env[0] = 9;
        let r = reason(judge(
            &message(&alice, bob.id, &env),
            bob.id,
            std::slice::from_ref(&bob.key),
            &sender(&alice),
            &InboxState::default(),
            Utc::now(),
        ));
        assert!(r.contains("format version 9"), "{r}");
    }
}
