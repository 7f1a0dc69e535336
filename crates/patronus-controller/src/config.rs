//! The controller's configuration: a TOML file, then `PATRONUS_*` environment variables, then
//! command-line flags, each overriding the one before. Every bad key is reported, by name and
//! by where it came from, in one error.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use patronus_api::FieldErrors;

pub use crate::store::Database;
use serde::de::DeserializeOwned;

/// Where the controller keeps its state when nothing says otherwise.
pub const DEFAULT_DATA_DIR: &str = "/var/lib/patronus";

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Address the API listens on (HTTPS, or HTTP with `plain_http`).
    pub listen: SocketAddr,
    /// How the API is served: TLS from the given files, TLS from a self-signed certificate
    /// made on first start (the default), or plain HTTP.
    pub tls: Tls,
    /// The UDP port the STUN responder answers on, at `listen`'s address.
    pub stun_port: StunPort,
    /// Directory for the database and the token signing key (created 0700).
    pub data_dir: PathBuf,
    /// Where the state lives: an SQLite file (a path or `sqlite://<path>`; default
    /// `<data_dir>/controller.db`) or a PostgreSQL database (`postgres://…`).
    pub database: Database,
    /// The access-token signing key (32 random bytes, created 0600 on first start when
    /// missing); default `<data_dir>/jwt.key`.
    pub jwt_key_file: PathBuf,
    pub access_token_ttl: Duration,
    pub refresh_token_ttl: Duration,
    /// Longest time a request may take before it is answered 503.
    pub request_timeout: Duration,
    /// Largest request body accepted (413 above it).
    pub max_body_bytes: usize,
    /// Login and token requests allowed per client address per minute (429 above it).
    pub auth_rate_per_minute: u32,
    /// Failed logins in a row after which an account is locked for a while.
    pub lockout_after_failures: u32,
    /// Connections served at once; more wait in the listen queue. Also held below the
    /// process's open-file limit (see [`crate::server::connection_cap`]).
    pub max_connections: u32,
    /// Connections served at once from one client address (trusted proxies excepted: theirs
    /// count against `max_connections` only).
    pub max_connections_per_address: u32,
    /// How long a client may take to send a request's headers, from their first byte.
    pub header_read_timeout: Duration,
    /// How long a connection may stay open with no request on it.
    pub idle_timeout: Duration,
    /// The most detailed log level written: `error`, `warn`, `info` (the default: writes,
    /// errors, slow requests, security events) or `debug` (every request too).
    pub log_level: tracing::Level,
    /// CA certificates (PEM) trusted for `https://` webhook URLs, beside the Mozilla roots
    /// compiled in: an internal CA, say.
    pub webhook_ca_file: Option<PathBuf>,
    /// Internal networks (loopback, private, link-local...) webhooks may nevertheless post to:
    /// by default none, so a webhook cannot reach the controller's own network.
    pub webhook_allowed_networks: Vec<patronus_api::Prefix>,
    /// Reverse proxies (a TLS terminator in front of the controller) whose `Forwarded` or
    /// `X-Forwarded-For` is believed: a request from one of them counts as coming from the
    /// client it names, for rate limits and the audit log. By default none.
    pub trusted_proxies: Vec<patronus_api::Prefix>,
    /// Where `patronus backup` writes and `patronus restore` reads backups; default
    /// `<data_dir>/backups` (keep them on another disk or machine: see the README).
    pub backup_dir: PathBuf,
    /// The age X25519 recipients (`age1…`) backups are encrypted to. The identities that
    /// decrypt them are kept away from the controller.
    pub backup_recipients: Vec<String>,
    /// Backups `patronus backup prune` keeps per tier (and the controller, after each
    /// scheduled backup).
    pub backup_retention: crate::backup::Retention,
    /// How often the controller takes a backup itself (one controller of several over a
    /// database), then prunes; `None` (0, the default): only when `patronus backup create` is
    /// run.
    pub backup_interval: Option<Duration>,
    /// S3-compatible object storage that backups go to (`s3://BUCKET/PREFIX`) instead of
    /// `backup_dir`, which then only stages each one while it is uploaded. The credentials
    /// come from the environment (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, optionally
    /// `AWS_SESSION_TOKEN`), never from this file.
    pub backup_url: Option<String>,
    /// The object store's endpoint (`https://…`; `http://` only if given so), for MinIO, Ceph
    /// and the like; default AWS's for the region.
    pub backup_s3_endpoint: Option<String>,
    /// The bucket's region; default `us-east-1`.
    pub backup_s3_region: String,
}

/// Where the STUN responder answers (UDP, at `listen`'s address).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StunPort {
    /// The port number the API is served on (the default).
    Api,
    Port(u16),
    /// `stun_port = 0`: no responder.
    Off,
}

/// How the controller serves its API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tls {
    /// HTTPS from `tls_cert_file` (the chain, PEM) and `tls_key_file` (its key, PEM, not
    /// readable by everyone), read again on SIGHUP and when they change.
    Files { cert: PathBuf, key: PathBuf },
    /// HTTPS from a self-signed certificate made on first start in `<data_dir>/tls/` for
    /// loopback, the host name, the listen address and these `tls_names`; clients pin its
    /// fingerprint.
    SelfSigned { names: Vec<String> },
    /// `plain_http = true`: no TLS. Refused beyond loopback unless `trusted_proxies` names the
    /// TLS-terminating proxy in front.
    Plain,
}

impl Default for Config {
    fn default() -> Self {
        Self::with_data_dir(PathBuf::from(DEFAULT_DATA_DIR))
    }
}

impl Config {
    /// The defaults, with the state in `dir`.
    pub fn with_data_dir(dir: PathBuf) -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            tls: Tls::SelfSigned { names: Vec::new() },
            stun_port: StunPort::Api,
            database: Database::Sqlite(dir.join("controller.db")),
            jwt_key_file: dir.join("jwt.key"),
            access_token_ttl: Duration::from_secs(15 * 60),
            refresh_token_ttl: Duration::from_secs(30 * 24 * 3600),
            request_timeout: Duration::from_secs(30),
            max_body_bytes: 1 << 20,
            auth_rate_per_minute: 30,
            lockout_after_failures: 5,
            max_connections: 4096,
            max_connections_per_address: 128,
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            log_level: tracing::Level::INFO,
            webhook_ca_file: None,
            webhook_allowed_networks: Vec::new(),
            trusted_proxies: Vec::new(),
            backup_dir: dir.join("backups"),
            backup_recipients: Vec::new(),
            backup_retention: crate::backup::Retention::default(),
            backup_interval: None,
            backup_url: None,
            backup_s3_endpoint: None,
            backup_s3_region: "us-east-1".into(),
            data_dir: dir,
        }
    }
}

/// The keys a configuration file may hold, each also `PATRONUS_<KEY>` in the environment.
pub const KEYS: &[&str] = &[
    "listen",
    "tls_cert_file",
    "tls_key_file",
    "tls_names",
    "plain_http",
    "stun_port",
    "data_dir",
    "database",
    "jwt_key_file",
    "access_token_ttl_s",
    "refresh_token_ttl_s",
    "request_timeout_s",
    "max_body_bytes",
    "auth_rate_per_minute",
    "lockout_after_failures",
    "max_connections",
    "max_connections_per_address",
    "header_read_timeout_s",
    "idle_timeout_s",
    "log_level",
    "webhook_ca_file",
    "webhook_allowed_networks",
    "trusted_proxies",
    "backup_dir",
    "backup_recipients",
    "backup_keep_hourly",
    "backup_keep_daily",
    "backup_keep_weekly",
    "backup_keep_monthly",
    "backup_interval_s",
    "backup_url",
    "backup_s3_endpoint",
    "backup_s3_region",
];

/// Values given on the command line; `None` leaves the file's or the environment's.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub listen: Option<SocketAddr>,
    pub data_dir: Option<PathBuf>,
    pub database: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{path}: {error}")]
    Parse { path: PathBuf, error: String },
    #[error("configuration: {0}")]
    Invalid(FieldErrors),
}

/// One key's value and where it came from, for messages.
struct Source {
    value: toml::Value,
    from: String,
}

impl Config {
    /// Loads `file` (if given), then the environment (`env`, normally `std::env::vars()`),
    /// then `flags`.
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
        flags: &Overrides,
    ) -> Result<Self, ConfigError> {
        let mut errors = FieldErrors::default();
        let mut values: Vec<(String, Source)> = Vec::new();
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
                path: path.to_owned(),
                error,
            })?;
            let table: toml::Table = toml::from_str(&text).map_err(|e| ConfigError::Parse {
                path: path.to_owned(),
                error: e.to_string(),
            })?;
            // A `[backup]` or `[tls]` table holds the backup_* or tls_* keys without their
            // prefix (`[backup] interval_s = 3600` is `backup_interval_s = 3600`).
            let mut flat = Vec::new();
            for (k, v) in table {
                match (k.as_str(), v) {
                    (t @ ("backup" | "tls"), toml::Value::Table(inner)) => {
                        for (bk, bv) in inner {
                            flat.push((format!("{t}_{bk}"), format!("{t}.{bk}"), bv));
                        }
                    }
                    (_, v) => flat.push((k.clone(), k, v)),
                }
            }
            for (k, shown, v) in flat {
                if values.iter().any(|(have, _)| *have == k) {
                    errors.push(
                        format!("{shown} ({})", path.display()),
                        "given twice (at the top and in its table)",
                    );
                } else if KEYS.contains(&k.as_str()) {
                    let from = format!("{} ({})", shown, path.display());
                    values.push((k, Source { value: v, from }));
                } else {
                    errors.push(
                        format!("{shown} ({})", path.display()),
                        format!("unknown key; known keys are {}", KEYS.join(", ")),
                    );
                }
            }
        }
        for (name, raw) in env {
            let Some(key) = name.strip_prefix("PATRONUS_") else {
                continue;
            };
            let key = key.to_ascii_lowercase();
            if !KEYS.contains(&key.as_str()) {
                // Other PATRONUS_ variables belong to other parts (the first admin, the lab).
                continue;
            }
            // Numbers are numbers; anything else is a string for its type to parse.
            let value = raw
                .parse::<i64>()
                .map(toml::Value::Integer)
                .or_else(|_| raw.parse::<bool>().map(toml::Value::Boolean))
                .unwrap_or_else(|_| toml::Value::String(raw.clone()));
            values.retain(|(k, _)| *k != key);
            values.push((key, Source { value, from: name }));
        }

        let data_dir = flags
            .data_dir
            .clone()
            .or_else(|| take::<PathBuf>(&values, "data_dir", &mut errors));
        let mut c = Config::with_data_dir(data_dir.unwrap_or_else(|| DEFAULT_DATA_DIR.into()));
        if let Some(v) = take(&values, "listen", &mut errors) {
            c.listen = v;
        }
        if let Some(v) = take::<String>(&values, "database", &mut errors) {
            match Database::parse(&v) {
                Ok(d) => c.database = d,
                Err(e) => errors.push(source_of(&values, "database"), e),
            }
        }
        if let Some(v) = take(&values, "webhook_ca_file", &mut errors) {
            c.webhook_ca_file = Some(v);
        }
        if let Some(v) = networks(&values, "webhook_allowed_networks", &mut errors) {
            c.webhook_allowed_networks = v;
        }
        if let Some(v) = networks(&values, "trusted_proxies", &mut errors) {
            c.trusted_proxies = v;
        }
        if let Some(v) = take(&values, "jwt_key_file", &mut errors) {
            c.jwt_key_file = v;
        }
        let secs = |key: &str, min: u64, max: u64, errors: &mut FieldErrors| {
            let v: u64 = take(&values, key, errors)?;
            if (min..=max).contains(&v) {
                Some(Duration::from_secs(v))
            } else {
                let from = &values.iter().find(|(k, _)| k == key)?.1.from;
                errors.push(
                    from.clone(),
                    format!("must be between {min} and {max} seconds"),
                );
                None
            }
        };
        if let Some(v) = secs("access_token_ttl_s", 60, 24 * 3600, &mut errors) {
            c.access_token_ttl = v;
        }
        if let Some(v) = secs("refresh_token_ttl_s", 3600, 365 * 24 * 3600, &mut errors) {
            c.refresh_token_ttl = v;
        }
        if let Some(v) = secs("request_timeout_s", 1, 600, &mut errors) {
            c.request_timeout = v;
        }
        if let Some(v) = take::<String>(&values, "log_level", &mut errors) {
            match v.to_ascii_lowercase().as_str() {
                "error" => c.log_level = tracing::Level::ERROR,
                "warn" => c.log_level = tracing::Level::WARN,
                "info" => c.log_level = tracing::Level::INFO,
                "debug" => c.log_level = tracing::Level::DEBUG,
                "trace" => c.log_level = tracing::Level::TRACE,
                _ => errors.push(
                    source_of(&values, "log_level"),
                    "must be error, warn, info, debug or trace",
                ),
            }
        }
        if let Some(v) = secs("header_read_timeout_s", 1, 300, &mut errors) {
            c.header_read_timeout = v;
        }
        if let Some(v) = secs("idle_timeout_s", 1, 3600, &mut errors) {
            c.idle_timeout = v;
        }
        for (key, min, max) in [
            ("max_connections", 16, 1_000_000),
            ("max_connections_per_address", 1, 1_000_000),
        ] {
            if let Some(v) = take::<u32>(&values, key, &mut errors) {
                if !(min..=max).contains(&v) {
                    errors.push(
                        source_of(&values, key),
                        format!("must be between {min} and {max}"),
                    );
                } else if key == "max_connections" {
                    c.max_connections = v;
                } else {
                    c.max_connections_per_address = v;
                }
            }
        }
        if let Some(v) = take::<usize>(&values, "max_body_bytes", &mut errors) {
            if v < 1024 {
                errors.push(
                    source_of(&values, "max_body_bytes"),
                    "must be at least 1024",
                );
            } else {
                c.max_body_bytes = v;
            }
        }
        if let Some(v) = take::<u32>(&values, "auth_rate_per_minute", &mut errors) {
            if v == 0 {
                errors.push(
                    source_of(&values, "auth_rate_per_minute"),
                    "must be at least 1",
                );
            } else {
                c.auth_rate_per_minute = v;
            }
        }
        if let Some(v) = take::<u32>(&values, "lockout_after_failures", &mut errors) {
            if v == 0 {
                errors.push(
                    source_of(&values, "lockout_after_failures"),
                    "must be at least 1",
                );
            } else {
                c.lockout_after_failures = v;
            }
        }
        if let Some(v) = take(&values, "backup_dir", &mut errors) {
            c.backup_dir = v;
        }
        if let Some(v) = list(
            &values,
            "backup_recipients",
            "age recipients such as \"age1…\"",
            &mut errors,
        ) {
            for (i, r) in v.iter().enumerate() {
                if crate::backup::recipients(std::slice::from_ref(r)).is_err() {
                    let what = if crate::backup::looks_secret(r) {
                        "an age identity (a secret key: keep it off the controller)".to_owned()
                    } else {
                        format!("{r:?}")
                    };
                    errors.push(
                        format!("{}[{i}]", source_of(&values, "backup_recipients")),
                        format!("{what} is not an age X25519 recipient (age1…)"),
                    );
                }
            }
            c.backup_recipients = v;
        }
        for (key, slot) in [
            ("backup_keep_hourly", &mut c.backup_retention.hourly),
            ("backup_keep_daily", &mut c.backup_retention.daily),
            ("backup_keep_weekly", &mut c.backup_retention.weekly),
            ("backup_keep_monthly", &mut c.backup_retention.monthly),
        ] {
            if let Some(v) = take::<usize>(&values, key, &mut errors) {
                if v > 10_000 {
                    errors.push(source_of(&values, key), "must be at most 10000");
                } else {
                    *slot = v;
                }
            }
        }
        if let Some(v) = take::<u64>(&values, "backup_interval_s", &mut errors) {
            if v == 0 {
                c.backup_interval = None;
            } else if !(60..=31 * 24 * 3600).contains(&v) {
                errors.push(
                    source_of(&values, "backup_interval_s"),
                    "must be 0 (no scheduled backups) or between 60 and 2678400 seconds",
                );
            } else if c.backup_recipients.is_empty() {
                errors.push(
                    source_of(&values, "backup_interval_s"),
                    "scheduled backups need backup_recipients (the age recipients they are \
                     encrypted to)",
                );
            } else {
                c.backup_interval = Some(Duration::from_secs(v));
            }
        }
        if let Some(v) = take::<String>(&values, "backup_url", &mut errors) {
            match crate::backup::object::parse_url(&v) {
                Ok(_) => c.backup_url = Some(v),
                Err(e) => errors.push(source_of(&values, "backup_url"), e),
            }
        }
        if let Some(v) = take::<String>(&values, "backup_s3_endpoint", &mut errors) {
            if v.starts_with("https://") || v.starts_with("http://") {
                c.backup_s3_endpoint = Some(v);
            } else {
                errors.push(
                    source_of(&values, "backup_s3_endpoint"),
                    "must be an https:// (or http://) URL",
                );
            }
        }
        if let Some(v) = take::<String>(&values, "backup_s3_region", &mut errors) {
            c.backup_s3_region = v;
        }
        if let Some(v) = flags.listen {
            c.listen = v;
        }
        match take::<u16>(&values, "stun_port", &mut errors) {
            Some(0) => c.stun_port = StunPort::Off,
            Some(p) => c.stun_port = StunPort::Port(p),
            None => {}
        }
        c.tls = tls(&values, &c, &mut errors);
        if let Some(v) = &flags.database {
            match Database::parse(v) {
                Ok(d) => c.database = d,
                Err(e) => errors.push("--database", e),
            }
        }
        errors.into_result().map_err(ConfigError::Invalid)?;
        Ok(c)
    }
}

/// The `tls_*` and `plain_http` keys, checked against each other and against where the
/// controller listens.
fn tls(values: &[(String, Source)], c: &Config, errors: &mut FieldErrors) -> Tls {
    let cert: Option<PathBuf> = take(values, "tls_cert_file", errors);
    let key: Option<PathBuf> = take(values, "tls_key_file", errors);
    let names = list(values, "tls_names", "host names or addresses", errors);
    let plain = take::<bool>(values, "plain_http", errors).unwrap_or(false);
    let given = |k: &str| values.iter().any(|(have, _)| have == k);
    if plain {
        for k in ["tls_cert_file", "tls_key_file", "tls_names"] {
            if given(k) {
                errors.push(
                    source_of(values, k),
                    "plain_http = true serves no TLS: remove one of the two",
                );
            }
        }
        if !c.listen.ip().is_loopback() && c.trusted_proxies.is_empty() {
            errors.push(
                source_of(values, "plain_http"),
                format!(
                    "plain HTTP on {} would carry passwords and tokens unencrypted beyond this \
                     machine: serve TLS (remove plain_http), listen on loopback, or name the \
                     TLS-terminating proxy in front in trusted_proxies",
                    c.listen
                ),
            );
        }
        return Tls::Plain;
    }
    match (cert, key) {
        (Some(cert), Some(key)) => {
            if given("tls_names") {
                errors.push(
                    source_of(values, "tls_names"),
                    "names only the self-signed certificate; with tls_cert_file the \
                     certificate's own names count",
                );
            }
            Tls::Files { cert, key }
        }
        (None, None) => Tls::SelfSigned {
            names: names.unwrap_or_default(),
        },
        (Some(_), None) => {
            errors.push(
                source_of(values, "tls_cert_file"),
                "needs tls_key_file (the certificate's private key) too",
            );
            Tls::Plain
        }
        (None, Some(_)) => {
            errors.push(
                source_of(values, "tls_key_file"),
                "needs tls_cert_file (the certificate chain) too",
            );
            Tls::Plain
        }
    }
}

fn source_of(values: &[(String, Source)], key: &str) -> String {
    values
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, s)| s.from.clone())
        .unwrap_or_else(|| key.to_owned())
}

/// The networks `key` lists: an array of `address/length` strings in a file, a
/// comma-separated string in the environment. Each bad one is named with its index.
/// The strings `key` lists: an array in a file, or a comma-separated string (the
/// environment's form).
fn list(
    values: &[(String, Source)],
    key: &str,
    what: &str,
    errors: &mut FieldErrors,
) -> Option<Vec<String>> {
    let (_, s) = values.iter().find(|(k, _)| k == key)?;
    match &s.value {
        toml::Value::String(v) => Some(
            v.split(',')
                .map(str::trim)
                .filter(|x| !x.is_empty())
                .map(str::to_owned)
                .collect(),
        ),
        other => match other.clone().try_into() {
            Ok(v) => Some(v),
            Err(e) => {
                errors.push(s.from.clone(), format!("must be a list of {what}: {e}"));
                None
            }
        },
    }
}

fn networks(
    values: &[(String, Source)],
    key: &str,
    errors: &mut FieldErrors,
) -> Option<Vec<patronus_api::Prefix>> {
    let s = &values.iter().find(|(k, _)| k == key)?.1;
    let items = list(values, key, "networks such as \"10.0.0.0/8\"", errors)?;
    let mut out = Vec::new();
    for (i, item) in items.iter().enumerate() {
        match item.parse::<patronus_api::Prefix>() {
            Ok(p) => out.push(p),
            Err(e) => errors.push(
                format!("{}[{i}]", s.from),
                format!("{item:?} is not a network (address/length): {e}"),
            ),
        }
    }
    Some(out)
}

/// The value of `key` as a `T`, or an error naming where it came from.
fn take<T: DeserializeOwned>(
    values: &[(String, Source)],
    key: &str,
    errors: &mut FieldErrors,
) -> Option<T> {
    let (_, s) = values.iter().find(|(k, _)| k == key)?;
    match s.value.clone().try_into::<T>() {
        Ok(v) => Some(v),
        Err(e) => {
            errors.push(s.from.clone(), e.to_string().trim().to_owned());
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn the_commented_example_file_parses() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("controller.toml");
        std::fs::write(&path, include_str!("../controller.example.toml")).unwrap();
        let c = Config::load(Some(&path), [], &Overrides::default()).unwrap();
        assert_eq!(c.listen, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(
            c.database,
            Database::Sqlite(PathBuf::from("/var/lib/patronus/controller.db"))
        );
        assert_eq!(c.access_token_ttl, Duration::from_secs(900));
    }

    #[test]
    fn flags_override_the_environment_which_overrides_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            "listen = \"127.0.0.1:1000\"\ndata_dir = \"/srv/a\"\nrequest_timeout_s = 5\n",
        )
        .unwrap();
        let c = Config::load(
            Some(&path),
            env(&[
                ("PATRONUS_LISTEN", "127.0.0.1:2000"),
                ("PATRONUS_REQUEST_TIMEOUT_S", "7"),
                ("PATRONUS_ADMIN_EMAIL", "not a config key"),
                ("HOME", "/root"),
            ]),
            &Overrides {
                listen: Some("127.0.0.1:3000".parse().unwrap()),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(c.listen, "127.0.0.1:3000".parse().unwrap());
        assert_eq!(c.request_timeout, Duration::from_secs(7));
        assert_eq!(
            c.database,
            Database::Sqlite(PathBuf::from("/srv/a/controller.db"))
        );
    }

    #[test]
    fn every_bad_key_is_named_with_where_it_came_from() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            "listne = \"x\"\naccess_token_ttl_s = 5\nmax_body_bytes = \"lots\"\n",
        )
        .unwrap();
        let e = Config::load(
            Some(&path),
            env(&[("PATRONUS_LISTEN", "localhost")]),
            &Overrides::default(),
        )
        .unwrap_err()
        .to_string();
        for want in [
            "listne",
            "unknown key",
            "access_token_ttl_s",
            "between 60 and 86400",
            "max_body_bytes",
            "PATRONUS_LISTEN",
        ] {
            assert!(e.contains(want), "{want} in {e}");
        }
    }

    #[test]
    fn a_backup_table_holds_the_backup_keys_and_a_bad_one_is_named_there() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        let (_, recipient) = crate::backup::keygen();
        std::fs::write(
            &path,
            format!(
                "[backup]\ninterval_s = 3600\nrecipients = [\"{recipient}\"]\n\
                 url = \"s3://patronus-backups/prod\"\ns3_endpoint = \"http://127.0.0.1:9000\"\n\
                 keep_daily = 14\n"
            ),
        )
        .unwrap();
        let c = Config::load(Some(&path), [], &Overrides::default()).unwrap();
        assert_eq!(c.backup_interval, Some(Duration::from_secs(3600)));
        assert_eq!(c.backup_url.as_deref(), Some("s3://patronus-backups/prod"));
        assert_eq!(c.backup_retention.daily, 14);
        std::fs::write(
            &path,
            "backup_interval_s = 60\n[backup]\ninterval_s = 60\nurl = \"https://x\"\nkeep = 1\n",
        )
        .unwrap();
        let e = Config::load(Some(&path), [], &Overrides::default())
            .unwrap_err()
            .to_string();
        for want in [
            "backup.interval_s",
            "given twice",
            "backup.url",
            "s3://",
            "backup.keep",
        ] {
            assert!(e.contains(want), "{want} in {e}");
        }
    }

    #[test]
    fn the_database_is_a_path_an_sqlite_url_or_a_postgres_url_and_a_bad_one_is_named() {
        let load = |v: &str| {
            Config::load(
                None,
                env(&[("PATRONUS_DATABASE", v)]),
                &Overrides::default(),
            )
            .map(|c| c.database)
            .map_err(|e| e.to_string())
        };
        assert_eq!(
            load("/srv/c.db").unwrap(),
            Database::Sqlite("/srv/c.db".into())
        );
        assert_eq!(
            load("sqlite:///srv/c.db").unwrap(),
            Database::Sqlite("/srv/c.db".into())
        );
        let pg = load("postgres://patronus:s3cret@db.example.net:5433/patronus").unwrap();
        assert_eq!(
            pg,
            Database::Postgres("postgres://patronus:s3cret@db.example.net:5433/patronus".into())
        );
        // Printed (logs, errors, Debug) without its password.
        assert_eq!(
            format!("{pg:?}"),
            "postgres://patronus:***@db.example.net:5433/patronus"
        );
        // A password in the query is hidden too, however its key is written.
        let q = load("postgres://patronus@db/x?sslmode=prefer&pass%77ord=s3cret").unwrap();
        assert_eq!(
            format!("{q:?}"),
            "postgres://patronus@db/x?sslmode=prefer&pass%77ord=***"
        );
        for (bad, why) in [
            (
                "postgres://patronus:s3cret@db:notaport/x",
                "not a valid PostgreSQL URL",
            ),
            // sqlx would log an unknown parameter with its value: refused by name.
            (
                "postgres://patronus@db/x?pasword=s3cret",
                "unknown parameter(s) in the PostgreSQL URL: pasword",
            ),
            ("mysql://db/x", "unknown database scheme `mysql://`"),
            ("sqlite://", "needs a file path"),
            ("", "empty"),
        ] {
            let e = load(bad).unwrap_err();
            assert!(e.contains("PATRONUS_DATABASE"), "{e}");
            assert!(e.contains(why), "{bad}: {e}");
            assert!(!e.contains("s3cret"), "{e}");
        }
    }
}
