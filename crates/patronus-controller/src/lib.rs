//! `patronus-controller`: the network's desired state (sites, links, topology, policies, users)
//! behind an authenticated REST API, stored in SQLite.
//!
//! - [`config`]: file, environment and flags, every bad key named.
//! - [`store`]: SQLite in WAL mode with versioned migrations; every acknowledged write is one
//!   transaction with its audit record. Every SQL statement is in the store, by resource (a
//!   test keeps it so): the routes and `compile` call the store, not the database.
//! - [`auth`]: argon2id passwords, short-lived HS256 access tokens, rotating refresh tokens,
//!   roles, rate limits and lockout.
//! - [`app`] and [`routes`]: the axum router, one error shape ([`error`]).
//! - [`webhooks`]: events told to the URLs admins registered, signed, retried.
//! - [`https`]: the controller's own TLS: its certificate (given, or made on first start),
//!   reloaded when it changes.
//! - [`stun`]: endpoint discovery, STUN Binding answered on UDP at the API's address.
//! - [`server`]: start-up (first admin, key, database), serving and graceful shutdown.
//! - [`backup`]: encrypted, verified backups of the whole state, their retention and restore.

pub mod app;
pub mod auth;
pub mod backup;
pub mod compile;
pub mod config;
pub mod docs;
pub mod error;
pub mod https;
pub mod metrics;
pub mod presence;
pub mod routes;
pub mod sampling;
pub mod secrets;
pub mod server;
pub mod store;
pub mod stun;
pub mod tls;
pub mod ui;
pub mod webhooks;

pub use app::{AppState, router};
pub use config::Config;
pub use store::Store;

#[cfg(test)]
mod tests {
    /// Every file under `dir` (recursively) whose path is not under `except`.
    fn sources(dir: &std::path::Path, except: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let p = e.unwrap_or_else(|e| panic!("{e}")).path();
            if p.starts_with(except) {
                continue;
            }
            if p.is_dir() {
                sources(&p, except, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }

    /// The store layer holds: no statement, row or connection type of the database outside
    /// `src/store/`, here or in the `patronus` binary (so that a second backend changes the
    /// store, not the routes or the benches).
    #[test]
    fn no_sql_outside_the_store() {
        let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut files = Vec::new();
        sources(&src, &src.join("store"), &mut files);
        // The CLI and its benches (which fill a store to measure it) go through it too.
        let cli = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../patronus/src");
        sources(&cli, &src.join("store"), &mut files);
        assert!(files.len() > 20, "{files:?}");
        let mut found = Vec::new();
        for f in &files {
            let text = std::fs::read_to_string(f).unwrap_or_else(|e| panic!("{e}"));
            for (n, line) in text.lines().enumerate() {
                // Spelt in two halves, so that this test does not find itself.
                if [
                    ("sqlx::", "query"),
                    ("sqlx::", "sqlite"),
                    ("Sqlite", "Connection"),
                    ("Sqlite", "Row"),
                ]
                .iter()
                .any(|(a, b)| line.contains(&format!("{a}{b}")))
                {
                    found.push(format!("{}:{}: {}", f.display(), n + 1, line.trim()));
                }
            }
        }
        assert!(
            found.is_empty(),
            "SQL outside src/store/:\n{}",
            found.join("\n")
        );
    }
}
