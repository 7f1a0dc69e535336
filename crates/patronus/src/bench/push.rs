//! `patronus bench push`: real controllers (`patronus controller` processes on loopback, their
//! store an SQLite file in a temporary directory, or one PostgreSQL database on a throwaway
//! server the bench starts and stops) and N simulated edges in this process, each a real client of the
//! configuration protocol: it fetches its configuration, then waits for what changes with a
//! long poll (`If-None-Match` + `wait`) on the delta endpoint (`--full`: the whole
//! configuration). One policy is created through the API of the first controller; the
//! benchmark reports how long after that write each edge held its new configuration.
//!
//! With `--controllers N` (PostgreSQL only) the edges are spread over N controllers, all
//! serving, and the write reaches the edges of the others through PostgreSQL's `NOTIFY`.
//! A PostgreSQL run is followed by the same run on SQLite with one controller, in the same
//! JSON, to compare.
//!
//! The sites are written into the store as in `bench mesh`, each with a site credential (as
//! enrolment would leave it).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use patronus_controller::config::{Config, Database};
use serde_json::{Value, json};

use super::http::Client;
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
    /// The store: `sqlite` or `postgres` (a throwaway server the bench starts; then the same
    /// run on SQLite with one controller follows, to compare).
    #[arg(long, default_value = "sqlite")]
    backend: String,
    /// Controllers serving at once, the edges spread over them (more than one: PostgreSQL).
    #[arg(long, default_value_t = 1)]
    controllers: usize,
}

/// One request on its own connection: (status, etag, body length).
pub(super) async fn get(
    addr: SocketAddr,
    path: &str,
    token: &str,
    if_none_match: Option<&str>,
) -> anyhow::Result<(u16, Option<String>, usize)> {
    let mut c = Client::connect(addr, token).await?;
    let headers: &[(&str, &str)] = match if_none_match {
        Some(e) => &[("If-None-Match", e)],
        None => &[],
    };
    let a = c.send("GET", path, headers, None).await?;
    Ok((a.status, a.etag, a.body.len()))
}

/// One JSON request on its own connection: (status, the answer's JSON or null).
pub(super) async fn post(
    addr: SocketAddr,
    path: &str,
    token: Option<&str>,
    body: &Value,
) -> anyhow::Result<(u16, Value)> {
    let mut c = Client::connect(addr, token.unwrap_or("")).await?;
    let a = c.request("POST", path, None, Some(body)).await?;
    Ok((
        a.status,
        serde_json::from_slice(&a.body).unwrap_or(Value::Null),
    ))
}

/// A controller for a benchmark, serving on loopback: its store in a directory of the
/// caller's, with `sites` sites written into it (each enrolled, its credential kept) and the
/// first `hubs` of them hubs if given, and an admin whose password was made for it.
pub(super) struct BenchController {
    pub addr: SocketAddr,
    pub creds: Vec<String>,
    password: String,
    /// The controller's state (its store).
    state: patronus_controller::app::AppState,
    stop: tokio::sync::oneshot::Sender<()>,
    server: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl BenchController {
    pub(super) async fn start(
        dir: &std::path::Path,
        sites: usize,
        hubs: Option<usize>,
    ) -> anyhow::Result<Self> {
        let database = Database::Sqlite(dir.join("controller.db"));
        Self::start_on(dir, database, sites, hubs).await
    }

    /// A controller on `database` with `sites` sites written into it (none: a controller
    /// that joins a populated database).
    pub(super) async fn start_on(
        dir: &std::path::Path,
        database: Database,
        sites: usize,
        hubs: Option<usize>,
    ) -> anyhow::Result<Self> {
        let mut config = Config::with_data_dir(dir.to_path_buf());
        config.database = database;
        config.listen = SocketAddr::from(([127, 0, 0, 1], 0));
        // The simulated edges speak plain HTTP on loopback: this measures the controller's
        // fan-out, not TLS handshakes (each real edge's request is a TLS connection; see the
        // README).
        config.tls = patronus_controller::config::Tls::Plain;
        config.auth_rate_per_minute = 1_000_000;
        // The simulated edges all connect from 127.0.0.1, where real ones each have an
        // address of their own: the per-address cap would refuse all but 128 of them.
        config.max_connections_per_address = 1_000_000;
        let password = super::admin_password()?;
        let env = vec![
            (
                "PATRONUS_ADMIN_EMAIL".to_owned(),
                "bench@example.net".to_owned(),
            ),
            ("PATRONUS_ADMIN_PASSWORD".to_owned(), password.clone()),
        ];
        let state = patronus_controller::server::prepare(config, &env).await?;
        let creds = if sites > 0 {
            super::mesh::populate(&state.store, sites).await?
        } else {
            Vec::new()
        };
        if let Some(h) = hubs {
            super::mesh::hub_and_spoke(&state.store, h).await?;
        }
        let (addr_tx, addr_rx) = tokio::sync::oneshot::channel();
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(patronus_controller::server::serve(
            state.clone(),
            async {
                let _ = stop_rx.await;
            },
            move |a: &patronus_controller::server::Listening| {
                let _ = addr_tx.send(a.addr);
            },
        ));
        let addr = addr_rx.await.context("the controller did not start")?;
        Ok(Self {
            addr,
            creds,
            password,
            state,
            stop,
            server,
        })
    }

    /// The admin's access token.
    pub(super) async fn login(&self) -> anyhow::Result<String> {
        login(self.addr, &self.password).await
    }

    /// The controller's store.
    pub(super) fn store(&self) -> &patronus_controller::store::Store {
        &self.state.store
    }

    /// Stops the server and waits for it.
    pub(super) async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.server.await;
    }
}

/// The bench admin's access token from the controller at `addr`.
pub(super) async fn login(addr: SocketAddr, password: &str) -> anyhow::Result<String> {
    let (status, login) = post(
        addr,
        "/api/v1/auth/login",
        None,
        &json!({ "email": "bench@example.net", "password": password }),
    )
    .await?;
    anyhow::ensure!(status == 200, "login: {status}");
    Ok(login["access_token"]
        .as_str()
        .unwrap_or_default()
        .to_owned())
}

/// Configuration long polls the controller at `addr` holds now, from its metrics
/// (`patronus_edge_config_long_polls`).
async fn long_polls(addr: SocketAddr, token: &str) -> anyhow::Result<usize> {
    let mut c = Client::connect(addr, token).await?;
    let a = c.request("GET", "/metrics", None, None).await?;
    anyhow::ensure!(a.status == 200, "GET /metrics: {}", a.status);
    let text = String::from_utf8_lossy(&a.body);
    text.lines()
        .find_map(|l| l.strip_prefix("patronus_edge_config_long_polls "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|v| v as usize)
        .context("no patronus_edge_config_long_polls in the controller's metrics")
}

pub(super) fn raise_fd_limit(need: u64) -> anyhow::Result<()> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft >= need {
        return Ok(());
    }
    if hard >= need {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
        return Ok(());
    }
    // Root may raise the hard limit too (up to the kernel's fs.nr_open).
    setrlimit(Resource::RLIMIT_NOFILE, need, need).map_err(|e| {
        anyhow::anyhow!(
            "{need} file descriptors are needed and the hard limit is {hard} ({e} raising it; \
             run as root or raise it with ulimit -Hn)"
        )
    })
}

pub fn run(args: &Args) -> anyhow::Result<Value> {
    anyhow::ensure!(
        (1..=20_000).contains(&args.edges),
        "--edges must be 1 to 20000"
    );
    anyhow::ensure!(
        (1..=16).contains(&args.controllers),
        "--controllers must be 1 to 16"
    );
    let hub_spoke = match args.topology.as_str() {
        "hub-spoke" => true,
        "full-mesh" => false,
        other => bail!("--topology {other}: hub-spoke or full-mesh"),
    };
    let postgres = match args.backend.as_str() {
        "sqlite" => {
            anyhow::ensure!(
                args.controllers == 1,
                "--controllers {}: several controllers share a PostgreSQL database (--backend \
                 postgres); SQLite is one controller's",
                args.controllers
            );
            false
        }
        "postgres" => true,
        other => bail!("--backend {other}: sqlite or postgres"),
    };
    // The edges' sockets only: the controllers are processes of their own.
    raise_fd_limit(args.edges as u64 + 1024)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let mut runs = Vec::new();
    if postgres {
        progress(format_args!("a throwaway PostgreSQL server"));
        let pg = patronus_lab::postgres::Postgres::start()
            .context("starting PostgreSQL for the bench")?;
        pg.create_database("bench_push")
            .context("creating the bench's database")?;
        let database = Database::Postgres(pg.url("bench_push"));
        runs.push(rt.block_on(run_once(args, hub_spoke, database, args.controllers))?);
        drop(pg);
    }
    let dir = std::env::temp_dir().join(format!("patronus-bench-push-{}", std::process::id()));
    let database = Database::Sqlite(dir.join("controller.db"));
    let sqlite = rt.block_on(run_once(args, hub_spoke, database, 1));
    let _ = std::fs::remove_dir_all(&dir);
    runs.push(sqlite?);
    let first = runs[0].clone();
    Ok(json!({
        "bench": "push",
        "edges": args.edges,
        "topology": args.topology,
        "protocol": if args.full { "full" } else { "delta" },
        "backend": first["backend"],
        "controllers": first["controllers"],
        "initial_fetch_ms": first["initial_fetch_ms"],
        "policy_write_ms": first["policy_write_ms"],
        "p50_ms": first["p50_ms"],
        "p99_ms": first["p99_ms"],
        "max_ms": first["max_ms"],
        "bytes_per_edge": first["bytes_per_edge"],
        "runs": runs,
        "machine": super::machine(),
    }))
}

/// One run: `controllers` controllers on `database`, the edges spread over them.
async fn run_once(
    args: &Args,
    hub_spoke: bool,
    database: Database,
    controllers: usize,
) -> anyhow::Result<Value> {
    let backend = match database {
        Database::Sqlite(_) => "sqlite",
        Database::Postgres(_) => "postgres",
    };
    let dir = std::env::temp_dir().join(format!(
        "patronus-bench-push-{}-{backend}",
        std::process::id()
    ));
    let result = async {
        progress(format_args!(
            "{controllers} controller(s) on {backend} with {} sites ({})",
            args.edges, args.topology
        ));
        // The store is written here, then served by controller processes of their own: the
        // edges' sockets and the controllers' are then in different processes, each under
        // its open-file limit (10,000 edges hold 10,000 sockets on each side).
        let url = match &database {
            Database::Sqlite(path) => path.display().to_string(),
            Database::Postgres(u) => u.clone(),
        };
        let first =
            BenchController::start_on(&dir, database, args.edges, hub_spoke.then_some(2)).await?;
        let (creds, password) = (first.creds.clone(), first.password.clone());
        let store = first.store().clone();
        first.stop().await;
        store.close().await;
        let mut cs = Vec::new();
        for _ in 0..controllers {
            cs.push(super::process::ControllerProcess::start(
                &dir,
                Some(&url),
                Some(password.clone()),
            )?);
        }
        let addrs: Vec<SocketAddr> = cs.iter().map(|c| c.addr).collect();
        let mut tokens = Vec::new();
        for a in &addrs {
            tokens.push(login(*a, &password).await?);
        }

        progress(format_args!(
            "{} edges fetch their configuration and long-poll for the next",
            args.edges
        ));
        // Every edge fetches its configuration, then waits for the next, on the controller
        // its number picks.
        let waiting = Arc::new(AtomicUsize::new(0));
        let mut edges = Vec::new();
        let t = Instant::now();
        let poll = if args.full {
            "/api/v1/edge/config?wait=25"
        } else {
            "/api/v1/edge/config/delta?wait=25"
        };
        for (i, c) in creds.into_iter().enumerate() {
            let waiting = waiting.clone();
            let addr = addrs[i % addrs.len()];
            edges.push(tokio::spawn(async move {
                // One keep-alive connection, as an edge holds to its controller.
                let mut conn = Client::connect(addr, &c).await?;
                let a = conn
                    .request("GET", "/api/v1/edge/config", None, None)
                    .await?;
                anyhow::ensure!(
                    a.status == 200,
                    "initial fetch: {} {}",
                    a.status,
                    String::from_utf8_lossy(&a.body)
                );
                let etag = a.etag.context("no ETag")?;
                waiting.fetch_add(1, Ordering::SeqCst);
                let a = conn
                    .send("GET", poll, &[("If-None-Match", &etag)], None)
                    .await?;
                let at = Instant::now();
                anyhow::ensure!(
                    a.status == 200 && a.etag.as_deref() != Some(&etag),
                    "long poll: {}",
                    a.status
                );
                anyhow::Ok((at, a.body.len()))
            }));
        }
        while waiting.load(Ordering::SeqCst) < args.edges {
            // An edge that gave up says why, rather than the wait running out.
            if let Some(i) = edges.iter().position(|e| e.is_finished()) {
                let e = edges.swap_remove(i);
                match e.await? {
                    Err(e) => return Err(e.context(format!("edge {i}"))),
                    Ok(_) => bail!("edge {i} had its configuration before the write"),
                }
            }
            anyhow::ensure!(
                t.elapsed() < Duration::from_secs(120),
                "{} of {} edges connected in 120 s",
                waiting.load(Ordering::SeqCst),
                args.edges
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let initial_ms = t.elapsed().as_secs_f64() * 1e3;
        // The write is timed only once every long poll is held by a controller: an edge whose
        // request was still on its way would be timed from the write, not from the wake.
        loop {
            let mut held = 0;
            for (a, tok) in addrs.iter().zip(&tokens) {
                held += long_polls(*a, tok).await?;
            }
            if held >= args.edges {
                break;
            }
            anyhow::ensure!(
                t.elapsed() < Duration::from_secs(120),
                "{held} of {} long polls held in 120 s",
                args.edges
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }

        let token = tokens[0].clone();
        let policy = json!({
            "name": "voice", "order": 10, "class": "realtime", "steering": "duplicate",
            "match": { "protocol": "udp", "dst_ports": ["16384-32767"] }
        });
        progress(format_args!(
            "one policy written; waiting for every edge to hold its new configuration"
        ));
        let t0 = Instant::now();
        let (status, _) = post(addrs[0], "/api/v1/policies", Some(&token), &policy).await?;
        anyhow::ensure!(status == 201, "policy: {status}");
        let write_ms = t0.elapsed().as_secs_f64() * 1e3;
        let mut delays_us = Vec::with_capacity(edges.len());
        let mut per_controller: Vec<Vec<u64>> = vec![Vec::new(); controllers];
        let mut bytes = 0usize;
        for (i, e) in edges.into_iter().enumerate() {
            let (at, b) = e.await??;
            let us = at.saturating_duration_since(t0).as_micros() as u64;
            delays_us.push(us);
            per_controller[i % controllers].push(us);
            bytes += b;
        }
        for c in cs {
            c.stop();
        }
        delays_us.sort_unstable();
        let pct =
            |v: &[u64], q: f64| patronus_lab::stats::percentile(v, q).map(|us| us as f64 / 1e3);
        let by_controller: Vec<Value> = per_controller
            .iter_mut()
            .map(|v| {
                v.sort_unstable();
                json!({ "edges": v.len(), "p99_ms": pct(v, 0.99), "max_ms": pct(v, 1.0) })
            })
            .collect();
        anyhow::Ok(json!({
            "backend": backend,
            "controllers": controllers,
            "initial_fetch_ms": initial_ms,
            "policy_write_ms": write_ms,
            "p50_ms": pct(&delays_us, 0.50),
            "p99_ms": pct(&delays_us, 0.99),
            "max_ms": pct(&delays_us, 1.0),
            "by_controller": by_controller,
            "bytes_per_edge": bytes as f64 / args.edges as f64,
        }))
    }
    .await;
    let _ = std::fs::remove_dir_all(&dir);
    result
}

pub fn summary(r: &Value) -> String {
    let runs = r["runs"].as_array().cloned().unwrap_or_default();
    let each: Vec<String> = runs
        .iter()
        .map(|run| {
            format!(
                "{} controller(s) on {}: p50 {}, p99 {}, slowest {}",
                run["controllers"],
                run["backend"].as_str().unwrap_or("?"),
                fig(&run["p50_ms"], 1, " ms"),
                fig(&run["p99_ms"], 1, " ms"),
                fig(&run["max_ms"], 1, " ms"),
            )
        })
        .collect();
    format!(
        "push: {} edges ({}, {}): every edge held the new configuration after {}; {} per edge",
        r["edges"],
        r["topology"].as_str().unwrap_or("?"),
        r["protocol"].as_str().unwrap_or("?"),
        each.join("; "),
        fig(&r["bytes_per_edge"], 0, " bytes"),
    )
}
