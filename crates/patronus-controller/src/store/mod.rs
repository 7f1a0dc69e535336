//! The controller's store, on SQLite (the embedded default: WAL, foreign keys on,
//! `synchronous = FULL`, so a write the API acknowledged survives the process being killed) or
//! PostgreSQL (several controllers over one database, and PostgreSQL's own replication), chosen
//! by the configured [`Database`]; each with its migrations ([`schema`]), applied at start.
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
//! # Two backends, one set of statements
//!
//! Each statement is written once and runs on both ([`db`]): `?` parameters, numbered for
//! PostgreSQL when it runs; values bound from a closed set of types; rows decoded by the native
//! driver. What differs between the two is kept out of the statements where it costs nothing
//! (`RETURNING id` rather than SQLite's last row id, `ON CONFLICT DO NOTHING` rather than
//! `INSERT OR IGNORE`, `lower(email)` rather than `COLLATE NOCASE`, `CAST(... AS BIGINT)` where
//! PostgreSQL would make a narrower integer, a float sum rather than SQLite's `TOTAL`, integers
//! for times and flags, JSON as text), and the rest is in the schema of each backend.
//!
//! Why not sqlx's `Any` driver: it decodes only the types both sides share (no `Json`,
//! transact-rs/sqlx#3997, whose fix was closed unmerged), sets no SQLite pragmas, and gives no
//! access to PostgreSQL's advisory locks or `LISTEN`/`NOTIFY`, which several controllers need.
//! Why not one implementation of a store trait per backend (atuin's `atuin-server-database`):
//! with a hundred statements that is every statement written twice, and the two copies drift.
//! The whole API test suite runs on both (`tests/api` and `tests/api_postgres.rs`).

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{Postgres, Sqlite, Transaction};
use tokio::sync::{Notify, watch};

pub mod db;
pub mod schema;

pub mod api_keys;
pub mod copy;
pub mod docs;
pub mod dump;
pub mod enrollment;
pub mod history;
pub mod presence;
pub mod sessions;
pub mod settings;
pub mod sites;
pub mod telemetry;
pub mod throttle;
pub mod topology;
pub mod users;
pub mod webhooks;

pub use db::{AsConn, Conn, Raw, Row};
#[allow(unused_imports)]
use db::{query, query_as, query_scalar};
pub use schema::Database;

/// The end of a versioned update (`... WHERE id = ? AND version = ?`): stale if it changed no
/// row (another writer got there first, or the row is gone).
fn one_row_changed(r: db::Done) -> Result<(), docs::WriteError> {
    if r.rows_affected() == 0 {
        return Err(docs::WriteError::Stale);
    }
    Ok(())
}

/// The rows of `sql` (`{}` where the `IN` list goes) for every id of `ids`, 500 bound
/// parameters at a time. The statement's text depends only on how many ids a chunk holds, so
/// it is prepared once and then reused from the connection's statement cache: ids written into
/// the text made every list a new statement for the database to parse and plan. Rows come
/// chunk by chunk: a caller that needs an order across chunks sorts them.
async fn rows_for_ids(conn: &mut Conn, sql: &str, ids: &[i64]) -> Result<Vec<Row>, sqlx::Error> {
    let mut out = Vec::new();
    for chunk in ids.chunks(500) {
        let text = sql.replacen("{}", &vec!["?"; chunk.len()].join(", "), 1);
        let mut q = query(&text);
        for id in chunk {
            q = q.bind(*id);
        }
        out.extend(q.fetch_all(&mut *conn).await?);
    }
    Ok(out)
}

/// Deletes row `id` of `table` (a constant, never a client's input); nothing if it is gone.
async fn delete_by_id(conn: &mut Conn, table: &'static str, id: i64) -> Result<(), sqlx::Error> {
    query(&format!("DELETE FROM {table} WHERE id = ?"))
        .bind(id)
        .execute(&mut *conn)
        .await
        .map(|_| ())
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{what}: {error}")]
    Io { what: String, error: std::io::Error },
    #[error("{what}: {error}")]
    Db { what: String, error: sqlx::Error },
    #[error(
        "the database's schema is at version {found}, newer than this binary knows ({known}): \
         run the release that wrote it, or a newer one"
    )]
    TooNew { found: i64, known: i64 },
    #[error(
        "the database's schema is at version {found}, older than this binary's ({known}): use \
         the binary of the controllers that run on it (this one would migrate it under them), \
         or start this release's controller first"
    )]
    TooOld { found: i64, known: i64 },
    #[error(
        "{path}: the database is damaged ({detail}). Stop every controller, move the file \
         aside (with its -wal and -shm), and restore the latest backup: `patronus restore \
         --identity <age identity file>` (`patronus backup list` shows the backups)"
    )]
    Damaged { path: PathBuf, detail: String },
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
    fn from_row(r: &Row) -> Result<Self, sqlx::Error> {
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
    /// Already rotated: someone replayed it. Its whole family is now revoked.
    Reused { user_id: i64 },
    /// Revoked and never rotated: its session was ended (logout, a password or role change,
    /// a rotation of the secrets). Nothing was replayed.
    Revoked,
    /// The signing key was replaced since this controller last looked: nothing written.
    KeyReplaced,
}

/// The pool of connections to one of the two backends.
#[derive(Debug, Clone)]
enum Pool {
    Sqlite(SqlitePool),
    Pg(PgPool),
}

#[derive(Debug, Clone)]
pub struct Store {
    pool: Pool,
    /// The configuration generation last committed: edges waiting for a new configuration
    /// watch it.
    generation: watch::Sender<i64>,
    /// Wakes the webhook delivery worker when a transaction that queued deliveries commits.
    webhook_wake: std::sync::Arc<Notify>,
    /// Bumped when a transaction that kept events commits: the event streams read what is new.
    events: watch::Sender<u64>,
    /// Newer generations learnt from other controllers: (announced, read from the table).
    followed: std::sync::Arc<[std::sync::atomic::AtomicU64; 2]>,
    /// The newest generation that may have changed the sites (anything but the network-wide
    /// settings, [`Touches`]): a compile reads the sites again only past it.
    sites_touched: std::sync::Arc<std::sync::atomic::AtomicI64>,
    /// SQLite: the write transactions' own connection, a pool of one (connected when first
    /// needed), which is this controller's write turn: the pool hands it out first come first
    /// served, a writer waiting for it holds no other connection, and readers never hold up a
    /// writer that has it. Waiting in the database's lock instead held a pooled connection per
    /// waiter (so a writer that needed a second one could find the pool empty), and SQLite's
    /// busy handler, which sleeps and retries, let some writers wait seconds while later ones
    /// went first. PostgreSQL: the shared pool (its lock queue is in order already).
    writer: Pool,
}

/// A transaction on either backend.
#[derive(Debug)]
enum TxInner {
    Sqlite(Transaction<'static, Sqlite>),
    Pg(Transaction<'static, Postgres>),
}

impl AsConn for TxInner {
    fn raw(&mut self) -> Raw<'_> {
        match self {
            TxInner::Sqlite(t) => Raw::Sqlite(t),
            TxInner::Pg(t) => Raw::Pg(t),
        }
    }
}

impl TxInner {
    async fn commit(self) -> Result<(), sqlx::Error> {
        match self {
            TxInner::Sqlite(t) => t.commit().await,
            TxInner::Pg(t) => t.commit().await,
        }
    }
}

/// A write transaction. Writers take turns, on both backends: on SQLite it holds the write
/// lock from its first statement (`BEGIN IMMEDIATE`); on PostgreSQL its first statement takes
/// a transaction-scoped advisory lock that every writer of every controller takes
/// (`pg_advisory_xact_lock`), and each statement then sees everything committed before it.
/// So what a transaction reads cannot change under it before it commits: an update reads the
/// current row inside its own transaction and cannot lose a race to another writer, and the
/// checks across rows (overlapping prefixes, overlay addresses) hold with several controllers.
///
/// A write that changes what some edge runs says so with [`Tx::config_changed`], inside the
/// transaction: the configuration generation is bumped with the change itself, and waiting
/// edges are woken when (and only if) it commits. It dereferences to a [`Conn`], so
/// statements run on `&mut *tx`.
#[derive(Debug)]
pub struct Tx {
    tx: TxInner,
    generation: Option<i64>,
    deliveries_queued: bool,
    events_recorded: bool,
    store: Store,
}

impl AsConn for Tx {
    fn raw(&mut self) -> Raw<'_> {
        self.tx.raw()
    }
}

/// A read transaction: every statement on it sees the same snapshot of the database.
#[derive(Debug)]
pub struct Snapshot(TxInner);

impl AsConn for Snapshot {
    fn raw(&mut self) -> Raw<'_> {
        self.0.raw()
    }
}

/// A connection from the pool.
#[derive(Debug)]
pub enum Pooled {
    Sqlite(sqlx::pool::PoolConnection<Sqlite>),
    Pg(sqlx::pool::PoolConnection<Postgres>),
}

impl AsConn for Pooled {
    fn raw(&mut self) -> Raw<'_> {
        match self {
            Pooled::Sqlite(c) => Raw::Sqlite(c),
            Pooled::Pg(c) => Raw::Pg(c),
        }
    }
}

/// Each of these is a [`Conn`] where a function takes one (`&mut *tx`).
macro_rules! deref_to_conn {
    ($($t:ty),+) => {$(
        impl std::ops::Deref for $t {
            type Target = Conn;

            fn deref(&self) -> &Conn {
                self
            }
        }

        impl std::ops::DerefMut for $t {
            fn deref_mut(&mut self) -> &mut Conn {
                self
            }
        }
    )+};
}

deref_to_conn!(Tx, Snapshot, Pooled);

/// The advisory lock every write transaction takes on PostgreSQL ("PTRS").
const WRITE_LOCK: i64 = 0x5054_5253;

/// The PostgreSQL channel a committed configuration generation is announced on.
const GENERATION_CHANNEL: &str = "patronus_generation";

/// How often a controller on PostgreSQL reads the generation even without a notification.
const GENERATION_RECHECK: Duration = Duration::from_secs(5);

/// What a configuration change touched, for what a compile may keep from the one before.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Touches {
    /// Sites, their links, keys or endpoints (or anything: the safe answer).
    Sites,
    /// Only the network-wide settings a compile reads afresh every time: policies, SLA
    /// classes, failover settings (not the topology: it renumbers sites).
    Settings,
}

impl Tx {
    /// This transaction changes what some edge runs: the configuration generation is bumped in
    /// it. Returns the new generation.
    pub async fn config_changed(&mut self) -> Result<i64, sqlx::Error> {
        self.config_changed_touching(Touches::Sites).await
    }

    /// [`Tx::config_changed`], saying what the change touched. A change of the sites is
    /// marked before it commits, while this transaction holds the write turn: a compile that
    /// sees this generation (or any later one) then reads the sites again. A mark whose
    /// transaction rolls back costs one needless read.
    pub async fn config_changed_touching(&mut self, touches: Touches) -> Result<i64, sqlx::Error> {
        let g: i64 = query_scalar(
            "UPDATE config_generation SET generation = generation + 1 WHERE id = 1
             RETURNING generation",
        )
        .fetch_one(&mut *self)
        .await?;
        if let TxInner::Pg(t) = &mut self.tx {
            // Delivered to every controller's listener when (and only if) this commits.
            sqlx::query("SELECT pg_notify($1, $2)")
                .bind(GENERATION_CHANNEL)
                .bind(g.to_string())
                .execute(&mut **t)
                .await?;
        }
        if touches == Touches::Sites {
            self.store.sites_touched_at(g);
        }
        self.generation = Some(g);
        Ok(g)
    }

    /// Webhook deliveries were written in this transaction: the worker is woken on commit.
    pub fn deliveries_queued(&mut self) {
        self.deliveries_queued = true;
    }

    /// Events were kept in this transaction: the event streams are woken on commit.
    pub fn events_recorded(&mut self) {
        self.events_recorded = true;
    }

    /// Commits; then wakes whoever waits on what it changed.
    pub async fn commit(self) -> Result<(), sqlx::Error> {
        self.tx.commit().await?;
        if let Some(g) = self.generation {
            self.store.generation_seen(g);
        }
        if self.deliveries_queued {
            self.store.webhook_wake.notify_one();
        }
        if self.events_recorded {
            self.store.events.send_modify(|n| *n += 1);
        }
        Ok(())
    }
}

impl Store {
    /// Opens `database` and brings its schema up to this binary's. An SQLite file is created
    /// on first start (its directory 0700, the file 0600). A database that cannot be reached,
    /// or whose schema is newer than this binary knows, is an error that says so; nothing is
    /// served half-way.
    pub async fn connect(database: &Database) -> Result<Self, StoreError> {
        match database {
            Database::Sqlite(path) => Self::open_with(path, true).await,
            Database::Postgres(url) => Self::open_postgres(url, true).await,
        }
    }

    /// As [`Store::connect`], for tools that work on a database the controllers own
    /// (`patronus backup create`): one at an older schema than this binary's is not migrated
    /// under the controllers still running on it, but refused.
    pub async fn connect_existing(database: &Database) -> Result<Self, StoreError> {
        match database {
            Database::Sqlite(path) => Self::open_with(path, false).await,
            Database::Postgres(url) => Self::open_postgres(url, false).await,
        }
    }

    /// Opens (creating on first start: the directory 0700, the file 0600) and migrates.
    pub async fn open(path: &Path) -> Result<Self, StoreError> {
        Self::open_with(path, true).await
    }

    /// [`Store::open`]; migrating an older schema only if `migrate`.
    async fn open_with(path: &Path, migrate: bool) -> Result<Self, StoreError> {
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
        let damaged = |detail: String| StoreError::Damaged {
            path: path.to_owned(),
            detail,
        };
        // Corruption is named as such, with the way back; any other error (locked, I/O) is not.
        let failed = |what: &str| {
            let what = format!("{what} {}", path.display());
            move |e: sqlx::Error| {
                if is_corrupt(&e) {
                    damaged(e.to_string())
                } else {
                    StoreError::Db { what, error: e }
                }
            }
        };
        let pool = SqlitePoolOptions::new()
            .max_connections(8)
            .connect_with(opts)
            .await
            .map_err(failed("opening"))?;
        // Checked before anything is read or migrated: a damaged file is named, with the way
        // back, rather than failing later on whatever page a request happens to touch.
        let found: Vec<String> = query_scalar("PRAGMA quick_check")
            .fetch_all(&mut *Pooled::Sqlite(
                pool.acquire().await.map_err(db("opening"))?,
            ))
            .await
            .map_err(failed("checking"))?;
        if found != ["ok"] {
            pool.close().await;
            return Err(damaged(found.join("; ")));
        }
        Self::start(Pool::Sqlite(pool), migrate).await
    }

    /// Connects to the PostgreSQL database at `url` and migrates it.
    async fn open_postgres(url: &str, migrate: bool) -> Result<Self, StoreError> {
        let shown = Database::Postgres(url.to_owned()).display();
        let opts: PgConnectOptions = url.parse().map_err(db(format!("parsing {shown}")))?;
        let opts = opts.application_name("patronus-controller");
        // One connection first, on its own: a pool that cannot connect reports only that it
        // timed out, this says why (refused, no such database, authentication failed, ...).
        sqlx::ConnectOptions::connect(&opts)
            .await
            .map_err(db(format!("connecting to {shown}")))
            .map(sqlx::Connection::close)?
            .await
            .map_err(db(format!("connecting to {shown}")))?;
        let pool = PgPoolOptions::new()
            .max_connections(16)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(opts)
            .await
            .map_err(db(format!("connecting to {shown}")))?;
        Self::start(Pool::Pg(pool), migrate).await
    }

    async fn start(pool: Pool, migrate: bool) -> Result<Self, StoreError> {
        let writer = match &pool {
            Pool::Sqlite(p) => Pool::Sqlite(
                SqlitePoolOptions::new()
                    .max_connections(1)
                    .connect_lazy_with((*p.connect_options()).clone()),
            ),
            // PostgreSQL's writers take their connections from the shared pool.
            Pool::Pg(p) => Pool::Pg(p.clone()),
        };
        let mut store = Self {
            pool,
            writer,
            generation: watch::channel(0).0,
            webhook_wake: std::sync::Arc::new(Notify::new()),
            events: watch::channel(0).0,
            followed: std::sync::Arc::default(),
            sites_touched: std::sync::Arc::default(),
        };
        store.migrate(migrate).await?;
        let g: i64 = query_scalar("SELECT generation FROM config_generation WHERE id = 1")
            .fetch_one(&mut *store.conn().await.map_err(db("connecting"))?)
            .await
            .map_err(db("reading the configuration generation"))?;
        store.generation = watch::channel(g).0;
        if let Pool::Pg(pool) = &store.pool {
            let mut listener = sqlx::postgres::PgListener::connect_with(pool)
                .await
                .map_err(db("listening for configuration changes"))?;
            listener
                .listen(GENERATION_CHANNEL)
                .await
                .map_err(db("listening for configuration changes"))?;
            tokio::spawn(follow_generation(store.clone(), pool.clone(), listener));
        }
        if let Pool::Sqlite(pool) = &store.pool {
            tokio::spawn(reread_generation(store.clone(), pool.clone()));
        }
        Ok(store)
    }

    /// Generation `g` may have changed the sites.
    fn sites_touched_at(&self, g: i64) {
        self.sites_touched
            .fetch_max(g, std::sync::atomic::Ordering::SeqCst);
    }

    /// The newest generation that may have changed the sites: sites read as of a generation
    /// at least this one are current.
    pub fn sites_touched(&self) -> i64 {
        self.sites_touched.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Generation `g`, read from the database or announced: if it is newer than what this
    /// controller committed, someone else (another controller, another process on the same
    /// file) did, and what it touched is not known, so it counts as touching the sites.
    fn generation_learnt(&self, g: i64) -> bool {
        if g > self.generation() {
            self.sites_touched_at(g);
        }
        self.generation_seen(g)
    }

    /// Raises the generation edges wait on to `g`, if it is newer; whether it was.
    fn generation_seen(&self, g: i64) -> bool {
        self.generation.send_if_modified(|cur| {
            let newer = g > *cur;
            if newer {
                *cur = g;
            }
            newer
        })
    }

    /// How many newer configuration generations this controller learnt from others (on
    /// PostgreSQL): (announced by `NOTIFY`, found by reading the table after a reconnect or
    /// on the periodic check).
    pub fn generations_followed(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (
            self.followed[0].load(Relaxed),
            self.followed[1].load(Relaxed),
        )
    }

    fn followed(&self, how: usize) {
        self.followed[how].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Which backend: `sqlite` or `postgres`.
    pub fn backend(&self) -> &'static str {
        match self.pool {
            Pool::Sqlite(_) => "sqlite",
            Pool::Pg(_) => "postgres",
        }
    }

    /// The database's clock (unix ms): the one clock that what several controllers write and
    /// compare (such as when an edge was last heard from) is read against, whatever their own
    /// clocks say. On SQLite (one machine) it is this machine's.
    pub async fn clock_ms(&self) -> Result<i64, sqlx::Error> {
        match self.pool {
            Pool::Sqlite(_) => Ok(now_ms()),
            Pool::Pg(_) => {
                query_scalar("SELECT CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT)")
                    .fetch_one(&mut *self.conn().await?)
                    .await
            }
        }
    }

    /// A read transaction: every statement on it sees the same snapshot of the database.
    pub async fn snapshot(&self) -> Result<Snapshot, sqlx::Error> {
        Ok(Snapshot(match &self.pool {
            Pool::Sqlite(p) => TxInner::Sqlite(p.begin().await?),
            Pool::Pg(p) => TxInner::Pg(
                p.begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
                    .await?,
            ),
        }))
    }

    /// The pool's connections: (open, idle).
    pub fn connections(&self) -> (usize, usize) {
        match &self.pool {
            Pool::Sqlite(p) => (p.size() as usize, p.num_idle()),
            Pool::Pg(p) => (p.size() as usize, p.num_idle()),
        }
    }

    /// Closes every connection (SQLite: checkpoints the write-ahead log into the database).
    pub async fn close(&self) {
        if let Pool::Sqlite(w) = &self.writer {
            w.close().await;
        }
        match &self.pool {
            Pool::Sqlite(p) => {
                // The last connection to close would checkpoint, but the pool's close does not
                // wait for its connections' threads to finish: checkpoint here, so that the
                // file alone holds everything once this returns.
                if let Ok(c) = p.acquire().await {
                    let _ = query("PRAGMA wal_checkpoint(TRUNCATE)")
                        .execute(&mut *Pooled::Sqlite(c))
                        .await;
                }
                p.close().await
            }
            Pool::Pg(p) => p.close().await,
        }
    }

    /// A connection from the pool, for reads.
    pub async fn conn(&self) -> Result<Pooled, sqlx::Error> {
        Ok(match &self.pool {
            Pool::Sqlite(p) => Pooled::Sqlite(p.acquire().await?),
            Pool::Pg(p) => Pooled::Pg(p.acquire().await?),
        })
    }

    /// The configuration generation last committed.
    pub fn generation(&self) -> i64 {
        *self.generation.borrow()
    }

    /// Changes of the configuration generation, as they commit.
    pub fn watch_generation(&self) -> watch::Receiver<i64> {
        self.generation.subscribe()
    }

    /// Changes whenever a transaction that kept events commits here (events kept by other
    /// controllers are not announced: an event stream also reads every second).
    pub fn watch_events(&self) -> watch::Receiver<u64> {
        self.events.subscribe()
    }

    /// Wakes when a transaction that queued webhook deliveries commits.
    pub fn webhook_wake(&self) -> &Notify {
        &self.webhook_wake
    }

    /// The generation as committed in the database (what another controller may have moved).
    async fn stored_generation(&self) -> Result<i64, sqlx::Error> {
        query_scalar("SELECT generation FROM config_generation WHERE id = 1")
            .fetch_one(&mut *self.conn().await?)
            .await
    }

    async fn migrate(&self, older_too: bool) -> Result<(), StoreError> {
        let (migrations, latest) = match self.pool {
            Pool::Sqlite(_) => (schema::SQLITE_MIGRATIONS, schema::SQLITE_MIGRATIONS),
            Pool::Pg(_) => (schema::PG_MIGRATIONS, schema::PG_MIGRATIONS),
        };
        let known = latest.last().map_or(0, |m| m.0);
        // Under the write lock: controllers starting together on a fresh PostgreSQL database
        // would otherwise race to create it (and one would fail on a duplicate type name).
        let mut tx = self.begin().await.map_err(db("connecting"))?;
        query(
            "CREATE TABLE IF NOT EXISTS schema_migrations (
                version BIGINT PRIMARY KEY, name TEXT NOT NULL, applied_at BIGINT NOT NULL)",
        )
        .execute(&mut *tx)
        .await
        .map_err(db("creating schema_migrations"))?;
        tx.commit()
            .await
            .map_err(db("creating schema_migrations"))?;
        let applied = self
            .schema_version()
            .await
            .map_err(db("reading schema_migrations"))?;
        if applied > known {
            return Err(StoreError::TooNew {
                found: applied,
                known,
            });
        }
        if applied < known && applied > 0 && !older_too {
            return Err(StoreError::TooOld {
                found: applied,
                known,
            });
        }
        for (version, name, sql) in migrations {
            if *version <= applied {
                continue;
            }
            let mut tx = self.begin().await.map_err(db("migration"))?;
            // A second controller starting at the same time waits on the write lock, then
            // finds the migration applied.
            let now: i64 = query_scalar("SELECT COALESCE(MAX(version), 0) FROM schema_migrations")
                .fetch_one(&mut *tx)
                .await
                .map_err(db("reading schema_migrations"))?;
            if now >= *version {
                continue;
            }
            match tx.raw() {
                Raw::Sqlite(c) => sqlx::raw_sql(sql).execute(c).await.map(|_| ()),
                Raw::Pg(c) => sqlx::raw_sql(sql).execute(c).await.map(|_| ()),
            }
            .map_err(db(format!("migration {version} ({name})")))?;
            if *version == 4 || (self.backend() == "postgres" && *version == 15) {
                seed_classes(&mut tx)
                    .await
                    .map_err(db("seeding the built-in SLA classes"))?;
            }
            if *version == 15 {
                sites::index_all_prefixes(&mut tx)
                    .await
                    .map_err(db("indexing the sites' LAN prefixes"))?;
            }
            query("INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)")
                .bind(*version)
                .bind(*name)
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
        query_scalar("SELECT COALESCE(MAX(version), 0) FROM schema_migrations")
            .fetch_one(&mut *self.conn().await?)
            .await
    }

    /// SQLite's `integrity_check` and `foreign_key_check` of the database: `ok`, or what they
    /// found. (PostgreSQL checks its pages itself and has no such statement: `ok`.)
    pub async fn integrity_check(&self) -> Result<String, sqlx::Error> {
        if self.backend() != "sqlite" {
            return Ok("ok".into());
        }
        let mut conn = self.conn().await?;
        let found: Vec<String> = query_scalar("PRAGMA integrity_check")
            .fetch_all(&mut *conn)
            .await?;
        let broken: i64 = query_scalar("SELECT COUNT(*) FROM pragma_foreign_key_check")
            .fetch_one(&mut *conn)
            .await?;
        let mut out = found.join("; ");
        if broken > 0 {
            out = format!("{out}; {broken} rows whose foreign keys point nowhere");
        }
        Ok(out)
    }

    pub async fn ping(&self) -> Result<(), sqlx::Error> {
        query("SELECT 1")
            .execute(&mut *self.conn().await?)
            .await
            .map(|_| ())
    }

    /// A write transaction; writers take their turn (see [`Tx`]): one that reads before it
    /// writes waits (SQLite's busy timeout, PostgreSQL's lock queue) instead of failing when
    /// another writer committed meanwhile.
    pub async fn begin(&self) -> Result<Tx, sqlx::Error> {
        let tx = match &self.writer {
            Pool::Sqlite(p) => TxInner::Sqlite(p.begin_with("BEGIN IMMEDIATE").await?),
            // PostgreSQL queues the advisory lock's waiters in order itself. A turn taken in
            // the controller first made the mixed load of bench api-load worse (p99 of its
            // writes 155 -> ~500 ms): the holder's statements queue behind the readers' for
            // the CPU, and every other writer waits on it.
            Pool::Pg(p) => {
                let mut t = p.begin().await?;
                sqlx::query("SELECT pg_advisory_xact_lock($1)")
                    .bind(WRITE_LOCK)
                    .execute(&mut *t)
                    .await?;
                TxInner::Pg(t)
            }
        };
        Ok(Tx {
            tx,
            generation: None,
            deliveries_queued: false,
            events_recorded: false,
            store: self.clone(),
        })
    }

    // ----- users -----

    pub async fn user_count(&self) -> Result<i64, sqlx::Error> {
        query_scalar("SELECT COUNT(*) FROM users")
            .fetch_one(&mut *self.conn().await?)
            .await
    }

    pub async fn user(&self, id: i64) -> Result<Option<UserRow>, sqlx::Error> {
        user(&mut *self.conn().await?, id).await
    }

    pub async fn user_by_email(&self, email: &str) -> Result<Option<UserRow>, sqlx::Error> {
        query("SELECT * FROM users WHERE lower(email) = lower(?)")
            .bind(email)
            .fetch_optional(&mut *self.conn().await?)
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
            filter.push_str(
                " AND (lower(email) LIKE lower(?) ESCAPE '\\' OR lower(name) LIKE lower(?) ESCAPE '\\')",
            );
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
        let total: i64 = bind_filters!(query_scalar(&count))
            .fetch_one(&mut *self.conn().await?)
            .await?;
        let sql = format!(
            "SELECT * FROM users{filter} ORDER BY {} {}, id LIMIT ? OFFSET ?",
            q.sort.column(),
            if q.descending { "DESC" } else { "ASC" }
        );
        let rows = bind_filters!(query(&sql))
            .bind(q.limit)
            .bind(q.offset)
            .fetch_all(&mut *self.conn().await?)
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
        query(
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
        let old = query(&format!(
            "DELETE FROM audit_log WHERE {REFUSED} AND at_ms < ?"
        ))
        .bind(before_ms)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        let over = query(&format!(
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
            counts.push((kind, query_scalar(sql).fetch_one(&mut *conn).await?));
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
        let total: i64 = bind_filters!(query_scalar(&count))
            .fetch_one(&mut *self.conn().await?)
            .await?;
        let sql = format!(
            "SELECT * FROM audit_log{filter} ORDER BY id {} LIMIT ? OFFSET ?",
            if q.oldest_first { "ASC" } else { "DESC" }
        );
        let rows = bind_filters!(query(&sql))
            .bind(q.limit)
            .bind(q.offset)
            .fetch_all(&mut *self.conn().await?)
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
                    details: serde_json::from_str(r.str("details")?)
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
        query(
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
        signing_key: &str,
    ) -> Result<RefreshOutcome, sqlx::Error> {
        let mut tx = self.begin().await?;
        let row = query(
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
        if row.try_get::<i64, _>("rotated")? == 0 && row.try_get::<i64, _>("revoked")? != 0 {
            return Ok(RefreshOutcome::Revoked);
        }
        if row.try_get::<i64, _>("rotated")? != 0 {
            query("UPDATE refresh_tokens SET revoked = 1 WHERE family = ?")
                .bind(&family)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            return Ok(RefreshOutcome::Reused { user_id });
        }
        if row.try_get::<i64, _>("expires_at")? <= now_s() {
            return Ok(RefreshOutcome::Invalid);
        }
        query("UPDATE refresh_tokens SET rotated = 1 WHERE token_hash = ?")
            .bind(old)
            .execute(&mut *tx)
            .await?;
        Self::insert_refresh(&mut tx, user_id, &family, new, expires_at).await?;
        // A rotation of the signing key committed since this controller last looked: no new
        // session (dropped, the transaction rolls back). Writers take turns, so a rotation
        // after this commit revokes it with the others.
        if settings::signing_key(&mut tx)
            .await?
            .is_some_and(|k| k != signing_key)
        {
            return Ok(RefreshOutcome::KeyReplaced);
        }
        tx.commit().await?;
        Ok(RefreshOutcome::Rotated { user_id })
    }

    /// Revokes the family of the token whose hash is `hash`, if it belongs to `user_id`.
    /// Returns whether there was one.
    pub async fn revoke_refresh(&self, hash: &[u8], user_id: i64) -> Result<bool, sqlx::Error> {
        let r = query(
            "UPDATE refresh_tokens SET revoked = 1 WHERE family IN
               (SELECT family FROM refresh_tokens WHERE token_hash = ? AND user_id = ?)",
        )
        .bind(hash)
        .bind(user_id)
        .execute(&mut *self.conn().await?)
        .await?;
        Ok(r.rows_affected() > 0)
    }

    /// Revokes every refresh token of a user and ends their dashboard sessions (password
    /// change, disable, role change).
    pub async fn revoke_all_refresh(tx: &mut Tx, user_id: i64) -> Result<(), sqlx::Error> {
        query("UPDATE refresh_tokens SET revoked = 1 WHERE user_id = ?")
            .bind(user_id)
            .execute(&mut **tx)
            .await?;
        sessions::end_all(tx, Some(user_id)).await.map(|_| ())
    }
}

/// Several controllers over one PostgreSQL: the configuration generation another controller
/// committed, as it is announced (`NOTIFY` in the writing transaction), so that the edges
/// waiting here for a new configuration are woken at once whichever controller took the
/// write. A notification can be lost only with the listening connection; when it is
/// re-established (sqlx reconnects it) the generation is read from the table, and it is read
/// every few seconds anyway, so no edge is left behind. Stops when the pool is closed.
async fn follow_generation(store: Store, pool: PgPool, mut listener: sqlx::postgres::PgListener) {
    let mut recheck = tokio::time::interval(GENERATION_RECHECK);
    recheck.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut reread = false;
    while !pool.is_closed() {
        tokio::select! {
            n = listener.try_recv() => match n {
                Ok(Some(n)) => match n.payload().parse::<i64>() {
                    Ok(g) => {
                        if store.generation_learnt(g) {
                            store.followed(0);
                        }
                    }
                    Err(_) => reread = true,
                },
                // The connection was lost and is re-established: what was announced meanwhile
                // is not replayed.
                Ok(None) => reread = true,
                Err(e) => {
                    if pool.is_closed() {
                        break;
                    }
                    tracing::warn!(error = %e, "listening for configuration changes");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    reread = true;
                }
            },
            _ = recheck.tick() => reread = true,
        }
        if reread && !pool.is_closed() {
            match store.stored_generation().await {
                Ok(g) => {
                    if store.generation_learnt(g) {
                        store.followed(1);
                    }
                    reread = false;
                }
                Err(e) => tracing::warn!(error = %e, "reading the configuration generation"),
            }
        }
    }
}

/// SQLite's SQLITE_CORRUPT (11) or SQLITE_NOTADB (26), extended codes included (the
/// primary code is the low byte).
fn is_corrupt(e: &sqlx::Error) -> bool {
    e.as_database_error()
        .and_then(|d| d.code())
        .and_then(|c| c.parse::<i64>().ok())
        .is_some_and(|c| matches!(c & 0xff, 11 | 26))
}

/// SQLite: a write by another process on the file (`patronus restore --site`, say) bumps the
/// generation without this process knowing; it is read every few seconds, so the edges
/// waiting here get the change. Stops when the pool is closed.
async fn reread_generation(store: Store, pool: SqlitePool) {
    let mut recheck = tokio::time::interval(GENERATION_RECHECK);
    recheck.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while !pool.is_closed() {
        recheck.tick().await;
        if pool.is_closed() {
            break;
        }
        if let Ok(g) = store.stored_generation().await {
            if store.generation_learnt(g) {
                store.followed(1);
            }
        }
    }
}

/// User `id`, read on `conn` (a write transaction's, to update it).
pub async fn user(conn: &mut Conn, id: i64) -> Result<Option<UserRow>, sqlx::Error> {
    query("SELECT * FROM users WHERE id = ?")
        .bind(id)
        .fetch_optional(conn)
        .await?
        .map(|r| UserRow::from_row(&r))
        .transpose()
}

/// The built-in SLA classes, once, with the migration that makes their table.
async fn seed_classes(tx: &mut Conn) -> Result<(), sqlx::Error> {
    let now = now_s();
    for c in patronus_api::SlaClass::builtins() {
        query(
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
            UserSort::Email => "lower(email)",
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
