//! Every function in-process, through real API Gateway event JSON, against real PostgreSQL
//! (`#[sqlx::test]` creates a fresh database per test and applies `migrations/`).

mod abuse;
mod accounts;
mod faults;
mod messaging;
mod operations;
mod queries;
mod support;
