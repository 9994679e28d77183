//! One typed configuration, read from the environment once per Lambda instance and validated
//! there, so a misconfigured function fails at init with a clear message instead of per request.

use std::time::Duration;

use crate::secret::Secret;

/// Largest ciphertext we accept: base64 of 4 MiB is 5.6 MB, just under Lambda's 6 MB payload
/// limit for both the request and the response that returns it.
pub const MAX_MESSAGE_BYTES_LIMIT: usize = 4 * 1024 * 1024;

#[derive(Debug, Clone)]
pub struct Config {
    pub database: DatabaseConfig,
    pub jwt_secret: Secret<String>,
    pub jwt_ttl_seconds: u64,
    pub jwt_issuer: String,
    pub jwt_audience: String,
    pub bcrypt_cost: u32,
    pub message_ttl_seconds: u64,
    pub max_message_bytes: usize,
    pub cors_allowed_origins: Vec<String>,
    pub login_max_failures: u32,
    pub login_max_failures_per_address: u32,
    pub login_window_seconds: u64,
    pub register_max_per_address: u32,
    pub register_window_seconds: u64,
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
    pub host: String,
    pub port: u16,
    pub name: String,
    pub user: String,
    pub ssl_mode: SslMode,
    pub ssl_root_cert: Option<String>,
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
        let jwt_secret = env.get("JWT_SECRET").ok_or(ConfigError::Missing(
            "JWT_SECRET (an HS256 key of at least 32 bytes)",
        ))?;
        if jwt_secret.len() < 32 {
            return Err(invalid(
                "JWT_SECRET",
                format!("must be at least 32 bytes, got {}", jwt_secret.len()),
            ));
        }
        let max_message_bytes =
            env.number("MAX_MESSAGE_BYTES", 65_536, 1, MAX_MESSAGE_BYTES_LIMIT)?;
        Ok(Self {
            database: DatabaseConfig::from_env(&env)?,
            jwt_secret: Secret::new(jwt_secret),
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
            login_max_failures_per_address: env.number(
                "LOGIN_MAX_FAILURES_PER_ADDRESS",
                100,
                1,
                1_000_000,
            )?,
            login_window_seconds: env.number("LOGIN_WINDOW_SECONDS", 900, 1, 86_400 * 7)?,
            register_max_per_address: env.number("REGISTER_MAX_PER_ADDRESS", 20, 1, 1_000_000)?,
            register_window_seconds: env.number("REGISTER_WINDOW_SECONDS", 3600, 1, 86_400 * 7)?,
            metrics_token: env.get("METRICS_TOKEN").map(Secret::new),
        })
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
                host: env.get("DB_HOST").ok_or(ConfigError::Missing("DB_HOST"))?,
                port: env.number("DB_PORT", 5432, 1, 65_535)?,
                name: env.get("DB_NAME").ok_or(ConfigError::Missing("DB_NAME"))?,
                user: env.get("DB_USER").ok_or(ConfigError::Missing("DB_USER"))?,
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
            }),
            (None, false) => {
                return Err(ConfigError::Missing(
                    "DATABASE_URL (or DB_HOST, DB_NAME, DB_USER with DB_IAM_AUTH=true)",
                ));
            }
        };
        Ok(Self {
            target,
            statement_cache_capacity: env.number("DB_STATEMENT_CACHE_CAPACITY", 100, 0, 10_000)?,
            max_connections: env.number("DB_MAX_CONNECTIONS", 2, 1, 100)?,
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
        assert_eq!(c.login_max_failures_per_address, 100);
        assert_eq!(c.login_window_seconds, 900);
        assert_eq!(c.register_max_per_address, 20);
        assert_eq!(c.register_window_seconds, 3600);
        assert!(c.metrics_token.is_none());
        assert_eq!(c.database.statement_cache_capacity, 100);
        assert_eq!(c.database.max_connections, 2);
    }

    #[test]
    fn jwt_secret_is_required_and_long_enough() {
        let err = config(&[URL]).unwrap_err();
        assert!(err.to_string().contains("JWT_SECRET"), "{err}");
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
        ])
        .unwrap();
        match c.database.target {
            DatabaseTarget::Iam(iam) => {
                assert_eq!(iam.port, 5432);
                assert_eq!(iam.ssl_mode, SslMode::Require);
            }
            other => panic!("expected IAM, got {other:?}"),
        }
        assert_eq!(c.database.statement_cache_capacity, 0);
        assert!(config(&[SECRET, URL, ("DB_IAM_AUTH", "true")]).is_err());
        assert!(config(&[SECRET, ("DB_IAM_AUTH", "true"), ("DB_HOST", "h")]).is_err());
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
