//! A throwaway S3-compatible object store for the tests and drills that need one, started by
//! them: moto's server (PyPI `moto[server]`, which `.ci/deps` installs into
//! `target/tools/python`), on 127.0.0.1 on a free port, holding its buckets in memory.
//! [`ObjectServer`] stops it when dropped.
//!
//! moto speaks S3's REST protocol (the requests a real client makes: path-style buckets,
//! multipart uploads, list-objects-v2) but does not check request signatures; an S3 client's
//! signing is what a real endpoint (AWS, MinIO, Ceph) checks.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The access key and secret the server is used with (moto takes any).
pub const ACCESS_KEY_ID: &str = "patronus-lab";
pub const SECRET_ACCESS_KEY: &str = "patronus-lab-secret";

#[derive(Debug, thiserror::Error)]
pub enum S3Error {
    #[error(
        "moto_server not found (looked for $PATRONUS_MOTO_SERVER, {0}, and on PATH): run \
         .ci/deps, which installs PyPI's moto[server] into target/tools/python"
    )]
    NotInstalled(String),
    #[error("{what}: {error}")]
    Io { what: String, error: std::io::Error },
    #[error("{0}")]
    Failed(String),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> S3Error {
    let what = what.into();
    move |error| S3Error::Io { what, error }
}

/// Where `moto_server` is: `$PATRONUS_MOTO_SERVER`, the repository's `target/tools/python`
/// (where `.ci/deps` puts it), or `PATH`.
pub fn moto_server() -> Result<PathBuf, S3Error> {
    if let Some(p) = std::env::var_os("PATRONUS_MOTO_SERVER") {
        return Ok(p.into());
    }
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/tools/python/bin");
    for dir in [PathBuf::from("target/tools/python/bin"), repo.clone()]
        .into_iter()
        .chain(std::env::split_paths(
            &std::env::var_os("PATH").unwrap_or_default(),
        ))
    {
        let p = dir.join("moto_server");
        if p.is_file() {
            return Ok(p);
        }
    }
    Err(S3Error::NotInstalled(
        repo.join("moto_server").display().to_string(),
    ))
}

/// A running server; stopped on drop.
#[derive(Debug)]
pub struct ObjectServer {
    addr: SocketAddr,
    child: Child,
    /// The network namespace it listens in (None: this process's).
    ns: Option<String>,
}

impl ObjectServer {
    /// Starts the server on this namespace's loopback; returns once it answers (30 s at most).
    pub fn start() -> Result<Self, S3Error> {
        Self::start_in(None)
    }

    /// Starts the server on the loopback of network namespace `ns` (a lab node's, from
    /// [`crate::Lab::ns`]: for a controller running there), or this one's.
    pub fn start_in(ns: Option<&str>) -> Result<Self, S3Error> {
        let bin = moto_server()?;
        let ns = ns.map(str::to_owned);
        let port = in_ns(ns.as_deref(), || {
            TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
                .and_then(|l| l.local_addr())
                .map_err(io("finding a free port"))
        })?
        .port();
        let mut cmd = match &ns {
            Some(n) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", n]).arg(&bin);
                c
            }
            None => Command::new(&bin),
        };
        let child = cmd
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(io(format!("starting {}", bin.display())))?;
        let mut server = Self {
            addr: SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
            child,
            ns,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(status) = server.request("GET", "/", b"") {
                if status == 200 {
                    return Ok(server);
                }
            }
            if let Ok(Some(exit)) = server.child.try_wait() {
                return Err(S3Error::Failed(format!(
                    "moto_server exited at start: {exit}"
                )));
            }
            if Instant::now() > deadline {
                return Err(S3Error::Failed(format!(
                    "moto_server did not answer on {} within 30 s",
                    server.addr
                )));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `http://127.0.0.1:PORT`, the endpoint to give a client.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Makes bucket `name`.
    pub fn create_bucket(&self, name: &str) -> Result<(), S3Error> {
        match self.request("PUT", &format!("/{name}"), b"")? {
            200 => Ok(()),
            s => Err(S3Error::Failed(format!("creating bucket {name}: HTTP {s}"))),
        }
    }

    /// The keys in bucket `name` (for checks), from a plain list-objects request.
    pub fn keys(&self, bucket: &str) -> Result<Vec<String>, S3Error> {
        let (status, body) = self.exchange("GET", &format!("/{bucket}?list-type=2"), b"")?;
        if status != 200 {
            return Err(S3Error::Failed(format!("listing {bucket}: HTTP {status}")));
        }
        let body = String::from_utf8_lossy(&body);
        Ok(body
            .split("<Key>")
            .skip(1)
            .filter_map(|s| s.split_once("</Key>").map(|(k, _)| k.to_owned()))
            .collect())
    }

    fn request(&self, method: &str, path: &str, body: &[u8]) -> Result<u16, S3Error> {
        self.exchange(method, path, body).map(|(s, _)| s)
    }

    /// One HTTP/1.1 request on a new connection (unsigned: moto takes it), from the server's
    /// namespace.
    fn exchange(&self, method: &str, path: &str, body: &[u8]) -> Result<(u16, Vec<u8>), S3Error> {
        in_ns(self.ns.as_deref(), || {
            self.exchange_here(method, path, body)
        })
    }

    fn exchange_here(
        &self,
        method: &str,
        path: &str,
        body: &[u8],
    ) -> Result<(u16, Vec<u8>), S3Error> {
        let what = || format!("{method} {}{path}", self.endpoint());
        let mut s =
            TcpStream::connect_timeout(&self.addr, Duration::from_secs(2)).map_err(io(what()))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(io(what()))?;
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nContent-Length: {}\r\nConnection: \
             close\r\n\r\n",
            self.addr,
            body.len()
        );
        s.write_all(head.as_bytes()).map_err(io(what()))?;
        s.write_all(body).map_err(io(what()))?;
        let mut out = Vec::new();
        s.read_to_end(&mut out).map_err(io(what()))?;
        let text = String::from_utf8_lossy(&out);
        let status = text
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| S3Error::Failed(format!("{}: not an HTTP response", what())))?;
        let body = match out.windows(4).position(|w| w == b"\r\n\r\n") {
            Some(i) => out[i + 4..].to_vec(),
            None => Vec::new(),
        };
        Ok((status, body))
    }
}

/// Runs `f` in namespace `ns` (or here).
fn in_ns<T: Send>(
    ns: Option<&str>,
    f: impl FnOnce() -> Result<T, S3Error> + Send,
) -> Result<T, S3Error> {
    match ns {
        Some(n) => crate::netns::run_in(n, f),
        None => f(),
    }
}

impl From<crate::netns::NetnsError> for S3Error {
    fn from(e: crate::netns::NetnsError) -> Self {
        Self::Failed(e.to_string())
    }
}

impl Drop for ObjectServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
