//! `patronus lab demo`, the README's first command, for one round of its schedule: it must
//! come up from nothing, enrol three edges through the API, carry its streams, show the cut as a
//! path-down failover and the degraded link as an SLA failover (as the controller's webhook
//! delivers them), and leave nothing behind. Runs on the lab's harness
//! (`patronus_lab::harness`): without root the test is counted as ignored, and
//! `PATRONUS_REQUIRE_LAB=1` makes that a failure.
#![allow(clippy::unwrap_used)]

use std::process::Command;

use patronus_lab::netns;

fn main() -> std::process::ExitCode {
    patronus_lab::harness::run(
        "demo lab",
        vec![patronus_lab::lab_test!(
            the_demo_runs_a_round_of_cuts_and_degradations_and_cleans_up
        )],
    )
}

fn the_demo_runs_a_round_of_cuts_and_degradations_and_cleans_up() {
    let out = Command::new(env!("CARGO_BIN_EXE_patronus"))
        .args(["lab", "demo", "--cycles", "1", "--listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let summary: serde_json::Value = serde_json::from_str(
        stdout
            .lines()
            .find_map(|l| l.strip_prefix("demo: summary "))
            .unwrap_or_else(|| panic!("no summary: {stdout}\n{stderr}")),
    )
    .unwrap();
    let failovers = summary["failovers"].as_array().unwrap();
    assert!(
        failovers
            .iter()
            .any(|f| f["site"] == "hq" && f["reason"] == "path-down"),
        "the cut of hq/mpls: {stdout}"
    );
    assert!(
        failovers.iter().any(|f| f["reason"] == "sla-violated"),
        "the degraded branch1/mpls: {stdout}"
    );
    eprintln!(
        "demo streams: {}; failovers: {}",
        summary["streams"],
        failovers.len()
    );
    for s in summary["streams"].as_array().unwrap() {
        let (sent, lost) = (s["sent"].as_u64().unwrap(), s["lost"].as_u64().unwrap());
        assert!(sent > 0 && lost * 100 < sent * 2, "{s}");
    }
    assert!(stdout.contains("admin@example.net, password "), "{stdout}");
    let run_id = summary["run_id"].as_str().unwrap();
    assert!(
        !netns::list().iter().any(|n| n.contains(run_id)),
        "namespaces left: {:?}",
        netns::list()
    );
}
