//! `patronus bench failover` (root): failover under the failures that really happen, repeated.
//! A two-site lab with two links per site runs real edges; constant-rate UDP streams cross
//! between LAN hosts, one each way (voice, video and TCP are two-way); each scenario (a fresh
//! lab each) strikes site a `--trials` times:
//!
//! - `cut`: both directions of the link carrying a's outbound stream, for a second;
//! - `one-way-up`: only a's sending direction of that link;
//! - `one-way-down`: only a's receiving direction of the link carrying its inbound stream;
//! - `stall`: a's edge process stopped (SIGSTOP) for `--stall-ms`, then continued, on healthy
//!   links.
//!
//! The link is found on the emulated link's counters, not from the edge. The outage of each
//! trial, per stream, is loss-derived (packets lost ÷ rate, RFC 6412). Each scenario also counts,
//! from both edges' status, the flows moved, the paths that went down as steering saw it, the
//! reported path-down events, and the late loops and peer silences the edges excused. `cut`
//! runs once more with `duplicate` steering. With no trial (`--trials 0`) the outage figures
//! are null: nothing was measured.

use std::time::Duration;

use anyhow::Context;
use patronus_api::SteeringMode;
use patronus_lab::edges::{self, Failure, Trials, Underlay};
use patronus_lab::stats::percentile;
use patronus_lab::{Lab, LabOptions, Topology};
use serde_json::{Value, json};

use super::{fig, progress};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Scenario {
    Cut,
    OneWayUp,
    OneWayDown,
    Stall,
}

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Trials per scenario.
    #[arg(long, default_value_t = 20)]
    trials: usize,
    /// Packets per second of each stream (the outage's resolution is one interval).
    #[arg(long, default_value_t = 1000)]
    rate: u32,
    /// The scenarios, in order (repeat the flag, or separate with commas); all by default.
    #[arg(long, value_enum, value_delimiter = ',')]
    failure: Vec<Scenario>,
    /// How long `stall` stops the edge.
    #[arg(long, default_value_t = 250)]
    stall_ms: u64,
}

/// Counters of both edges that say what the failures did to the paths.
const COUNTERS: [&str; 4] = ["path_downs", "loop_late", "peer_silences", "flows_moved"];

/// Both edges' counters summed, and their recent events since `since_ms` (Unix ms).
fn edge_counters(lab: &Lab, exe: &std::path::Path, since_ms: u64) -> anyhow::Result<Value> {
    let mut sum = serde_json::Map::new();
    let mut down_events = 0;
    let mut events = Vec::new();
    for site in ["a", "b"] {
        let out = lab.exec(
            site,
            &[
                exe.to_str().unwrap_or("patronus"),
                "edge",
                "status",
                "--json",
            ],
        )?;
        anyhow::ensure!(
            out.status.success(),
            "edge status in {site}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let st: Value = serde_json::from_slice(&out.stdout).context("edge status")?;
        let moved: u64 = st["failovers"]
            .as_object()
            .map(|m| m.values().filter_map(Value::as_u64).sum())
            .unwrap_or(0);
        for k in COUNTERS {
            let v = if k == "flows_moved" {
                moved
            } else {
                st[k].as_u64().unwrap_or(0)
            };
            let e = sum.entry(k).or_insert(json!(0));
            *e = json!(e.as_u64().unwrap_or(0) + v);
        }
        for e in st["events"].as_array().into_iter().flatten() {
            if e["unix_ms"].as_u64().is_some_and(|t| t >= since_ms) {
                events.push(json!(format!(
                    "{site} {}: {}",
                    e["unix_ms"],
                    e["text"].as_str().unwrap_or("")
                )));
            }
        }
        let late_max = st["loop_late_max_seconds"].as_f64().unwrap_or(0.0) * 1e3;
        let m = sum.entry("loop_late_max_ms").or_insert(json!(0.0));
        *m = json!(m.as_f64().unwrap_or(0.0).max(late_max));
        let late = st["loop_late_seconds"].as_f64().unwrap_or(0.0) * 1e3;
        let t = sum.entry("loop_late_total_ms").or_insert(json!(0.0));
        *t = json!(t.as_f64().unwrap_or(0.0) + late);
        down_events += st["path_events"]
            .as_array()
            .map(|a| a.iter().filter(|e| e["kind"] == "down").count())
            .unwrap_or(0);
    }
    sum.insert("path_down_events".into(), json!(down_events));
    sum.insert("events".into(), Value::Array(events));
    Ok(Value::Object(sum))
}

fn spread(outages: &[f64]) -> Value {
    let mut sorted = outages.to_vec();
    sorted.sort_by(f64::total_cmp);
    json!({
        "outage_ms_p50": percentile(&sorted, 0.5),
        "outage_ms_p99": percentile(&sorted, 0.99),
        "outage_ms_max": sorted.last(),
        "outages_ms": outages,
    })
}

fn scenario(args: &Args, failure: Failure, mode: SteeringMode) -> anyhow::Result<Value> {
    let what = format!("{} ({})", failure.name(), mode.as_str());
    progress(format_args!(
        "{what}: building the lab and starting the edges"
    ));
    let lab = Lab::up(&Topology::two_sites_two_links(), LabOptions::default())?;
    let exe = std::env::current_exe()?;
    let started = edges::start_edges(&lab, &exe, Underlay::V4, |c| c.default_steering = mode)?;
    let b_host = lab.addr("b/h1", false)?;
    let a_host = lab.addr("a/h1", false)?;
    edges::wait_for_tunnel(&lab, "a/h1", b_host, Duration::from_secs(15))?;
    edges::wait_for_tunnel(&lab, "b/h1", a_host, Duration::from_secs(15))?;
    progress(format_args!(
        "{what}: {} trials under two {} packets/s streams (about {} s)",
        args.trials,
        args.rate,
        (args.trials * 5).div_ceil(2) + 2
    ));
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let before = edge_counters(&lab, &exe, since)?;
    let run = edges::failure_trials(
        &lab,
        &Trials {
            from: "a/h1",
            to: "b/h1",
            site: "a",
            failure,
            trials: args.trials,
            rate_pps: args.rate,
            both_ways: true,
            edge_pid: started.first().map(|(_, pid)| *pid),
        },
    )
    .with_context(|| format!("{what} trials"))?;
    let after = edge_counters(&lab, &exe, since)?;
    lab.down()?;
    let mut edges = serde_json::Map::new();
    for (k, v) in after.as_object().into_iter().flatten() {
        let d = match (v.as_u64(), v.as_f64()) {
            (Some(n), _) => json!(n - before[k].as_u64().unwrap_or(0)),
            // The largest lateness is the edges' since they started; the total, the trials'.
            (None, Some(x)) if k == "loop_late_max_ms" => json!(x),
            (None, Some(x)) => json!(x - before[k].as_f64().unwrap_or(0.0)),
            // The events logged during the trials (the last 256 of each edge), for the story
            // behind the counts.
            (None, None) => v.clone(),
        };
        edges.insert(k.clone(), d);
    }
    let reverse = run.reverse.as_ref();
    Ok(json!({
        "failure": failure.name(),
        "steering": mode,
        "trials": run.forward_ms.len(),
        "a_to_b": spread(&run.forward_ms),
        "b_to_a": spread(&run.reverse_ms),
        "lost_outside_trials_ms": run.unexplained_ms,
        "targets": run.targets,
        "packets_sent": [run.forward.sent, reverse.map_or(0, |r| r.sent)],
        "packets_lost": [run.forward.lost, reverse.map_or(0, |r| r.lost)],
        "duplicates_delivered": [run.forward.duplicates, reverse.map_or(0, |r| r.duplicates)],
        "edges": Value::Object(edges),
    }))
}

pub fn run(args: &Args) -> anyhow::Result<Value> {
    let all = [
        Scenario::Cut,
        Scenario::OneWayUp,
        Scenario::OneWayDown,
        Scenario::Stall,
    ];
    let chosen = if args.failure.is_empty() {
        &all[..]
    } else {
        &args.failure[..]
    };
    let mut scenarios = serde_json::Map::new();
    for s in chosen {
        let failure = match s {
            Scenario::Cut => Failure::Cut,
            Scenario::OneWayUp => Failure::OneWayUp,
            Scenario::OneWayDown => Failure::OneWayDown,
            Scenario::Stall => Failure::Stall(Duration::from_millis(args.stall_ms)),
        };
        let r = scenario(args, failure, SteeringMode::BestQuality)?;
        scenarios.insert(failure.name().into(), r);
    }
    let dup = if chosen.contains(&Scenario::Cut) {
        scenario(args, Failure::Cut, SteeringMode::Duplicate)?
    } else {
        Value::Null
    };
    let cut = scenarios.get("cut").cloned().unwrap_or(Value::Null);
    Ok(json!({
        "bench": "failover",
        "rate_pps": args.rate,
        "trials": args.trials,
        "stall_ms": args.stall_ms,
        "outage_ms_p50": cut["a_to_b"]["outage_ms_p50"],
        "outage_ms_p99": cut["a_to_b"]["outage_ms_p99"],
        "outage_ms_max": cut["a_to_b"]["outage_ms_max"],
        "scenarios": Value::Object(scenarios),
        "duplicate_cut": dup,
        "machine": super::machine(),
    }))
}

pub fn summary(r: &Value) -> String {
    let dir = |d: &Value| {
        format!(
            "p50 {} p99 {} max {}",
            fig(&d["outage_ms_p50"], 0, " ms"),
            fig(&d["outage_ms_p99"], 0, " ms"),
            fig(&d["outage_ms_max"], 0, " ms"),
        )
    };
    let one = |m: &Value| {
        let e = &m["edges"];
        format!(
            "{} ({}): {} trials; a->b {}; b->a {}; flows moved {}, paths down {} ({} reported), \
             late loops {} (max {} ms), peer silences {}",
            m["failure"].as_str().unwrap_or("?"),
            m["steering"].as_str().unwrap_or("?"),
            m["trials"],
            dir(&m["a_to_b"]),
            dir(&m["b_to_a"]),
            e["flows_moved"],
            e["path_downs"],
            e["path_down_events"],
            e["loop_late"],
            fig(&e["loop_late_max_ms"], 0, ""),
            e["peer_silences"],
        )
    };
    let mut lines = vec![format!("failover at {} packets/s each way:", r["rate_pps"])];
    for m in r["scenarios"]
        .as_object()
        .into_iter()
        .flat_map(|m| m.values())
    {
        lines.push(format!("  {}", one(m)));
    }
    if !r["duplicate_cut"].is_null() {
        lines.push(format!("  {}", one(&r["duplicate_cut"])));
    }
    lines.join("\n")
}
