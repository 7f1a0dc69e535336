//! Fuzzes the edge's reading of bytes from the network (`patronus_edge::wire`): `classify`, which
//! picks the session of a datagram nobody has authenticated yet, and `inspect` and `source`,
//! which read a packet that came out of a tunnel. None may panic; what they return must be what
//! the bytes say (checked by reading the bytes here, independently); and the probe packets the
//! edge writes, with addresses, ports and payload from the input, must read back as themselves.
#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use libfuzzer_sys::fuzz_target;
use patronus_core::probe::STAMP_PORT;
use patronus_edge::wire::{
    self, Inner, PROBE_ECHO_ID, PROBE_SENDER_PORT, WgMessage, echo_request, udp_packet,
};

fuzz_target!(|data: &[u8]| {
    classified(data);
    // As addressed to the packet's own destination (so that every branch past the address
    // check is reached), and to an address it does not carry.
    let own = match data.first().map(|b| b >> 4) {
        Some(4) if data.len() >= 20 => Some(IpAddr::from(v4(&data[16..20]))),
        Some(6) if data.len() >= 40 => Some(IpAddr::from(v6(&data[24..40]))),
        _ => None,
    };
    for overlay in own.into_iter().chain([IpAddr::from([10, 255, 0, 1])]) {
        inspected(data, overlay);
    }
    built_and_read_back(data);
});

fn v4(b: &[u8]) -> Ipv4Addr {
    Ipv4Addr::new(b[0], b[1], b[2], b[3])
}

fn v6(b: &[u8]) -> Ipv6Addr {
    let mut a = [0u8; 16];
    a.copy_from_slice(&b[..16]);
    Ipv6Addr::from(a)
}

fn classified(d: &[u8]) {
    let le = |at: usize| u32::from_le_bytes([d[at], d[at + 1], d[at + 2], d[at + 3]]);
    match wire::classify(d) {
        Some(WgMessage::Initiation) => assert!(d[..4] == [1, 0, 0, 0] && d.len() == 148),
        Some(WgMessage::ToSession(index)) => {
            assert_eq!(d[1..4], [0, 0, 0]);
            let at = match (d[0], d.len()) {
                (2, 92) => 8,
                (3, 64) => 4,
                (4, n) if n >= 32 => 4,
                _ => panic!("type {} of {} bytes named a session", d[0], d.len()),
            };
            assert_eq!(index, le(at));
            assert_eq!(wire::tunnel_of(index), index >> 8);
        }
        None => {}
    }
}

/// Whether `part` is the tail of `whole` (the same bytes, not a copy).
fn is_tail(whole: &[u8], part: &[u8]) -> bool {
    part.len() <= whole.len()
        && std::ptr::eq(part.as_ptr(), whole[whole.len() - part.len()..].as_ptr())
}

fn inspected(d: &[u8], overlay: IpAddr) {
    let port = |at: usize| u16::from_be_bytes([d[at], d[at + 1]]);
    // The transport header's offset, as the packet's own header gives it.
    let l4 = || match d[0] >> 4 {
        4 => usize::from(d[0] & 0x0f) * 4,
        _ => 40,
    };
    match wire::inspect(d, overlay) {
        Inner::ProbeRequest {
            payload,
            from,
            sport,
            ttl,
        } => {
            let at = l4();
            assert!(is_tail(d, payload) && payload.len() + 8 == d.len() - at);
            assert_eq!(Some(from), wire::source(d));
            assert_eq!((sport, port(at + 2)), (port(at), STAMP_PORT));
            assert_eq!(ttl, if d[0] >> 4 == 4 { d[8] } else { d[7] });
        }
        Inner::ProbeReply { payload } => {
            let at = l4();
            assert!(is_tail(d, payload) && payload.len() + 8 == d.len() - at);
            assert_eq!((port(at), port(at + 2)), (STAMP_PORT, PROBE_SENDER_PORT));
        }
        Inner::EchoReply { payload } => {
            let at = l4();
            assert!(is_tail(d, payload) && payload.len() + 8 == d.len() - at);
            assert_eq!(port(at + 4), PROBE_ECHO_ID);
        }
        Inner::Data => {}
    }
}

/// A probe request, a probe reply and an echoed probe, written by the edge from the input's
/// first bytes (addresses, ports, sequence) with the rest as payload, read back as such.
fn built_and_read_back(d: &[u8]) {
    if d.len() < 40 {
        return;
    }
    let (head, payload) = d.split_at(40);
    // The most an IPv4 packet carries over UDP.
    if payload.len() > 65_507 {
        return;
    }
    let family_v6 = head[0] & 1 == 1;
    let (a, b): (IpAddr, IpAddr) = if family_v6 {
        (v6(&head[1..17]).into(), v6(&head[17..33]).into())
    } else {
        (v4(&head[1..5]).into(), v4(&head[5..9]).into())
    };
    if a == b {
        return;
    }
    let sport = u16::from_be_bytes([head[33], head[34]]);
    let seq = u16::from_be_bytes([head[35], head[36]]);
    let mut buf = Vec::new();

    udp_packet(a, b, sport, STAMP_PORT, payload, &mut buf).expect("one family");
    assert_eq!(wire::source(&buf), Some(a));
    assert_eq!(
        wire::inspect(&buf, b),
        Inner::ProbeRequest {
            payload,
            from: a,
            sport,
            ttl: 64
        }
    );
    assert_eq!(wire::inspect(&buf, a), Inner::Data, "not addressed to a");

    udp_packet(b, a, STAMP_PORT, PROBE_SENDER_PORT, payload, &mut buf).expect("one family");
    assert_eq!(wire::inspect(&buf, a), Inner::ProbeReply { payload });

    // The peer's IP stack answers an echo request: addresses swapped, type echo reply, the
    // identifier, sequence and data unchanged.
    echo_request(a, b, seq, payload, &mut buf).expect("one family");
    assert_eq!(
        wire::inspect(&buf, b),
        Inner::Data,
        "a request is the kernel's"
    );
    let (src, dst, at, reply) = if family_v6 {
        (8..24, 24..40, 40, 129)
    } else {
        (12..16, 16..20, 20, 0)
    };
    let from = buf[src.clone()].to_vec();
    let to = buf[dst.clone()].to_vec();
    buf[src].copy_from_slice(&to);
    buf[dst].copy_from_slice(&from);
    buf[at] = reply;
    assert_eq!(wire::inspect(&buf, a), Inner::EchoReply { payload });

    // Over mismatched families nothing is written.
    let other: IpAddr = if family_v6 {
        Ipv4Addr::LOCALHOST.into()
    } else {
        Ipv6Addr::LOCALHOST.into()
    };
    assert!(udp_packet(a, other, sport, STAMP_PORT, payload, &mut buf).is_none());
    assert!(echo_request(a, other, seq, payload, &mut buf).is_none());
}
