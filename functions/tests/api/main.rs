//! Every function in-process, through real API Gateway event JSON, against real PostgreSQL
//! (`#[sqlx::test]` creates a fresh database per test and applies `migrations/`).

// Tests set up and check the database directly, on the test's own pool; the functions' queries
// go through common::db::Database.
#![allow(clippy::disallowed_methods)]

mod abuse;
mod accounts;
mod devices;
mod fan_out;
mod faults;
mod guarantees;
mod mailbox_counters;
mod messaging;
mod operations;
mod prekeys;
mod protocol;
mod queries;
mod rotation;
mod support;
mod tokens;
