//! `patronus bench failover` (root): the hard-failover scenario, repeated. A two-site lab with
//! two links per site runs real edges; a constant-rate UDP stream crosses between LAN hosts; the
//! link carrying it (read on the emulated link, not from the edge) is cut, restored a second
//! later, and the next cut finds the stream on the other link. The outage of each cut is
//! loss-derived (packets lost ÷ rate, RFC 6412). Run once with the default steering
//! (`best-quality`) and once with `duplicate`. With no cut (`--trials 0`) the outage figures are
//! null: nothing was measured.

use std::time::Duration;

use anyhow::Context;
use patronus_api::SteeringMode;
use patronus_lab::edges::{self, Underlay};
use patronus_lab::stats::percentile;
use patronus_lab::{Lab, LabOptions, Topology};
use serde_json::Value;

use super::{fig, progress};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Cuts per steering mode.
    #[arg(long, default_value_t = 20)]
    trials: usize,
    /// Packets per second of the stream (the outage's resolution is one interval).
    #[arg(long, default_value_t = 1000)]
    rate: u32,
}

fn one_mode(args: &Args, mode: SteeringMode) -> anyhow::Result<Value> {
    progress(format_args!(
        "{}: building the lab and starting the edges",
        mode.as_str()
    ));
    let lab = Lab::up(&Topology::two_sites_two_links(), LabOptions::default())?;
    let exe = std::env::current_exe()?;
    edges::start_edges(&lab, &exe, Underlay::V4, |c| c.default_steering = mode)?;
    let b_host = lab.addr("b/h1", false)?;
    edges::wait_for_tunnel(&lab, "a/h1", b_host, Duration::from_secs(15))?;
    progress(format_args!(
        "{}: {} cuts under a {} packets/s stream (about {} s)",
        mode.as_str(),
        args.trials,
        args.rate,
        (args.trials * 5).div_ceil(2) + 2
    ));
    let run = edges::failover_trials(&lab, "a/h1", "b/h1", "a", args.trials, args.rate)
        .context("failover trials")?;
    lab.down()?;
    let mut sorted = run.outages_ms.clone();
    sorted.sort_by(f64::total_cmp);
    Ok(serde_json::json!({
        "steering": mode,
        "trials": run.outages_ms.len(),
        "outage_ms_p50": percentile(&sorted, 0.5),
        "outage_ms_p99": percentile(&sorted, 0.99),
        "outage_ms_max": sorted.last(),
        "outages_ms": run.outages_ms,
        "lost_outside_cuts_ms": run.unexplained_ms,
        "packets_sent": run.stream.sent,
        "packets_lost": run.stream.lost,
        "duplicates_delivered": run.stream.duplicates,
    }))
}

pub fn run(args: &Args) -> anyhow::Result<Value> {
    let best = one_mode(args, SteeringMode::BestQuality)?;
    let dup = one_mode(args, SteeringMode::Duplicate)?;
    Ok(serde_json::json!({
        "bench": "failover",
        "rate_pps": args.rate,
        "trials": best["trials"],
        "outage_ms_p50": best["outage_ms_p50"],
        "outage_ms_p99": best["outage_ms_p99"],
        "outage_ms_max": best["outage_ms_max"],
        "best_quality": best,
        "duplicate": dup,
        "machine": super::machine(),
    }))
}

pub fn summary(r: &Value) -> String {
    let mode = |m: &Value| {
        format!(
            "{}: {} cuts, outage p50 {} p99 {} max {}; {} of {} packets lost, {} duplicates",
            m["steering"].as_str().unwrap_or("?"),
            m["trials"],
            fig(&m["outage_ms_p50"], 0, " ms"),
            fig(&m["outage_ms_p99"], 0, " ms"),
            fig(&m["outage_ms_max"], 0, " ms"),
            m["packets_lost"],
            m["packets_sent"],
            m["duplicates_delivered"],
        )
    };
    format!(
        "failover at {} packets/s:\n  {}\n  {}",
        r["rate_pps"],
        mode(&r["best_quality"]),
        mode(&r["duplicate"])
    )
}
