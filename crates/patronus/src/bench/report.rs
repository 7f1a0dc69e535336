//! `patronus bench report`: runs the benchmarks (all, or those named), each as its own
//! `patronus bench …` process, and puts their figures beside the seed's baseline table: one
//! JSON on stdout (every bench's whole output in it, so it can serve as a later baseline) and
//! a Markdown report (`--markdown FILE`).
//!
//! With `--baseline FILE` (an earlier report's JSON) each figure is compared with the
//! baseline's, and the command fails when one got worse than its tolerance allows. The
//! tolerances are per figure: ratios measured within one run (Patronus against wireguard-go
//! or the bare veth, in the same minute) move little and are held tightly; absolute times
//! swing with the machine's background load and are given more room. `--from FILE` takes the
//! figures from an earlier report instead of running anything (to compare two reports).

use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::Context;
use serde_json::{Map, Value, json};

use super::progress;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The benches to run, comma-separated (default: all but `dr`, which the lab tests run
    /// and which takes minutes, and `soak`, which takes an hour; `--short` runs the soak too):
    /// path-select, mesh, mesh-setup, mesh-setup-lab, push, api-cost, api-load, backup,
    /// db-stress, wan-emulator, failover, failover-storm, health-load, throughput, soak, dr.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Each bench in its short form (seconds, small N), as CI runs them: the figures then
    /// say that the bench works, not what the product does at scale.
    #[arg(long)]
    short: bool,
    /// Write the Markdown report here.
    #[arg(long)]
    markdown: Option<std::path::PathBuf>,
    /// An earlier report's JSON to compare with: a figure worse than its tolerance allows
    /// makes the command fail.
    #[arg(long)]
    baseline: Option<std::path::PathBuf>,
    /// Take the results from this earlier report's JSON instead of running the benches.
    #[arg(long)]
    from: Option<std::path::PathBuf>,
}

/// One bench of the suite: its arguments in the full and the short form, and whether it needs
/// root (the lab).
struct Entry {
    /// The key of its result in the report.
    name: &'static str,
    /// The `patronus bench` subcommand it runs.
    command: &'static str,
    full: &'static [&'static str],
    short: &'static [&'static str],
    root: bool,
    /// Run when no `--only` names it.
    default: bool,
}

const SUITE: &[Entry] = &[
    Entry {
        name: "path-select",
        command: "path-select",
        full: &[],
        short: &["--packets", "200000", "--flows", "10000"],
        root: false,
        default: true,
    },
    Entry {
        name: "mesh",
        command: "mesh",
        full: &["--sites", "1000"],
        short: &["--sites", "100"],
        root: false,
        default: true,
    },
    Entry {
        name: "mesh-setup",
        command: "mesh-setup",
        full: &["--sites", "100,500,1000,2000"],
        short: &["--sites", "20,50"],
        root: false,
        default: true,
    },
    Entry {
        name: "mesh-setup-lab",
        command: "mesh-setup",
        full: &["--lab", "--sites", "10,20", "--timeout", "300"],
        short: &["--lab", "--sites", "3"],
        root: true,
        default: true,
    },
    Entry {
        name: "push",
        command: "push",
        full: &["--edges", "1000"],
        short: &["--edges", "50"],
        root: false,
        default: true,
    },
    Entry {
        name: "events",
        command: "events",
        full: &["--subscribers", "100", "--events", "200"],
        short: &[
            "--subscribers",
            "10",
            "--events",
            "20",
            "--rate",
            "50",
            "--idle-s",
            "2",
        ],
        root: false,
        default: true,
    },
    Entry {
        name: "api-cost",
        command: "api-cost",
        full: &["--sites", "10,1000"],
        short: &["--sites", "10,50", "--requests", "10"],
        root: false,
        default: true,
    },
    Entry {
        name: "api-load",
        command: "api-load",
        full: &["--sites", "1000", "--seconds", "10"],
        short: &["--sites", "50", "--connections", "8", "--seconds", "0.5"],
        root: false,
        default: true,
    },
    Entry {
        name: "backup",
        command: "backup",
        full: &["--sites", "1000"],
        short: &["--sites", "20", "--samples", "2000"],
        root: false,
        default: true,
    },
    Entry {
        name: "db-stress",
        command: "db-stress",
        full: &[],
        short: &[
            "--sites",
            "20",
            "--samples",
            "20000",
            "--audit",
            "2000",
            "--failovers",
            "500",
            "--reads",
            "20",
            "--ingest-s",
            "10",
        ],
        root: false,
        default: true,
    },
    Entry {
        name: "wan-emulator",
        command: "wan-emulator",
        full: &[],
        short: &["--seconds", "2", "--accuracy-seconds", "3"],
        root: true,
        default: true,
    },
    Entry {
        name: "failover",
        command: "failover",
        full: &[],
        short: &["--trials", "2"],
        root: true,
        default: true,
    },
    Entry {
        name: "failover-storm",
        command: "failover-storm",
        full: &["--spokes", "30", "--cuts", "4"],
        short: &["--spokes", "3", "--cuts", "1"],
        root: true,
        default: true,
    },
    Entry {
        name: "health-load",
        command: "health-load",
        full: &[],
        short: &["--sites", "4", "--window-s", "5"],
        root: true,
        default: true,
    },
    Entry {
        name: "throughput",
        command: "throughput",
        full: &[],
        short: &["--seconds", "2"],
        root: true,
        default: true,
    },
    Entry {
        name: "soak",
        command: "soak",
        full: &["--duration", "3600"],
        short: &["--duration", "120", "--restart-every", "60"],
        root: true,
        default: false,
    },
    Entry {
        name: "dr",
        command: "dr",
        full: &[],
        short: &[],
        root: true,
        default: false,
    },
];

#[derive(Clone, Copy)]
enum Better {
    Lower,
    Higher,
}

/// A figure of the report: where it comes from, the seed's value for it (if the seed's plan
/// gave one), and how much worse than a baseline it may get.
struct Figure {
    /// Stable: baselines are matched by it.
    id: &'static str,
    what: &'static str,
    bench: &'static str,
    get: fn(&Value) -> Option<f64>,
    unit: &'static str,
    decimals: usize,
    seed: &'static str,
    better: Better,
    /// Worse than the baseline by more than this factor is a regression.
    tolerance: f64,
}

impl Entry {
    fn args(&self, short: bool) -> &'static [&'static str] {
        if short { self.short } else { self.full }
    }
}

impl Figure {
    /// Its value in `results` (by bench name, as a report holds them), if its bench ran and
    /// measured it.
    fn of(&self, results: &Map<String, Value>) -> Option<f64> {
        results
            .get(self.bench)
            .and_then(|r| (self.get)(&r["result"]))
    }
}

fn sized(r: &Value, list: &str, key: &str, n: u64, field: &str) -> Option<f64> {
    r[list]
        .as_array()?
        .iter()
        .find(|s| s[key].as_u64() == Some(n))?[field]
        .as_f64()
}

fn api_load(r: &Value, backend: &str, scenario: &str, field: &str) -> Option<f64> {
    r["backends"]
        .as_array()?
        .iter()
        .find(|b| b["backend"] == backend)?["scenarios"]
        .as_array()?
        .iter()
        .find(|s| s["scenario"] == scenario)?[field]
        .as_f64()
}

/// The SQLite run of a `db-stress` result, if it is the full size (1000 sites).
fn db_stress(r: &Value) -> Option<&Value> {
    (r["sites"].as_u64() == Some(1000)).then_some(())?;
    r["backends"]
        .as_array()?
        .iter()
        .find(|b| b["backend"] == "sqlite")
}

const FIGURES: &[Figure] = &[
    Figure {
        id: "mesh_setup_100_s",
        what: "Mesh setup, 100 sites (full mesh, simulated edges, real API and enrolment)",
        bench: "mesh-setup",
        get: |r| sized(r, "sizes", "sites", 100, "setup_s"),
        unit: " s",
        decimals: 1,
        seed: "≈ 8 s",
        better: Better::Lower,
        tolerance: 2.0,
    },
    Figure {
        id: "mesh_setup_500_s",
        what: "Mesh setup, 500 sites",
        bench: "mesh-setup",
        get: |r| sized(r, "sizes", "sites", 500, "setup_s"),
        unit: " s",
        decimals: 1,
        seed: "≈ 28 s",
        better: Better::Lower,
        tolerance: 2.0,
    },
    Figure {
        id: "mesh_setup_1000_s",
        what: "Mesh setup, 1000 sites",
        bench: "mesh-setup",
        get: |r| sized(r, "sizes", "sites", 1000, "setup_s"),
        unit: " s",
        decimals: 1,
        seed: "≈ 52 s",
        better: Better::Lower,
        tolerance: 2.0,
    },
    Figure {
        id: "mesh_setup_2000_s",
        what: "Mesh setup, 2000 sites (about 2 GB of configurations and deltas to the edges)",
        bench: "mesh-setup",
        get: |r| sized(r, "sizes", "sites", 2000, "setup_s"),
        unit: " s",
        decimals: 1,
        seed: "",
        better: Better::Lower,
        tolerance: 2.0,
    },
    Figure {
        id: "mesh_setup_2000_kb_per_site",
        what: "Mesh setup, 2000 sites: the controller's memory per site",
        bench: "mesh-setup",
        get: |r| {
            r["sizes"]
                .as_array()?
                .iter()
                .find(|s| s["sites"].as_u64() == Some(2000))?["controller"]["rss_per_site_kb"]
                .as_f64()
        },
        unit: " KB",
        decimals: 0,
        seed: "",
        better: Better::Lower,
        tolerance: 1.5,
    },
    Figure {
        id: "mesh_setup_lab_20_s",
        what: "Mesh setup, 20 real edges in the lab (full mesh, 760 paths), until every path \
               reads Up at the controller",
        bench: "mesh-setup-lab",
        get: |r| sized(r, "sizes", "sites", 20, "setup_s"),
        unit: " s",
        decimals: 1,
        seed: "",
        better: Better::Lower,
        tolerance: 2.0,
    },
    Figure {
        id: "path_select_p99_ns",
        what: "Path selection at 1000 paths, p99 of every decision",
        bench: "path-select",
        get: |r| r["p99_ns"].as_f64(),
        unit: " ns",
        decimals: 0,
        seed: "≈ 47 µs",
        better: Better::Lower,
        tolerance: 3.0,
    },
    Figure {
        id: "path_select_miss_p99_ns",
        what: "Path selection at 1000 paths, p99 of a flow's first packet",
        bench: "path-select",
        get: |r| r["miss"]["p99_ns"].as_f64(),
        unit: " ns",
        decimals: 0,
        seed: "",
        better: Better::Lower,
        tolerance: 3.0,
    },
    Figure {
        id: "health_load_idle_cores_per_1000",
        what: "Health probing of 1012 real paths, idle: the edges' CPU cores per 1000 paths",
        bench: "health-load",
        get: |r| r["idle"]["edges_cpu_cores_per_1000_paths"].as_f64(),
        unit: "",
        decimals: 3,
        seed: "",
        better: Better::Lower,
        tolerance: 1.5,
    },
    Figure {
        id: "health_load_busy_cores_per_1000",
        what: "Health probing, busy (a stream between every pair of sites): cores per 1000 paths",
        bench: "health-load",
        get: |r| r["busy"]["edges_cpu_cores_per_1000_paths"].as_f64(),
        unit: "",
        decimals: 3,
        seed: "",
        better: Better::Lower,
        tolerance: 1.5,
    },
    Figure {
        id: "health_load_idle_kbit_per_1000",
        what: "Health probing, idle: the probes' kbit/s on the WAN per 1000 paths",
        bench: "health-load",
        get: |r| r["idle"]["overhead_kbit_per_s_per_1000_paths"].as_f64(),
        unit: " kbit/s",
        decimals: 0,
        seed: "",
        better: Better::Lower,
        tolerance: 1.3,
    },
    Figure {
        id: "health_load_idle_rtt_error_p99_ms",
        what: "Health probing, idle: measured RTT less the emulated one, p99",
        bench: "health-load",
        get: |r| r["idle"]["rtt_error_ms"]["p99"].as_f64(),
        unit: " ms",
        decimals: 2,
        seed: "",
        better: Better::Lower,
        tolerance: 3.0,
    },
    Figure {
        id: "failover_cut_p50_ms",
        what: "Single failover (hard cut of the active link), outage p50",
        bench: "failover",
        get: |r| r["outage_ms_p50"].as_f64(),
        unit: " ms",
        decimals: 0,
        seed: "≈ 78 ms",
        better: Better::Lower,
        tolerance: 1.5,
    },
    Figure {
        id: "failover_cut_p99_ms",
        what: "Single failover, outage p99",
        bench: "failover",
        get: |r| r["outage_ms_p99"].as_f64(),
        unit: " ms",
        decimals: 0,
        seed: "",
        better: Better::Lower,
        tolerance: 1.5,
    },
    Figure {
        id: "failover_storm_p99_ms",
        what: "Failover storm: the hub's active link cut under every spoke's stream, outage p99",
        bench: "failover-storm",
        get: |r| r["outage_ms_p99"].as_f64(),
        unit: " ms",
        decimals: 0,
        seed: "",
        better: Better::Lower,
        tolerance: 1.5,
    },
    Figure {
        id: "failover_storm_api_s",
        what: "Failover storm: until the API lists every spoke's failover (worst cut)",
        bench: "failover-storm",
        get: |r| r["api_every_failover_s_max"].as_f64(),
        unit: " s",
        decimals: 2,
        seed: "",
        better: Better::Lower,
        tolerance: 3.0,
    },
    Figure {
        id: "throughput_over_wireguard_go",
        what: "One TCP stream through Patronus over wireguard-go's (same run)",
        bench: "throughput",
        get: |r| r["patronus_over_wireguard_go"].as_f64(),
        unit: "x",
        decimals: 2,
        seed: "",
        better: Better::Higher,
        tolerance: 1.5,
    },
    Figure {
        id: "throughput_over_veth",
        what: "One TCP stream through Patronus over the bare veth's (same run)",
        bench: "throughput",
        get: |r| r["patronus_over_raw"].as_f64(),
        unit: "x",
        decimals: 3,
        seed: "",
        better: Better::Higher,
        tolerance: 1.3,
    },
    Figure {
        id: "wan_emulator_over_veth",
        what: "The lab's WAN emulator over the bare veth (TCP, same run)",
        bench: "wan-emulator",
        get: |r| r["throughput"]["emulated_over_bare"].as_f64(),
        unit: "x",
        decimals: 2,
        seed: "",
        better: Better::Higher,
        tolerance: 1.3,
    },
    Figure {
        id: "mesh_compile_ms",
        what: "Compile every site's configuration, 1000 sites",
        bench: "mesh",
        get: |r| (r["sites"].as_u64() == Some(1000)).then(|| r["compile_ms"].as_f64())?,
        unit: " ms",
        decimals: 1,
        seed: "",
        better: Better::Lower,
        tolerance: 2.0,
    },
    Figure {
        id: "push_1000_p99_ms",
        what: "A policy write until 1000 long-polling edges hold it, p99",
        bench: "push",
        get: |r| (r["edges"].as_u64() == Some(1000)).then(|| r["p99_ms"].as_f64())?,
        unit: " ms",
        decimals: 0,
        seed: "",
        better: Better::Lower,
        tolerance: 2.0,
    },
    Figure {
        id: "api_load_sqlite_me_per_s",
        what: "API load: GET /auth/me (authentication alone) per s, SQLite",
        bench: "api-load",
        get: |r| api_load(r, "sqlite", "me", "per_s"),
        unit: "/s",
        decimals: 0,
        seed: "",
        better: Better::Higher,
        tolerance: 1.5,
    },
    Figure {
        id: "api_load_sqlite_site_per_s",
        what: "API load: GET /sites/{id} per s, SQLite",
        bench: "api-load",
        get: |r| api_load(r, "sqlite", "site", "per_s"),
        unit: "/s",
        decimals: 0,
        seed: "",
        better: Better::Higher,
        tolerance: 1.5,
    },
    Figure {
        id: "api_load_sqlite_sites_page_per_s",
        what: "API load: GET /sites (a page of 50) per s, SQLite",
        bench: "api-load",
        get: |r| api_load(r, "sqlite", "sites-page", "per_s"),
        unit: "/s",
        decimals: 0,
        seed: "",
        better: Better::Higher,
        tolerance: 1.5,
    },
    Figure {
        id: "api_load_sqlite_mix_p99_ms",
        what: "API load: 9 reads to 1 write, p99, SQLite",
        bench: "api-load",
        get: |r| api_load(r, "sqlite", "mix", "p99_ms"),
        unit: " ms",
        decimals: 0,
        seed: "",
        better: Better::Lower,
        tolerance: 2.0,
    },
    Figure {
        id: "api_load_postgres_site_per_s",
        what: "API load: GET /sites/{id} per s, PostgreSQL",
        bench: "api-load",
        get: |r| api_load(r, "postgres", "site", "per_s"),
        unit: "/s",
        decimals: 0,
        seed: "",
        better: Better::Higher,
        tolerance: 1.5,
    },
    Figure {
        id: "backup_create_s",
        what: "Backup of 1000 sites and a week of telemetry: create",
        bench: "backup",
        get: |r| (r["sites"].as_u64() == Some(1000)).then(|| r["create_s"].as_f64())?,
        unit: " s",
        decimals: 1,
        seed: "",
        better: Better::Lower,
        tolerance: 2.0,
    },
    Figure {
        id: "db_stress_list_p99_ms",
        what: "1M samples, 100k audit records, 10k failovers: the slowest list endpoint's p99, \
               SQLite",
        bench: "db-stress",
        get: |r| {
            db_stress(r)?["reads"]
                .as_object()?
                .values()
                .filter_map(|v| v["p99_ms"].as_f64())
                .reduce(f64::max)
        },
        unit: " ms",
        decimals: 1,
        seed: "",
        better: Better::Lower,
        tolerance: 2.0,
    },
    Figure {
        id: "db_stress_sweep_s",
        what: "The retention sweep of 100k expired samples in a store of 1M, SQLite",
        bench: "db-stress",
        get: |r| db_stress(r)?["sweep"]["seconds"].as_f64(),
        unit: " s",
        decimals: 2,
        seed: "",
        better: Better::Lower,
        tolerance: 2.0,
    },
    Figure {
        id: "db_stress_ingest_cpu_cores",
        what: "Telemetry of 1000 sites every 5 s: the controller's CPU cores, SQLite",
        bench: "db-stress",
        get: |r| db_stress(r)?["ingest"]["controller_cpu_cores"].as_f64(),
        unit: "",
        decimals: 2,
        seed: "",
        better: Better::Lower,
        tolerance: 1.5,
    },
    Figure {
        id: "db_stress_ingest_mb_per_day",
        what: "Telemetry of 1000 sites every 5 s: the database's growth per day, SQLite",
        bench: "db-stress",
        get: |r| db_stress(r)?["ingest"]["database_growth_mb_per_day"].as_f64(),
        unit: " MB",
        decimals: 0,
        seed: "",
        better: Better::Lower,
        tolerance: 1.5,
    },
    Figure {
        id: "dr_controller_killed_rto_s",
        what: "Controller killed: RTO",
        bench: "dr",
        get: |r| {
            r["drills"]
                .as_array()?
                .iter()
                .find(|d| d["drill"] == "controller_killed")?["rto_s"]
                .as_f64()
        },
        unit: " s",
        decimals: 1,
        seed: "RTO 15 min",
        better: Better::Lower,
        tolerance: 2.0,
    },
];

/// The commit this was run from (the current directory's repository), with `-dirty` when it
/// has uncommitted changes; none outside a repository.
fn commit() -> Option<String> {
    let git = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .stderr(Stdio::null())
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    let head = git(&["rev-parse", "--short=12", "HEAD"])?;
    let dirty =
        git(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty());
    Some(if dirty { format!("{head}-dirty") } else { head })
}

fn command_of(e: &Entry, short: bool) -> String {
    let mut c = format!("patronus bench {}", e.command);
    for a in e.args(short) {
        c.push(' ');
        c.push_str(a);
    }
    c
}

/// Runs one bench as its own process: its JSON, or what went wrong.
fn run_one(e: &Entry, short: bool) -> Value {
    let command = command_of(e, short);
    if e.root && !nix::unistd::geteuid().is_root() {
        return json!({ "command": command, "error": "needs root (it builds a lab)" });
    }
    progress(format_args!("report: {command}"));
    // What the last bench left to write (a 2000-site database, a lab's state) is written
    // before this one starts: a lab of 20 edges started under that flush took 45 s to bring
    // every path up, 2.8 s alone.
    nix::unistd::sync();
    let t = Instant::now();
    let out = std::env::current_exe().and_then(|exe| {
        Command::new(exe)
            .arg("bench")
            .arg(e.command)
            .args(e.args(short))
            .stdin(Stdio::null())
            .stderr(Stdio::inherit())
            .output()
    });
    let seconds = t.elapsed().as_secs_f64();
    match out {
        Err(err) => json!({ "command": command, "error": format!("could not run it: {err}") }),
        Ok(o) if !o.status.success() => json!({
            "command": command,
            "seconds": seconds,
            "error": format!("it failed ({}); its error is above", o.status),
        }),
        Ok(o) => match serde_json::from_slice::<Value>(&o.stdout) {
            Ok(result) => json!({ "command": command, "seconds": seconds, "result": result }),
            Err(err) => json!({
                "command": command,
                "seconds": seconds,
                "error": format!("its output is not JSON: {err}"),
            }),
        },
    }
}

/// Every figure of `results` (by bench name), with the command that produced it.
fn figures(results: &Map<String, Value>) -> Vec<Value> {
    FIGURES
        .iter()
        .map(|f| {
            json!({
                "id": f.id,
                "what": f.what,
                "bench": f.bench,
                "value": f.of(results),
                "unit": f.unit,
                "seed": (!f.seed.is_empty()).then_some(f.seed),
                "command": results.get(f.bench).and_then(|r| r["command"].as_str()),
            })
        })
        .collect()
}

fn shown(f: &Figure, v: Option<f64>) -> String {
    v.map_or_else(
        || "no data".to_owned(),
        |x| format!("{x:.prec$}{}", f.unit, prec = f.decimals),
    )
}

/// Each figure against the baseline's: (the comparison rows, the ids that regressed).
fn compare(now: &Map<String, Value>, base: &Map<String, Value>) -> (Vec<Value>, Vec<String>) {
    let mut rows = Vec::new();
    let mut regressed = Vec::new();
    for f in FIGURES {
        let (Some(b), n) = (f.of(base), f.of(now)) else {
            continue;
        };
        let verdict = match n {
            None => "missing",
            Some(n) => {
                let worse = match f.better {
                    Better::Lower => n > b * f.tolerance,
                    Better::Higher => n * f.tolerance < b,
                };
                if worse { "REGRESSION" } else { "ok" }
            }
        };
        if verdict == "REGRESSION" {
            regressed.push(f.id.to_owned());
        }
        rows.push(json!({
            "id": f.id,
            "baseline": b,
            "now": n,
            "change": n.filter(|_| b != 0.0).map(|n| n / b),
            "better": match f.better { Better::Lower => "lower", Better::Higher => "higher" },
            "tolerance": f.tolerance,
            "verdict": verdict,
        }));
    }
    (rows, regressed)
}

fn markdown(report: &Value) -> String {
    let mut md = String::new();
    let machine = &report["machine"];
    let short = report["short"] == true;
    md.push_str(&format!(
        "Measured by `patronus bench report{}` on commit `{}`, {} ({} CPUs, \"{}\"){}.\n\n",
        if short { " --short" } else { "" },
        report["commit"].as_str().unwrap_or("unknown"),
        report["date"].as_str().unwrap_or("?"),
        machine["cpus"],
        machine["cpu"].as_str().unwrap_or("?"),
        if short {
            "; the short form (small N, seconds): these figures show that each bench works, not \
             what the product does at scale"
        } else {
            ""
        },
    ));
    md.push_str("| Figure | The seed's plan | Patronus | Command |\n|---|---|---|---|\n");
    let figs = report["figures"].as_array().cloned().unwrap_or_default();
    for (f, v) in FIGURES.iter().zip(&figs) {
        md.push_str(&format!(
            "| {} | {} | {} | {} |\n",
            f.what,
            if f.seed.is_empty() {
                "no figure"
            } else {
                f.seed
            },
            shown(f, v["value"].as_f64()),
            v["command"]
                .as_str()
                .map_or("not run".to_owned(), |c| format!("`{c}`")),
        ));
    }
    let failed: Vec<String> = report["results"]
        .as_object()
        .into_iter()
        .flatten()
        .filter_map(|(k, r)| Some(format!("- `{k}`: {}", r["error"].as_str()?)))
        .collect();
    if !failed.is_empty() {
        md.push_str(&format!(
            "\nBenches that did not run or failed:\n\n{}\n",
            failed.join("\n")
        ));
    }
    if let Some(rows) = report["comparison"].as_array() {
        md.push_str(&format!(
            "\nAgainst the baseline `{}` (a figure worse than its tolerance allows is a \
             regression):\n\n| Figure | Baseline | Now | Now / baseline | Better | Tolerance | Verdict |\n|---|---|---|---|---|---|---|\n",
            report["baseline"].as_str().unwrap_or("?")
        ));
        for row in rows {
            let f = FIGURES.iter().find(|f| row["id"] == f.id);
            let Some(f) = f else { continue };
            md.push_str(&format!(
                "| {} | {} | {} | {} | {} | {}x | {} |\n",
                f.id,
                shown(f, row["baseline"].as_f64()),
                shown(f, row["now"].as_f64()),
                row["change"]
                    .as_f64()
                    .map_or("no data".to_owned(), |c| format!("{c:.2}")),
                row["better"].as_str().unwrap_or("?"),
                row["tolerance"],
                row["verdict"].as_str().unwrap_or("?"),
            ));
        }
    }
    md
}

/// Today's date, UTC (`2026-12-03`).
fn today() -> String {
    let days = patronus_controller::store::now_s().div_euclid(86_400);
    let (y, m, d) = patronus_controller::backup::civil(days);
    format!("{y:04}-{m:02}-{d:02}")
}

fn read_report(path: &std::path::Path) -> anyhow::Result<Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let v: Value = serde_json::from_str(&text)
        .with_context(|| format!("{}: not a JSON report", path.display()))?;
    anyhow::ensure!(
        v["bench"] == "report" && v["results"].is_object(),
        "{}: not the JSON of `patronus bench report` (no \"results\")",
        path.display()
    );
    Ok(v)
}

pub fn run(args: &Args) -> anyhow::Result<Value> {
    for n in &args.only {
        anyhow::ensure!(
            SUITE.iter().any(|e| e.name == n.as_str()),
            "--only {n}: one of {}",
            SUITE.iter().map(|e| e.name).collect::<Vec<_>>().join(", ")
        );
    }
    let mut report = match &args.from {
        Some(path) => read_report(path)?,
        None => {
            let mut results = Map::new();
            for e in SUITE {
                let named = args.only.iter().any(|n| n == e.name);
                // The short form runs every bench but `dr` (the lab tests run it), the soak too.
                let by_default = e.default || (args.short && e.name != "dr");
                if named || (args.only.is_empty() && by_default) {
                    results.insert(e.name.to_owned(), run_one(e, args.short));
                }
            }
            json!({
                "bench": "report",
                "commit": commit(),
                "date": today(),
                "short": args.short,
                "results": results,
                "machine": super::machine(),
            })
        }
    };
    let results = report["results"].as_object().cloned().unwrap_or_default();
    report["figures"] = Value::Array(figures(&results));
    let failed: Vec<&String> = results
        .iter()
        .filter(|(_, r)| r["error"].is_string())
        .map(|(k, _)| k)
        .collect();
    report["failed"] = json!(failed);
    if let Some(path) = &args.baseline {
        let base = read_report(path)?;
        let (rows, regressed) =
            compare(&results, base["results"].as_object().unwrap_or(&Map::new()));
        report["baseline"] = json!(path.display().to_string());
        report["comparison"] = Value::Array(rows);
        report["regressions"] = json!(regressed);
    }
    if let Some(path) = &args.markdown {
        std::fs::write(path, markdown(&report))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(report)
}

pub fn summary(r: &Value) -> String {
    markdown(r)
}

/// Why the report must fail after it is printed: benches that failed, figures that regressed.
pub fn verdict(r: &Value) -> Option<String> {
    if r["bench"] != "report" {
        return None;
    }
    let list = |k: &str| -> Vec<String> {
        r[k].as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect()
    };
    let (failed, regressed) = (list("failed"), list("regressions"));
    let mut why = Vec::new();
    if !failed.is_empty() {
        why.push(format!("benches failed: {}", failed.join(", ")));
    }
    if !regressed.is_empty() {
        why.push(format!(
            "figures worse than the baseline beyond their tolerance: {}",
            regressed.join(", ")
        ));
    }
    (!why.is_empty()).then(|| why.join("; "))
}
