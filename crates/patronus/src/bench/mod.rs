//! `patronus bench …`: benchmarks that measure the real code and print JSON. Each states what
//! it ran and on what machine; the numbers in the docs are copied from their output.

use std::io::Write;

use clap::Subcommand;

mod failover;
mod mesh;
mod path_select;
mod push;
mod throughput;
mod wan_emulator;

#[derive(Debug, Subcommand)]
pub enum Bench {
    /// The per-packet decision of the path engine: parse, classify, select, on a flow-cache hit
    /// and on a miss.
    PathSelect(path_select::Args),
    /// (root) The lab's WAN emulator: TCP throughput through it against a bare veth in the
    /// same run, and the accuracy of delay, jitter and loss on real packets.
    WanEmulator(wan_emulator::Args),
    /// (root) Hard failover through real edges in the lab: loss-derived outage per link cut,
    /// with the default steering and with `duplicate`.
    Failover(failover::Args),
    /// (root) One TCP stream between LAN hosts of two sites: through Patronus, through a pair
    /// of wireguard-go peers, and over the bare veth, in one run.
    Throughput(throughput::Args),
    /// N sites with two links each in a real controller store; every site's configuration
    /// compiled for a full mesh and for hub and spoke: time, size, memory.
    Mesh(mesh::Args),
    /// A real controller and N simulated edges (real clients of the configuration long poll)
    /// in one process: the time from one policy write until every edge holds its new
    /// configuration.
    Push(push::Args),
}

pub fn run(b: Bench) -> anyhow::Result<()> {
    let report = match b {
        Bench::PathSelect(args) => path_select::run(&args)?,
        Bench::WanEmulator(args) => wan_emulator::run(&args)?,
        Bench::Failover(args) => failover::run(&args)?,
        Bench::Throughput(args) => throughput::run(&args)?,
        Bench::Mesh(args) => mesh::run(&args)?,
        Bench::Push(args) => push::run(&args)?,
    };
    let mut out = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, &report)?;
    writeln!(out)?;
    Ok(())
}

/// What the benchmark ran on: CPU model and count, from /proc (Linux); null where unknown.
pub fn machine() -> serde_json::Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo").ok().and_then(|s| {
        s.lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_owned())
    });
    serde_json::json!({
        "cpu": cpu,
        "cpus": std::thread::available_parallelism().map(|n| n.get()).ok(),
        "os": std::env::consts::OS,
        "arch": std::env::consts::ARCH,
    })
}

/// Nearest-rank percentiles of a sample, in the sample's unit.
pub fn percentiles(samples: &mut [u64]) -> serde_json::Value {
    samples.sort_unstable();
    let at = |q: f64| -> Option<u64> {
        if samples.is_empty() {
            return None;
        }
        let rank = ((q * samples.len() as f64).ceil() as usize).clamp(1, samples.len());
        Some(samples[rank - 1])
    };
    serde_json::json!({
        "samples": samples.len(),
        "p50_ns": at(0.50),
        "p90_ns": at(0.90),
        "p99_ns": at(0.99),
        "p999_ns": at(0.999),
        "max_ns": samples.last(),
    })
}
