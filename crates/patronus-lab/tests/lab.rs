//! The lab on real namespaces, veth pairs, TUN devices and packets. Needs root: without it every
//! test here says so on stderr and passes, unless `PATRONUS_REQUIRE_LAB=1` (set by CI) makes the
//! missing privilege a failure.
#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::net::IpAddr;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use patronus_lab::stream::{self, StreamConfig};
use patronus_lab::{Dir, Impairment, Lab, LabOptions, Topology, lab, netns};

/// Lab tests measure timing on a 2-core machine: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> Option<MutexGuard<'static, ()>> {
    if let Some(problem) = netns::privilege_problem() {
        assert!(
            std::env::var_os("PATRONUS_REQUIRE_LAB").is_none(),
            "PATRONUS_REQUIRE_LAB is set but {problem}"
        );
        // Straight to fd 2: the test harness captures `eprintln!`, and a skip must be seen.
        let _ = writeln!(
            std::io::stderr(),
            "\n*** SKIPPED lab test: {problem}. Run as root (CI does) to run it. ***\n"
        );
        return None;
    }
    Some(SERIAL.lock().unwrap_or_else(|e| e.into_inner()))
}

fn plain_lab(t: &Topology) -> Lab {
    Lab::up(
        t,
        LabOptions {
            plain_routing: true,
            seed: Some(7),
            ..Default::default()
        },
    )
    .unwrap()
}

fn ping(lab: &Lab, from: &str, to: IpAddr) -> bool {
    let out = lab
        .exec(from, &["ping", "-c", "1", "-W", "2", &to.to_string()])
        .unwrap();
    out.status.success()
}

fn root_links() -> Vec<String> {
    let out = std::process::Command::new("ip")
        .args(["-o", "link", "show"])
        .output()
        .unwrap();
    let mut names: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            l.split(": ")
                .nth(1)
                .map(|n| n.split('@').next().unwrap_or(n).to_string())
        })
        .collect();
    names.sort();
    names
}

fn stream(lab: &Lab, from: &str, to: &str, dst: IpAddr, cfg: StreamConfig) -> stream::StreamReport {
    stream::run(&lab.ns(from).unwrap(), &lab.ns(to).unwrap(), dst, &cfg).unwrap()
}

#[test]
fn a_lab_connects_its_sites_over_v4_and_v6_and_leaves_nothing_behind() {
    let Some(_g) = serial() else { return };
    let links_before = root_links();
    let lab = plain_lab(&Topology::two_sites_two_links());
    let run = lab.run_id().to_string();

    // Every path between the edges (each local link to each remote link), both families.
    for l in ["a/mpls", "a/inet"] {
        for r in ["b/mpls", "b/inet"] {
            let (_, lp) = lab.plan().link(l).unwrap();
            let (_, rp) = lab.plan().link(r).unwrap();
            for (src, dst) in [
                (IpAddr::V4(lp.addr4), IpAddr::V4(rp.addr4)),
                (IpAddr::V6(lp.addr6), IpAddr::V6(rp.addr6)),
            ] {
                let out = lab
                    .exec(
                        "a",
                        &[
                            "ping",
                            "-c",
                            "1",
                            "-W",
                            "2",
                            "-I",
                            &src.to_string(),
                            &dst.to_string(),
                        ],
                    )
                    .unwrap();
                assert!(out.status.success(), "{l} -> {r} ({src} -> {dst}): {out:?}");
            }
        }
    }
    // LAN to LAN (plain routing), both families.
    assert!(ping(&lab, "a/h1", lab.addr("b/h1", false).unwrap()));
    assert!(ping(&lab, "a/h1", lab.addr("b/h1", true).unwrap()));

    // A process started in the lab, and one started behind its back, both die with it.
    let pid = lab
        .spawn("b/h1", {
            let mut c = std::process::Command::new("sleep");
            c.arg("600");
            c
        })
        .unwrap();
    let stray = std::process::Command::new("ip")
        .args(["netns", "exec", &lab.ns("a").unwrap(), "sleep", "600"])
        .spawn()
        .unwrap();
    let ns = lab.namespaces();
    assert!(ns.iter().all(|n| netns::list().contains(n)));
    lab.down().unwrap();

    let mut stray = stray;
    let _ = stray.wait();
    assert!(!netns::alive(pid as i32), "spawned process survived");
    let left: Vec<_> = netns::list()
        .into_iter()
        .filter(|n| n.contains(&run))
        .collect();
    assert!(left.is_empty(), "namespaces left behind: {left:?}");
    assert!(!lab::run_dir(&run).exists(), "state directory left behind");
    assert_eq!(
        root_links(),
        links_before,
        "interfaces appeared in the root namespace"
    );
}

#[test]
fn a_dropped_lab_is_removed_even_when_the_test_panics() {
    let Some(_g) = serial() else { return };
    let mut run = String::new();
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let lab = plain_lab(&Topology::two_sites_two_links());
        run = lab.run_id().to_string();
        panic!("test failure while the lab is up");
    }));
    assert!(r.is_err());
    assert!(!run.is_empty());
    assert!(netns::list().iter().all(|n| !n.contains(&run)));
}

#[test]
fn clean_removes_the_namespaces_of_a_lab_whose_owner_died() {
    let Some(_g) = serial() else { return };
    // A crashed owner: namespaces and a state file naming a PID that no longer exists.
    let mut dead = std::process::Command::new("true").spawn().unwrap();
    let dead_pid = dead.id() as i32;
    dead.wait().unwrap();
    let lab = plain_lab(&Topology::two_sites_two_links());
    let run = lab.run_id().to_string();
    let state_path = lab::run_dir(&run).join("state.json");
    let mut state = lab.state().clone();
    state.owner_pid = dead_pid;
    std::fs::write(&state_path, serde_json::to_string(&state).unwrap()).unwrap();
    // An unrelated namespace must survive.
    netns::ip(&["netns", "add", "patronus-test-bystander"]).ok();
    let bystander = "unrelated-lab-test-ns";
    netns::ip(&["netns", "add", bystander]).unwrap();

    let cleaned = lab::clean(false).unwrap();
    assert!(cleaned.runs.contains(&run), "{cleaned:?}");
    assert!(netns::list().iter().all(|n| !n.contains(&run)));
    assert!(netns::list().iter().any(|n| n == bystander));
    netns::ip(&["netns", "delete", bystander]).unwrap();
    netns::ip(&["netns", "delete", "patronus-test-bystander"]).ok();
    drop(lab); // its namespaces are already gone; teardown must not fail loudly on that
}

#[test]
fn delay_jitter_and_loss_measured_on_real_packets_match_the_settings() {
    let Some(_g) = serial() else { return };
    let lab = plain_lab(&Topology::two_sites_two_links());
    let mut imp = Impairment::default();
    imp.apply(&["delay=50ms", "jitter=5ms", "loss=10%"])
        .unwrap();
    lab.set_link("a/mpls", Dir::Up, imp).unwrap();
    // 100 packets/s: 10 ms apart, twice the jitter, so the FIFO barely shapes the delay.
    let r = stream(
        &lab,
        "a",
        "b",
        lab.addr("b", false).unwrap(),
        StreamConfig {
            rate_pps: 100,
            duration: Duration::from_secs(30),
            size: 100,
            linger: Duration::from_millis(500),
            ..Default::default()
        },
    );
    let _ = writeln!(
        std::io::stderr(),
        "accuracy: delay {:?}, loss {}%",
        r.delay,
        r.loss_pct
    );
    assert!(
        (r.delay.mean_ms - 50.0).abs() <= 1.5,
        "mean delay {}",
        r.delay.mean_ms
    );
    assert!(
        (r.delay.stddev_ms - 5.0).abs() <= 0.75,
        "delay stddev {}",
        r.delay.stddev_ms
    );
    assert!((r.loss_pct - 10.0).abs() <= 2.0, "loss {}%", r.loss_pct);
    assert_eq!(
        r.reordered, 0,
        "jitter reordered packets without being asked to"
    );
    assert_eq!(r.duplicates, 0);
}
