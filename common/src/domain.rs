//! Validated domain values. Each `parse` is the only way in, and says why it refused in its own
//! terms (`Refusal`); the HTTP edge (`error.rs`) maps those to the contract's statuses once.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use spki::{DecodePublicKey, ObjectIdentifier, SubjectPublicKeyInfoRef};
use uuid::Uuid;

use crate::secret::Secret;

/// Why a value was refused, and which field it was.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Refusal {
    pub kind: RefusalKind,
    pub field: Option<&'static str>,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusalKind {
    /// Well-formed, but against a rule of the field (the contract's 422).
    BreaksRule,
    /// More data than allowed (413).
    TooLarge,
    /// Not even of the right form: a query value, path id or header (400).
    Malformed,
}

impl Refusal {
    fn new(kind: RefusalKind, field: Option<&'static str>, message: impl Into<String>) -> Self {
        Self {
            kind,
            field,
            message: message.into(),
        }
    }

    pub fn rule(field: &'static str, message: impl Into<String>) -> Self {
        Self::new(RefusalKind::BreaksRule, Some(field), message)
    }

    pub fn malformed(field: Option<&'static str>, message: impl Into<String>) -> Self {
        Self::new(RefusalKind::Malformed, field, message)
    }

    pub fn too_large(field: &'static str, message: impl Into<String>) -> Self {
        Self::new(RefusalKind::TooLarge, Some(field), message)
    }
}

/// A user name: 3 to 32 of `A-Z a-z 0-9 _ . -`, unique without regard to case.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserName(String);

impl UserName {
    pub fn parse(raw: &str) -> Result<Self, Refusal> {
        let len = raw.chars().count();
        if !(3..=32).contains(&len) {
            return Err(Refusal::rule("name", "name must be 3 to 32 characters"));
        }
        if !raw
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
        {
            return Err(Refusal::rule(
                "name",
                "name may only contain A-Z, a-z, 0-9, '_', '.' and '-'",
            ));
        }
        Ok(Self(raw.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The name as every uniqueness and rate-limit key compares it: names are ASCII by rule, so
    /// ASCII lower case is exact and independent of any locale.
    pub fn key(&self) -> String {
        self.0.to_ascii_lowercase()
    }
}

/// An `Idempotency-Key`: 1 to 64 of `A-Z a-z 0-9 _ -`. A malformed one is 400 (it is a header,
/// not a field of the body).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyKey(String);

impl IdempotencyKey {
    pub fn parse(raw: &str) -> Result<Self, Refusal> {
        let well_formed = (1..=64).contains(&raw.len())
            && raw
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-'));
        if well_formed {
            Ok(Self(raw.to_string()))
        } else {
            Err(Refusal::malformed(
                None,
                "Idempotency-Key must be 1 to 64 of A-Z, a-z, 0-9, '_' and '-'",
            ))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A password of 8 to 72 bytes in UTF-8, as the contract says. bcrypt reads at most 72 bytes,
/// so longer is refused rather than silently truncated. Any byte may appear, NUL included: the
/// bcrypt crate hashes every byte (a test in `password` holds it to that).
pub struct Password(Secret<String>);

impl Password {
    pub fn parse(raw: &str) -> Result<Self, Refusal> {
        if raw.len() < 8 {
            return Err(Refusal::rule(
                "password",
                "password must be at least 8 bytes",
            ));
        }
        if raw.len() > 72 {
            return Err(Refusal::rule(
                "password",
                "password must be at most 72 bytes in UTF-8 (bcrypt's limit)",
            ));
        }
        Ok(Self(Secret::new(raw.to_string())))
    }

    pub fn expose(&self) -> &str {
        self.0.expose()
    }
}

impl std::fmt::Debug for Password {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Password([REDACTED])")
    }
}

/// Largest PEM text accepted for a public key.
pub const MAX_PUBLIC_KEY_PEM_BYTES: usize = 8 * 1024;

const OID_RSA: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.1");
const OID_EC: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.2.1");
const OID_P256: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.3.1.7");
const OID_P384: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.132.0.34");
const OID_ED25519: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.101.112");
const OID_X25519: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.101.110");

/// The kinds of public key the directory holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    Rsa { bits: usize },
    P256,
    P384,
    Ed25519,
    X25519,
}

/// One PEM `PUBLIC KEY` block (SubjectPublicKeyInfo) that really parses as an accepted key.
/// Stored in canonical form: the DER re-encoded as PEM with LF line endings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKeyPem {
    pem: String,
    kind: KeyKind,
    /// The 32 raw bytes of an X25519 or Ed25519 key (what the contract's signatures cover).
    raw: Option<[u8; 32]>,
}

impl PublicKeyPem {
    pub fn parse(raw: &str) -> Result<Self, Refusal> {
        let reject = |msg: &str| Refusal::rule("public_key", msg.to_string());
        if raw.len() > MAX_PUBLIC_KEY_PEM_BYTES {
            return Err(reject("public_key must be at most 8 KiB"));
        }
        let text = raw.trim();
        if text.matches("-----BEGIN").count() != 1 {
            return Err(reject("public_key must be exactly one PEM block"));
        }
        let (label, der) = pem_rfc7468::decode_vec(text.as_bytes())
            .map_err(|_| reject("public_key is not valid PEM"))?;
        if label != "PUBLIC KEY" {
            return Err(reject(
                "public_key must be a '-----BEGIN PUBLIC KEY-----' block (SubjectPublicKeyInfo)",
            ));
        }
        let kind = key_kind(&der).ok_or_else(|| {
            reject("public_key must be RSA (2048 to 8192 bits), EC P-256/P-384, Ed25519 or X25519")
        })?;
        let raw = match kind {
            KeyKind::X25519 | KeyKind::Ed25519 => SubjectPublicKeyInfoRef::try_from(der.as_slice())
                .ok()
                .and_then(|spki| spki.subject_public_key.as_bytes()?.try_into().ok()),
            _ => None,
        };
        if kind == KeyKind::X25519 && raw.is_none_or(|raw| is_small_order_x25519(&raw)) {
            return Err(reject(
                "public_key is a small-order X25519 point: no shared secret can come from it",
            ));
        }
        // Re-encoding a block that was just decoded cannot fail; refuse rather than panic.
        let pem = pem_rfc7468::encode_string("PUBLIC KEY", pem_rfc7468::LineEnding::LF, &der)
            .map_err(|_| reject("public_key is not valid PEM"))?;
        Ok(Self { pem, kind, raw })
    }

    /// The key's 32 raw bytes when it is X25519.
    pub fn x25519(&self) -> Option<[u8; 32]> {
        self.raw.filter(|_| self.kind == KeyKind::X25519)
    }

    /// The key's 32 raw bytes when it is Ed25519.
    pub fn ed25519(&self) -> Option<[u8; 32]> {
        self.raw.filter(|_| self.kind == KeyKind::Ed25519)
    }

    pub fn as_str(&self) -> &str {
        &self.pem
    }

    pub fn kind(&self) -> KeyKind {
        self.kind
    }
}

fn key_kind(der: &[u8]) -> Option<KeyKind> {
    let spki = SubjectPublicKeyInfoRef::try_from(der).ok()?;
    let algorithm = spki.algorithm.oid;
    if algorithm == OID_RSA {
        // rsaEncryption's parameters are NULL (RFC 8017 appendix C).
        if !spki.algorithm.parameters.is_some_and(|p| p.is_null()) {
            return None;
        }
        let bits = rsa_modulus_bits(spki.subject_public_key.as_bytes()?)?;
        return (2048..=8192)
            .contains(&bits)
            .then_some(KeyKind::Rsa { bits });
    }
    if algorithm == OID_EC {
        let curve: ObjectIdentifier = spki.algorithm.parameters_oid().ok()?;
        return if curve == OID_P256 {
            p256::PublicKey::from_public_key_der(der)
                .ok()
                .map(|_| KeyKind::P256)
        } else if curve == OID_P384 {
            p384::PublicKey::from_public_key_der(der)
                .ok()
                .map(|_| KeyKind::P384)
        } else {
            None
        };
    }
    if algorithm == OID_ED25519 {
        return ed25519_dalek::VerifyingKey::from_public_key_der(der)
            .ok()
            .map(|_| KeyKind::Ed25519);
    }
    if algorithm == OID_X25519 {
        // Every 32-byte string is a valid X25519 public key (RFC 7748); the parameters are absent.
        let raw = spki.subject_public_key.as_bytes()?;
        return (spki.algorithm.parameters.is_none() && raw.len() == 32).then_some(KeyKind::X25519);
    }
    None
}

/// The bit length of the modulus of a PKCS #1 `RSAPublicKey` (RFC 8017 appendix A.1.1:
/// `SEQUENCE { modulus INTEGER, publicExponent INTEGER }`, DER, nothing after it), when the key is
/// well formed: an odd modulus, and an odd exponent from 3 to 2^33 - 1 (the bounds of the `rsa`
/// crate and ring; a larger one makes verification a denial of service). The directory only
/// stores the key, so its size is all that is checked; no RSA arithmetic runs here (and the `rsa`
/// crate, RUSTSEC-2023-0071, is not linked).
fn rsa_modulus_bits(pkcs1: &[u8]) -> Option<usize> {
    use spki::der::asn1::UintRef;
    use spki::der::{Reader as _, SliceReader};

    let mut reader = SliceReader::new(pkcs1).ok()?;
    let (modulus, exponent) = reader
        .sequence(|r| Ok::<_, spki::der::Error>((r.decode::<UintRef>()?, r.decode::<UintRef>()?)))
        .ok()?;
    reader.finish().ok()?;
    // UintRef strips the sign byte: the first byte is non-zero unless the value is 0.
    let (modulus, exponent) = (modulus.as_bytes(), exponent.as_bytes());
    let &first = modulus.first()?;
    let bits = modulus.len() * 8 - first.leading_zeros() as usize;
    let exponent = (exponent.len() <= 8).then(|| {
        exponent
            .iter()
            .fold(0u64, |value, &byte| (value << 8) | u64::from(byte))
    })?;
    let odd_modulus = modulus.last()? & 1 == 1;
    let sane_exponent = exponent & 1 == 1 && (3..=(1 << 33) - 1).contains(&exponent);
    (odd_modulus && sane_exponent).then_some(bits)
}

/// Whether a raw X25519 public key is a point of small order (RFC 7748 section 6.1: the all-zero
/// shared secret follows from it whatever the private key): multiplied by any clamped scalar (a
/// multiple of the cofactor 8) it gives u = 0. Catches every encoding, non-canonical ones too.
pub fn is_small_order_x25519(raw: &[u8; 32]) -> bool {
    curve25519_dalek::montgomery::MontgomeryPoint(*raw)
        .mul_clamped([0x55; 32])
        .to_bytes()
        == [0; 32]
}

/// Ciphertext: standard base64 with padding that decodes to 1..=`max` bytes.
pub struct Ciphertext(Vec<u8>);

impl Ciphertext {
    pub fn parse(encoded: &str, max_bytes: usize) -> Result<Self, Refusal> {
        // Refuse an oversized value before decoding it: base64 of `max` bytes is at most this long.
        if encoded.len() > max_bytes.div_ceil(3) * 4 {
            return Err(Self::too_large(max_bytes));
        }
        let bytes = BASE64.decode(encoded).map_err(|_| {
            Refusal::rule(
                "encrypted_data",
                "encrypted_data must be standard base64 with padding",
            )
        })?;
        if bytes.is_empty() {
            return Err(Refusal::rule(
                "encrypted_data",
                "encrypted_data must not be empty",
            ));
        }
        if bytes.len() > max_bytes {
            return Err(Self::too_large(max_bytes));
        }
        Ok(Self(bytes))
    }

    fn too_large(max_bytes: usize) -> Refusal {
        Refusal::too_large(
            "encrypted_data",
            format!("encrypted_data must decode to at most {max_bytes} bytes"),
        )
    }

    pub fn into_bytes(self) -> Vec<u8> {
        self.0
    }
}

/// Appends the base64 of `bytes` to `out` (no intermediate string, for large pages).
pub fn encode_ciphertext_into(bytes: &[u8], out: &mut String) {
    BASE64.encode_string(bytes, out);
}

/// `limit` for message paging: 1..=500, default 100. Not a plain decimal integer (`ten`, `+5`,
/// `1.5`) is 400; an integer out of range (however large) is 422.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageLimit(u16);

impl PageLimit {
    pub const DEFAULT: u16 = 100;
    pub const MAX: u16 = 500;

    pub fn parse(raw: Option<&str>) -> Result<Self, Refusal> {
        let Some(raw) = raw else {
            return Ok(Self(Self::DEFAULT));
        };
        let digits = raw.strip_prefix('-').unwrap_or(raw);
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(Refusal::malformed(
                Some("limit"),
                "limit must be a whole number",
            ));
        }
        match raw.parse::<u16>() {
            Ok(value) if (1..=Self::MAX).contains(&value) => Ok(Self(value)),
            _ => Err(Refusal::rule("limit", "limit must be between 1 and 500")),
        }
    }

    pub fn get(self) -> u16 {
        self.0
    }
}

/// A UUID in the canonical hyphenated form (8-4-4-4-12 hex digits), the only form the API
/// speaks; the simple, braced and URN forms that `uuid` also reads are refused.
pub fn canonical_uuid(raw: &str) -> Option<Uuid> {
    if raw.len() != 36 {
        return None;
    }
    Uuid::try_parse(raw).ok()
}

/// An id from a path or query value: a malformed one is 400.
pub fn parse_id(raw: &str, field: &'static str) -> Result<Uuid, Refusal> {
    canonical_uuid(raw)
        .ok_or_else(|| Refusal::malformed(Some(field), format!("{field} must be a UUID")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(r: Result<impl Sized, Refusal>) -> u16 {
        r.err()
            .map_or(200, |e| crate::ApiError::from(e).status().as_u16())
    }

    #[test]
    fn names() {
        for ok in ["abc", "Alice", "a_b.c-d", &"x".repeat(32)] {
            assert_eq!(UserName::parse(ok).unwrap().as_str(), ok);
        }
        for bad in [
            "ab",
            "",
            &"x".repeat(33),
            "al ice",
            "alice!",
            "äbc",
            "ab\0c",
            "名前です",
        ] {
            assert_eq!(status(UserName::parse(bad)), 422, "{bad:?}");
        }
    }

    #[test]
    fn passwords_count_bytes_not_characters() {
        assert!(Password::parse("12345678").is_ok());
        assert!(Password::parse(&"p".repeat(72)).is_ok());
        assert_eq!(status(Password::parse("1234567")), 422);
        assert_eq!(status(Password::parse(&"p".repeat(73))), 422);
        // 36 two-byte characters = 72 bytes is fine; 37 = 74 bytes is refused.
        assert!(Password::parse(&"é".repeat(36)).is_ok());
        assert_eq!(status(Password::parse(&"é".repeat(37))), 422);
        assert!(Password::parse("abcd\0efgh").is_ok());
        assert!(!format!("{:?}", Password::parse("sekret-pass").unwrap()).contains("sekret"));
    }

    #[test]
    fn ciphertext_bounds() {
        assert_eq!(Ciphertext::parse("aGk=", 10).unwrap().into_bytes(), b"hi");
        assert_eq!(status(Ciphertext::parse("", 10)), 422);
        assert_eq!(status(Ciphertext::parse("not base64!", 100)), 422);
        assert_eq!(
            status(Ciphertext::parse("aGk", 10)),
            422,
            "padding is required"
        );
        assert_eq!(
            status(Ciphertext::parse(&BASE64.encode([0u8; 11]), 10)),
            413
        );
        assert!(Ciphertext::parse(&BASE64.encode([0u8; 10]), 10).is_ok());
        // Far too long: refused by length, before any decoding.
        assert_eq!(status(Ciphertext::parse(&"A".repeat(1_000_000), 10)), 413);
    }

    #[test]
    fn page_limits() {
        assert_eq!(PageLimit::parse(None).unwrap().get(), 100);
        assert_eq!(PageLimit::parse(Some("1")).unwrap().get(), 1);
        assert_eq!(PageLimit::parse(Some("500")).unwrap().get(), 500);
        assert_eq!(status(PageLimit::parse(Some("0"))), 422);
        assert_eq!(status(PageLimit::parse(Some("501"))), 422);
        assert_eq!(status(PageLimit::parse(Some("-5"))), 422);
        assert_eq!(status(PageLimit::parse(Some("ten"))), 400);
        assert_eq!(status(PageLimit::parse(Some(""))), 400);
        assert_eq!(status(PageLimit::parse(Some("+5"))), 400);
        assert_eq!(status(PageLimit::parse(Some("1.5"))), 400);
        assert_eq!(status(PageLimit::parse(Some(" 5"))), 400);
        assert_eq!(status(PageLimit::parse(Some("-"))), 400);
        assert_eq!(
            status(PageLimit::parse(Some("99999999999999999999999"))),
            422
        );
    }

    #[test]
    fn idempotency_keys() {
        for ok in [
            "a",
            "0190a3c2-7b5e-7c3e-8f00-123456789abc",
            "A_b-9",
            &"k".repeat(64),
        ] {
            assert_eq!(IdempotencyKey::parse(ok).unwrap().as_str(), ok);
        }
        for bad in ["", &"k".repeat(65), "a b", "a.b", "ключ", "a\0"] {
            assert_eq!(status(IdempotencyKey::parse(bad)), 400, "{bad:?}");
        }
    }

    #[test]
    fn ids() {
        assert!(parse_id("0190a3c2-7b5e-7c3e-8f00-123456789abc", "id").is_ok());
        assert_eq!(status(parse_id("nope", "id")), 400);
        for other_form in [
            "0190a3c27b5e7c3e8f00123456789abc",
            "{0190a3c2-7b5e-7c3e-8f00-123456789abc}",
            "urn:uuid:0190a3c2-7b5e-7c3e-8f00-123456789abc",
        ] {
            assert_eq!(status(parse_id(other_form, "id")), 400, "{other_form}");
        }
        assert!(
            parse_id("0190A3C2-7B5E-7C3E-8F00-123456789ABC", "id").is_ok(),
            "hex in any case"
        );
    }

    fn key(name: &str) -> String {
        std::fs::read_to_string(format!(
            "{}/../testdata/keys/{name}",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap()
    }

    #[test]
    fn accepted_public_keys() {
        let cases = [
            ("rsa2048.pem", KeyKind::Rsa { bits: 2048 }),
            ("rsa3072.pem", KeyKind::Rsa { bits: 3072 }),
            ("rsa8192.pem", KeyKind::Rsa { bits: 8192 }),
            ("p256.pem", KeyKind::P256),
            ("p384.pem", KeyKind::P384),
            ("ed25519.pem", KeyKind::Ed25519),
            ("x25519.pem", KeyKind::X25519),
        ];
        for (file, kind) in cases {
            let pem = PublicKeyPem::parse(&key(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
            assert_eq!(pem.kind(), kind, "{file}");
            assert_eq!(pem.as_str(), key(file), "{file} is already canonical");
        }
        // CRLF line endings and surrounding whitespace are accepted and normalised.
        let crlf = format!("\n  {}  \n", key("p256.pem").replace('\n', "\r\n"));
        assert_eq!(
            PublicKeyPem::parse(&crlf).unwrap().as_str(),
            key("p256.pem")
        );
    }

    /// A `PUBLIC KEY` PEM of an RSA key with modulus `n` and exponent `e` (big-endian, no sign
    /// byte), with rsaEncryption's NULL parameters or none, and `extra` after the RSAPublicKey.
    fn rsa_pem(n: &[u8], e: &[u8], null_parameters: bool, extra: &[u8]) -> String {
        fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
            let len = content.len();
            let mut out = vec![tag];
            match len {
                0..0x80 => out.push(len as u8),
                0x80..0x100 => out.extend([0x81, len as u8]),
                _ => out.extend([0x82, (len >> 8) as u8, len as u8]),
            }
            out.extend_from_slice(content);
            out
        }
        fn uint(bytes: &[u8]) -> Vec<u8> {
            let sign = if bytes[0] & 0x80 != 0 {
                &[0u8][..]
            } else {
                &[]
            };
            tlv(0x02, &[sign, bytes].concat())
        }
        let rsa_public_key = [tlv(0x30, &[uint(n), uint(e)].concat()), extra.to_vec()].concat();
        let oid = tlv(
            0x06,
            &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01],
        );
        let parameters: &[u8] = if null_parameters { &[0x05, 0x00] } else { &[] };
        let algorithm = tlv(0x30, &[oid, parameters.to_vec()].concat());
        let key = tlv(0x03, &[&[0u8][..], &rsa_public_key].concat());
        let der = tlv(0x30, &[algorithm, key].concat());
        pem_rfc7468::encode_string("PUBLIC KEY", pem_rfc7468::LineEnding::LF, &der).unwrap()
    }

    /// A modulus of exactly `bits` bits, odd unless `even`.
    fn modulus(bits: usize, even: bool) -> Vec<u8> {
        let mut n = vec![0u8; bits.div_ceil(8)];
        n[0] = 1 << ((bits - 1) % 8);
        *n.last_mut().unwrap() |= u8::from(!even);
        n
    }

    #[test]
    fn rsa_public_keys_are_parsed_and_bounded() {
        let f4 = [0x01, 0x00, 0x01];
        let accepted = [
            (rsa_pem(&modulus(2048, false), &f4, true, &[]), 2048),
            (rsa_pem(&modulus(8192, false), &f4, true, &[]), 8192),
            (rsa_pem(&modulus(4095, false), &[3], true, &[]), 4095),
            (
                rsa_pem(
                    &modulus(2048, false),
                    &[1, 0xff, 0xff, 0xff, 0xff],
                    true,
                    &[],
                ),
                2048,
            ),
        ];
        for (i, (pem, bits)) in accepted.iter().enumerate() {
            let key = PublicKeyPem::parse(pem).unwrap_or_else(|e| panic!("case {i}: {e}"));
            assert_eq!(key.kind(), KeyKind::Rsa { bits: *bits }, "case {i}");
        }
        let refused = [
            rsa_pem(&modulus(2047, false), &f4, true, &[]),
            rsa_pem(&modulus(8193, false), &f4, true, &[]),
            rsa_pem(&modulus(2048, true), &f4, true, &[]),
            rsa_pem(&modulus(2048, false), &[1], true, &[]),
            rsa_pem(&modulus(2048, false), &[0], true, &[]),
            rsa_pem(&modulus(2048, false), &[0x01, 0x00, 0x00], true, &[]),
            rsa_pem(&modulus(2048, false), &[2, 0, 0, 0, 1], true, &[]),
            rsa_pem(&modulus(2048, false), &[1; 9], true, &[]),
            rsa_pem(&modulus(2048, false), &f4, false, &[]),
            rsa_pem(&modulus(2048, false), &f4, true, &[0x05, 0x00]),
        ];
        for (i, pem) in refused.iter().enumerate() {
            let err = PublicKeyPem::parse(pem).expect_err(&format!("case {i} must be refused"));
            assert_eq!(
                crate::ApiError::from(err).status().as_u16(),
                422,
                "case {i}"
            );
        }
    }

    #[test]
    fn refused_public_keys() {
        let two = format!("{}{}", key("p256.pem"), key("ed25519.pem"));
        let mut bad_point = pem_rfc7468::decode_vec(key("p256.pem").as_bytes())
            .unwrap()
            .1;
        *bad_point.last_mut().unwrap() ^= 0x01;
        let off_curve =
            pem_rfc7468::encode_string("PUBLIC KEY", pem_rfc7468::LineEnding::LF, &bad_point)
                .unwrap();
        let cases = [
            key("rsa1024.pem"),
            key("rsa8200.pem"),
            key("secp256k1.pem"),
            key("ed448.pem"),
            key("ed25519-private.pem"),
            key("rsa2048-pkcs1.pem"),
            two,
            off_curve,
            key("p256.pem").replace("MFkw", "MFkx"),
            "-----BEGIN PUBLIC KEY-----\n-----END PUBLIC KEY-----\n".into(),
            "not a key".into(),
            String::new(),
            format!(
                "{}\n{}",
                key("rsa2048.pem"),
                "x".repeat(MAX_PUBLIC_KEY_PEM_BYTES)
            ),
        ];
        for (i, pem) in cases.iter().enumerate() {
            let err = PublicKeyPem::parse(pem).expect_err(&format!("case {i} must be refused"));
            assert_eq!(
                crate::ApiError::from(err).status().as_u16(),
                422,
                "case {i}"
            );
        }
    }
}
