//! RFC 9180's published test vector for our suite in auth mode (Appendix A.2.3:
//! DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, ChaCha20Poly1305, mode_auth) through the client's
//! envelope code: the keys, `OpenAuth` of the vector's first ciphertext, and `SealAuth` with the
//! vector's ephemeral input reproducing `enc` and the ciphertext byte for byte.

use hpke::Kem as _;
use hpke::Serializable;
use messenger_client::envelope::{self, Plaintext};
use messenger_client::keys::{PrivateKey, PublicKey, unhex};
use serde_json::Value;
use std::convert::Infallible;

// The RFC's data, kept in the repository (testdata/rfc9180) so a clone stands alone;
// `the_copy_is_the_contracts_copy` holds it to the contract's copy (../shared/vectors) when that
// is beside the repository (CI).
const VECTOR_FILE: &str = "rfc9180-a.2.3-auth-x25519-sha256-chacha20poly1305.json";
const VECTOR: &str = include_str!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../testdata/rfc9180/rfc9180-a.2.3-auth-x25519-sha256-chacha20poly1305.json"
));

fn field(v: &Value, name: &str) -> Vec<u8> {
    unhex(
        v[name]
            .as_str()
            .unwrap_or_else(|| panic!("vector field {name}")),
    )
    .expect("hex")
}

fn key32(v: &Value, name: &str) -> [u8; 32] {
    field(v, name).try_into().expect("32 bytes")
}

/// Hands out fixed bytes: the vector's `ikmE`, so the ephemeral key is the vector's.
struct Fixed(Vec<u8>);

impl rand_core::TryRng for Fixed {
    type Error = Infallible;
    fn try_next_u32(&mut self) -> Result<u32, Infallible> {
        unreachable!("HPKE asks for bytes")
    }
    fn try_next_u64(&mut self) -> Result<u64, Infallible> {
        unreachable!("HPKE asks for bytes")
    }
    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Infallible> {
        assert!(dst.len() <= self.0.len(), "asked for more than ikmE");
        let rest = self.0.split_off(dst.len());
        dst.copy_from_slice(&self.0);
        self.0 = rest;
        Ok(())
    }
}
impl rand_core::TryCryptoRng for Fixed {}

fn vector() -> Value {
    let v: Value = serde_json::from_str(VECTOR).unwrap();
    assert_eq!(
        (
            v["mode"].as_u64(),
            v["kem_id"].as_u64(),
            v["kdf_id"].as_u64(),
            v["aead_id"].as_u64()
        ),
        (Some(2), Some(0x20), Some(1), Some(3)),
        "the suite of ENVELOPE.md in auth mode"
    );
    v
}

#[test]
fn the_copy_is_the_contracts_copy() {
    let shared = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/vectors")
        .join(VECTOR_FILE);
    match std::fs::read(&shared) {
        Ok(theirs) => assert!(
            theirs == VECTOR.as_bytes(),
            "testdata/rfc9180/{VECTOR_FILE} differs from {}: copy it again",
            shared.display()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            eprintln!(
                "skipped: {} is absent (no ../shared beside the repository); the copy in testdata/rfc9180 is used",
                shared.display()
            );
        }
        Err(e) => panic!("{}: {e}", shared.display()),
    }
}

#[test]
fn vector_keys_derive_and_match() {
    let v = vector();
    for (ikm, sk, pk) in [
        ("ikmE", "skEm", "pkEm"),
        ("ikmR", "skRm", "pkRm"),
        ("ikmS", "skSm", "pkSm"),
    ] {
        let (dsk, dpk) = envelope::Kem::derive_keypair(&field(&v, ikm));
        // hpke keeps X25519 scalars clamped (RFC 7748 §5); the RFC prints them as derived.
        let mut want = field(&v, sk);
        want[0] &= 248;
        want[31] = (want[31] & 127) | 64;
        assert_eq!(
            dsk.to_bytes().as_slice(),
            want.as_slice(),
            "DeriveKeyPair({ikm})"
        );
        assert_eq!(
            dpk.to_bytes().as_slice(),
            field(&v, pk).as_slice(),
            "DeriveKeyPair({ikm})"
        );
        assert_eq!(
            PrivateKey::from_bytes(key32(&v, sk)).public_key(),
            PublicKey(key32(&v, pk))
        );
    }
    assert_eq!(field(&v, "enc"), field(&v, "pkEm"));
}

#[test]
fn vector_ciphertext_opens() {
    let v = vector();
    let enc0 = &v["encryptions"][0];
    assert_eq!(enc0["seq"].as_u64(), Some(0), "single shot is sequence 0");
    let pt = envelope::open_auth(
        &PrivateKey::from_bytes(key32(&v, "skRm")),
        &PublicKey(key32(&v, "pkSm")),
        &field(&v, "enc"),
        &field(&v, "info"),
        &field(enc0, "aad"),
        &field(enc0, "ct"),
    )
    .expect("the RFC's ciphertext opens");
    assert_eq!(pt, field(&v, "pt"));
    // With any other sender key (auth mode binds it), or any bit changed, it does not.
    let other = PrivateKey::generate().public_key();
    assert!(
        envelope::open_auth(
            &PrivateKey::from_bytes(key32(&v, "skRm")),
            &other,
            &field(&v, "enc"),
            &field(&v, "info"),
            &field(enc0, "aad"),
            &field(enc0, "ct")
        )
        .is_none()
    );
    let mut ct = field(enc0, "ct");
    ct[0] ^= 1;
    assert!(
        envelope::open_auth(
            &PrivateKey::from_bytes(key32(&v, "skRm")),
            &PublicKey(key32(&v, "pkSm")),
            &field(&v, "enc"),
            &field(&v, "info"),
            &field(enc0, "aad"),
            &ct
        )
        .is_none()
    );
}

#[test]
fn seal_with_the_vector_ephemeral_reproduces_it() {
    let v = vector();
    let enc0 = &v["encryptions"][0];
    let (enc, ct) = envelope::seal_auth_with_rng(
        &PrivateKey::from_bytes(key32(&v, "skSm")),
        &PublicKey(key32(&v, "pkRm")),
        &field(&v, "info"),
        &field(enc0, "aad"),
        &field(&v, "pt"),
        &mut Fixed(field(&v, "ikmE")),
    );
    assert_eq!(enc.to_vec(), field(&v, "enc"));
    assert_eq!(ct, field(enc0, "ct"));
}

#[test]
fn the_envelope_frames_the_same_kem_step() {
    // Our own seal, fed the vector's ikmE: version byte, then the vector's enc, then a
    // ciphertext of the plaintext JSON plus the 16-byte tag; and it opens.
    let v = vector();
    let (alice, bob) = (uuid::Uuid::now_v7(), uuid::Uuid::now_v7());
    let sk_s = PrivateKey::from_bytes(key32(&v, "skSm"));
    let sk_r = PrivateKey::from_bytes(key32(&v, "skRm"));
    let pt = Plaintext::new("Beauty is truth, truth beauty");
    let env = envelope::seal_with_rng(
        &pt,
        alice,
        &sk_s,
        bob,
        &sk_r.public_key(),
        &mut Fixed(field(&v, "ikmE")),
    );
    assert_eq!(env[0], envelope::FORMAT_VERSION);
    assert_eq!(env[1..33].to_vec(), field(&v, "enc"));
    assert_eq!(env.len(), 33 + pt.to_json().len() + 16);
    let opened = envelope::open(&env, alice, bob, &[&sk_r], &[sk_s.public_key()]).unwrap();
    assert_eq!(opened.plaintext.text, pt.text);
}
