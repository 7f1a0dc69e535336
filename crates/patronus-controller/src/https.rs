//! The controller's own HTTPS. It serves TLS (rustls on ring, TLS 1.2 and 1.3) from the
//! certificate and key files of its configuration (`tls_cert_file`, `tls_key_file`), or, when
//! none are given, from a self-signed certificate it makes on first start in
//! `<data_dir>/tls/` (the key 0600), whose fingerprint it prints for clients to pin
//! (`--ca-fingerprint`). Plain HTTP only when `plain_http` asks for it.
//!
//! The files are read again on SIGHUP and whenever they change (looked at every few seconds):
//! new connections get the new certificate, established ones (an edge's held long poll) keep
//! theirs. A file that cannot be read or a key that does not match its certificate leaves the
//! previous certificate served, and says so in the log.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use anyhow::Context;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;

use crate::config::{Config, Tls};

/// Where the self-signed certificate is kept: `<data_dir>/tls/cert.pem` and `key.pem`.
pub fn generated_paths(data_dir: &Path) -> (PathBuf, PathBuf) {
    let dir = data_dir.join("tls");
    (dir.join("cert.pem"), dir.join("key.pem"))
}

/// The file beside the generated certificate that holds its fingerprint, for scripts and the
/// lab to read (the same line the controller prints at start).
pub fn fingerprint_path(data_dir: &Path) -> PathBuf {
    data_dir.join("tls").join("fingerprint")
}

/// How often the certificate files are looked at for a change.
pub const LOOK_EVERY: Duration = Duration::from_secs(5);

/// The TLS side of the server: the certificate served now and where it comes from.
#[derive(Debug)]
pub struct ServerTls {
    cert_file: PathBuf,
    key_file: PathBuf,
    provider: Arc<rustls::crypto::CryptoProvider>,
    current: Arc<Current>,
    config: Arc<rustls::ServerConfig>,
    /// The files as they were at the last attempt to read them (changed or not, read or not):
    /// a change is tried once, not every look.
    attempted: Mutex<Option<Stamp>>,
}

/// The certificate new handshakes get, replaceable while the server runs: with its leaf's
/// fingerprint and a digest of the whole chain.
#[derive(Debug)]
struct Current(RwLock<Loaded>);

#[derive(Debug)]
struct Loaded {
    key: Arc<CertifiedKey>,
    fingerprint: String,
    chain: [u8; 32],
    /// When the leaf expires (Unix seconds), if its DER reads.
    not_after: Option<i64>,
}

impl rustls::server::ResolvesServerCert for Current {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.read().unwrap_or_else(|e| e.into_inner()).key.clone())
    }
}

/// What identifies a version of the two files (the change time too: a copy that keeps the
/// modification time and the length still changes it).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp(Vec<(u64, u64, i64, i64, i64, i64)>);

fn stamp(files: &[&Path]) -> Option<Stamp> {
    use std::os::unix::fs::MetadataExt;
    files
        .iter()
        .map(|f| {
            let m = std::fs::metadata(f).ok()?;
            Some((
                m.ino(),
                m.len(),
                m.mtime(),
                m.mtime_nsec(),
                m.ctime(),
                m.ctime_nsec(),
            ))
        })
        .collect::<Option<Vec<_>>>()
        .map(Stamp)
}

impl ServerTls {
    /// The TLS the configuration asks for: `None` for `plain_http`; otherwise the given files,
    /// or the self-signed certificate (made now if there is none yet).
    pub fn from_config(c: &Config) -> anyhow::Result<Option<Arc<Self>>> {
        match &c.tls {
            Tls::Plain => Ok(None),
            Tls::Files { cert, key } => Self::open(cert.clone(), key.clone())
                .with_context(|| "tls_cert_file and tls_key_file")
                .map(Some),
            Tls::SelfSigned { names } => {
                let (cert, key) = generated_paths(&c.data_dir);
                if !cert.exists() {
                    generate(&c.data_dir, &self_signed_names(c, names))?;
                }
                Self::open(cert, key)
                    .with_context(|| {
                        format!(
                            "the controller's self-signed certificate in {} (remove the \
                             directory to make a new one; clients must then pin the new \
                             fingerprint)",
                            c.data_dir.join("tls").display()
                        )
                    })
                    .map(Some)
            }
        }
    }

    fn open(cert_file: PathBuf, key_file: PathBuf) -> anyhow::Result<Arc<Self>> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let before = stamp(&[&cert_file, &key_file]);
        let loaded = load(&cert_file, &key_file, &provider)?;
        let current = Arc::new(Current(RwLock::new(loaded)));
        let mut config = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .context("TLS versions")?
            .with_no_client_auth()
            .with_cert_resolver(current.clone());
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        // Session tickets (stateless, keys rotated by rustls): an edge opens a connection per
        // request, and a resumed handshake skips the certificate signature.
        config.ticketer = rustls::crypto::ring::Ticketer::new().context("TLS session tickets")?;
        Ok(Arc::new(Self {
            cert_file,
            key_file,
            provider,
            current,
            config: Arc::new(config),
            attempted: Mutex::new(before),
        }))
    }

    /// An acceptor for one connection (it serves whatever certificate is current).
    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.config.clone())
    }

    /// When the certificate served now expires (Unix seconds), if it reads.
    pub fn not_after(&self) -> Option<i64> {
        self.current
            .0
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .not_after
    }

    /// The fingerprint of the certificate served now (`sha256:…`).
    pub fn fingerprint(&self) -> String {
        self.current
            .0
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .fingerprint
            .clone()
    }

    /// Reads the files again if they changed since the last attempt (or always, if `forced`:
    /// a SIGHUP), and serves what they hold from the next handshake on. Returns whether the
    /// certificate served changed; an error leaves the previous one served.
    pub fn reload(&self, forced: bool) -> Result<bool, String> {
        let now = stamp(&[&self.cert_file, &self.key_file]);
        {
            let mut attempted = self.attempted.lock().unwrap_or_else(|e| e.into_inner());
            if !forced && *attempted == now {
                return Ok(false);
            }
            *attempted = now;
        }
        let loaded =
            load(&self.cert_file, &self.key_file, &self.provider).map_err(|e| format!("{e:#}"))?;
        let mut current = self.current.0.write().unwrap_or_else(|e| e.into_inner());
        // A new chain with the same leaf (an intermediate renewed or added) is served too.
        if current.chain == loaded.chain {
            return Ok(false);
        }
        *current = loaded;
        Ok(true)
    }
}

/// Reads a certificate chain and its key; checks that they belong together and that the key
/// is not readable by everyone.
fn load(
    cert_file: &Path,
    key_file: &Path,
    provider: &rustls::crypto::CryptoProvider,
) -> anyhow::Result<Loaded> {
    use std::os::unix::fs::PermissionsExt;
    let chain = CertificateDer::pem_file_iter(cert_file)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .with_context(|| format!("reading the certificate {}", cert_file.display()))?;
    let Some(leaf) = chain.first() else {
        anyhow::bail!("{}: holds no PEM certificate", cert_file.display());
    };
    let fingerprint = crate::tls::fingerprint(leaf.as_ref());
    let not_after = crate::tls::not_after(leaf.as_ref());
    let chain_digest = {
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        for c in &chain {
            h.update((c.len() as u64).to_be_bytes());
            h.update(c.as_ref());
        }
        h.finalize().into()
    };
    let mode = std::fs::metadata(key_file)
        .with_context(|| format!("reading the private key {}", key_file.display()))?
        .permissions()
        .mode();
    if mode & 0o004 != 0 {
        anyhow::bail!(
            "{}: the private key is readable by every user (mode {:o}); chmod 600 it",
            key_file.display(),
            mode & 0o777
        );
    }
    let key = PrivateKeyDer::from_pem_file(key_file)
        .with_context(|| format!("reading the private key {}", key_file.display()))?;
    let certified = CertifiedKey::from_der(chain, key, provider).with_context(|| {
        format!(
            "{} and {}: the key is not the certificate's, or is of a kind rustls cannot use",
            cert_file.display(),
            key_file.display()
        )
    })?;
    Ok(Loaded {
        key: Arc::new(certified),
        fingerprint,
        chain: chain_digest,
        not_after,
    })
}

/// The names the self-signed certificate holds: loopback, this machine's host name, the
/// address the controller listens on, and `tls_names`. (Clients that pin the fingerprint do
/// not check names; a browser shown the certificate does.)
fn self_signed_names(c: &Config, extra: &[String]) -> Vec<String> {
    let mut names = vec!["localhost".to_owned(), "127.0.0.1".into(), "::1".into()];
    if let Ok(h) = std::fs::read_to_string("/proc/sys/kernel/hostname") {
        let h = h.trim();
        if !h.is_empty()
            && h.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-.".contains(&b))
        {
            names.push(h.to_owned());
        }
    }
    if !c.listen.ip().is_unspecified() {
        names.push(c.listen.ip().to_string());
    }
    for n in extra {
        if !names.contains(n) {
            names.push(n.clone());
        }
    }
    names
}

/// Makes the self-signed certificate (ECDSA P-256, valid from last year for ten years) and
/// its key (0600) in `<data_dir>/tls/`, and writes its fingerprint beside them.
pub fn generate(data_dir: &Path, names: &[String]) -> anyhow::Result<String> {
    let dir = data_dir.join("tls");
    crate::store::create_private_dir(&dir)?;
    let key = rcgen::KeyPair::generate().context("generating the TLS key")?;
    let mut params = rcgen::CertificateParams::new(names.to_vec())
        .context("the names of the self-signed certificate (tls_names)")?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "Patronus controller");
    let year = 1970
        + i32::try_from(crate::store::now_s() / 31_556_952)
            .context("the clock is beyond the year 2^31")?;
    params.not_before = rcgen::date_time_ymd(year - 1, 1, 1);
    params.not_after = rcgen::date_time_ymd(year + 10, 1, 1);
    let cert = params
        .self_signed(&key)
        .context("signing the self-signed certificate")?;
    let (cert_file, key_file) = generated_paths(data_dir);
    // The key first: a certificate on disk always has its key.
    replace_file(&key_file, key.serialize_pem().as_bytes(), 0o600)?;
    replace_file(&cert_file, cert.pem().as_bytes(), 0o644)?;
    let fp = crate::tls::fingerprint(cert.der());
    replace_file(
        &fingerprint_path(data_dir),
        format!("{fp}\n").as_bytes(),
        0o644,
    )?;
    tracing::warn!(
        fingerprint = %fp,
        cert = %cert_file.display(),
        "made a self-signed TLS certificate: clients pin it with --ca-fingerprint (give the controller a certificate from your CA with tls_cert_file and tls_key_file instead)"
    );
    Ok(fp)
}

/// Writes `path` whole with `mode`: beside it first (created with that mode, so it is never
/// wider), synced, then renamed over it; a reader never sees half a file. (Also the CLI's way
/// of keeping its session and an edge's files.)
pub fn replace_file(path: &Path, bytes: &[u8], mode: u32) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Keeps the served certificate the files' one: reads them on every SIGHUP (`hup`) and when
/// they change (looked at every `every`). Runs until the server stops.
pub async fn watch(
    tls: Arc<ServerTls>,
    mut hup: Option<tokio::signal::unix::Signal>,
    every: Duration,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let forced = tokio::select! {
            Some(()) = async { hup.as_mut()?.recv().await } => true,
            _ = tick.tick() => false,
        };
        match tls.reload(forced) {
            Ok(true) => tracing::warn!(
                fingerprint = %tls.fingerprint(),
                cert = %tls.cert_file.display(),
                "serving a new TLS certificate to new connections (clients that pin the old fingerprint must pin this one)"
            ),
            Ok(false) if forced => tracing::info!(
                fingerprint = %tls.fingerprint(),
                "SIGHUP: the TLS certificate is unchanged"
            ),
            Ok(false) => {}
            Err(e) => tracing::error!(
                error = %e,
                still_serving = %tls.fingerprint(),
                "the TLS certificate files changed but cannot be used: still serving the previous certificate"
            ),
        }
    }
}
