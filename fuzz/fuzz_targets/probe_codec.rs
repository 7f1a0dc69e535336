//! Fuzzes everything that reads bytes from the network in the path engine: the probe codec
//! (request, reply, reflector), the IP header parser, and an engine fed the input as a probe
//! reply, an echoed probe, a probe request and a packet to decide. None may panic; whatever decodes must
//! re-encode to something that decodes the same.
#![no_main]

use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use patronus_api::{Link, LinkKind, Name};
use patronus_core::probe::{NtpTime, ProbeReply, ProbeRequest, reflect};
use patronus_core::{Engine, EngineConfig, PacketMeta, PathId};

fuzz_target!(|data: &[u8]| {
    if let Ok(r) = ProbeRequest::decode(data) {
        assert_eq!(ProbeRequest::decode(&r.encode()), Ok(r));
    }
    if let Ok(r) = ProbeReply::decode(data) {
        assert_eq!(ProbeReply::decode(&r.encode()), Ok(r));
    }
    let _ = reflect(data, NtpTime(1), NtpTime(2), 64);

    let now = Instant::now();
    // A small flow table: the table is made at its full size, and one is made per input.
    let config = EngineConfig {
        flow_capacity: 64,
        ..EngineConfig::default()
    };
    let mut engine = Engine::new(config, now).expect("the configuration is valid");
    let peer = engine
        .add_peer("b", &["10.2.0.0/16".parse().expect("a valid prefix")])
        .expect("a fresh engine takes a peer");
    let link = Link::new(Name::new("mpls").expect("a valid name"), LinkKind::Mpls);
    let path = engine
        .add_path(peer, &link, &link, now)
        .expect("a fresh peer takes a path");
    engine.handle_timeout(now);
    let _ = engine.handle_probe_reply(path, data, now + Duration::from_millis(5));
    let _ = engine.handle_probe_reply(PathId(7), data, now);
    let _ = engine.handle_echo_reply(path, data, now + Duration::from_millis(6));
    let _ = engine.handle_echo_reply(PathId(7), data, now);
    let _ = engine.handle_probe_request(path, data, 64, now, now + Duration::from_millis(1));
    if let Ok(meta) = PacketMeta::parse(data) {
        let _ = engine.decide(&meta, data.len(), now);
    }
});
