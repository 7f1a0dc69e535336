//! The edge end to end in the lab: real TUN devices, real WireGuard (boringtun) over emulated
//! WAN links, the real `patronus` binary. Runs on the lab's harness (`patronus_lab::harness`):
//! without root each test is counted as ignored, and `PATRONUS_REQUIRE_LAB=1` makes that a
//! failure.
#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use patronus_lab::edges::{self, Underlay};
use patronus_lab::stream::{self, StreamConfig};
use patronus_lab::{Lab, LabOptions, Topology, flood, lab_test, netns};

/// The flood at `rate` per second for `secs` from the calling thread's namespace; how many went.
fn flood(pkts: &[Vec<u8>], dst: std::net::SocketAddrV4, rate: u64, secs: u64) -> u64 {
    let never = std::sync::atomic::AtomicBool::new(false);
    flood::send(pkts, dst, rate, Duration::from_secs(secs), &never).unwrap()
}

fn main() -> std::process::ExitCode {
    patronus_lab::harness::run(
        "edge lab",
        vec![
            lab_test!(two_sites_reach_each_other_through_the_tunnels_on_the_path_the_engine_chose, needs "iperf3"),
            lab_test!(cutting_the_active_link_moves_the_stream_within_the_failover_budget),
            lab_test!(in_duplicate_mode_a_cut_loses_nothing_and_delivers_no_copy),
            lab_test!(an_ipv6_underlay_carries_both_families_between_lan_hosts, needs "iperf3"),
            lab_test!(a_packet_too_big_for_the_tunnel_gets_an_icmp_error_not_a_silent_drop),
            lab_test!(garbage_replays_and_malformed_probes_change_nothing_and_crash_nothing),
            lab_test!(a_brownout_moves_realtime_within_a_second_leaves_bulk_and_failback_waits_for_the_hold_down),
            lab_test!(a_stock_wireguard_go_peer_exchanges_traffic_with_a_patronus_edge, needs "iperf3", "wireguard-go", "wg"),
            lab_test!(a_handshake_flood_from_a_peers_own_endpoint_costs_the_traffic_nothing_and_gets_bounded_replies),
            lab_test!(a_peer_that_restarts_during_a_handshake_flood_gets_every_path_back),
        ],
    )
}

fn patronus() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_patronus"))
}

fn lab_with_edges(t: &Topology, underlay: Underlay) -> Lab {
    let lab = Lab::up(t, LabOptions::default()).unwrap();
    edges::start_edges(&lab, patronus(), underlay, |_| {}).unwrap();
    lab
}

/// A constant-rate UDP stream from a/h1 to `dst` (an address of b/h1).
fn a_to_b(lab: &Lab, dst: std::net::IpAddr, rate_pps: u32, secs: u64) -> stream::StreamReport {
    stream::run(
        &lab.ns("a/h1").unwrap(),
        &lab.ns("b/h1").unwrap(),
        dst,
        &StreamConfig {
            rate_pps,
            duration: Duration::from_secs(secs),
            ..Default::default()
        },
    )
    .unwrap()
}

/// One 2-second iperf3 TCP stream from a/h1 to `dst` (an address of b/h1) through the tunnel,
/// and one over the same emulated MPLS links between the edges without it, in the same run.
/// The tunnel must carry at least 0.15 of what the links carry bare. The ratio, not an absolute
/// rate, because both sides swing together with the build profile and the machine's load: in a
/// debug build (emulator and edges alike; the emulator is the bottleneck of both) the three tests
/// that call this measured 0.44-0.65 on a quiet machine and 0.31-0.68 with one of the two cores
/// held busy (two runs), so 0.15 is about half the lowest.
fn tcp_a_to_b(lab: &Lab, dst: std::net::IpAddr) -> patronus_lab::iperf::Throughput {
    let tunnel = patronus_lab::iperf::tcp(
        &lab.ns("b/h1").unwrap(),
        &lab.ns("a/h1").unwrap(),
        dst,
        None,
        2,
    )
    .unwrap();
    let (_, bp) = lab.plan().link("b/mpls").unwrap();
    let (_, ap) = lab.plan().link("a/mpls").unwrap();
    let bare = patronus_lab::iperf::tcp(
        &lab.ns("b").unwrap(),
        &lab.ns("a").unwrap(),
        bp.addr4.into(),
        Some(ap.addr4.into()),
        2,
    )
    .unwrap();
    let ratio = tunnel.gbps / bare.gbps;
    let _ = writeln!(
        std::io::stderr(),
        "tcp through the tunnel {:.3} Gbit/s ({} bytes), over the bare links {:.3} Gbit/s: {ratio:.2}",
        tunnel.gbps,
        tunnel.bytes,
        bare.gbps,
    );
    assert!(
        ratio >= 0.15,
        "the tunnel carried {ratio:.3} of the links' {bare:?}: {tunnel:?}"
    );
    tunnel
}

/// Now, in Unix milliseconds: the clock the edges stamp their events with.
fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn forwarded_up(lab: &Lab, link: &str) -> u64 {
    lab.link_status(link).unwrap().up_stats.forwarded
}

fn two_sites_reach_each_other_through_the_tunnels_on_the_path_the_engine_chose() {
    let lab = lab_with_edges(&Topology::two_sites_two_links(), Underlay::V4);
    let b_host = lab.addr("b/h1", false).unwrap();
    edges::wait_for_tunnel(&lab, "a/h1", b_host, Duration::from_secs(15)).unwrap();

    // A UDP stream leaves on exactly one of a's links: the one the engine chose for the flow.
    let before = (forwarded_up(&lab, "a/mpls"), forwarded_up(&lab, "a/inet"));
    let r = a_to_b(&lab, b_host, 1000, 2);
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

    // The edge's own account agrees with the link: the local link of the path that sent the
    // most is the one the emulator saw busy, and no path is down.
    let status = edge_status(&lab, "a");
    let paths = status["paths"].as_array().unwrap();
    assert_eq!(paths.len(), 4, "2 local x 2 remote links");
    assert!(paths.iter().all(|p| p["state"] != "down"), "{paths:?}");
    let busiest = paths
        .iter()
        .max_by_key(|p| p["tx_packets"].as_u64().unwrap())
        .unwrap();
    let busy_link = if mpls > inet { "mpls" } else { "inet" };
    assert_eq!(busiest["local_link"], busy_link, "{paths:?}");
    let table = lab
        .exec("a", &[patronus().to_str().unwrap(), "edge", "status"])
        .unwrap();
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(table.contains("b:mpls->inet"), "{table}");
    let metrics = netns::run_in::<_, netns::NetnsError>(&lab.ns("a").unwrap(), || {
        use std::io::{Read, Write as _};
        let mut c = std::net::TcpStream::connect(("127.0.0.1", edges::STATUS_PORT))?;
        c.write_all(b"GET /metrics HTTP/1.0\r\n\r\n")?;
        let mut body = String::new();
        c.read_to_string(&mut body)?;
        Ok(body)
    })
    .unwrap();
    assert!(
        metrics.contains("patronus_path_rtt_seconds{peer=\"b\""),
        "{metrics}"
    );

    // TCP between the LAN hosts, last: it loads this 2-core machine enough to lose probes, and
    // the engine rightly reacts to that.
    let tcp = tcp_a_to_b(&lab, b_host);
    assert_coalesced(&lab, "b");
    let _ = writeln!(
        std::io::stderr(),
        "stream on one link: mpls {mpls}, inet {inet}; then tcp {:.2} Gbit/s",
        tcp.gbps
    );
}

fn cutting_the_active_link_moves_the_stream_within_the_failover_budget() {
    let lab = lab_with_edges(&Topology::two_sites_two_links(), Underlay::V4);
    let b_host = lab.addr("b/h1", false).unwrap();
    edges::wait_for_tunnel(&lab, "a/h1", b_host, Duration::from_secs(15)).unwrap();
    let run = edges::failover_trials(&lab, "a/h1", "b/h1", "a", 5, 1000).unwrap();
    let _ = writeln!(
        std::io::stderr(),
        "failover outages {:?} ms (cut {:?}), unexplained {} ms",
        run.outages_ms,
        run.cut,
        run.unexplained_ms
    );
    assert_eq!(run.unexplained_ms, 0.0, "{:?}", run.stream.gaps);
    // The default detection time is 3 missed probes at 20 ms plus 4 RTTVAR: 100 ms leaves room
    // for the flow's next packet and scheduling; 200 ms is the p99 budget.
    for (i, o) in run.outages_ms.iter().enumerate() {
        assert!(*o <= 200.0, "cut {i} ({}): {o} ms", run.cut[i]);
    }
    let mut sorted = run.outages_ms.clone();
    sorted.sort_by(f64::total_cmp);
    assert!(
        sorted[sorted.len() / 2] <= 100.0,
        "median {} ms",
        sorted[sorted.len() / 2]
    );
    // The flow alternated: each cut found it on the link it had failed over to.
    assert!(run.cut.windows(2).all(|w| w[0] != w[1]), "{:?}", run.cut);
}

fn in_duplicate_mode_a_cut_loses_nothing_and_delivers_no_copy() {
    let lab = Lab::up(&Topology::two_sites_two_links(), LabOptions::default()).unwrap();
    edges::start_edges(&lab, patronus(), Underlay::V4, |c| {
        c.default_steering = patronus_api::SteeringMode::Duplicate;
    })
    .unwrap();
    let b_host = lab.addr("b/h1", false).unwrap();
    edges::wait_for_tunnel(&lab, "a/h1", b_host, Duration::from_secs(15)).unwrap();
    let run = edges::failover_trials(&lab, "a/h1", "b/h1", "a", 3, 1000).unwrap();
    assert_eq!(
        run.stream.lost, 0,
        "{:?} {:?}",
        run.outages_ms, run.stream.gaps
    );
    // Every packet crossed both links; the receiving edge's replay check dropped the copies.
    assert_eq!(run.stream.duplicates, 0);
}

fn an_ipv6_underlay_carries_both_families_between_lan_hosts() {
    let lab = lab_with_edges(&Topology::two_sites_two_links(), Underlay::V6);
    let b4 = lab.addr("b/h1", false).unwrap();
    let b6 = lab.addr("b/h1", true).unwrap();
    edges::wait_for_tunnel(&lab, "a/h1", b4, Duration::from_secs(15)).unwrap();
    edges::wait_for_tunnel(&lab, "a/h1", b6, Duration::from_secs(15)).unwrap();
    let r = a_to_b(&lab, b6, 500, 1);
    assert_eq!(
        r.lost,
        0,
        "gaps {:?}; a: {}",
        r.gaps,
        edge_status(&lab, "a")["events"]
    );
    // The edges' sockets are bound to their links' IPv6 addresses only, so whatever crossed the
    // links (the emulator counted it) crossed over IPv6.
    let up = |l: &str| lab.link_status(l).unwrap().up_stats.forwarded;
    assert!(up("a/mpls") + up("a/inet") >= r.sent);
    // TCP over IPv6 in the overlay: b's edge writes it to its TUN as TCPv6 GSO packets.
    tcp_a_to_b(&lab, b6);
    assert_coalesced(&lab, "b");
}

fn a_packet_too_big_for_the_tunnel_gets_an_icmp_error_not_a_silent_drop() {
    let lab = lab_with_edges(&Topology::two_sites_two_links(), Underlay::V4);
    let b_host = lab.addr("b/h1", false).unwrap();
    edges::wait_for_tunnel(&lab, "a/h1", b_host, Duration::from_secs(15)).unwrap();
    // 1500-byte links, IPv4 underlay: the tunnel MTU is 1440. A 1472-byte ping payload makes a
    // 1500-byte packet with DF set.
    let ping_df = |payload: u32| {
        let out = lab
            .exec(
                "a/h1",
                &[
                    "ping",
                    "-c",
                    "1",
                    "-W",
                    "2",
                    "-M",
                    "do",
                    "-s",
                    &payload.to_string(),
                    &b_host.to_string(),
                ],
            )
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        (out.status.success(), text)
    };
    let (_, text) = ping_df(1472);
    assert!(
        text.contains("mtu = 1440") || text.contains("mtu=1440"),
        "{text}"
    );
    // And a packet that fits goes through.
    let (ok, text) = ping_df(1412);
    assert!(ok, "{text}");
}

/// The site's edge joined TCP segments into larger TUN writes (see `patronus_edge::coalesce`),
/// and the kernel took them: the TCP stream before this completed.
fn assert_coalesced(lab: &Lab, site: &str) {
    let s = edge_status(lab, site);
    let c = &s["counters"];
    let (packets, writes) = (
        c["delivered_packets"].as_u64().unwrap(),
        c["tun_writes"].as_u64().unwrap(),
    );
    assert!(packets > 2 * writes, "{c}");
    assert_eq!(c["tun_write_errors"], 0, "{c}");
}

fn edge_status(lab: &Lab, site: &str) -> serde_json::Value {
    let out = lab
        .exec(
            site,
            &[patronus().to_str().unwrap(), "edge", "status", "--json"],
        )
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The UDP payload of an IPv4 packet to `port`, if it is one.
fn udp_payload(pkt: &[u8], port: u16) -> Option<&[u8]> {
    let ihl = usize::from(pkt.first()? & 0x0f) * 4;
    if pkt[0] >> 4 != 4 || *pkt.get(9)? != 17 {
        return None;
    }
    let udp = pkt.get(ihl..)?;
    (u16::from_be_bytes([udp[2], udp[3]]) == port).then(|| &udp[8..])
}

fn garbage_replays_and_malformed_probes_change_nothing_and_crash_nothing() {
    let lab = lab_with_edges(&Topology::two_sites_two_links(), Underlay::V4);
    let b_host = lab.addr("b/h1", false).unwrap();
    edges::wait_for_tunnel(&lab, "a/h1", b_host, Duration::from_secs(15)).unwrap();
    let stream_cfg = StreamConfig {
        rate_pps: 500,
        duration: Duration::from_secs(1),
        ..Default::default()
    };
    let (a_h1, b_h1) = (lab.ns("a/h1").unwrap(), lab.ns("b/h1").unwrap());

    // Record real tunnel traffic on both of a's links while a stream runs.
    lab.capture("a/mpls", 300).unwrap();
    lab.capture("a/inet", 300).unwrap();
    let r = stream::run(&a_h1, &b_h1, b_host, &stream_cfg).unwrap();
    assert_eq!(
        r.lost,
        0,
        "gaps {:?}; a: {}",
        r.gaps,
        edge_status(&lab, "a")["events"]
    );
    let mut captured = lab.take_capture("a/mpls").unwrap();
    captured.extend(lab.take_capture("a/inet").unwrap());
    let replays: Vec<Vec<u8>> = captured
        .iter()
        .filter_map(|p| udp_payload(p, edges::EDGE_PORT).map(<[u8]>::to_vec))
        .collect();
    assert!(replays.len() > 100, "captured {} datagrams", replays.len());
    let before = edge_status(&lab, "b");
    let endpoints: Vec<_> = before["paths"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["endpoint"].clone())
        .collect();

    // From a's namespace but another port, and from a/h1's LAN address (off-path attackers):
    // every captured datagram again, garbage, and WireGuard-shaped garbage.
    let b_links: Vec<std::net::SocketAddr> = ["b/mpls", "b/inet"]
        .iter()
        .map(|l| {
            let (_, p) = lab.plan().link(l).unwrap();
            std::net::SocketAddr::new(p.addr4.into(), edges::EDGE_PORT)
        })
        .collect();
    let mut sent = 0u64;
    netns::run_in::<_, netns::NetnsError>(&lab.ns("a").unwrap(), || {
        let s = std::net::UdpSocket::bind("0.0.0.0:40000")?;
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut rnd = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for to in &b_links {
            for d in &replays {
                s.send_to(d, to)?;
                sent += 1;
            }
            for i in 0..2000usize {
                let len = (rnd() % 1500) as usize;
                let mut d: Vec<u8> = (0..len).map(|_| rnd() as u8).collect();
                if let Some(first) = d.first_mut() {
                    // Half of it claims to be a WireGuard message of some type.
                    if i % 2 == 0 {
                        *first = 1 + (i / 2 % 4) as u8;
                        for b in d.iter_mut().skip(1).take(3) {
                            *b = 0;
                        }
                    }
                }
                s.send_to(&d, to)?;
                sent += 1;
            }
            // Exact-size handshake initiations full of noise.
            for _ in 0..50 {
                let mut d = vec![1u8, 0, 0, 0];
                d.extend((0..144).map(|_| rnd() as u8));
                s.send_to(&d, to)?;
                sent += 1;
            }
        }
        Ok(())
    })
    .unwrap();
    // Let the flood drain before what follows is measured: b's refusal counters stop moving.
    let refusals = || {
        let c = &edge_status(&lab, "b")["counters"];
        c["rx_unknown"].as_u64().unwrap() + c["rx_rejected"].as_u64().unwrap()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut last = refusals();
    loop {
        std::thread::sleep(Duration::from_millis(300));
        let now = refusals();
        if now == last || std::time::Instant::now() > deadline {
            break;
        }
        last = now;
    }
    // Malformed probes from inside the tunnel: a LAN host of a sends junk to b's reflector port,
    // and junk "replies" to b's probe sender port.
    netns::run_in::<_, netns::NetnsError>(&a_h1, || {
        let b_overlay = std::net::SocketAddr::from((edges::overlay4(1), 862));
        let s = std::net::UdpSocket::bind("0.0.0.0:862")?;
        for len in [0usize, 1, 20, 59, 60, 61, 200] {
            s.send_to(&vec![0xa5; len], b_overlay)?;
            s.send_to(&vec![0x5a; len], (edges::overlay4(1), 863))?;
        }
        Ok(())
    })
    .unwrap();

    // Nothing changed: the same endpoints, every path alive, traffic flows, and the edge counted
    // what it refused.
    let r = stream::run(&a_h1, &b_h1, b_host, &stream_cfg).unwrap();
    assert_eq!(r.lost, 0, "{:?}", r.gaps);
    let after = edge_status(&lab, "b");
    let paths = after["paths"].as_array().unwrap();
    let endpoints_after: Vec<_> = paths.iter().map(|p| p["endpoint"].clone()).collect();
    assert_eq!(endpoints, endpoints_after, "an attacker moved an endpoint");
    assert!(paths.iter().all(|p| p["state"] != "down"), "{paths:?}");
    let c = &after["counters"];
    let refused = c["rx_unknown"].as_u64().unwrap() + c["rx_rejected"].as_u64().unwrap();
    let _ = writeln!(
        std::io::stderr(),
        "sent {sent} bad datagrams; b counted {c}"
    );
    assert!(refused >= replays.len() as u64, "{c}");
    let delivered = |s: &serde_json::Value| s["counters"]["delivered_packets"].as_u64().unwrap();
    assert_eq!(
        delivered(&after) - delivered(&before),
        r.received,
        "only the stream got through"
    );
    let rejected = |s: &serde_json::Value, k: &str| s[k].as_u64().unwrap();
    for k in ["probe_requests_rejected", "probe_replies_rejected"] {
        assert!(
            rejected(&after, k) >= rejected(&before, k) + 7,
            "{k}: before {} after {}; b: {after}",
            rejected(&before, k),
            rejected(&after, k)
        );
    }
}

/// Packets per second that entered the WAN from each of `links` during about `window`: over
/// the time that really passed between the two readings of the counters, however much longer
/// than `window` a busy machine made it.
fn rates(lab: &Lab, links: &[&str], window: Duration) -> Vec<u64> {
    let t0 = std::time::Instant::now();
    let before: Vec<u64> = links.iter().map(|l| forwarded_up(lab, l)).collect();
    std::thread::sleep(window);
    let after: Vec<u64> = links.iter().map(|l| forwarded_up(lab, l)).collect();
    let secs = t0.elapsed().as_secs_f64();
    after
        .iter()
        .zip(before)
        .map(|(a, b)| ((a - b) as f64 / secs).round() as u64)
        .collect()
}

fn a_brownout_moves_realtime_within_a_second_leaves_bulk_and_failback_waits_for_the_hold_down() {
    // MPLS is clean, broadband has 10 ms each way: MPLS is the better path for everything.
    let mut t = Topology::two_sites_two_links();
    for s in &mut t.sites {
        s.links[1].impair = Some("delay=10ms".into());
    }
    let lab = Lab::up(&t, LabOptions::default()).unwrap();
    let policies: toml::Table = toml::from_str(
        r#"
        [[p]]
        name = "voice"
        order = 10
        class = "realtime"
        match = { protocol = "udp", dst_ports = ["40000"] }
        [[p]]
        name = "backup"
        order = 20
        class = "bulk"
        match = { protocol = "udp", dst_ports = ["40001"] }
        "#,
    )
    .unwrap();
    let policies: Vec<patronus_api::Policy> = policies["p"].clone().try_into().unwrap();
    edges::start_edges(&lab, patronus(), Underlay::V4, |c| {
        c.policies = policies.clone()
    })
    .unwrap();
    let b_host = lab.addr("b/h1", false).unwrap();
    edges::wait_for_tunnel(&lab, "a/h1", b_host, Duration::from_secs(15)).unwrap();
    // The estimators see the 10 ms difference before the streams start: a's MPLS path is up
    // and measured at least 10 ms faster than every path over broadband. (A fixed second was
    // not always enough on a busy machine: voice started on broadband, where it may stay.)
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = edge_status(&lab, "a");
        let paths = status["paths"].as_array().cloned().unwrap_or_default();
        let rtt = |p: &serde_json::Value| p["rtt_ms"].as_f64();
        let mpls = paths
            .iter()
            .find(|p| p["local_link"] == "mpls" && p["remote_link"] == "mpls");
        let ready = mpls.is_some_and(|m| {
            m["state"] == "up"
                && m["probes_received"].as_u64().unwrap_or(0) >= 10
                && paths
                    .iter()
                    .filter(|p| p["local_link"] == "inet" || p["remote_link"] == "inet")
                    .all(|p| match (rtt(m), rtt(p)) {
                        (Some(m), Some(p)) => p >= m + 10.0,
                        _ => false,
                    })
        });
        if ready {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "estimators not settled: {status}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    let (a_h1, b_h1) = (lab.ns("a/h1").unwrap(), lab.ns("b/h1").unwrap());
    let stream = |port: u16, pps: u32| StreamConfig {
        rate_pps: pps,
        duration: Duration::from_secs(12),
        port,
        linger: Duration::from_millis(500),
        ..Default::default()
    };
    let (voice_cfg, bulk_cfg) = (stream(40000, 200), stream(40001, 500));
    let links = ["a/mpls", "a/inet"];
    let (voice, bulk, checks, breach_ms) = std::thread::scope(|s| {
        let v = s.spawn(|| stream::run(&a_h1, &b_h1, b_host, &voice_cfg).unwrap());
        let b = s.spawn(|| stream::run(&a_h1, &b_h1, b_host, &bulk_cfg).unwrap());
        std::thread::sleep(Duration::from_millis(700));
        let start = rates(&lab, &links, Duration::from_millis(500));
        // Brownout on MPLS: one-way delay ramps to 80 ms each way (RTT 160 ms, over realtime's
        // 150 ms) in 10 ms steps. A step of tens of ms at once would look like an outage (no
        // reply within the detection time) and move everything, which is a different scenario.
        let mut breach_ms = 0;
        for d in (10..=80).step_by(10) {
            lab.link_command("a/mpls", &["set", &format!("delay={d}ms")])
                .unwrap();
            if d == 80 {
                breach_ms = unix_ms();
            }
            std::thread::sleep(Duration::from_millis(60));
        }
        std::thread::sleep(Duration::from_secs(1));
        let brownout = rates(&lab, &links, Duration::from_secs(1));
        // Failback: MPLS is clean again; voice must wait out the hold-down (5 s) on broadband.
        lab.link_command("a/mpls", &["clear"]).unwrap();
        std::thread::sleep(Duration::from_secs(2));
        let held = rates(&lab, &links, Duration::from_secs(1));
        std::thread::sleep(Duration::from_millis(3500));
        let back = rates(&lab, &links, Duration::from_secs(1));
        (
            v.join().unwrap(),
            b.join().unwrap(),
            [start, brownout, held, back],
            breach_ms,
        )
    });
    let _ = writeln!(
        std::io::stderr(),
        "packets/s [mpls, inet]: start {:?}, brownout {:?}, hold-down {:?}, after {:?}",
        checks[0],
        checks[1],
        checks[2],
        checks[3]
    );
    let [start, brownout, held, back] = checks;
    // Each link also carries probes and probe replies: up to about 150 packets/s (50/s on a
    // path that carries traffic, 10/s on a standby one, in both directions' sessions). The
    // streams are 200/s (voice) and 500/s (bulk).
    // Start: both streams on MPLS (700/s), broadband carries only probes.
    assert!(start[0] >= 700 && start[1] < 160, "start {start:?}");
    // A second after the ramp: voice on broadband, bulk still on MPLS.
    assert!((200..350).contains(&brownout[1]), "brownout {brownout:?}");
    assert!((500..720).contains(&brownout[0]), "brownout {brownout:?}");
    // 2-3 s after MPLS recovered: voice still on broadband (hold-down).
    assert!((200..350).contains(&held[1]), "held {held:?}");
    assert!((500..720).contains(&held[0]), "held {held:?}");
    // 5.5-6.5 s after: back on MPLS.
    assert!(back[0] >= 700 && back[1] < 150, "back {back:?}");
    // The move itself, to the millisecond the edge made it: within a second of the step that
    // took MPLS past realtime's 150 ms, and no flow moved for the SLA before that step.
    let status = edge_status(&lab, "a");
    let moves: Vec<i64> = status["failover_events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["reason"] == "sla-violated")
        .map(|e| e["at_ms"].as_i64().unwrap())
        .collect();
    let first = *moves
        .first()
        .unwrap_or_else(|| panic!("no SLA move: {status}"));
    assert!(
        (0..1000).contains(&(first - breach_ms)),
        "voice moved {} ms after the breaching step: {moves:?}",
        first - breach_ms
    );
    let _ = writeln!(
        std::io::stderr(),
        "voice moved {} ms after the breaching step",
        first - breach_ms
    );
    // And not one packet lost, in either stream, through all of it.
    assert_eq!(
        (voice.lost, bulk.lost),
        (0, 0),
        "{:?} {:?}",
        voice.gaps,
        bulk.gaps
    );
}

fn a_stock_wireguard_go_peer_exchanges_traffic_with_a_patronus_edge() {
    let lab = Lab::up(&Topology::two_sites_two_links(), LabOptions::default()).unwrap();
    let plan = lab.plan().clone();
    // Site b runs Debian's wireguard-go, configured with wg, on its MPLS link only; site a runs
    // Patronus with that one peer link.
    let (b_key, b_pub) = edges::wg_keypair(&lab, "b").unwrap();
    let a_pub = edges::public_key(&lab, patronus(), "a").unwrap();
    let mut cfg = edges::edge_config(
        &plan,
        0,
        &[a_pub, b_pub],
        edges::edge_dir(&lab, "a").join("private.key"),
        Underlay::V4,
    );
    cfg.links.truncate(1);
    cfg.peers[0].links.truncate(1);
    // Nothing but wireguard-go runs on b: its IP stack answers probes sent as echo requests.
    cfg.peers[0].probe = patronus_api::ProbeMode::IcmpEcho;
    edges::start_edge(&lab, patronus(), "a", &cfg).unwrap();
    let a = &plan.sites[0];
    edges::start_wireguard_go(
        &lab,
        "b",
        &b_key,
        edges::overlay4(1),
        &[edges::StockPeer {
            public_key: a_pub,
            endpoint: std::net::SocketAddr::new(a.links[0].addr4.into(), edges::EDGE_PORT),
            allowed: vec![
                format!("{}/32", edges::overlay4(0)),
                a.lan4.to_string(),
                a.lan6.to_string(),
            ],
        }],
    )
    .unwrap();
    let b_host = lab.addr("b/h1", false).unwrap();
    edges::wait_for_tunnel(&lab, "a/h1", b_host, Duration::from_secs(20)).unwrap();
    edges::wait_for_tunnel(
        &lab,
        "b/h1",
        lab.addr("a/h1", false).unwrap(),
        Duration::from_secs(5),
    )
    .unwrap();
    let tcp = tcp_a_to_b(&lab, b_host);
    let ifname = edges::wg_ifname(&lab, "b").unwrap();
    let hs = lab
        .exec("b", &["wg", "show", &ifname, "latest-handshakes"])
        .unwrap();
    let text = String::from_utf8_lossy(&hs.stdout);
    assert!(
        text.contains(&a_pub.to_string()) && !text.trim().ends_with('\t'),
        "{text}"
    );
    // The path is up on measurements: round trips of the echoes, no loss.
    let status = edge_status(&lab, "a");
    let path = &status["paths"][0];
    assert_eq!(path["state"], "up", "{status}");
    let rtt = path["rtt_ms"].as_f64().unwrap_or_else(|| panic!("{path}"));
    assert!(rtt > 0.0 && rtt < 50.0, "{path}");
    assert!(path["probes_received"].as_u64().unwrap_or(0) > 5, "{path}");
    let _ = writeln!(
        std::io::stderr(),
        "interop: tcp {:.2} Gbit/s, echo rtt {rtt:.2} ms, wg: {}",
        tcp.gbps,
        text.trim()
    );
}

/// 50,000 handshake initiations a second for 15 s, each with a valid MAC1 for b (anyone who
/// knows b's public key can make them), spoofed from a's real endpoint on its MPLS link to b's
/// MPLS link, while a stream crosses from a to b (on that very path). b admits a few a second
/// (they fail: the key is not a's), answers within its cookie budget (10 a second for the path)
/// and drops the rest; the stream loses nothing, no path goes down and no flow moves.
fn a_handshake_flood_from_a_peers_own_endpoint_costs_the_traffic_nothing_and_gets_bounded_replies()
{
    const SECS: u64 = 15;
    const RATE: u64 = 50_000;
    let lab = Lab::up(&Topology::two_sites_two_links(), LabOptions::default()).unwrap();
    let started = edges::start_edges(&lab, patronus(), Underlay::V4, |_| {}).unwrap();
    let b_host = lab.addr("b/h1", false).unwrap();
    edges::wait_for_tunnel(&lab, "a/h1", b_host, Duration::from_secs(15)).unwrap();
    let all_up = |site: &str| {
        edge_status(&lab, site)["paths"]
            .as_array()
            .unwrap()
            .iter()
            .all(|p| p["state"] == "up")
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !(all_up("a") && all_up("b")) {
        assert!(std::time::Instant::now() < deadline, "paths not up");
        std::thread::sleep(Duration::from_millis(100));
    }

    // The links the stream takes, found on the emulated links' counters: the flood goes to
    // that very path.
    let forwarded = |links: [&'static str; 2], up: bool| {
        links.map(|l| {
            let st = lab.link_status(l).unwrap();
            if up {
                st.up_stats.forwarded
            } else {
                st.down_stats.forwarded
            }
        })
    };
    let (a_links, b_links) = (["a/mpls", "a/inet"], ["b/mpls", "b/inet"]);
    let (a0, b0) = (forwarded(a_links, true), forwarded(b_links, false));
    let _ = a_to_b(&lab, b_host, 1000, 1);
    let (a1, b1) = (forwarded(a_links, true), forwarded(b_links, false));
    let busier = |links: [&'static str; 2], before: [u64; 2], after: [u64; 2]| {
        if after[0] - before[0] >= after[1] - before[1] {
            links[0]
        } else {
            links[1]
        }
    };
    let (a_link, b_link) = (busier(a_links, a0, a1), busier(b_links, b0, b1));

    // 1000 distinct initiations to b's key from a key b does not know.
    let b_key = started[0].0.peers[0].public_key.0;
    let (_, ap) = lab.plan().link(a_link).unwrap();
    let (_, bp) = lab.plan().link(b_link).unwrap();
    let src = std::net::SocketAddrV4::new(ap.addr4, edges::EDGE_PORT);
    let dst = std::net::SocketAddrV4::new(bp.addr4, edges::EDGE_PORT);
    let pkts = flood::initiations(b_key, src, dst, 1000);

    let before = edge_status(&lab, "b");
    let a_before = edge_status(&lab, "a");
    let emu = |link: &str, up: bool| {
        let st = lab.link_status(link).unwrap();
        if up { st.up_stats } else { st.down_stats }
    };
    let b_down0 = emu(b_link, false);
    let rcvbuf_errors = || {
        let out = lab.exec("b", &["cat", "/proc/net/snmp"]).unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let udp: Vec<&str> = text.lines().filter(|l| l.starts_with("Udp:")).collect();
        let (names, values) = (udp[0].split_whitespace(), udp[1].split_whitespace());
        names
            .zip(values)
            .find(|(n, _)| *n == "RcvbufErrors")
            .map_or(0, |(_, v)| v.parse::<u64>().unwrap())
    };
    let rcvbuf0 = rcvbuf_errors();
    // The attacker is out on the Internet (the lab's wan namespace), not on a's access link:
    // the flood arrives on b's link only.
    let wan = lab.ns("wan").unwrap();
    let (sent, r) = std::thread::scope(|s| {
        let f = s.spawn(|| {
            netns::run_in::<_, netns::NetnsError>(&wan, || Ok(flood(&pkts, dst, RATE, SECS)))
        });
        // The stream starts once b is dropping the flood and ends before the flood stops.
        wait_for_drops(&lab);
        let r = a_to_b(&lab, b_host, 1000, SECS - 2);
        (f.join().unwrap().unwrap(), r)
    });
    // b publishes its counters a few times a second: read them once they stop moving.
    let mut after = edge_status(&lab, "b");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        std::thread::sleep(Duration::from_millis(500));
        let now = edge_status(&lab, "b");
        let done = now["counters"]["handshakes_dropped"] == after["counters"]["handshakes_dropped"];
        after = now;
        if done || std::time::Instant::now() > deadline {
            break;
        }
    }
    let a_after = edge_status(&lab, "a");
    let b_down1 = emu(b_link, false);
    let to_b = b_down1.forwarded - b_down0.forwarded;
    let overflowed = rcvbuf_errors() - rcvbuf0;
    let _ = writeln!(
        std::io::stderr(),
        "flood from {a_link}'s endpoint to {b_link}: the emulator delivered {to_b} packets to b; \
         b's UDP receive-buffer errors {overflowed}"
    );
    let c = |s: &serde_json::Value, k: &str| s["counters"][k].as_u64().unwrap();
    let d = |k: &str| c(&after, k) - c(&before, k);
    let _ = writeln!(
        std::io::stderr(),
        "flood: {sent} initiations in {SECS} s ({:.0}/s); b admitted {}, answered {}, dropped {}, \
         refused {}; stream {} sent, {} lost",
        sent as f64 / SECS as f64,
        d("handshakes_admitted"),
        d("handshake_cookies_sent"),
        d("handshakes_dropped"),
        d("rx_rejected"),
        r.sent,
        r.lost
    );
    // b's links each have a queue for handshakes (see `patronus_edge::linksock`), and the
    // kernel dropped nothing from the data queues: whatever overflowed was the flood's own.
    let drops = |s: &serde_json::Value, q: &str| -> u64 {
        let links = s["links"].as_array().unwrap();
        assert!(
            links.iter().all(|l| l["handshake_queue"] == true),
            "{links:?}"
        );
        links.iter().map(|l| l[q].as_u64().unwrap()).sum()
    };
    let _ = writeln!(
        std::io::stderr(),
        "b's queues dropped: data {}, handshake {}",
        drops(&after, "data_drops") - drops(&before, "data_drops"),
        drops(&after, "handshake_drops") - drops(&before, "handshake_drops")
    );
    assert_eq!(
        drops(&after, "data_drops"),
        drops(&before, "data_drops"),
        "the flood pushed datagrams out of b's data queue"
    );
    // It was a flood: at least half the rate reached the wire from the sender.
    assert!(sent >= RATE * SECS / 2, "sent only {sent}");
    assert_eq!(r.lost, 0, "the stream lost packets: {:?}", r.gaps);
    // Cookie replies: at most the path's budget (10 a second, a second's worth saved).
    assert!(
        d("handshake_cookies_sent") <= 10 * (SECS + 2),
        "{} cookie replies",
        d("handshake_cookies_sent")
    );
    assert!(
        d("handshake_cookies_sent") > 0,
        "the path was never under load"
    );
    // What reached b's socket was admitted (a few a second), answered, or dropped: all but
    // what overflowed its buffer, which the debug build on two cores shared with the flood's
    // sender, the emulator and the other edge does now and then (printed above; the stream
    // lost nothing, asserted above).
    let seen = d("handshakes_admitted") + d("handshake_cookies_sent") + d("handshakes_dropped");
    assert!(
        d("handshakes_admitted") <= 10 * (SECS + 2) * 2,
        "{} admitted",
        d("handshakes_admitted")
    );
    let flood_to_b = to_b.saturating_sub(r.sent);
    assert!(
        (seen + overflowed) * 10 >= flood_to_b * 9,
        "b handled {seen} of about {flood_to_b} ({overflowed} overflowed)"
    );
    // No path went down, no flow moved, at either end. (A path may break an SLA class: the
    // flood is 70 Mbit/s of real packets on b's emulated link, and on a busy machine the
    // emulator's one thread queues them, and the probes behind them, for hundreds of ms: that
    // is the link's delay, measured, not the edge failing. It is printed.)
    for (site, b, a) in [("b", &before, &after), ("a", &a_before, &a_after)] {
        assert_eq!(b["failovers"], a["failovers"], "{site}: a flow moved");
        let count = |s: &serde_json::Value, kind: &str| {
            s["path_events"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|e| e["kind"] == kind)
                .count()
        };
        assert_eq!(
            count(b, "down"),
            count(a, "down"),
            "{site}: a path went down: {}",
            a["path_events"]
        );
        let _ = writeln!(
            std::io::stderr(),
            "{site}: SLA events during the flood: {}",
            count(a, "sla-violated") - count(b, "sla-violated")
        );
        assert!(
            a["paths"]
                .as_array()
                .unwrap()
                .iter()
                .all(|p| p["state"] != "down"),
            "{site}: {}",
            a["paths"]
        );
    }
}

/// Returns once b's edge has dropped more handshake initiations than when called: a flood has
/// reached it and put the flooded path under load.
fn wait_for_drops(lab: &Lab) {
    let dropped = || {
        edge_status(lab, "b")["counters"]["handshakes_dropped"]
            .as_u64()
            .unwrap()
    };
    let before = dropped();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while dropped() <= before {
        assert!(
            std::time::Instant::now() < deadline,
            "the flood did not reach b within 10 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Restarts a's edge (SIGTERM, then the same configuration) and returns, for each of a's
/// paths (`local>remote`), how long after the new process started it reported the path up.
fn restart_a(lab: &Lab, cfg: &patronus_api::EdgeConfig, pid: u32) -> (u32, Vec<(String, i64)>) {
    lab.stop(pid).unwrap();
    let t0 = unix_ms();
    let pid = edges::start_edge(lab, patronus(), "a", cfg).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        std::thread::sleep(Duration::from_millis(100));
        let out = lab
            .exec(
                "a",
                &[patronus().to_str().unwrap(), "edge", "status", "--json"],
            )
            .unwrap();
        if out.status.success() {
            let st: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            let paths = st["paths"].as_array().unwrap();
            if !paths.is_empty() && paths.iter().all(|p| p["state"] != "down") {
                let mut ups: Vec<(String, i64)> = Vec::new();
                for e in st["path_events"].as_array().unwrap() {
                    let name = format!(
                        "{}>{}",
                        e["local_link"].as_str().unwrap(),
                        e["remote_link"].as_str().unwrap()
                    );
                    if e["kind"] == "up" && !ups.iter().any(|(n, _)| *n == name) {
                        ups.push((name, e["at_ms"].as_i64().unwrap() - t0));
                    }
                }
                ups.sort();
                return (pid, ups);
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "a's paths not all up 30 s after its restart"
        );
    }
}

/// A peer that restarts while its endpoint on one path is being spoofed by a flood of
/// initiations (so its own initiations on that path drown in the flood) gets the paths that do
/// not cross the flooded link back as fast as without the flood, and the flooded one (and the
/// other one on its link) within 10 s: b notices the path is down and handshakes itself once a
/// second (a's response is not counted with the flood); the first of those may reach a before
/// its new process listens, the next does not. Measured 1.0-1.25 s on a quiet machine, and up
/// to 3.6 s for the flooded link's paths with a release build running beside the test (the
/// emulator's queue); 10 s is two of WireGuard's own 5 s retries.
fn a_peer_that_restarts_during_a_handshake_flood_gets_every_path_back() {
    let lab = Lab::up(&Topology::two_sites_two_links(), LabOptions::default()).unwrap();
    let started = edges::start_edges(&lab, patronus(), Underlay::V4, |_| {}).unwrap();
    let b_host = lab.addr("b/h1", false).unwrap();
    edges::wait_for_tunnel(&lab, "a/h1", b_host, Duration::from_secs(15)).unwrap();
    let (cfg, pid) = started[0].clone();

    let (pid, quiet) = restart_a(&lab, &cfg, pid);
    let (_, ap) = lab.plan().link("a/mpls").unwrap();
    let (_, bp) = lab.plan().link("b/mpls").unwrap();
    let src = std::net::SocketAddrV4::new(ap.addr4, edges::EDGE_PORT);
    let dst = std::net::SocketAddrV4::new(bp.addr4, edges::EDGE_PORT);
    let pkts = flood::initiations(cfg.peers[0].public_key.0, src, dst, 1000);
    let wan = lab.ns("wan").unwrap();
    let stop = std::sync::atomic::AtomicBool::new(false);
    let flooded = std::thread::scope(|s| {
        let f = s.spawn(|| {
            netns::run_in::<_, netns::NetnsError>(&wan, || {
                let mut sent = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    sent += flood(&pkts, dst, 50_000, 1);
                }
                Ok(sent)
            })
        });
        wait_for_drops(&lab);
        let r = restart_a(&lab, &cfg, pid);
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let sent = f.join().unwrap().unwrap();
        (r, sent)
    });
    let ((_, flood), sent) = flooded;
    let _ = writeln!(
        std::io::stderr(),
        "a's paths up after its restart, ms: quiet {quiet:?}; during a flood of {sent} \
         initiations on mpls>mpls {flood:?}"
    );
    let quiet_max = quiet.iter().map(|(_, t)| *t).max().unwrap();
    for (path, t) in &flood {
        // The flooded path, and the other path ending on b's flooded link, whose packets wait
        // in the same emulated link behind the flood (on a busy machine its one emulator thread
        // falls behind: 1.75 s once, with a release build running beside the test).
        if path.ends_with(">mpls") {
            assert!(
                *t <= 10_000,
                "{path} (on the flooded link) came up {t} ms after the restart"
            );
        } else {
            assert!(
                *t <= quiet_max + 1000,
                "{path} came up {t} ms after the restart, {quiet_max} ms without the flood"
            );
        }
    }
    assert_eq!(flood.len(), quiet.len());
}
