//! An edge's links to the controller, raced: when the link that worked last is dead (it drops
//! everything, as a cut link does), the request goes out on the next one after the stagger, not
//! after the dead one's connection timeout. In a namespace of its own, on the lab's harness:
//! without root the test is counted as ignored, and `PATRONUS_REQUIRE_LAB=1` makes that a
//! failure.
#![allow(clippy::unwrap_used)] // test code: a panic is a failed test with a line number

// The CLI's and the edge's HTTP client, as the binary builds it; only `Via` is used here.
#[allow(dead_code, unused_imports)]
#[path = "../src/api_client.rs"]
mod api_client;

use api_client::Via;
use std::time::Duration;

fn main() -> std::process::ExitCode {
    patronus_lab::harness::run(
        "controller links",
        vec![patronus_lab::lab_test!(
            a_link_that_drops_everything_costs_a_connection_the_stagger_not_its_timeout
        )],
    )
}

/// A namespace, deleted when dropped.
struct Ns(String);

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = patronus_lab::netns::destroy(&self.0);
    }
}

fn a_link_that_drops_everything_costs_a_connection_the_stagger_not_its_timeout() {
    use patronus_lab::netns;
    // Two local addresses; whatever leaves from 10.99.0.1 goes out a TUN device that no
    // process reads, and is never answered, as over a cut link. The controller listens on
    // 10.97.0.1.
    let ns = Ns(format!("cli-via-{}", std::process::id()));
    let _ = netns::destroy(&ns.0);
    netns::ip(&["netns", "add", &ns.0]).unwrap();
    netns::ip_batch(
        &["-n", &ns.0],
        &[
            "link set lo up".into(),
            "addr add 10.97.0.1/32 dev lo".into(),
            "addr add 10.98.0.1/32 dev lo".into(),
            "tuntap add dev dead mode tun".into(),
            "link set dead up".into(),
            "addr add 10.99.0.1/24 dev dead".into(),
            "route add default dev dead table 100".into(),
            "rule add from 10.99.0.1 lookup 100 pref 10".into(),
            "rule add lookup local pref 100".into(),
            "rule del pref 0".into(),
        ],
    )
    .unwrap();
    let dead: std::net::IpAddr = "10.99.0.1".parse().unwrap();
    let live: std::net::IpAddr = "10.98.0.1".parse().unwrap();
    netns::run_in::<_, anyhow::Error>(&ns.0, || {
        let listener = std::net::TcpListener::bind("10.97.0.1:0")?;
        let to = listener.local_addr()?;
        // The link that dies is the one the last request used.
        let via = Via::new(vec![dead, live]);
        let timeout = Duration::from_secs(10);
        let t = std::time::Instant::now();
        let s = via.connect(to, timeout)?;
        let took = t.elapsed();
        assert_eq!(s.local_addr()?.ip(), live);
        // Trying the links in turn waited out the dead one's 10 s; the race starts the
        // next link after 250 ms (the bound leaves room for a busy machine).
        assert!(took < Duration::from_secs(5), "{took:?}");
        // The next request starts with the link that worked.
        assert_eq!(via.connect(to, timeout)?.local_addr()?.ip(), live);
        Ok(())
    })
    .unwrap();
}
