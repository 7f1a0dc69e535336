//! `patronus bench api-load`: the controller's API under load from many clients at once. A real
//! controller (its HTTP server on loopback; its store SQLite, or PostgreSQL on a throwaway
//! server the bench starts and stops) holds `--sites` sites with two links each, and a load
//! generator in this process keeps `--connections` HTTP/1.1 keep-alive connections busy, each
//! sending its next request as soon as the last was answered (a closed loop), for `--seconds`
//! per scenario. Every request carries the admin's bearer token, so every one is authenticated.
//!
//! Scenarios: `me` (`GET /auth/me`: authentication alone), `sites-page` (`GET /sites`, a page
//! of 50), `site` (`GET /sites/{id}`, a random site), `paths-page` (`GET /paths`, a page of
//! 50), `path` (`GET /paths/{id}`, a random path), `write` (each connection creates a site with
//! two links, patches it with `If-Match`, deletes it, and again), `mix` (nine reads of the four
//! kinds above for one `PATCH` of a site of the connection's own). For each: requests, the
//! rate, p50/p99/max latency and every answer that was not the expected status, by status.
//!
//! The generator shares the machine (and the process) with the controller: the rates are what
//! both together reach, as an operator's load generator on the same host would see.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use patronus_controller::config::Database;
use serde_json::{Value, json};

use patronus_lab::stats::SplitMix64 as Rng;

use super::http::{Answer, Client};
use super::push::BenchController;
use super::{fig, progress};

/// What the issue asks of authenticated reads on this machine, generator included.
const GOAL_READS_PER_S: f64 = 10_000.0;
const GOAL_P99_MS: f64 = 20.0;

const SCENARIOS: [&str; 7] = [
    "me",
    "sites-page",
    "site",
    "paths-page",
    "path",
    "write",
    "mix",
];

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Sites in the controller's store (two links each, full mesh).
    #[arg(long, default_value_t = 1000)]
    sites: usize,
    /// Keep-alive connections of the load generator, each with one request in flight.
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// How long each scenario runs, in seconds.
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// The stores to run on, comma-separated: `sqlite`, `postgres` (a throwaway server the
    /// bench starts and stops).
    #[arg(long, default_value = "sqlite,postgres", value_delimiter = ',')]
    backend: Vec<String>,
    /// Scenarios to run, comma-separated (all by default): me, sites-page, site, paths-page,
    /// path, write, mix.
    #[arg(long, value_delimiter = ',')]
    scenario: Vec<String>,
}

/// A generator for which site or path a request names, seeded apart for each connection.
fn rng() -> Rng {
    let mut b = [0u8; 8];
    let _ = getrandom::getrandom(&mut b);
    Rng(u64::from_le_bytes(b))
}

/// What one connection saw: latencies (µs) of answers with the expected status, and the
/// unexpected ones by status (0: the connection failed).
#[derive(Default)]
struct Tally {
    ok_us: Vec<u32>,
    bad: std::collections::BTreeMap<u16, u64>,
}

impl Tally {
    fn record(&mut self, started: Instant, got: &anyhow::Result<Answer>, expect: u16) -> bool {
        let us = started.elapsed().as_micros().min(u32::MAX as u128) as u32;
        match got {
            Ok(a) if a.status == expect => {
                self.ok_us.push(us);
                true
            }
            Ok(a) => {
                *self.bad.entry(a.status).or_default() += 1;
                false
            }
            Err(_) => {
                *self.bad.entry(0).or_default() += 1;
                false
            }
        }
    }
}

/// What the scenarios need to know of the store.
struct Network {
    sites: usize,
    /// The first site's id; the others follow it (written in one transaction).
    first_site: i64,
    first_link: i64,
}

/// The reads the mix draws from, evenly.
const MIXED_READS: [&str; 4] = ["sites-page", "site", "paths-page", "path"];

impl Network {
    /// The request path of read scenario `kind`.
    fn read(&self, kind: &str, rng: &mut Rng) -> String {
        match kind {
            "me" => "/api/v1/auth/me".to_owned(),
            "sites-page" => "/api/v1/sites?limit=50".to_owned(),
            "site" => format!(
                "/api/v1/sites/{}",
                self.first_site + rng.below(self.sites) as i64
            ),
            "paths-page" => "/api/v1/paths?limit=50".to_owned(),
            _ => self.path(rng),
        }
    }

    /// A path that exists in the full mesh: two links of two different sites.
    fn path(&self, rng: &mut Rng) -> String {
        let a = rng.below(self.sites);
        let b = (a + 1 + rng.below(self.sites - 1)) % self.sites;
        let la = self.first_link + 2 * a as i64 + rng.below(2) as i64;
        let lb = self.first_link + 2 * b as i64 + rng.below(2) as i64;
        format!("/api/v1/paths/{}-{}", la.min(lb), la.max(lb))
    }
}

/// A site body the write scenarios create: a unique name and a unique /32 of 172.16.0.0/12.
fn new_site(n: u32) -> Value {
    json!({
        "name": format!("load-{n}"),
        "lan_prefixes": [format!("172.{}.{}.{}/32", 16 + (n >> 16), (n >> 8) & 255, n & 255)],
        "links": [
            { "name": "mpls", "kind": "mpls" },
            { "name": "inet", "kind": "broadband" }
        ]
    })
}

/// The id of the object an answer holds.
fn id_of(a: &Answer) -> Option<i64> {
    serde_json::from_slice::<Value>(&a.body).ok()?["id"].as_i64()
}

/// The merge patch the writes send (a new description each time).
fn patch(k: u64) -> Value {
    json!({ "description": format!("patched {k}") })
}

/// One connection's closed loop until `until`.
async fn one_connection(
    mut c: Client,
    scenario: &'static str,
    net: Arc<Network>,
    serial: Arc<AtomicU32>,
    until: Instant,
) -> Tally {
    let mut t = Tally::default();
    let mut rng = rng();
    // The mix's own site, created before the clock matters to it (its creation is not counted).
    let mut own: Option<(i64, String)> = None;
    if scenario == "mix" {
        let n = serial.fetch_add(1, Ordering::Relaxed);
        if let Ok(a) = c
            .request("POST", "/api/v1/sites", None, Some(&new_site(n)))
            .await
            && a.status == 201
        {
            own = id_of(&a).zip(a.etag);
        }
    }
    let mut k = 0u64;
    while Instant::now() < until {
        k += 1;
        let ok = if scenario == "write" {
            let n = serial.fetch_add(1, Ordering::Relaxed);
            let s = Instant::now();
            let a = c
                .request("POST", "/api/v1/sites", None, Some(&new_site(n)))
                .await;
            let created = t.record(s, &a, 201);
            let a = a.ok().filter(|_| created);
            match (a.as_ref().and_then(id_of), a.and_then(|a| a.etag)) {
                (Some(id), Some(etag)) => {
                    let path = format!("/api/v1/sites/{id}");
                    let s = Instant::now();
                    let p = c
                        .request("PATCH", &path, Some(&etag), Some(&patch(k)))
                        .await;
                    let patched = t.record(s, &p, 200);
                    let etag = p.ok().filter(|_| patched).and_then(|a| a.etag);
                    let s = Instant::now();
                    let d = c
                        .request("DELETE", &path, etag.as_deref().or(Some("*")), None)
                        .await;
                    t.record(s, &d, 204)
                }
                _ => false,
            }
        } else if scenario == "mix" && k % 10 == 0 {
            match own.as_mut() {
                Some((id, etag)) => {
                    let s = Instant::now();
                    let p = c
                        .request(
                            "PATCH",
                            &format!("/api/v1/sites/{id}"),
                            Some(etag),
                            Some(&patch(k)),
                        )
                        .await;
                    let ok = t.record(s, &p, 200);
                    if let Some(e) = p.ok().filter(|_| ok).and_then(|a| a.etag) {
                        *etag = e;
                    }
                    ok
                }
                None => {
                    *t.bad.entry(0).or_default() += 1;
                    false
                }
            }
        } else {
            let kind = if scenario == "mix" {
                MIXED_READS[rng.below(MIXED_READS.len())]
            } else {
                scenario
            };
            let path = net.read(kind, &mut rng);
            let s = Instant::now();
            let a = c.request("GET", &path, None, None).await;
            t.record(s, &a, 200)
        };
        // A failed connection is opened again (and its failure counted above).
        if !ok && let Ok(fresh) = Client::connect(c.addr, &c.token).await {
            c = fresh;
        }
    }
    t
}

async fn one_scenario(
    scenario: &'static str,
    args: &Args,
    addr: SocketAddr,
    token: &str,
    net: &Arc<Network>,
    serial: &Arc<AtomicU32>,
) -> anyhow::Result<Value> {
    let mut clients = Vec::with_capacity(args.connections);
    for _ in 0..args.connections {
        clients.push(Client::connect(addr, token).await?);
    }
    progress(format_args!(
        "{scenario}: {} connections for {} s",
        args.connections, args.seconds
    ));
    let start = Instant::now();
    let until = start + Duration::from_secs_f64(args.seconds);
    let tasks: Vec<_> = clients
        .into_iter()
        .map(|c| {
            tokio::spawn(one_connection(
                c,
                scenario,
                net.clone(),
                serial.clone(),
                until,
            ))
        })
        .collect();
    let mut all = Tally::default();
    for task in tasks {
        let t = task.await?;
        all.ok_us.extend(t.ok_us);
        for (k, v) in t.bad {
            *all.bad.entry(k).or_default() += v;
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    let errors: u64 = all.bad.values().sum();
    let mut us = all.ok_us;
    us.sort_unstable();
    let ms = |q: f64| patronus_lab::stats::percentile(&us, q).map(|v| f64::from(v) / 1e3);
    let per_s = (!us.is_empty()).then(|| us.len() as f64 / elapsed);
    let reads = !matches!(scenario, "write" | "mix");
    Ok(json!({
        "scenario": scenario,
        "requests": us.len(),
        "seconds": elapsed,
        "per_s": per_s,
        "p50_ms": ms(0.50),
        "p99_ms": ms(0.99),
        "max_ms": ms(1.0),
        "errors": errors,
        "errors_by_status": all.bad.iter().map(|(k, v)| (if *k == 0 { "connection".to_owned() } else { k.to_string() }, *v)).collect::<std::collections::BTreeMap<_, _>>(),
        "goal_met": reads.then(|| {
            per_s.is_some_and(|r| r >= GOAL_READS_PER_S)
                && ms(0.99).is_some_and(|p| p < GOAL_P99_MS)
                && errors == 0
        }),
    }))
}

/// The controller's data directory for a run on `backend` (removed after it).
fn scratch_dir(backend: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!(
        "patronus-bench-api-load-{}-{backend}",
        std::process::id()
    ))
}

async fn one_backend(
    args: &Args,
    database: Database,
    scenarios: &[&'static str],
) -> anyhow::Result<Value> {
    let backend = match database {
        Database::Sqlite(_) => "sqlite",
        Database::Postgres(_) => "postgres",
    };
    let dir = scratch_dir(backend);
    let result = async {
        progress(format_args!(
            "a controller on {backend} with {} sites",
            args.sites
        ));
        let c = BenchController::start_on(&dir, database, args.sites, None).await?;
        let token = c.login().await?;
        let ids =
            patronus_controller::store::topology::site_names(&mut *c.store().conn().await?).await?;
        let first_site = *ids.keys().next().context("no sites")?;
        let net = Arc::new(Network {
            sites: args.sites,
            first_site,
            // Each site's two links were written right after it, in one transaction.
            first_link: first_link(c.addr, &token, first_site).await?,
        });
        let serial = Arc::new(AtomicU32::new(0));
        let mut out = Vec::new();
        for s in scenarios {
            out.push(one_scenario(s, args, c.addr, &token, &net, &serial).await?);
        }
        c.stop().await;
        anyhow::Ok(json!({ "backend": backend, "scenarios": out }))
    }
    .await;
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// The id of the first site's first link, read through the API.
async fn first_link(addr: SocketAddr, token: &str, site: i64) -> anyhow::Result<i64> {
    let mut client = Client::connect(addr, token).await?;
    let v = client
        .json("GET", &format!("/api/v1/sites/{site}"), None, 200)
        .await?;
    v["links"]
        .as_array()
        .and_then(|l| l.iter().filter_map(|l| l["id"].as_i64()).min())
        .context("the first site has no links")
}

pub fn run(args: &Args) -> anyhow::Result<Value> {
    anyhow::ensure!(
        (2..=60_000).contains(&args.sites),
        "--sites must be 2 to 60000"
    );
    anyhow::ensure!(
        (1..=1024).contains(&args.connections),
        "--connections must be 1 to 1024"
    );
    anyhow::ensure!(
        args.seconds > 0.0 && args.seconds <= 3600.0,
        "--seconds must be over 0 and at most 3600"
    );
    let scenarios: Vec<&'static str> = if args.scenario.is_empty() {
        SCENARIOS.to_vec()
    } else {
        args.scenario
            .iter()
            .map(|s| {
                SCENARIOS
                    .iter()
                    .find(|k| **k == s.as_str())
                    .copied()
                    .with_context(|| format!("--scenario {s}: one of {}", SCENARIOS.join(", ")))
            })
            .collect::<anyhow::Result<_>>()?
    };
    for b in &args.backend {
        anyhow::ensure!(
            matches!(b.as_str(), "sqlite" | "postgres"),
            "--backend {b}: sqlite or postgres"
        );
    }
    super::push::raise_fd_limit(4 * args.connections as u64 + 256)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let mut backends = Vec::new();
    for b in &args.backend {
        if b == "postgres" {
            progress(format_args!("a throwaway PostgreSQL server"));
            let pg = patronus_lab::postgres::Postgres::start()
                .context("starting PostgreSQL for the bench")?;
            pg.create_database("bench_api_load")
                .context("creating the bench's database")?;
            let database = Database::Postgres(pg.url("bench_api_load"));
            backends.push(rt.block_on(one_backend(args, database, &scenarios))?);
        } else {
            let database = Database::Sqlite(scratch_dir("sqlite").join("controller.db"));
            backends.push(rt.block_on(one_backend(args, database, &scenarios))?);
        }
    }
    Ok(json!({
        "bench": "api-load",
        "sites": args.sites,
        "connections": args.connections,
        "seconds_per_scenario": args.seconds,
        "goal": { "reads_per_s": GOAL_READS_PER_S, "p99_ms": GOAL_P99_MS },
        "backends": backends,
        "machine": super::machine(),
    }))
}

pub fn summary(r: &Value) -> String {
    let mut lines = vec![format!(
        "api-load: {} sites, {} connections, {} s a scenario (goal for reads: {} req/s, p99 < {} ms, no error)",
        r["sites"], r["connections"], r["seconds_per_scenario"], GOAL_READS_PER_S, GOAL_P99_MS
    )];
    for b in r["backends"].as_array().into_iter().flatten() {
        for s in b["scenarios"].as_array().into_iter().flatten() {
            lines.push(format!(
                "  {} {}: {}, p50 {}, p99 {}, max {}, {} errors{}",
                b["backend"].as_str().unwrap_or("?"),
                s["scenario"].as_str().unwrap_or("?"),
                fig(&s["per_s"], 0, " req/s"),
                fig(&s["p50_ms"], 2, " ms"),
                fig(&s["p99_ms"], 2, " ms"),
                fig(&s["max_ms"], 2, " ms"),
                s["errors"],
                match s["goal_met"].as_bool() {
                    Some(true) => " (goal met)",
                    Some(false) => " (goal NOT met)",
                    None => "",
                }
            ));
        }
    }
    lines.join("\n")
}
