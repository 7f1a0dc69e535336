//! The API over HTTP semantics, through the real router, against a real SQLite file in a
//! temporary directory: success, validation, 401/403/404/405/409/412/413/422/429.

#![allow(clippy::unwrap_used)] // test code: a panic is a failed test with a line number

/// Which backend the suite runs on (`tests/api_postgres.rs` runs it again on PostgreSQL).
#[allow(dead_code)]
pub const BACKEND: &str = "sqlite";

mod harness;
pub(crate) mod schema;

mod auth;
mod backup;
mod edge;
mod events;
mod policies;
mod secrets;
mod sites;
mod system;
mod topology;
mod traffic;
mod ui;
mod users;
mod webhooks;
