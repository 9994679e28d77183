//! X25519 keys as the API carries them (SPKI PEM) and as the profile keeps them (PKCS #8 PEM),
//! and their fingerprints (ENVELOPE.md "Keys").

use hpke::kem::X25519HkdfSha256;
use hpke::{Deserializable, Kem as _, Serializable};
use sha2::{Digest, Sha256};
use std::fmt;
use zeroize::Zeroize;

/// DER of an X25519 SubjectPublicKeyInfo up to its 32 key bytes (RFC 8410).
pub const SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x6e, 0x03, 0x21, 0x00,
];
/// DER of an X25519 PKCS #8 PrivateKeyInfo (version 0, no public key) up to its 32 key bytes.
pub const PKCS8_PREFIX: [u8; 16] = [
    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x6e, 0x04, 0x22, 0x04, 0x20,
];

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("not a PEM block: {0}")]
    Pem(String),
    #[error("expected a PEM block labelled {expected}, found {found}")]
    Label {
        expected: &'static str,
        found: String,
    },
    #[error("not an X25519 key (the messenger uses X25519 keys only)")]
    NotX25519,
    #[error("a small-order X25519 point (RFC 7748 section 6.1): no shared secret can come from it")]
    SmallOrder,
}

/// An X25519 public key.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct PublicKey(pub [u8; 32]);

/// An X25519 private key. Its `Debug` never prints the key.
#[derive(Clone)]
pub struct PrivateKey([u8; 32]);

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PrivateKey(..)")
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.fingerprint())
    }
}

impl Drop for PrivateKey {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl PrivateKey {
    pub fn generate() -> Self {
        let (sk, _) = X25519HkdfSha256::gen_keypair();
        let mut bytes = [0u8; 32];
        bytes.copy_from_slice(&sk.to_bytes());
        PrivateKey(bytes)
    }

    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        PrivateKey(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    pub fn public_key(&self) -> PublicKey {
        let sk = self.to_hpke();
        let pk = X25519HkdfSha256::sk_to_pk(&sk);
        let mut bytes = [0u8; 32];
        bytes.copy_from_slice(&pk.to_bytes());
        PublicKey(bytes)
    }

    pub(crate) fn to_hpke(&self) -> <X25519HkdfSha256 as hpke::Kem>::PrivateKey {
        <X25519HkdfSha256 as hpke::Kem>::PrivateKey::from_bytes(&self.0)
            .expect("32 bytes are an X25519 private key")
    }

    /// PKCS #8 PEM (`-----BEGIN PRIVATE KEY-----`), as openssl writes X25519 keys.
    pub fn to_pkcs8_pem(&self) -> String {
        let mut der = Vec::with_capacity(48);
        der.extend_from_slice(&PKCS8_PREFIX);
        der.extend_from_slice(&self.0);
        let pem = pem_rfc7468::encode_string("PRIVATE KEY", pem_rfc7468::LineEnding::LF, &der)
            .expect("PEM encoding of 48 bytes");
        der.zeroize();
        pem
    }

    pub fn from_pkcs8_pem(pem: &str) -> Result<Self, KeyError> {
        let (label, mut der) = pem_rfc7468::decode_vec(pem.trim().as_bytes())
            .map_err(|e| KeyError::Pem(e.to_string()))?;
        let result = if label != "PRIVATE KEY" {
            Err(KeyError::Label {
                expected: "PRIVATE KEY",
                found: label.to_string(),
            })
        } else if der.len() != 48 || der[..16] != PKCS8_PREFIX {
            Err(KeyError::NotX25519)
        } else {
            let mut bytes = [0u8; 32];
            bytes.copy_from_slice(&der[16..]);
            Ok(PrivateKey(bytes))
        };
        der.zeroize();
        result
    }
}

impl PublicKey {
    pub fn spki_der(&self) -> Vec<u8> {
        let mut der = Vec::with_capacity(44);
        der.extend_from_slice(&SPKI_PREFIX);
        der.extend_from_slice(&self.0);
        der
    }

    /// SPKI PEM (`-----BEGIN PUBLIC KEY-----`), what `public_key` carries in the API.
    pub fn to_pem(&self) -> String {
        pem_rfc7468::encode_string("PUBLIC KEY", pem_rfc7468::LineEnding::LF, &self.spki_der())
            .expect("PEM encoding of 44 bytes")
    }

    /// Parses the API's `public_key`; anything but one X25519 SPKI PEM block is refused, and so
    /// is a small-order point (API.md refuses it too): nothing can be sealed to it, and a key
    /// the client could never use is never pinned.
    pub fn from_pem(pem: &str) -> Result<Self, KeyError> {
        let (label, der) = pem_rfc7468::decode_vec(pem.trim().as_bytes())
            .map_err(|e| KeyError::Pem(e.to_string()))?;
        if label != "PUBLIC KEY" {
            return Err(KeyError::Label {
                expected: "PUBLIC KEY",
                found: label.to_string(),
            });
        }
        if der.len() != 44 || der[..12] != SPKI_PREFIX {
            return Err(KeyError::NotX25519);
        }
        let mut bytes = [0u8; 32];
        bytes.copy_from_slice(&der[12..]);
        let key = PublicKey(bytes);
        if key.is_small_order() {
            return Err(KeyError::SmallOrder);
        }
        Ok(key)
    }

    /// Whether this is a point of small order (all zeros among them): multiplied by any clamped
    /// scalar (a multiple of the cofactor 8) it gives u = 0, the all-zero shared secret that
    /// HPKE refuses. Catches every encoding, non-canonical ones too.
    pub fn is_small_order(&self) -> bool {
        curve25519_dalek::montgomery::MontgomeryPoint(self.0)
            .mul_clamped([0x55; 32])
            .to_bytes()
            == [0; 32]
    }

    /// SHA-256 of the SPKI DER, 64 lowercase hex characters.
    pub fn fingerprint(&self) -> String {
        hex(&Sha256::digest(self.spki_der()))
    }

    pub(crate) fn to_hpke(self) -> <X25519HkdfSha256 as hpke::Kem>::PublicKey {
        <X25519HkdfSha256 as hpke::Kem>::PublicKey::from_bytes(&self.0)
            .expect("32 bytes are an X25519 public key")
    }
}

/// A fingerprint as people compare it: groups of 4 hex characters (`3f2a 91c0 ...`).
pub fn group_fingerprint(fp: &str) -> String {
    let mut out = String::with_capacity(fp.len() + fp.len() / 4);
    for (i, c) in fp.chars().enumerate() {
        if i > 0 && i % 4 == 0 {
            out.push(' ');
        }
        out.push(c);
    }
    out
}

pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

pub fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pem_round_trips_and_matches_openssl_layout() {
        let sk = PrivateKey::generate();
        let pk = sk.public_key();
        let pem = pk.to_pem();
        assert!(pem.starts_with("-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VuAyEA"));
        assert_eq!(PublicKey::from_pem(&pem).unwrap(), pk);
        let spem = sk.to_pkcs8_pem();
        assert!(spem.starts_with("-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VuBCIEI"));
        assert_eq!(PrivateKey::from_pkcs8_pem(&spem).unwrap().public_key(), pk);
    }

    #[test]
    fn other_key_kinds_are_refused() {
        // An Ed25519 SPKI (OID 1.3.101.112) is not an X25519 key.
        let ed = "-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEAGb9ECWmEzf6FQbrBZ9w7lshQhqowtrbLDFw4rXAxZuE=\n-----END PUBLIC KEY-----\n";
        assert_eq!(PublicKey::from_pem(ed), Err(KeyError::NotX25519));
        assert!(PublicKey::from_pem("hello").is_err());
    }

    #[test]
    fn small_order_points_are_refused() {
        // RFC 7748 section 6.1's small-order points as libsodium lists them: 0, 1, the two points
        // of order 8, p - 1, p and p + 1; each also with the (ignored) top bit set.
        let p_minus = |d: u8| {
            let mut b = [0xff; 32];
            b[0] = 0xed - d;
            b[31] = 0x7f;
            b
        };
        let mut one = [0; 32];
        one[0] = 1;
        let order_8: [[u8; 32]; 2] = [
            unhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800")
                .unwrap()
                .try_into()
                .unwrap(),
            unhex("5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157")
                .unwrap()
                .try_into()
                .unwrap(),
        ];
        let mut all = vec![[0; 32], one, order_8[0], order_8[1], p_minus(1)];
        let (p, p_plus_1) = (p_minus(0), {
            let mut b = p_minus(0);
            b[0] = 0xee;
            b
        });
        all.extend([p, p_plus_1]);
        for mut point in all.clone() {
            point[31] |= 0x80;
            all.push(point);
        }
        for point in all {
            let key = PublicKey(point);
            assert!(key.is_small_order(), "{}", hex(&point));
            assert_eq!(
                PublicKey::from_pem(&key.to_pem()),
                Err(KeyError::SmallOrder)
            );
        }
        let good = PrivateKey::generate().public_key();
        assert!(!good.is_small_order());
        assert_eq!(PublicKey::from_pem(&good.to_pem()), Ok(good));
    }

    #[test]
    fn fingerprint_is_sha256_of_spki_der_in_groups_of_four() {
        // RFC 9180 A.2.3 pkRm; SHA-256 over 302a300506032b656e032100 || pkRm.
        let pk = PublicKey(
            unhex("1a478716d63cb2e16786ee93004486dc151e988b34b475043d3e0175bdb01c44")
                .unwrap()
                .try_into()
                .unwrap(),
        );
        let fp = pk.fingerprint();
        assert_eq!(fp.len(), 64);
        assert!(
            fp.chars()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
        );
        assert_eq!(fp, hex(&Sha256::digest(pk.spki_der())));
        let grouped = group_fingerprint(&fp);
        assert_eq!(grouped.len(), 64 + 15);
        assert_eq!(grouped.split(' ').count(), 16);
    }
}
