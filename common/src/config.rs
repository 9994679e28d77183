//! One typed configuration, read from the environment once per Lambda instance and validated
//! there, so a misconfigured function fails at init with a clear message instead of per request.

use std::time::Duration;

use crate::rds_token::{AwsCredentials, TokenTarget};
use crate::secret::Secret;

/// Largest ciphertext we accept: base64 of 4 MiB is 5.6 MB, just under Lambda's 6 MB payload
/// limit for both the request and the response that returns it.
pub const MAX_MESSAGE_BYTES_LIMIT: usize = 4 * 1024 * 1024;

#[derive(Debug, Clone)]
pub struct Config {
    pub database: DatabaseConfig,
    /// Only functions that issue or verify access tokens get it (template.yaml); they require
    /// it at init (`Config::require_jwt_secret`), the others start without it.
    pub jwt_secret: Option<Secret<String>>,
    /// The secret before the last rotation: tokens it signed still verify until they expire.
    pub jwt_previous_secret: Option<Secret<String>>,
    pub jwt_ttl_seconds: u64,
    pub jwt_issuer: String,
    pub jwt_audience: String,
    pub bcrypt_cost: u32,
    pub message_ttl_seconds: u64,
    pub max_message_bytes: usize,
    pub cors_allowed_origins: Vec<String>,
    /// Failed logins for one name from one address (the name's own user is rarely locked out
    /// by a stranger), for one name from all addresses, and from one address for all names.
    pub login_max_failures: u32,
    pub login_max_failures_per_name: u32,
    pub login_max_failures_per_address: u32,
    pub login_window_seconds: u64,
    pub register_max_per_address: u32,
    pub register_window_seconds: u64,
    pub send_max_per_window: u32,
    pub send_window_seconds: u64,
    pub max_pending_per_recipient: u32,
    pub max_pending_bytes_per_recipient: u64,
    pub max_pending_from_one_sender: u32,
    pub max_devices_per_account: u32,
    pub link_code_ttl_seconds: u64,
    pub link_codes_max_per_window: u32,
    pub link_max_failures: u32,
    pub link_window_seconds: u64,
    pub prekey_upload_max: u32,
    pub prekey_max_stored: u32,
    pub prekey_claims_per_window: u32,
    pub prekey_claims_per_target: u32,
    pub prekey_claim_window_seconds: u64,
    pub metrics_token: Option<Secret<String>>,
}

#[derive(Debug, Clone)]
pub struct DatabaseConfig {
    pub target: DatabaseTarget,
    /// Named prepared statements cached per connection; 0 turns them off (RDS Proxy pins a
    /// connection that uses them).
    pub statement_cache_capacity: usize,
    pub max_connections: u32,
    pub acquire_timeout: Duration,
}

#[derive(Debug, Clone)]
pub enum DatabaseTarget {
    Url(Secret<String>),
    Iam(IamDatabase),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IamDatabase {
    /// Host, port and user to connect as, and the region that signs the token.
    pub endpoint: TokenTarget,
    pub name: String,
    pub ssl_mode: SslMode,
    pub ssl_root_cert: Option<String>,
    /// The execution role's credentials (Lambda sets them in the environment).
    pub credentials: AwsCredentials,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Require,
    VerifyFull,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("{0} is required")]
    Missing(&'static str),
    #[error("{name} is invalid: {reason}")]
    Invalid { name: &'static str, reason: String },
}

fn invalid(name: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        name,
        reason: reason.into(),
    }
}

impl Config {
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Reads through `lookup` so tests can configure without touching the process environment.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let env = Env(&lookup);
        let jwt_secret = env.secret_of_32_bytes("JWT_SECRET")?;
        let jwt_previous_secret = env.secret_of_32_bytes("JWT_PREVIOUS_SECRET")?;
        let max_message_bytes =
            env.number("MAX_MESSAGE_BYTES", 65_536, 1, MAX_MESSAGE_BYTES_LIMIT)?;
        Ok(Self {
            database: DatabaseConfig::from_env(&env)?,
            jwt_secret: jwt_secret.map(Secret::new),
            jwt_previous_secret: jwt_previous_secret.map(Secret::new),
            jwt_ttl_seconds: env.number("JWT_TTL_SECONDS", 900, 1, 86_400)?,
            jwt_issuer: env
                .get("JWT_ISSUER")
                .unwrap_or_else(|| "secure-messenger".into()),
            jwt_audience: env
                .get("JWT_AUDIENCE")
                .unwrap_or_else(|| "secure-messenger-api".into()),
            bcrypt_cost: env.number("BCRYPT_COST", 12, 4, 31)?,
            message_ttl_seconds: env.number("MESSAGE_TTL_SECONDS", 604_800, 1, 604_800)?,
            max_message_bytes,
            cors_allowed_origins: env.list("CORS_ALLOWED_ORIGINS")?,
            login_max_failures: env.number("LOGIN_MAX_FAILURES", 5, 1, 1_000_000)?,
            login_max_failures_per_name: env.number(
                "LOGIN_MAX_FAILURES_PER_NAME",
                100,
                1,
                1_000_000,
            )?,
            login_max_failures_per_address: env.number(
                "LOGIN_MAX_FAILURES_PER_ADDRESS",
                100,
                1,
                1_000_000,
            )?,
            login_window_seconds: env.number("LOGIN_WINDOW_SECONDS", 900, 1, 86_400 * 7)?,
            register_max_per_address: env.number("REGISTER_MAX_PER_ADDRESS", 20, 1, 1_000_000)?,
            register_window_seconds: env.number("REGISTER_WINDOW_SECONDS", 3600, 1, 86_400 * 7)?,
            send_max_per_window: env.number("SEND_MAX_PER_WINDOW", 300, 1, 1_000_000)?,
            send_window_seconds: env.number("SEND_WINDOW_SECONDS", 60, 1, 86_400)?,
            max_pending_per_recipient: env.number(
                "MAX_PENDING_PER_RECIPIENT",
                10_000,
                1,
                1_000_000,
            )?,
            max_pending_bytes_per_recipient: env.number(
                "MAX_PENDING_BYTES_PER_RECIPIENT",
                256 * 1024 * 1024,
                1,
                1 << 40,
            )?,
            max_pending_from_one_sender: env.number(
                "MAX_PENDING_FROM_ONE_SENDER",
                1000,
                1,
                1_000_000,
            )?,
            max_devices_per_account: env.number("MAX_DEVICES_PER_ACCOUNT", 6, 2, 100)?,
            link_code_ttl_seconds: env.number("LINK_CODE_TTL_SECONDS", 600, 1, 86_400)?,
            link_codes_max_per_window: env.number("LINK_CODES_MAX_PER_WINDOW", 6, 1, 1_000_000)?,
            link_max_failures: env.number("LINK_MAX_FAILURES", 10, 1, 1_000_000)?,
            link_window_seconds: env.number("LINK_WINDOW_SECONDS", 3600, 1, 86_400 * 7)?,
            prekey_upload_max: env.number("PREKEY_UPLOAD_MAX", 100, 1, 10_000)?,
            prekey_max_stored: env.number("PREKEY_MAX_STORED", 1000, 1, 100_000)?,
            prekey_claims_per_window: env.number("PREKEY_CLAIMS_PER_WINDOW", 600, 1, 1_000_000)?,
            prekey_claims_per_target: env.number("PREKEY_CLAIMS_PER_TARGET", 100, 1, 1_000_000)?,
            prekey_claim_window_seconds: env.number(
                "PREKEY_CLAIM_WINDOW_SECONDS",
                3600,
                1,
                86_400 * 7,
            )?,
            metrics_token: env.get("METRICS_TOKEN").map(Secret::new),
        })
    }

    /// For functions that issue or verify access tokens: start-up fails without `JWT_SECRET`.
    pub fn require_jwt_secret(&self) -> Result<(), ConfigError> {
        match self.jwt_secret {
            Some(_) => Ok(()),
            None => Err(ConfigError::Missing(
                "JWT_SECRET (an HS256 key of at least 32 bytes)",
            )),
        }
    }

    /// Whether CORS allows this `Origin` value (a trailing slash is ignored, as in the list).
    pub fn allows_origin(&self, origin: &str) -> bool {
        let origin = origin.trim_end_matches('/');
        self.cors_allowed_origins.iter().any(|a| a == origin)
    }

    /// Largest request body worth reading: the base64 of the largest ciphertext plus room for
    /// the JSON around it.
    pub fn max_body_bytes(&self) -> usize {
        self.max_message_bytes.div_ceil(3) * 4 + 16 * 1024
    }
}

impl DatabaseConfig {
    /// The database settings alone, for tools (the migrator) that need nothing else.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        Self::from_env(&Env(&lookup))
    }

    fn from_env(env: &Env<'_>) -> Result<Self, ConfigError> {
        let iam = env.flag("DB_IAM_AUTH")?;
        let target = match (env.get("DATABASE_URL"), iam) {
            (Some(_), true) => {
                return Err(invalid(
                    "DB_IAM_AUTH",
                    "set either DATABASE_URL or DB_HOST/DB_NAME/DB_USER with DB_IAM_AUTH=true, not both",
                ));
            }
            (Some(url), false) => DatabaseTarget::Url(Secret::new(url)),
            (None, true) => DatabaseTarget::Iam(IamDatabase {
                endpoint: TokenTarget {
                    host: env.get("DB_HOST").ok_or(ConfigError::Missing("DB_HOST"))?,
                    port: env.number("DB_PORT", 5432, 1, 65_535)?,
                    user: env.get("DB_USER").ok_or(ConfigError::Missing("DB_USER"))?,
                    region: env
                        .get("AWS_REGION")
                        .or_else(|| env.get("AWS_DEFAULT_REGION"))
                        .ok_or(ConfigError::Missing(
                            "AWS_REGION (Lambda sets it; needed to sign RDS IAM tokens)",
                        ))?,
                },
                name: env.get("DB_NAME").ok_or(ConfigError::Missing("DB_NAME"))?,
                ssl_mode: match env.get("DB_SSL_MODE").as_deref() {
                    None | Some("require") => SslMode::Require,
                    Some("verify-full") => SslMode::VerifyFull,
                    Some(other) => {
                        return Err(invalid(
                            "DB_SSL_MODE",
                            format!("expected require or verify-full, got {other:?}"),
                        ));
                    }
                },
                ssl_root_cert: env.get("DB_SSL_ROOT_CERT"),
                credentials: AwsCredentials {
                    access_key_id: env.get("AWS_ACCESS_KEY_ID").ok_or(ConfigError::Missing(
                        "AWS_ACCESS_KEY_ID (Lambda sets the execution role's credentials; \
                         elsewhere export them, e.g. `aws configure export-credentials --format env`)",
                    ))?,
                    secret_access_key: Secret::new(
                        env.get("AWS_SECRET_ACCESS_KEY")
                            .ok_or(ConfigError::Missing("AWS_SECRET_ACCESS_KEY"))?,
                    ),
                    session_token: env.get("AWS_SESSION_TOKEN").map(Secret::new),
                },
            }),
            (None, false) => {
                return Err(ConfigError::Missing(
                    "DATABASE_URL (or DB_HOST, DB_NAME, DB_USER with DB_IAM_AUTH=true)",
                ));
            }
        };
        Ok(Self {
            target,
            statement_cache_capacity: env.number("DB_STATEMENT_CACHE_CAPACITY", 0, 0, 10_000)?,
            max_connections: env.number("DB_MAX_CONNECTIONS", 1, 1, 100)?,
            acquire_timeout: Duration::from_millis(env.number(
                "DB_ACQUIRE_TIMEOUT_MS",
                1500,
                100,
                60_000,
            )?),
        })
    }
}

/// The environment, with empty values treated as unset (SAM and shells pass `VAR=` easily).
struct Env<'a>(&'a dyn Fn(&str) -> Option<String>);

impl Env<'_> {
    fn get(&self, name: &str) -> Option<String> {
        (self.0)(name).filter(|v| !v.trim().is_empty())
    }

    fn number<T>(&self, name: &'static str, default: T, min: T, max: T) -> Result<T, ConfigError>
    where
        T: std::str::FromStr + PartialOrd + std::fmt::Display + Copy,
    {
        let Some(raw) = self.get(name) else {
            return Ok(default);
        };
        let value: T = raw
            .trim()
            .parse()
            .map_err(|_| invalid(name, format!("expected a whole number, got {raw:?}")))?;
        if value < min || value > max {
            return Err(invalid(
                name,
                format!("must be between {min} and {max}, got {value}"),
            ));
        }
        Ok(value)
    }

    /// An HMAC key: unset, or at least 32 bytes.
    fn secret_of_32_bytes(&self, name: &'static str) -> Result<Option<String>, ConfigError> {
        match self.get(name) {
            Some(secret) if secret.len() < 32 => Err(invalid(
                name,
                format!("must be at least 32 bytes, got {}", secret.len()),
            )),
            secret => Ok(secret),
        }
    }

    fn flag(&self, name: &'static str) -> Result<bool, ConfigError> {
        match self
            .get(name)
            .map(|v| v.trim().to_ascii_lowercase())
            .as_deref()
        {
            None | Some("false" | "0" | "no") => Ok(false),
            Some("true" | "1" | "yes") => Ok(true),
            Some(other) => Err(invalid(
                name,
                format!("expected true or false, got {other:?}"),
            )),
        }
    }

    fn list(&self, name: &'static str) -> Result<Vec<String>, ConfigError> {
        let items: Vec<String> = self
            .get(name)
            .map(|v| {
                v.split(',')
                    .map(|s| s.trim().trim_end_matches('/').to_string())
                    .filter(|s| !s.is_empty())
                    .collect()
            })
            .unwrap_or_default();
        if items.iter().any(|o| o == "*") {
            return Err(invalid(
                name,
                "name the allowed origins; `*` is not accepted",
            ));
        }
        Ok(items)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn config(vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_lookup(|k| map.get(k).cloned())
    }

    const SECRET: (&str, &str) = ("JWT_SECRET", "0123456789abcdef0123456789abcdef");
    const URL: (&str, &str) = ("DATABASE_URL", "postgres://localhost/x");

    #[test]
    fn defaults_follow_the_contract() {
        let c = config(&[SECRET, URL]).unwrap();
        assert_eq!(c.jwt_ttl_seconds, 900);
        assert_eq!(c.bcrypt_cost, 12);
        assert_eq!(c.message_ttl_seconds, 604_800);
        assert_eq!(c.max_message_bytes, 65_536);
        assert!(c.cors_allowed_origins.is_empty());
        assert_eq!(c.login_max_failures, 5);
        assert_eq!(c.login_max_failures_per_name, 100);
        assert_eq!(c.login_max_failures_per_address, 100);
        assert_eq!(c.send_max_per_window, 300);
        assert_eq!(c.send_window_seconds, 60);
        assert_eq!(c.max_pending_per_recipient, 10_000);
        assert_eq!(c.max_pending_bytes_per_recipient, 268_435_456);
        assert_eq!(c.login_window_seconds, 900);
        assert_eq!(c.register_max_per_address, 20);
        assert_eq!(c.register_window_seconds, 3600);
        assert!(c.metrics_token.is_none());
        assert_eq!(c.database.statement_cache_capacity, 0);
        assert_eq!(c.database.max_connections, 1);
    }

    #[test]
    fn jwt_secret_is_required_where_tokens_are_used_and_long_enough() {
        let without = config(&[URL]).unwrap();
        assert!(without.jwt_secret.is_none());
        let err = without.require_jwt_secret().unwrap_err();
        assert!(err.to_string().contains("JWT_SECRET"), "{err}");
        assert!(config(&[SECRET, URL]).unwrap().require_jwt_secret().is_ok());
        let err = config(&[URL, ("JWT_SECRET", "short")]).unwrap_err();
        assert!(err.to_string().contains("at least 32 bytes"), "{err}");
        // The message names the rule, never the value.
        assert!(!err.to_string().contains("short"));
    }

    #[test]
    fn numbers_are_range_checked() {
        let err = config(&[SECRET, URL, ("BCRYPT_COST", "3")]).unwrap_err();
        assert!(err.to_string().contains("BCRYPT_COST"), "{err}");
        assert!(config(&[SECRET, URL, ("BCRYPT_COST", "abc")]).is_err());
        assert_eq!(
            config(&[SECRET, URL, ("BCRYPT_COST", "4")])
                .unwrap()
                .bcrypt_cost,
            4
        );
        assert!(config(&[SECRET, URL, ("MAX_MESSAGE_BYTES", "0")]).is_err());
        // Seven days are a ceiling of the contract, not a default.
        assert!(config(&[SECRET, URL, ("MESSAGE_TTL_SECONDS", "604801")]).is_err());
        assert!(config(&[SECRET, URL, ("SEND_MAX_PER_WINDOW", "0")]).is_err());
    }

    #[test]
    fn database_is_url_or_iam() {
        assert!(matches!(config(&[SECRET]), Err(ConfigError::Missing(_))));
        let c = config(&[
            SECRET,
            ("DB_IAM_AUTH", "true"),
            ("DB_HOST", "proxy.example"),
            ("DB_NAME", "messenger"),
            ("DB_USER", "app"),
            ("DB_STATEMENT_CACHE_CAPACITY", "0"),
            AWS_ENV[0],
            AWS_ENV[1],
            AWS_ENV[2],
            AWS_ENV[3],
        ])
        .unwrap();
        match c.database.target {
            DatabaseTarget::Iam(iam) => {
                assert_eq!(iam.endpoint.port, 5432);
                assert_eq!(iam.endpoint.region, "eu-central-1");
                assert_eq!(iam.ssl_mode, SslMode::Require);
                assert_eq!(
                    iam.credentials
                        .session_token
                        .as_ref()
                        .map(|t| t.expose().as_str()),
                    Some("session-token-value")
                );
            }
            other => panic!("expected IAM, got {other:?}"),
        }
        assert_eq!(c.database.statement_cache_capacity, 0);
        assert!(config(&[SECRET, URL, ("DB_IAM_AUTH", "true")]).is_err());
        assert!(config(&[SECRET, ("DB_IAM_AUTH", "true"), ("DB_HOST", "h")]).is_err());
    }

    const AWS_ENV: [(&str, &str); 4] = [
        ("AWS_REGION", "eu-central-1"),
        ("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE"),
        ("AWS_SECRET_ACCESS_KEY", "secret-key-value"),
        ("AWS_SESSION_TOKEN", "session-token-value"),
    ];

    #[test]
    fn iam_mode_needs_a_region_and_credentials_and_never_prints_them() {
        let iam = [
            SECRET,
            ("DB_IAM_AUTH", "true"),
            ("DB_HOST", "proxy.example"),
            ("DB_NAME", "messenger"),
            ("DB_USER", "app"),
        ];
        for (name, _) in &AWS_ENV[..3] {
            let vars: Vec<_> = iam
                .iter()
                .chain(AWS_ENV.iter().filter(|(n, _)| n != name))
                .copied()
                .collect();
            let err = config(&vars).unwrap_err();
            assert!(err.to_string().contains(name), "{err}");
        }
        let with_default_region: Vec<_> = iam
            .iter()
            .chain(&AWS_ENV[1..])
            .copied()
            .chain([("AWS_DEFAULT_REGION", "us-west-2")])
            .collect();
        let c = config(&with_default_region).unwrap();
        let printed = format!("{c:?}");
        assert!(!printed.contains("secret-key-value"), "{printed}");
        assert!(!printed.contains("session-token-value"), "{printed}");
        match c.database.target {
            DatabaseTarget::Iam(iam) => assert_eq!(iam.endpoint.region, "us-west-2"),
            other => panic!("expected IAM, got {other:?}"),
        }
    }

    #[test]
    fn cors_origins_never_wildcard() {
        let c = config(&[
            SECRET,
            URL,
            (
                "CORS_ALLOWED_ORIGINS",
                "https://a.example, https://b.example/",
            ),
        ])
        .unwrap();
        assert_eq!(
            c.cors_allowed_origins,
            ["https://a.example", "https://b.example"]
        );
        assert!(config(&[SECRET, URL, ("CORS_ALLOWED_ORIGINS", "*")]).is_err());
    }

    #[test]
    fn database_url_is_not_printed() {
        let c = config(&[SECRET, ("DATABASE_URL", "postgres://u:pw-abc@h/db")]).unwrap();
        let printed = format!("{c:?}");
        assert!(
            !printed.contains("pw-abc") && !printed.contains(SECRET.1),
            "{printed}"
        );
    }
}
