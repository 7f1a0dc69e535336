//! `patronus bench report --baseline`: a figure made worse than its tolerance allows fails the
//! command and is named; one within it does not. Two synthetic reports are compared (`--from`),
//! so that the test is about the comparison, not about this machine's speed.
#![allow(clippy::unwrap_used)]

use std::process::Command;

use serde_json::{Value, json};

/// A report as `bench report` writes it, with a mesh-setup and a throughput result.
fn report(setup_100_s: f64, over_veth: f64) -> Value {
    json!({
        "bench": "report",
        "commit": "synthetic",
        "short": false,
        "results": {
            "mesh-setup": {
                "command": "patronus bench mesh-setup --sites 100",
                "result": { "bench": "mesh-setup", "sizes": [ { "sites": 100, "setup_s": setup_100_s } ] }
            },
            "throughput": {
                "command": "patronus bench throughput",
                "result": { "bench": "throughput", "patronus_over_raw": over_veth, "patronus_over_wireguard_go": 9.0 }
            }
        },
        "machine": { "cpus": 2, "cpu": "synthetic" }
    })
}

/// Runs `bench report --from now --baseline base`: (succeeded, its JSON, its stderr).
fn compare(now: &Value, base: &Value) -> (bool, Value, String) {
    let dir = tempfile::tempdir().unwrap();
    let (n, b) = (dir.path().join("now.json"), dir.path().join("base.json"));
    std::fs::write(&n, now.to_string()).unwrap();
    std::fs::write(&b, base.to_string()).unwrap();
    let md = dir.path().join("report.md");
    let out = Command::new(env!("CARGO_BIN_EXE_patronus"))
        .args(["bench", "report", "--from"])
        .arg(&n)
        .arg("--baseline")
        .arg(&b)
        .arg("--markdown")
        .arg(&md)
        .output()
        .unwrap();
    let json = serde_json::from_slice(&out.stdout).unwrap();
    let text = std::fs::read_to_string(&md).unwrap();
    assert!(text.contains("| Mesh setup, 100 sites"), "{text}");
    (
        out.status.success(),
        json,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn verdict(r: &Value, id: &str) -> String {
    r["comparison"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == id)
        .unwrap()["verdict"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[test]
fn the_same_figures_pass() {
    let (ok, r, err) = compare(&report(1.0, 0.25), &report(1.0, 0.25));
    assert!(ok, "{err}");
    assert_eq!(verdict(&r, "mesh_setup_100_s"), "ok");
    assert_eq!(verdict(&r, "throughput_over_veth"), "ok");
    assert_eq!(r["regressions"], json!([]));
}

#[test]
fn a_time_within_its_tolerance_passes_and_one_beyond_it_fails_by_name() {
    // Mesh setup may take up to twice the baseline (absolute times swing with the machine).
    let (ok, _, err) = compare(&report(1.9, 0.25), &report(1.0, 0.25));
    assert!(ok, "{err}");
    let (ok, r, err) = compare(&report(2.5, 0.25), &report(1.0, 0.25));
    assert!(!ok);
    assert!(err.contains("mesh_setup_100_s"), "{err}");
    assert_eq!(verdict(&r, "mesh_setup_100_s"), "REGRESSION");
    assert_eq!(r["regressions"], json!(["mesh_setup_100_s"]));
}

#[test]
fn a_ratio_that_falls_beyond_its_tolerance_fails() {
    // Higher is better for a throughput ratio; measured in one run, it is held to 1.3x.
    let (ok, r, err) = compare(&report(1.0, 0.15), &report(1.0, 0.25));
    assert!(!ok);
    assert!(err.contains("throughput_over_veth"), "{err}");
    assert_eq!(verdict(&r, "throughput_over_veth"), "REGRESSION");
    // Better than the baseline is never a regression.
    let (ok, _, err) = compare(&report(0.2, 0.5), &report(1.0, 0.25));
    assert!(ok, "{err}");
}

#[test]
fn a_file_that_is_not_a_report_is_refused_with_its_name() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("other.json");
    std::fs::write(&p, r#"{"bench": "push"}"#).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_patronus"))
        .args(["bench", "report", "--from"])
        .arg(&p)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("other.json") && err.contains("not the JSON of"),
        "{err}"
    );
}
