//! `patronus bench db-stress`: the store under a year's worth of an operator's questions and a
//! big network's telemetry.
//!
//! For each backend in `--backend`, a controller is started as its own process (`patronus
//! controller`, plain HTTP on loopback; SQLite in a temporary directory, or a throwaway
//! PostgreSQL server) and `--sites` sites are created in hub and spoke (2 hubs) through the API,
//! each with an edge enrolled (its own key pair, through `POST /enroll`). Then, the controller
//! stopped:
//!
//! 1. the store is filled from this process, through the store's own functions where it has
//!    them: `--samples` path samples over the last 7 days on the real paths, another tenth of
//!    that older than the retention, `--audit` audit records over 90 days and `--failovers`
//!    failover events over 30 days; the database's size is read after each;
//! 2. the retention sweep the controller runs every minute ([`telemetry::sweep`]) is timed on
//!    it: the rows beyond retention removed, and how long that took.
//!
//! The controller started again on that store:
//!
//! 3. the list endpoints are read `--reads` times each, one request after another on a
//!    keep-alive connection, with their filters and deep pages: p50/p99/max and errors;
//! 4. every site's edge reports its paths every `--interval` seconds (the edge's default, 5 s)
//!    for `--ingest-s` seconds after a first round (a hub reports ~4 paths per spoke, a spoke 8):
//!    RTT, jitter and loss with noise around each path's own level, now and then a change beyond
//!    it, and traffic on `--busy` of the paths. Measured: the reports answered and their
//!    latency, whether every report went out on time (the controller keeps up), the rows each
//!    table gained per second and per day, the share of measurements the history kept (the
//!    controller's own counter), the controller's CPU, and the database's growth.
//!
//! [`telemetry::sweep`]: patronus_controller::store::telemetry::sweep

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use patronus_controller::store::db::{query, query_scalar};
use patronus_controller::store::{Database, Store, telemetry};
use patronus_lab::stats::SplitMix64;
use serde_json::{Value, json};

use super::http::Client;
use super::process::ControllerProcess;
use super::{fig, progress};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Sites (two links each, hub and spoke with 2 hubs), each with an enrolled edge.
    #[arg(long, default_value_t = 1000)]
    sites: usize,
    /// Path samples in the store, over the last 7 days (and a tenth more beyond retention).
    #[arg(long, default_value_t = 1_000_000)]
    samples: usize,
    /// Audit records, over the last 90 days.
    #[arg(long, default_value_t = 100_000)]
    audit: usize,
    /// Failover events, over the last 30 days.
    #[arg(long, default_value_t = 10_000)]
    failovers: usize,
    /// Requests timed per list endpoint.
    #[arg(long, default_value_t = 200)]
    reads: usize,
    /// Seconds of telemetry ingest measured, after a first round.
    #[arg(long, default_value_t = 120)]
    ingest_s: u64,
    /// Seconds between two reports of one edge.
    #[arg(long, default_value_t = 5)]
    interval: u64,
    /// The share of paths that carry traffic during the ingest.
    #[arg(long, default_value_t = 0.25)]
    busy: f64,
    /// The stores to run on, comma-separated: `sqlite`, `postgres` (a throwaway server).
    #[arg(long, default_value = "sqlite", value_delimiter = ',')]
    backend: Vec<String>,
}

const HUBS: usize = 2;
const DAY_S: i64 = 86_400;

/// One end of a path as its edge reports it.
#[derive(Clone)]
struct End {
    path_id: String,
    site_id: i64,
    peer: String,
    local_link: String,
    remote_link: String,
}

/// The network as the API made it: each site's name, id and edge credential, and every path
/// from both of its ends.
struct Network {
    sites: Vec<(String, i64, String)>,
    ends: Vec<End>,
}

async fn enrol(addr: SocketAddr, token: &str, i: usize) -> anyhow::Result<String> {
    super::mesh_setup::enrol(&mut Client::connect(addr, "").await?, token, i).await
}

/// Creates the sites (hubs first, then the topology, then the spokes, 8 clients at once) and
/// enrols an edge for each; then reads every path.
async fn build_network(addr: SocketAddr, token: &str, n: usize) -> anyhow::Result<Network> {
    let mut admin = Client::connect(addr, token).await?;
    let mut sites = vec![None; n];
    let mut hubs = Vec::new();
    for (i, slot) in sites.iter_mut().enumerate().take(HUBS) {
        let (id, t) = super::mesh_setup::create_site(&mut admin, i).await?;
        hubs.push(id);
        *slot = Some((format!("site-{i:05}"), id, enrol(addr, &t, i).await?));
    }
    super::mesh_setup::make_hub_spoke(&mut admin, &hubs).await?;
    let next = Arc::new(AtomicUsize::new(HUBS));
    let mut workers = Vec::new();
    for _ in 0..8 {
        let (next, token) = (next.clone(), token.to_owned());
        workers.push(tokio::spawn(async move {
            let mut admin = Client::connect(addr, &token).await?;
            let mut made = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    break;
                }
                let (id, t) = super::mesh_setup::create_site(&mut admin, i).await?;
                made.push((i, (format!("site-{i:05}"), id, enrol(addr, &t, i).await?)));
                if i % 200 == 0 {
                    progress(format_args!("{i} of {n} sites created and enrolled"));
                }
            }
            anyhow::Ok(made)
        }));
    }
    for w in workers {
        for (i, s) in w.await?? {
            sites[i] = Some(s);
        }
    }
    let sites: Vec<_> = sites
        .into_iter()
        .map(|s| s.context("a site"))
        .collect::<Result<_, _>>()?;
    let mut ends = Vec::new();
    let mut offset = 0;
    loop {
        let page = admin
            .json(
                "GET",
                &format!("/api/v1/paths?limit=500&offset={offset}"),
                None,
                200,
            )
            .await?;
        let items = page["items"].as_array().context("no items")?;
        for p in items {
            let id = p["id"].as_str().context("a path id")?;
            let end = |a: &str, b: &str| -> anyhow::Result<End> {
                Ok(End {
                    path_id: id.to_owned(),
                    site_id: p[a]["site_id"].as_i64().context("site_id")?,
                    peer: p[b]["site"].as_str().context("site")?.to_owned(),
                    local_link: p[a]["link"].as_str().context("link")?.to_owned(),
                    remote_link: p[b]["link"].as_str().context("link")?.to_owned(),
                })
            };
            ends.push(end("a", "b")?);
            ends.push(end("b", "a")?);
        }
        offset += items.len();
        if items.is_empty() || offset as i64 >= page["total"].as_i64().unwrap_or(0) {
            break;
        }
    }
    anyhow::ensure!(!ends.is_empty(), "the controller shows no paths");
    Ok(Network { sites, ends })
}

/// The database's size in bytes, as its own engine counts it: on SQLite the pages in use (the
/// file keeps the pages that deletes freed, and reuses them).
async fn db_bytes(store: &Store, sqlite: bool) -> anyhow::Result<i64> {
    let sql = if sqlite {
        "SELECT (page_count - freelist_count) * page_size
         FROM pragma_page_count(), pragma_freelist_count(), pragma_page_size()"
    } else {
        "SELECT pg_database_size(current_database())"
    };
    Ok(query_scalar(sql)
        .fetch_one(&mut *store.conn().await?)
        .await?)
}

async fn count(store: &Store, table: &str) -> anyhow::Result<i64> {
    Ok(query_scalar(&format!("SELECT COUNT(*) FROM {table}"))
        .fetch_one(&mut *store.conn().await?)
        .await?)
}

/// Writes `n` samples over the path ends, `at` from `from` to `to` (unix seconds), oldest
/// first, in transactions of 10,000 rows.
async fn fill_samples(
    store: &Store,
    ends: &[End],
    n: usize,
    (from, to): (i64, i64),
    rng: &mut SplitMix64,
) -> anyhow::Result<()> {
    let mut done = 0;
    while done < n {
        let mut tx = store.begin().await?;
        let upto = (done + 10_000).min(n);
        for chunk_start in (done..upto).step_by(500) {
            let chunk_end = (chunk_start + 500).min(upto);
            let rows = chunk_end - chunk_start;
            let sql = format!(
                "INSERT INTO path_samples
                 (path_id, site_id, at_s, state, rtt_ms, jitter_ms, loss_pct) VALUES {}",
                vec!["(?, ?, ?, ?, ?, ?, ?)"; rows].join(", ")
            );
            let mut q = query(&sql);
            for k in chunk_start..chunk_end {
                let e = &ends[k % ends.len()];
                let at = from + ((to - from) as f64 * k as f64 / n as f64) as i64;
                let state = if rng.next_f64() < 0.01 {
                    "degraded"
                } else {
                    "up"
                };
                q = q
                    .bind(e.path_id.as_str())
                    .bind(e.site_id)
                    .bind(at)
                    .bind(state)
                    .bind(Some(15.0 + 30.0 * rng.next_f64()))
                    .bind(rng.next_f64() * 3.0)
                    .bind(if rng.next_f64() < 0.05 {
                        rng.next_f64() * 2.0
                    } else {
                        0.0
                    });
            }
            q.execute(&mut *tx).await?;
        }
        tx.commit().await?;
        done = upto;
    }
    Ok(())
}

const ACTIONS: [&str; 8] = [
    "site.update",
    "site.create",
    "policy.update",
    "sla_class.update",
    "topology.update",
    "user.login",
    "webhook.update",
    "site.rotate_key",
];

async fn fill_audit(store: &Store, n: usize, now_ms: i64) -> anyhow::Result<()> {
    let span = 90 * DAY_S * 1000;
    let mut done = 0;
    while done < n {
        let mut tx = store.begin().await?;
        let upto = (done + 10_000).min(n);
        for chunk_start in (done..upto).step_by(500) {
            let chunk_end = (chunk_start + 500).min(upto);
            let sql = format!(
                "INSERT INTO audit_log (at_ms, actor_id, actor, action, target, details, source)
                 VALUES {}",
                vec!["(?, ?, ?, ?, ?, ?, ?)"; chunk_end - chunk_start].join(", ")
            );
            let mut q = query(&sql);
            for k in chunk_start..chunk_end {
                let at = now_ms - span + (span as f64 * k as f64 / n as f64) as i64;
                q = q
                    .bind(at)
                    .bind(Some(1i64))
                    .bind("bench@example.net")
                    .bind(ACTIONS[k % ACTIONS.len()])
                    .bind(format!("sites/{}", k % 1000 + 1))
                    .bind(r#"{"fields":["name","lan_prefixes"]}"#)
                    .bind("127.0.0.1");
            }
            q.execute(&mut *tx).await?;
        }
        tx.commit().await?;
        done = upto;
    }
    Ok(())
}

/// Failovers of the spokes between their two links to a hub, through the store's own write.
async fn fill_failovers(store: &Store, ends: &[End], n: usize, now_ms: i64) -> anyhow::Result<()> {
    let span = 30 * DAY_S * 1000;
    let mut seq: HashMap<i64, u64> = HashMap::new();
    let mut done = 0;
    while done < n {
        let mut tx = store.begin().await?;
        for k in done..(done + 5_000).min(n) {
            let e = &ends[k % ends.len()];
            let s = seq.entry(e.site_id).or_insert(0);
            *s += 1;
            let ev = patronus_api::FailoverEvent {
                seq: *s,
                at_ms: now_ms - span + (span as f64 * k as f64 / n as f64) as i64,
                peer: e.peer.clone(),
                from_local_link: e.local_link.clone(),
                from_remote_link: e.remote_link.clone(),
                to_local_link: e.local_link.clone(),
                to_remote_link: e.remote_link.clone(),
                reason: patronus_api::FailoverReason::PathDown,
                flows: (k % 17) as u32,
            };
            let path = Some(e.path_id.clone());
            telemetry::insert_failover(&mut tx, e.site_id, &ev, (&path, &path)).await?;
        }
        tx.commit().await?;
        done = (done + 5_000).min(n);
    }
    Ok(())
}

/// `reads` requests of each of `pages` (name, paths to cycle through), one after another:
/// each one's p50/p99/max and errors.
async fn time_reads(
    addr: SocketAddr,
    token: &str,
    pages: &[(&str, Vec<String>)],
    reads: usize,
) -> anyhow::Result<Value> {
    let mut c = Client::connect(addr, token).await?;
    let mut out = serde_json::Map::new();
    for (name, paths) in pages {
        let mut us = Vec::with_capacity(reads);
        let mut errors = 0;
        let mut first_error = None;
        for k in 0..reads {
            let p = &paths[k % paths.len()];
            let t = Instant::now();
            let a = c.request("GET", p, None, None).await?;
            if a.status == 200 {
                us.push(t.elapsed().as_micros() as u64);
            } else {
                errors += 1;
                first_error.get_or_insert_with(|| {
                    format!("{p}: {} {}", a.status, String::from_utf8_lossy(&a.body))
                });
            }
        }
        us.sort_unstable();
        let ms = |q| patronus_lab::stats::percentile(&us, q).map(|v| v as f64 / 1e3);
        out.insert(
            (*name).to_owned(),
            json!({
                "example": paths[0],
                "reads": us.len(),
                "errors": errors,
                "first_error": first_error,
                "p50_ms": ms(0.5),
                "p99_ms": ms(0.99),
                "max_ms": ms(1.0),
            }),
        );
        progress(format_args!(
            "{name}: p99 {}",
            fig(&out[*name]["p99_ms"], 2, " ms")
        ));
    }
    Ok(Value::Object(out))
}

/// One path's level and what it is now, as one end's edge measures it.
struct Measure {
    rtt: f64,
    jitter: f64,
    loss: f64,
    down: bool,
    tx: u64,
}

/// What an edge reported: answers and their latency (µs), and reports that went out late
/// (the previous one still unanswered when the next was due).
#[derive(Default)]
struct Sent {
    ok: usize,
    errors: usize,
    first_error: Option<String>,
    late: usize,
    latency_us: Vec<u64>,
}

/// One simulated edge reporting its `ends` every `interval` from `start` until `until`;
/// reports from `measure_from` on are counted.
#[allow(clippy::too_many_arguments)]
async fn reporter(
    addr: SocketAddr,
    credential: String,
    ends: Vec<End>,
    seed: u64,
    busy: f64,
    (start, interval): (tokio::time::Instant, Duration),
    (measure_from, until): (tokio::time::Instant, tokio::time::Instant),
) -> anyhow::Result<Sent> {
    let mut rng = SplitMix64(seed);
    let mut c = Client::connect(addr, &credential).await?;
    let started_ms = patronus_controller::store::now_ms();
    let mut state: Vec<Measure> = ends
        .iter()
        .map(|_| Measure {
            rtt: 10.0 + 60.0 * rng.next_f64(),
            jitter: 0.2 + 2.0 * rng.next_f64(),
            loss: 0.0,
            down: false,
            tx: 0,
        })
        .collect();
    let busy: Vec<bool> = ends.iter().map(|_| rng.next_f64() < busy).collect();
    let mut tick = tokio::time::interval_at(start, interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sent = Sent::default();
    loop {
        let due = tick.tick().await;
        if due >= until {
            return Ok(sent);
        }
        let counted = due >= measure_from;
        if counted && due.elapsed() > interval / 2 {
            sent.late += 1;
        }
        let mut paths = Vec::with_capacity(ends.len());
        for ((e, m), busy) in ends.iter().zip(&mut state).zip(&busy) {
            // Noise within the deadbands mostly; one report in a hundred moves beyond them,
            // one in a thousand takes the path down or back up.
            let x = rng.next_f64();
            if x < 0.001 {
                m.down = !m.down;
            } else if x < 0.01 {
                m.rtt *= 1.2 + 0.3 * rng.next_f64();
                if m.rtt > 300.0 {
                    m.rtt = 10.0 + 60.0 * rng.next_f64();
                }
            }
            if *busy {
                m.tx += 50_000 + (rng.next_u64() % 1_000_000);
            }
            let noise = 1.0 + 0.05 * (rng.next_f64() - 0.5);
            paths.push(json!({
                "peer": e.peer,
                "local_link": e.local_link,
                "remote_link": e.remote_link,
                "state": if m.down { "down" } else { "up" },
                "rtt_ms": (!m.down).then_some(m.rtt * noise),
                "jitter_ms": m.jitter * noise,
                "loss_pct": if m.down { 100.0 } else { m.loss },
                "tx_bytes": m.tx,
                "rx_bytes": m.tx / 2,
                "tx_packets": m.tx / 1000,
                "rx_packets": m.tx / 2000,
            }));
        }
        let body = json!({ "started_ms": started_ms, "paths": paths });
        let t = Instant::now();
        let a = c
            .request("POST", "/api/v1/edge/telemetry", None, Some(&body))
            .await;
        if !counted {
            let a = a?;
            anyhow::ensure!(a.status == 204, "a first report: {}", a.status);
            continue;
        }
        match a {
            Ok(a) if a.status == 204 => {
                sent.ok += 1;
                sent.latency_us.push(t.elapsed().as_micros() as u64);
            }
            Ok(a) => {
                sent.errors += 1;
                sent.first_error.get_or_insert_with(|| {
                    format!("{} {}", a.status, String::from_utf8_lossy(&a.body))
                });
            }
            Err(e) => {
                sent.errors += 1;
                sent.first_error.get_or_insert_with(|| e.to_string());
                c = Client::connect(addr, &credential).await?;
            }
        }
    }
}

/// The controller's count of measurements it kept and passed over.
async fn kept_counts(addr: SocketAddr, token: &str) -> anyhow::Result<(f64, f64)> {
    let mut c = Client::connect(addr, token).await?;
    let a = c.request("GET", "/metrics", None, None).await?;
    anyhow::ensure!(a.status == 200, "GET /metrics: {}", a.status);
    let text = String::from_utf8_lossy(&a.body);
    let read = |label: &str| {
        text.lines()
            .find_map(|l| {
                l.strip_prefix(&format!(
                    "patronus_path_measurements_total{{kept=\"{label}\"}} "
                ))
            })
            .and_then(|v| v.trim().parse::<f64>().ok())
            .with_context(|| format!("no patronus_path_measurements_total{{kept=\"{label}\"}}"))
    };
    Ok((read("true")?, read("false")?))
}

async fn ingest(
    args: &Args,
    net: &Network,
    ctl: &ControllerProcess,
    token: &str,
    store: &Store,
    sqlite: bool,
) -> anyhow::Result<Value> {
    let interval = Duration::from_secs(args.interval);
    let mut by_site: HashMap<i64, Vec<End>> = HashMap::new();
    for e in &net.ends {
        by_site.entry(e.site_id).or_default().push(e.clone());
    }
    let start = tokio::time::Instant::now() + Duration::from_millis(500);
    // One round to warm up (every path's first report is kept), then the window measured.
    let measure_from = start + interval;
    let until = measure_from + Duration::from_secs(args.ingest_s);
    let n = net.sites.len();
    let mut tasks = Vec::new();
    for (i, (_, id, credential)) in net.sites.iter().enumerate() {
        // The edges' reports spread over the interval, as independent edges' are.
        let offset = interval.mul_f64(i as f64 / n as f64);
        tasks.push(tokio::spawn(reporter(
            ctl.addr,
            credential.clone(),
            by_site.remove(id).unwrap_or_default(),
            0x5eed ^ ((i as u64) << 8),
            args.busy,
            (start + offset, interval),
            (measure_from + offset, until + offset),
        )));
    }
    let measurements_per_round = net.ends.len();
    tokio::time::sleep_until(measure_from).await;
    let before = (
        count(store, "path_samples").await?,
        count(store, "traffic_samples").await?,
        db_bytes(store, sqlite).await?,
        ctl.usage().2,
        kept_counts(ctl.addr, token).await?,
    );
    let t = Instant::now();
    progress(format_args!(
        "{n} edges reporting {measurements_per_round} path measurements every {} s for {} s",
        args.interval, args.ingest_s
    ));
    tokio::time::sleep_until(until + interval).await;
    let mut sent = Sent::default();
    for task in tasks {
        let s = task.await??;
        sent.ok += s.ok;
        sent.errors += s.errors;
        sent.late += s.late;
        sent.latency_us.extend(s.latency_us);
        if sent.first_error.is_none() {
            sent.first_error = s.first_error;
        }
    }
    let elapsed_s = t.elapsed().as_secs_f64();
    let after = (
        count(store, "path_samples").await?,
        count(store, "traffic_samples").await?,
        db_bytes(store, sqlite).await?,
        ctl.usage().2,
        kept_counts(ctl.addr, token).await?,
    );
    sent.latency_us.sort_unstable();
    let ms = |q| patronus_lab::stats::percentile(&sent.latency_us, q).map(|v| v as f64 / 1e3);
    // Every edge sent exactly the reports due in the window (`ingest_s` from its own first
    // one), and everything after them was idle: rates are per second of the window.
    let window = args.ingest_s as f64;
    let secs = window;
    let per_s = |a: i64, b: i64| (b - a) as f64 / secs;
    let (kept, passed) = (after.4.0 - before.4.0, after.4.1 - before.4.1);
    let expected_reports = n as f64 * window / args.interval as f64;
    Ok(json!({
        "sites": n,
        "interval_s": args.interval,
        "window_s": window,
        "measured_for_s": elapsed_s,
        "busy_share": args.busy,
        "path_measurements_per_round": measurements_per_round,
        "reports": {
            "expected": expected_reports.round(),
            "answered": sent.ok,
            "errors": sent.errors,
            "first_error": sent.first_error,
            "late": sent.late,
            "p50_ms": ms(0.5),
            "p99_ms": ms(0.99),
            "max_ms": ms(1.0),
        },
        "keeps_up": sent.errors == 0 && sent.late == 0
            && sent.ok as f64 >= 0.98 * expected_reports,
        "measurements_per_s": (kept + passed) / secs,
        "kept_share": (kept + passed > 0.0).then(|| kept / (kept + passed)),
        "path_samples_per_s": per_s(before.0, after.0),
        "traffic_samples_per_s": per_s(before.1, after.1),
        "rows_per_day": (per_s(before.0, after.0) + per_s(before.1, after.1)) * DAY_S as f64,
        "database_growth_mb_per_day": per_s(before.2, after.2) * DAY_S as f64 / 1e6,
        "controller_cpu_cores": before.3.zip(after.3).map(|(a, b)| (b - a) / secs),
    }))
}

async fn one_backend(args: &Args, database: Option<String>) -> anyhow::Result<Value> {
    let backend = if database.is_some() {
        "postgres"
    } else {
        "sqlite"
    };
    let dir = std::env::temp_dir().join(format!(
        "patronus-bench-db-stress-{}-{backend}",
        std::process::id()
    ));
    let result = async {
        progress(format_args!(
            "{backend}: a controller process, {} sites through the API",
            args.sites
        ));
        let ctl = ControllerProcess::start(&dir, database.as_deref(), None)?;
        let token = super::push::login(ctl.addr, &ctl.password).await?;
        let t = Instant::now();
        let net = build_network(ctl.addr, &token, args.sites).await?;
        let setup_s = t.elapsed().as_secs_f64();
        let password = ctl.password.clone();
        ctl.stop();

        let db = match &database {
            Some(url) => Database::Postgres(url.clone()),
            None => Database::Sqlite(dir.join("controller.db")),
        };
        let sqlite = database.is_none();
        let store = Store::connect(&db).await?;
        let now = patronus_controller::store::now_s();
        let mut rng = SplitMix64(0xdb57);
        let size0 = db_bytes(&store, sqlite).await?;
        let expired = args.samples / 10;
        progress(format_args!(
            "{} path samples beyond retention, then {} over the last week",
            expired, args.samples
        ));
        let t = Instant::now();
        let (old_from, old_to) = (now - 9 * DAY_S, now - 8 * DAY_S);
        fill_samples(&store, &net.ends, expired, (old_from, old_to), &mut rng).await?;
        // An hour's margin: nothing of the week expires while the bench runs.
        let (week_from, week_to) = (now - 7 * DAY_S + 3600, now);
        fill_samples(&store, &net.ends, args.samples, (week_from, week_to), &mut rng).await?;
        let samples_s = t.elapsed().as_secs_f64();
        let size1 = db_bytes(&store, sqlite).await?;
        progress(format_args!("{} audit records", args.audit));
        let t = Instant::now();
        fill_audit(&store, args.audit, now * 1000).await?;
        let audit_s = t.elapsed().as_secs_f64();
        let size2 = db_bytes(&store, sqlite).await?;
        progress(format_args!("{} failover events", args.failovers));
        let t = Instant::now();
        fill_failovers(&store, &net.ends, args.failovers, now * 1000).await?;
        let failovers_s = t.elapsed().as_secs_f64();
        let size3 = db_bytes(&store, sqlite).await?;

        progress(format_args!("the retention sweep"));
        let t = Instant::now();
        let swept = telemetry::sweep(&store, patronus_controller::store::now_s())
            .await?;
        let sweep_s = t.elapsed().as_secs_f64();
        let swept_samples = swept
            .iter()
            .find(|(t, _)| *t == "path_samples")
            .map_or(0, |(_, n)| *n);
        anyhow::ensure!(
            swept_samples as usize == expired,
            "the sweep removed {swept_samples} path samples of the {expired} beyond retention"
        );
        // The sweep again, with nothing to remove: what every minute of a quiet store costs.
        let t = Instant::now();
        telemetry::sweep(&store, patronus_controller::store::now_s()).await?;
        let idle_sweep_s = t.elapsed().as_secs_f64();
        let rows = json!({
            "path_samples": count(&store, "path_samples").await?,
            "audit_log": count(&store, "audit_log").await?,
            "failover_events": count(&store, "failover_events").await?,
        });

        progress(format_args!("{backend}: the controller again, on the filled store"));
        let ctl = ControllerProcess::start(&dir, database.as_deref(), Some(password))?;
        let token = super::push::login(ctl.addr, &ctl.password).await?;
        let hub = net.sites[0].1;
        let spoke = net.sites[net.sites.len() - 1].1;
        let path_ids: Vec<&str> = net.ends.iter().step_by(7).map(|e| e.path_id.as_str()).collect();
        let each = |f: &dyn Fn(&str) -> String| path_ids.iter().map(|p| f(p)).collect::<Vec<_>>();
        let (hour_ago, week_ago) = (now - 3600, now - 7 * DAY_S);
        let day_ms = (now - DAY_S) * 1000;
        let deep = |total: usize| (total / 2 / 50) * 50;
        let pages: Vec<(&str, Vec<String>)> = vec![
            ("audit_newest", vec!["/api/v1/audit?limit=50".into()]),
            (
                "audit_by_action",
                vec!["/api/v1/audit?action=policy.update&limit=50".into()],
            ),
            (
                "audit_last_day",
                vec![format!("/api/v1/audit?since={day_ms}&limit=50")],
            ),
            (
                "audit_deep_page",
                vec![format!("/api/v1/audit?limit=50&offset={}", deep(args.audit))],
            ),
            (
                "failovers_newest",
                vec!["/api/v1/failover/events?limit=50".into()],
            ),
            (
                "failovers_of_a_site",
                vec![format!("/api/v1/failover/events?site={spoke}&limit=50")],
            ),
            (
                "failovers_of_a_hub_last_day",
                vec![format!(
                    "/api/v1/failover/events?site={hub}&since={day_ms}&limit=50"
                )],
            ),
            (
                "failovers_deep_page",
                vec![format!(
                    "/api/v1/failover/events?limit=50&offset={}",
                    deep(args.failovers)
                )],
            ),
            (
                "path_metrics_last_hour",
                each(&|p| format!("/api/v1/paths/{p}/metrics?since={hour_ago}&limit=500")),
            ),
            (
                "path_metrics_week_hourly",
                each(&|p| {
                    format!("/api/v1/paths/{p}/metrics?since={week_ago}&resolution=3600&limit=500")
                }),
            ),
            (
                "path_events",
                each(&|p| format!("/api/v1/paths/{p}/events?limit=50")),
            ),
        ];
        progress(format_args!("{} reads of each list endpoint", args.reads));
        let reads = time_reads(ctl.addr, &token, &pages, args.reads).await?;
        let ingest = ingest(args, &net, &ctl, &token, &store, sqlite).await?;
        ctl.stop();
        store.close().await;
        let mb = |b: i64| b as f64 / 1e6;
        anyhow::Ok(json!({
            "backend": backend,
            "setup_s": setup_s,
            "paths": net.ends.len() / 2,
            "fill": {
                "path_samples": args.samples,
                "path_samples_beyond_retention": expired,
                "audit_records": args.audit,
                "failover_events": args.failovers,
                "path_samples_s": samples_s,
                "audit_s": audit_s,
                "failovers_s": failovers_s,
            },
            "database_mb": {
                "sites_only": mb(size0),
                "with_samples": mb(size1),
                "with_audit": mb(size2),
                "with_failovers": mb(size3),
            },
            "bytes_per_row": {
                "path_sample": (size1 - size0) as f64 / (args.samples + expired).max(1) as f64,
                "audit_record": (size2 - size1) as f64 / args.audit.max(1) as f64,
                "failover_event": (size3 - size2) as f64 / args.failovers.max(1) as f64,
            },
            "sweep": {
                "removed": swept.iter().map(|(t, n)| (t.to_string(), json!(n))).collect::<serde_json::Map<_, _>>(),
                "seconds": sweep_s,
                "idle_seconds": idle_sweep_s,
                "path_samples_per_s": (sweep_s > 0.0).then(|| swept_samples as f64 / sweep_s),
            },
            "rows": rows,
            "reads": reads,
            "ingest": ingest,
        }))
    }
    .await;
    let _ = std::fs::remove_dir_all(&dir);
    result
}

pub fn run(args: &Args) -> anyhow::Result<Value> {
    anyhow::ensure!(
        (3..=10_000).contains(&args.sites),
        "--sites: from 3 to 10000"
    );
    anyhow::ensure!(
        args.samples <= 50_000_000 && args.audit <= 10_000_000 && args.failovers <= 10_000_000,
        "--samples at most 50000000, --audit and --failovers at most 10000000"
    );
    anyhow::ensure!((1..=100_000).contains(&args.reads), "--reads: 1 to 100000");
    anyhow::ensure!(
        (1..=3600).contains(&args.interval),
        "--interval: 1 to 3600 s"
    );
    anyhow::ensure!(
        (args.interval..=86_400).contains(&args.ingest_s),
        "--ingest-s: from --interval to 86400"
    );
    anyhow::ensure!((0.0..=1.0).contains(&args.busy), "--busy: 0 to 1");
    for b in &args.backend {
        if !matches!(b.as_str(), "sqlite" | "postgres") {
            bail!("--backend {b}: sqlite or postgres");
        }
    }
    super::push::raise_fd_limit(args.sites as u64 + 1024)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let mut backends = Vec::new();
    for b in &args.backend {
        if b == "postgres" {
            let pg = patronus_lab::postgres::Postgres::start()
                .context("a PostgreSQL server for --backend postgres")?;
            pg.create_database("patronus_db_stress")?;
            let url = pg.url("patronus_db_stress");
            backends.push(rt.block_on(one_backend(args, Some(url)))?);
        } else {
            backends.push(rt.block_on(one_backend(args, None))?);
        }
    }
    Ok(json!({
        "bench": "db-stress",
        "sites": args.sites,
        "backends": backends,
        "machine": super::machine(),
    }))
}

pub fn summary(r: &Value) -> String {
    let mut lines = vec![format!("db-stress: {} sites in hub and spoke", r["sites"])];
    for b in r["backends"].as_array().into_iter().flatten() {
        let i = &b["ingest"];
        lines.push(format!(
            "  {}: {} path samples, {} audit records, {} failovers: {} MB ({} bytes a sample); \
             sweep of {} expired samples {}",
            b["backend"].as_str().unwrap_or("?"),
            b["fill"]["path_samples"],
            b["fill"]["audit_records"],
            b["fill"]["failover_events"],
            fig(&b["database_mb"]["with_failovers"], 1, ""),
            fig(&b["bytes_per_row"]["path_sample"], 0, ""),
            b["fill"]["path_samples_beyond_retention"],
            fig(&b["sweep"]["seconds"], 2, " s"),
        ));
        if let Some(reads) = b["reads"].as_object() {
            let worst = reads
                .iter()
                .filter_map(|(k, v)| Some((k, v["p99_ms"].as_f64()?)))
                .max_by(|a, b| a.1.total_cmp(&b.1));
            let errors: u64 = reads.values().filter_map(|v| v["errors"].as_u64()).sum();
            lines.push(format!(
                "    list endpoints: the slowest p99 {}, {errors} errors",
                worst.map_or("no data".to_owned(), |(k, v)| format!("{v:.2} ms ({k})")),
            ));
        }
        lines.push(format!(
            "    ingest: {} measurements/s from {} edges every {} s, keeps up: {}, report p99 {}; \
             {} kept; {} path samples/s + {} traffic samples/s ({} rows a day, {} MB a day); \
             controller {} cores",
            fig(&i["measurements_per_s"], 0, ""),
            i["sites"],
            i["interval_s"],
            i["keeps_up"],
            fig(&i["reports"]["p99_ms"], 1, " ms"),
            fig(&json!(i["kept_share"].as_f64().map(|v| v * 100.0)), 1, " %"),
            fig(&i["path_samples_per_s"], 0, ""),
            fig(&i["traffic_samples_per_s"], 0, ""),
            fig(&json!(i["rows_per_day"].as_f64().map(|v| v / 1e6)), 1, "M"),
            fig(&i["database_growth_mb_per_day"], 0, ""),
            fig(&i["controller_cpu_cores"], 2, ""),
        ));
    }
    lines.join("\n")
}
