//! The controller's store: SQLite (WAL, foreign keys on, `synchronous = FULL`, so a write the API
//! acknowledged survives the process being killed), with versioned migrations applied at start.
//!
//! Every write that the API acknowledges is one transaction that also appends its audit record.
//!
//! Every SQL statement of the controller is here, by resource: documents stored as their spec
//! (SLA classes, policies: [`docs`]), [`sites`] and their links, [`topology`], [`enrollment`],
//! paths' [`history`], edges' [`telemetry`], [`settings`], [`users`], [`api_keys`],
//! [`webhooks`] and their delivery queue, and here in the root users' sessions and the audit
//! log. Handlers and `compile` call these functions with a [`Conn`] (a pooled connection, a
//! [`Tx`] or a [`Store::snapshot`]); a test in the crate's root fails on SQL anywhere else.
//!
//! # Two backends (issue 14; PostgreSQL not built yet)
//!
//! The plan for PostgreSQL beside SQLite, decided while moving the statements here: native
//! sqlx drivers behind one enum (`Conn` and `Tx` become enums over SQLite and PostgreSQL
//! connections), each statement written once with PostgreSQL's `$1` placeholders and run on
//! SQLite as `?1` (SQLite numbers `?NNN` parameters explicitly; its `$1` would be a *named*
//! parameter numbered by first appearance), each function's body expanded for both drivers by a
//! macro so that rows are decoded by concrete types, and one set of migrations per backend
//! (types and auto-increment differ). Not sqlx's `Any` driver: it decodes only the types both
//! sides share (no `Json`, transact-rs/sqlx#3997, whose fix was closed unmerged), sets no
//! SQLite pragmas, and gives no access to PostgreSQL's `LISTEN`/`NOTIFY` or advisory locks,
//! which several controllers need. Not a trait with one implementation per backend (atuin's
//! `atuin-server-database`): with a hundred statements that is every statement written twice,
//! and the two copies drift. The statements are already kept portable where it costs nothing:
//! `ON CONFLICT DO NOTHING` rather than `INSERT OR IGNORE`, qualified columns in upserts,
//! integers for times, JSON as text.

use std::path::Path;
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteRow, SqliteSynchronous,
};
use sqlx::{Row, Sqlite, Transaction};
use tokio::sync::{Notify, watch};

pub mod api_keys;
pub mod docs;
pub mod enrollment;
pub mod history;
pub mod settings;
pub mod sites;
pub mod telemetry;
pub mod topology;
pub mod users;
pub mod webhooks;

/// A connection to the store's database: what the store's functions run their statements on
/// (a pooled connection or a transaction, [`Tx`], dereference to it).
pub type Conn = SqliteConnection;

/// The end of a versioned update (`... WHERE id = ? AND version = ?`): stale if it changed no
/// row (another writer got there first, or the row is gone).
fn one_row_changed(r: sqlx::sqlite::SqliteQueryResult) -> Result<(), docs::WriteError> {
    if r.rows_affected() == 0 {
        return Err(docs::WriteError::Stale);
    }
    Ok(())
}

/// `ids` as an SQL list (`1,2,3`) for `IN (...)`: integers, so safe to inline, and one
/// statement whatever their number.
fn id_list(ids: &[i64]) -> String {
    ids.iter().map(i64::to_string).collect::<Vec<_>>().join(",")
}

/// Deletes row `id` of `table` (a constant, never a client's input); nothing if it is gone.
async fn delete_by_id(conn: &mut Conn, table: &'static str, id: i64) -> Result<(), sqlx::Error> {
    sqlx::query(&format!("DELETE FROM {table} WHERE id = ?"))
        .bind(id)
        .execute(&mut *conn)
        .await
        .map(|_| ())
}

/// The schema, in order. A migration is never edited once released: a change is a new one.
const MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        1,
        "users, refresh tokens, audit log",
        r#"
CREATE TABLE users (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    email         TEXT    NOT NULL UNIQUE COLLATE NOCASE,
    name          TEXT    NOT NULL DEFAULT '',
    role          TEXT    NOT NULL CHECK (role IN ('admin', 'operator', 'viewer')),
    password_hash TEXT    NOT NULL,
    disabled      INTEGER NOT NULL DEFAULT 0,
    version       INTEGER NOT NULL DEFAULT 1,
    created_at    INTEGER NOT NULL,
    updated_at    INTEGER NOT NULL
);
CREATE TABLE refresh_tokens (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id     INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    family      TEXT    NOT NULL,
    token_hash  BLOB    NOT NULL UNIQUE,
    expires_at  INTEGER NOT NULL,
    rotated     INTEGER NOT NULL DEFAULT 0,
    revoked     INTEGER NOT NULL DEFAULT 0,
    created_at  INTEGER NOT NULL
);
CREATE INDEX refresh_tokens_family ON refresh_tokens(family);
CREATE INDEX refresh_tokens_user ON refresh_tokens(user_id);
CREATE TABLE audit_log (
    id        INTEGER PRIMARY KEY AUTOINCREMENT,
    at_ms     INTEGER NOT NULL,
    actor_id  INTEGER,
    actor     TEXT    NOT NULL,
    action    TEXT    NOT NULL,
    target    TEXT    NOT NULL,
    details   TEXT    NOT NULL DEFAULT '{}',
    source    TEXT    NOT NULL DEFAULT ''
);
CREATE INDEX audit_log_at ON audit_log(at_ms);
"#,
    ),
    (
        2,
        "sites and their WAN links",
        r#"
CREATE TABLE sites (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    name         TEXT    NOT NULL UNIQUE,
    description  TEXT    NOT NULL DEFAULT '',
    location     TEXT    NOT NULL DEFAULT '',
    latitude     REAL,
    longitude    REAL,
    lan_prefixes TEXT    NOT NULL DEFAULT '[]',
    status       TEXT    NOT NULL DEFAULT 'active'
                         CHECK (status IN ('planned', 'active', 'disabled')),
    version      INTEGER NOT NULL DEFAULT 1,
    created_at   INTEGER NOT NULL,
    updated_at   INTEGER NOT NULL
);
CREATE TABLE links (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    site_id    INTEGER NOT NULL REFERENCES sites(id) ON DELETE CASCADE,
    name       TEXT    NOT NULL,
    -- The patronus_api::Link the edges receive, as JSON.
    spec       TEXT    NOT NULL,
    version    INTEGER NOT NULL DEFAULT 1,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    UNIQUE (site_id, name)
);
"#,
    ),
    (
        3,
        "topology and overlay address plan",
        r#"
CREATE TABLE topology (
    id             INTEGER PRIMARY KEY CHECK (id = 1),
    mode           TEXT    NOT NULL CHECK (mode IN ('full-mesh', 'hub-spoke')),
    overlay_prefix TEXT    NOT NULL,
    version        INTEGER NOT NULL DEFAULT 1,
    updated_at     INTEGER NOT NULL
);
INSERT INTO topology (id, mode, overlay_prefix, updated_at) VALUES (1, 'full-mesh', '10.255.0.0/16', 0);
CREATE TABLE hubs (
    site_id INTEGER PRIMARY KEY REFERENCES sites(id) ON DELETE CASCADE
);
-- Host number within the overlay prefix (1 = its first address).
CREATE TABLE overlay_addresses (
    site_id INTEGER PRIMARY KEY REFERENCES sites(id) ON DELETE CASCADE,
    host    INTEGER NOT NULL UNIQUE
);
"#,
    ),
    (
        4,
        "SLA classes (the four built-ins seeded), policies, settings",
        r#"
CREATE TABLE sla_classes (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    name       TEXT    NOT NULL UNIQUE,
    -- The patronus_api::SlaClass the edges receive, as JSON.
    spec       TEXT    NOT NULL,
    builtin    INTEGER NOT NULL DEFAULT 0,
    version    INTEGER NOT NULL DEFAULT 1,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);
CREATE TABLE policies (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    name       TEXT    NOT NULL UNIQUE,
    ord        INTEGER NOT NULL UNIQUE,
    -- The patronus_api::Policy the edges receive, as JSON.
    spec       TEXT    NOT NULL,
    version    INTEGER NOT NULL DEFAULT 1,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);
CREATE TABLE settings (
    key        TEXT    PRIMARY KEY,
    value      TEXT    NOT NULL,
    version    INTEGER NOT NULL DEFAULT 1,
    updated_at INTEGER NOT NULL
);
"#,
    ),
    (
        5,
        "API keys",
        r#"
CREATE TABLE api_keys (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    name         TEXT    NOT NULL,
    role         TEXT    NOT NULL CHECK (role IN ('admin', 'operator', 'viewer')),
    key_hash     BLOB    NOT NULL UNIQUE,
    hint         TEXT    NOT NULL,
    created_by   INTEGER REFERENCES users(id) ON DELETE SET NULL,
    created_at   INTEGER NOT NULL,
    expires_at   INTEGER NOT NULL,
    last_used_at INTEGER,
    revoked      INTEGER NOT NULL DEFAULT 0
);
"#,
    ),
    (
        6,
        "a site's WireGuard public key, set when its edge enrols",
        r#"
ALTER TABLE sites ADD COLUMN public_key TEXT;
"#,
    ),
    (
        7,
        "enrolment tokens and site credentials",
        r#"
CREATE TABLE enrollment_tokens (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    site_id    INTEGER NOT NULL REFERENCES sites(id) ON DELETE CASCADE,
    token_hash BLOB    NOT NULL UNIQUE,
    expires_at INTEGER NOT NULL,
    used_at    INTEGER,
    created_by INTEGER REFERENCES users(id) ON DELETE SET NULL,
    created_at INTEGER NOT NULL
);
CREATE TABLE site_credentials (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    site_id     INTEGER NOT NULL REFERENCES sites(id) ON DELETE CASCADE,
    secret_hash BLOB    NOT NULL UNIQUE,
    created_at  INTEGER NOT NULL,
    revoked     INTEGER NOT NULL DEFAULT 0
);
"#,
    ),
    (
        8,
        "path measurements reported by the edges",
        r#"
CREATE TABLE path_samples (
    id        INTEGER PRIMARY KEY AUTOINCREMENT,
    path_id   TEXT    NOT NULL,
    site_id   INTEGER NOT NULL REFERENCES sites(id) ON DELETE CASCADE,
    at_s      INTEGER NOT NULL,
    state     TEXT    NOT NULL,
    rtt_ms    REAL,
    jitter_ms REAL    NOT NULL,
    loss_pct  REAL    NOT NULL
);
CREATE INDEX path_samples_path_at ON path_samples(path_id, at_s);
"#,
    ),
    (
        9,
        "failover events reported by the edges",
        r#"
CREATE TABLE failover_events (
    id        INTEGER PRIMARY KEY AUTOINCREMENT,
    site_id   INTEGER NOT NULL REFERENCES sites(id) ON DELETE CASCADE,
    seq       INTEGER NOT NULL,
    at_ms     INTEGER NOT NULL,
    peer      TEXT    NOT NULL,
    from_path TEXT,
    to_path   TEXT,
    detail    TEXT    NOT NULL,
    reason    TEXT    NOT NULL,
    flows     INTEGER NOT NULL,
    UNIQUE (site_id, seq, at_ms)
);
CREATE INDEX failover_events_at ON failover_events(at_ms);
"#,
    ),
    (
        10,
        "webhooks and their deliveries",
        r#"
CREATE TABLE webhooks (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    url         TEXT    NOT NULL,
    events      TEXT    NOT NULL,
    description TEXT    NOT NULL DEFAULT '',
    secret      TEXT    NOT NULL,
    enabled     INTEGER NOT NULL DEFAULT 1,
    version     INTEGER NOT NULL DEFAULT 1,
    created_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL
);
CREATE TABLE webhook_deliveries (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    webhook_id      INTEGER NOT NULL REFERENCES webhooks(id) ON DELETE CASCADE,
    event_id        TEXT    NOT NULL,
    event           TEXT    NOT NULL,
    payload         TEXT    NOT NULL,
    status          TEXT    NOT NULL CHECK (status IN ('pending', 'delivered', 'failed')),
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_ms INTEGER NOT NULL,
    last_status     INTEGER,
    last_error      TEXT,
    created_ms      INTEGER NOT NULL,
    delivered_ms    INTEGER
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries(status, next_attempt_ms);
CREATE INDEX webhook_deliveries_hook ON webhook_deliveries(webhook_id, id);
"#,
    ),
    (
        11,
        "traffic counters reported by the edges, per path and per SLA class",
        r#"
CREATE TABLE traffic_counters (
    site_id    INTEGER NOT NULL REFERENCES sites(id) ON DELETE CASCADE,
    key        TEXT    NOT NULL,
    started_ms INTEGER NOT NULL,
    tx_packets INTEGER NOT NULL,
    tx_bytes   INTEGER NOT NULL,
    rx_packets INTEGER NOT NULL,
    rx_bytes   INTEGER NOT NULL,
    PRIMARY KEY (site_id, key)
);
CREATE TABLE traffic_samples (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    site_id    INTEGER NOT NULL REFERENCES sites(id) ON DELETE CASCADE,
    at_s       INTEGER NOT NULL,
    path_id    TEXT,
    class      TEXT,
    tx_packets INTEGER NOT NULL,
    tx_bytes   INTEGER NOT NULL,
    rx_packets INTEGER NOT NULL,
    rx_bytes   INTEGER NOT NULL,
    CHECK ((path_id IS NULL) != (class IS NULL))
);
CREATE INDEX traffic_samples_at ON traffic_samples(at_s);
CREATE INDEX traffic_samples_site_at ON traffic_samples(site_id, at_s);
"#,
    ),
    (
        12,
        "key rotation: rotations asked for, and the key an edge is rolling to",
        r#"
ALTER TABLE sites ADD COLUMN key_rotation INTEGER NOT NULL DEFAULT 0;
ALTER TABLE sites ADD COLUMN next_public_key TEXT;
"#,
    ),
    (
        13,
        "path state changes reported by the edges, at the moment they saw them",
        r#"
CREATE TABLE path_events (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    site_id INTEGER NOT NULL REFERENCES sites(id) ON DELETE CASCADE,
    seq     INTEGER NOT NULL,
    at_ms   INTEGER NOT NULL,
    path_id TEXT,
    kind    TEXT    NOT NULL,
    class   TEXT,
    detail  TEXT    NOT NULL,
    -- When the controller got it (retention counts from this, not from the edge's clock).
    received_s INTEGER NOT NULL,
    UNIQUE (site_id, seq, at_ms)
);
CREATE INDEX path_events_path_at ON path_events(path_id, at_ms);
CREATE INDEX path_events_received ON path_events(received_s);
"#,
    ),
    (
        14,
        "the configuration generation, bumped by every write that changes what an edge runs; \
         the request behind each audit record; audit records by action",
        r#"
CREATE TABLE config_generation (
    id         INTEGER PRIMARY KEY CHECK (id = 1),
    generation INTEGER NOT NULL
);
INSERT INTO config_generation (id, generation) VALUES (1, 0);
ALTER TABLE audit_log ADD COLUMN request_id TEXT;
CREATE INDEX audit_log_action ON audit_log(action, id);
"#,
    ),
    (
        15,
        "every site's LAN prefixes as indexed address ranges, so that a new prefix is checked \
         against the others with one look-up instead of by reading every site",
        r#"
-- lo and hi: the first and last address, 16 bytes big-endian (an IPv4 address in the last 4).
CREATE TABLE site_prefixes (
    site_id INTEGER NOT NULL REFERENCES sites(id) ON DELETE CASCADE,
    family  INTEGER NOT NULL CHECK (family IN (4, 6)),
    lo      BLOB    NOT NULL,
    hi      BLOB    NOT NULL,
    prefix  TEXT    NOT NULL
);
CREATE INDEX site_prefixes_lo ON site_prefixes(family, lo);
CREATE INDEX site_prefixes_site ON site_prefixes(site_id);
"#,
    ),
];

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{what}: {error}")]
    Io { what: String, error: std::io::Error },
    #[error("{what}: {error}")]
    Db { what: String, error: sqlx::Error },
}

fn db(what: impl Into<String>) -> impl FnOnce(sqlx::Error) -> StoreError {
    let what = what.into();
    move |error| StoreError::Db { what, error }
}

pub fn now_s() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs() as i64
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_millis() as i64
}

/// Who did something, for the audit log.
#[derive(Debug, Clone)]
pub struct Actor {
    pub id: Option<i64>,
    /// An email, `cli` for offline commands, `bootstrap` for the first admin.
    pub name: String,
    /// The client's address, if over the network.
    pub source: String,
}

impl Actor {
    /// Someone not (yet) authenticated, by the email they gave.
    pub fn anonymous(email: &str, source: std::net::IpAddr) -> Self {
        Self {
            id: None,
            name: format!("unauthenticated ({email})"),
            source: source.to_string(),
        }
    }
}

/// An audit record to write in the same transaction as its change.
#[derive(Debug, Clone)]
pub struct Audit {
    pub actor: Actor,
    /// `site.delete`, `user.update`, ...
    pub action: &'static str,
    /// `site/3`, `site/3/link/7`, ...
    pub target: String,
    pub details: serde_json::Value,
}

impl Audit {
    pub fn new(
        actor: Actor,
        action: &'static str,
        target: &str,
        details: serde_json::Value,
    ) -> Self {
        Self {
            actor,
            action,
            target: target.to_owned(),
            details,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
pub struct UserRow {
    pub id: i64,
    pub email: String,
    pub name: String,
    pub role: String,
    #[serde(skip)]
    pub password_hash: String,
    pub disabled: bool,
    pub version: i64,
    pub created_at: i64,
    pub updated_at: i64,
}

impl UserRow {
    fn from_row(r: &SqliteRow) -> Result<Self, sqlx::Error> {
        Ok(Self {
            id: r.try_get("id")?,
            email: r.try_get("email")?,
            name: r.try_get("name")?,
            role: r.try_get("role")?,
            password_hash: r.try_get("password_hash")?,
            disabled: r.try_get::<i64, _>("disabled")? != 0,
            version: r.try_get("version")?,
            created_at: r.try_get("created_at")?,
            updated_at: r.try_get("updated_at")?,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
pub struct AuditRow {
    pub id: i64,
    pub at_ms: i64,
    pub actor_id: Option<i64>,
    pub actor: String,
    pub action: String,
    pub target: String,
    pub details: serde_json::Value,
    pub source: String,
    /// The API request that did it (its `X-Request-Id`, also in the controller's log line).
    pub request_id: Option<String>,
}

/// What a refresh token turned out to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RefreshOutcome {
    /// Valid: rotated; the new token's row is written. Carries the user id.
    Rotated { user_id: i64 },
    /// Unknown or expired.
    Invalid,
    /// Already rotated or revoked: someone replayed it. Its whole family is now revoked.
    Reused { user_id: i64 },
}

#[derive(Debug, Clone)]
pub struct Store {
    pool: SqlitePool,
    /// The configuration generation last committed: edges waiting for a new configuration
    /// watch it.
    generation: watch::Sender<i64>,
    /// Wakes the webhook delivery worker when a transaction that queued deliveries commits.
    webhook_wake: std::sync::Arc<Notify>,
}

/// A write transaction. It holds SQLite's write lock from its first statement (`BEGIN
/// IMMEDIATE`), so what it reads cannot change under it before it commits: an update reads the
/// current row inside its own transaction and cannot lose a race to another writer.
///
/// A write that changes what some edge runs says so with [`Tx::config_changed`], inside the
/// transaction: the configuration generation is bumped with the change itself, and waiting
/// edges are woken when (and only if) it commits. It dereferences to the connection, so
/// statements run on `&mut *tx`.
#[derive(Debug)]
pub struct Tx {
    tx: Transaction<'static, Sqlite>,
    generation: Option<i64>,
    deliveries_queued: bool,
    store: Store,
}

impl std::ops::Deref for Tx {
    type Target = SqliteConnection;

    fn deref(&self) -> &SqliteConnection {
        &self.tx
    }
}

impl std::ops::DerefMut for Tx {
    fn deref_mut(&mut self) -> &mut SqliteConnection {
        &mut self.tx
    }
}

impl Tx {
    /// This transaction changes what some edge runs: the configuration generation is bumped in
    /// it. Returns the new generation.
    pub async fn config_changed(&mut self) -> Result<i64, sqlx::Error> {
        let g: i64 = sqlx::query_scalar(
            "UPDATE config_generation SET generation = generation + 1 WHERE id = 1
             RETURNING generation",
        )
        .fetch_one(&mut *self.tx)
        .await?;
        self.generation = Some(g);
        Ok(g)
    }

    /// Webhook deliveries were written in this transaction: the worker is woken on commit.
    pub fn deliveries_queued(&mut self) {
        self.deliveries_queued = true;
    }

    /// Commits; then wakes whoever waits on what it changed.
    pub async fn commit(self) -> Result<(), sqlx::Error> {
        self.tx.commit().await?;
        if let Some(g) = self.generation {
            self.store.generation.send_if_modified(|cur| {
                let newer = g > *cur;
                if newer {
                    *cur = g;
                }
                newer
            });
        }
        if self.deliveries_queued {
            self.store.webhook_wake.notify_one();
        }
        Ok(())
    }
}

impl Store {
    /// Opens (creating on first start: the directory 0700, the file 0600) and migrates.
    pub async fn open(path: &Path) -> Result<Self, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            create_private_dir(dir)?;
        }
        create_private_file(path)?;
        let opts = SqliteConnectOptions::from_str("sqlite://")
            .map_err(db("database options"))?
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(5));
        let pool = SqlitePoolOptions::new()
            .max_connections(8)
            .connect_with(opts)
            .await
            .map_err(db(format!("opening {}", path.display())))?;
        let mut store = Self {
            pool,
            generation: watch::channel(0).0,
            webhook_wake: std::sync::Arc::new(Notify::new()),
        };
        store.migrate().await?;
        let g: i64 = sqlx::query_scalar("SELECT generation FROM config_generation WHERE id = 1")
            .fetch_one(&store.pool)
            .await
            .map_err(db("reading the configuration generation"))?;
        store.generation = watch::channel(g).0;
        Ok(store)
    }

    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// A read transaction: every statement on it sees the same snapshot of the database.
    pub async fn snapshot(&self) -> Result<Transaction<'static, Sqlite>, sqlx::Error> {
        self.pool.begin().await
    }

    /// The pool's connections: (open, idle).
    pub fn connections(&self) -> (usize, usize) {
        (self.pool.size() as usize, self.pool.num_idle())
    }

    /// Closes every connection (SQLite: checkpoints the write-ahead log into the database).
    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// A connection from the pool, for reads.
    pub async fn conn(&self) -> Result<sqlx::pool::PoolConnection<Sqlite>, sqlx::Error> {
        self.pool.acquire().await
    }

    /// The configuration generation last committed.
    pub fn generation(&self) -> i64 {
        *self.generation.borrow()
    }

    /// Changes of the configuration generation, as they commit.
    pub fn watch_generation(&self) -> watch::Receiver<i64> {
        self.generation.subscribe()
    }

    /// Wakes when a transaction that queued webhook deliveries commits.
    pub fn webhook_wake(&self) -> &Notify {
        &self.webhook_wake
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS schema_migrations (
                version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at INTEGER NOT NULL)",
        )
        .execute(&self.pool)
        .await
        .map_err(db("creating schema_migrations"))?;
        let applied: i64 =
            sqlx::query_scalar("SELECT COALESCE(MAX(version), 0) FROM schema_migrations")
                .fetch_one(&self.pool)
                .await
                .map_err(db("reading schema_migrations"))?;
        for (version, name, sql) in MIGRATIONS {
            if *version <= applied {
                continue;
            }
            let mut tx = self.pool.begin().await.map_err(db("migration"))?;
            sqlx::raw_sql(sql)
                .execute(&mut *tx)
                .await
                .map_err(db(format!("migration {version} ({name})")))?;
            if *version == 4 {
                seed_classes(&mut tx)
                    .await
                    .map_err(db("seeding the built-in SLA classes"))?;
            }
            if *version == 15 {
                sites::index_all_prefixes(&mut tx)
                    .await
                    .map_err(db("indexing the sites' LAN prefixes"))?;
            }
            sqlx::query(
                "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)",
            )
            .bind(version)
            .bind(name)
            .bind(now_s())
            .execute(&mut *tx)
            .await
            .map_err(db("recording a migration"))?;
            tx.commit().await.map_err(db("migration commit"))?;
        }
        Ok(())
    }

    /// The newest schema version applied.
    pub async fn schema_version(&self) -> Result<i64, sqlx::Error> {
        sqlx::query_scalar("SELECT COALESCE(MAX(version), 0) FROM schema_migrations")
            .fetch_one(&self.pool)
            .await
    }

    pub async fn ping(&self) -> Result<(), sqlx::Error> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map(|_| ())
    }

    /// A write transaction, holding SQLite's write lock from its first statement: one that
    /// reads before it writes then waits its turn (busy timeout) instead of failing with
    /// "database is locked" when another writer committed meanwhile.
    pub async fn begin(&self) -> Result<Tx, sqlx::Error> {
        Ok(Tx {
            tx: self.pool.begin_with("BEGIN IMMEDIATE").await?,
            generation: None,
            deliveries_queued: false,
            store: self.clone(),
        })
    }

    // ----- users -----

    pub async fn user_count(&self) -> Result<i64, sqlx::Error> {
        sqlx::query_scalar("SELECT COUNT(*) FROM users")
            .fetch_one(&self.pool)
            .await
    }

    pub async fn user(&self, id: i64) -> Result<Option<UserRow>, sqlx::Error> {
        user(&mut *self.pool.acquire().await?, id).await
    }

    pub async fn user_by_email(&self, email: &str) -> Result<Option<UserRow>, sqlx::Error> {
        sqlx::query("SELECT * FROM users WHERE email = ?")
            .bind(email)
            .fetch_optional(&self.pool)
            .await?
            .map(|r| UserRow::from_row(&r))
            .transpose()
    }

    /// A page of users and the total matching.
    pub async fn users(&self, q: &UserQuery) -> Result<(Vec<UserRow>, i64), sqlx::Error> {
        let mut filter = String::from(" WHERE 1=1");
        if q.role.is_some() {
            filter.push_str(" AND role = ?");
        }
        if q.disabled.is_some() {
            filter.push_str(" AND disabled = ?");
        }
        if q.search.is_some() {
            filter.push_str(" AND (email LIKE ? ESCAPE '\\' OR name LIKE ? ESCAPE '\\')");
        }
        let like = q.search.as_ref().map(|s| {
            format!(
                "%{}%",
                s.replace('\\', "\\\\")
                    .replace('%', "\\%")
                    .replace('_', "\\_")
            )
        });
        macro_rules! bind_filters {
            ($query:expr) => {{
                let mut query = $query;
                if let Some(r) = &q.role {
                    query = query.bind(r.clone());
                }
                if let Some(d) = q.disabled {
                    query = query.bind(d as i64);
                }
                if let Some(l) = &like {
                    query = query.bind(l.clone()).bind(l.clone());
                }
                query
            }};
        }
        let count = format!("SELECT COUNT(*) FROM users{filter}");
        let total: i64 = bind_filters!(sqlx::query_scalar(&count))
            .fetch_one(&self.pool)
            .await?;
        let sql = format!(
            "SELECT * FROM users{filter} ORDER BY {} {}, id LIMIT ? OFFSET ?",
            q.sort.column(),
            if q.descending { "DESC" } else { "ASC" }
        );
        let rows = bind_filters!(sqlx::query(&sql))
            .bind(q.limit)
            .bind(q.offset)
            .fetch_all(&self.pool)
            .await?;
        let users = rows
            .iter()
            .map(UserRow::from_row)
            .collect::<Result<Vec<_>, _>>()?;
        Ok((users, total))
    }

    // ----- audit -----

    /// Appends an audit record inside the write's own transaction.
    pub async fn audit(
        tx: &mut Tx,
        actor: &Actor,
        action: &str,
        target: &str,
        details: serde_json::Value,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT INTO audit_log
             (at_ms, actor_id, actor, action, target, details, source, request_id)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(now_ms())
        .bind(actor.id)
        .bind(&actor.name)
        .bind(action)
        .bind(target)
        .bind(details.to_string())
        .bind(&actor.source)
        .bind(crate::app::current_request_id())
        .execute(&mut **tx)
        .await
        .map(|_| ())
    }

    /// Appends an audit record of something that changed nothing else (a refused login, a
    /// lockout), in a transaction of its own.
    pub async fn audit_event(&self, audit: Audit) -> Result<(), sqlx::Error> {
        let mut tx = self.begin().await?;
        Self::audit(
            &mut tx,
            &audit.actor,
            audit.action,
            &audit.target,
            audit.details,
        )
        .await?;
        tx.commit().await
    }

    /// Bounds what refused attempts (failed logins and password checks, lockouts) leave in the
    /// audit log: anyone can cause them, so at most `keep` are kept, the newest, and none older
    /// than `before_ms`. The other audit records (what authenticated callers did) are kept.
    pub async fn trim_refused_attempts(
        &self,
        keep: i64,
        before_ms: i64,
    ) -> Result<u64, sqlx::Error> {
        const REFUSED: &str = "action IN ('auth.login_failed', 'user.password_failed', 'auth.locked', 'auth.login_refused')";
        let mut tx = self.begin().await?;
        let old = sqlx::query(&format!(
            "DELETE FROM audit_log WHERE {REFUSED} AND at_ms < ?"
        ))
        .bind(before_ms)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        let over = sqlx::query(&format!(
            "DELETE FROM audit_log WHERE {REFUSED} AND id < (
               SELECT id FROM audit_log WHERE {REFUSED} ORDER BY id DESC LIMIT 1 OFFSET ?)"
        ))
        .bind(keep - 1)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        tx.commit().await?;
        Ok(old + over)
    }

    /// Deletes row `id` of `table` (a name from the code, never from a request) in `tx`.
    /// How many objects of each kind the store holds (API keys: those not revoked).
    pub async fn object_counts(conn: &mut Conn) -> Result<Vec<(&'static str, i64)>, sqlx::Error> {
        let mut counts = Vec::new();
        for (kind, sql) in [
            ("users", "SELECT COUNT(*) FROM users"),
            ("sites", "SELECT COUNT(*) FROM sites"),
            ("links", "SELECT COUNT(*) FROM links"),
            ("sla_classes", "SELECT COUNT(*) FROM sla_classes"),
            ("policies", "SELECT COUNT(*) FROM policies"),
            (
                "api_keys",
                "SELECT COUNT(*) FROM api_keys WHERE revoked = 0",
            ),
        ] {
            counts.push((kind, sqlx::query_scalar(sql).fetch_one(&mut *conn).await?));
        }
        Ok(counts)
    }

    pub async fn audit_log(&self, q: &AuditQuery) -> Result<(Vec<AuditRow>, i64), sqlx::Error> {
        let mut filter = String::from(" WHERE 1=1");
        if q.actor.is_some() {
            filter.push_str(" AND actor = ?");
        }
        if q.action.is_some() {
            filter.push_str(" AND action = ?");
        }
        if q.since_ms.is_some() {
            filter.push_str(" AND at_ms >= ?");
        }
        if q.until_ms.is_some() {
            filter.push_str(" AND at_ms < ?");
        }
        macro_rules! bind_filters {
            ($query:expr) => {{
                let mut query = $query;
                if let Some(v) = &q.actor {
                    query = query.bind(v.clone());
                }
                if let Some(v) = &q.action {
                    query = query.bind(v.clone());
                }
                if let Some(v) = q.since_ms {
                    query = query.bind(v);
                }
                if let Some(v) = q.until_ms {
                    query = query.bind(v);
                }
                query
            }};
        }
        let count = format!("SELECT COUNT(*) FROM audit_log{filter}");
        let total: i64 = bind_filters!(sqlx::query_scalar(&count))
            .fetch_one(&self.pool)
            .await?;
        let sql = format!(
            "SELECT * FROM audit_log{filter} ORDER BY id {} LIMIT ? OFFSET ?",
            if q.oldest_first { "ASC" } else { "DESC" }
        );
        let rows = bind_filters!(sqlx::query(&sql))
            .bind(q.limit)
            .bind(q.offset)
            .fetch_all(&self.pool)
            .await?;
        let items = rows
            .iter()
            .map(|r| {
                Ok(AuditRow {
                    id: r.try_get("id")?,
                    at_ms: r.try_get("at_ms")?,
                    actor_id: r.try_get("actor_id")?,
                    actor: r.try_get("actor")?,
                    action: r.try_get("action")?,
                    target: r.try_get("target")?,
                    details: serde_json::from_str(r.try_get::<&str, _>("details")?)
                        .unwrap_or(serde_json::Value::Null),
                    source: r.try_get("source")?,
                    request_id: r.try_get("request_id")?,
                })
            })
            .collect::<Result<Vec<_>, sqlx::Error>>()?;
        Ok((items, total))
    }

    // ----- refresh tokens -----

    pub async fn insert_refresh(
        tx: &mut Tx,
        user_id: i64,
        family: &str,
        token_hash: &[u8],
        expires_at: i64,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT INTO refresh_tokens (user_id, family, token_hash, expires_at, created_at)
             VALUES (?, ?, ?, ?, ?)",
        )
        .bind(user_id)
        .bind(family)
        .bind(token_hash)
        .bind(expires_at)
        .bind(now_s())
        .execute(&mut **tx)
        .await
        .map(|_| ())
    }

    /// Rotates the refresh token whose hash is `old`: marks it used and stores `new` in its
    /// family. A token used twice revokes its family (RFC 6819 5.2.2.3, refresh token rotation).
    pub async fn rotate_refresh(
        &self,
        old: &[u8],
        new: &[u8],
        expires_at: i64,
    ) -> Result<RefreshOutcome, sqlx::Error> {
        let mut tx = self.begin().await?;
        let row = sqlx::query(
            "SELECT user_id, family, expires_at, rotated, revoked FROM refresh_tokens
             WHERE token_hash = ?",
        )
        .bind(old)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            return Ok(RefreshOutcome::Invalid);
        };
        let user_id: i64 = row.try_get("user_id")?;
        let family: String = row.try_get("family")?;
        if row.try_get::<i64, _>("rotated")? != 0 || row.try_get::<i64, _>("revoked")? != 0 {
            sqlx::query("UPDATE refresh_tokens SET revoked = 1 WHERE family = ?")
                .bind(&family)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            return Ok(RefreshOutcome::Reused { user_id });
        }
        if row.try_get::<i64, _>("expires_at")? <= now_s() {
            return Ok(RefreshOutcome::Invalid);
        }
        sqlx::query("UPDATE refresh_tokens SET rotated = 1 WHERE token_hash = ?")
            .bind(old)
            .execute(&mut *tx)
            .await?;
        Self::insert_refresh(&mut tx, user_id, &family, new, expires_at).await?;
        tx.commit().await?;
        Ok(RefreshOutcome::Rotated { user_id })
    }

    /// Revokes the family of the token whose hash is `hash`, if it belongs to `user_id`.
    /// Returns whether there was one.
    pub async fn revoke_refresh(&self, hash: &[u8], user_id: i64) -> Result<bool, sqlx::Error> {
        let r = sqlx::query(
            "UPDATE refresh_tokens SET revoked = 1 WHERE family IN
               (SELECT family FROM refresh_tokens WHERE token_hash = ? AND user_id = ?)",
        )
        .bind(hash)
        .bind(user_id)
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() > 0)
    }

    /// Revokes every refresh token of a user (password change, disable, role change).
    pub async fn revoke_all_refresh(tx: &mut Tx, user_id: i64) -> Result<(), sqlx::Error> {
        sqlx::query("UPDATE refresh_tokens SET revoked = 1 WHERE user_id = ?")
            .bind(user_id)
            .execute(&mut **tx)
            .await
            .map(|_| ())
    }
}

/// User `id`, read on `conn` (a write transaction's, to update it).
pub async fn user(conn: &mut SqliteConnection, id: i64) -> Result<Option<UserRow>, sqlx::Error> {
    sqlx::query("SELECT * FROM users WHERE id = ?")
        .bind(id)
        .fetch_optional(conn)
        .await?
        .map(|r| UserRow::from_row(&r))
        .transpose()
}

/// The built-in SLA classes, once, with the migration that makes their table.
async fn seed_classes(tx: &mut SqliteConnection) -> Result<(), sqlx::Error> {
    let now = now_s();
    for c in patronus_api::SlaClass::builtins() {
        sqlx::query(
            "INSERT INTO sla_classes (name, spec, builtin, created_at, updated_at)
             VALUES (?, ?, 1, ?, ?)",
        )
        .bind(c.name.as_str())
        .bind(serde_json::to_string(&c).unwrap_or_default())
        .bind(now)
        .bind(now)
        .execute(&mut *tx)
        .await?;
    }
    Ok(())
}

/// How to list users.
#[derive(Debug, Clone)]
pub struct UserQuery {
    pub role: Option<String>,
    pub disabled: Option<bool>,
    pub search: Option<String>,
    pub sort: UserSort,
    pub descending: bool,
    pub limit: i64,
    pub offset: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UserSort {
    Id,
    Email,
    Name,
    Role,
    CreatedAt,
}

impl UserSort {
    fn column(self) -> &'static str {
        match self {
            UserSort::Id => "id",
            UserSort::Email => "email",
            UserSort::Name => "name",
            UserSort::Role => "role",
            UserSort::CreatedAt => "created_at",
        }
    }
}

/// How to read the audit log.
#[derive(Debug, Clone, Default)]
pub struct AuditQuery {
    pub actor: Option<String>,
    pub action: Option<String>,
    pub since_ms: Option<i64>,
    pub until_ms: Option<i64>,
    pub oldest_first: bool,
    pub limit: i64,
    pub offset: i64,
}

/// Creates `dir` (and its parents) with mode 0700 if missing.
pub fn create_private_dir(dir: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::DirBuilderExt;
    if dir.is_dir() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|error| StoreError::Io {
            what: format!("creating {}", dir.display()),
            error,
        })
}

/// Creates `path` empty with mode 0600 if missing (SQLite then gives its WAL and shared-memory
/// files the same mode).
fn create_private_file(path: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(error) => Err(StoreError::Io {
            what: format!("creating {}", path.display()),
            error,
        }),
    }
}
