//! The whole API test suite (`tests/api/`) again, on PostgreSQL: every test gets a database of
//! its own on one throwaway server this process starts (Debian's `postgresql`, which
//! `.ci/deps` installs) and that stops when it exits. Same tests, same assertions: the two
//! backends behave alike or this fails.

#![allow(clippy::unwrap_used)] // test code: a panic is a failed test with a line number

/// The backend the suite's harness gives each test's controller.
pub const BACKEND: &str = "postgres";

#[path = "api/main.rs"]
mod suite;
