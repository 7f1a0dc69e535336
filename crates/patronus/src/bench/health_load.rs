//! `patronus bench health-load` (root): what measuring every path all the time costs, on real
//! paths between real edges, and whether the measurements stay true.
//!
//! A full mesh of `--sites` sites in the lab (23 by default: 253 pairs of sites, 4 paths each,
//! 1,012 paths), each site an edge process with an `inet` link (10 ms one way, each direction,
//! in the lab's WAN emulator) and an `lte` link (20 ms), enrolled through a controller with TLS.
//! So every path has a known round-trip time: twice the sum of its two links' delays (40, 60 or
//! 80 ms). Once every path reads Up at the controller, two windows of `--window-s` seconds at
//! the edges' default probe rates:
//!
//! - **idle**: no traffic, every path probed at the standby interval (100 ms);
//! - **busy**: a UDP stream (`--rate` packets/s) between the LAN hosts of every pair of sites,
//!   so that one path of every pair carries traffic and is probed at the active interval (20 ms).
//!
//! Each window reports the edges' CPU (every edge process, from `/proc`) per 1,000 paths, the
//! bytes and packets the sites sent onto the WAN (the emulator's counters, outside the edges:
//! probes, their replies, keepalives, and in the busy window the streams' packets, given apart),
//! the probe intervals the edges use, paths that left Up and flaps, and every path end's RTT as
//! its edge measures it beside the emulated one: the error's p50/p99/max.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::Context;
use patronus_api::LinkKind;
use serde_json::{Value, json};

use super::world::World;
use super::{fig, progress};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Sites in a full mesh, two links each: 4 × N × (N − 1) / 2 paths.
    #[arg(long, default_value_t = 23)]
    sites: usize,
    /// Seconds each window (idle, busy) is measured.
    #[arg(long, default_value_t = 30)]
    window_s: u64,
    /// Packets per second of each busy window's stream (one per pair of sites).
    #[arg(long, default_value_t = 20)]
    rate: u32,
    /// Measure anyway when the paths are not all Up after this many seconds (the JSON says
    /// how many were: `all_up_s` null, `up_at_start`).
    #[arg(long, default_value_t = 180)]
    timeout: u64,
}

/// The links of every site: name, kind, one-way delay in each direction (ms).
const LINKS: [(&str, LinkKind, f64); 2] = [
    ("inet", LinkKind::Broadband, 10.0),
    ("lte", LinkKind::Lte, 20.0),
];

fn delay_of(link: &str) -> Option<f64> {
    LINKS.iter().find(|(n, _, _)| *n == link).map(|l| l.2)
}

/// Every edge's status (`patronus edge status --json`, run inside its namespace): (site,
/// status).
fn statuses(world: &World) -> anyhow::Result<Vec<(String, Value)>> {
    let exe = std::env::current_exe()?;
    let exe = exe.to_str().context("this program's path is not UTF-8")?;
    let mut out = Vec::new();
    for (site, _) in &world.edges {
        let o = world.lab.exec(site, &[exe, "edge", "status", "--json"])?;
        anyhow::ensure!(
            o.status.success(),
            "{site}'s edge status: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let v: Value =
            serde_json::from_slice(&o.stdout).with_context(|| format!("{site}'s edge status"))?;
        out.push((site.clone(), v));
    }
    Ok(out)
}

/// What the whole lab did so far: the edges' CPU (s), the bytes and packets the sites sent
/// onto the WAN, and the edges' probes sent and flaps.
struct Snapshot {
    at: Instant,
    edges_cpu_s: f64,
    this_cpu_s: Option<f64>,
    wan_bytes: u64,
    wan_packets: u64,
    statuses: Vec<(String, Value)>,
}

fn snapshot(world: &World) -> anyhow::Result<Snapshot> {
    let at = Instant::now();
    let mut edges_cpu_s = 0.0;
    for (site, pid) in &world.edges {
        edges_cpu_s += super::cpu_s(*pid).with_context(|| format!("{site}'s edge is gone"))?;
    }
    let emu = world.lab.emulator_status()?;
    let (wan_bytes, wan_packets) = emu.links.iter().fold((0, 0), |(b, p), l| {
        (b + l.up_stats.bytes, p + l.up_stats.packets)
    });
    Ok(Snapshot {
        at,
        edges_cpu_s,
        this_cpu_s: super::cpu_s(std::process::id()),
        wan_bytes,
        wan_packets,
        statuses: statuses(world)?,
    })
}

fn sum_paths(s: &Snapshot, field: &str) -> u64 {
    s.statuses
        .iter()
        .flat_map(|(_, st)| st["paths"].as_array().into_iter().flatten())
        .filter_map(|p| p[field].as_u64())
        .sum()
}

/// One window's figures, from the snapshots at its ends; `stream_packets` and `stream_bytes`
/// are what the streams sent (on the WAN, with the tunnel's overhead) in it.
fn window(a: &Snapshot, b: &Snapshot, paths: usize, stream: Option<(u64, u64)>) -> Value {
    let secs = b.at.duration_since(a.at).as_secs_f64();
    let kilo = paths as f64 / 1000.0;
    let cores = (b.edges_cpu_s - a.edges_cpu_s) / secs;
    let bytes = (b.wan_bytes - a.wan_bytes) as f64 / secs;
    let packets = (b.wan_packets - a.wan_packets) as f64 / secs;
    let (s_packets, s_bytes) =
        stream.map_or((0.0, 0.0), |(p, by)| (p as f64 / secs, by as f64 / secs));
    let probes = (sum_paths(b, "probes_sent") - sum_paths(a, "probes_sent")) as f64 / secs;
    // The measurements at the end of the window: every path end, as its edge sees it.
    let mut errors = Vec::new();
    let mut relative = Vec::new();
    let (mut ends, mut up, mut no_rtt) = (0, 0, 0);
    let mut intervals: BTreeMap<String, usize> = BTreeMap::new();
    for (_, st) in &b.statuses {
        for p in st["paths"].as_array().into_iter().flatten() {
            ends += 1;
            if p["state"] == "up" {
                up += 1;
            }
            if let Some(ms) = p["probe_interval_ms"].as_f64() {
                *intervals.entry(format!("{ms:.0}")).or_default() += 1;
            }
            let expected = p["local_link"]
                .as_str()
                .and_then(delay_of)
                .zip(p["remote_link"].as_str().and_then(delay_of))
                .map(|(l, r)| 2.0 * (l + r));
            match (p["rtt_ms"].as_f64(), expected) {
                (Some(m), Some(e)) => {
                    errors.push(((m - e) * 1000.0).round() as i64);
                    relative.push(((m - e) / e * 1e4).round() as i64);
                }
                _ => no_rtt += 1,
            }
        }
    }
    let flaps = sum_paths(b, "flaps") - sum_paths(a, "flaps");
    errors.sort_unstable();
    relative.sort_unstable();
    let ms = |q| patronus_lab::stats::percentile(&errors, q).map(|v| v as f64 / 1000.0);
    let abs_max = errors
        .iter()
        .map(|e| e.unsigned_abs())
        .max()
        .map(|v| v as f64 / 1000.0);
    let pct = |q| patronus_lab::stats::percentile(&relative, q).map(|v| v as f64 / 100.0);
    json!({
        "seconds": secs,
        "edges_cpu_cores": cores,
        "edges_cpu_cores_per_1000_paths": cores / kilo,
        "lab_process_cpu_cores": a.this_cpu_s.zip(b.this_cpu_s).map(|(x, y)| (y - x) / secs),
        "wan_bytes_per_s": bytes,
        "wan_packets_per_s": packets,
        "stream_bytes_per_s": s_bytes,
        "stream_packets_per_s": s_packets,
        "overhead_bytes_per_s": bytes - s_bytes,
        "overhead_bytes_per_s_per_path": (bytes - s_bytes) / paths as f64,
        "overhead_kbit_per_s_per_1000_paths": (bytes - s_bytes) * 8.0 / 1000.0 / kilo,
        "probes_sent_per_s": probes,
        "probe_intervals_ms": intervals,
        "path_ends": ends,
        "path_ends_up": up,
        "path_ends_without_rtt": no_rtt,
        "flaps": flaps,
        "rtt_error_ms": { "p1": ms(0.01), "p50": ms(0.5), "p99": ms(0.99), "max_abs": abs_max },
        "rtt_error_pct": { "p50": pct(0.5), "p99": pct(0.99) },
    })
}

pub fn run(args: &Args) -> anyhow::Result<Value> {
    anyhow::ensure!((2..=40).contains(&args.sites), "--sites: 2 to 40");
    anyhow::ensure!((5..=3600).contains(&args.window_s), "--window-s: 5 to 3600");
    anyhow::ensure!((1..=1000).contains(&args.rate), "--rate: 1 to 1000");
    let n = args.sites;
    let paths = n * (n - 1) / 2 * 4;
    let links: Vec<_> = LINKS
        .iter()
        .map(|(name, kind, ms)| (*name, *kind, Some(format!("delay={ms}ms"))))
        .collect();
    let topology = super::world::full_mesh(n, &links);
    progress(format_args!(
        "{n} sites in a full mesh, {paths} paths: a lab, a controller, every site enrolled"
    ));
    let t = Instant::now();
    let (world, _receiver) = super::world::up(&topology, false, &["failover"])?;
    // A machine that cannot carry every path is the finding, not a failure: the windows then
    // measure what it does carry (each says how many path ends were Up).
    let up_s = match world.wait_paths(paths, Duration::from_secs(args.timeout)) {
        Ok(_) => {
            let up_s = t.elapsed().as_secs_f64();
            progress(format_args!(
                "every path Up after {up_s:.0} s; idle for {} s",
                args.window_s
            ));
            Some(up_s)
        }
        Err(e) => {
            progress(format_args!(
                "{e}: this machine does not carry them all; measuring what it does, idle for {} s",
                args.window_s
            ));
            None
        }
    };
    let up_at_start = world.request("GET", "/api/v1/paths?state=up&limit=1", None)?["total"]
        .as_u64()
        .unwrap_or(0);
    // Let the first measurements settle (the estimators start from the first replies).
    std::thread::sleep(Duration::from_secs(5));
    let a = snapshot(&world)?;
    std::thread::sleep(Duration::from_secs(args.window_s));
    let b = snapshot(&world)?;
    let idle = window(&a, &b, paths, None);
    progress(format_args!(
        "idle: {} cores per 1000 paths; busy: {} streams of {} packets/s for {} s",
        fig(&idle["edges_cpu_cores_per_1000_paths"], 3, ""),
        n * (n - 1) / 2,
        args.rate,
        args.window_s
    ));

    // Busy: a stream between every pair of sites (from the lower-numbered one), for the
    // window and a few seconds each side.
    let hosts: Vec<(String, std::net::IpAddr)> = (1..=n)
        .map(|i| {
            let h = format!("site{i}/h1");
            Ok((world.lab.ns(&h)?, world.lab.addr(&h, false)?))
        })
        .collect::<anyhow::Result<_>>()?;
    let lead = Duration::from_secs(5);
    let busy = std::thread::scope(|sc| -> anyhow::Result<_> {
        let mut runs = Vec::new();
        for i in 0..n {
            for j in i + 1..n {
                let (from, to, dst) = (hosts[i].0.clone(), hosts[j].0.clone(), hosts[j].1);
                let cfg = patronus_lab::stream::StreamConfig {
                    rate_pps: args.rate,
                    duration: lead * 2 + Duration::from_secs(args.window_s),
                    size: 200,
                    port: 47000 + (i * n + j) as u16,
                    ..Default::default()
                };
                runs.push(sc.spawn(move || patronus_lab::stream::run(&from, &to, dst, &cfg)));
            }
        }
        std::thread::sleep(lead);
        let a = snapshot(&world)?;
        std::thread::sleep(Duration::from_secs(args.window_s));
        let b = snapshot(&world)?;
        let mut reports = Vec::new();
        for r in runs {
            reports.push(
                r.join()
                    .map_err(|_| anyhow::anyhow!("a stream thread panicked"))??,
            );
        }
        Ok((a, b, reports))
    })?;
    let (a, b, reports) = busy;
    let secs = b.at.duration_since(a.at).as_secs_f64();
    // The streams' packets on the WAN in the window: each one once, at its UDP payload plus
    // the inner IPv4/UDP headers (28), WireGuard's data header and tag (32) and the outer
    // IPv4/UDP headers (28).
    let pps = f64::from(args.rate) * reports.len() as f64;
    let stream = (
        (pps * secs) as u64,
        (pps * secs * (200.0 + 28.0 + 32.0 + 28.0)) as u64,
    );
    let mut busy = window(&a, &b, paths, Some(stream));
    let sent: u64 = reports.iter().map(|r| r.sent).sum();
    let lost: u64 = reports.iter().map(|r| r.lost).sum();
    busy["streams"] = json!({
        "count": reports.len(),
        "rate_pps": args.rate,
        "sent": sent,
        "lost": lost,
    });
    drop(world);
    Ok(json!({
        "bench": "health-load",
        "sites": n,
        "paths": paths,
        "links": LINKS.iter().map(|(n, _, ms)| json!({ "name": n, "one_way_delay_ms": ms })).collect::<Vec<_>>(),
        "all_up_s": up_s,
        "up_at_start": up_at_start,
        "idle": idle,
        "busy": busy,
        "machine": super::machine(),
    }))
}

pub fn summary(r: &Value) -> String {
    let up = if r["all_up_s"].is_null() {
        format!(
            "not every one Up: {} at the start of the windows",
            r["up_at_start"]
        )
    } else {
        format!("every one Up after {}", fig(&r["all_up_s"], 0, " s"))
    };
    let mut lines = vec![format!(
        "health-load: {} sites in a full mesh, {} real paths, {up}",
        r["sites"], r["paths"],
    )];
    for w in ["idle", "busy"] {
        let x = &r[w];
        lines.push(format!(
            "  {w}: edges {} cores ({} per 1000 paths); probing {} kbit/s per 1000 paths on the WAN; \
             RTT error p50 {} p99 {} (max |{}|); {} of {} path ends Up, {} flaps",
            fig(&x["edges_cpu_cores"], 2, ""),
            fig(&x["edges_cpu_cores_per_1000_paths"], 3, ""),
            fig(&x["overhead_kbit_per_s_per_1000_paths"], 0, ""),
            fig(&x["rtt_error_ms"]["p50"], 2, " ms"),
            fig(&x["rtt_error_ms"]["p99"], 2, " ms"),
            fig(&x["rtt_error_ms"]["max_abs"], 2, " ms"),
            x["path_ends_up"],
            x["path_ends"],
            x["flaps"],
        ));
    }
    if let Some(s) = r["busy"]["streams"].as_object() {
        lines.push(format!(
            "  busy streams: {} of {} packets/s, {} sent, {} lost",
            s["count"], s["rate_pps"], s["sent"], s["lost"]
        ));
    }
    lines.join("\n")
}
