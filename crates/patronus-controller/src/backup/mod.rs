//! Backups of the controller's state (`patronus backup`, `patronus restore`).
//!
//! A backup is the store's portable dump ([`crate::store::dump`]: every table, from one
//! snapshot, on either backend) encrypted with [age](https://age-encryption.org/v1) to the
//! X25519 recipients of the configuration (`age1…`; the identity that decrypts is kept away
//! from the controller, and only `verify` and `restore` need it), so the standard `age -d`
//! reads it too. Beside each `NAME.age` lies `NAME.json`, its manifest: the schema version,
//! the rows of each table, the SHA-256 of the plaintext and of the ciphertext, and the
//! recipients. The ciphertext is written to a temporary name, synced and renamed, and the
//! manifest after it: a backup listed is a backup whole.
//!
//! Retention is tiered ([`Retention`]): the newest backup of each of the last `hourly` hours,
//! `daily` days, `weekly` weeks and `monthly` months (UTC) that have one is kept, and the
//! newest of all; `prune` deletes the rest.

use std::io::{BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Mutex};

use sha2::{Digest, Sha256};

use crate::store::dump::{self, DumpError, Summary};
use crate::store::{Actor, Store};

pub mod object;
pub use object::Destination;

/// The manifest's format name and version.
pub const FORMAT: &str = "patronus-backup";
pub const VERSION: i64 = 1;

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{0}")]
    Dump(#[from] DumpError),
    #[error("recipient {0:?} is not an age X25519 recipient (age1…)")]
    Recipient(String),
    #[error("no recipients: give the age recipients (age1…) a backup is encrypted to")]
    NoRecipients,
    #[error("{path}: no age identity (AGE-SECRET-KEY-1…) in it")]
    NoIdentity { path: PathBuf },
    #[error("encrypting: {0}")]
    Encrypt(String),
    #[error(
        "{name}: the identity does not decrypt this backup (it was made for {recipients:?}): \
         give the identity of one of them"
    )]
    WrongIdentity {
        name: String,
        recipients: Vec<String>,
    },
    #[error("{name}: {message}")]
    Corrupt { name: String, message: String },
    #[error("{path}: not a backup manifest: {message}")]
    Manifest { path: PathBuf, message: String },
    #[error("not found: {0}")]
    NotFound(String),
    #[error("{0}")]
    Scratch(String),
    #[error("{what}: {message}")]
    Conflict { what: String, message: String },
    #[error("{url}: {message}")]
    Remote { url: String, message: String },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> BackupError + '_ {
    move |error| BackupError::Io {
        path: path.to_owned(),
        error,
    }
}

/// What lies beside each backup (`NAME.json`).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Manifest {
    pub format: String,
    pub version: i64,
    pub name: String,
    pub created_ms: i64,
    pub schema_version: i64,
    /// The backend it was taken from.
    pub backend: String,
    /// Rows per table.
    pub rows: Vec<(String, i64)>,
    pub plaintext_sha256: String,
    pub plaintext_bytes: u64,
    pub ciphertext_sha256: String,
    pub ciphertext_bytes: u64,
    /// The age recipients it is encrypted to.
    pub recipients: Vec<String>,
    /// How long the dump and encryption took (ms).
    pub took_ms: u64,
}

/// Parses age X25519 recipients (`age1…`).
pub fn recipients(list: &[String]) -> Result<Vec<age::x25519::Recipient>, BackupError> {
    if list.is_empty() {
        return Err(BackupError::NoRecipients);
    }
    list.iter()
        .map(|r| {
            age::x25519::Recipient::from_str(r.trim()).map_err(|_| {
                BackupError::Recipient(if looks_secret(r) {
                    "an age identity (a secret key: keep it off the controller)".into()
                } else {
                    r.clone()
                })
            })
        })
        .collect()
}

/// Whether `s` looks like an age identity (which must never be echoed).
pub fn looks_secret(s: &str) -> bool {
    s.trim().to_ascii_uppercase().starts_with("AGE-SECRET-KEY-")
}

/// Reads the age identities (`AGE-SECRET-KEY-1…`, one per line; `#` comments, as
/// `age-keygen` writes them) of the file at `path`.
pub fn identities(path: &Path) -> Result<Vec<age::x25519::Identity>, BackupError> {
    let text = std::fs::read_to_string(path).map_err(io(path))?;
    let ids: Vec<_> = text
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("AGE-SECRET-KEY-1"))
        .filter_map(|l| age::x25519::Identity::from_str(l).ok())
        .collect();
    if ids.is_empty() {
        return Err(BackupError::NoIdentity {
            path: path.to_owned(),
        });
    }
    Ok(ids)
}

/// A new identity, as `age-keygen` writes it, and its recipient.
pub fn keygen() -> (String, String) {
    use age::secrecy::ExposeSecret;
    let id = age::x25519::Identity::generate();
    let recipient = id.to_public().to_string();
    let secret = id.to_string();
    (
        format!(
            "# created: by patronus backup keygen\n# public key: {recipient}\n{}\n",
            secret.expose_secret()
        ),
        recipient,
    )
}

/// Counts and hashes what passes through.
struct Hashing<T> {
    inner: T,
    hash: Arc<Mutex<(Sha256, u64)>>,
}

impl<T> Hashing<T> {
    fn new(inner: T) -> Self {
        Self {
            inner,
            hash: Arc::new(Mutex::new((Sha256::new(), 0))),
        }
    }
}

fn digest(h: &Mutex<(Sha256, u64)>) -> (String, u64) {
    let h = h.lock().unwrap_or_else(|e| e.into_inner());
    (crate::auth::hex(&h.0.clone().finalize()), h.1)
}

impl<T: Write> Write for Hashing<T> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        let mut h = self.hash.lock().unwrap_or_else(|e| e.into_inner());
        h.0.update(&buf[..n]);
        h.1 += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

impl<T: Read> Read for Hashing<T> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        let mut h = self.hash.lock().unwrap_or_else(|e| e.into_inner());
        h.0.update(&buf[..n]);
        h.1 += n as u64;
        Ok(n)
    }
}

/// A backup's name: `patronus-YYYYMMDDTHHMMSS.mmmZ` of its time (UTC), which sorts as time.
pub fn name_of(created_ms: i64) -> String {
    let (secs, ms) = (created_ms.div_euclid(1000), created_ms.rem_euclid(1000));
    let (days, s) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, d) = civil(days);
    format!(
        "patronus-{y:04}{m:02}{d:02}T{:02}{:02}{:02}.{ms:03}Z",
        s / 3600,
        s / 60 % 60,
        s % 60
    )
}

/// The civil date (proleptic Gregorian, UTC) of a day counted from 1970-01-01.
pub fn civil(days: i64) -> (i64, u32, u32) {
    // Howard Hinnant's days-to-civil.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), BackupError> {
    let tmp = path.with_extension("partial");
    let mut f = private_file(&tmp)?;
    f.write_all(bytes).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}

/// A new file only its owner reads (a backup is encrypted, but what is in a directory of them
/// is nobody else's business either).
fn private_file(path: &Path) -> Result<std::fs::File, BackupError> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(io(path))
}

/// Makes a new directory under `parent` named `prefix-<random>`, readable by this user only;
/// fails rather than take one that exists (a shared temporary directory: another user could
/// have made it, or put a link in it).
fn fresh_private_dir(parent: &Path, prefix: &str) -> Result<PathBuf, BackupError> {
    use std::os::unix::fs::DirBuilderExt;
    let mut random = [0u8; 8];
    getrandom::getrandom(&mut random)
        .map_err(|e| BackupError::Scratch(format!("random bytes: {e}")))?;
    let name: String = random.iter().map(|b| format!("{b:02x}")).collect();
    let path = parent.join(format!("{prefix}-{name}"));
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&path)
        .map_err(io(&path))?;
    Ok(path)
}

/// Makes directory `path` (and its parents) if missing, readable by this user only.
fn private_dir(path: &Path) -> Result<(), BackupError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .map_err(io(path))
}

/// Takes a backup of `store` into directory `dir` (made 0700 if missing), encrypted to
/// `recipients`; returns its manifest. The store keeps serving meanwhile.
pub async fn create(
    store: &Store,
    dir: &Path,
    recipients: &[age::x25519::Recipient],
) -> Result<Manifest, BackupError> {
    if recipients.is_empty() {
        return Err(BackupError::NoRecipients);
    }
    private_dir(dir)?;
    let started = std::time::Instant::now();
    let tmp = dir.join(format!(
        ".creating-{}-{}.age",
        std::process::id(),
        crate::store::now_ms()
    ));
    let written = write_backup(store, dir, &tmp, recipients, started).await;
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

async fn write_backup(
    store: &Store,
    dir: &Path,
    tmp: &Path,
    recipients: &[age::x25519::Recipient],
    started: std::time::Instant,
) -> Result<Manifest, BackupError> {
    let tmp = tmp.to_path_buf();
    let file = private_file(&tmp)?;
    let cipher = Hashing::new(std::io::BufWriter::with_capacity(1 << 16, file));
    let cipher_hash = cipher.hash.clone();
    let encryptor =
        age::Encryptor::with_recipients(recipients.iter().map(|r| r as &dyn age::Recipient))
            .map_err(|e| BackupError::Encrypt(e.to_string()))?;
    let stream = encryptor.wrap_output(cipher).map_err(io(&tmp))?;
    let mut plain = Hashing::new(std::io::BufWriter::with_capacity(1 << 16, stream));
    let plain_hash = plain.hash.clone();
    let summary = dump::dump(store, &mut plain).await?;
    let stream = plain.inner.into_inner().map_err(|e| BackupError::Io {
        path: tmp.clone(),
        error: e.into_error(),
    })?;
    let cipher = stream.finish().map_err(io(&tmp))?;
    let file = cipher.inner.into_inner().map_err(|e| BackupError::Io {
        path: tmp.clone(),
        error: e.into_error(),
    })?;
    file.sync_all().map_err(io(&tmp))?;
    let name = name_of(summary.created_ms);
    let path = dir.join(format!("{name}.age"));
    std::fs::rename(&tmp, &path).map_err(io(&path))?;
    // The backup's name is durable before its manifest is written.
    sync_dir(dir);
    let (plaintext_sha256, plaintext_bytes) = digest(&plain_hash);
    let (ciphertext_sha256, ciphertext_bytes) = digest(&cipher_hash);
    let manifest = Manifest {
        format: FORMAT.into(),
        version: VERSION,
        name: name.clone(),
        created_ms: summary.created_ms,
        schema_version: summary.schema_version,
        backend: summary.backend,
        rows: summary.rows,
        plaintext_sha256,
        plaintext_bytes,
        ciphertext_sha256,
        ciphertext_bytes,
        recipients: recipients.iter().map(ToString::to_string).collect(),
        took_ms: started.elapsed().as_millis() as u64,
    };
    let json = serde_json::to_vec_pretty(&manifest).map_err(|e| BackupError::Manifest {
        path: dir.join(format!("{name}.json")),
        message: e.to_string(),
    })?;
    write_atomically(&dir.join(format!("{name}.json")), &json)?;
    sync_dir(dir);
    Ok(manifest)
}

/// Makes the renames in `dir` durable (best effort: not every filesystem syncs directories).
fn sync_dir(dir: &Path) {
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

/// Every backup in `dir` (those with a manifest), oldest first.
pub fn list(dir: &Path) -> Result<Vec<Manifest>, BackupError> {
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(io(dir)(e)),
    };
    for e in entries {
        let path = e.map_err(io(dir))?.path();
        let is_manifest = path.extension().is_some_and(|x| x == "json")
            && path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("patronus-"));
        if is_manifest {
            // One unreadable manifest (or one whose name is not its file's) neither stops the
            // others from being listed nor gets anything deleted: it is left alone, and said.
            match read_manifest(&path) {
                Ok(m) => out.push(m),
                Err(e) => tracing::warn!(error = %e, "not a backup; left alone"),
            }
        }
    }
    out.sort_by(|a, b| a.created_ms.cmp(&b.created_ms).then(a.name.cmp(&b.name)));
    Ok(out)
}

fn read_manifest(path: &Path) -> Result<Manifest, BackupError> {
    let bytes = std::fs::read(path).map_err(io(path))?;
    parse_manifest(&bytes, path)
}

/// Manifest `bytes`, read from file `path` (whose stem must be the backup's name).
fn parse_manifest(bytes: &[u8], path: &Path) -> Result<Manifest, BackupError> {
    let m: Manifest = serde_json::from_slice(bytes).map_err(|e| BackupError::Manifest {
        path: path.to_owned(),
        message: e.to_string(),
    })?;
    if m.format != FORMAT || m.version != VERSION {
        return Err(BackupError::Manifest {
            path: path.to_owned(),
            message: format!("format {} version {}", m.format, m.version),
        });
    }
    let stem = path
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or_default();
    if m.name != stem {
        return Err(BackupError::Manifest {
            path: path.to_owned(),
            message: format!("it names backup {:?}, not {stem:?}", m.name),
        });
    }
    Ok(m)
}

/// The backup to restore: `name` if given, else the newest taken at or before `before_ms`
/// if given, else the newest.
pub fn pick(
    dir: &Path,
    name: Option<&str>,
    before_ms: Option<i64>,
) -> Result<Manifest, BackupError> {
    choose(list(dir)?, name, before_ms, &dir.display().to_string())
}

/// [`pick`] from `all` (oldest first), found in `place`.
fn choose(
    all: Vec<Manifest>,
    name: Option<&str>,
    before_ms: Option<i64>,
    place: &str,
) -> Result<Manifest, BackupError> {
    let found = match (name, before_ms) {
        (Some(n), _) => all
            .into_iter()
            .find(|m| m.name == n.trim_end_matches(".age")),
        (None, Some(t)) => all.into_iter().rev().find(|m| m.created_ms <= t),
        (None, None) => all.into_iter().next_back(),
    };
    found.ok_or_else(|| {
        BackupError::NotFound(match (name, before_ms) {
            (Some(n), _) => format!("backup {n} in {place}"),
            (None, Some(t)) => format!("a backup taken at or before {} in {place}", name_of(t)),
            (None, None) => format!("a backup in {place}"),
        })
    })
}

/// Checks the ciphertext against the manifest (its size and SHA-256), before anything is
/// decrypted.
fn check_ciphertext(dir: &Path, m: &Manifest) -> Result<PathBuf, BackupError> {
    let path = dir.join(format!("{}.age", m.name));
    let mut f = std::fs::File::open(&path).map_err(io(&path))?;
    let mut h = Hashing::new(std::io::sink());
    std::io::copy(&mut f, &mut h).map_err(io(&path))?;
    let (sha, bytes) = digest(&h.hash);
    if sha != m.ciphertext_sha256 || bytes != m.ciphertext_bytes {
        return Err(BackupError::Corrupt {
            name: m.name.clone(),
            message: format!(
                "the file is not what was written ({bytes} bytes, SHA-256 {sha}; the manifest \
                 says {} bytes, {}): it was changed or damaged; restore another backup",
                m.ciphertext_bytes, m.ciphertext_sha256
            ),
        });
    }
    Ok(path)
}

/// Opens backup `m` for reading its plaintext with `ids`; the hash of what is read is
/// compared with the manifest by the returned check once everything is read.
#[allow(clippy::type_complexity)]
fn open(
    dir: &Path,
    m: &Manifest,
    ids: &[age::x25519::Identity],
) -> Result<
    (
        BufReader<Hashing<age::stream::StreamReader<BufReader<std::fs::File>>>>,
        impl Fn() -> Result<(), String> + Send + Sync,
    ),
    BackupError,
> {
    let path = check_ciphertext(dir, m)?;
    let f = std::fs::File::open(&path).map_err(io(&path))?;
    let decryptor = age::Decryptor::new_buffered(BufReader::new(f))
        .map_err(|e| corrupt(m, format!("not an age file: {e}")))?;
    let reader = decryptor
        .decrypt(ids.iter().map(|i| i as &dyn age::Identity))
        .map_err(|e| match e {
            age::DecryptError::NoMatchingKeys => BackupError::WrongIdentity {
                name: m.name.clone(),
                recipients: m.recipients.clone(),
            },
            e => corrupt(m, e),
        })?;
    let plain = Hashing::new(reader);
    let hash = plain.hash.clone();
    let (want, want_bytes) = (m.plaintext_sha256.clone(), m.plaintext_bytes);
    let check = move || {
        let (sha, bytes) = digest(&hash);
        if sha == want && bytes == want_bytes {
            Ok(())
        } else {
            Err(format!(
                "the decrypted backup is not what was written ({bytes} bytes, SHA-256 {sha}; \
                 the manifest says {want_bytes}, {want})"
            ))
        }
    };
    Ok((BufReader::with_capacity(1 << 16, plain), check))
}

/// What `verify` found.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Verified {
    pub name: String,
    pub rows: Vec<(String, i64)>,
    /// `ok` from SQLite's `integrity_check` of the scratch database it was restored into.
    pub integrity: String,
}

/// Checks backup `m` without touching any live database: the ciphertext's hash, decryption
/// with `ids`, then, in one pass, a restore into a scratch SQLite database (in a temporary
/// directory of `scratch`) that checks the dump whole and the plaintext's hash, its tables
/// against the manifest, and the database's integrity.
pub async fn verify(
    dir: &Path,
    m: &Manifest,
    ids: &[age::x25519::Identity],
    scratch: &Path,
) -> Result<Verified, BackupError> {
    let (mut reader, check) = open(dir, m, ids)?;
    // Decrypted data: in a directory only this user reads, removed after (keep `scratch` off
    // the backup directory, which may be synced elsewhere).
    let tmp = fresh_private_dir(scratch, ".patronus-verify")?;
    let result = async {
        let db = crate::store::Database::Sqlite(tmp.join("scratch.db"));
        let store = Store::connect(&db)
            .await
            .map_err(|e| BackupError::Scratch(format!("a scratch database: {e:#}")))?;
        let actor = Actor {
            id: None,
            name: "cli".into(),
            source: "backup verify".into(),
        };
        let loaded = dump::load(&store, &mut reader, &actor, true, &check).await;
        let checked = match loaded {
            Ok(summary) => store
                .integrity_check()
                .await
                .map(|integrity| (summary, integrity))
                .map_err(|e| BackupError::Scratch(format!("integrity check: {e}"))),
            Err(e) => Err(corrupt(m, e)),
        };
        store.close().await;
        checked
    }
    .await;
    let _ = std::fs::remove_dir_all(&tmp);
    let (summary, integrity) = result?;
    if summary.rows != m.rows || summary.schema_version != m.schema_version {
        return Err(corrupt(m, "the dump's tables do not match the manifest"));
    }
    if integrity != "ok" {
        return Err(corrupt(
            m,
            format!("restored, the database fails its integrity check: {integrity}"),
        ));
    }
    Ok(Verified {
        name: m.name.clone(),
        rows: summary.rows,
        integrity,
    })
}

fn corrupt(m: &Manifest, e: impl std::fmt::Display) -> BackupError {
    BackupError::Corrupt {
        name: m.name.clone(),
        message: e.to_string(),
    }
}

/// Replaces everything `store` holds with backup `m` (decrypted with `ids`), in one
/// transaction: checked against its manifest first, and never half-restored (see
/// [`dump::load`]). Refuses a store that holds users or sites unless `replace`.
pub async fn restore(
    store: &Store,
    dir: &Path,
    m: &Manifest,
    ids: &[age::x25519::Identity],
    actor: &Actor,
    replace: bool,
) -> Result<Summary, BackupError> {
    let (mut reader, check) = open(dir, m, ids)?;
    Ok(dump::load(store, &mut reader, actor, replace, &check).await?)
}

/// What `restore --site|--policy|--class` brings back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ObjectKind {
    Site,
    Policy,
    Class,
}

impl ObjectKind {
    fn table(self) -> &'static str {
        match self {
            Self::Site => "sites",
            Self::Policy => "policies",
            Self::Class => "sla_classes",
        }
    }

    fn word(self) -> &'static str {
        match self {
            Self::Site => "site",
            Self::Policy => "policy",
            Self::Class => "class",
        }
    }
}

/// What a restore of one object wrote: its id and the rows per table.
#[derive(Debug, Clone)]
pub struct RestoredObject {
    pub id: i64,
    pub rows: Vec<(String, usize)>,
}

/// Brings back one object deleted since backup `m` was taken (a site with everything that was
/// its: links, prefixes, overlay address, hub role, credentials, history; or a policy or a
/// class), into the live database and as an API write would: in one transaction with its
/// audit record (`site.restore`, ...), the configuration generation bumped and
/// `config.changed` told. Its ids are those it had (never given again), so its paths and the
/// edge's credential are what they were. Refused, with nothing written, when the object is
/// still there, its name or its policy order was taken since, or a LAN prefix of the site now
/// overlaps another site's.
pub async fn restore_object(
    store: &Store,
    dir: &Path,
    m: &Manifest,
    ids: &[age::x25519::Identity],
    kind: ObjectKind,
    name: &str,
    actor: &Actor,
) -> Result<RestoredObject, BackupError> {
    use crate::store::db::Arg;
    let (mut reader, check) = open(dir, m, ids)?;
    let (schema, found) =
        dump::extract(&mut reader, kind.table(), name).map_err(|e| corrupt(m, e))?;
    check().map_err(|message| corrupt(m, message))?;
    let mut o = found.ok_or_else(|| {
        BackupError::NotFound(format!("{} {name:?} in backup {}", kind.word(), m.name))
    })?;
    let live = store
        .schema_version()
        .await
        .map_err(|e| BackupError::Scratch(e.to_string()))?;
    if live != schema {
        return Err(DumpError::Versions {
            dump: schema,
            database: live,
        }
        .into());
    }
    let conflict = |message: String| BackupError::Conflict {
        what: format!("{} {name:?}", kind.word()),
        message,
    };
    let db = |e: sqlx::Error| BackupError::Scratch(format!("the database: {e}"));
    let mut tx = store.begin().await.map_err(db)?;
    let table = kind.table();
    if dump::taken(&mut tx, table, "id", "id", Arg::I64(Some(o.id)))
        .await
        .map_err(db)?
        .is_some()
    {
        return Err(conflict(format!(
            "it is in the database (id {}): nothing to restore",
            o.id
        )));
    }
    if let Some(other) = dump::taken(
        &mut tx,
        table,
        "id",
        "name",
        Arg::Text(Some(name.to_owned())),
    )
    .await
    .map_err(db)?
    {
        return Err(conflict(format!(
            "another {} has its name now (id {other}): rename or delete it first",
            kind.word()
        )));
    }
    if kind == ObjectKind::Policy {
        for ord in o.column("policies", "ord") {
            if let Some(other) = dump::taken(&mut tx, "policies", "id", "ord", ord.clone())
                .await
                .map_err(db)?
            {
                return Err(conflict(format!(
                    "its order ({}) is policy {other}'s now: move that one first",
                    match ord {
                        Arg::I64(Some(n)) => n.to_string(),
                        other => format!("{other:?}"),
                    }
                )));
            }
        }
        // As the API checks a new policy: its classes must exist now, and so on.
        for spec in o.column("policies", "spec") {
            let Arg::Text(Some(spec)) = spec else {
                return Err(conflict("the backup's policy has no spec".into()));
            };
            let policy: patronus_api::Policy = serde_json::from_str(&spec)
                .map_err(|e| conflict(format!("the backup's policy does not parse: {e}")))?;
            crate::routes::policies::check_policy(&mut tx, &policy, None)
                .await
                .map_err(|e| conflict(e.message))?;
        }
    }
    if kind == ObjectKind::Site {
        for p in o.column("site_prefixes", "prefix") {
            let Arg::Text(Some(p)) = p else { continue };
            let Ok(prefix) = p.parse::<patronus_api::Prefix>() else {
                continue;
            };
            if let Some((site, theirs)) =
                crate::store::sites::overlapping(&mut tx, Some(o.id), &prefix)
                    .await
                    .map_err(db)?
            {
                return Err(conflict(format!(
                    "its LAN prefix {p} overlaps {theirs} of site {site} now"
                )));
            }
        }
    }
    // Its overlay address, unless another site was given it since: then a new one.
    let mut readdress = false;
    for host in o.column("overlay_addresses", "host") {
        if dump::taken(&mut tx, "overlay_addresses", "site_id", "host", host)
            .await
            .map_err(db)?
            .is_some()
        {
            readdress = true;
        }
    }
    if readdress {
        o.without("overlay_addresses");
    }
    dump::insert_object(&mut tx, store.backend(), &o).await?;
    if readdress {
        crate::routes::topology::allocate(&mut tx, o.id)
            .await
            .map_err(|e| BackupError::Scratch(e.message))?;
    }
    let rows: Vec<(String, usize)> = o
        .rows
        .iter()
        .map(|(t, _, r)| (t.clone(), r.len()))
        .collect();
    let action = match kind {
        ObjectKind::Site => "site.restore",
        ObjectKind::Policy => "policy.restore",
        ObjectKind::Class => "class.restore",
    };
    crate::routes::audit_config(
        &mut tx,
        actor,
        action,
        &format!("{}/{}", kind.word(), o.id),
        serde_json::json!({
            "name": name,
            "backup": m.name,
            "rows": rows.iter().map(|(t, n)| (t.clone(), serde_json::Value::from(*n))).collect::<serde_json::Map<_, _>>(),
        }),
    )
    .await
    .map_err(|e| BackupError::Scratch(e.message))?;
    tx.commit().await.map_err(db)?;
    Ok(RestoredObject { id: o.id, rows })
}

/// How many backups of each tier `prune` keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    pub hourly: usize,
    pub daily: usize,
    pub weekly: usize,
    pub monthly: usize,
}

impl Default for Retention {
    fn default() -> Self {
        Self {
            hourly: 24,
            daily: 7,
            weekly: 4,
            monthly: 12,
        }
    }
}

impl Retention {
    /// Which of backups taken at `times` (unix ms) to keep: the newest of each of the last
    /// `hourly` hours, `daily` days, `weekly` weeks (Monday to Sunday) and `monthly` months
    /// (UTC) that have one, and the newest of all. Returned as a mask in `times`' order.
    pub fn keep(&self, times: &[i64]) -> Vec<bool> {
        let mut order: Vec<usize> = (0..times.len()).collect();
        order.sort_by(|a, b| times[*b].cmp(&times[*a]));
        let mut keep = vec![false; times.len()];
        if let Some(newest) = order.first() {
            keep[*newest] = true;
        }
        let hour = |t: i64| t.div_euclid(3_600_000);
        let day = |t: i64| t.div_euclid(86_400_000);
        // 1970-01-01 was a Thursday: day + 3 counts from a Monday.
        let week = |t: i64| (day(t) + 3).div_euclid(7);
        let month = |t: i64| {
            let (y, m, _) = civil(day(t));
            y * 12 + i64::from(m)
        };
        let tiers: [(&dyn Fn(i64) -> i64, usize); 4] = [
            (&hour, self.hourly),
            (&day, self.daily),
            (&week, self.weekly),
            (&month, self.monthly),
        ];
        for (bucket, count) in tiers {
            let mut last = None;
            let mut kept = 0;
            for &i in &order {
                if kept == count {
                    break;
                }
                let b = bucket(times[i]);
                if last != Some(b) {
                    // The newest of a bucket not seen yet.
                    keep[i] = true;
                    last = Some(b);
                    kept += 1;
                }
            }
        }
        keep
    }

    /// The backups of `all` (as listed) that this retention does not keep.
    pub fn doomed(&self, all: Vec<Manifest>) -> Vec<Manifest> {
        let times: Vec<i64> = all.iter().map(|m| m.created_ms).collect();
        all.into_iter()
            .zip(self.keep(&times))
            .filter_map(|(m, keep)| (!keep).then_some(m))
            .collect()
    }
}

/// Deletes the backups in `dir` that `retention` does not keep; returns the names deleted.
pub fn prune(dir: &Path, retention: &Retention) -> Result<Vec<String>, BackupError> {
    let mut gone = Vec::new();
    for m in retention.doomed(list(dir)?) {
        // The manifest first: a backup without one is not listed, so a prune cut short
        // leaves no listed backup without its file.
        for ext in ["json", "age"] {
            let p = dir.join(format!("{}.{ext}", m.name));
            match std::fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io(&p)(e)),
            }
        }
        gone.push(m.name);
    }
    sync_dir(dir);
    Ok(gone)
}

/// Reads a whole backup's plaintext (for tests and `age`-free inspection).
pub fn plaintext(
    dir: &Path,
    m: &Manifest,
    ids: &[age::x25519::Identity],
) -> Result<Vec<u8>, BackupError> {
    let (mut reader, check) = open(dir, m, ids)?;
    let mut out = Vec::new();
    reader.read_to_end(&mut out).map_err(|e| corrupt(m, e))?;
    check().map_err(|message| corrupt(m, message))?;
    Ok(out)
}

/// What this controller's scheduled backups did, for `/metrics`.
#[derive(Debug, Clone, Default)]
pub struct Status {
    /// The last success: when (unix ms), how long it took (ms), its size (bytes).
    pub last_success: Option<(i64, u64, u64)>,
    pub successes: u64,
    pub failures: u64,
    /// Times it looked whether one was due (taken or not).
    pub looks: u64,
    /// Where they go (the configuration's, set at start; `backup_dir` if not set).
    pub destination: Option<Destination>,
}

/// How long a controller that claimed a scheduled backup holds the claim: if it dies, another
/// takes the backup after this.
const CLAIM_MS: i64 = 30 * 60 * 1000;
/// After a failure, the next try.
const RETRY_MS: i64 = 5 * 60 * 1000;
/// How often a controller looks whether a scheduled backup is due.
const LOOK_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// Takes the scheduled backups (`backup_interval_s`) while the controller serves: whichever
/// controller over the database claims one first takes it
/// ([`crate::store::settings::claim_backup`]), into `backup_dir`, then prunes with the
/// configured retention. A failure is logged, counted and told to webhooks (`backup.failed`),
/// and tried again in 5 minutes. Call once, inside the runtime.
pub async fn schedule(state: crate::AppState) {
    schedule_every(state, LOOK_EVERY).await
}

/// [`schedule`], looking every `look_every` whether a backup is due.
pub async fn schedule_every(state: crate::AppState, look_every: std::time::Duration) {
    let Some(interval) = state.config.backup_interval else {
        return;
    };
    let recipients = match recipients(&state.config.backup_recipients) {
        Ok(r) => r,
        Err(e) => {
            // The configuration was checked at start: not reached.
            tracing::error!(error = %e, "scheduled backups are off");
            return;
        }
    };
    let holder = format!(
        "{}:{}",
        std::env::var("HOSTNAME").unwrap_or_default(),
        std::process::id()
    );
    let mut tick = tokio::time::interval(look_every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = crate::store::now_ms();
        let claimed = async {
            crate::store::settings::claim_backup(
                &mut *state.store.conn().await?,
                &holder,
                now,
                CLAIM_MS,
            )
            .await
        }
        .await;
        state
            .backups
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .looks += 1;
        match claimed {
            Ok(true) => {}
            Ok(false) => continue,
            Err(e) => {
                tracing::warn!(error = %e, "could not look whether a backup is due");
                continue;
            }
        }
        // Off the runtime's workers: a backup serializes and encrypts the whole database.
        let store = state.store.clone();
        let dest = state
            .backups
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .destination
            .clone()
            .unwrap_or_else(|| Destination::Dir(state.config.backup_dir.clone()));
        let place = dest.describe();
        let rs = recipients.clone();
        let retention = state.config.backup_retention;
        let handle = tokio::runtime::Handle::current();
        let taken = tokio::task::spawn_blocking(move || {
            handle.block_on(async {
                let m = dest.create(&store, &rs).await?;
                // A prune that fails leaves the backup taken: it is said, not counted as a
                // failed backup (that would take another every 5 minutes).
                let pruned = dest.prune(&retention).await.unwrap_or_else(|e| {
                    tracing::error!(error = %e, "old backups not pruned");
                    Vec::new()
                });
                Ok::<_, BackupError>((m, pruned))
            })
        })
        .await;
        let taken = match taken {
            Ok(r) => r,
            Err(e) => Err(BackupError::Scratch(format!("the backup task failed: {e}"))),
        };
        let next = match &taken {
            Ok((m, pruned)) => {
                tracing::info!(
                    backup = %m.name, bytes = m.ciphertext_bytes, took_ms = m.took_ms,
                    pruned = pruned.len(), "scheduled backup taken"
                );
                let mut s = state.backups.lock().unwrap_or_else(|e| e.into_inner());
                s.last_success = Some((m.created_ms, m.took_ms, m.ciphertext_bytes));
                s.successes += 1;
                m.created_ms + interval.as_millis() as i64
            }
            Err(e) => {
                tracing::error!(error = %e, "scheduled backup failed; trying again in 5 minutes");
                state
                    .backups
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .failures += 1;
                let told = async {
                    let mut tx = state.store.begin().await?;
                    crate::webhooks::queue(
                        &mut tx,
                        vec![(
                            crate::webhooks::EventKind::BackupFailed,
                            serde_json::json!({
                                "error": e.to_string(),
                                "destination": place,
                            }),
                        )],
                        None,
                    )
                    .await?;
                    tx.deliveries_queued();
                    tx.commit().await
                };
                if let Err(e) = told.await {
                    tracing::warn!(error = %e, "backup.failed not queued for webhooks");
                }
                crate::store::now_ms() + RETRY_MS
            }
        };
        let released = async {
            crate::store::settings::backup_due_at(
                &mut *state.store.conn().await?,
                next,
                crate::store::now_ms(),
            )
            .await
        };
        if let Err(e) = released.await {
            tracing::warn!(error = %e, "the next backup's time not recorded");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_sort_as_time_and_civil_dates_are_right() {
        assert_eq!(name_of(0), "patronus-19700101T000000.000Z");
        assert_eq!(name_of(1_796_213_849_552), "patronus-20261202T121729.552Z");
        assert_eq!(civil(-1), (1969, 12, 31));
        assert_eq!(civil(19_782), (2024, 2, 29));
        assert!(name_of(1_000) < name_of(10_000_000_000_000));
    }
}
