//! The setup-roles function's SQL path against a real PostgreSQL: infra/create-db-user.sql sent
//! as one simple-protocol query, twice (it must be idempotent), then the role check. The roles
//! are cluster-wide, so this touches the local server's roles (as `make dev`'s database would).

use sqlx::PgPool;

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
}
