//! The path engine on a simulated network: two or more real engines exchanging real probes over
//! links with delay, jitter, loss and blackholes, under a virtual clock.

#![allow(clippy::unwrap_used)] // test code: a panic is a failed test with a line number

mod sim;

use std::time::Duration;

use patronus_api::{LinkKind, Name, Policy, SteeringMode};
use patronus_core::{Decision, EngineConfig, Event, MoveReason, PathId, PathState};
use sim::{MS, Net, SiteSpec, link};

const SEC: Duration = Duration::from_secs(1);
const UDP: u8 = 17;
const TCP: u8 = 6;

/// Two sites, each with an MPLS link (5 ms one way) and a broadband link (10 ms one way), in a
/// full mesh of four paths. The best path is mpls>mpls (20 ms round trip).
fn two_sites(config: &EngineConfig) -> Net {
    let sites = || {
        vec![
            link("mpls", LinkKind::Mpls),
            link("inet", LinkKind::Broadband),
        ]
    };
    let mut net = Net::new(
        config,
        vec![
            SiteSpec {
                name: "a",
                lan: "10.1.0.0/16",
                links: sites(),
            },
            SiteSpec {
                name: "b",
                lan: "10.2.0.0/16",
                links: sites(),
            },
        ],
        5 * MS,
        7,
    );
    net.impair("a", "inet", |i| i.delay = 10 * MS);
    net.impair("b", "inet", |i| i.delay = 10 * MS);
    net
}

/// A policy from `name order class steering [protocol dst-port]`, built from the API's own
/// types as the controller will send them.
fn policy(spec: &str) -> Policy {
    let w: Vec<&str> = spec.split_whitespace().collect();
    let mut p = Policy {
        name: Name::new(w[0]).unwrap(),
        order: w[1].parse().unwrap(),
        enabled: true,
        matches: Default::default(),
        class: Name::new(w[2]).unwrap(),
        steering: w[3].parse::<SteeringMode>().unwrap(),
        links: Default::default(),
        strict: false,
    };
    if w.len() > 4 {
        p.matches.protocol = Some(w[4].parse().unwrap());
        p.matches.dst_ports = vec![w[5].parse().unwrap()];
    }
    p
}

fn config_with(policies: Vec<Policy>) -> EngineConfig {
    EngineConfig {
        policies,
        ..EngineConfig::default()
    }
}

/// The time and payload of every FlowMoved event of a site.
fn moves(net: &Net, site: &str) -> Vec<(Duration, PathId, PathId, MoveReason)> {
    net.events(site)
        .into_iter()
        .filter_map(|(t, e)| match e {
            Event::FlowMoved {
                from, to, reason, ..
            } => Some((t, from, to, reason)),
            _ => None,
        })
        .collect()
}

fn moves_of(net: &Net, site: &str, stream: usize) -> Vec<(Duration, PathId, PathId, MoveReason)> {
    let key = net.streams[stream].meta.key;
    net.events(site)
        .into_iter()
        .filter_map(|(t, e)| match e {
            Event::FlowMoved {
                flow,
                from,
                to,
                reason,
            } if flow == key => Some((t, from, to, reason)),
            _ => None,
        })
        .collect()
}

fn downs(net: &Net, site: &str, path: PathId) -> Vec<Duration> {
    net.events(site)
        .into_iter()
        .filter_map(|(t, e)| matches!(e, Event::PathDown { path: p, .. } if p == path).then_some(t))
        .collect()
}

fn ups(net: &Net, site: &str, path: PathId) -> Vec<Duration> {
    net.events(site)
        .into_iter()
        .filter_map(|(t, e)| matches!(e, Event::PathUp { path: p, .. } if p == path).then_some(t))
        .collect()
}

fn last_reply_before(net: &Net, site: &str, path: PathId, t: Duration) -> Duration {
    let s = net.site(site);
    net.replies
        .iter()
        .filter(|(at, i, p)| *i == s && *p == path && *at - net.start < t)
        .map(|(at, _, _)| *at - net.start)
        .max()
        .unwrap()
}

fn current_path(net: &Net, stream: usize) -> Option<PathId> {
    net.streams[stream]
        .sent
        .last()
        .and_then(|(_, d)| d.primary())
}

#[test]
fn a_blackholed_active_path_is_abandoned_within_its_down_after_window() {
    let mut net = two_sites(&EngineConfig::default());
    net.run_for(2 * SEC);
    let s = net.stream("a", "b", UDP, 5004, 46, 100);
    net.run_for(3 * SEC);
    let primary = net.path("a", "mpls", "b", "mpls");
    assert_eq!(current_path(&net, s), Some(primary));

    let cut = net.elapsed();
    net.cut("a", "mpls");
    net.run_for(2 * SEC);

    // Detection: exactly down_after_misses (3) active intervals (20 ms) after the last reply,
    // plus 4 × RTTVAR, which a steady path has driven to (nearly) zero.
    let down = downs(&net, "a", primary);
    assert_eq!(down.len(), 1, "{down:?}");
    let last = last_reply_before(&net, "a", primary, down[0]);
    let detection = down[0] - last;
    assert!(
        detection >= 60 * MS && detection < 60 * MS + Duration::from_micros(10),
        "{detection:?}"
    );
    assert!(
        down[0] - cut <= 60 * MS + 20 * MS,
        "down {:?} after the cut",
        down[0] - cut
    );

    // The flow moves on its first packet after the Down, off the cut link.
    let m = moves_of(&net, "a", s);
    assert_eq!(m[0].1, primary);
    assert_eq!(m[0].3, MoveReason::PathDown);
    assert!(
        m[0].0 >= down[0] && m[0].0 < down[0] + 10 * MS,
        "{:?} vs {:?}",
        m[0].0,
        down[0]
    );
    assert!(
        !net.path_name("a", m[0].2).starts_with("mpls"),
        "{}",
        net.path_name("a", m[0].2)
    );

    // Loss-derived outage (RFC 6412): lost packets × 10 ms.
    let r = net.report(s, cut - SEC, net.elapsed() - SEC);
    assert!(r.outage <= 90 * MS, "{r:?}");
    assert!(r.lost > 0, "the cut must cost something: {r:?}");

    // The outage histogram holds the one path that went down with a flow on it (the other
    // path of the cut link carried none), its silence in the bucket that bounds it.
    let silent = net
        .events("a")
        .into_iter()
        .find_map(|(_, e)| match e {
            Event::PathDown {
                path,
                silent_for,
                flows,
            } if path == primary => Some((silent_for, flows)),
            _ => None,
        })
        .unwrap();
    assert!(silent.1 > 0);
    let outages = net.engine("a").stats().failover_outages;
    assert_eq!((outages.count, outages.sum), (1, silent.0), "{outages:?}");
    let bucket = patronus_core::OUTAGE_BOUNDS_S
        .iter()
        .position(|b| silent.0.as_secs_f64() <= *b)
        .unwrap();
    assert_eq!(outages.buckets[bucket], 1, "{outages:?}");
    assert_eq!(outages.buckets.iter().sum::<u64>(), 1);
}

#[test]
fn an_unreachable_path_is_never_reported_up() {
    let mut net = two_sites(&EngineConfig::default());
    net.cut("a", "inet");
    net.run_for(10 * SEC);
    for remote in ["mpls", "inet"] {
        let p = net.path("a", "inet", "b", remote);
        assert!(ups(&net, "a", p).is_empty());
        let snap = net.engine("a").path(p, net.now).unwrap();
        assert_eq!(snap.state, PathState::Down);
        assert_eq!(snap.rtt, None);
        // A Down path keeps being probed, at the standby rate: 10 per second from t = 0.
        assert_eq!(snap.counters.probes_sent, 101);
        assert_eq!(snap.counters.probes_received, 0);
    }
}

#[test]
fn a_path_that_only_receives_is_never_reported_up_on_either_side() {
    let mut net = two_sites(&EngineConfig::default());
    net.impair_egress("a", "inet", |i| i.blackhole = true);
    net.run_for(5 * SEC);
    let ab = net.path("a", "inet", "b", "inet");
    let ba = net.path("b", "inet", "a", "inet");
    assert!(ups(&net, "a", ab).is_empty());
    assert!(ups(&net, "b", ba).is_empty());
    // A reflected B's probes (they reached it) but its replies died on the way out.
    assert!(
        net.engine("a")
            .path(ab, net.now)
            .unwrap()
            .counters
            .probes_reflected
            > 0
    );
}

#[test]
fn a_down_path_comes_back_within_one_standby_interval_of_the_repair() {
    let mut net = two_sites(&EngineConfig::default());
    net.cut("a", "inet");
    net.run_for(3 * SEC);
    let repaired = net.elapsed();
    net.restore("a", "inet");
    net.run_for(SEC);
    let p = net.path("a", "inet", "b", "inet");
    let up = ups(&net, "a", p);
    assert_eq!(up.len(), 1);
    // Next standby probe (≤ 100 ms) plus one round trip (40 ms).
    assert!(up[0] - repaired <= 140 * MS, "{:?}", up[0] - repaired);
}

#[test]
fn probes_run_every_20ms_on_a_path_with_traffic_and_every_100ms_on_an_idle_one() {
    let mut net = two_sites(&EngineConfig::default());
    net.run_for(2 * SEC);
    let _s = net.stream("a", "b", UDP, 9, 0, 50);
    net.run_for(SEC);
    let active = net.path("a", "mpls", "b", "mpls");
    let idle = net.path("a", "inet", "b", "inet");
    let count = |net: &Net, p| {
        net.engine("a")
            .path(p, net.now)
            .unwrap()
            .counters
            .probes_sent
    };
    let (a0, i0) = (count(&net, active), count(&net, idle));
    net.run_for(2 * SEC);
    assert_eq!(count(&net, active) - a0, 100);
    assert_eq!(count(&net, idle) - i0, 20);
    let snap = net.engine("a").path(active, net.now).unwrap();
    assert_eq!(snap.probe_interval, 20 * MS);
    assert_eq!(snap.flows, 1);
}

#[test]
fn poll_timeout_names_the_next_probe_deadline_exactly() {
    let net = two_sites(&EngineConfig::default());
    let mut engine = patronus_core::Engine::new(EngineConfig::default(), net.start).unwrap();
    let peer = engine
        .add_peer("b", &["10.2.0.0/16".parse().unwrap()])
        .unwrap();
    let p = engine
        .add_path(
            peer,
            &link("mpls", LinkKind::Mpls),
            &link("mpls", LinkKind::Mpls),
            net.start,
        )
        .unwrap();
    assert_eq!(engine.poll_timeout(), Some(net.start));
    engine.handle_timeout(net.start);
    let t = engine.poll_transmit().unwrap();
    assert_eq!(t.path, p);
    assert!(engine.poll_transmit().is_none());
    // The next probe of a Down path is one standby interval later.
    assert_eq!(engine.poll_timeout(), Some(net.start + 100 * MS));
}

#[test]
fn voice_leaves_a_path_whose_jitter_breaks_its_sla_while_bulk_stays() {
    let cfg = config_with(vec![
        policy("voice 10 realtime best-quality udp 5004"),
        policy("backup 20 bulk best-quality tcp 873"),
    ]);
    let mut net = two_sites(&cfg);
    // A long-haul MPLS link: 50 ms one way, so jitter can grow around it without a delay step.
    net.impair("a", "mpls", |i| i.delay = 50 * MS);
    net.impair("a", "inet", |i| i.delay = 60 * MS);
    net.run_for(2 * SEC);
    let voice = net.stream("a", "b", UDP, 5004, 46, 50);
    let bulk = net.stream("a", "b", TCP, 873, 0, 50);
    net.run_for(3 * SEC);
    let primary = net.path("a", "mpls", "b", "mpls");
    assert_eq!(current_path(&net, voice), Some(primary));
    assert_eq!(current_path(&net, bulk), Some(primary));

    // Jitter builds up on the MPLS link, 10 ms more every half second, to ±60 ms: RFC 3550
    // jitter of about 40 ms, beyond realtime's 30 ms.
    let start = net.elapsed();
    for j in 1..=6 {
        net.impair("a", "mpls", |i| i.jitter = 10 * j * MS);
        net.run_for(SEC / 2);
    }
    net.run_for(2 * SEC);

    let realtime = net.engine("a").class_id("realtime").unwrap();
    let violated = net.events("a").into_iter().find_map(|(t, e)| match e {
        Event::SlaViolated {
            path,
            class,
            metrics,
        } if path == primary && class == realtime => Some((t, metrics)),
        _ => None,
    });
    let (violated_at, metrics) = violated.expect("the MPLS path breaks the realtime SLA");
    assert!(metrics.jitter > 30 * MS, "{metrics:?}");
    let vm = moves_of(&net, "a", voice);
    assert_eq!(vm.len(), 1, "{vm:?}");
    assert_eq!((vm[0].1, vm[0].3), (primary, MoveReason::SlaViolated));
    assert!(
        vm[0].0 - violated_at < 20 * MS,
        "voice moves on its next packet"
    );
    assert!(vm[0].0 > start);
    assert!(
        downs(&net, "a", primary).is_empty(),
        "jitter is not an outage"
    );
    assert_eq!(net.engine("a").stats().failover_outages.count, 0);
    // Each class counts the times a path broke its SLA.
    let breaches: std::collections::HashMap<String, u64> = net
        .engine("a")
        .class_counters()
        .map(|(n, _, _, b)| (n.to_string(), b))
        .collect();
    let violations = net
        .events("a")
        .iter()
        .filter(|(_, e)| matches!(e, Event::SlaViolated { class, .. } if *class == realtime))
        .count() as u64;
    assert!(violations >= 1);
    assert_eq!(breaches["realtime"], violations);
    assert!(
        moves_of(&net, "a", bulk).is_empty(),
        "bulk has no jitter bound and stays: {:?} {:#?}",
        moves_of(&net, "a", bulk),
        net.events("a")
            .iter()
            .filter(|(_, e)| !matches!(e, Event::FlowMoved { .. }))
            .collect::<Vec<_>>()
    );
    assert_eq!(current_path(&net, bulk), Some(primary));
}

#[test]
fn traffic_returns_to_a_recovered_primary_only_after_the_hold_down() {
    let mut net = two_sites(&EngineConfig::default());
    net.run_for(2 * SEC);
    let s = net.stream("a", "b", UDP, 5004, 46, 100);
    net.run_for(2 * SEC);
    let primary = net.path("a", "mpls", "b", "mpls");
    net.cut("a", "mpls");
    net.run_for(2 * SEC);
    assert_ne!(current_path(&net, s), Some(primary));
    let restored = net.elapsed();
    net.restore("a", "mpls");
    net.run_for(8 * SEC);

    let up = ups(&net, "a", primary);
    let up_at = *up.last().unwrap();
    assert!(up_at > restored);
    let back: Vec<_> = moves_of(&net, "a", s)
        .into_iter()
        .filter(|m| m.2 == primary)
        .collect();
    assert_eq!(back.len(), 1, "{back:?}");
    assert_eq!(back[0].3, MoveReason::Better);
    let hold_down = back[0].0 - up_at;
    // Exactly the 5 s hold-down, then the flow's next packet (every 10 ms).
    assert!(
        hold_down >= 5 * SEC && hold_down < 5 * SEC + 10 * MS,
        "{hold_down:?}"
    );
    // Failback is make-before-break: nothing lost once the link was back.
    let r = net.report(s, restored, net.elapsed() - SEC);
    assert_eq!(r.lost, 0, "{r:?}");
}

#[test]
fn periodic_half_loss_bursts_cause_no_oscillation() {
    let cfg = config_with(vec![policy("voice 10 realtime best-quality udp 5004")]);
    let mut net = two_sites(&cfg);
    net.run_for(2 * SEC);
    let s = net.stream("a", "b", UDP, 5004, 46, 50);
    net.run_for(2 * SEC);
    let primary = net.path("a", "mpls", "b", "mpls");
    assert_eq!(current_path(&net, s), Some(primary));
    // 300 ms of 50 % loss every 3 s, for a minute.
    for _ in 0..20 {
        net.impair("a", "mpls", |i| i.loss = 0.5);
        net.run_for(300 * MS);
        net.impair("a", "mpls", |i| i.loss = 0.0);
        net.run_for(2700 * MS);
    }
    // The flow leaves once and never comes back. (It may move once more between the backups:
    // the failover picks the path sharing no link with the failed one, and a better backup
    // attracts it once its own link is cleared.)
    let m = moves_of(&net, "a", s);
    assert!(!m.is_empty() && m.len() <= 2, "{m:?}");
    assert_eq!(m[0].1, primary);
    assert!(m.iter().all(|mv| mv.2 != primary), "{m:?}");
    let flaps = net.engine("a").path(primary, net.now).unwrap().flaps;
    assert!(flaps >= 10, "every burst is counted as a flap: {flaps}");
    // Damping has stretched the hold-down far beyond the burst period.
    assert!(net.engine("a").hold_down(primary, net.now).unwrap() >= 30 * SEC);
}

#[test]
fn a_path_that_keeps_failing_waits_longer_each_time() {
    let mut net = two_sites(&EngineConfig::default());
    net.run_for(2 * SEC);
    let s = net.stream("a", "b", UDP, 5004, 46, 100);
    net.run_for(2 * SEC);
    let primary = net.path("a", "mpls", "b", "mpls");
    let mut waits = Vec::new();
    for _ in 0..2 {
        net.cut("a", "mpls");
        net.run_for(SEC);
        let restored = net.elapsed();
        net.restore("a", "mpls");
        net.run_for(30 * SEC);
        let up_at = *ups(&net, "a", primary).last().unwrap();
        let back = moves_of(&net, "a", s)
            .into_iter()
            .filter(|m| m.2 == primary && m.0 > restored)
            .map(|m| m.0)
            .next()
            .expect("the flow comes back");
        waits.push(back - up_at);
    }
    assert!(
        waits[0] >= 5 * SEC && waits[0] < 5 * SEC + 10 * MS,
        "{waits:?}"
    );
    // Second failure ~36 s later: penalty 1 × 2^(-36/30) + 1 ≈ 1.44, hold-down 5 × 2^0.44 ≈ 6.8 s.
    assert!(waits[1] > 6 * SEC && waits[1] < 8 * SEC, "{waits:?}");
}

#[test]
fn lowest_cost_keeps_using_broadband_while_it_meets_the_sla_and_lte_takes_over_only_when_it_does_not()
 {
    let cfg = EngineConfig {
        default_steering: SteeringMode::LowestCost,
        ..EngineConfig::default()
    };
    let mut lte = link("lte", LinkKind::Lte);
    lte.metered = true;
    lte.cost_per_gb = Some(5.0);
    let mut net = Net::new(
        &cfg,
        vec![
            SiteSpec {
                name: "a",
                lan: "10.1.0.0/16",
                links: vec![link("inet", LinkKind::Broadband), lte],
            },
            SiteSpec {
                name: "b",
                lan: "10.2.0.0/16",
                links: vec![link("inet", LinkKind::Broadband)],
            },
        ],
        5 * MS,
        11,
    );
    // Broadband is slower than LTE here, and still preferred: it is cheaper.
    net.impair("a", "inet", |i| i.delay = 30 * MS);
    net.run_for(2 * SEC);
    let s = net.stream("a", "b", TCP, 443, 0, 50);
    net.run_for(2 * SEC);
    let inet = net.path("a", "inet", "b", "inet");
    let lte = net.path("a", "lte", "b", "inet");
    assert_eq!(current_path(&net, s), Some(inet));

    // 1 % loss is within business's 3 %: broadband keeps the flow.
    net.impair_egress("a", "inet", |i| i.loss = 0.01);
    net.run_for(5 * SEC);
    assert!(moves_of(&net, "a", s).is_empty());

    // 10 % loss is not: LTE takes over.
    net.impair_egress("a", "inet", |i| i.loss = 0.10);
    net.run_for(3 * SEC);
    let m = moves_of(&net, "a", s);
    assert_eq!(m.len(), 1, "{m:?}");
    assert_eq!(
        (m[0].1, m[0].2, m[0].3),
        (inet, lte, MoveReason::SlaViolated)
    );

    // Repaired: once its loss window is clean and it has served the hold-down, broadband
    // takes the flow back because it is cheaper.
    net.impair_egress("a", "inet", |i| i.loss = 0.0);
    let repaired = net.elapsed();
    net.run_for(30 * SEC);
    let m = moves_of(&net, "a", s);
    assert_eq!(m.len(), 2, "{m:?}");
    assert_eq!((m[1].1, m[1].2, m[1].3), (lte, inet, MoveReason::Better));
    assert!(m[1].0 - repaired >= 5 * SEC);
}

#[test]
fn duplicate_mode_loses_nothing_when_the_primary_is_cut() {
    let cfg = config_with(vec![policy("voice 10 realtime duplicate udp 5004")]);
    let mut net = two_sites(&cfg);
    net.run_for(2 * SEC);
    let s = net.stream("a", "b", UDP, 5004, 46, 100);
    net.run_for(2 * SEC);
    let Some((_, Decision::Duplicate { primary, secondary })) = net.streams[s].sent.last().copied()
    else {
        panic!("duplicate mode sends on two paths");
    };
    assert_eq!(net.path_name("a", primary), "mpls>mpls");
    assert_eq!(
        net.path_name("a", secondary),
        "inet>inet",
        "the second path shares no link"
    );
    let before = net.elapsed();
    net.cut("a", "mpls");
    net.run_for(3 * SEC);
    let r = net.report(s, before - SEC, net.elapsed() - SEC);
    assert_eq!(r.lost, 0, "{r:?}");
    assert!(r.duplicates > 0);
}

#[test]
fn load_balance_spreads_new_flows_in_proportion_to_capacity() {
    let cfg = EngineConfig {
        default_steering: SteeringMode::LoadBalance,
        ..EngineConfig::default()
    };
    let mut big = link("fiber", LinkKind::Broadband);
    big.up_kbps = Some(100_000);
    let mut small = link("dsl", LinkKind::Broadband);
    small.up_kbps = Some(50_000);
    let mut net = Net::new(
        &cfg,
        vec![
            SiteSpec {
                name: "a",
                lan: "10.1.0.0/16",
                links: vec![big, small],
            },
            SiteSpec {
                name: "b",
                lan: "10.2.0.0/16",
                links: vec![link("inet", LinkKind::Broadband)],
            },
        ],
        5 * MS,
        3,
    );
    net.run_for(2 * SEC);
    let streams: Vec<usize> = (0..300)
        .map(|i| net.stream("a", "b", UDP, 1000 + i, 0, 2))
        .collect();
    net.run_for(SEC);
    let fiber = net.path("a", "fiber", "b", "inet");
    let on_fiber = streams
        .iter()
        .filter(|&&s| current_path(&net, s) == Some(fiber))
        .count();
    assert_eq!(on_fiber, 200);
    assert!(moves(&net, "a").is_empty());
}

/// Two engines wired by hand, for tests that handle probe bytes themselves.
fn engine_pair() -> (
    patronus_core::Engine,
    patronus_core::Engine,
    PathId,
    PathId,
    std::time::Instant,
) {
    let t0 = std::time::Instant::now();
    let mk = |instance, peer: &str, lan: &str| {
        let mut e = patronus_core::Engine::new(
            EngineConfig {
                instance,
                ..EngineConfig::default()
            },
            t0,
        )
        .unwrap();
        let p = e.add_peer(peer, &[lan.parse().unwrap()]).unwrap();
        let l = link("mpls", LinkKind::Mpls);
        let l2 = link("inet", LinkKind::Broadband);
        let a = e.add_path(p, &l, &l, t0).unwrap();
        e.add_path(p, &l2, &l2, t0).unwrap();
        (e, a)
    };
    let (a, pa) = mk(1, "b", "10.2.0.0/16");
    let (b, pb) = mk(2, "a", "10.1.0.0/16");
    (a, b, pa, pb, t0)
}

/// A's first probe, and B's reply to it sent at `at`.
fn first_exchange(
    a: &mut patronus_core::Engine,
    b: &mut patronus_core::Engine,
    pb: PathId,
    t0: std::time::Instant,
    at: std::time::Instant,
) -> (patronus_core::Transmit, [u8; patronus_core::PROBE_LEN]) {
    a.handle_timeout(t0);
    let probe = a.poll_transmit().unwrap();
    let reply = b
        .handle_probe_request(pb, &probe.payload, 64, at, at)
        .unwrap();
    (probe, reply)
}

#[test]
fn garbage_replayed_and_misdirected_replies_change_nothing_and_crash_nothing() {
    use patronus_core::ProbeError;
    let (mut a, mut b, pa, pb, t0) = engine_pair();
    let (probe, reply) = first_exchange(&mut a, &mut b, pb, t0, t0 + 5 * MS);
    assert_eq!(probe.path, pa);
    let t = t0 + 10 * MS;
    a.handle_probe_reply(pa, &reply, t).unwrap();
    let before = a.path(pa, t).unwrap();
    assert_eq!(before.state, PathState::Up);
    assert_eq!(before.rtt, Some(10 * MS));

    let other = a.path_ids().find(|p| *p != pa).unwrap();
    assert!(matches!(
        a.handle_probe_reply(pa, &reply, t),
        Err(ProbeError::Duplicate(0))
    ));
    assert!(matches!(
        a.handle_probe_reply(other, &reply, t),
        Err(ProbeError::WrongPath { .. })
    ));
    assert!(matches!(
        a.handle_probe_reply(PathId(99), &reply, t),
        Err(ProbeError::UnknownPath(99))
    ));
    assert!(matches!(
        a.handle_probe_reply(pa, &probe.payload, t),
        Err(ProbeError::WrongKind { .. })
    ));
    let mut forged = patronus_core::probe::ProbeReply::decode(&reply).unwrap();
    forged.request.t1 = patronus_core::probe::NtpTime(forged.request.t1.0 + 1);
    assert!(matches!(
        a.handle_probe_reply(pa, &forged.encode(), t),
        Err(ProbeError::EchoMismatch(0))
    ));
    forged.request.seq = 7;
    assert!(matches!(
        a.handle_probe_reply(pa, &forged.encode(), t),
        Err(ProbeError::Stale(7))
    ));
    let mut rng = sim::Rng(1);
    for len in 0..200 {
        let junk: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
        assert!(a.handle_probe_reply(pa, &junk, t).is_err());
        assert!(a.handle_probe_request(pa, &junk, 64, t, t).is_err());
        let _ = patronus_core::PacketMeta::parse(&junk);
    }
    // A reply to a previous run of the sender (another instance tag) is stale.
    let (mut a2, _, pa2, _, _) = engine_pair();
    let mut old = patronus_core::probe::ProbeReply::decode(&reply).unwrap();
    old.request.instance = 77;
    assert!(matches!(
        a2.handle_probe_reply(pa2, &old.encode(), t),
        Err(ProbeError::WrongInstance { .. })
    ));

    let after = a.path(pa, t).unwrap();
    assert_eq!(
        (after.state, after.rtt, after.loss),
        (before.state, before.rtt, before.loss)
    );
    assert_eq!(after.counters.probes_received, 1);
    // Duplicate, wrong kind, forged echo, stale, and 200 junk ones on this path; the misdirected
    // one counts on the other path and the unknown-path one only engine-wide.
    assert_eq!(after.counters.replies_rejected, 204);
    assert_eq!(a.stats().replies_rejected, 206);
}

#[test]
fn a_late_reply_proves_the_path_alive_once_and_still_counts_as_lost() {
    let (mut a, mut b, pa, pb, t0) = engine_pair();
    let (_, reply) = first_exchange(&mut a, &mut b, pb, t0, t0 + 700 * MS);
    // No RTT estimate yet: the waiting time is 1 s. At 1 s the probe is lost.
    a.handle_timeout(t0 + SEC);
    assert_eq!(a.path(pa, t0 + SEC).unwrap().counters.probes_lost, 1);
    let late = t0 + 1400 * MS;
    a.handle_probe_reply(pa, &reply, late).unwrap();
    let snap = a.path(pa, late).unwrap();
    // Alive (a late reply is still a reply), and Degraded: a 1.4 s round trip meets no SLA.
    assert_eq!(snap.state, PathState::Degraded);
    assert_eq!(
        (snap.counters.probes_late, snap.counters.probes_lost),
        (1, 1)
    );
    assert!(matches!(
        a.handle_probe_reply(pa, &reply, late + MS),
        Err(patronus_core::ProbeError::Duplicate(0))
    ));
}

#[test]
fn a_more_specific_peer_prefix_reroutes_cached_flows() {
    let t0 = std::time::Instant::now();
    let mut e = patronus_core::Engine::new(EngineConfig::default(), t0).unwrap();
    let wide = e.add_peer("hub", &["10.0.0.0/8".parse().unwrap()]).unwrap();
    let l = link("mpls", LinkKind::Mpls);
    let hub_path = e.add_path(wide, &l, &l, t0).unwrap();
    let mut b = patronus_core::Engine::new(
        EngineConfig {
            instance: 9,
            ..EngineConfig::default()
        },
        t0,
    )
    .unwrap();
    let back = b.add_peer("a", &["10.1.0.0/16".parse().unwrap()]).unwrap();
    let bp = b.add_path(back, &l, &l, t0).unwrap();
    e.handle_timeout(t0);
    let probe = e.poll_transmit().unwrap();
    let reply = b
        .handle_probe_request(bp, &probe.payload, 64, t0, t0)
        .unwrap();
    e.handle_probe_reply(hub_path, &reply, t0 + MS).unwrap();
    let pkt = patronus_core::packet::ipv4_header([10, 1, 0, 1], [10, 2, 0, 1], 17, 1, 2, 0);
    let meta = patronus_core::PacketMeta::parse(&pkt).unwrap();
    assert_eq!(e.decide(&meta, 100, t0 + MS), Decision::Send(hub_path));
    e.add_peer("b", &["10.2.0.0/16".parse().unwrap()]).unwrap();
    // Peer b has no live path yet: the flow is now b's, and has nowhere to go.
    assert_eq!(
        e.decide(&meta, 100, t0 + 2 * MS),
        Decision::Drop(patronus_core::DropReason::NoPath)
    );
    assert_eq!(
        e.path(hub_path, t0 + 2 * MS).unwrap().flows,
        0,
        "the hub path released it"
    );
}

#[test]
fn a_reply_with_a_lying_reflector_clock_is_refused() {
    let (mut a, mut b, pa, pb, t0) = engine_pair();
    let (_, honest) = first_exchange(&mut a, &mut b, pb, t0, t0 + 5 * MS);
    let mut r = patronus_core::probe::ProbeReply::decode(&honest).unwrap();
    // The reflector claims it held the probe 50 ms, longer than the whole 10 ms round trip.
    r.t3 = patronus_core::probe::NtpTime::from_duration(Duration::from_millis(60));
    r.t2 = patronus_core::probe::NtpTime::from_duration(Duration::from_millis(10));
    let err = a
        .handle_probe_reply(pa, &r.encode(), t0 + 10 * MS)
        .unwrap_err();
    assert!(
        matches!(err, patronus_core::ProbeError::BadTimestamps { .. }),
        "{err}"
    );
    assert_eq!(a.path(pa, t0 + 10 * MS).unwrap().state, PathState::Down);
}

#[test]
fn idle_flows_expire_and_a_full_table_still_forwards() {
    let cfg = EngineConfig {
        flow_capacity: 2,
        flow_idle_timeout: 10 * SEC,
        ..EngineConfig::default()
    };
    let mut net = two_sites(&cfg);
    net.run_for(2 * SEC);
    let s: Vec<usize> = (0..3)
        .map(|i| net.stream("a", "b", UDP, 100 + i, 0, 10))
        .collect();
    net.run_for(SEC);
    assert_eq!(net.engine("a").flow_count(), 2);
    assert!(net.engine("a").stats().flow_table_full > 0);
    // The uncached flow is still forwarded, on the same path as the others.
    let r = net.report(s[2], 2 * SEC, 2500 * MS);
    assert_eq!((r.lost, r.sent), (0, 5));
    for &i in &s {
        net.streams[i].stop_at = Some(net.now);
    }
    net.run_for(15 * SEC);
    assert_eq!(net.engine("a").flow_count(), 0);
    assert_eq!(net.engine("a").stats().flows_expired, 2);
    let snap = net
        .engine("a")
        .path(net.path("a", "mpls", "b", "mpls"), net.now)
        .unwrap();
    assert_eq!(snap.flows, 0, "expired flows release their paths");
}

#[test]
fn a_full_sized_table_expires_idle_flows_within_a_quarter_timeout_of_their_idle_time() {
    // The default table (524,288 slots) is swept in 64 runs spread over each quarter timeout.
    let cfg = EngineConfig {
        flow_idle_timeout: 8 * SEC,
        ..EngineConfig::default()
    };
    let mut net = two_sites(&cfg);
    net.run_for(2 * SEC);
    let s: Vec<usize> = (0..50)
        .map(|i| net.stream("a", "b", UDP, 100 + i, 0, 10))
        .collect();
    net.run_for(SEC);
    assert_eq!(net.engine("a").flow_count(), 50);
    for &i in &s {
        net.streams[i].stop_at = Some(net.now);
    }
    // Idle for less than the timeout: kept.
    net.run_for(7 * SEC);
    assert_eq!(net.engine("a").flow_count(), 50);
    // Past it by a quarter timeout (plus the second the table's clock rounds to): gone.
    net.run_for(4 * SEC);
    assert_eq!(net.engine("a").flow_count(), 0);
    assert_eq!(net.engine("a").stats().flows_expired, 50);
}

#[test]
fn a_policy_change_reclassifies_flows_and_keeps_those_whose_path_still_fits() {
    let mut net = two_sites(&EngineConfig::default());
    net.run_for(2 * SEC);
    let voice = net.stream("a", "b", UDP, 5004, 46, 50);
    let web = net.stream("a", "b", TCP, 443, 0, 50);
    net.run_for(SEC);
    let key = net.streams[voice].meta.key;
    let business = net.engine("a").class_id("business").unwrap();
    assert_eq!(net.engine("a").flow_class(&key), Some((business, None)));
    net.engine_mut("a")
        .set_policies(vec![policy("voice 10 realtime best-quality udp 5004")])
        .unwrap();
    net.run_for(SEC);
    let realtime = net.engine("a").class_id("realtime").unwrap();
    let (class, name) = net.engine("a").flow_class(&key).unwrap();
    assert_eq!((class, name.map(|n| n.as_str())), (realtime, Some("voice")));
    assert!(
        moves(&net, "a").is_empty(),
        "both flows' path still meets their class"
    );
    assert_eq!(current_path(&net, web), current_path(&net, voice));
    let bad = policy("x 10 nosuchclass best-quality udp 1");
    assert!(net.engine_mut("a").set_policies(vec![bad]).is_err());
}

#[test]
fn a_source_belongs_to_the_peer_with_the_longest_prefix_for_it() {
    // What the edge checks decrypted packets against: a hub announcing 10/8 may not send from
    // a spoke's 10.2/16, nor from the spoke's overlay address inside 10/8.
    let t0 = std::time::Instant::now();
    let mut e = patronus_core::Engine::new(EngineConfig::default(), t0).unwrap();
    let hub = e.add_peer("hub", &["10.0.0.0/8".parse().unwrap()]).unwrap();
    let spoke = e
        .add_peer(
            "spoke",
            &[
                "10.2.0.0/16".parse().unwrap(),
                "10.255.0.2/32".parse().unwrap(),
            ],
        )
        .unwrap();
    let at = |s: &str| e.peer_for(s.parse().unwrap());
    assert_eq!(at("10.2.3.4"), Some(spoke));
    assert_eq!(at("10.255.0.2"), Some(spoke));
    assert_eq!(at("10.3.0.1"), Some(hub));
    assert_eq!(at("192.168.0.1"), None);
    assert_eq!(at("::1"), None);
}

#[test]
fn removing_a_peer_unroutes_its_prefixes_and_leaves_the_other_peers_flows_on_their_paths() {
    use patronus_api::{Link, Prefix};
    use patronus_core::engine::Engine;
    use patronus_core::packet::{FlowKey, PacketMeta};
    let now = std::time::Instant::now();
    let mut e = Engine::new(EngineConfig::default(), now).unwrap();
    let local = Link::new(Name::new("mpls").unwrap(), LinkKind::Mpls);
    let remote = Link::new(Name::new("mpls").unwrap(), LinkKind::Mpls);
    let b = e
        .add_peer("b", &["10.2.0.0/16".parse::<Prefix>().unwrap()])
        .unwrap();
    let c = e
        .add_peer("c", &["10.3.0.0/16".parse::<Prefix>().unwrap()])
        .unwrap();
    let pb = e.add_path(b, &local, &remote, now).unwrap();
    let pc = e.add_path(c, &local, &remote, now).unwrap();
    let meta = |dst: &str| PacketMeta {
        key: FlowKey::new(
            "10.1.0.10".parse().unwrap(),
            dst.parse().unwrap(),
            UDP,
            4000,
            5000,
        ),
        dscp: 0,
    };
    use patronus_core::DropReason::{NoPath, NoRoute};
    // Paths start Down (no probe has come back): routed, but no live path yet.
    assert_eq!(
        e.decide(&meta("10.2.0.10"), 100, now),
        Decision::Drop(NoPath)
    );
    e.remove_peer(b);
    assert_eq!(
        e.decide(&meta("10.2.0.10"), 100, now),
        Decision::Drop(NoRoute)
    );
    assert_eq!(e.peer_for("10.2.0.10".parse().unwrap()), None);
    assert!(e.path(pb, now).is_none());
    assert_eq!(e.peer_for("10.3.0.10".parse().unwrap()), Some(c));
    assert!(e.path(pc, now).is_some());
    assert_eq!(
        e.decide(&meta("10.3.0.10"), 100, now),
        Decision::Drop(NoPath)
    );
    // The prefix can be given to a new peer, whose path is a new one.
    let b2 = e
        .add_peer("b", &["10.2.0.0/16".parse::<Prefix>().unwrap()])
        .unwrap();
    let pb2 = e.add_path(b2, &local, &remote, now).unwrap();
    assert_ne!(pb2, pb);
    assert_eq!(e.peer_for("10.2.0.10".parse().unwrap()), Some(b2));
    assert_eq!(
        e.decide(&meta("10.2.0.10"), 100, now),
        Decision::Drop(NoPath)
    );
}

#[test]
fn sla_classes_and_failover_settings_change_in_a_running_engine_without_a_restart() {
    let cfg = config_with(vec![
        policy("voice 10 realtime best-quality udp 5004"),
        policy("web 20 business best-quality tcp 443"),
    ]);
    let mut net = two_sites(&cfg);
    // The MPLS link jitters a little (RFC 3550 jitter of a few ms): within every class.
    net.impair("a", "mpls", |i| i.jitter = 6 * MS);
    net.run_for(2 * SEC);
    let voice = net.stream("a", "b", UDP, 5004, 46, 50);
    let web = net.stream("a", "b", TCP, 443, 0, 50);
    net.run_for(2 * SEC);
    let primary = net.path("a", "mpls", "b", "mpls");
    assert_eq!(current_path(&net, voice), Some(primary));
    assert_eq!(current_path(&net, web), Some(primary));

    // A refused change changes nothing: the class a policy names must exist.
    let classes = patronus_api::SlaClass::builtins();
    let failover = patronus_api::FailoverSettings::default();
    let now = net.now;
    let e = net.engine_mut("a").reconfigure(
        failover.clone(),
        classes.clone(),
        Name::new("nosuch").unwrap(),
        SteeringMode::BestQuality,
        cfg.policies.clone(),
        now,
    );
    assert!(e.is_err());
    assert!(net.engine("a").class_id("realtime").is_some());

    // Realtime now bounds jitter at 1 ms, and a new class joins with a policy naming it; the
    // settings ask for a wider margin. The MPLS path breaks realtime at once: voice moves on
    // its next packet; web (business has no jitter bound) stays; no path goes down.
    let mut classes = classes;
    classes[0].max_jitter_ms = Some(1);
    classes.push(patronus_api::SlaClass {
        name: Name::new("gold").unwrap(),
        description: String::new(),
        max_latency_ms: Some(100),
        max_jitter_ms: None,
        max_loss_pct: Some(0.5),
    });
    let mut policies = cfg.policies.clone();
    policies.push(policy("ssh 30 gold best-quality tcp 22"));
    let failover = patronus_api::FailoverSettings {
        min_improvement_pct: 20,
        ..failover
    };
    let (at, now) = (net.elapsed(), net.now);
    net.engine_mut("a")
        .reconfigure(
            failover,
            classes,
            Name::new("business").unwrap(),
            SteeringMode::BestQuality,
            policies,
            now,
        )
        .unwrap();
    net.run_for(2 * SEC);
    let realtime = net.engine("a").class_id("realtime").unwrap();
    let violated = net.events("a").into_iter().any(|(t, e)| {
        matches!(e, Event::SlaViolated { path, class, .. } if path == primary && class == realtime)
            && t >= at
    });
    assert!(violated, "the jittery path breaks the new bound");
    let vm = moves_of(&net, "a", voice);
    assert_eq!(vm.len(), 1, "{vm:?}");
    assert_eq!((vm[0].1, vm[0].3), (primary, MoveReason::SlaViolated));
    assert!(vm[0].0 - at < 100 * MS, "{vm:?}");
    assert_eq!(current_path(&net, web), Some(primary));
    assert!(moves_of(&net, "a", web).is_empty());
    assert!(downs(&net, "a", primary).is_empty());
    let ssh = net.stream("a", "b", TCP, 22, 0, 50);
    net.run_for(SEC);
    let key = net.streams[ssh].meta.key;
    let (class, name) = net.engine("a").flow_class(&key).unwrap();
    assert_eq!(
        (
            net.engine("a").class_name(class).map(|n| n.as_str()),
            name.map(|n| n.as_str())
        ),
        (Some("gold"), Some("ssh"))
    );
}

#[test]
fn each_class_counts_what_its_flows_sent_once_even_when_duplicated() {
    let cfg = config_with(vec![
        policy("voice 10 realtime duplicate udp 5004"),
        policy("web 20 business best-quality tcp 443"),
    ]);
    let mut net = two_sites(&cfg);
    net.run_for(2 * SEC);
    let voice = net.stream("a", "b", UDP, 5004, 46, 50);
    let web = net.stream("a", "b", TCP, 443, 0, 20);
    net.run_for(2 * SEC);
    let counted: std::collections::HashMap<String, (u64, u64)> = net
        .engine("a")
        .class_counters()
        .map(|(n, p, b, _)| (n.to_string(), (p, b)))
        .collect();
    let sent = |s: usize| net.streams[s].sent.len() as u64;
    assert_eq!(counted["realtime"], (sent(voice), 200 * sent(voice)));
    assert_eq!(counted["business"], (sent(web), 200 * sent(web)));
    assert_eq!(counted["bulk"], (0, 0));
}

#[test]
fn a_peer_that_only_echoes_is_measured_by_round_trip_with_its_whole_variation_as_jitter() {
    // A stock WireGuard peer answers probes sent as ICMP echo requests by echoing them: no
    // timestamps of its own. Round trips alternate 20 and 30 ms.
    let (mut a, _b, pa, _pb, t0) = engine_pair();
    let mut now = t0;
    let mut answered = 0;
    for _ in 0..200u32 {
        a.handle_timeout(now);
        while let Some(tx) = a.poll_transmit() {
            if tx.path != pa {
                continue;
            }
            let rtt = if answered % 2 == 0 { 20 * MS } else { 30 * MS };
            a.handle_echo_reply(pa, &tx.payload, now + rtt).unwrap();
            answered += 1;
            if answered == 1 {
                let s = a.path(pa, now + rtt).unwrap();
                assert_eq!(s.state, PathState::Up);
                assert_eq!(s.rtt, Some(rtt), "the first round trip, exactly");
            }
            // The same echo again is a duplicate, and garbage is refused: neither changes
            // anything.
            assert!(matches!(
                a.handle_echo_reply(pa, &tx.payload, now + rtt + MS),
                Err(patronus_core::ProbeError::Duplicate(_))
            ));
            assert!(a.handle_echo_reply(pa, &[0u8; 60], now + rtt).is_err());
        }
        now = a.poll_timeout().unwrap().max(now + MS);
    }
    let s = a.path(pa, now).unwrap();
    assert!(answered > 100, "{answered}");
    assert_eq!(s.state, PathState::Up);
    assert_eq!(s.loss, 0.0);
    let rtt = s.rtt.unwrap();
    assert!(rtt > 20 * MS && rtt < 30 * MS, "{rtt:?}");
    // RFC 3550 jitter of a transit that alternates by 10 ms converges on 10 ms: all of the
    // round trip's variation, none hidden by splitting it between the directions.
    assert!(
        s.jitter > Duration::from_micros(9_500) && s.jitter <= 10 * MS,
        "{:?}",
        s.jitter
    );
}

/// Whether `e` is a change of path `path` (its state or an SLA class).
fn changes(e: &Event, path: PathId) -> bool {
    match e {
        Event::PathUp { path: p, .. }
        | Event::PathDown { path: p, .. }
        | Event::SlaViolated { path: p, .. }
        | Event::SlaRestored { path: p, .. } => *p == path,
        Event::FlowMoved { .. } => false,
    }
}

/// Reported changes (`poll_report`) of a site about one path.
fn reported_of(net: &Net, site: &str, path: PathId) -> Vec<(Duration, Event)> {
    net.reported(site)
        .into_iter()
        .filter(|(_, e)| changes(e, path))
        .collect()
}

/// Internal changes of a site about one path (what steering acted on).
fn internal_of(net: &Net, site: &str, path: PathId) -> usize {
    net.events(site)
        .into_iter()
        .filter(|(_, e)| changes(e, path))
        .count()
}

#[test]
fn a_one_way_failure_is_detected_by_both_ends_as_fast_as_a_cut_while_data_flows_the_other_way() {
    let mut net = two_sites(&EngineConfig::default());
    net.run_for(2 * SEC);
    let ab = net.stream("a", "b", UDP, 5004, 46, 100);
    let ba = net.stream("b", "a", UDP, 5004, 46, 100);
    net.run_for(3 * SEC);
    let (pa, pb) = (
        net.path("a", "mpls", "b", "mpls"),
        net.path("b", "mpls", "a", "mpls"),
    );
    assert_eq!(current_path(&net, ab), Some(pa));
    assert_eq!(current_path(&net, ba), Some(pb));

    // A's MPLS upstream dies; its downstream works, and B's stream keeps arriving on it.
    let cut = net.elapsed();
    net.impair_egress("a", "mpls", |i| i.blackhole = true);
    net.run_for(2 * SEC);

    // A, whose sending direction died, no longer takes B's data as proof of life: it is
    // detected like a hard cut (the cut test's bound: detection time plus a probe interval).
    let down_a = downs(&net, "a", pa);
    assert_eq!(down_a.len(), 1, "{down_a:?}");
    assert!(down_a[0] - cut <= 80 * MS, "a: {:?}", down_a[0] - cut);
    // B, whose probes A still answers but whose answers die, and whose own requests A no longer
    // hears from, detects it too.
    let down_b = downs(&net, "b", pb);
    assert_eq!(down_b.len(), 1, "{down_b:?}");
    assert!(down_b[0] - cut <= 80 * MS, "b: {:?}", down_b[0] - cut);
    // The stream in the dead direction is out for as long as after a cut; the other one
    // loses nothing (its direction works until B moves it).
    let r = net.report(ab, cut - SEC, net.elapsed() - SEC);
    assert!(r.outage <= 90 * MS, "{r:?}");
    let r = net.report(ba, cut - SEC, net.elapsed() - SEC);
    assert_eq!(r.lost, 0, "{r:?}");
}

#[test]
fn an_edge_that_stalls_for_250ms_blames_no_path_and_its_peer_moves_no_flow() {
    let mut net = two_sites(&EngineConfig::default());
    net.run_for(2 * SEC);
    let ab = net.stream("a", "b", UDP, 5004, 46, 100);
    let ba = net.stream("b", "a", UDP, 5004, 46, 100);
    net.run_for(3 * SEC);
    let before = (net.events("a").len(), net.events("b").len());

    // A's process stops for 250 ms (SIGSTOP) on a healthy network.
    net.stall("a", 250 * MS);
    net.run_for(2 * SEC);
    for (site, n) in [("a", before.0), ("b", before.1)] {
        let after: Vec<_> = net.events(site).into_iter().skip(n).collect();
        assert!(after.is_empty(), "{site}: {after:#?}");
    }
    // A knew it was late; B saw its whole peer fall silent and held the path.
    let sa = net.engine("a").stats();
    assert_eq!(sa.late_wakeups, 1, "{sa:?}");
    assert!(sa.late_max >= 200 * MS, "{sa:?}");
    assert!(net.engine("b").stats().peer_silences >= 1);
    let pa = net.path("a", "mpls", "b", "mpls");
    assert_eq!(current_path(&net, ab), Some(pa));
    assert_eq!(
        current_path(&net, ba),
        Some(net.path("b", "mpls", "a", "mpls"))
    );

    // A longer stall (400 ms) holds B's standby paths too (their detection time is 300 ms);
    // when A answers again, each path's held replies come back after that path's own delay
    // (10 ms on MPLS, 20 ms on broadband): the slower paths are not blamed for the difference.
    let before = (net.events("a").len(), net.events("b").len());
    net.stall("a", 400 * MS);
    net.run_for(2 * SEC);
    for (site, n) in [("a", before.0), ("b", before.1)] {
        let after: Vec<_> = net.events(site).into_iter().skip(n).collect();
        assert!(after.is_empty(), "{site}: {after:#?}");
    }

    // A real cut during a stall is still detected, one detection time after the stall ends.
    net.stall("a", 250 * MS);
    net.run_for(100 * MS);
    net.cut("a", "mpls");
    net.run_for(150 * MS);
    let resumed = net.elapsed();
    net.run_for(2 * SEC);
    let down_a = downs(&net, "a", pa);
    assert_eq!(down_a.len(), 1, "{down_a:?}");
    assert!(
        down_a[0] >= resumed && down_a[0] - resumed <= 80 * MS,
        "a: {:?} after the stall",
        down_a[0].checked_sub(resumed)
    );
    // B, which held the path while all of A was silent, lets go as soon as A's other link
    // answers.
    let down_b = downs(&net, "b", net.path("b", "mpls", "a", "mpls"));
    assert_eq!(down_b.len(), 1, "{down_b:?}");
    assert!(
        down_b[0] - resumed <= 80 * MS,
        "b: {:?}",
        down_b[0] - resumed
    );
    assert_ne!(current_path(&net, ab), Some(pa));
}

#[test]
fn a_link_at_30pct_loss_for_a_minute_reports_a_handful_of_changes_while_flows_leave_it() {
    let cfg = config_with(vec![policy("voice 10 realtime best-quality udp 5004")]);
    let mut net = two_sites(&cfg);
    net.run_for(2 * SEC);
    let ab = net.stream("a", "b", UDP, 5004, 46, 50);
    let ba = net.stream("b", "a", UDP, 5004, 46, 50);
    net.run_for(3 * SEC);
    let lossy = [
        ("a", net.path("a", "mpls", "b", "mpls")),
        ("a", net.path("a", "mpls", "b", "inet")),
        ("b", net.path("b", "mpls", "a", "mpls")),
        ("b", net.path("b", "inet", "a", "mpls")),
    ];
    let before: Vec<usize> = lossy
        .iter()
        .map(|(s, p)| reported_of(&net, s, *p).len())
        .collect();
    let internal_before: Vec<usize> = lossy
        .iter()
        .map(|(s, p)| internal_of(&net, s, *p))
        .collect();

    net.impair("a", "mpls", |i| i.loss = 0.3);
    let start = net.elapsed();
    net.run_for(60 * SEC);

    let mut reported = 0;
    let mut internal = 0;
    for (i, (site, p)) in lossy.iter().enumerate() {
        let r: Vec<_> = reported_of(&net, site, *p)
            .into_iter()
            .skip(before[i])
            .collect();
        println!(
            "{site} {}: {} reported, {} internal: {r:?}",
            net.path_name(site, *p),
            r.len(),
            internal_of(&net, site, *p) - internal_before[i]
        );
        // The bound: reported Down once, each of the 4 classes reported broken once, and two
        // more (Up, then Down or a broken class) per reported Up, which needs the path up for
        // its damped hold-down (5 s, then 10 s, 20 s...): in a minute of failures, one at most.
        assert!(
            r.len() <= 1 + 4 + 2,
            "{site} {}: {r:#?}",
            net.path_name(site, *p)
        );
        reported += r.len();
        internal += internal_of(&net, site, *p) - internal_before[i];
    }
    // Steering saw every change; the reports are a handful.
    println!("reported {reported}, internal {internal}");
    assert!(
        internal > 3 * reported,
        "{internal} internal, {reported} reported"
    );
    // Flows left the lossy link and stayed off.
    for (s, site) in [(ab, "a"), (ba, "b")] {
        let runs = net.path_runs(s);
        let last = runs.last().unwrap().1.unwrap();
        assert!(!net.path_name(site, last).contains("mpls>mpls"), "{runs:?}");
        let tail: Vec<_> = runs.iter().filter(|(t, _)| *t > start + 5 * SEC).collect();
        assert!(tail.len() <= 1, "{site}: {tail:?}");
    }
}
