//! RDS IAM authentication tokens: a SigV4-presigned `connect` request, signed offline.
//!
//! This is what `aws_sdk_rds::auth_token::AuthTokenGenerator` and botocore's
//! `generate_db_auth_token` produce (the tests compare byte for byte with botocore). Doing it
//! here keeps aws-config and aws-sdk-rds (about 40% of a clean build and several MB per binary)
//! out of every function. The one thing given up is the SDK's credential chain: credentials come
//! from `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY` and `AWS_SESSION_TOKEN`, which Lambda sets
//! for the execution role and keeps valid for the life of the execution environment.

use std::fmt::Write;

use chrono::{DateTime, Utc};
use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};

use crate::secret::Secret;

/// RDS accepts a token for 15 minutes after signing; this is the most it allows.
const EXPIRES_SECONDS: u32 = 900;
const SERVICE: &str = "rds-db";

/// The execution role's credentials, as Lambda provides them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AwsCredentials {
    pub access_key_id: String,
    pub secret_access_key: Secret<String>,
    pub session_token: Option<Secret<String>>,
}

/// What a token is for: one database user at one endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenTarget {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub region: String,
}

/// Signs a token valid from `now` for 15 minutes. The token is a password: keep it in a
/// `Secret` until it goes to the connection options.
pub fn auth_token(
    target: &TokenTarget,
    credentials: &AwsCredentials,
    now: DateTime<Utc>,
) -> Secret<String> {
    let date = now.format("%Y%m%d").to_string();
    let timestamp = now.format("%Y%m%dT%H%M%SZ").to_string();
    let scope = format!("{date}/{}/{SERVICE}/aws4_request", target.region);
    let host = format!("{}:{}", target.host, target.port);

    // In the order botocore writes them; the canonical form below sorts them.
    let mut params: Vec<(&str, String)> = vec![
        ("Action", "connect".into()),
        ("DBUser", uri_encode(&target.user)),
        ("X-Amz-Algorithm", "AWS4-HMAC-SHA256".into()),
        (
            "X-Amz-Credential",
            uri_encode(&format!("{}/{scope}", credentials.access_key_id)),
        ),
        ("X-Amz-Date", timestamp.clone()),
        ("X-Amz-Expires", EXPIRES_SECONDS.to_string()),
        ("X-Amz-SignedHeaders", "host".into()),
    ];
    if let Some(token) = &credentials.session_token {
        params.push(("X-Amz-Security-Token", uri_encode(token.expose())));
    }
    let query = join_query(params.iter());

    let mut sorted = params.clone();
    sorted.sort();
    let canonical_request = format!(
        "GET\n/\n{}\nhost:{host}\n\nhost\n{}",
        join_query(sorted.iter()),
        hex(&Sha256::digest(b""))
    );
    let string_to_sign = format!(
        "AWS4-HMAC-SHA256\n{timestamp}\n{scope}\n{}",
        hex(&Sha256::digest(canonical_request.as_bytes()))
    );

    let secret = format!("AWS4{}", credentials.secret_access_key.expose());
    let key = hmac(secret.as_bytes(), date.as_bytes());
    let key = hmac(&key, target.region.as_bytes());
    let key = hmac(&key, SERVICE.as_bytes());
    let key = hmac(&key, b"aws4_request");
    let signature = hex(&hmac(&key, string_to_sign.as_bytes()));

    Secret::new(format!("{host}/?{query}&X-Amz-Signature={signature}"))
}

fn join_query<'a>(params: impl Iterator<Item = &'a (&'a str, String)>) -> String {
    params
        .map(|(name, value)| format!("{name}={value}"))
        .collect::<Vec<_>>()
        .join("&")
}

fn hmac(key: &[u8], data: &[u8]) -> Vec<u8> {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes a key of any length");
    mac.update(data);
    mac.finalize().into_bytes().to_vec()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::with_capacity(64), |mut out, b| {
        let _ = write!(out, "{b:02x}");
        out
    })
}

/// SigV4's URI encoding: every byte but `A-Z a-z 0-9 - _ . ~` as `%XX`.
fn uri_encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for &byte in value.as_bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'~') {
            out.push(byte as char);
        } else {
            let _ = write!(out, "%{byte:02X}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2026-11-28T12:34:56Z
    fn signing_time() -> DateTime<Utc> {
        DateTime::from_timestamp(1_795_869_296, 0).unwrap()
    }

    fn credentials(session_token: Option<&str>) -> AwsCredentials {
        AwsCredentials {
            access_key_id: "AKIDEXAMPLE".into(),
            secret_access_key: Secret::new("wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY".into()),
            session_token: session_token.map(|t| Secret::new(t.to_string())),
        }
    }

    fn target(host: &str, port: u16, user: &str, region: &str) -> TokenTarget {
        TokenTarget {
            host: host.into(),
            port,
            user: user.into(),
            region: region.into(),
        }
    }

    // Expected tokens are botocore 1.x `generate_db_auth_token` output for the same inputs,
    // with the signing clock fixed at `signing_time()`.

    #[test]
    fn matches_botocore_with_a_session_token() {
        let token = auth_token(
            &target(
                "proxy.proxy-abc.us-east-1.rds.amazonaws.com",
                5432,
                "app_user",
                "us-east-1",
            ),
            &credentials(Some("IQoJb3JpZ2luX2Vj/EXAMPLE+token=")),
            signing_time(),
        );
        assert_eq!(
            token.expose(),
            "proxy.proxy-abc.us-east-1.rds.amazonaws.com:5432/?Action=connect&DBUser=app_user\
             &X-Amz-Algorithm=AWS4-HMAC-SHA256\
             &X-Amz-Credential=AKIDEXAMPLE%2F20261128%2Fus-east-1%2Frds-db%2Faws4_request\
             &X-Amz-Date=20261128T123456Z&X-Amz-Expires=900&X-Amz-SignedHeaders=host\
             &X-Amz-Security-Token=IQoJb3JpZ2luX2Vj%2FEXAMPLE%2Btoken%3D\
             &X-Amz-Signature=cc6504767f8212c2e1f1b5d1bfb84082811d0e0af79659a7ebefaf16c32596f4"
        );
    }

    #[test]
    fn matches_botocore_for_a_user_name_that_needs_encoding() {
        let token = auth_token(
            &target("db.example", 6543, "user name+ü/x", "us-east-1"),
            &credentials(Some("IQoJb3JpZ2luX2Vj/EXAMPLE+token=")),
            signing_time(),
        );
        assert_eq!(
            token.expose(),
            "db.example:6543/?Action=connect&DBUser=user%20name%2B%C3%BC%2Fx\
             &X-Amz-Algorithm=AWS4-HMAC-SHA256\
             &X-Amz-Credential=AKIDEXAMPLE%2F20261128%2Fus-east-1%2Frds-db%2Faws4_request\
             &X-Amz-Date=20261128T123456Z&X-Amz-Expires=900&X-Amz-SignedHeaders=host\
             &X-Amz-Security-Token=IQoJb3JpZ2luX2Vj%2FEXAMPLE%2Btoken%3D\
             &X-Amz-Signature=79fece245e92047518ea8bfb5ca0e420037ed2dc93cbeeaa9d1dc5e2378e5902"
        );
    }

    #[test]
    fn matches_botocore_without_a_session_token() {
        let token = auth_token(
            &target("db.example", 5432, "app_user", "eu-west-1"),
            &credentials(None),
            signing_time(),
        );
        assert_eq!(
            token.expose(),
            "db.example:5432/?Action=connect&DBUser=app_user&X-Amz-Algorithm=AWS4-HMAC-SHA256\
             &X-Amz-Credential=AKIDEXAMPLE%2F20261128%2Feu-west-1%2Frds-db%2Faws4_request\
             &X-Amz-Date=20261128T123456Z&X-Amz-Expires=900&X-Amz-SignedHeaders=host\
             &X-Amz-Signature=1e17aeee3e201cfa77d2c51871d1dbd2446726dba8af8b9cc06969cb14618e17"
        );
    }

    #[test]
    fn credentials_never_print() {
        let printed = format!("{:?}", credentials(Some("IQoJb3JpZ2luX2Vj/EXAMPLE+token=")));
        assert!(!printed.contains("wJalrXUtnFEMI"), "{printed}");
        assert!(!printed.contains("IQoJb3JpZ2lu"), "{printed}");
    }
}
