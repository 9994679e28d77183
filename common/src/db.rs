//! The PostgreSQL pool: built once per Lambda instance, lazy (init never waits on the
//! database), small (one instance serves one request at a time), and quick to give up so a dead
//! database answers 503 in well under two seconds instead of hanging.

use std::cell::Cell;
use std::future::Future;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sqlx::migrate::Migrator;
use sqlx::postgres::{PgArguments, PgConnectOptions, PgPoolOptions, PgRow, PgSslMode};
use sqlx::query::{Query, QueryAs, QueryScalar};
use sqlx::{FromRow, PgPool, Postgres};

use crate::config::{DatabaseConfig, DatabaseTarget, IamDatabase, SslMode};
use crate::error::ApiError;
use crate::rds_token;

/// The schema, embedded so the `migrate` function can apply it inside AWS.
pub static MIGRATOR: Migrator = sqlx::migrate!("../migrations");

/// RDS IAM tokens live 15 minutes; new connections get a fresh one well before that.
const IAM_TOKEN_REFRESH: Duration = Duration::from_secs(10 * 60);

tokio::task_local! {
    /// The statements issued by the request this task serves, for `counting_statements`.
    static STATEMENTS: Cell<u32>;
}

/// Runs `request` (a handler), counting the statements it issues through any `Database`:
/// `common::runtime` checks the token's device itself only for a refusal given before any
/// statement, since every statement of an authenticated request checks it.
pub async fn counting_statements<F: Future>(request: F) -> (F::Output, u32) {
    STATEMENTS
        .scope(Cell::new(0), async move {
            let output = request.await;
            (output, STATEMENTS.with(Cell::get))
        })
        .await
}

/// One more statement for the request being served (none outside `counting_statements`).
fn issued() {
    let _ = STATEMENTS.try_with(|n| n.set(n.get().saturating_add(1)));
}

pub struct Database {
    pool: PgPool,
    iam: Option<IamTokens>,
    /// Whether queries prepare named statements. Only with a statement cache: without one (RDS
    /// Proxy, which pins a connection that holds a named statement) sqlx 0.9 would prepare a new
    /// named statement per execution and never close it, so every query runs unnamed instead.
    persistent: bool,
}

struct IamTokens {
    database: IamDatabase,
    base_options: PgConnectOptions,
    signed_at: Mutex<Instant>,
}

#[derive(Debug, thiserror::Error)]
#[error("database configuration: {0}")]
pub struct DatabaseInitError(String);

impl Database {
    /// Builds the pool without connecting (init never waits on the database). In IAM mode this
    /// signs the first token, offline.
    pub fn connect(config: &DatabaseConfig) -> Result<Self, DatabaseInitError> {
        match &config.target {
            DatabaseTarget::Url(url) => {
                let options: PgConnectOptions = url.expose().parse().map_err(|_| {
                    DatabaseInitError("DATABASE_URL is not a valid PostgreSQL URL".into())
                })?;
                Ok(Self::connect_with(config, options))
            }
            DatabaseTarget::Iam(iam) => {
                let tokens = IamTokens {
                    base_options: iam_base_options(iam, config.statement_cache_capacity),
                    database: iam.clone(),
                    signed_at: Mutex::new(Instant::now()),
                };
                let first = tokens
                    .options_with_fresh_token()
                    .map_err(|e| DatabaseInitError(e.to_string()))?;
                Ok(Self {
                    pool: pool_options(config).connect_lazy_with(first),
                    iam: Some(tokens),
                    persistent: config.statement_cache_capacity > 0,
                })
            }
        }
    }

    /// The pool `connect` builds, to the server `options` name (tests point it at their own
    /// database); every other setting comes from `config`.
    pub fn connect_with(config: &DatabaseConfig, options: PgConnectOptions) -> Self {
        let options = options
            .statement_cache_capacity(config.statement_cache_capacity)
            .application_name("secure-messenger");
        Self {
            pool: pool_options(config).connect_lazy_with(options),
            iam: None,
            persistent: config.statement_cache_capacity > 0,
        }
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// `sqlx::query`, as a statement of the configured kind (named and cached, or unnamed).
    /// Every query of the functions goes through these three (clippy.toml forbids the rest),
    /// which count it for the request being served (`counting_statements`).
    #[allow(clippy::disallowed_methods)]
    pub fn query<'q>(&self, sql: &'static str) -> Query<'q, Postgres, PgArguments> {
        issued();
        sqlx::query(sql).persistent(self.persistent)
    }

    #[allow(clippy::disallowed_methods)]
    pub fn query_as<'q, O>(&self, sql: &'static str) -> QueryAs<'q, Postgres, O, PgArguments>
    where
        O: for<'r> FromRow<'r, PgRow>,
    {
        issued();
        sqlx::query_as(sql).persistent(self.persistent)
    }

    #[allow(clippy::disallowed_methods)]
    pub fn query_scalar<'q, O>(
        &self,
        sql: &'static str,
    ) -> QueryScalar<'q, Postgres, O, PgArguments>
    where
        (O,): for<'r> FromRow<'r, PgRow>,
    {
        issued();
        sqlx::query_scalar(sql).persistent(self.persistent)
    }

    /// Called once per invocation: free unless the IAM token is due. A Lambda instance is frozen
    /// between invocations, so a background timer could not be trusted to have run.
    pub fn refresh_credentials(&self) {
        let Some(iam) = &self.iam else {
            return;
        };
        let due = iam
            .signed_at
            .lock()
            .map(|at| at.elapsed() >= IAM_TOKEN_REFRESH)
            .unwrap_or(true);
        if due {
            match iam.options_with_fresh_token() {
                Ok(options) => self.pool.set_connect_options(options),
                // The current token is good for 5 more minutes; the next invocation tries again.
                Err(error) => tracing::warn!(error = %error, "IAM token refresh failed"),
            }
        }
    }
}

fn pool_options(config: &DatabaseConfig) -> PgPoolOptions {
    PgPoolOptions::new()
        .max_connections(config.max_connections)
        .min_connections(0)
        .acquire_timeout(config.acquire_timeout)
        // A warm Lambda may sleep for minutes; drop idle connections before RDS or a NAT does.
        .idle_timeout(Some(Duration::from_secs(300)))
        .max_lifetime(Some(Duration::from_secs(30 * 60)))
        // Saves a round trip per request; a connection that died is discarded on its first
        // error, and the next request opens a new one.
        .test_before_acquire(false)
}

impl IamTokens {
    fn options_with_fresh_token(&self) -> Result<PgConnectOptions, rds_token::SigningError> {
        let token = rds_token::auth_token(
            &self.database.endpoint,
            &self.database.credentials,
            chrono::Utc::now(),
        )?;
        if let Ok(mut at) = self.signed_at.lock() {
            *at = Instant::now();
        }
        Ok(self.base_options.clone().password(token.expose()))
    }
}

fn iam_base_options(iam: &IamDatabase, statement_cache_capacity: usize) -> PgConnectOptions {
    let options = PgConnectOptions::new_without_pgpass()
        .host(&iam.endpoint.host)
        .port(iam.endpoint.port)
        .database(&iam.name)
        .username(&iam.endpoint.user)
        .statement_cache_capacity(statement_cache_capacity)
        .application_name("secure-messenger")
        .ssl_mode(match iam.ssl_mode {
            SslMode::Require => PgSslMode::Require,
            SslMode::VerifyFull => PgSslMode::VerifyFull,
        });
    match &iam.ssl_root_cert {
        Some(path) => options.ssl_root_cert(path),
        None => options,
    }
}

/// A database failure at the edge: 503 when the database cannot be reached, else 500.
impl From<sqlx::Error> for ApiError {
    fn from(error: sqlx::Error) -> Self {
        if is_unavailable(&error) {
            Self::Unavailable(short_reason(&error))
        } else {
            Self::Internal(error.to_string())
        }
    }
}

/// Whether an error means "the database cannot be reached" (503) rather than a bug (500).
pub fn is_unavailable(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::WorkerCrashed => true,
        // 08: connection exception, 53: insufficient resources, 57P: operator intervention
        // (shutdown, crash recovery), 28: authentication (an expired or refused IAM token),
        // 57014 / 55P03: the role's statement_timeout / lock_timeout (infra/create-db-user.sql),
        // a database too busy to answer in time: retry shortly, not a bug.
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            code.starts_with("08")
                || code.starts_with("53")
                || code.starts_with("57P")
                || code.starts_with("28")
                || code == "57014"
                || code == "55P03"
        }),
        _ => false,
    }
}

/// A short reason for logs and the readiness body: the kind of failure, never a URL or password.
pub fn short_reason(error: &sqlx::Error) -> String {
    match error {
        sqlx::Error::PoolTimedOut => "timed out connecting".into(),
        sqlx::Error::PoolClosed => "pool closed".into(),
        sqlx::Error::Io(e) => match e.kind() {
            std::io::ErrorKind::ConnectionRefused => "connection refused".into(),
            std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::ConnectionAborted => {
                "connection reset".into()
            }
            std::io::ErrorKind::TimedOut => "timed out".into(),
            std::io::ErrorKind::UnexpectedEof => "connection closed".into(),
            _ => "network error".into(),
        },
        sqlx::Error::Tls(_) => "tls error".into(),
        sqlx::Error::Database(db) => match db.code() {
            Some(code) if code.starts_with("28") => "authentication failed".into(),
            Some(code) => format!("server error {code}"),
            None => "server error".into(),
        },
        _ => "database error".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_failures_are_unavailable_not_internal() {
        let refused = sqlx::Error::Io(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert!(is_unavailable(&refused));
        assert_eq!(short_reason(&refused), "connection refused");
        assert!(is_unavailable(&sqlx::Error::PoolTimedOut));
        assert!(!is_unavailable(&sqlx::Error::RowNotFound));
    }
}
