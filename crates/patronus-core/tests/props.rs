//! Property tests: the probe codec and the packet parser on arbitrary bytes, the classifier
//! against its reference model, and selector invariants on random networks.

#![allow(clippy::unwrap_used)] // test code: a panic is a failed test with a line number

mod sim;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use patronus_api::{
    Dscp, LinkKind, Match, Name, Policy, PortRange, Prefix, Protocol, SteeringMode,
};
use patronus_core::classify::{Classifier, matches};
use patronus_core::probe::{NtpTime, ProbeReply, ProbeRequest, reflect};
use patronus_core::{Decision, DropReason, EngineConfig, FlowKey, PacketMeta, PathState};
use proptest::prelude::*;
use sim::{MS, Net, SiteSpec, link};

fn request() -> impl Strategy<Value = ProbeRequest> {
    (
        any::<u32>(),
        any::<u64>(),
        any::<u32>(),
        any::<u32>(),
        prop::option::of(0..u32::MAX - 1),
        any::<bool>(),
    )
        .prop_map(
            |(seq, t1, path, instance, heard, reads_heard)| ProbeRequest {
                seq,
                t1: NtpTime(t1),
                path,
                instance,
                heard: heard.map(|us| Duration::from_micros(u64::from(us))),
                reads_heard,
            },
        )
}

proptest! {
    #[test]
    fn probe_requests_and_replies_round_trip(r in request(), t2 in any::<u64>(), t3 in any::<u64>(), ttl in any::<u8>()) {
        let bytes = r.encode();
        prop_assert_eq!(ProbeRequest::decode(&bytes), Ok(r));
        let reply = reflect(&bytes, NtpTime(t2), NtpTime(t3), ttl).unwrap();
        let back = ProbeReply::decode(&reply).unwrap();
        // A reply echoes neither what the sender heard nor whether it reads that.
        let echoed = ProbeRequest { heard: None, reads_heard: false, ..r };
        prop_assert_eq!(back, ProbeReply { request: echoed, t2: NtpTime(t2), t3: NtpTime(t3), sender_ttl: ttl, reads_heard: true });
        prop_assert_eq!(back.encode(), reply);
    }

    #[test]
    fn arbitrary_bytes_never_panic_the_codec_and_what_decodes_re_encodes(bytes in prop::collection::vec(any::<u8>(), 0..80)) {
        if let Ok(r) = ProbeRequest::decode(&bytes) {
            prop_assert_eq!(ProbeRequest::decode(&r.encode()), Ok(r));
        }
        if let Ok(r) = ProbeReply::decode(&bytes) {
            prop_assert_eq!(ProbeReply::decode(&r.encode()), Ok(r));
        }
        let _ = reflect(&bytes, NtpTime(1), NtpTime(2), 64);
    }

    #[test]
    fn a_valid_request_with_one_flipped_bit_is_refused_or_decodes_to_something_else(r in request(), bit in 0usize..480) {
        let mut bytes = r.encode();
        bytes[bit / 8] ^= 1 << (bit % 8);
        // Flipping a bit of a field gives another valid request; flipping a bit of the framing
        // (MBZ, TLV type, length, version, kind, SSID) is refused. Never the same request.
        // Only the error estimate (bytes 12..14) and the TLV flags (byte 44) but its lowest
        // bit (FLAG_HEARD), which a reflector may set, are ignored.
        let ignored = (12..14).contains(&(bit / 8)) || (bit / 8 == 44 && bit % 8 != 0);
        if !ignored {
            prop_assert_ne!(ProbeRequest::decode(&bytes), Ok(r));
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic_the_packet_parser(bytes in prop::collection::vec(any::<u8>(), 0..120)) {
        let _ = PacketMeta::parse(&bytes);
    }
}

// --- The classifier agrees with the reference model on every rule set and packet. ---

const PREFIXES: [&str; 7] = [
    "10.0.0.0/8",
    "10.1.0.0/16",
    "10.1.2.0/24",
    "10.1.2.3/32",
    "192.168.0.0/16",
    "2001:db8::/32",
    "2001:db8:1::/48",
];
const ADDRS: [&str; 6] = [
    "10.1.2.3",
    "10.1.9.9",
    "10.200.0.1",
    "192.168.1.1",
    "2001:db8:1::5",
    "2001:db8:2::5",
];

fn prefixes() -> impl Strategy<Value = Vec<Prefix>> {
    prop::collection::vec(prop::sample::select(&PREFIXES[..]), 0..3)
        .prop_map(|v| v.into_iter().map(|s| s.parse().unwrap()).collect())
}

fn ports() -> impl Strategy<Value = Vec<PortRange>> {
    prop::collection::vec(
        (0u16..40, 0u16..20).prop_map(|(a, w)| PortRange::new(a, a + w).unwrap()),
        0..3,
    )
}

fn rule() -> impl Strategy<Value = Match> {
    (
        prefixes(),
        prefixes(),
        prop::option::of(prop::sample::select(&[1u8, 6, 17, 58][..])),
        ports(),
        ports(),
        prop::collection::vec(prop::sample::select(&[0u8, 10, 46][..]), 0..2),
    )
        .prop_map(|(src, dst, proto, sp, dp, dscp)| {
            // The API refuses ports on protocols without them; so does the generator.
            let portless = proto.is_some_and(|p| !Protocol(p).has_ports());
            Match {
                src,
                dst,
                protocol: proto.map(Protocol),
                src_ports: if portless { vec![] } else { sp },
                dst_ports: if portless { vec![] } else { dp },
                dscp: dscp.into_iter().map(|d| Dscp::new(d).unwrap()).collect(),
            }
        })
}

fn packet() -> impl Strategy<Value = PacketMeta> {
    (
        prop::sample::select(&ADDRS[..]),
        prop::sample::select(&ADDRS[..]),
        prop::sample::select(&[1u8, 6, 17, 58, 47][..]),
        0u16..60,
        0u16..60,
        prop::sample::select(&[0u8, 10, 46, 63][..]),
    )
        .prop_map(|(s, d, proto, sp, dp, dscp)| {
            let (s, d): (IpAddr, IpAddr) = (s.parse().unwrap(), d.parse().unwrap());
            // Keep families consistent, as real packets are.
            let d = match (s, d) {
                (IpAddr::V4(_), IpAddr::V6(_)) => IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3)),
                (IpAddr::V6(_), IpAddr::V4(_)) => {
                    IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 7))
                }
                _ => d,
            };
            let key = FlowKey::new(
                s,
                d,
                proto,
                if matches!(proto, 6 | 17) { sp } else { 0 },
                if matches!(proto, 6 | 17) { dp } else { 0 },
            );
            PacketMeta { key, dscp }
        })
}

proptest! {
    #[test]
    fn the_classifier_returns_the_first_rule_the_reference_model_matches(
        rules in prop::collection::vec(rule(), 0..80),
        packets in prop::collection::vec(packet(), 1..40),
    ) {
        let c = Classifier::new(&rules.iter().collect::<Vec<_>>());
        for p in &packets {
            let want = rules.iter().position(|r| matches(r, p));
            prop_assert_eq!(c.classify(p), want, "{:?}", p);
        }
    }
}

// --- Selector invariants on random networks. ---

#[derive(Debug, Clone)]
enum Change {
    Cut(usize, usize),
    Restore(usize, usize),
    Loss(usize, usize, f64),
    Delay(usize, usize, u64),
    Wait(u64),
}

fn change() -> impl Strategy<Value = Change> {
    prop_oneof![
        (0usize..3, 0usize..3).prop_map(|(s, l)| Change::Cut(s, l)),
        (0usize..3, 0usize..3).prop_map(|(s, l)| Change::Restore(s, l)),
        (
            0usize..3,
            0usize..3,
            prop::sample::select(&[0.0, 0.05, 0.3, 0.9][..])
        )
            .prop_map(|(s, l, p)| Change::Loss(s, l, p)),
        (0usize..3, 0usize..3, 1u64..80).prop_map(|(s, l, d)| Change::Delay(s, l, d)),
        (50u64..3000).prop_map(Change::Wait),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn the_selector_never_picks_a_down_path_when_a_live_one_exists_nor_a_path_to_another_site(
        links in prop::collection::vec(1usize..=3, 3),
        mode in prop::sample::select(&[SteeringMode::BestQuality, SteeringMode::LowestCost, SteeringMode::LoadBalance, SteeringMode::Duplicate][..]),
        strict in any::<bool>(),
        changes in prop::collection::vec(change(), 1..25),
        seed in any::<u64>(),
    ) {
        let kinds = [LinkKind::Mpls, LinkKind::Broadband, LinkKind::Lte];
        let names = ["x", "y", "z"];
        let specs = ["a", "b", "c"].iter().zip(["10.1.0.0/16", "10.2.0.0/16", "10.3.0.0/16"]).zip(&links)
            .map(|((name, lan), n)| SiteSpec {
                name,
                lan,
                links: (0..*n).map(|i| link(names[i], kinds[i])).collect(),
            })
            .collect();
        let voice = Policy {
            name: Name::new("voice").unwrap(),
            order: 1,
            enabled: true,
            matches: Match { protocol: Some(Protocol::UDP), dst_ports: vec![PortRange::single(5004)], ..Match::default() },
            class: Name::new("realtime").unwrap(),
            steering: mode,
            links: Default::default(),
            strict,
        };
        let cfg = EngineConfig { policies: vec![voice], default_steering: mode, ..EngineConfig::default() };
        let mut net = Net::new(&cfg, specs, 5 * MS, seed);
        let flows = [("a", "b", 5004), ("a", "c", 5004), ("b", "c", 443), ("c", "a", 443)];
        let streams: Vec<usize> = flows.iter().map(|(f, t, port)| net.stream(f, t, 17, *port, 0, 20)).collect();
        for c in changes {
            let link_of = |net: &Net, s: usize, l: usize| (net.site_name(s), names[l % links[s]]);
            match c {
                Change::Cut(s, l) => { let (s, l) = link_of(&net, s, l); net.cut(s, l) }
                Change::Restore(s, l) => { let (s, l) = link_of(&net, s, l); net.restore(s, l) }
                Change::Loss(s, l, p) => { let (s, l) = link_of(&net, s, l); net.impair(s, l, |i| i.loss = p) }
                Change::Delay(s, l, d) => { let (s, l) = link_of(&net, s, l); net.impair(s, l, |i| i.delay = Duration::from_millis(d)) }
                Change::Wait(ms) => net.run_for(Duration::from_millis(ms)),
            }
            for (&s, (from, to, port)) in streams.iter().zip(&flows) {
                let d = net.decide_now(s);
                let engine = net.engine(from);
                for p in d.paths() {
                    prop_assert_eq!(net.peer_site_of(from, p), Some(*to), "a path to another site");
                    let state = engine.path(p, net.now).unwrap().state;
                    prop_assert_ne!(state, PathState::Down, "picked a Down path");
                }
                let any_live = engine.path_ids()
                    .filter(|p| net.peer_site_of(from, *p) == Some(*to))
                    .any(|p| engine.path(p, net.now).unwrap().state != PathState::Down);
                // Every path's flow count is the number of cached flows deciding for it.
                for p in engine.path_ids() {
                    let cached = streams.iter().filter(|&&x| net.streams[x].from == net.site(from))
                        .filter_map(|&x| engine.flow_decision(&net.streams[x].meta.key))
                        .filter(|d| d.paths().any(|q| q == p))
                        .count();
                    prop_assert_eq!(engine.path(p, net.now).unwrap().flows as usize, cached);
                }
                match d {
                    Decision::Drop(DropReason::NoPath) => prop_assert!(!any_live, "dropped although a live path exists"),
                    Decision::Drop(DropReason::SlaUnavailable) => prop_assert!(strict && *port == 5004, "only a strict policy drops for SLA"),
                    Decision::Drop(DropReason::NoRoute) => prop_assert!(false, "every destination has a route"),
                    _ => prop_assert!(any_live),
                }
            }
        }
    }
}
