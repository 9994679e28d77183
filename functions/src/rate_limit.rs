//! Attempt counters shared by every Lambda instance, in PostgreSQL: one row per bucket and key
//! over a fixed window that starts at the first attempt. The upsert is atomic, so concurrent
//! instances never lose a count; the purge deletes windows that have ended.

use sqlx::PgPool;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bucket {
    LoginName,
    LoginAddress,
    RegisterAddress,
}

impl Bucket {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::LoginName => "login_name",
            Self::LoginAddress => "login_address",
            Self::RegisterAddress => "register_address",
        }
    }
}

/// A counter after an attempt was recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, sqlx::FromRow)]
pub struct Count {
    pub attempts: i32,
    /// Seconds until the window ends (at least 1).
    pub retry_after: i64,
}

/// Counts one attempt in each (bucket, key) pair, all with the same window.
pub const RECORD_SQL: &str = include_str!("sql/record_attempt.sql");

pub async fn record(
    pool: &PgPool,
    entries: &[(Bucket, &str)],
    window_seconds: u64,
) -> Result<Vec<(String, Count)>, sqlx::Error> {
    let buckets: Vec<&str> = entries.iter().map(|(b, _)| b.as_str()).collect();
    let keys: Vec<&str> = entries.iter().map(|(_, k)| *k).collect();
    let rows: Vec<(String, i32, i64)> = sqlx::query_as(RECORD_SQL)
        .bind(&buckets)
        .bind(&keys)
        .bind(window_seconds as f64)
        .fetch_all(pool)
        .await?;
    Ok(rows
        .into_iter()
        .map(|(bucket, attempts, retry_after)| {
            (
                bucket,
                Count {
                    attempts,
                    retry_after,
                },
            )
        })
        .collect())
}
