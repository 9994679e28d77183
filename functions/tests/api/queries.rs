//! The query plans on a table of 1,000,000 messages: fetch, confirm and purge each use the index
//! meant for them (a plan change that falls back to a scan fails here, not in production).

use sqlx::PgPool;

async fn plan(
    pool: &PgPool,
    sql: &str,
    binds: impl FnOnce(
        sqlx::query::Query<'_, sqlx::Postgres, sqlx::postgres::PgArguments>,
    ) -> sqlx::query::Query<'_, sqlx::Postgres, sqlx::postgres::PgArguments>,
) -> String {
    plan_with(pool, sql, false, binds).await
}

/// The plan; with `index_only`, as the planner makes it when scans are priced out, which shows
/// whether an index can serve the query at all on a table too small for the planner to use it.
async fn plan_with(
    pool: &PgPool,
    sql: &str,
    index_only: bool,
    binds: impl FnOnce(
        sqlx::query::Query<'_, sqlx::Postgres, sqlx::postgres::PgArguments>,
    ) -> sqlx::query::Query<'_, sqlx::Postgres, sqlx::postgres::PgArguments>,
) -> String {
    // Test-only: the statement is one of our own constants, explained inside a rolled-back
    // transaction (the UPDATE and DELETE are only planned, but to be safe nothing is kept).
    let explain = sqlx::AssertSqlSafe(format!("EXPLAIN (COSTS OFF) {sql}"));
    let mut tx = pool.begin().await.unwrap();
    if index_only {
        sqlx::query("SET LOCAL enable_seqscan = off")
            .execute(&mut *tx)
            .await
            .unwrap();
    }
    let rows: Vec<String> = binds(sqlx::query(explain))
        .fetch_all(&mut *tx)
        .await
        .unwrap()
        .iter()
        .map(|r| sqlx::Row::get::<String, _>(r, 0))
        .collect();
    tx.rollback().await.unwrap();
    rows.join("\n")
}

/// Every statement the functions run is prepared against the migrated schema, so a misspelt
/// column or a wrong parameter type fails here, not in a request.
#[sqlx::test(migrator = "common::db::MIGRATOR")]
async fn every_statement_prepares_against_the_schema(pool: PgPool) {
    use sqlx::Executor;
    let statements = [
        functions::register::PRECHECK_SQL,
        functions::register::INSERT_SQL,
        functions::credentials::ATTEMPT_SQL,
        functions::credentials::CALLER_ATTEMPT_SQL,
        functions::credentials::FORGIVE_SQL,
        functions::me::SQL,
        common::runtime::DEVICE_EXISTS_SQL,
        functions::delete_account::DELETE_SQL,
        functions::get_public_key::SQL,
        functions::lookup_user::SQL,
        functions::update_key::UPDATE_SQL,
        functions::signatures::SIGNING_KEY_SQL,
        functions::create_link_code::CREATE_SQL,
        functions::link_device::LINK_SQL,
        functions::my_devices::SQL,
        functions::user_devices::SQL,
        functions::remove_device::REMOVE_SQL,
        functions::set_signing_key::DEVICE_SQL,
        functions::set_signing_key::SET_SQL,
        functions::upload_prekeys::STORE_SQL,
        functions::prekey_count::SQL,
        functions::get_keys::SQL,
        functions::claim_prekeys::CLAIM_SQL,
        functions::send_message::SEND_SQL,
        functions::get_messages::PAGE_SQL,
        functions::confirm_deliveries::CONFIRM_SQL,
        functions::purge::DELETE_MESSAGES_SQL,
        functions::purge::DELETE_RATE_LIMITS_SQL,
        functions::purge::RECORD_RUN_SQL,
        functions::metrics::SNAPSHOT_SQL,
    ];
    for sql in statements {
        if let Err(error) = pool.describe(sqlx::SqlSafeStr::into_sql_str(sql)).await {
            panic!("{error}\n{sql}");
        }
    }
}

/// The rate-limit buckets: `Bucket` in Rust and the table's CHECK list the same names.
#[sqlx::test(migrator = "common::db::MIGRATOR")]
async fn rate_limit_buckets_agree_with_the_schema(pool: PgPool) {
    let check: String = sqlx::query_scalar(
        "SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conname = 'rate_limits_bucket_check'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    let mut in_schema: Vec<&str> = check.split('\'').skip(1).step_by(2).collect();
    in_schema.sort_unstable();
    let mut in_rust: Vec<&str> = functions::rate_limit::Bucket::ALL
        .iter()
        .map(|b| b.as_str())
        .collect();
    in_rust.sort_unstable();
    assert_eq!(in_rust, in_schema, "{check}");
}

#[sqlx::test(migrator = "common::db::MIGRATOR")]
async fn each_query_uses_its_index_on_a_million_messages(pool: PgPool) {
    let users: Vec<uuid::Uuid> = (0..100).map(|_| uuid::Uuid::now_v7()).collect();
    sqlx::query(
        "INSERT INTO users (id, name, hashed_password, public_key)
         SELECT id, 'user' || n, '$2b$04$x', '-----BEGIN PUBLIC KEY-----MCowBQYDK2VuAyEAhSDwCYkwp1R0i33ctD73Wg2/Og0mOBr066SpjqqbTmo=-----END PUBLIC KEY-----'
         FROM UNNEST($1::uuid[]) WITH ORDINALITY AS t(id, n)",
    )
    .bind(&users)
    .execute(&pool)
    .await
    .unwrap();
    // 1,000,000 messages over 100 recipients: a fifth delivered, a tenth expired.
    sqlx::query(
        r#"INSERT INTO messages (id, sender_id, recipient_id, encrypted_data, "timestamp", expires_at, is_delivered)
           SELECT gen_random_uuid(), u[1 + g % 100], u[1 + (g * 7) % 100],
                  CASE WHEN g % 5 = 0 THEN NULL ELSE '\x00'::bytea END,
                  now() - interval '8 days',
                  now() + CASE WHEN g % 10 = 1 THEN interval '-1 hour' ELSE interval '1 day' END,
                  g % 5 = 0
           FROM generate_series(1, 1000000) AS g, (SELECT $1::uuid[] AS u) AS ids"#,
    )
    .bind(&users)
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query("ANALYZE messages")
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query("ANALYZE users").execute(&pool).await.unwrap();

    let recipient = users[3];
    let fetch = plan(&pool, functions::get_messages::PAGE_SQL, |q| {
        q.bind(recipient)
            .bind(uuid::Uuid::nil())
            .bind(100i64)
            .bind(4_194_304i64)
            .bind(1i32)
    })
    .await;
    assert!(
        fetch.contains("messages_pending_by_device"),
        "fetch plan:\n{fetch}"
    );
    assert!(
        !fetch.contains("Seq Scan on messages"),
        "fetch plan:\n{fetch}"
    );

    let confirm = plan(&pool, functions::confirm_deliveries::CONFIRM_SQL, |q| {
        q.bind(recipient)
            .bind(vec![uuid::Uuid::now_v7(), uuid::Uuid::now_v7()])
            .bind(1i32)
    })
    .await;
    assert!(
        confirm.contains("messages_pkey"),
        "confirm plan:\n{confirm}"
    );
    assert!(
        !confirm.contains("Seq Scan on messages"),
        "confirm plan:\n{confirm}"
    );

    let purge = plan(&pool, functions::purge::DELETE_MESSAGES_SQL, |q| {
        q.bind(5000i64)
    })
    .await;
    assert!(
        purge.contains("messages_expires_at"),
        "purge plan:\n{purge}"
    );
    assert!(
        !purge.contains("Seq Scan on messages"),
        "purge plan:\n{purge}"
    );
    // Names are found by their locale-free key, on the unique index of that key.
    let lookup = plan_with(&pool, functions::lookup_user::SQL, true, |q| {
        q.bind(recipient).bind("user7").bind(1i32)
    })
    .await;
    assert!(lookup.contains("users_name_key"), "lookup plan:\n{lookup}");
    let login = plan_with(&pool, functions::credentials::ATTEMPT_SQL, true, |q| {
        q.bind("user7")
            .bind("192.0.2.1")
            .bind(vec![5i32, 100, 100])
            .bind(900f64)
            .bind(1i32)
    })
    .await;
    assert!(login.contains("users_name_key"), "login plan:\n{login}");
    println!("fetch:\n{fetch}\n\nconfirm:\n{confirm}\n\npurge:\n{purge}\n\nlookup:\n{lookup}");
}
