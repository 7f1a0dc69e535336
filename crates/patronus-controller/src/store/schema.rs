//! The schema of each backend, and which database the store opens ([`Database`]).
//!
//! Each backend has its own migrations, numbered alike: a schema version means the same tables
//! on both. SQLite's history starts at 1; PostgreSQL's starts at 15, one migration that makes
//! the schema SQLite reached at 15 (the first version that ran on PostgreSQL), in PostgreSQL's
//! types: `BIGINT` for every integer (what the code decodes as `i64`; flags stay 0/1 integers
//! as on SQLite), `DOUBLE PRECISION` for `REAL`, `BYTEA` for `BLOB`, identity columns for
//! `AUTOINCREMENT` (by default, so that `controller migrate` can keep ids), a unique index
//! on `lower(email)` for SQLite's `COLLATE NOCASE`, and text in the "C" collation whatever
//! the database's default: text sorts byte by byte and `lower()` folds ASCII only, as on
//! SQLite. From 16 on, every change is one migration
//! in each list, with the same number.

use std::fmt;
use std::path::PathBuf;

/// Where the controller's state lives: an SQLite file (the default) or a PostgreSQL database.
#[derive(Clone, PartialEq, Eq)]
pub enum Database {
    Sqlite(PathBuf),
    /// A `postgres://` URL (its password, if any, is never printed).
    Postgres(String),
}

impl Database {
    /// `postgres://…` or `postgresql://…`, `sqlite://<path>`, or a path. An URL that does not
    /// parse is an error that says why (the URL is not repeated: it may hold a password).
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s.is_empty() {
            return Err("empty: give a file path, sqlite://<path> or postgres://…".into());
        }
        if s.starts_with("postgres://") || s.starts_with("postgresql://") {
            let unknown = unknown_parameters(s);
            if !unknown.is_empty() {
                return Err(format!(
                    "unknown parameter(s) in the PostgreSQL URL: {} (known: {})",
                    unknown.join(", "),
                    PG_PARAMETERS.join(", ")
                ));
            }
            s.parse::<sqlx::postgres::PgConnectOptions>().map_err(|e| {
                format!(
                    "not a valid PostgreSQL URL: {}",
                    redact_error(&e.to_string(), s)
                )
            })?;
            return Ok(Self::Postgres(s.to_owned()));
        }
        if let Some(path) = s.strip_prefix("sqlite://") {
            if path.is_empty() {
                return Err("sqlite:// needs a file path".into());
            }
            return Ok(Self::Sqlite(PathBuf::from(path)));
        }
        if let Some((scheme, _)) = s.split_once("://") {
            return Err(format!(
                "unknown database scheme `{scheme}://`: use postgres://, sqlite:// or a path"
            ));
        }
        Ok(Self::Sqlite(PathBuf::from(s)))
    }

    /// The database without secrets: the SQLite path, or the PostgreSQL URL with its password
    /// replaced by `***`.
    pub fn display(&self) -> String {
        match self {
            Self::Sqlite(p) => p.display().to_string(),
            Self::Postgres(url) => redact_url(url),
        }
    }
}

impl fmt::Debug for Database {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.display())
    }
}

/// The query parameters sqlx reads from a PostgreSQL URL. It logs any other one *with its
/// value* (and ignores it), so those are refused before the URL reaches it: a mistyped
/// `pasword=` would otherwise put a password in the log.
const PG_PARAMETERS: &[&str] = &[
    "sslmode",
    "ssl-mode",
    "sslrootcert",
    "ssl-root-cert",
    "ssl-ca",
    "sslcert",
    "ssl-cert",
    "sslkey",
    "ssl-key",
    "statement-cache-capacity",
    "host",
    "hostaddr",
    "port",
    "dbname",
    "user",
    "password",
    "application_name",
    "options",
];

/// The query parameters of `url` that sqlx would not read, by name (decoded).
fn unknown_parameters(url: &str) -> Vec<String> {
    let Some((_, query)) = url.split_once('?') else {
        return Vec::new();
    };
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| percent_decode(p.split_once('=').map_or(p, |(k, _)| k)))
        .filter(|k| !PG_PARAMETERS.contains(&k.as_str()))
        .collect()
}

/// `s` with its `%XX` escapes decoded (others left as they are).
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `url` with the password of its user-info (`user:password@`) and the value of every query
/// parameter that is a password (`password`, `sslpassword`, however written) replaced by `***`.
fn redact_url(url: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let base = match base.split_once("://") {
        Some((scheme, rest)) => {
            let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
            match authority.rsplit_once('@') {
                Some((userinfo, host)) => match userinfo.split_once(':') {
                    Some((user, _)) => format!("{scheme}://{user}:***@{host}{path}"),
                    None => base.to_owned(),
                },
                None => base.to_owned(),
            }
        }
        None => base.to_owned(),
    };
    let Some(query) = query else {
        return base;
    };
    let pairs: Vec<String> = query
        .split('&')
        .map(|p| match p.split_once('=') {
            Some((k, _)) if is_secret(k) => format!("{k}=***"),
            _ => p.to_owned(),
        })
        .collect();
    format!("{base}?{}", pairs.join("&"))
}

fn is_secret(key: &str) -> bool {
    let k = percent_decode(key).to_ascii_lowercase();
    k.contains("password")
}

/// An error about `url` that must not repeat its password.
fn redact_error(error: &str, url: &str) -> String {
    let mut e = error.to_owned();
    let mut secrets = Vec::new();
    if let Some((userinfo, _)) = url.split_once("://").and_then(|(_, r)| r.rsplit_once('@')) {
        if let Some((_, pw)) = userinfo.split_once(':') {
            secrets.push(pw.to_owned());
            secrets.push(percent_decode(pw));
        }
    }
    if let Some((_, q)) = url.split_once('?') {
        for p in q.split('&') {
            if let Some((k, v)) = p.split_once('=') {
                if is_secret(k) {
                    secrets.push(v.to_owned());
                    secrets.push(percent_decode(v));
                }
            }
        }
    }
    for s in secrets.iter().filter(|s| !s.is_empty()) {
        e = e.replace(s.as_str(), "***");
    }
    e
}

/// PostgreSQL's schema: see the module's documentation.
pub const PG_MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        15,
        "the schema of SQLite's migrations 1 to 15, in PostgreSQL's types",
        r#"
CREATE TABLE users (
    id            BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    email         TEXT COLLATE "C"    NOT NULL,
    name          TEXT COLLATE "C"    NOT NULL DEFAULT '',
    role          TEXT COLLATE "C"    NOT NULL CHECK (role IN ('admin', 'operator', 'viewer')),
    password_hash TEXT COLLATE "C"    NOT NULL,
    disabled      BIGINT  NOT NULL DEFAULT 0,
    version       BIGINT  NOT NULL DEFAULT 1,
    created_at    BIGINT  NOT NULL,
    updated_at    BIGINT  NOT NULL
);
CREATE UNIQUE INDEX users_email ON users (lower(email));
CREATE TABLE refresh_tokens (
    id          BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    user_id     BIGINT  NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    family      TEXT COLLATE "C"    NOT NULL,
    token_hash  BYTEA   NOT NULL UNIQUE,
    expires_at  BIGINT  NOT NULL,
    rotated     BIGINT  NOT NULL DEFAULT 0,
    revoked     BIGINT  NOT NULL DEFAULT 0,
    created_at  BIGINT  NOT NULL
);
CREATE INDEX refresh_tokens_family ON refresh_tokens(family);
CREATE INDEX refresh_tokens_user ON refresh_tokens(user_id);
CREATE TABLE audit_log (
    id         BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    at_ms      BIGINT  NOT NULL,
    actor_id   BIGINT,
    actor      TEXT COLLATE "C"    NOT NULL,
    action     TEXT COLLATE "C"    NOT NULL,
    target     TEXT COLLATE "C"    NOT NULL,
    details    TEXT COLLATE "C"    NOT NULL DEFAULT '{}',
    source     TEXT COLLATE "C"    NOT NULL DEFAULT '',
    request_id TEXT COLLATE "C"
);
CREATE INDEX audit_log_at ON audit_log(at_ms);
CREATE INDEX audit_log_action ON audit_log(action, id);

CREATE TABLE sites (
    id              BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    name            TEXT COLLATE "C"    NOT NULL UNIQUE,
    description     TEXT COLLATE "C"    NOT NULL DEFAULT '',
    location        TEXT COLLATE "C"    NOT NULL DEFAULT '',
    latitude        DOUBLE PRECISION,
    longitude       DOUBLE PRECISION,
    lan_prefixes    TEXT COLLATE "C"    NOT NULL DEFAULT '[]',
    status          TEXT COLLATE "C"    NOT NULL DEFAULT 'active'
                            CHECK (status IN ('planned', 'active', 'disabled')),
    version         BIGINT  NOT NULL DEFAULT 1,
    created_at      BIGINT  NOT NULL,
    updated_at      BIGINT  NOT NULL,
    public_key      TEXT COLLATE "C",
    key_rotation    BIGINT  NOT NULL DEFAULT 0,
    next_public_key TEXT COLLATE "C"
);
CREATE TABLE links (
    id         BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    site_id    BIGINT  NOT NULL REFERENCES sites(id) ON DELETE CASCADE,
    name       TEXT COLLATE "C"    NOT NULL,
    spec       TEXT COLLATE "C"    NOT NULL,
    version    BIGINT  NOT NULL DEFAULT 1,
    created_at BIGINT  NOT NULL,
    updated_at BIGINT  NOT NULL,
    UNIQUE (site_id, name)
);

CREATE TABLE topology (
    id             BIGINT  PRIMARY KEY CHECK (id = 1),
    mode           TEXT COLLATE "C"    NOT NULL CHECK (mode IN ('full-mesh', 'hub-spoke')),
    overlay_prefix TEXT COLLATE "C"    NOT NULL,
    version        BIGINT  NOT NULL DEFAULT 1,
    updated_at     BIGINT  NOT NULL
);
INSERT INTO topology (id, mode, overlay_prefix, updated_at) VALUES (1, 'full-mesh', '10.255.0.0/16', 0);
CREATE TABLE hubs (
    site_id BIGINT PRIMARY KEY REFERENCES sites(id) ON DELETE CASCADE
);
CREATE TABLE overlay_addresses (
    site_id BIGINT PRIMARY KEY REFERENCES sites(id) ON DELETE CASCADE,
    host    BIGINT NOT NULL UNIQUE
);

CREATE TABLE sla_classes (
    id         BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    name       TEXT COLLATE "C"    NOT NULL UNIQUE,
    spec       TEXT COLLATE "C"    NOT NULL,
    builtin    BIGINT  NOT NULL DEFAULT 0,
    version    BIGINT  NOT NULL DEFAULT 1,
    created_at BIGINT  NOT NULL,
    updated_at BIGINT  NOT NULL
);
CREATE TABLE policies (
    id         BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    name       TEXT COLLATE "C"    NOT NULL UNIQUE,
    ord        BIGINT  NOT NULL UNIQUE,
    spec       TEXT COLLATE "C"    NOT NULL,
    version    BIGINT  NOT NULL DEFAULT 1,
    created_at BIGINT  NOT NULL,
    updated_at BIGINT  NOT NULL
);
CREATE TABLE settings (
    key        TEXT COLLATE "C"    PRIMARY KEY,
    value      TEXT COLLATE "C"    NOT NULL,
    version    BIGINT  NOT NULL DEFAULT 1,
    updated_at BIGINT  NOT NULL
);

CREATE TABLE api_keys (
    id           BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    name         TEXT COLLATE "C"    NOT NULL,
    role         TEXT COLLATE "C"    NOT NULL CHECK (role IN ('admin', 'operator', 'viewer')),
    key_hash     BYTEA   NOT NULL UNIQUE,
    hint         TEXT COLLATE "C"    NOT NULL,
    created_by   BIGINT REFERENCES users(id) ON DELETE SET NULL,
    created_at   BIGINT  NOT NULL,
    expires_at   BIGINT  NOT NULL,
    last_used_at BIGINT,
    revoked      BIGINT  NOT NULL DEFAULT 0
);

CREATE TABLE enrollment_tokens (
    id         BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    site_id    BIGINT  NOT NULL REFERENCES sites(id) ON DELETE CASCADE,
    token_hash BYTEA   NOT NULL UNIQUE,
    expires_at BIGINT  NOT NULL,
    used_at    BIGINT,
    created_by BIGINT REFERENCES users(id) ON DELETE SET NULL,
    created_at BIGINT  NOT NULL
);
CREATE TABLE site_credentials (
    id          BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    site_id     BIGINT  NOT NULL REFERENCES sites(id) ON DELETE CASCADE,
    secret_hash BYTEA   NOT NULL UNIQUE,
    created_at  BIGINT  NOT NULL,
    revoked     BIGINT  NOT NULL DEFAULT 0
);

CREATE TABLE path_samples (
    id        BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    path_id   TEXT COLLATE "C"    NOT NULL,
    site_id   BIGINT  NOT NULL REFERENCES sites(id) ON DELETE CASCADE,
    at_s      BIGINT  NOT NULL,
    state     TEXT COLLATE "C"    NOT NULL,
    rtt_ms    DOUBLE PRECISION,
    jitter_ms DOUBLE PRECISION NOT NULL,
    loss_pct  DOUBLE PRECISION NOT NULL
);
CREATE INDEX path_samples_path_at ON path_samples(path_id, at_s);

CREATE TABLE failover_events (
    id        BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    site_id   BIGINT  NOT NULL REFERENCES sites(id) ON DELETE CASCADE,
    seq       BIGINT  NOT NULL,
    at_ms     BIGINT  NOT NULL,
    peer      TEXT COLLATE "C"    NOT NULL,
    from_path TEXT COLLATE "C",
    to_path   TEXT COLLATE "C",
    detail    TEXT COLLATE "C"    NOT NULL,
    reason    TEXT COLLATE "C"    NOT NULL,
    flows     BIGINT  NOT NULL,
    UNIQUE (site_id, seq, at_ms)
);
CREATE INDEX failover_events_at ON failover_events(at_ms);

CREATE TABLE webhooks (
    id          BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    url         TEXT COLLATE "C"    NOT NULL,
    events      TEXT COLLATE "C"    NOT NULL,
    description TEXT COLLATE "C"    NOT NULL DEFAULT '',
    secret      TEXT COLLATE "C"    NOT NULL,
    enabled     BIGINT  NOT NULL DEFAULT 1,
    version     BIGINT  NOT NULL DEFAULT 1,
    created_at  BIGINT  NOT NULL,
    updated_at  BIGINT  NOT NULL
);
CREATE TABLE webhook_deliveries (
    id              BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    webhook_id      BIGINT  NOT NULL REFERENCES webhooks(id) ON DELETE CASCADE,
    event_id        TEXT COLLATE "C"    NOT NULL,
    event           TEXT COLLATE "C"    NOT NULL,
    payload         TEXT COLLATE "C"    NOT NULL,
    status          TEXT COLLATE "C"    NOT NULL CHECK (status IN ('pending', 'delivered', 'failed')),
    attempts        BIGINT  NOT NULL DEFAULT 0,
    next_attempt_ms BIGINT  NOT NULL,
    last_status     BIGINT,
    last_error      TEXT COLLATE "C",
    created_ms      BIGINT  NOT NULL,
    delivered_ms    BIGINT
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries(status, next_attempt_ms);
CREATE INDEX webhook_deliveries_hook ON webhook_deliveries(webhook_id, id);

CREATE TABLE traffic_counters (
    site_id    BIGINT  NOT NULL REFERENCES sites(id) ON DELETE CASCADE,
    key        TEXT COLLATE "C"    NOT NULL,
    started_ms BIGINT  NOT NULL,
    tx_packets BIGINT  NOT NULL,
    tx_bytes   BIGINT  NOT NULL,
    rx_packets BIGINT  NOT NULL,
    rx_bytes   BIGINT  NOT NULL,
    PRIMARY KEY (site_id, key)
);
CREATE TABLE traffic_samples (
    id         BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    site_id    BIGINT  NOT NULL REFERENCES sites(id) ON DELETE CASCADE,
    at_s       BIGINT  NOT NULL,
    path_id    TEXT COLLATE "C",
    class      TEXT COLLATE "C",
    tx_packets BIGINT  NOT NULL,
    tx_bytes   BIGINT  NOT NULL,
    rx_packets BIGINT  NOT NULL,
    rx_bytes   BIGINT  NOT NULL,
    CHECK ((path_id IS NULL) != (class IS NULL))
);
CREATE INDEX traffic_samples_at ON traffic_samples(at_s);
CREATE INDEX traffic_samples_site_at ON traffic_samples(site_id, at_s);

CREATE TABLE path_events (
    id         BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    site_id    BIGINT  NOT NULL REFERENCES sites(id) ON DELETE CASCADE,
    seq        BIGINT  NOT NULL,
    at_ms      BIGINT  NOT NULL,
    path_id    TEXT COLLATE "C",
    kind       TEXT COLLATE "C"    NOT NULL,
    class      TEXT COLLATE "C",
    detail     TEXT COLLATE "C"    NOT NULL,
    received_s BIGINT  NOT NULL,
    UNIQUE (site_id, seq, at_ms)
);
CREATE INDEX path_events_path_at ON path_events(path_id, at_ms);
CREATE INDEX path_events_received ON path_events(received_s);

CREATE TABLE config_generation (
    id         BIGINT PRIMARY KEY CHECK (id = 1),
    generation BIGINT NOT NULL
);
INSERT INTO config_generation (id, generation) VALUES (1, 0);

CREATE TABLE site_prefixes (
    site_id BIGINT  NOT NULL REFERENCES sites(id) ON DELETE CASCADE,
    family  BIGINT  NOT NULL CHECK (family IN (4, 6)),
    lo      BYTEA   NOT NULL,
    hi      BYTEA   NOT NULL,
    prefix  TEXT COLLATE "C"    NOT NULL
);
CREATE INDEX site_prefixes_lo ON site_prefixes(family, lo);
CREATE INDEX site_prefixes_site ON site_prefixes(site_id);
"#,
    ),
    (
        16,
        "presence, rate limits and lockouts in the database, shared by every controller",
        r#"
-- What the controllers over this database know of each site's edge, so that all of them show the
-- same and each announcement (site.online, site.offline) is made once: when the edge was last
-- heard from (unix ms; the controller holding its open request refreshes it every few seconds,
-- and it only moves forward), and whether the site was last announced online.
CREATE TABLE presence (
    site_id   BIGINT PRIMARY KEY REFERENCES sites(id) ON DELETE CASCADE,
    last_seen BIGINT  NOT NULL,
    online    BIGINT  NOT NULL DEFAULT 0 CHECK (online IN (0, 1))
);
CREATE INDEX presence_online ON presence(online, last_seen);
-- Login and token throttling shared by every controller: a token bucket per client address
-- (tokens, refilled from at_ms; taken: whether the last request got one) and failed password
-- checks in a row per account (account: the SHA-256 of the email in lower case, in hex), locked
-- until locked_until_ms.
CREATE TABLE rate_buckets (
    address TEXT COLLATE "C" PRIMARY KEY,
    tokens  DOUBLE PRECISION NOT NULL,
    at_ms   BIGINT  NOT NULL,
    taken   BIGINT  NOT NULL
);
CREATE INDEX rate_buckets_at ON rate_buckets(at_ms);
CREATE TABLE login_failures (
    account         TEXT COLLATE "C" PRIMARY KEY,
    failures        BIGINT  NOT NULL,
    locked_until_ms BIGINT,
    at_ms           BIGINT  NOT NULL
);
CREATE INDEX login_failures_at ON login_failures(at_ms);
"#,
    ),
    (
        17,
        "each link's endpoint as the controller's STUN responder observed it",
        r#"
-- Where a site's link was last seen from by the STUN responder (what NATs made of its address),
-- and since when: given to the peers when the link has no configured endpoint.
ALTER TABLE links ADD COLUMN observed_endpoint TEXT COLLATE "C";
ALTER TABLE links ADD COLUMN observed_since BIGINT;
-- The STUN responder looks up a site's credentials by site.
CREATE INDEX site_credentials_site ON site_credentials(site_id);
"#,
    ),
    (
        18,
        "traffic summed per minute in the counters before it is kept as a sample",
        r#"
-- What a site sent since its traffic was last kept as a sample (traffic_samples), summed over
-- its reports, and since when (unix s; NULL: nothing pending). Kept as one sample a minute per
-- path and class, instead of one per report; reads add what is pending.
ALTER TABLE traffic_counters ADD COLUMN pending_tx_packets BIGINT NOT NULL DEFAULT 0;
ALTER TABLE traffic_counters ADD COLUMN pending_tx_bytes BIGINT NOT NULL DEFAULT 0;
ALTER TABLE traffic_counters ADD COLUMN pending_rx_packets BIGINT NOT NULL DEFAULT 0;
ALTER TABLE traffic_counters ADD COLUMN pending_rx_bytes BIGINT NOT NULL DEFAULT 0;
ALTER TABLE traffic_counters ADD COLUMN pending_since BIGINT;
CREATE INDEX traffic_counters_pending ON traffic_counters(pending_since);
-- The retention sweep finds expired samples by time: without an index, a run of rows stamped
-- by a clock gone ahead would stall a sweep that walks them in id order.
CREATE INDEX path_samples_at ON path_samples(at_s);
"#,
    ),
    (
        19,
        "every announced event, in commit order, for the event stream",
        r#"
-- Every event the controller announces (what webhooks are sent), numbered in commit order
-- (writers take turns), for `GET /api/v1/events/stream` and its resumption (`Last-Event-ID`).
-- Kept as long as webhook deliveries.
CREATE TABLE events (
    id       BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    event_id TEXT COLLATE "C" NOT NULL,
    kind     TEXT COLLATE "C" NOT NULL,
    at_ms    BIGINT NOT NULL,
    payload  TEXT COLLATE "C" NOT NULL
);
CREATE INDEX events_at ON events(at_ms);
"#,
    ),
    (
        20,
        "dashboard sessions",
        r#"
-- A dashboard login (`/ui`): the SHA-256 of its cookie's secret, never the secret; the CSRF
-- token its forms carry; when it was made and last used (unix ms) and when it ends whatever
-- its use. Any controller over the database serves it.
CREATE TABLE ui_sessions (
    token_hash  BYTEA   PRIMARY KEY,
    user_id     BIGINT  NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    csrf        TEXT COLLATE "C" NOT NULL,
    created_ms  BIGINT  NOT NULL,
    seen_ms     BIGINT  NOT NULL,
    expires_ms  BIGINT  NOT NULL
);
CREATE INDEX ui_sessions_user ON ui_sessions(user_id);
CREATE INDEX ui_sessions_expires ON ui_sessions(expires_ms);
"#,
    ),
    (
        21,
        "the version of the patronus each edge runs",
        r#"
-- What the edge's last report said it runs (the version in its User-Agent), for the API's
-- sites and the dashboard.
ALTER TABLE presence ADD COLUMN edge_version TEXT COLLATE "C";
"#,
    ),
];

/// The schema, in order. A migration is never edited once released: a change is a new one.
pub const SQLITE_MIGRATIONS: &[(i64, &str, &str)] = &[
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
    (
        16,
        "presence, rate limits and lockouts in the database, shared by every controller",
        r#"
-- What the controllers over this database know of each site's edge, so that all of them show the
-- same and each announcement (site.online, site.offline) is made once: when the edge was last
-- heard from (unix ms; the controller holding its open request refreshes it every few seconds,
-- and it only moves forward), and whether the site was last announced online.
CREATE TABLE presence (
    site_id   INTEGER PRIMARY KEY REFERENCES sites(id) ON DELETE CASCADE,
    last_seen INTEGER NOT NULL,
    online    INTEGER NOT NULL DEFAULT 0 CHECK (online IN (0, 1))
);
CREATE INDEX presence_online ON presence(online, last_seen);
-- Login and token throttling shared by every controller: a token bucket per client address
-- (tokens, refilled from at_ms; taken: whether the last request got one) and failed password
-- checks in a row per account (account: the SHA-256 of the email in lower case, in hex), locked
-- until locked_until_ms.
CREATE TABLE rate_buckets (
    address TEXT    PRIMARY KEY,
    tokens  REAL    NOT NULL,
    at_ms   INTEGER NOT NULL,
    taken   INTEGER NOT NULL
);
CREATE INDEX rate_buckets_at ON rate_buckets(at_ms);
CREATE TABLE login_failures (
    account         TEXT    PRIMARY KEY,
    failures        INTEGER NOT NULL,
    locked_until_ms INTEGER,
    at_ms           INTEGER NOT NULL
);
CREATE INDEX login_failures_at ON login_failures(at_ms);
"#,
    ),
    (
        17,
        "each link's endpoint as the controller's STUN responder observed it",
        r#"
-- Where a site's link was last seen from by the STUN responder (what NATs made of its address),
-- and since when: given to the peers when the link has no configured endpoint.
ALTER TABLE links ADD COLUMN observed_endpoint TEXT;
ALTER TABLE links ADD COLUMN observed_since INTEGER;
-- The STUN responder looks up a site's credentials by site.
CREATE INDEX site_credentials_site ON site_credentials(site_id);
"#,
    ),
    (
        18,
        "traffic summed per minute in the counters before it is kept as a sample",
        r#"
-- What a site sent since its traffic was last kept as a sample (traffic_samples), summed over
-- its reports, and since when (unix s; NULL: nothing pending). Kept as one sample a minute per
-- path and class, instead of one per report; reads add what is pending.
ALTER TABLE traffic_counters ADD COLUMN pending_tx_packets INTEGER NOT NULL DEFAULT 0;
ALTER TABLE traffic_counters ADD COLUMN pending_tx_bytes INTEGER NOT NULL DEFAULT 0;
ALTER TABLE traffic_counters ADD COLUMN pending_rx_packets INTEGER NOT NULL DEFAULT 0;
ALTER TABLE traffic_counters ADD COLUMN pending_rx_bytes INTEGER NOT NULL DEFAULT 0;
ALTER TABLE traffic_counters ADD COLUMN pending_since INTEGER;
CREATE INDEX traffic_counters_pending ON traffic_counters(pending_since);
-- The retention sweep finds expired samples by time: without an index, a run of rows stamped
-- by a clock gone ahead would stall a sweep that walks them in id order.
CREATE INDEX path_samples_at ON path_samples(at_s);
"#,
    ),
    (
        19,
        "every announced event, in commit order, for the event stream",
        r#"
-- Every event the controller announces (what webhooks are sent), numbered in commit order
-- (writers take turns), for `GET /api/v1/events/stream` and its resumption (`Last-Event-ID`).
-- Kept as long as webhook deliveries.
CREATE TABLE events (
    id       INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id TEXT NOT NULL,
    kind     TEXT NOT NULL,
    at_ms    INTEGER NOT NULL,
    payload  TEXT NOT NULL
);
CREATE INDEX events_at ON events(at_ms);
"#,
    ),
    (
        20,
        "dashboard sessions",
        r#"
-- A dashboard login (`/ui`): the SHA-256 of its cookie's secret, never the secret; the CSRF
-- token its forms carry; when it was made and last used (unix ms) and when it ends whatever
-- its use. Any controller over the database serves it.
CREATE TABLE ui_sessions (
    token_hash  BLOB    PRIMARY KEY,
    user_id     INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    csrf        TEXT NOT NULL,
    created_ms  INTEGER NOT NULL,
    seen_ms     INTEGER NOT NULL,
    expires_ms  INTEGER NOT NULL
);
CREATE INDEX ui_sessions_user ON ui_sessions(user_id);
CREATE INDEX ui_sessions_expires ON ui_sessions(expires_ms);
"#,
    ),
    (
        21,
        "the version of the patronus each edge runs",
        r#"
-- What the edge's last report said it runs (the version in its User-Agent), for the API's
-- sites and the dashboard.
ALTER TABLE presence ADD COLUMN edge_version TEXT;
"#,
    ),
];
