//! `patronus lab …` as a user runs it: the real binary, a background lab, its control socket.
//! Runs on the lab's harness (`patronus_lab::harness`): without root the test is counted as
//! ignored, and `PATRONUS_REQUIRE_LAB=1` makes that a failure.
#![allow(clippy::unwrap_used)]

use std::process::{Command, Output};

fn patronus(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_patronus"))
        .args(args)
        .output()
        .unwrap()
}

fn ok(args: &[&str]) -> String {
    let out = patronus(args);
    assert!(
        out.status.success(),
        "patronus {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Takes the lab down when the test ends, also when an assertion fails half way.
struct Down(String);

impl Drop for Down {
    fn drop(&mut self) {
        let _ = patronus(&["lab", "down", "--run", &self.0]);
    }
}

fn main() -> std::process::ExitCode {
    patronus_lab::harness::run(
        "lab CLI",
        vec![patronus_lab::lab_test!(
            lab_up_link_exec_status_and_down_work_from_the_command_line
        )],
    )
}

fn lab_up_link_exec_status_and_down_work_from_the_command_line() {
    // A bad topology is refused before anything is built.
    let out = patronus(&["lab", "up", "hub-and-spokes"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("number of spokes"));

    let up = ok(&["lab", "up", "two-sites-two-links", "--plain-routing"]);
    let run = up.split_whitespace().nth(1).unwrap().to_string();
    let guard = Down(run.clone());
    let r = ["--run", run.as_str()];

    let set = ok(&[
        &["lab", "link"][..],
        &r,
        &["a/mpls", "set", "delay=30ms", "dir=up"],
    ]
    .concat());
    assert!(set.contains("up:   delay=30ms"), "{set}");
    // Bad settings name the key and fail.
    let out = patronus(&[&["lab", "link"][..], &r, &["a/mpls", "set", "delay=30"]].concat());
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("delay: \"30\" needs a unit"));

    // a/h1 -> b/h1 crosses a/mpls up: the RTT shows the 30 ms.
    let ping = ok(&[
        &["lab", "exec"][..],
        &r,
        &["a/h1", "--", "ping", "-c", "2", "-q", "10.128.1.10"],
    ]
    .concat());
    let avg: f64 = ping
        .lines()
        .find(|l| l.starts_with("rtt"))
        .and_then(|l| l.split('=').nth(1))
        .and_then(|v| v.trim().split('/').nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap();
    eprintln!("lab CLI: rtt avg {avg} ms across a 30 ms delay");
    assert!((30.0..40.0).contains(&avg), "rtt avg {avg} ms");

    let status: serde_json::Value =
        serde_json::from_str(&ok(&[&["lab", "status", "--json"][..], &r].concat())).unwrap();
    let links = &status[0]["emulator"]["links"];
    assert_eq!(links[0]["name"], "a/mpls");
    assert!(links[0]["up_stats"]["forwarded"].as_u64().unwrap() >= 2);

    // Resolve IPv6 neighbours first: the kernel may spend a fresh path's first packet on that.
    ok(&[
        &["lab", "exec"][..],
        &r,
        &["b/h1", "--", "ping", "-c", "1", "-W", "2", "fd00:1::a"],
    ]
    .concat());
    let stream: serde_json::Value = serde_json::from_str(&ok(&[
        &["lab", "stream"][..],
        &r,
        &[
            "--from",
            "b/h1",
            "--to",
            "a/h1",
            "--rate",
            "200",
            "--duration",
            "1",
            "--v6",
        ],
    ]
    .concat()))
    .unwrap();
    assert_eq!(stream["sent"], 200);
    assert_eq!(stream["lost"], 0);

    std::mem::forget(guard);
    ok(&[&["lab", "down"][..], &r].concat());
    let left: Vec<_> = patronus_lab::netns::list()
        .into_iter()
        .filter(|n| n.contains(&run))
        .collect();
    assert!(left.is_empty(), "{left:?}");
    assert!(!patronus_lab::lab::run_dir(&run).exists());
}
