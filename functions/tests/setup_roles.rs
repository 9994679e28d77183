//! The setup-roles function's SQL path against a real PostgreSQL: infra/create-db-user.sql sent
//! as one simple-protocol query, twice (it must be idempotent), then the role check. The roles
//! are cluster-wide, so this touches the local server's roles (as `make dev`'s database would).

// Test scaffolding on the test's own pool.
#![allow(clippy::disallowed_methods)]

use sqlx::{Connection, PgConnection, PgPool};

#[sqlx::test(migrations = false)]
async fn create_db_user_sql_runs_twice_and_both_roles_log_in_with_iam(pool: PgPool) {
    let mut conn = pool.acquire().await.unwrap();
    // RDS has an `rds_iam` role; a local server does not.
    sqlx::raw_sql(
        "DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'rds_iam') \
         THEN CREATE ROLE rds_iam; END IF; END $$",
    )
    .execute(&mut *conn)
    .await
    .unwrap();
    for _ in 0..2 {
        let report = functions::setup_roles::run_on(&mut conn).await.unwrap();
        let roles: Vec<_> = report.roles.iter().map(|r| r.role.as_str()).collect();
        assert_eq!(roles, ["messenger_migrator", "messenger_app"]);
        assert!(report.roles.iter().all(|r| r.can_login && r.rds_iam));
    }
    // The migrator may create in `public`; the app role may not.
    let (migrator, app): (bool, bool) = sqlx::query_as(
        "SELECT has_schema_privilege('messenger_migrator', 'public', 'CREATE'), \
                has_schema_privilege('messenger_app', 'public', 'CREATE')",
    )
    .fetch_one(&mut *conn)
    .await
    .unwrap();
    assert!(migrator && !app);

    // The timeouts are role settings (no `SET` that would pin an RDS Proxy connection), for every
    // database, and a session of the role starts with them.
    let settings: Vec<(String, String)> = sqlx::query_as(
        "SELECT r.rolname::text, array_to_string(s.setconfig, ',') \
         FROM pg_db_role_setting s JOIN pg_roles r ON r.oid = s.setrole \
         WHERE s.setdatabase = 0 AND r.rolname IN ('messenger_app', 'messenger_migrator') \
         ORDER BY r.rolname",
    )
    .fetch_all(&mut *conn)
    .await
    .unwrap();
    let setting = |role: &str| {
        let (_, config) = settings.iter().find(|(r, _)| r == role).expect(role);
        let mut config: Vec<&str> = config.split(',').collect();
        config.sort_unstable();
        config.join(",")
    };
    assert_eq!(
        setting("messenger_app"),
        "idle_in_transaction_session_timeout=5s,lock_timeout=2s,statement_timeout=5s"
    );
    assert_eq!(
        setting("messenger_migrator"),
        "idle_in_transaction_session_timeout=60s,lock_timeout=5s,statement_timeout=280s"
    );
    // What a session of the app role gets at login (`SET ROLE` would not apply role settings):
    // the limits, and a statement over the limit cancelled (57014, query_canceled). Needs a server
    // that lets the role log in without a password, like `make dev`'s; skipped where it cannot.
    let as_app = pool
        .connect_options()
        .as_ref()
        .clone()
        .username("messenger_app");
    match PgConnection::connect_with(&as_app).await {
        Ok(mut app) => {
            for (name, value) in [
                ("statement_timeout", "5s"),
                ("lock_timeout", "2s"),
                ("idle_in_transaction_session_timeout", "5s"),
            ] {
                let shown: String = sqlx::query_scalar("SELECT current_setting($1)")
                    .bind(name)
                    .fetch_one(&mut app)
                    .await
                    .unwrap();
                assert_eq!(shown, value, "{name}");
            }
            let error = sqlx::query("SELECT pg_sleep(6)")
                .execute(&mut app)
                .await
                .expect_err("a 6 s statement must be cancelled at 5 s");
            let code = error.as_database_error().and_then(|e| e.code());
            assert_eq!(code.as_deref(), Some("57014"), "{error}");
            // A request cancelled by the limit answers 503 (retry shortly), not 500.
            assert!(common::db::is_unavailable(&error));
        }
        Err(error) => eprintln!("not checked as a session of messenger_app: {error}"),
    }
}
