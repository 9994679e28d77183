//! Property tests of the validators: no input panics, and each answer is exactly the contract's.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use common::domain::{Ciphertext, PageLimit, Password, PublicKeyPem, UserName, parse_id};
use proptest::prelude::*;

/// The status the HTTP edge gives a refusal (or 200 for a value).
fn status<T>(r: Result<T, common::domain::Refusal>) -> u16 {
    r.err()
        .map_or(200, |e| common::ApiError::from(e).status().as_u16())
}

fn name_rule(s: &str) -> bool {
    (3..=32).contains(&s.chars().count())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn names_any_string(s in any::<String>()) {
        let expected = if name_rule(&s) { 200 } else { 422 };
        prop_assert_eq!(status(UserName::parse(&s)), expected);
    }

    #[test]
    fn names_from_the_alphabet(s in "[A-Za-z0-9_.\\-]{0,40}") {
        let expected = if (3..=32).contains(&s.len()) { 200 } else { 422 };
        prop_assert_eq!(status(UserName::parse(&s)), expected);
    }

    #[test]
    fn passwords_by_bytes(s in any::<String>()) {
        let expected = if (8..=72).contains(&s.len()) { 200 } else { 422 };
        prop_assert_eq!(status(Password::parse(&s)), expected);
    }

    #[test]
    fn ciphertext_round_trips(bytes in proptest::collection::vec(any::<u8>(), 0..300), max in 1usize..256) {
        let encoded = BASE64.encode(&bytes);
        let expected = match bytes.len() {
            0 => 422,
            n if n > max => 413,
            _ => 200,
        };
        let result = Ciphertext::parse(&encoded, max);
        prop_assert_eq!(status(Ciphertext::parse(&encoded, max)), expected);
        if let Ok(c) = result {
            prop_assert_eq!(c.into_bytes(), bytes);
        }
    }

    #[test]
    fn ciphertext_any_string(s in any::<String>()) {
        let expected = match BASE64.decode(&s) {
            Ok(b) if b.is_empty() => 422,
            Ok(b) if b.len() > 64 => 413,
            Ok(_) => 200,
            // Too long to be 64 bytes is refused by length (413) before it is decoded.
            Err(_) if s.len() > 88 => 413,
            Err(_) => 422,
        };
        prop_assert_eq!(status(Ciphertext::parse(&s, 64)), expected);
    }

    #[test]
    fn limits_any_string(s in any::<String>()) {
        let digits = s.strip_prefix('-').unwrap_or(&s);
        let integer = !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit());
        let expected = match s.parse::<i64>() {
            _ if !integer => 400,
            Ok(n) if (1..=500).contains(&n) => 200,
            _ => 422,
        };
        prop_assert_eq!(status(PageLimit::parse(Some(&s))), expected);
    }

    #[test]
    fn limits_numbers(n in -1000i64..2000) {
        let expected = if (1..=500).contains(&n) { 200 } else { 422 };
        prop_assert_eq!(status(PageLimit::parse(Some(&n.to_string()))), expected);
    }

    #[test]
    fn ids_any_string(s in any::<String>()) {
        let hyphenated = s.len() == 36 && uuid::Uuid::try_parse(&s).is_ok();
        let expected = if hyphenated { 200 } else { 400 };
        prop_assert_eq!(status(parse_id(&s, "id")), expected);
    }

    #[test]
    fn public_keys_never_panic(s in any::<String>()) {
        prop_assert!(matches!(status(PublicKeyPem::parse(&s)), 200 | 422));
    }

    /// Random bytes dressed as a PEM block: always refused, never a panic.
    #[test]
    fn pem_wrapped_garbage_is_refused(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        let pem = pem_rfc7468::encode_string("PUBLIC KEY", pem_rfc7468::LineEnding::LF, &bytes).unwrap();
        prop_assert_eq!(status(PublicKeyPem::parse(&pem)), 422);
    }

    /// A real key with one byte flipped: parses as a valid key or is refused, never a panic.
    #[test]
    fn mutated_real_keys(index in 0usize..2000, flip in 1u8..=255, which in 0usize..6) {
        let files = ["rsa2048.pem", "p256.pem", "p384.pem", "ed25519.pem", "x25519.pem", "rsa3072.pem"];
        let text = std::fs::read_to_string(format!("{}/../testdata/keys/{}", env!("CARGO_MANIFEST_DIR"), files[which])).unwrap();
        let (_, mut der) = pem_rfc7468::decode_vec(text.as_bytes()).unwrap();
        let i = index % der.len();
        der[i] ^= flip;
        let pem = pem_rfc7468::encode_string("PUBLIC KEY", pem_rfc7468::LineEnding::LF, &der).unwrap();
        prop_assert!(matches!(status(PublicKeyPem::parse(&pem)), 200 | 422));
    }
}
