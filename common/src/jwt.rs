//! Access tokens: HS256 JWTs whose validation pins the algorithm, issuer and audience, so
//! `alg: none`, other algorithms, other keys, tampered and expired tokens are all refused.

use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::config::Config;

/// Clock skew tolerated between Lambda instances, in seconds.
const LEEWAY_SECONDS: u64 = 5;

/// jsonwebtoken refuses only an empty secret, and `Config` requires at least 32 bytes.
const NON_EMPTY: &str = "Config guarantees a non-empty JWT secret";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Claims {
    pub sub: Uuid,
    /// The device of the account (API.md "Devices"); absent means device 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dev: Option<u32>,
    pub iat: u64,
    pub exp: u64,
    pub iss: String,
    pub aud: String,
    pub jti: Uuid,
}

pub struct JwtKeys {
    encoding: EncodingKey,
    /// The `kid` of `JWT_SECRET` (every token is signed with it) and its key.
    kid: String,
    decoding: DecodingKey,
    /// `JWT_PREVIOUS_SECRET`'s `kid` and key: its tokens verify until they expire.
    previous: Option<(String, DecodingKey)>,
    validation: Validation,
    issuer: String,
    audience: String,
    ttl_seconds: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// Missing, malformed, tampered, expired, or not ours: the reason is not told.
    #[error("missing, malformed, tampered or expired token")]
    Refused,
    #[error("signing a token failed: {0}")]
    Signing(String),
}

pub struct IssuedToken {
    pub access_token: String,
    pub expires_in: u64,
}

impl JwtKeys {
    /// The keys of `JWT_SECRET`, or None for a function configured without it.
    pub fn new(config: &Config) -> Option<Self> {
        install_hs256();
        let secret = config.jwt_secret.as_ref()?.expose().as_bytes();
        let previous = config.jwt_previous_secret.as_ref().map(|previous| {
            let previous = previous.expose().as_bytes();
            (
                key_id(previous),
                DecodingKey::from_secret(previous).expect(NON_EMPTY),
            )
        });
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_issuer(&[&config.jwt_issuer]);
        validation.set_audience(&[&config.jwt_audience]);
        validation.set_required_spec_claims(&["exp", "iat", "sub", "iss", "aud"]);
        validation.leeway = LEEWAY_SECONDS;
        validation.validate_nbf = true;
        Some(Self {
            encoding: EncodingKey::from_secret(secret).expect(NON_EMPTY),
            kid: key_id(secret),
            decoding: DecodingKey::from_secret(secret).expect(NON_EMPTY),
            previous,
            validation,
            issuer: config.jwt_issuer.clone(),
            audience: config.jwt_audience.clone(),
            ttl_seconds: config.jwt_ttl_seconds,
        })
    }

    /// A token for `device_id` of `user_id`, signed with `JWT_SECRET` and naming it in `kid`.
    pub fn issue(&self, user_id: Uuid, device_id: u32) -> Result<IssuedToken, TokenError> {
        let now = unix_now();
        let claims = Claims {
            sub: user_id,
            dev: Some(device_id),
            iat: now,
            exp: now + self.ttl_seconds,
            iss: self.issuer.clone(),
            aud: self.audience.clone(),
            jti: Uuid::now_v7(),
        };
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some(self.kid.clone());
        let access_token = jsonwebtoken::encode(&header, &claims, &self.encoding)
            .map_err(|e| TokenError::Signing(e.to_string()))?;
        Ok(IssuedToken {
            access_token,
            expires_in: self.ttl_seconds,
        })
    }

    /// Any failure is the same 401: the client learns nothing about why.
    /// The key is the one `kid` names: `JWT_SECRET`'s, `JWT_PREVIOUS_SECRET`'s, or without a
    /// `kid` `JWT_SECRET`'s; an unknown `kid` is refused.
    pub fn verify(&self, token: &str) -> Result<Claims, TokenError> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| TokenError::Refused)?;
        let decoding = match header.kid.as_deref() {
            None => &self.decoding,
            Some(kid) if kid == self.kid => &self.decoding,
            Some(kid) => match &self.previous {
                Some((previous_kid, previous)) if kid == previous_kid => previous,
                _ => return Err(TokenError::Refused),
            },
        };
        let claims = jsonwebtoken::decode::<Claims>(token, decoding, &self.validation)
            .map_err(|_| TokenError::Refused)?
            .claims;
        // jsonwebtoken does not check `iat`; a token issued in the future was not issued by us.
        if claims.iat > unix_now() + LEEWAY_SECONDS {
            return Err(TokenError::Refused);
        }
        // Device ids are positive and fit the database's integer.
        if claims
            .dev
            .is_some_and(|dev| dev == 0 || dev > i32::MAX as u32)
        {
            return Err(TokenError::Refused);
        }
        Ok(claims)
    }
}

/// A secret's `kid`: the first 8 bytes of its SHA-256, as 16 lowercase hex characters. It names
/// the secret without revealing it.
pub fn key_id(secret: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(secret)[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Installs jsonwebtoken's cryptography for this process: HMAC-SHA256 alone ([`hs256`]). Without
/// it, `jsonwebtoken::encode` and `decode` panic; `JwtKeys::new` calls it, and so may a test that
/// signs or verifies on its own. Calling it again does nothing.
pub fn install_hs256() {
    // Err only when a provider is installed already (this one, or a test's own).
    let _ = hs256::PROVIDER.install_default();
}

/// jsonwebtoken's `CryptoProvider` for HS256, the only algorithm the API issues or accepts: HMAC
/// from RustCrypto's `hmac` and `sha2`. It replaces the crate's `rust_crypto` feature, which links
/// every JWS algorithm and with them the `rsa` crate (RUSTSEC-2023-0071, see deny.toml). Any
/// other algorithm is refused with `InvalidAlgorithm`, and JWK helpers are not provided.
mod hs256 {
    use hmac::{Hmac, KeyInit, Mac};
    use jsonwebtoken::crypto::{CryptoProvider, JwtSigner, JwtVerifier, KeyUtils};
    use jsonwebtoken::errors::{ErrorKind, Result};
    use jsonwebtoken::signature::{self, Signer, Verifier};
    use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, EncodingKey};
    use sha2::Sha256;

    pub(super) static PROVIDER: CryptoProvider = CryptoProvider {
        signer_factory,
        verifier_factory,
        key_utils: KeyUtils::new_unimplemented(),
    };

    struct Hs256(Hmac<Sha256>);

    impl Hs256 {
        fn new(algorithm: &Algorithm, family: AlgorithmFamily, secret: &[u8]) -> Result<Self> {
            if *algorithm != Algorithm::HS256 {
                return Err(ErrorKind::InvalidAlgorithm.into());
            }
            if family != AlgorithmFamily::Hmac {
                return Err(ErrorKind::InvalidKeyFormat.into());
            }
            let mac =
                Hmac::<Sha256>::new_from_slice(secret).map_err(|_| ErrorKind::InvalidKeyFormat)?;
            Ok(Self(mac))
        }
    }

    fn signer_factory(algorithm: &Algorithm, key: &EncodingKey) -> Result<Box<dyn JwtSigner>> {
        Ok(Box::new(Hs256::new(
            algorithm,
            key.family(),
            key.as_bytes(),
        )?))
    }

    fn verifier_factory(algorithm: &Algorithm, key: &DecodingKey) -> Result<Box<dyn JwtVerifier>> {
        let secret = key.try_get_as_bytes()?;
        Ok(Box::new(Hs256::new(algorithm, key.family(), secret)?))
    }

    impl Signer<Vec<u8>> for Hs256 {
        fn try_sign(&self, message: &[u8]) -> std::result::Result<Vec<u8>, signature::Error> {
            Ok(self
                .0
                .clone()
                .chain_update(message)
                .finalize()
                .into_bytes()
                .to_vec())
        }
    }

    impl JwtSigner for Hs256 {
        fn algorithm(&self) -> Algorithm {
            Algorithm::HS256
        }
    }

    impl Verifier<Vec<u8>> for Hs256 {
        /// Constant-time comparison (`Mac::verify_slice`).
        fn verify(
            &self,
            message: &[u8],
            tag: &Vec<u8>,
        ) -> std::result::Result<(), signature::Error> {
            self.0
                .clone()
                .chain_update(message)
                .verify_slice(tag)
                .map_err(|_| signature::Error::new())
        }
    }

    impl JwtVerifier for Hs256 {
        fn algorithm(&self) -> Algorithm {
            Algorithm::HS256
        }
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
    use serde_json::json;

    const SECRET: &str = "test-secret-test-secret-test-secret!";

    fn keys() -> JwtKeys {
        let config = Config::from_lookup(|k| match k {
            "JWT_SECRET" => Some(SECRET.into()),
            "DATABASE_URL" => Some("postgres://localhost/x".into()),
            _ => None,
        })
        .unwrap();
        JwtKeys::new(&config).expect("JWT_SECRET is set")
    }

    /// Signs any header and claims with HMAC-SHA256, so tests can forge tokens that jsonwebtoken
    /// itself would refuse to make.
    fn sign(header: serde_json::Value, claims: serde_json::Value, secret: &[u8]) -> String {
        let head = B64.encode(header.to_string());
        let body = B64.encode(claims.to_string());
        install_hs256();
        let key = EncodingKey::from_secret(secret).unwrap();
        let signature =
            jsonwebtoken::crypto::sign(format!("{head}.{body}").as_bytes(), &key, Algorithm::HS256)
                .unwrap();
        format!("{head}.{body}.{signature}")
    }

    fn claims(now: u64) -> serde_json::Value {
        json!({"sub": Uuid::now_v7(), "iat": now, "exp": now + 600, "iss": "secure-messenger",
               "aud": "secure-messenger-api", "jti": Uuid::now_v7()})
    }

    #[test]
    fn round_trip() {
        let keys = keys();
        let user = Uuid::now_v7();
        let token = keys.issue(user, 3).unwrap();
        assert_eq!(token.expires_in, 900);
        let claims = keys.verify(&token.access_token).unwrap();
        assert_eq!(claims.sub, user);
        assert_eq!(claims.dev, Some(3));
        let header = jsonwebtoken::decode_header(&token.access_token).unwrap();
        assert_eq!(
            header.kid.as_deref(),
            Some(key_id(SECRET.as_bytes()).as_str())
        );
        assert_eq!(claims.exp - claims.iat, 900);
    }

    #[test]
    fn hand_signed_valid_token_is_accepted() {
        // Guards the forging helper itself: without this, the refusals below could pass vacuously.
        let hs = json!({"alg": "HS256", "typ": "JWT"});
        assert!(
            keys()
                .verify(&sign(hs, claims(unix_now()), SECRET.as_bytes()))
                .is_ok()
        );
    }

    #[test]
    fn refusals() {
        let keys = keys();
        let now = unix_now();
        let hs = json!({"alg": "HS256", "typ": "JWT"});
        let mut cases: Vec<(&str, String)> = Vec::new();
        cases.push((
            "other key",
            sign(
                hs.clone(),
                claims(now),
                b"another-secret-another-secret-1234",
            ),
        ));
        let mut c = claims(now);
        c["aud"] = json!("someone-else");
        cases.push(("wrong aud", sign(hs.clone(), c, SECRET.as_bytes())));
        let mut c = claims(now);
        c["iss"] = json!("someone-else");
        cases.push(("wrong iss", sign(hs.clone(), c, SECRET.as_bytes())));
        let mut c = claims(now);
        c["exp"] = json!(now - 60);
        cases.push(("expired", sign(hs.clone(), c, SECRET.as_bytes())));
        let mut c = claims(now);
        c["nbf"] = json!(now + 600);
        cases.push(("not yet valid", sign(hs.clone(), c, SECRET.as_bytes())));
        let mut c = claims(now);
        c["iat"] = json!(now + 600);
        cases.push((
            "issued in the future",
            sign(hs.clone(), c, SECRET.as_bytes()),
        ));
        let mut c = claims(now);
        c.as_object_mut().unwrap().remove("sub");
        cases.push(("no sub", sign(hs.clone(), c, SECRET.as_bytes())));
        let mut c = claims(now);
        c["sub"] = json!("not-a-uuid");
        cases.push(("sub not a uuid", sign(hs.clone(), c, SECRET.as_bytes())));
        let none = format!(
            "{}.{}.",
            B64.encode(json!({"alg": "none", "typ": "JWT"}).to_string()),
            B64.encode(claims(now).to_string())
        );
        cases.push(("alg none", none));
        // RS256/HS256 confusion: an attacker signs with HMAC but claims RS256 (or HS512).
        cases.push((
            "RS256 header",
            sign(
                json!({"alg": "RS256", "typ": "JWT"}),
                claims(now),
                SECRET.as_bytes(),
            ),
        ));
        cases.push((
            "HS512 header",
            sign(
                json!({"alg": "HS512", "typ": "JWT"}),
                claims(now),
                SECRET.as_bytes(),
            ),
        ));
        let good = keys.issue(Uuid::now_v7(), 1).unwrap().access_token;
        let mut parts: Vec<String> = good.split('.').map(String::from).collect();
        let mut payload: serde_json::Value =
            serde_json::from_slice(&B64.decode(&parts[1]).unwrap()).unwrap();
        payload["sub"] = json!(Uuid::now_v7());
        parts[1] = B64.encode(payload.to_string());
        cases.push(("tampered payload", parts.join(".")));
        cases.push(("garbage", "not.a.jwt".into()));
        cases.push(("empty", String::new()));
        for (what, token) in cases {
            assert!(
                matches!(keys.verify(&token), Err(TokenError::Refused)),
                "{what} must be refused"
            );
        }
    }

    fn keys_with(vars: &[(&'static str, &'static str)]) -> JwtKeys {
        let config = Config::from_lookup(|k| {
            vars.iter()
                .find(|(name, _)| *name == k)
                .map(|(_, v)| v.to_string())
                .or_else(|| (k == "DATABASE_URL").then(|| "postgres://localhost/x".into()))
        })
        .unwrap();
        JwtKeys::new(&config).expect("JWT_SECRET is set")
    }

    const NEXT: &str = "the-next-secret-the-next-secret-0123";

    #[test]
    fn rotation_keeps_old_tokens_until_they_expire() {
        let old_token = keys().issue(Uuid::now_v7(), 1).unwrap().access_token;
        let rotated = keys_with(&[("JWT_SECRET", NEXT), ("JWT_PREVIOUS_SECRET", SECRET)]);
        assert!(
            rotated.verify(&old_token).is_ok(),
            "a token of the previous secret"
        );
        let new_token = rotated.issue(Uuid::now_v7(), 2).unwrap().access_token;
        let header = jsonwebtoken::decode_header(&new_token).unwrap();
        assert_eq!(header.kid.unwrap(), key_id(NEXT.as_bytes()));
        assert!(rotated.verify(&new_token).is_ok());
        // The old key alone does not know the new secret.
        assert!(keys().verify(&new_token).is_err());
        // Once the previous secret is dropped, its tokens are refused.
        let after = keys_with(&[("JWT_SECRET", NEXT)]);
        assert!(after.verify(&old_token).is_err());
        assert!(after.verify(&new_token).is_ok());
    }

    #[test]
    fn kid_selects_the_key() {
        let now = unix_now();
        let rotated = keys_with(&[("JWT_SECRET", NEXT), ("JWT_PREVIOUS_SECRET", SECRET)]);
        // No kid: JWT_SECRET only.
        let plain = json!({"alg": "HS256", "typ": "JWT"});
        assert!(
            rotated
                .verify(&sign(plain.clone(), claims(now), NEXT.as_bytes()))
                .is_ok()
        );
        assert!(
            rotated
                .verify(&sign(plain, claims(now), SECRET.as_bytes()))
                .is_err()
        );
        // A kid that names one secret, signed with the other, or an unknown kid: refused.
        let named_old = json!({"alg": "HS256", "kid": key_id(SECRET.as_bytes())});
        assert!(
            rotated
                .verify(&sign(named_old.clone(), claims(now), SECRET.as_bytes()))
                .is_ok()
        );
        assert!(
            rotated
                .verify(&sign(named_old, claims(now), NEXT.as_bytes()))
                .is_err()
        );
        let unknown = json!({"alg": "HS256", "kid": "0000000000000000"});
        assert!(
            rotated
                .verify(&sign(unknown, claims(now), NEXT.as_bytes()))
                .is_err()
        );
        // dev: absent is device 1 (None here), 0 or past i32 refused.
        let mut c = claims(now);
        c["dev"] = json!(0);
        assert!(
            keys()
                .verify(&sign(json!({"alg": "HS256"}), c, SECRET.as_bytes()))
                .is_err()
        );
        let mut c = claims(now);
        c["dev"] = json!(1u64 << 31);
        assert!(
            keys()
                .verify(&sign(json!({"alg": "HS256"}), c, SECRET.as_bytes()))
                .is_err()
        );
        let mut c = claims(now);
        c["dev"] = json!(7);
        let ok = keys().verify(&sign(json!({"alg": "HS256"}), c, SECRET.as_bytes()));
        assert_eq!(ok.unwrap().dev, Some(7));
    }

    #[test]
    fn key_id_is_sha256_prefix() {
        // SHA-256("abc") starts ba7816bf8f01cfea.
        assert_eq!(key_id(b"abc"), "ba7816bf8f01cfea");
    }

    /// The HS256 provider against RFC 7515 appendix A.1's example (key, signing input and
    /// signature), and its refusal of every other algorithm.
    #[test]
    fn hs256_provider_matches_rfc7515() {
        install_hs256();
        let key = B64
            .decode(
                "AyM1SysPpbyDfgZld3umj1qzKObwVMkoqQ-EstJQLr_T-1qS0gZH75aKtMN3Yj0iPS4hcgUuTwjAzZr1Z9CAow",
            )
            .unwrap();
        let input = "eyJ0eXAiOiJKV1QiLA0KICJhbGciOiJIUzI1NiJ9.eyJpc3MiOiJqb2UiLA0KICJleHAiOjEzMDA4MTkzODAsDQogImh0dHA6Ly9leGFtcGxlLmNvbS9pc19yb290Ijp0cnVlfQ";
        let signature = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk";
        let encoding = EncodingKey::from_secret(&key).unwrap();
        let decoding = DecodingKey::from_secret(&key).unwrap();
        use jsonwebtoken::crypto::{sign, verify};
        assert_eq!(
            sign(input.as_bytes(), &encoding, Algorithm::HS256).unwrap(),
            signature
        );
        assert!(verify(signature, input.as_bytes(), &decoding, Algorithm::HS256).unwrap());
        assert!(!verify(signature, b"tampered", &decoding, Algorithm::HS256).unwrap());
        for other in [
            Algorithm::HS384,
            Algorithm::HS512,
            Algorithm::RS256,
            Algorithm::ES256,
        ] {
            assert!(
                sign(input.as_bytes(), &encoding, other).is_err(),
                "{other:?}"
            );
            assert!(
                verify(signature, input.as_bytes(), &decoding, other).is_err(),
                "{other:?}"
            );
        }
    }
}
