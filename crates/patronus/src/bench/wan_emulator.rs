//! `patronus bench wan-emulator` (root): how fast and how faithful the lab's WAN emulator is, in
//! one run on one lab.
//!
//! - **Throughput**: one TCP stream (`iperf3`) between two edges, first through an unimpaired
//!   emulated link pair, then through a bare veth pair (kernel forwarding only) in the same lab;
//!   the ratio is what the emulator costs.
//! - **Accuracy**: a constant-rate UDP stream through a link set to `delay=50ms jitter=5ms
//!   loss=10%` in one direction; the measured mean and standard deviation of the one-way delay,
//!   RFC 3550 jitter and loss, against the settings. Delay figures are null if no packet
//!   arrived.

use std::time::Duration;

use anyhow::Context;
use patronus_api::LinkKind;
use patronus_lab::stream::{self, StreamConfig};
use patronus_lab::{Dir, Impairment, Lab, LabOptions, Topology, iperf};
use serde_json::Value;

use super::{fig, progress};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Seconds per iperf3 run.
    #[arg(long, default_value_t = 10)]
    seconds: u32,
    /// Seconds of the accuracy stream (100 packets/s).
    #[arg(long, default_value_t = 30)]
    accuracy_seconds: u64,
}

pub fn run(args: &Args) -> anyhow::Result<Value> {
    let topology = Topology::two_sites(
        "bench-wan-emulator",
        &[
            ("emulated", LinkKind::Other, true),
            ("bare", LinkKind::Other, false),
        ],
    );
    let lab = Lab::up(&topology, LabOptions::default()).context("building the bench lab")?;
    let (a, b) = (lab.ns("a")?, lab.ns("b")?);
    let addr = |l: &str| -> anyhow::Result<std::net::IpAddr> {
        let (_, p) = lab.plan().link(l).context("bench link")?;
        Ok(p.addr4.into())
    };
    progress(format_args!(
        "TCP for {} s through the emulator, then {} s over the bare veth",
        args.seconds, args.seconds
    ));
    let emulated = iperf::tcp(
        &b,
        &a,
        addr("b/emulated")?,
        Some(addr("a/emulated")?),
        args.seconds,
    )
    .context("iperf3 through the emulator")?;
    let bare = iperf::tcp(&b, &a, addr("b/bare")?, Some(addr("a/bare")?), args.seconds)
        .context("iperf3 over the bare veth")?;
    let emu_status = lab.emulator_status()?;

    let mut imp = Impairment::default();
    imp.apply(&["delay=50ms", "jitter=5ms", "loss=10%"])?;
    lab.set_link("a/emulated", Dir::Up, imp.clone())?;
    let cfg = StreamConfig {
        rate_pps: 100,
        duration: Duration::from_secs(args.accuracy_seconds),
        size: 100,
        linger: Duration::from_millis(500),
        ..Default::default()
    };
    progress(format_args!(
        "a 100 packets/s stream for {} s through delay=50ms jitter=5ms loss=10%",
        args.accuracy_seconds
    ));
    let acc = stream::run(&a, &b, addr("b/emulated")?, &cfg).context("accuracy stream")?;
    let model = stream::model(&imp, &cfg, 99);
    lab.down()?;

    Ok(serde_json::json!({
        "bench": "wan-emulator",
        "throughput": {
            "seconds": args.seconds,
            "emulated_gbps": emulated.gbps,
            "emulated_retransmits": emulated.retransmits,
            "bare_veth_gbps": bare.gbps,
            "bare_veth_retransmits": bare.retransmits,
            "emulated_over_bare": emulated.gbps / bare.gbps,
            "emulator_overflow_drops": emu_status.overflow,
            "emulator_tx_errors": emu_status.tx_errors,
        },
        "accuracy": {
            "set": "delay=50ms jitter=5ms (normal) loss=10%, one direction",
            "packets_per_second": cfg.rate_pps,
            "sent": acc.sent,
            "received": acc.received,
            "mean_delay_ms": acc.delay.as_ref().map(|d| d.mean_ms),
            "delay_stddev_ms": acc.delay.as_ref().map(|d| d.stddev_ms),
            "delay_p50_ms": acc.delay.as_ref().map(|d| d.p50_ms),
            "delay_p99_ms": acc.delay.as_ref().map(|d| d.p99_ms),
            "rfc3550_jitter_ms": acc.delay.as_ref().and_then(|d| d.jitter_ms),
            "ipdv_mean_ms": acc.delay.as_ref().and_then(|d| d.ipdv_mean_ms),
            "loss_pct": acc.loss_pct,
            "reordered": acc.reordered,
            // The same shaper in virtual time (stream::model): a perfect emulator's figures.
            "model": {
                "sent": model.sent,
                "received": model.received,
                "mean_delay_ms": model.delay.as_ref().map(|d| d.mean_ms),
                "delay_stddev_ms": model.delay.as_ref().map(|d| d.stddev_ms),
                "rfc3550_jitter_ms": model.delay.as_ref().and_then(|d| d.jitter_ms),
                "ipdv_mean_ms": model.delay.as_ref().and_then(|d| d.ipdv_mean_ms),
                "loss_pct": model.loss_pct,
            },
        },
        "machine": super::machine(),
    }))
}

pub fn summary(r: &Value) -> String {
    let (t, a, m) = (&r["throughput"], &r["accuracy"], &r["accuracy"]["model"]);
    format!(
        "wan-emulator:\n  TCP through the emulator {} ({} retransmits), over the bare veth {}: \
         ratio {}\n  {} sent, {} received; mean delay {} (model {}), stddev {} (model {}), \
         loss {} (model {}), {} reordered",
        fig(&t["emulated_gbps"], 2, " Gbit/s"),
        t["emulated_retransmits"],
        fig(&t["bare_veth_gbps"], 2, " Gbit/s"),
        fig(&t["emulated_over_bare"], 2, ""),
        a["sent"],
        a["received"],
        fig(&a["mean_delay_ms"], 2, " ms"),
        fig(&m["mean_delay_ms"], 2, " ms"),
        fig(&a["delay_stddev_ms"], 2, " ms"),
        fig(&m["delay_stddev_ms"], 2, " ms"),
        fig(&a["loss_pct"], 1, " %"),
        fig(&m["loss_pct"], 1, " %"),
        a["reordered"],
    )
}
