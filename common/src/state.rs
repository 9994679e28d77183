use crate::config::Config;
use crate::db::Database;
use crate::jwt::JwtKeys;

/// Everything a function needs across invocations, built once per Lambda instance.
pub struct AppState {
    pub config: Config,
    pub db: Database,
    pub jwt: JwtKeys,
}

#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Database(#[from] crate::db::DatabaseInitError),
}

impl AppState {
    pub fn from_env() -> Result<Self, InitError> {
        let config = Config::from_env()?;
        let db = Database::connect(&config.database)?;
        Ok(Self::new(config, db))
    }

    pub fn new(config: Config, db: Database) -> Self {
        let jwt = JwtKeys::new(&config);
        Self { config, db, jwt }
    }

    pub fn pool(&self) -> &sqlx::PgPool {
        self.db.pool()
    }
}
