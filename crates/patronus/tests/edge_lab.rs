//! The edge end to end in the lab: real TUN devices, real WireGuard (boringtun) over emulated
//! WAN links, the real `patronus` binary. Needs root: without it each test says so on stderr and
//! passes, unless `PATRONUS_REQUIRE_LAB=1`.
#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::path::Path;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use patronus_lab::edges::{self, Underlay};
use patronus_lab::stream::{self, StreamConfig};
use patronus_lab::{Lab, LabOptions, Topology, netns};

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> Option<MutexGuard<'static, ()>> {
    if let Some(problem) = netns::privilege_problem() {
        assert!(
            std::env::var_os("PATRONUS_REQUIRE_LAB").is_none(),
            "PATRONUS_REQUIRE_LAB is set but {problem}"
        );
        let _ = writeln!(
            std::io::stderr(),
            "\n*** SKIPPED edge lab test: {problem}. Run as root (CI does) to run it. ***\n"
        );
        return None;
    }
    Some(SERIAL.lock().unwrap_or_else(|e| e.into_inner()))
}

fn patronus() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_patronus"))
}

fn lab_with_edges(t: &Topology, underlay: Underlay) -> Lab {
    let lab = Lab::up(t, LabOptions::default()).unwrap();
    edges::start_edges(&lab, patronus(), underlay, |_| {}).unwrap();
    lab
}

fn forwarded_up(lab: &Lab, link: &str) -> u64 {
    lab.link_status(link).unwrap().up_stats.forwarded
}

#[test]
fn two_sites_reach_each_other_through_the_tunnels_on_the_path_the_engine_chose() {
    let Some(_g) = serial() else { return };
    let lab = lab_with_edges(&Topology::two_sites_two_links(), Underlay::V4);
    let b_host = lab.addr("b/h1", false).unwrap();
    edges::wait_for_tunnel(&lab, "a/h1", b_host, Duration::from_secs(15)).unwrap();

    // TCP between the LAN hosts.
    let tcp = patronus_lab::iperf::tcp(
        &lab.ns("b/h1").unwrap(),
        &lab.ns("a/h1").unwrap(),
        b_host,
        None,
        2,
    )
    .unwrap();
    assert!(tcp.gbps > 0.0, "{tcp:?}");

    // A UDP stream leaves on exactly one of a's links: the one the engine chose for the flow.
    let before = (forwarded_up(&lab, "a/mpls"), forwarded_up(&lab, "a/inet"));
    let r = stream::run(
        &lab.ns("a/h1").unwrap(),
        &lab.ns("b/h1").unwrap(),
        b_host,
        &StreamConfig {
            rate_pps: 1000,
            duration: Duration::from_secs(2),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(r.lost, 0, "{:?}", r.gaps);
    let after = (forwarded_up(&lab, "a/mpls"), forwarded_up(&lab, "a/inet"));
    let (mpls, inet) = (after.0 - before.0, after.1 - before.1);
    let (busy, idle) = if mpls > inet {
        (mpls, inet)
    } else {
        (inet, mpls)
    };
    assert!(
        busy >= r.sent,
        "the stream's {} packets: mpls {mpls}, inet {inet}",
        r.sent
    );
    // The other link carried probes and probe replies only, a small fraction of the stream.
    assert!(idle * 5 < r.sent, "mpls {mpls}, inet {inet}");
    let _ = writeln!(
        std::io::stderr(),
        "tcp {:.2} Gbit/s; stream on one link: mpls {mpls}, inet {inet}",
        tcp.gbps
    );
}
