//! `patronus bench …`: benchmarks that measure the real code and print JSON on stdout. Each
//! states what it ran and on what machine; the numbers in the docs are copied from their output.
//! Progress while one runs, and a short human summary of its result, go to stderr. A figure that
//! nothing measured is `null` in the JSON and "no data" in the summary, never 0.

use std::io::Write;

use clap::Subcommand;

mod api_cost;
mod api_load;
mod backup;
mod db_stress;
mod dr;
mod events;
mod failover;
mod failover_storm;
mod health_load;
mod http;
mod mesh;
mod mesh_setup;
mod path_select;
mod process;
mod push;
mod report;
mod soak;
mod throughput;
mod wan_emulator;
mod world;

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
    /// (root) A hub and N spokes enrolled through a controller, a stream from every spoke;
    /// the hub's active link cut: every stream's outage, and how long until the API and the
    /// webhooks show every failover.
    FailoverStorm(failover_storm::Args),
    /// (root) A full mesh of real edges in the lab (1,012 paths by default) at the default
    /// probe rates, idle and busy: the edges' CPU per 1,000 paths, the probes' bytes on the
    /// WAN, and each path's measured RTT beside the emulated one.
    HealthLoad(health_load::Args),
    /// (root) One TCP stream between LAN hosts of two sites: through Patronus, through a pair
    /// of wireguard-go peers, and over the bare veth, in one run.
    Throughput(throughput::Args),
    /// N sites with two links each in a real controller store; every site's configuration
    /// compiled for a full mesh and for hub and spoke: time, size, memory.
    Mesh(mesh::Args),
    /// From an empty controller (its own process) to every site enrolled and every simulated
    /// edge holding its whole configuration, through the real API, enrolment and long poll:
    /// time, and the controller's memory and CPU, at each size.
    MeshSetup(mesh_setup::Args),
    /// A real controller and N simulated edges (real clients of the configuration long poll)
    /// in one process: the time from one policy write until every edge holds its new
    /// configuration.
    Push(push::Args),
    /// A controller (its own process) and N subscribers on its event stream: configuration
    /// changes at a steady rate, each to every subscriber: deliveries (none may be missing),
    /// their latency, and the controller's CPU with and without the subscribers, and idle.
    Events(events::Args),
    /// A real controller with N sites: what one API request (create a site, a page of sites, a
    /// page of paths, one path) costs at each size, and the ratio between sizes.
    ApiCost(api_cost::Args),
    /// A real controller with N sites under load from many keep-alive connections at once:
    /// authenticated reads, writes and a mix, on SQLite and PostgreSQL: rate, p50/p99/max,
    /// errors.
    ApiLoad(api_load::Args),
    /// A backup of a controller with N sites and a week of telemetry: its time, size,
    /// verification and restore, and the API's reads before and during it.
    Backup(backup::Args),
    /// A controller (its own process) with N enrolled sites and a store filled with a million
    /// path samples, 100,000 audit records and 10,000 failovers: the list endpoints' p99, the
    /// retention sweep, the database's size; then every edge reporting every 5 s: whether the
    /// controller keeps up, what it keeps, its CPU and the growth per day.
    DbStress(db_stress::Args),
    /// (root) Every disaster-recovery drill in the lab (controller killed, database
    /// corrupted, machine lost, site deleted, edge machine lost, secrets compromised): RTO,
    /// RPO and the data plane's loss of each, beside the seed's targets.
    Dr(dr::Args),
    /// Runs the benches (all but `dr`, or those named; `--short` for CI's form) and puts their
    /// figures beside the seed's baseline table, as JSON and Markdown; with `--baseline` an
    /// earlier report's JSON, fails when a figure got worse than its tolerance allows.
    Report(report::Args),
    /// (root) Three sites and a controller for `--duration`: streams, link cuts and
    /// degradations, configuration changes and controller restarts on a schedule; memory,
    /// descriptors and sockets of every process over time, false failovers, what is left.
    Soak(soak::Args),
}

pub fn run(b: Bench) -> anyhow::Result<()> {
    let (report, summary) = match b {
        Bench::PathSelect(args) => with_summary(path_select::run(&args)?, path_select::summary),
        Bench::WanEmulator(args) => with_summary(wan_emulator::run(&args)?, wan_emulator::summary),
        Bench::Failover(args) => with_summary(failover::run(&args)?, failover::summary),
        Bench::FailoverStorm(args) => {
            with_summary(failover_storm::run(&args)?, failover_storm::summary)
        }
        Bench::HealthLoad(args) => with_summary(health_load::run(&args)?, health_load::summary),
        Bench::Throughput(args) => with_summary(throughput::run(&args)?, throughput::summary),
        Bench::Mesh(args) => with_summary(mesh::run(&args)?, mesh::summary),
        Bench::MeshSetup(args) => with_summary(mesh_setup::run(&args)?, mesh_setup::summary),
        Bench::Push(args) => with_summary(push::run(&args)?, push::summary),
        Bench::Events(args) => with_summary(events::run(&args)?, events::summary),
        Bench::ApiCost(args) => with_summary(api_cost::run(&args)?, api_cost::summary),
        Bench::ApiLoad(args) => with_summary(api_load::run(&args)?, api_load::summary),
        Bench::Backup(args) => with_summary(backup::run(&args)?, backup::summary),
        Bench::DbStress(args) => with_summary(db_stress::run(&args)?, db_stress::summary),
        Bench::Dr(args) => with_summary(dr::run(&args)?, dr::summary),
        Bench::Report(args) => with_summary(report::run(&args)?, report::summary),
        Bench::Soak(args) => with_summary(soak::run(&args)?, soak::summary),
    };
    let mut out = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, &report)?;
    writeln!(out)?;
    drop(out);
    let _ = writeln!(std::io::stderr(), "{summary}");
    // A report that found a failed bench or a regression says so in its JSON, and fails.
    if let Some(why) = report::verdict(&report) {
        anyhow::bail!("bench report: {why}");
    }
    Ok(())
}

/// The summary is made from the JSON itself, so that it can say nothing the JSON does not.
fn with_summary(
    report: serde_json::Value,
    summary: fn(&serde_json::Value) -> String,
) -> (serde_json::Value, String) {
    let s = summary(&report);
    (report, s)
}

/// A progress line on stderr while a benchmark runs.
pub fn progress(what: std::fmt::Arguments<'_>) {
    let _ = writeln!(std::io::stderr(), "bench: {what}");
}

/// A figure of a report for a summary: `value` with `decimals` and `unit`, or "no data" when
/// the report holds none (null or absent).
pub fn fig(v: &serde_json::Value, decimals: usize, unit: &str) -> String {
    match v.as_f64() {
        Some(x) => format!("{x:.decimals$}{unit}"),
        None => "no data".to_owned(),
    }
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

/// A new admin password for a bench's controller: random, and of every class the password
/// rules ask for.
pub fn admin_password() -> anyhow::Result<String> {
    let mut pw = [0u8; 18];
    getrandom::getrandom(&mut pw)?;
    Ok(format!("{}-Aa1", patronus_controller::auth::b64url(&pw)))
}

/// A `kB` figure of `/proc/<pid>/status` (`key` such as `VmRSS:`; this process's when `pid`
/// is none), in KiB.
pub fn proc_status_kb(pid: Option<u32>, key: &str) -> Option<u64> {
    let path = pid.map_or("/proc/self/status".to_owned(), |p| {
        format!("/proc/{p}/status")
    });
    std::fs::read_to_string(path)
        .ok()?
        .lines()
        .find(|l| l.starts_with(key))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// The CPU time (user + system, seconds) process `pid` has used so far.
pub fn cpu_s(pid: u32) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The fields after the command's name, which is in parentheses.
    let f: Vec<&str> = s.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()? as f64;
    Some(ticks / hz)
}

/// Nearest-rank percentiles ([`patronus_lab::stats::percentile`]) of a sample of
/// nanoseconds; null for an empty sample.
pub fn percentiles(samples: &mut [u64]) -> serde_json::Value {
    samples.sort_unstable();
    let at = |q: f64| patronus_lab::stats::percentile(samples, q);
    serde_json::json!({
        "samples": samples.len(),
        "p50_ns": at(0.50),
        "p90_ns": at(0.90),
        "p99_ns": at(0.99),
        "p999_ns": at(0.999),
        "max_ns": samples.last(),
    })
}
