//! A small blocking client of the controller's API for the admin commands: plain HTTP/1.1 over
//! TCP, one connection per request, credentials kept 0600 in the user's config directory, the
//! access token refreshed when it lapses.
//!
//! It speaks `https://` (rustls): to a controller whose certificate fingerprint is pinned
//! (`--ca-fingerprint`, `PATRONUS_CA_FINGERPRINT` or an edge's `ca_fingerprint`: the
//! controller's self-signed certificate), or else trusting the Mozilla roots compiled in plus
//! the CA certificates of `PATRONUS_CA_FILE` or an edge's `ca_file`. And `http://` to a
//! controller served with `plain_http` (loopback, or behind a TLS-terminating proxy).

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// What `patronus login` stores.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Credentials {
    pub url: String,
    pub email: String,
    pub access_token: String,
    pub refresh_token: String,
    /// The controller certificate's fingerprint pinned at login (`--ca-fingerprint`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_fingerprint: Option<String>,
}

/// `$XDG_CONFIG_HOME/patronus/credentials.json`, or `~/.config/patronus/credentials.json`.
pub fn credentials_path() -> anyhow::Result<PathBuf> {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))
        .context("neither XDG_CONFIG_HOME nor HOME is set: nowhere to keep the login")?;
    Ok(base.join("patronus").join("credentials.json"))
}

pub fn save(c: &Credentials) -> anyhow::Result<PathBuf> {
    use std::os::unix::fs::DirBuilderExt;
    let path = credentials_path()?;
    if let Some(dir) = path.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("creating {}", dir.display()))?;
    }
    write_private(&path, serde_json::to_string_pretty(c)?.as_bytes())?;
    Ok(path)
}

/// Writes a file readable by its owner only, replacing it whole: written beside, then renamed,
/// so there is never a half-written file nor a moment with a wider mode.
pub fn write_private(path: &std::path::Path, bytes: &[u8]) -> anyhow::Result<()> {
    patronus_controller::https::replace_file(path, bytes, 0o600)
}

pub fn load() -> anyhow::Result<Credentials> {
    let path = credentials_path()?;
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "no login at {}: run `patronus login --url https://HOST:8080 --email YOU` first",
            path.display()
        )
    })?;
    let creds: Credentials = serde_json::from_str(&text)
        .with_context(|| format!("{} is damaged; log in again", path.display()))?;
    if let Some(fp) = &creds.ca_fingerprint {
        pin(std::slice::from_ref(fp))?;
    }
    Ok(creds)
}

/// One HTTP response.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub body: Value,
    pub etag: Option<String>,
    /// The controller's STUN port (`patronus-stun-port`), on an edge's configuration.
    pub stun_port: Option<u16>,
    /// The URL of the controller that answered.
    pub url: String,
}

/// A controller's base URL, taken apart.
struct Target {
    tls: bool,
    /// The host as the certificate must name it (no brackets around an IPv6 address).
    host: String,
    /// `host:port`.
    authority: String,
}

/// The UDP addresses of `url`'s host at `port` (its name resolved).
pub fn udp_addresses(url: &str, port: u16) -> anyhow::Result<Vec<std::net::SocketAddr>> {
    use std::net::ToSocketAddrs;
    let t = target(url)?;
    let found: Vec<std::net::SocketAddr> = (t.host.as_str(), port)
        .to_socket_addrs()
        .with_context(|| format!("resolving {}", t.host))?
        .collect();
    if found.is_empty() {
        bail!("{} has no address", t.host);
    }
    Ok(found)
}

/// `https://host[:port]` or `http://host[:port]`.
fn target(url: &str) -> anyhow::Result<Target> {
    let (tls, rest) = if let Some(r) = url.strip_prefix("https://") {
        (true, r)
    } else if let Some(r) = url.strip_prefix("http://") {
        (false, r)
    } else {
        bail!("{url}: the URL must start with https:// or http://");
    };
    let hostport = rest.trim_end_matches('/');
    if hostport.is_empty() || hostport.contains('/') {
        bail!("{url}: give the controller's base URL, like https://controller.example.net");
    }
    let has_port = hostport.rsplit_once(':').is_some_and(|(h, p)| {
        !p.is_empty()
            && p.bytes().all(|b| b.is_ascii_digit())
            && (!h.starts_with('[') || h.ends_with(']'))
    });
    let (host, authority) = if has_port {
        let (h, _) = hostport.rsplit_once(':').unwrap_or((hostport, ""));
        (h, hostport.to_owned())
    } else {
        (
            hostport,
            format!("{hostport}:{}", if tls { 443 } else { 80 }),
        )
    };
    Ok(Target {
        tls,
        host: host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned(),
        authority,
    })
}

static CA_FILE: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
static PINS: std::sync::OnceLock<Vec<[u8; 32]>> = std::sync::OnceLock::new();
/// The TLS client configuration, built at the first `https://` request.
static TLS: std::sync::OnceLock<Result<std::sync::Arc<rustls::ClientConfig>, String>> =
    std::sync::OnceLock::new();

/// Trust only the controller certificates with these fingerprints (`sha256:…`, or openssl's
/// colon form) for `https://` controllers, instead of any CA. Set once, before the first
/// request; without it, `PATRONUS_CA_FINGERPRINT` (comma-separated) is read.
pub fn pin(fingerprints: &[String]) -> anyhow::Result<()> {
    let pins = parse_pins(fingerprints)?;
    if PINS.get().is_some_and(|p| *p != pins) {
        bail!("two different controller certificate fingerprints were pinned");
    }
    if PINS.get().is_none() && TLS.get().is_some() {
        bail!("a controller certificate fingerprint was pinned after the first connection");
    }
    let _ = PINS.set(pins);
    Ok(())
}

/// `PATRONUS_CA_FINGERPRINT`, if set to something.
pub fn env_fingerprints() -> Option<String> {
    std::env::var("PATRONUS_CA_FINGERPRINT")
        .ok()
        .filter(|v| !v.trim().is_empty())
}

fn parse_pins(fingerprints: &[String]) -> anyhow::Result<Vec<[u8; 32]>> {
    fingerprints
        .iter()
        .map(|f| patronus_controller::tls::parse_fingerprint(f).map_err(anyhow::Error::msg))
        .collect()
}

/// Trust the CA certificates of `path` (PEM) for `https://` controllers, beside the Mozilla
/// roots (an edge's `ca_file`). Without it, `PATRONUS_CA_FILE` is read.
pub fn set_ca_file(path: PathBuf) {
    let _ = CA_FILE.set(path);
}

/// The TLS client configuration, built once.
fn tls_config() -> anyhow::Result<std::sync::Arc<rustls::ClientConfig>> {
    let built = TLS.get_or_init(|| {
        let pins = match PINS.get() {
            Some(p) => p.clone(),
            None => match env_fingerprints() {
                Some(v) => {
                    let list: Vec<String> = v.split(',').map(|s| s.trim().to_owned()).collect();
                    parse_pins(&list).map_err(|e| format!("PATRONUS_CA_FINGERPRINT: {e}"))?
                }
                None => Vec::new(),
            },
        };
        if !pins.is_empty() {
            return patronus_controller::tls::pinned_client_config(pins);
        }
        let file = CA_FILE
            .get()
            .cloned()
            .or_else(|| std::env::var_os("PATRONUS_CA_FILE").map(PathBuf::from));
        patronus_controller::tls::client_config(file.as_deref(), "CA file")
    });
    built.clone().map_err(anyhow::Error::msg)
}

/// Sends one request and reads the whole response.
pub fn request(
    url: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&Value>,
) -> anyhow::Result<Response> {
    request_via(None, url, method, path, token, body, &[])
}

/// The local addresses an edge's requests may leave from: one per WAN link. With the
/// source-based routing a multi-homed edge has (a rule per link address), each address leaves
/// over its own link, so the edge reaches its controller over whichever link works.
///
/// Connections are raced, happy-eyeballs style (RFC 8305): the source that worked last starts
/// first, and each next one starts [`Via::STAGGER`] later or as soon as the one before fails;
/// the first to connect wins. A link that dies silently (its packets blackholed) thus costs a
/// request 250 ms, not the whole connect timeout: trying the sources in turn made an edge's
/// first report after a cut of the link it last used wait 3 s for that link's timeout.
#[derive(Debug, Default)]
pub struct Via {
    sources: Vec<std::net::IpAddr>,
    preferred: std::sync::atomic::AtomicUsize,
}

impl Via {
    /// How long a connection attempt has alone before the next source starts one too.
    pub const STAGGER: Duration = Duration::from_millis(250);

    pub fn new(sources: Vec<std::net::IpAddr>) -> Self {
        Self {
            sources,
            preferred: Default::default(),
        }
    }

    /// Connects to `addr` from the sources of its family, raced as described above; then, if
    /// none connects, as the routing table says.
    pub(crate) fn connect(
        &self,
        addr: std::net::SocketAddr,
        timeout: Duration,
    ) -> std::io::Result<TcpStream> {
        use std::sync::atomic::Ordering;
        use std::sync::mpsc;
        let n = self.sources.len();
        let first = self.preferred.load(Ordering::Relaxed);
        let mut order = (0..n)
            .map(|k| (first + k) % n)
            .filter(|&i| self.sources[i].is_ipv4() == addr.is_ipv4());
        let (tx, rx) = mpsc::channel::<(usize, std::io::Result<TcpStream>)>();
        // Each attempt runs on its own thread until it connects or times out; one that ends
        // after the race is decided drops its connection.
        let start = |i: usize| {
            let (tx, src) = (tx.clone(), self.sources[i]);
            std::thread::Builder::new()
                .name("connect".into())
                .spawn(move || {
                    let _ = tx.send((i, connect_from(src, addr, timeout)));
                })
                .is_ok()
        };
        let mut running = 0;
        let mut last = None;
        loop {
            if running == 0 {
                match order.next() {
                    Some(i) => running += usize::from(start(i)),
                    None => break,
                }
                continue;
            }
            match rx.recv_timeout(Self::STAGGER) {
                Ok((i, Ok(s))) => {
                    self.preferred.store(i, Ordering::Relaxed);
                    return Ok(s);
                }
                Ok((_, Err(e))) => {
                    running -= 1;
                    last = Some(e);
                    if let Some(i) = order.next() {
                        running += usize::from(start(i));
                    }
                }
                Err(_) => {
                    if let Some(i) = order.next() {
                        running += usize::from(start(i));
                    }
                }
            }
        }
        // Last, as the routing table says (a management network, a link whose address is
        // not local any more).
        TcpStream::connect_timeout(&addr, timeout).map_err(|e| last.unwrap_or(e))
    }
}

/// A TCP connection to `addr` from local address `src`.
fn connect_from(
    src: std::net::IpAddr,
    addr: std::net::SocketAddr,
    timeout: Duration,
) -> std::io::Result<TcpStream> {
    use socket2::{Domain, Socket, Type};
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    sock.bind(&std::net::SocketAddr::new(src, 0).into())?;
    sock.connect_timeout(&addr.into(), timeout).map_err(|e| {
        if e.kind() == std::io::ErrorKind::TimedOut {
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no connection from {src} within {timeout:?}"),
            )
        } else {
            e
        }
    })?;
    Ok(sock.into())
}

/// [`request`], leaving from `via`'s addresses if given, with more headers
/// (`If-None-Match`, say).
pub fn request_via(
    via: Option<&Via>,
    url: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&Value>,
    headers: &[(&str, &str)],
) -> anyhow::Result<Response> {
    request_checked(via, url, method, path, token, body, headers, true)
}

/// A GET of a local, plain-HTTP endpoint that is not the controller (an edge's status on
/// loopback): no controller pin applies to it, and it carries no credential.
pub fn get_local_plain(url: &str, path: &str) -> anyhow::Result<Response> {
    anyhow::ensure!(
        url.starts_with("http://127.") || url.starts_with("http://[::1]"),
        "{url}: only a loopback http:// URL is read without TLS"
    );
    request_checked(None, url, "GET", path, None, None, &[], false)
}

#[allow(clippy::too_many_arguments)]
fn request_checked(
    via: Option<&Via>,
    url: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&Value>,
    headers: &[(&str, &str)],
    controller: bool,
) -> anyhow::Result<Response> {
    let t = target(url)?;
    if controller && !t.tls && (PINS.get().is_some() || env_fingerprints().is_some()) {
        bail!(
            "{url}: a controller certificate fingerprint is pinned, but this URL is plain \
             http:// (nothing would be checked, and the password or credential would go in \
             clear): use https://"
        );
    }
    let auth = t.authority.as_str();
    let addr = auth
        .to_socket_addrs()
        .with_context(|| format!("resolving {auth}"))?
        .next()
        .with_context(|| format!("{auth} resolves to nothing"))?;
    let timeout = Duration::from_secs(if via.is_some() { 3 } else { 10 });
    let mut s = match via {
        Some(v) => v.connect(addr, timeout),
        None => TcpStream::connect_timeout(&addr, timeout),
    }
    .with_context(|| format!("connecting to the controller at {url}"))?;
    // An edge's longest request is a 25 s long poll: beyond 35 s its link is likely dead, and
    // the next attempt goes over another.
    s.set_read_timeout(Some(Duration::from_secs(if via.is_some() {
        35
    } else {
        60
    })))?;
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {auth}\r\nConnection: close\r\nAccept: application/json\r\nUser-Agent: patronus-cli/{}\r\n",
        env!("CARGO_PKG_VERSION")
    );
    if let Some(t) = token {
        head.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    if !body.is_empty() {
        head.push_str("Content-Type: application/json\r\n");
    }
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    let mut raw = Vec::new();
    if t.tls {
        let name = rustls::pki_types::ServerName::try_from(t.host.clone())
            .with_context(|| format!("{}: not a name a certificate can hold", t.host))?;
        let conn = rustls::ClientConnection::new(tls_config()?, name)?;
        let mut s = rustls::StreamOwned::new(conn, s);
        s.write_all(head.as_bytes())
            .and_then(|()| s.write_all(body.as_bytes()))
            .map_err(|e| match patronus_controller::tls::not_pinned(&e) {
                Some(p) => anyhow::anyhow!("{p}"),
                None => anyhow::Error::new(e),
            })
            .with_context(|| format!("TLS with the controller at {url}"))?;
        match s.read_to_end(&mut raw) {
            Ok(_) => {}
            // A server that closes without close_notify after a complete answer (many do).
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !raw.is_empty() => {}
            Err(e) => {
                return Err(e).with_context(|| format!("TLS with the controller at {url}"));
            }
        }
    } else {
        s.write_all(head.as_bytes())?;
        s.write_all(body.as_bytes())?;
        s.read_to_end(&mut raw)
            .context("reading the controller's answer")?;
    }
    let mut r = parse(&raw)?;
    r.url = url.to_owned();
    Ok(r)
}

fn parse(raw: &[u8]) -> anyhow::Result<Response> {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("the controller's answer is not HTTP")?;
    let head = String::from_utf8_lossy(&raw[..split]);
    let status: u16 = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("the controller's answer has no status")?;
    let mut body = raw[split + 4..].to_vec();
    if head
        .lines()
        .any(|l| l.to_ascii_lowercase().starts_with("transfer-encoding:") && l.contains("chunked"))
    {
        body = dechunk(&body)?;
    }
    let body = if body.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&body)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into_owned()))
    };
    let header = |name: &str| {
        head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_owned())
        })
    };
    Ok(Response {
        status,
        body,
        etag: header("etag"),
        stun_port: header(patronus_controller::stun::PORT_HEADER).and_then(|p| p.parse().ok()),
        url: String::new(),
    })
}

fn dechunk(mut b: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = b
            .windows(2)
            .position(|w| w == b"\r\n")
            .context("bad chunk")?;
        let size = usize::from_str_radix(
            String::from_utf8_lossy(&b[..line_end])
                .split(';')
                .next()
                .unwrap_or("")
                .trim(),
            16,
        )
        .context("bad chunk size")?;
        b = &b[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        out.extend_from_slice(b.get(..size).context("short chunk")?);
        b = b.get(size + 2..).context("short chunk")?;
    }
}

/// The API's error message, or the status.
/// Why a request did not succeed: the API's message, or the transport's error.
pub fn failure_text(r: &anyhow::Result<Response>) -> String {
    match r {
        Ok(r) => error_text(r),
        Err(e) => format!("{e:#}"),
    }
}

pub fn error_text(r: &Response) -> String {
    r.body["error"]["message"]
        .as_str()
        .map(|m| {
            let details = r.body["error"]["details"]
                .as_array()
                .map(|d| {
                    d.iter()
                        .filter_map(|e| {
                            Some(format!(
                                "\n  {}: {}",
                                e["field"].as_str()?,
                                e["problem"].as_str()?
                            ))
                        })
                        .collect::<String>()
                })
                .unwrap_or_default();
            format!("{} ({}){details}", m, r.status)
        })
        .unwrap_or_else(|| format!("HTTP {}", r.status))
}

/// Logs in to the controller at `url` with an email and password: the session to keep (with
/// `ca_fingerprint`, already pinned with [`pin`], kept in it for the next commands).
pub fn login(
    url: &str,
    email: &str,
    password: &str,
    ca_fingerprint: Option<&str>,
) -> anyhow::Result<Credentials> {
    let r = request(
        url,
        "POST",
        "/api/v1/auth/login",
        None,
        Some(&serde_json::json!({ "email": email, "password": password })),
    )?;
    if r.status != 200 {
        bail!("login failed: {}", error_text(&r));
    }
    let token = |k: &str| r.body[k].as_str().unwrap_or_default().to_owned();
    Ok(Credentials {
        url: url.trim_end_matches('/').to_owned(),
        email: email.to_owned(),
        access_token: token("access_token"),
        refresh_token: token("refresh_token"),
        ca_fingerprint: ca_fingerprint.map(str::to_owned),
    })
}

/// A logged-in session: calls the API, refreshing the access token once when it has lapsed.
#[derive(Debug)]
pub struct Session {
    creds: Credentials,
}

impl Session {
    pub fn open() -> anyhow::Result<Self> {
        Ok(Self { creds: load()? })
    }

    /// Calls the API; `Err` with the API's message unless the status is 2xx.
    pub fn call(
        &mut self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> anyhow::Result<Value> {
        let mut r = request(
            &self.creds.url,
            method,
            path,
            Some(&self.creds.access_token),
            body,
        )?;
        if r.status == 401 {
            self.refresh()?;
            r = request(
                &self.creds.url,
                method,
                path,
                Some(&self.creds.access_token),
                body,
            )?;
        }
        if !(200..300).contains(&r.status) {
            bail!("{method} {path}: {}", error_text(&r));
        }
        Ok(r.body)
    }

    /// Logs in again to the same controller (after a password change ended every session),
    /// and keeps the new session; where it is kept.
    pub fn login(&mut self, email: &str, password: &str) -> anyhow::Result<PathBuf> {
        let pinned = self.creds.ca_fingerprint.clone();
        self.creds = login(&self.creds.url, email, password, pinned.as_deref())?;
        save(&self.creds)
    }

    fn refresh(&mut self) -> anyhow::Result<()> {
        let r = request(
            &self.creds.url,
            "POST",
            "/api/v1/auth/refresh",
            None,
            Some(&serde_json::json!({ "refresh_token": self.creds.refresh_token })),
        )?;
        if r.status != 200 {
            bail!(
                "the session has ended ({}); run `patronus login` again",
                error_text(&r)
            );
        }
        self.creds.access_token = r.body["access_token"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        self.creds.refresh_token = r.body["refresh_token"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        save(&self.creds)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_responses_and_chunks_parse() {
        let t = |u: &str| target(u).map(|t| (t.tls, t.host, t.authority));
        let ok = |tls: bool, host: &str, auth: &str| (tls, host.to_owned(), auth.to_owned());
        assert_eq!(
            t("http://127.0.0.1:8080/").unwrap(),
            ok(false, "127.0.0.1", "127.0.0.1:8080")
        );
        assert_eq!(t("http://ctl").unwrap(), ok(false, "ctl", "ctl:80"));
        assert_eq!(t("https://ctl").unwrap(), ok(true, "ctl", "ctl:443"));
        assert_eq!(
            t("https://[::1]:8443").unwrap(),
            ok(true, "::1", "[::1]:8443")
        );
        assert_eq!(t("http://[::1]").unwrap(), ok(false, "::1", "[::1]:80"));
        assert!(t("ctl:8080").is_err());
        assert!(t("https://ctl/api").is_err());
        let r = parse(b"HTTP/1.1 404 Not Found\r\nContent-Length: 41\r\n\r\n{\"error\":{\"code\":\"x\",\"message\":\"gone\"}}").unwrap();
        assert_eq!((r.status, error_text(&r)), (404, "gone (404)".to_owned()));
        let r = parse(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\n{\"a\"\r\n3\r\n:1}\r\n0\r\n\r\n").unwrap();
        assert_eq!(r.body["a"], 1);
    }
}
