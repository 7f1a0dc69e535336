//! `patronus-controller`: the network's desired state (sites, links, topology, policies, users)
//! behind an authenticated REST API, stored in SQLite.
//!
//! - [`config`]: file, environment and flags, every bad key named.
//! - [`store`]: SQLite in WAL mode with versioned migrations; every acknowledged write is one
//!   transaction with its audit record.
//! - [`auth`]: argon2id passwords, short-lived HS256 access tokens, rotating refresh tokens,
//!   roles, rate limits and lockout.
//! - [`app`] and [`routes`]: the axum router, one error shape ([`error`]).
//! - [`webhooks`]: events told to the URLs admins registered, signed, retried.
//! - [`server`]: start-up (first admin, key, database), serving and graceful shutdown.

pub mod app;
pub mod auth;
pub mod compile;
pub mod config;
pub mod docs;
pub mod error;
pub mod metrics;
pub mod routes;
pub mod server;
pub mod store;
pub mod tls;
pub mod webhooks;

pub use app::{AppState, router};
pub use config::Config;
pub use store::Store;
