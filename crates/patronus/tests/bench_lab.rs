//! Every benchmark of `patronus bench report`'s suite, in its short form, as CI runs them: so
//! that none can rot unnoticed. Each runs as its own process and must print its JSON; the
//! figures of a short run are not checked against anything (a debug build on a busy machine),
//! only that each bench measured something. `bench dr` is run by `controller_lab`.
//! Runs on the lab's harness: without root it is counted as ignored, and
//! `PATRONUS_REQUIRE_LAB=1` makes that a failure.
#![allow(clippy::unwrap_used)]

use std::process::Command;

use serde_json::Value;

fn main() -> std::process::ExitCode {
    patronus_lab::harness::run(
        "bench",
        vec![
            patronus_lab::lab_test!(every_bench_of_the_report_runs_in_its_short_form).needs(&[
                "iperf3",
                "wireguard-go",
                "wg",
            ]),
        ],
    )
}

fn every_bench_of_the_report_runs_in_its_short_form() {
    let dir = tempfile::tempdir().unwrap();
    let md = dir.path().join("report.md");
    let out = Command::new(env!("CARGO_BIN_EXE_patronus"))
        .args(["bench", "report", "--short", "--markdown"])
        .arg(&md)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "bench report --short failed:\n{stderr}"
    );
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    let results = r["results"].as_object().unwrap();
    for (name, bench) in [
        ("path-select", "path-select"),
        ("mesh", "mesh"),
        ("mesh-setup", "mesh-setup"),
        ("mesh-setup-lab", "mesh-setup"),
        ("push", "push"),
        ("events", "events"),
        ("api-cost", "api-cost"),
        ("api-load", "api-load"),
        ("backup", "backup"),
        ("db-stress", "db-stress"),
        ("wan-emulator", "wan-emulator"),
        ("failover", "failover"),
        ("failover-storm", "failover-storm"),
        ("health-load", "health-load"),
        ("throughput", "throughput"),
        ("soak", "soak"),
    ] {
        let res = &results[name];
        assert!(res["error"].is_null(), "{name}: {}", res["error"]);
        assert_eq!(res["result"]["bench"], bench, "{name} printed its JSON");
    }
    // The lab form of mesh setup: every path of 3 real edges Up at the controller.
    let lab = &results["mesh-setup-lab"]["result"];
    assert_eq!(lab["form"], "real edges in the lab", "{lab}");
    assert!(lab["sizes"][0]["setup_s"].as_f64().is_some(), "{lab}");
    // Health probing: every path end measured, and its RTT near the emulated one.
    let health = &results["health-load"]["result"];
    assert_eq!(health["paths"], 24, "{health}");
    assert_eq!(health["idle"]["path_ends_without_rtt"], 0, "{health}");
    assert_eq!(health["busy"]["streams"]["count"], 6, "{health}");
    // The store under load: the sweep removed exactly what was beyond retention (the bench
    // checks it), every list read answered, every report of the ingest answered.
    let db = &results["db-stress"]["result"]["backends"][0];
    for (page, r) in db["reads"].as_object().unwrap() {
        assert_eq!(r["errors"], 0, "{page}: {r}");
    }
    assert_eq!(db["ingest"]["reports"]["errors"], 0, "{db}");
    assert!(db["ingest"]["kept_share"].as_f64().unwrap() < 1.0, "{db}");
    // Two minutes of churn with a controller restart: no false failover, nothing lost outside
    // the churn, nothing left behind.
    let soak = &results["soak"]["result"];
    assert_eq!(soak["controller_restarts"], 1, "{soak}");
    assert_eq!(soak["failovers_unexplained"], 0, "{soak}");
    assert_eq!(soak["packets_lost_outside_churn"], 0, "{soak}");
    assert_eq!(soak["left_behind"], serde_json::json!([]), "{soak}");
    // The figures a short run has are in the report, each with its command.
    let figures = r["figures"].as_array().unwrap();
    for id in [
        "path_select_p99_ns",
        "failover_cut_p50_ms",
        "throughput_over_veth",
        "api_load_sqlite_site_per_s",
    ] {
        let f = figures.iter().find(|f| f["id"] == id).unwrap();
        assert!(f["value"].as_f64().is_some(), "{id}: no value in {f}");
        assert!(
            f["command"]
                .as_str()
                .unwrap()
                .starts_with("patronus bench ")
        );
    }
    let text = std::fs::read_to_string(&md).unwrap();
    assert!(
        text.contains("| Figure | The seed's plan | Patronus | Command |"),
        "{text}"
    );
    assert!(text.contains("≈ 47 µs"), "{text}");
}
