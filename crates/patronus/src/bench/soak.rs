//! `patronus bench soak` (root): three sites (`three-sites-mixed`) enrolled through a real
//! controller, three UDP streams between their LAN hosts for `--duration` seconds, and churn on
//! a schedule: every 20 s a cut of `hq/mpls` for 3 s, a degradation of `branch2/inet` (+110 ms)
//! for 5 s, and a configuration change (a policy created, or deleted) through the API; the
//! controller is restarted every `--restart-every` seconds (at least once). Every 5 s the
//! resident memory, open descriptors and sockets of the controller and of each edge are
//! sampled.
//!
//! Reported: each process's figures at the start and the end and their slope over the second
//! half (per hour: a leak grows steadily, a warm-up does not); every failover the API lists,
//! and those that no churn explains (a failover outside a cut's or a degradation's window, or
//! the controller's restart, is a false one); the packets the streams lost outside the churn
//! windows; and what was left behind after the lab went down.

use std::time::{Duration, Instant};

use anyhow::Context;
use patronus_controller::store::now_ms;
use patronus_lab::Topology;
use patronus_lab::stream::monotonic_ns;
use serde_json::{Value, json};

use super::world::World;
use super::{fig, progress};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// How long the soak runs, in seconds (CI: 120; the README's: 3600).
    #[arg(long, default_value_t = 3600)]
    duration: u64,
    /// Seconds between controller restarts (at most half the duration, so that there is one).
    #[arg(long, default_value_t = 600)]
    restart_every: u64,
    /// Packets per second of each stream.
    #[arg(long, default_value_t = 100)]
    rate: u32,
}

/// A churn event's window: a failover or a loss inside it is explained. Failovers carry the
/// controller's wall-clock time, so they are matched on `from_ms`/`to_ms` (Unix ms); losses
/// are timed by the streams on `CLOCK_MONOTONIC`, so they are matched on `from_ns`/`to_ns`. A
/// wall clock stepped during the run (NTP on a VM) then misplaces no loss.
struct Window {
    what: &'static str,
    from_ms: i64,
    to_ms: i64,
    from_ns: u64,
    to_ns: u64,
}

impl Window {
    /// A window that began at `from` (wall ms, monotonic ns) and ends now.
    fn until_now(what: &'static str, from: (i64, u64)) -> Window {
        Window {
            what,
            from_ms: from.0,
            to_ms: now_ms(),
            from_ns: from.1,
            to_ns: monotonic_ns(),
        }
    }
}

/// Now on both clocks: wall ms and monotonic ns.
fn both_clocks() -> (i64, u64) {
    (now_ms(), monotonic_ns())
}

/// How long after a churn event ends its effects may still show (detection, a report).
const SETTLE_MS: i64 = 3_000;
/// How early a loss may seem to start before the event that caused it: a loss's time is
/// estimated from its sequence number and the stream's nominal rate.
const LEAD_MS: i64 = 250;

/// Resident memory (KB), open descriptors and, of those, sockets of process `pid`.
fn usage(pid: u32) -> Option<(u64, u64, u64)> {
    let rss = super::proc_status_kb(Some(pid), "VmRSS:")?;
    let (mut fds, mut sockets) = (0, 0);
    for e in std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.flatten() {
        fds += 1;
        if std::fs::read_link(e.path()).is_ok_and(|t| t.to_string_lossy().starts_with("socket:")) {
            sockets += 1;
        }
    }
    Some((rss, fds, sockets))
}

/// Least-squares slope of `ys` over `xs` (per unit of x); none with fewer than 3 points.
fn slope(xs: &[f64], ys: &[f64]) -> Option<f64> {
    let n = xs.len() as f64;
    if xs.len() < 3 {
        return None;
    }
    let (mx, my) = (xs.iter().sum::<f64>() / n, ys.iter().sum::<f64>() / n);
    let sxx: f64 = xs.iter().map(|x| (x - mx) * (x - mx)).sum();
    let sxy: f64 = xs.iter().zip(ys).map(|(x, y)| (x - mx) * (y - my)).sum();
    (sxx > 0.0).then(|| sxy / sxx)
}

/// One process's samples: (seconds since the start, rss KB, fds, sockets).
type Series = Vec<(f64, u64, u64, u64)>;

/// A process's figures: first and last sample, the largest, and the slopes per hour over the
/// second half of the run (of its own samples, for a controller started again).
fn figures(name: &str, s: &Series, half_s: f64) -> Value {
    let late: Vec<&(f64, u64, u64, u64)> = s.iter().filter(|x| x.0 >= half_s).collect();
    let xs: Vec<f64> = late.iter().map(|x| x.0 / 3600.0).collect();
    let col = |f: fn(&(f64, u64, u64, u64)) -> u64| -> Vec<f64> {
        late.iter().map(|x| f(x) as f64).collect()
    };
    json!({
        "process": name,
        "samples": s.len(),
        "rss_mb_first": s.first().map(|x| x.1 as f64 / 1024.0),
        "rss_mb_last": s.last().map(|x| x.1 as f64 / 1024.0),
        "rss_mb_max": s.iter().map(|x| x.1).max().map(|v| v as f64 / 1024.0),
        "fds_first": s.first().map(|x| x.2),
        "fds_last": s.last().map(|x| x.2),
        "fds_max": s.iter().map(|x| x.2).max(),
        "sockets_last": s.last().map(|x| x.3),
        "rss_mb_per_hour": slope(&xs, &col(|x| x.1)).map(|v| v / 1024.0),
        "fds_per_hour": slope(&xs, &col(|x| x.2)),
        "sockets_per_hour": slope(&xs, &col(|x| x.3)),
    })
}

pub fn run(args: &Args) -> anyhow::Result<Value> {
    anyhow::ensure!(
        (30..=7 * 24 * 3600).contains(&args.duration),
        "--duration must be 30 s to a week"
    );
    anyhow::ensure!(
        (10..=10_000).contains(&args.rate),
        "--rate must be 10 to 10000"
    );
    let restart_every = args.restart_every.clamp(10, args.duration / 2);
    progress(format_args!("lab up: three sites and a controller"));
    let (mut world, _receiver) =
        super::world::up(&Topology::three_sites_mixed(), false, &["failover"])?;
    let all_pids: Vec<u32> = world.edges.iter().map(|(_, p)| *p).collect();
    progress(format_args!("waiting for all 16 paths up"));
    world.wait_paths(16, Duration::from_secs(120))?;
    let flows = [
        ("hq/h1", "branch1/h1", 47001u16),
        ("branch2/h1", "hq/h1", 47002),
        ("branch1/h1", "branch2/h1", 47003),
    ];
    let control: Vec<patronus_lab::stream::Control> =
        flows.iter().map(|_| Default::default()).collect();
    let start = Instant::now();
    let (start_ms, start_ns) = both_clocks();
    let mut windows: Vec<Window> = Vec::new();
    let mut series: Vec<(String, Series)> = Vec::new();
    let mut controller_pids = vec![world.controller];
    let mut changes = 0u64;
    let mut policy: Option<i64> = None;
    let reports = std::thread::scope(|sc| -> anyhow::Result<_> {
        let mut runs = Vec::new();
        for ((from, to, port), c) in flows.iter().zip(&control) {
            let (src, dst_ns) = (world.lab.ns(from)?, world.lab.ns(to)?);
            let dst = world.lab.addr(to, false)?;
            let cfg = patronus_lab::stream::StreamConfig {
                rate_pps: args.rate,
                duration: Duration::from_secs(args.duration + 60),
                port: *port,
                ..Default::default()
            };
            runs.push(
                sc.spawn(move || patronus_lab::stream::run_until(&src, &dst_ns, dst, &cfg, c)),
            );
        }
        let sample = |world: &World, series: &mut Vec<(String, Series)>| {
            let t = start.elapsed().as_secs_f64();
            let mut procs: Vec<(String, u32)> = world.edges.clone();
            procs.push((
                format!("controller#{}", restarts_of(world)),
                world.controller,
            ));
            for (name, pid) in procs {
                if let Some((rss, fds, sockets)) = usage(pid) {
                    match series.iter_mut().find(|(n, _)| *n == name) {
                        Some((_, s)) => s.push((t, rss, fds, sockets)),
                        None => series.push((name, vec![(t, rss, fds, sockets)])),
                    }
                }
            }
        };
        let end = start + Duration::from_secs(args.duration);
        let mut next_sample = start;
        let mut next_cycle = start + Duration::from_secs(5);
        let mut next_restart = start + Duration::from_secs(restart_every);
        // The churn, until the end or an error; the streams stop either way, so that an error
        // is reported at once rather than after the streams' own end.
        let churn = (|| -> anyhow::Result<()> {
            while Instant::now() < end {
                let now = Instant::now();
                if now >= next_sample {
                    sample(&world, &mut series);
                    next_sample += Duration::from_secs(5);
                }
                if now >= next_restart {
                    progress(format_args!(
                        "{:.0} s: the controller restarted",
                        start.elapsed().as_secs_f64()
                    ));
                    let from = both_clocks();
                    world.stop_controller()?;
                    world.start_controller()?;
                    world.login()?;
                    controller_pids.push(world.controller);
                    windows.push(Window::until_now("controller restart", from));
                    next_restart += Duration::from_secs(restart_every);
                }
                if now >= next_cycle && now + Duration::from_secs(15) < end {
                    // A cut.
                    let from = both_clocks();
                    world.lab.link_command("hq/mpls", &["cut"])?;
                    std::thread::sleep(Duration::from_secs(3));
                    world.lab.link_command("hq/mpls", &["restore"])?;
                    windows.push(Window::until_now("cut hq/mpls", from));
                    // A degradation.
                    std::thread::sleep(Duration::from_secs(2));
                    let from = both_clocks();
                    world
                        .lab
                        .link_command("branch2/inet", &["set", "delay=120ms"])?;
                    std::thread::sleep(Duration::from_secs(5));
                    world
                        .lab
                        .link_command("branch2/inet", &["set", "delay=10ms"])?;
                    windows.push(Window::until_now("degrade branch2/inet", from));
                    // A configuration change.
                    match policy.take() {
                        None => {
                            let p = world.request(
                                "POST",
                                "/api/v1/policies",
                                Some(json!({
                                    "name": "soak", "order": 50, "class": "realtime",
                                    "match": { "protocol": "udp", "dst_ports": ["49000-49100"] }
                                })),
                            )?;
                            policy = p["id"].as_i64();
                        }
                        Some(id) => {
                            world.request("DELETE", &format!("/api/v1/policies/{id}"), None)?;
                        }
                    }
                    changes += 1;
                    next_cycle += Duration::from_secs(20);
                    sample(&world, &mut series);
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            Ok(())
        })();
        for c in &control {
            c.stop();
        }
        churn?;
        let mut reports = Vec::new();
        for r in runs {
            reports.push(
                r.join()
                    .map_err(|_| anyhow::anyhow!("a stream thread panicked"))??,
            );
        }
        Ok(reports)
    })?;
    let elapsed = start.elapsed().as_secs_f64();
    // How far the wall clock moved apart from the monotonic one during the run: a step (NTP)
    // shifts the failovers' times against the windows; the losses are immune to it.
    let wall_step_ms = (now_ms() - start_ms) - (monotonic_ns() - start_ns) as i64 / 1_000_000;
    let count = |what: &str| windows.iter().filter(|w| w.what == what).count();
    // Every failover since the start, each explained by a churn window or not.
    let events = world.request(
        "GET",
        &format!("/api/v1/failover/events?since={start_ms}&limit=500"),
        None,
    )?;
    let total_failovers = events["total"].as_u64();
    let explained = |at: i64| -> Option<&'static str> {
        windows
            .iter()
            .find(|w| at >= w.from_ms - LEAD_MS && at <= w.to_ms + SETTLE_MS)
            .map(|w| w.what)
    };
    let mut unexplained = Vec::new();
    let mut by_cause: std::collections::BTreeMap<&str, u64> = Default::default();
    // A move to a better path is the steering's return once a cut or a degradation is over,
    // after its dwell: counted apart, never a false failover.
    let mut better_moves = 0u64;
    for e in events["items"].as_array().into_iter().flatten() {
        let at = e["at_ms"].as_i64().unwrap_or(0);
        if e["reason"] == "better" {
            better_moves += 1;
            continue;
        }
        match explained(at) {
            Some(w) => *by_cause.entry(w).or_default() += 1,
            None => unexplained.push(e.clone()),
        }
    }
    // Packets lost outside every churn window.
    let mut lost_outside = 0u64;
    let mut gaps_outside = Vec::new();
    let loss_explained = |at_ns: u64| -> bool {
        let (lead, settle) = (LEAD_MS as u64 * 1_000_000, SETTLE_MS as u64 * 1_000_000);
        windows
            .iter()
            .any(|w| at_ns + lead >= w.from_ns && at_ns <= w.to_ns + settle)
    };
    for ((from, to, _), r) in flows.iter().zip(&reports) {
        let first = r
            .first_sent_mono_ns
            .context("a stream reported no first send")?;
        for g in &r.gaps {
            let at = first + (g.first_seq as f64 * 1e9 / f64::from(r.rate_pps)) as u64;
            if !loss_explained(at) {
                lost_outside += g.lost;
                if gaps_outside.len() < 50 {
                    gaps_outside.push(json!({
                        "stream": format!("{from} -> {to}"),
                        "at_s": at.saturating_sub(start_ns) as f64 / 1e9,
                        "lost": g.lost,
                    }));
                }
            }
        }
    }
    let half = elapsed / 2.0;
    let processes: Vec<Value> = series
        .iter()
        .map(|(name, s)| figures(name, s, half))
        .collect();
    let run_id = world.lab.run_id().to_owned();
    let pids: Vec<u32> = all_pids.into_iter().chain(controller_pids).collect();
    drop(world);
    // What is left once the lab is down: processes, namespaces, the run directory.
    std::thread::sleep(Duration::from_secs(1));
    let mut left = Vec::new();
    for pid in &pids {
        if std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z ")) {
            left.push(format!("process {pid}"));
        }
    }
    let netns = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .context("ip netns list")?;
    for line in String::from_utf8_lossy(&netns.stdout).lines() {
        if line.contains(&run_id) {
            left.push(format!(
                "namespace {}",
                line.split_whitespace().next().unwrap_or("")
            ));
        }
    }
    if patronus_lab::lab::run_dir(&run_id).exists() {
        left.push(format!(
            "directory {}",
            patronus_lab::lab::run_dir(&run_id).display()
        ));
    }
    let (sent, lost): (u64, u64) = reports
        .iter()
        .fold((0, 0), |(s, l), r| (s + r.sent, l + r.lost));
    Ok(json!({
        "bench": "soak",
        "duration_s": elapsed,
        "rate_pps": args.rate,
        "streams": flows.len(),
        "cuts": count("cut hq/mpls"),
        "degradations": count("degrade branch2/inet"),
        "config_changes": changes,
        "controller_restarts": count("controller restart"),
        "failovers": total_failovers,
        "failovers_by_cause": by_cause,
        "failovers_unexplained": unexplained.len(),
        "unexplained": unexplained,
        "packets_sent": sent,
        "packets_lost": lost,
        "packets_lost_outside_churn": lost_outside,
        "losses_outside_churn": gaps_outside,
        "moves_to_a_better_path": better_moves,
        "churn": windows.iter().map(|w| json!({
            "what": w.what,
            "from_s": w.from_ns.saturating_sub(start_ns) as f64 / 1e9,
            "to_s": w.to_ns.saturating_sub(start_ns) as f64 / 1e9,
        })).collect::<Vec<_>>(),
        "wall_clock_step_ms": wall_step_ms,
        "processes": processes,
        "left_behind": left,
        "machine": super::machine(),
    }))
}

/// Which start of the controller this is (0: the first).
fn restarts_of(world: &World) -> u32 {
    world.starts().saturating_sub(1)
}

pub fn summary(r: &Value) -> String {
    let mut lines = vec![format!(
        "soak: {} s, {} cuts, {} degradations, {} configuration changes, {} controller restarts; {} failovers, {} unexplained; {} of {} packets lost outside the churn; left behind: {}",
        fig(&r["duration_s"], 0, ""),
        r["cuts"],
        r["degradations"],
        r["config_changes"],
        r["controller_restarts"],
        r["failovers"],
        r["failovers_unexplained"],
        r["packets_lost_outside_churn"],
        r["packets_sent"],
        r["left_behind"]
            .as_array()
            .map_or("?".to_owned(), |a| if a.is_empty() {
                "nothing".to_owned()
            } else {
                format!("{a:?}")
            }),
    )];
    if let Some(step) = r["wall_clock_step_ms"].as_i64().filter(|s| s.abs() >= 100) {
        lines.push(format!(
            "  the wall clock was stepped {step} ms during the run (losses are timed on the monotonic clock)"
        ));
    }
    for p in r["processes"].as_array().into_iter().flatten() {
        lines.push(format!(
            "  {}: {} -> {} resident ({} per hour in the second half), {} -> {} descriptors ({} per hour)",
            p["process"].as_str().unwrap_or("?"),
            fig(&p["rss_mb_first"], 1, " MB"),
            fig(&p["rss_mb_last"], 1, " MB"),
            fig(&p["rss_mb_per_hour"], 2, " MB"),
            p["fds_first"],
            p["fds_last"],
            fig(&p["fds_per_hour"], 1, ""),
        ));
    }
    lines.join("\n")
}
