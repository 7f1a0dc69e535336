//! `patronus bench push`: a real controller (its HTTP server on loopback, its SQLite store in a
//! temporary directory) and N simulated edges in this process, each a real client of the
//! configuration protocol: it fetches its configuration, then waits for what changes with a
//! long poll (`If-None-Match` + `wait`) on the delta endpoint (`--full`: the whole
//! configuration). One policy is created through the API; the benchmark
//! reports how long after that write each edge held its new configuration.
//!
//! The sites are written into the store as in `bench mesh`, each with a site credential (as
//! enrolment would leave it).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use patronus_controller::config::Config;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{fig, progress};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Simulated edges (one site each).
    #[arg(long, default_value_t = 1000)]
    edges: usize,
    /// `hub-spoke` (2 hubs) or `full-mesh`.
    #[arg(long, default_value = "hub-spoke")]
    topology: String,
    /// Long-poll for the whole configuration instead of a delta (what changed since the
    /// version held), to compare.
    #[arg(long)]
    full: bool,
}

/// One request on its own connection: (status, etag, body length).
pub(super) async fn get(
    addr: SocketAddr,
    path: &str,
    token: &str,
    if_none_match: Option<&str>,
) -> anyhow::Result<(u16, Option<String>, usize)> {
    let mut s = TcpStream::connect(addr).await?;
    let inm = if_none_match
        .map(|e| format!("If-None-Match: {e}\r\n"))
        .unwrap_or_default();
    s.write_all(
        format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\n{inm}Connection: close\r\n\r\n"
        )
        .as_bytes(),
    )
    .await?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await?;
    let split = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("not HTTP")?;
    let head = String::from_utf8_lossy(&buf[..split]);
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("no status")?;
    let etag = head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case("etag").then(|| v.trim().to_owned())
    });
    Ok((status, etag, buf.len() - split - 4))
}

pub(super) async fn post(
    addr: SocketAddr,
    path: &str,
    token: Option<&str>,
    body: &Value,
) -> anyhow::Result<(u16, Value)> {
    let mut s = TcpStream::connect(addr).await?;
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let body = body.to_string();
    s.write_all(
        format!(
            "POST {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
    .await?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await?;
    let text = String::from_utf8_lossy(&buf);
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("no status")?;
    let body = text
        .split_once("\r\n\r\n")
        .and_then(|(_, b)| serde_json::from_str(b).ok())
        .unwrap_or(Value::Null);
    Ok((status, body))
}

/// Lets this process hold a socket per edge on both ends.
/// A controller for a benchmark, serving on loopback: its store in a directory of the
/// caller's, with `sites` sites written into it (each enrolled, its credential kept) and the
/// first `hubs` of them hubs if given, and an admin whose password was made for it.
pub(super) struct BenchController {
    pub addr: SocketAddr,
    pub creds: Vec<String>,
    password: String,
    stop: tokio::sync::oneshot::Sender<()>,
    server: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl BenchController {
    pub(super) async fn start(
        dir: &std::path::Path,
        sites: usize,
        hubs: Option<usize>,
    ) -> anyhow::Result<Self> {
        let mut config = Config::with_data_dir(dir.to_path_buf());
        config.listen = SocketAddr::from(([127, 0, 0, 1], 0));
        config.auth_rate_per_minute = 1_000_000;
        let mut pw = [0u8; 18];
        getrandom::getrandom(&mut pw)?;
        let password = format!("{}-Aa1", patronus_controller::auth::b64url(&pw));
        let env = vec![
            (
                "PATRONUS_ADMIN_EMAIL".to_owned(),
                "bench@example.net".to_owned(),
            ),
            ("PATRONUS_ADMIN_PASSWORD".to_owned(), password.clone()),
        ];
        let state = patronus_controller::server::prepare(config, &env).await?;
        let creds = super::mesh::populate(&state.store, sites).await?;
        if let Some(h) = hubs {
            super::mesh::hub_and_spoke(&state.store, h).await?;
        }
        let (addr_tx, addr_rx) = tokio::sync::oneshot::channel();
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(patronus_controller::server::serve(
            state,
            async {
                let _ = stop_rx.await;
            },
            move |a| {
                let _ = addr_tx.send(a);
            },
        ));
        let addr = addr_rx.await.context("the controller did not start")?;
        Ok(Self {
            addr,
            creds,
            password,
            stop,
            server,
        })
    }

    /// The admin's access token.
    pub(super) async fn login(&self) -> anyhow::Result<String> {
        let (status, login) = post(
            self.addr,
            "/api/v1/auth/login",
            None,
            &json!({ "email": "bench@example.net", "password": self.password }),
        )
        .await?;
        anyhow::ensure!(status == 200, "login: {status}");
        Ok(login["access_token"]
            .as_str()
            .unwrap_or_default()
            .to_owned())
    }

    /// Stops the server and waits for it.
    pub(super) async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.server.await;
    }
}

fn raise_fd_limit(need: u64) -> anyhow::Result<()> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft < need {
        anyhow::ensure!(
            hard >= need,
            "{need} file descriptors are needed and the hard limit is {hard}"
        );
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    }
    Ok(())
}

pub fn run(args: &Args) -> anyhow::Result<Value> {
    anyhow::ensure!(
        (1..=20_000).contains(&args.edges),
        "--edges must be 1 to 20000"
    );
    let hub_spoke = match args.topology.as_str() {
        "hub-spoke" => true,
        "full-mesh" => false,
        other => bail!("--topology {other}: hub-spoke or full-mesh"),
    };
    raise_fd_limit(2 * args.edges as u64 + 256)?;
    let dir = std::env::temp_dir().join(format!("patronus-bench-push-{}", std::process::id()));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let result = rt.block_on(async {
        progress(format_args!(
            "a controller with {} sites ({})",
            args.edges, args.topology
        ));
        let c = BenchController::start(&dir, args.edges, hub_spoke.then_some(2)).await?;
        let (addr, creds) = (c.addr, c.creds.clone());

        progress(format_args!(
            "{} edges fetch their configuration and long-poll for the next",
            args.edges
        ));
        // Every edge fetches its configuration, then waits for the next.
        let waiting = Arc::new(AtomicUsize::new(0));
        let mut edges = Vec::new();
        let t = Instant::now();
        let poll = if args.full {
            "/api/v1/edge/config?wait=25"
        } else {
            "/api/v1/edge/config/delta?wait=25"
        };
        for c in creds {
            let waiting = waiting.clone();
            edges.push(tokio::spawn(async move {
                let (status, etag, _) = get(addr, "/api/v1/edge/config", &c, None).await?;
                anyhow::ensure!(status == 200, "initial fetch: {status}");
                let etag = etag.context("no ETag")?;
                waiting.fetch_add(1, Ordering::SeqCst);
                let (status, new, bytes) = get(addr, poll, &c, Some(&etag)).await?;
                let at = Instant::now();
                anyhow::ensure!(
                    status == 200 && new.as_deref() != Some(&etag),
                    "long poll: {status}"
                );
                anyhow::Ok((at, bytes))
            }));
        }
        while waiting.load(Ordering::SeqCst) < args.edges {
            anyhow::ensure!(
                t.elapsed() < Duration::from_secs(120),
                "edges did not all connect"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let initial_ms = t.elapsed().as_secs_f64() * 1e3;
        // Let the last long polls reach the server.
        tokio::time::sleep(Duration::from_millis(500)).await;

        let token = c.login().await?;
        let policy = json!({
            "name": "voice", "order": 10, "class": "realtime", "steering": "duplicate",
            "match": { "protocol": "udp", "dst_ports": ["16384-32767"] }
        });
        progress(format_args!(
            "one policy written; waiting for every edge to hold its new configuration"
        ));
        let t0 = Instant::now();
        let (status, _) = post(addr, "/api/v1/policies", Some(&token), &policy).await?;
        anyhow::ensure!(status == 201, "policy: {status}");
        let write_ms = t0.elapsed().as_secs_f64() * 1e3;
        let mut delays_us = Vec::with_capacity(edges.len());
        let mut bytes = 0usize;
        for e in edges {
            let (at, b) = e.await??;
            delays_us.push(at.saturating_duration_since(t0).as_micros() as u64);
            bytes += b;
        }
        c.stop().await;
        delays_us.sort_unstable();
        let pct = |q: f64| patronus_lab::stats::percentile(&delays_us, q).map(|us| us as f64 / 1e3);
        anyhow::Ok(json!({
            "bench": "push",
            "edges": args.edges,
            "topology": args.topology,
            "protocol": if args.full { "full" } else { "delta" },
            "initial_fetch_ms": initial_ms,
            "policy_write_ms": write_ms,
            "p50_ms": pct(0.50),
            "p99_ms": pct(0.99),
            "max_ms": pct(1.0),
            "bytes_per_edge": bytes as f64 / args.edges as f64,
            "machine": super::machine(),
        }))
    });
    let _ = std::fs::remove_dir_all(&dir);
    result
}

pub fn summary(r: &Value) -> String {
    format!(
        "push: {} edges ({}, {}): every edge held the new configuration after p50 {}, p99 {}, \
         slowest {}; {} per edge",
        r["edges"],
        r["topology"].as_str().unwrap_or("?"),
        r["protocol"].as_str().unwrap_or("?"),
        fig(&r["p50_ms"], 1, " ms"),
        fig(&r["p99_ms"], 1, " ms"),
        fig(&r["max_ms"], 1, " ms"),
        fig(&r["bytes_per_edge"], 0, " bytes"),
    )
}
