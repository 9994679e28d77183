//! Applies the embedded migrations: as a Lambda function inside AWS (invoke it with any payload
//! after a deploy), or as a one-shot command locally (`make migrate`).

use common::config::DatabaseConfig;
use common::db::{Database, MIGRATOR};
use serde::Serialize;

#[derive(Debug, Serialize)]
pub struct MigrationReport {
    pub applied_now: Vec<i64>,
    pub latest_version: Option<i64>,
}

pub async fn run(db: &Database) -> Result<MigrationReport, sqlx::migrate::MigrateError> {
    let pool = db.pool();
    let before = applied_versions(db).await.unwrap_or_default();
    MIGRATOR.run(pool).await?;
    let after = applied_versions(db)
        .await
        .map_err(sqlx::migrate::MigrateError::Execute)?;
    Ok(MigrationReport {
        applied_now: after
            .iter()
            .copied()
            .filter(|v| !before.contains(v))
            .collect(),
        latest_version: after.last().copied(),
    })
}

async fn applied_versions(db: &Database) -> Result<Vec<i64>, sqlx::Error> {
    db.query_scalar("SELECT version FROM _sqlx_migrations WHERE success ORDER BY version")
        .fetch_all(db.pool())
        .await
}

/// The migrator needs only the database settings, not the API's secrets.
pub fn connect() -> Result<Database, Box<dyn std::error::Error + Send + Sync>> {
    let config = DatabaseConfig::from_lookup(|name| std::env::var(name).ok())?;
    Ok(Database::connect(&config)?)
}
