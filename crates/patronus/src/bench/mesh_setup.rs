//! `patronus bench mesh-setup`: from an empty controller to every site enrolled and holding
//! its whole configuration, through the real API and enrolment, with simulated edges.
//!
//! For each size in `--sites`, a controller is started as its own process (`patronus
//! controller`, plain HTTP on loopback, its SQLite store in a temporary directory), so that its
//! memory and CPU are its own. Then, as an operator's script would, `--api-workers` clients
//! each take the next site: create it with two links (`POST /sites`), ask for an enrolment
//! token (`POST /sites/{id}/enrollment-tokens`), and hand the token to a simulated edge. Each
//! edge speaks the edge's protocol on one keep-alive connection: enrols with the token and a
//! public key of its own (`POST /enroll`, its links' endpoints with it), fetches its
//! configuration, then follows it with the delta long poll (`/edge/config/delta?wait=25`),
//! applying each delta to the peers it holds, until it holds every peer the topology gives it
//! (full mesh: every other site; hub and spoke: the hubs, or every site for a hub).
//!
//! Timed from the first API request to the last edge holding its whole configuration. The
//! simulated edges hold no tunnels: `bench mesh-setup --lab` is the form with real edges, each
//! size a lab of that many sites (an edge process each) enrolled through a controller with
//! TLS, timed from the first API request until every path reads Up at the controller.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};

use super::http::Client;
use super::process::ControllerProcess;
use super::{fig, progress};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Network sizes (sites, two links each), comma-separated.
    #[arg(long, default_value = "100,500,1000,2000", value_delimiter = ',')]
    sites: Vec<usize>,
    /// `full-mesh` or `hub-spoke` (2 hubs, created first).
    #[arg(long, default_value = "full-mesh")]
    topology: String,
    /// API clients creating sites and tokens at once.
    #[arg(long, default_value_t = 8)]
    api_workers: usize,
    /// Give up on a size after this many seconds.
    #[arg(long, default_value_t = 900)]
    timeout: u64,
    /// (root) Real edges in the lab instead of simulated ones: each size is a lab of that many
    /// sites (an edge process each, two links each), timed until every path reads Up at the
    /// controller. Sizes up to 60.
    #[arg(long)]
    lab: bool,
}

const HUBS: usize = 2;

/// What one simulated edge did: when it enrolled and when it held its whole configuration,
/// the configurations and deltas it fetched, and their bytes; how many were whole
/// configurations.
struct EdgeDone {
    enrolled: Instant,
    complete: Instant,
    fetches: usize,
    bytes: usize,
    whole: usize,
}

/// One simulated edge: enrols with `token`, then follows its configuration until it holds
/// `expect` peers.
async fn edge(
    addr: SocketAddr,
    token: String,
    i: usize,
    expect: usize,
    deadline: Instant,
) -> anyhow::Result<EdgeDone> {
    let mut c = Client::connect(addr, "").await?;
    let credential = enrol(&mut c, &token, i).await?;
    let enrolled = Instant::now();
    c.token = credential;
    let (mut fetches, mut bytes, mut wholes) = (0usize, 0usize, 0usize);
    let mut peers = BTreeSet::new();
    let mut etag = String::new();
    let mut whole = true;
    loop {
        if whole {
            let a = c.request("GET", "/api/v1/edge/config", None, None).await?;
            anyhow::ensure!(a.status == 200, "GET /edge/config: {}", a.status);
            let cfg: patronus_api::SiteConfig = serde_json::from_slice(&a.body)?;
            peers = cfg.peers.into_iter().map(|p| p.name).collect();
            etag = a.etag.context("no ETag")?;
            (fetches, bytes) = (fetches + 1, bytes + a.body.len());
            wholes += 1;
            whole = false;
        }
        if peers.len() >= expect {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{} of {expect} peers when the time ran out",
            peers.len()
        );
        let a = c
            .send(
                "GET",
                "/api/v1/edge/config/delta?wait=25",
                &[("If-None-Match", &etag)],
                None,
            )
            .await?;
        match a.status {
            200 => {
                let d: patronus_api::ConfigDelta = serde_json::from_slice(&a.body)?;
                for gone in d.remove {
                    peers.remove(&gone);
                }
                peers.extend(d.upsert.into_iter().map(|p| p.name));
                etag = a.etag.context("no ETag")?;
                (fetches, bytes) = (fetches + 1, bytes + a.body.len());
            }
            304 => {}
            // The controller no longer has the version held: fetch it whole, as an edge does.
            409 => whole = true,
            s => bail!("delta long poll: {s}"),
        }
    }
    Ok(EdgeDone {
        enrolled,
        complete: Instant::now(),
        fetches,
        bytes,
        whole: wholes,
    })
}

/// Enrols simulated edge `i` with `token` on `c`, as an edge does: a key pair of its own
/// (only the public key goes out) and its links' endpoints; its site credential.
pub(super) async fn enrol(c: &mut Client, token: &str, i: usize) -> anyhow::Result<String> {
    let key = patronus_edge::keys::PrivateKey::generate()?;
    let (hi, lo) = (i / 256, i % 256);
    let v = c
        .json(
            "POST",
            "/api/v1/enroll",
            Some(&json!({
                "token": token,
                "public_key": key.public().to_string(),
                "endpoints": {
                    "mpls": format!("100.{}.{hi}.{lo}:51820", 64 + hi / 256),
                    "inet": format!("100.{}.{hi}.{lo}:51820", 80 + hi / 256),
                }
            })),
            200,
        )
        .await?;
    Ok(v["credential"]
        .as_str()
        .context("no credential")?
        .to_owned())
}

/// Makes the topology hub and spoke with `hubs`, as an operator does (read, then write with
/// its ETag).
pub(super) async fn make_hub_spoke(admin: &mut Client, hubs: &[i64]) -> anyhow::Result<()> {
    let a = admin.request("GET", "/api/v1/topology", None, None).await?;
    anyhow::ensure!(a.status == 200, "GET /topology: {}", a.status);
    let a = admin
        .request(
            "PATCH",
            "/api/v1/topology",
            a.etag.as_deref(),
            Some(&json!({ "mode": "hub-spoke", "hubs": hubs })),
        )
        .await?;
    anyhow::ensure!(a.status == 200, "PATCH /topology: {}", a.status);
    Ok(())
}

/// Creates site `i` with two links and an enrolment token for it: (site id, token).
pub(super) async fn create_site(admin: &mut Client, i: usize) -> anyhow::Result<(i64, String)> {
    let (hi, lo) = (i / 256, i % 256);
    let site = admin
        .json(
            "POST",
            "/api/v1/sites",
            Some(&json!({
                "name": format!("site-{i:05}"),
                "lan_prefixes": [format!("10.{hi}.{lo}.0/24")],
                "links": [
                    { "name": "mpls", "kind": "mpls", "up_kbps": 100000, "down_kbps": 100000 },
                    { "name": "inet", "kind": "broadband", "up_kbps": 100000, "down_kbps": 100000 }
                ]
            })),
            201,
        )
        .await?;
    let id = site["id"].as_i64().context("no site id")?;
    let token = admin
        .json(
            "POST",
            &format!("/api/v1/sites/{id}/enrollment-tokens"),
            Some(&json!({})),
            201,
        )
        .await?["token"]
        .as_str()
        .context("no token")?
        .to_owned();
    Ok((id, token))
}

async fn one_size(
    n: usize,
    hub_spoke: bool,
    args: &Args,
    ctl: &ControllerProcess,
) -> anyhow::Result<Value> {
    let addr = ctl.addr;
    let token = super::push::login(addr, &ctl.password).await?;
    let (rss_before, _, cpu_before) = ctl.usage();
    let expect = move |i: usize| {
        if hub_spoke && i >= HUBS { HUBS } else { n - 1 }
    };
    let deadline = Instant::now() + Duration::from_secs(args.timeout);
    let t0 = Instant::now();
    let mut edges = Vec::with_capacity(n);
    let mut first = 0;
    if hub_spoke {
        // The hubs first, then the topology names them, then the spokes.
        let mut admin = Client::connect(addr, &token).await?;
        let mut hubs = Vec::new();
        for i in 0..HUBS {
            let (id, t) = create_site(&mut admin, i).await?;
            hubs.push(id);
            edges.push(tokio::spawn(edge(addr, t, i, expect(i), deadline)));
        }
        make_hub_spoke(&mut admin, &hubs).await?;
        first = HUBS;
    }
    let next = Arc::new(AtomicUsize::new(first));
    let mut workers = Vec::new();
    for _ in 0..args.api_workers {
        let (next, token) = (next.clone(), token.clone());
        workers.push(tokio::spawn(async move {
            let mut admin = Client::connect(addr, &token).await?;
            let mut spawned = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    break;
                }
                let (_, t) = create_site(&mut admin, i).await?;
                spawned.push(tokio::spawn(edge(addr, t, i, expect(i), deadline)));
            }
            anyhow::Ok(spawned)
        }));
    }
    for w in workers {
        edges.extend(w.await??);
    }
    let api_s = t0.elapsed().as_secs_f64();
    progress(format_args!(
        "{n} sites created, {api_s:.1} s; waiting for every edge to hold its configuration"
    ));
    let mut done = Vec::with_capacity(n);
    for (i, e) in edges.into_iter().enumerate() {
        done.push(e.await?.with_context(|| format!("edge {i}"))?);
    }
    let setup_s = done
        .iter()
        .map(|d| d.complete.saturating_duration_since(t0).as_secs_f64())
        .fold(0.0, f64::max);
    let last_enrolled_s = done
        .iter()
        .map(|d| d.enrolled.saturating_duration_since(t0).as_secs_f64())
        .fold(0.0, f64::max);
    let mut lag_us: Vec<u64> = done
        .iter()
        .map(|d| d.complete.saturating_duration_since(d.enrolled).as_micros() as u64)
        .collect();
    lag_us.sort_unstable();
    let ms = |q: f64| patronus_lab::stats::percentile(&lag_us, q).map(|v| v as f64 / 1e3);
    let (rss, hwm, cpu) = ctl.usage();
    let fetches: usize = done.iter().map(|d| d.fetches).sum();
    let bytes: usize = done.iter().map(|d| d.bytes).sum();
    // One per edge at least (its first); more are 409s: the version it held was gone.
    let wholes: usize = done.iter().map(|d| d.whole).sum();
    Ok(json!({
        "sites": n,
        "setup_s": setup_s,
        "last_enrolled_s": last_enrolled_s,
        "api_s": api_s,
        "enrolled_to_complete_p50_ms": ms(0.5),
        "enrolled_to_complete_p99_ms": ms(0.99),
        "enrolled_to_complete_max_ms": ms(1.0),
        "config_fetches": fetches,
        "config_bytes": bytes,
        "whole_config_fetches": wholes,
        "controller": {
            "rss_mb": rss,
            "peak_rss_mb": hwm,
            "rss_per_site_kb": rss.zip(rss_before).map(|(a, b)| (a - b) * 1024.0 / n as f64),
            "cpu_s": cpu.zip(cpu_before).map(|(a, b)| a - b),
        },
    }))
}

/// The lab form: `n` real sites (full mesh: each with an `inet` and an `lte` link; hub and
/// spoke: the lab's hub and `n - 1` spokes), enrolled through a controller with TLS, timed from
/// the first API request until every path reads Up at the controller.
fn lab_size(n: usize, hub_spoke: bool, args: &Args) -> anyhow::Result<Value> {
    use patronus_api::LinkKind;
    let topology = if hub_spoke {
        patronus_lab::Topology::hub_and_spokes(n - 1)?
    } else {
        super::world::full_mesh(
            n,
            &[
                ("inet", LinkKind::Broadband, None),
                ("lte", LinkKind::Lte, None),
            ],
        )
    };
    let paths = if hub_spoke {
        (n - 1) * 4
    } else {
        n * (n - 1) / 2 * 4
    };
    progress(format_args!(
        "{n} sites ({}), {paths} paths: a lab, a controller, every site through the API",
        args.topology
    ));
    let t = Instant::now();
    let (world, _receiver) = super::world::up(&topology, hub_spoke, &["failover"])?;
    let lab_s = world.api_started.saturating_duration_since(t).as_secs_f64();
    let enrolled_s = world.api_started.elapsed().as_secs_f64();
    world.wait_paths(paths, Duration::from_secs(args.timeout))?;
    // `wait_paths` reads three times in a row to be sure; the first of them is the figure.
    let setup_s = world.api_started.elapsed().as_secs_f64();
    let edges_cpu_s: f64 = world
        .edges
        .iter()
        .filter_map(|(_, pid)| super::cpu_s(*pid))
        .sum();
    Ok(json!({
        "sites": n,
        "paths": paths,
        "lab_up_s": lab_s,
        "api_and_edges_started_s": enrolled_s,
        "setup_s": setup_s,
        "edges_cpu_s": edges_cpu_s,
    }))
}

fn run_lab(args: &Args, hub_spoke: bool) -> anyhow::Result<Value> {
    anyhow::ensure!(
        args.sites.iter().all(|n| (3..=60).contains(n)),
        "--lab: sizes from 3 to 60 sites (each is an edge process and its namespaces)"
    );
    let mut sizes = Vec::new();
    for &n in &args.sites {
        // Each lab's controller has a certificate of its own, and a process pins one: a size
        // of several is run as a process of its own per size.
        let r = if args.sites.len() == 1 {
            lab_size(n, hub_spoke, args)?
        } else {
            let out = std::process::Command::new(std::env::current_exe()?)
                .args(["bench", "mesh-setup", "--lab", "--topology", &args.topology])
                .arg("--sites")
                .arg(n.to_string())
                .arg("--timeout")
                .arg(args.timeout.to_string())
                .stdin(std::process::Stdio::null())
                .stderr(std::process::Stdio::inherit())
                .output()?;
            anyhow::ensure!(
                out.status.success(),
                "{n} sites: `bench mesh-setup --lab` failed ({}); its error is above",
                out.status
            );
            let v: Value = serde_json::from_slice(&out.stdout)?;
            v["sizes"][0].clone()
        };
        progress(format_args!(
            "{n} sites: every path Up at the controller after {}",
            fig(&r["setup_s"], 1, " s")
        ));
        sizes.push(r);
    }
    Ok(json!({
        "bench": "mesh-setup",
        "form": "real edges in the lab",
        "topology": args.topology,
        "sizes": sizes,
        "machine": super::machine(),
    }))
}

pub fn run(args: &Args) -> anyhow::Result<Value> {
    anyhow::ensure!(
        !args.sites.is_empty() && args.sites.iter().all(|n| (3..=10_000).contains(n)),
        "--sites: sizes from 3 to 10000"
    );
    let hub_spoke = match args.topology.as_str() {
        "hub-spoke" => true,
        "full-mesh" => false,
        other => bail!("--topology {other}: full-mesh or hub-spoke"),
    };
    if args.lab {
        return run_lab(args, hub_spoke);
    }
    anyhow::ensure!(
        (1..=64).contains(&args.api_workers),
        "--api-workers must be 1 to 64"
    );
    let largest = args.sites.iter().max().copied().unwrap_or(0);
    // The edges' sockets only: the controller is a process of its own.
    super::push::raise_fd_limit(largest as u64 + 1024)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let mut sizes = Vec::new();
    for &n in &args.sites {
        let dir = std::env::temp_dir().join(format!(
            "patronus-bench-mesh-setup-{}-{n}",
            std::process::id()
        ));
        progress(format_args!(
            "{n} sites ({}): a controller process, then every site through the API",
            args.topology
        ));
        let result = ControllerProcess::start(&dir, None, None).and_then(|ctl| {
            let r = rt.block_on(one_size(n, hub_spoke, args, &ctl));
            ctl.stop();
            r
        });
        let _ = std::fs::remove_dir_all(&dir);
        let r = result?;
        progress(format_args!(
            "{n} sites: every edge held its configuration after {}",
            fig(&r["setup_s"], 1, " s")
        ));
        sizes.push(r);
    }
    Ok(json!({
        "bench": "mesh-setup",
        "form": "simulated edges",
        "topology": args.topology,
        "api_workers": args.api_workers,
        "sizes": sizes,
        "machine": super::machine(),
    }))
}

pub fn summary(r: &Value) -> String {
    let goal = if r["api_workers"].is_null() {
        "every path Up at the controller".to_owned()
    } else {
        format!(
            "every edge holding its configuration ({} API workers)",
            r["api_workers"]
        )
    };
    let mut lines = vec![format!(
        "mesh-setup ({}, {}): from an empty controller to {goal}",
        r["form"].as_str().unwrap_or("?"),
        r["topology"].as_str().unwrap_or("?"),
    )];
    for s in r["sizes"].as_array().into_iter().flatten() {
        if s.get("paths").is_some() {
            lines.push(format!(
                "  {} sites, {} paths: every path Up at the controller after {} (the lab up in {} before); edges' CPU {}",
                s["sites"],
                s["paths"],
                fig(&s["setup_s"], 1, " s"),
                fig(&s["lab_up_s"], 1, " s"),
                fig(&s["edges_cpu_s"], 1, " s"),
            ));
            continue;
        }
        lines.push(format!(
            "  {} sites: {} (all enrolled after {}); an edge complete {} after it enrolled (p99); {} configurations and deltas, {} of them whole ({} MB); controller {} resident, {} per site, {} CPU",
            s["sites"],
            fig(&s["setup_s"], 1, " s"),
            fig(&s["last_enrolled_s"], 1, " s"),
            fig(&s["enrolled_to_complete_p99_ms"], 0, " ms"),
            s["config_fetches"],
            s["whole_config_fetches"],
            fig(&json!(s["config_bytes"].as_f64().map(|b| b / 1e6)), 0, ""),
            fig(&s["controller"]["rss_mb"], 0, " MB"),
            fig(&s["controller"]["rss_per_site_kb"], 1, " KB"),
            fig(&s["controller"]["cpu_s"], 1, " s"),
        ));
    }
    lines.join("\n")
}
