//! `patronus bench wan-emulator` (root): how fast and how faithful the lab's WAN emulator is, in
//! one run on one lab.
//!
//! - **Throughput**: one TCP stream (`iperf3`) between two edges, first through an unimpaired
//!   emulated link pair, then through a bare veth pair (kernel forwarding only) in the same lab;
//!   the ratio is what the emulator costs.
//! - **Accuracy**: a constant-rate UDP stream through a link set to `delay=50ms jitter=5ms
//!   loss=10%` in one direction; the measured mean and standard deviation of the one-way delay,
//!   RFC 3550 jitter and loss, against the settings.

use std::time::Duration;

use anyhow::Context;
use patronus_api::LinkKind;
use patronus_lab::stream::{self, StreamConfig};
use patronus_lab::{Dir, Impairment, Lab, LabOptions, Topology, iperf};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Seconds per iperf3 run.
    #[arg(long, default_value_t = 10)]
    seconds: u32,
    /// Seconds of the accuracy stream (100 packets/s).
    #[arg(long, default_value_t = 30)]
    accuracy_seconds: u64,
}

pub fn run(args: &Args) -> anyhow::Result<serde_json::Value> {
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
            "mean_delay_ms": acc.delay.mean_ms,
            "delay_stddev_ms": acc.delay.stddev_ms,
            "delay_p50_ms": acc.delay.p50_ms,
            "delay_p99_ms": acc.delay.p99_ms,
            "rfc3550_jitter_ms": acc.delay.jitter_ms,
            "ipdv_mean_ms": acc.delay.ipdv_mean_ms,
            "loss_pct": acc.loss_pct,
            "reordered": acc.reordered,
            // The same shaper in virtual time (stream::model): a perfect emulator's figures.
            "model": {
                "mean_delay_ms": model.delay.mean_ms,
                "delay_stddev_ms": model.delay.stddev_ms,
                "rfc3550_jitter_ms": model.delay.jitter_ms,
                "ipdv_mean_ms": model.delay.ipdv_mean_ms,
                "loss_pct": model.loss_pct,
            },
        },
        "machine": super::machine(),
    }))
}
