//! One-time database role setup inside the VPC (infra/README.md, step 3): runs
//! infra/create-db-user.sql as the RDS master user, so no workstation ever has to be inside the
//! VPC. `make setup-roles` invokes it with the master password and the RDS CA bundle in the
//! payload; the function has no IAM permission to read any secret itself, and the network needs
//! no endpoint for it.
//!
//! The payload is never logged. Running it twice is harmless (the script is idempotent).

use std::time::Duration;

use serde::{Deserialize, Serialize};
use sqlx::postgres::{PgConnectOptions, PgSslMode};
use sqlx::{AssertSqlSafe, Connection, PgConnection};

/// The script an operator would otherwise run with psql.
pub const CREATE_DB_USER_SQL: &str = include_str!("../../infra/create-db-user.sql");

/// The roles the script creates (and the application's DbUser/DbMigrateUser defaults).
pub const ROLES: [&str; 2] = ["messenger_migrator", "messenger_app"];

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetupRequest {
    /// The instance endpoint (DbInstanceEndpoint), not the proxy: the proxy takes IAM logins only.
    pub host: String,
    #[serde(default = "default_port")]
    pub port: u16,
    /// The application database (DbName).
    pub database: String,
    /// The master user (DbMasterUsername) and its password (from DbMasterUserSecretArn).
    pub user: String,
    pub password: String,
    /// PEM bundle of the RDS certificate authorities, for verify-full TLS to the instance.
    pub ca_pem: String,
}

fn default_port() -> u16 {
    5432
}

impl std::fmt::Debug for SetupRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SetupRequest")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("database", &self.database)
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct RoleReport {
    pub role: String,
    pub can_login: bool,
    pub rds_iam: bool,
}

#[derive(Debug, Serialize)]
pub struct SetupReport {
    pub database: String,
    pub roles: Vec<RoleReport>,
}

#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("the payload is incomplete: {0} is empty")]
    Missing(&'static str),
    #[error("connecting to the database as the master user failed: {0}")]
    Connect(sqlx::Error),
    #[error("create-db-user.sql failed: {0}")]
    Script(sqlx::Error),
    #[error("the roles are not as expected afterwards: {0:?}")]
    Check(Vec<RoleReport>),
}

/// create-db-user.sql without psql's meta-commands (`\set ON_ERROR_STOP on`): sent as one
/// simple-protocol query, any error aborts the whole script anyway.
pub fn script_without_meta_commands() -> String {
    CREATE_DB_USER_SQL
        .lines()
        .filter(|line| !line.trim_start().starts_with('\\'))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Connects as the master user (verify-full against the given CA bundle) and runs the script.
pub async fn run(request: SetupRequest) -> Result<SetupReport, SetupError> {
    for (name, value) in [
        ("host", &request.host),
        ("database", &request.database),
        ("user", &request.user),
        ("password", &request.password),
        ("ca_pem", &request.ca_pem),
    ] {
        if value.trim().is_empty() {
            return Err(SetupError::Missing(name));
        }
    }
    let options = PgConnectOptions::new_without_pgpass()
        .host(&request.host)
        .port(request.port)
        .database(&request.database)
        .username(&request.user)
        .password(&request.password)
        .application_name("secure-messenger-setup-roles")
        .ssl_mode(PgSslMode::VerifyFull)
        .ssl_root_cert_from_pem(request.ca_pem.into_bytes());
    let mut conn = tokio::time::timeout(
        Duration::from_secs(20),
        PgConnection::connect_with(&options),
    )
    .await
    .map_err(|_| SetupError::Connect(sqlx::Error::PoolTimedOut))?
    .map_err(SetupError::Connect)?;
    let report = run_on(&mut conn).await;
    let _ = conn.close().await;
    report
}

/// The script, then a check that both roles can log in with IAM tokens.
pub async fn run_on(conn: &mut PgConnection) -> Result<SetupReport, SetupError> {
    sqlx::raw_sql(AssertSqlSafe(script_without_meta_commands()))
        .execute(&mut *conn)
        .await
        .map_err(SetupError::Script)?;
    let database: String = sqlx::query_scalar("SELECT current_database()::text")
        .fetch_one(&mut *conn)
        .await
        .map_err(SetupError::Script)?;
    let mut roles = Vec::new();
    for role in ROLES {
        let row: Option<(bool, bool)> = sqlx::query_as(
            "SELECT r.rolcanlogin, pg_has_role(r.oid, 'rds_iam', 'MEMBER') \
             FROM pg_roles r WHERE r.rolname = $1",
        )
        .bind(role)
        .fetch_optional(&mut *conn)
        .await
        .map_err(SetupError::Script)?;
        let (can_login, rds_iam) = row.unwrap_or((false, false));
        roles.push(RoleReport {
            role: role.to_string(),
            can_login,
            rds_iam,
        });
    }
    if roles.iter().all(|r| r.can_login && r.rds_iam) {
        Ok(SetupReport { database, roles })
    } else {
        Err(SetupError::Check(roles))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meta_commands_are_dropped_and_the_sql_kept() {
        let sql = script_without_meta_commands();
        assert!(!sql.lines().any(|l| l.trim_start().starts_with('\\')));
        assert!(sql.contains("BEGIN;") && sql.contains("COMMIT;"));
        for role in ROLES {
            assert!(sql.contains(&format!("CREATE ROLE {role} LOGIN")), "{role}");
        }
    }

    #[test]
    fn the_password_never_reaches_debug_output() {
        let request: SetupRequest = serde_json::from_value(serde_json::json!({
            "host": "db.example", "database": "messenger", "user": "admin",
            "password": "hunter2-very-secret", "ca_pem": "-----BEGIN CERTIFICATE-----"
        }))
        .unwrap();
        let shown = format!("{request:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert_eq!(request.port, 5432);
    }

    #[tokio::test]
    async fn an_empty_field_is_refused_before_connecting() {
        let request = SetupRequest {
            host: "db.example".into(),
            port: 5432,
            database: "messenger".into(),
            user: "admin".into(),
            password: " ".into(),
            ca_pem: "pem".into(),
        };
        assert!(matches!(
            run(request).await,
            Err(SetupError::Missing("password"))
        ));
    }
}
