use crate::config::Config;
use crate::db::Database;
use crate::error::ApiError;
use crate::jwt::JwtKeys;

/// Everything a function needs across invocations, built once per Lambda instance.
pub struct AppState {
    pub config: Config,
    pub db: Database,
    jwt: Option<JwtKeys>,
}

/// Whether a function issues or verifies access tokens. Only those get `JWT_SECRET`
/// (template.yaml gives it to no other), and only they fail at init without it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tokens {
    Used,
    Unused,
}

#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Database(#[from] crate::db::DatabaseInitError),
}

impl AppState {
    pub fn from_env(tokens: Tokens) -> Result<Self, InitError> {
        let config = Config::from_env()?;
        if tokens == Tokens::Used {
            config.require_jwt_secret()?;
        }
        let db = Database::connect(&config.database)?;
        Ok(Self::new(config, db))
    }

    pub fn new(config: Config, db: Database) -> Self {
        let jwt = JwtKeys::new(&config);
        Self { config, db, jwt }
    }

    /// The token keys; a function started with `Tokens::Unused` has none, and a request that
    /// needs them is a bug of the function's wiring (500), never a token check skipped.
    pub fn jwt(&self) -> Result<&JwtKeys, ApiError> {
        self.jwt
            .as_ref()
            .ok_or_else(|| ApiError::internal("this function was started without JWT_SECRET"))
    }

    pub fn pool(&self) -> &sqlx::PgPool {
        self.db.pool()
    }
}
