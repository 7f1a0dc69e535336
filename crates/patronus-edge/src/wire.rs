//! Bytes on the wire: which WireGuard message a datagram is and which tunnel it belongs to, and
//! the overlay packets that carry probes inside a tunnel.
//!
//! # Demultiplexing
//!
//! Every path has its own WireGuard session (`boringtun::noise::Tunn`), created with tunnel index
//! `path id + 1`; boringtun puts that index in the top 24 bits of every session index it hands
//! out. So a handshake response, cookie or data message names its tunnel in its receiver index,
//! whatever socket or address it arrived from (a duplicated packet, sent on a second path under
//! the first path's session, is decrypted by the first path's session, whose replay window then
//! drops the other copy). A handshake initiation names nobody: it belongs to the path of the local
//! link it arrived on and the remote endpoint it came from.
//!
//! # Probes
//!
//! Probes are STAMP packets (see `patronus_core::probe`) in UDP between the two sites' overlay
//! addresses, inside the tunnel of the path they measure: requests go from port
//! [`PROBE_SENDER_PORT`] to port 862, replies come back from 862. To a peer with no reflector (a
//! stock WireGuard host) the same probe bytes are the data of an ICMP echo request with
//! identifier [`PROBE_ECHO_ID`], which the peer's IP stack sends back unchanged.

use std::net::IpAddr;

use patronus_core::probe::STAMP_PORT;

/// The UDP port probes are sent from.
pub const PROBE_SENDER_PORT: u16 = 863;

/// The ICMP echo identifier of probes sent as echo requests (to a peer that has no STAMP
/// reflector): "PT".
pub const PROBE_ECHO_ID: u16 = 0x5054;

/// A WireGuard message, as far as routing it to a tunnel needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WgMessage {
    /// Type 1: belongs to the path it arrived on.
    Initiation,
    /// Types 2, 3 and 4, with their receiver index.
    ToSession(u32),
}

/// Whether a datagram is a STUN Binding answer (success or error: RFC 8489, with the magic
/// cookie), which no WireGuard message can be (their second byte is 0).
pub fn is_stun_answer(d: &[u8]) -> bool {
    d.len() >= 20
        && matches!(
            u16::from_be_bytes([d[0], d[1]]),
            patronus_api::stun::BINDING_SUCCESS | patronus_api::stun::BINDING_ERROR
        )
        && d[4..8] == patronus_api::stun::MAGIC.to_be_bytes()
}

/// Classifies a datagram; `None` for anything that is not a well-formed WireGuard message.
pub fn classify(d: &[u8]) -> Option<WgMessage> {
    let le = |at: usize| -> Option<u32> {
        Some(u32::from_le_bytes(d.get(at..at + 4)?.try_into().ok()?))
    };
    if d.len() < 4 || d[1..4] != [0, 0, 0] {
        return None;
    }
    match (d[0], d.len()) {
        (1, 148) => Some(WgMessage::Initiation),
        (2, 92) => Some(WgMessage::ToSession(le(8)?)),
        (3, 64) => Some(WgMessage::ToSession(le(4)?)),
        (4, n) if n >= 32 => Some(WgMessage::ToSession(le(4)?)),
        _ => None,
    }
}

/// The tunnel index a session index belongs to.
pub fn tunnel_of(receiver: u32) -> u32 {
    receiver >> 8
}

/// Adds `data` to a one's-complement sum (RFC 1071); all but the last piece summed must have
/// an even length.
fn add(mut sum: u32, data: &[u8]) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u32::from(*last) << 8;
    }
    sum
}

/// Folds and complements a sum into the Internet checksum.
fn finish(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Internet checksum (RFC 1071) of `data`.
fn checksum(data: &[u8]) -> u16 {
    finish(add(0, data))
}

/// Writes the IPv4 or IPv6 header of a packet of `l4_len` bytes of protocol `proto` from `src`
/// to `dst` into `out` (cleared first). Returns, for IPv6, the pseudo-header's sum (RFC 8200,
/// 8.1) that the upper layer's checksum starts from; `None` if the families differ.
fn ip_header(
    src: IpAddr,
    dst: IpAddr,
    proto: u8,
    l4_len: u16,
    out: &mut Vec<u8>,
) -> Option<Option<u32>> {
    out.clear();
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let mut ip = [0u8; 20];
            ip[0] = 0x45;
            ip[2..4].copy_from_slice(&(20 + l4_len).to_be_bytes());
            ip[8] = 64;
            ip[9] = proto;
            ip[12..16].copy_from_slice(&s.octets());
            ip[16..20].copy_from_slice(&d.octets());
            let c = checksum(&ip);
            ip[10..12].copy_from_slice(&c.to_be_bytes());
            out.extend_from_slice(&ip);
            Some(None)
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let mut ip = [0u8; 40];
            ip[0] = 0x60;
            ip[4..6].copy_from_slice(&l4_len.to_be_bytes());
            ip[6] = proto;
            ip[7] = 64;
            ip[8..24].copy_from_slice(&s.octets());
            ip[24..40].copy_from_slice(&d.octets());
            out.extend_from_slice(&ip);
            Some(Some(add(u32::from(l4_len) + u32::from(proto), &ip[8..40])))
        }
        _ => None,
    }
}

/// Writes an IP/UDP packet carrying `payload` into `out` (cleared first). The families of `src`
/// and `dst` must match; `None` if they do not.
pub fn udp_packet(
    src: IpAddr,
    dst: IpAddr,
    sport: u16,
    dport: u16,
    payload: &[u8],
    out: &mut Vec<u8>,
) -> Option<()> {
    let udp_len = (8 + payload.len()) as u16;
    let mut udp = [0u8; 8];
    udp[0..2].copy_from_slice(&sport.to_be_bytes());
    udp[2..4].copy_from_slice(&dport.to_be_bytes());
    udp[4..6].copy_from_slice(&udp_len.to_be_bytes());
    // The checksum: mandatory over IPv6; 0 (none) over IPv4, where it is optional and the
    // tunnel authenticates every byte anyway.
    if let Some(pseudo) = ip_header(src, dst, 17, udp_len, out)? {
        let c = match finish(add(add(pseudo, &udp), payload)) {
            0 => 0xffff,
            c => c,
        };
        udp[6..8].copy_from_slice(&c.to_be_bytes());
    }
    out.extend_from_slice(&udp);
    out.extend_from_slice(payload);
    Some(())
}

/// Writes an ICMP (IPv4) or ICMPv6 echo request from `src` to `dst` with identifier
/// [`PROBE_ECHO_ID`], sequence `seq` and `payload` as its data into `out` (cleared first). The
/// families of `src` and `dst` must match; `None` if they do not.
pub fn echo_request(
    src: IpAddr,
    dst: IpAddr,
    seq: u16,
    payload: &[u8],
    out: &mut Vec<u8>,
) -> Option<()> {
    let icmp_len = (8 + payload.len()) as u16;
    let (proto, kind) = if src.is_ipv4() { (1, 8) } else { (58, 128) };
    // ICMPv6's checksum covers the pseudo-header (RFC 4443, 2.3); ICMP's does not.
    let pseudo = ip_header(src, dst, proto, icmp_len, out)?.unwrap_or(0);
    let mut icmp = [0u8; 8];
    icmp[0] = kind;
    icmp[4..6].copy_from_slice(&PROBE_ECHO_ID.to_be_bytes());
    icmp[6..8].copy_from_slice(&seq.to_be_bytes());
    let c = finish(add(add(pseudo, &icmp), payload));
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    out.extend_from_slice(&icmp);
    out.extend_from_slice(payload);
    Some(())
}

/// What a packet that came out of a tunnel is, for the edge.
#[derive(Debug, PartialEq, Eq)]
pub enum Inner<'a> {
    /// A probe request for our reflector: reply to `from:sport` on the same path.
    ProbeRequest {
        payload: &'a [u8],
        from: IpAddr,
        sport: u16,
        ttl: u8,
    },
    /// A reply to one of our probes.
    ProbeReply { payload: &'a [u8] },
    /// An echo reply to one of our probes sent as an echo request: the probe, echoed.
    EchoReply { payload: &'a [u8] },
    /// Anything else: traffic for the LAN.
    Data,
}

/// Looks at a decapsulated packet addressed to `overlay` (our overlay address).
pub fn inspect(pkt: &[u8], overlay: IpAddr) -> Inner<'_> {
    let (src, dst, proto, ttl, l4) = match pkt.first().map(|b| b >> 4) {
        Some(4) if pkt.len() >= 20 => {
            let ihl = usize::from(pkt[0] & 0x0f) * 4;
            let frag = u16::from_be_bytes([pkt[6], pkt[7]]) & 0x3fff;
            if ihl < 20 || pkt.len() < ihl || frag != 0 {
                return Inner::Data;
            }
            let s: [u8; 4] = pkt[12..16].try_into().unwrap_or_default();
            let d: [u8; 4] = pkt[16..20].try_into().unwrap_or_default();
            (
                IpAddr::from(s),
                IpAddr::from(d),
                pkt[9],
                pkt[8],
                &pkt[ihl..],
            )
        }
        Some(6) if pkt.len() >= 40 => {
            let s: [u8; 16] = pkt[8..24].try_into().unwrap_or_default();
            let d: [u8; 16] = pkt[24..40].try_into().unwrap_or_default();
            (IpAddr::from(s), IpAddr::from(d), pkt[6], pkt[7], &pkt[40..])
        }
        _ => return Inner::Data,
    };
    if dst != overlay || l4.len() < 8 {
        return Inner::Data;
    }
    let echo_reply = matches!(
        (src, proto, l4[0], l4[1]),
        (IpAddr::V4(_), 1, 0, 0) | (IpAddr::V6(_), 58, 129, 0)
    );
    if echo_reply && u16::from_be_bytes([l4[4], l4[5]]) == PROBE_ECHO_ID {
        return Inner::EchoReply { payload: &l4[8..] };
    }
    if proto != 17 {
        return Inner::Data;
    }
    let sport = u16::from_be_bytes([l4[0], l4[1]]);
    let dport = u16::from_be_bytes([l4[2], l4[3]]);
    let payload = &l4[8..];
    match (sport, dport) {
        (_, STAMP_PORT) => Inner::ProbeRequest {
            payload,
            from: src,
            sport,
            ttl,
        },
        (STAMP_PORT, PROBE_SENDER_PORT) => Inner::ProbeReply { payload },
        _ => Inner::Data,
    }
}

/// The source address of an IP packet.
pub fn source(pkt: &[u8]) -> Option<IpAddr> {
    match pkt.first()? >> 4 {
        4 => Some(IpAddr::from(<[u8; 4]>::try_from(pkt.get(12..16)?).ok()?)),
        6 => Some(IpAddr::from(<[u8; 16]>::try_from(pkt.get(8..24)?).ok()?)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A STUN answer (the controller's, on a link socket) is never taken for WireGuard, nor
    /// WireGuard or a STUN request for an answer.
    #[test]
    fn stun_answers_are_told_from_wireguard() {
        use patronus_api::stun;
        let t = [7u8; 12];
        let mut w = stun::Writer::new(stun::BINDING_SUCCESS, &t);
        w.attr(
            stun::ATTR_XOR_MAPPED_ADDRESS,
            &stun::xor_address("192.0.2.1:20000".parse().unwrap(), &t),
        );
        let ok = w.finish();
        let err = stun::Writer::new(stun::BINDING_ERROR, &t).finish();
        for a in [&ok, &err] {
            assert!(is_stun_answer(a));
            assert_eq!(classify(a), None);
        }
        assert!(!is_stun_answer(&stun::binding_request(&t, None)));
        let mut init = vec![0u8; 148];
        init[0] = 1;
        init[4..8].copy_from_slice(&stun::MAGIC.to_be_bytes());
        let mut data = vec![0u8; 64];
        data[0] = 4;
        data[4..8].copy_from_slice(&stun::MAGIC.to_be_bytes());
        for d in [&init, &data] {
            assert!(!is_stun_answer(d));
            assert!(classify(d).is_some());
        }
        assert!(!is_stun_answer(&ok[..19]));
        // Nor is a relay frame WireGuard.
        let mut frame = patronus_api::relay::header(patronus_api::relay::FROM, "a", "lte");
        frame.extend_from_slice(&data);
        assert_eq!(classify(&frame), None);
    }

    #[test]
    fn wireguard_messages_are_told_apart_and_garbage_is_none() {
        let mut data = vec![4, 0, 0, 0, 0x05, 0x03, 0, 0];
        data.resize(48, 0);
        assert_eq!(classify(&data), Some(WgMessage::ToSession(0x0305)));
        assert_eq!(tunnel_of(0x0305), 3);
        let mut init = vec![1, 0, 0, 0];
        init.resize(148, 9);
        assert_eq!(classify(&init), Some(WgMessage::Initiation));
        assert_eq!(classify(&init[..147]), None);
        let mut resp = vec![2, 0, 0, 0, 1, 1, 1, 1, 0x10, 0x20, 0, 0];
        resp.resize(92, 0);
        assert_eq!(classify(&resp), Some(WgMessage::ToSession(0x2010)));
        for bad in [&[][..], &[4, 0, 0], &[4, 1, 0, 0, 0, 0, 0, 0], &[9; 64]] {
            assert_eq!(classify(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn echo_probes_carry_the_probe_and_only_our_echo_replies_are_taken() {
        let payload = [7u8; 60];
        let mut buf = Vec::new();
        for (a, b) in [("10.255.0.1", "10.255.0.2"), ("fd00:ff::1", "fd00:ff::2")] {
            let (a, b): (IpAddr, IpAddr) = (a.parse().unwrap(), b.parse().unwrap());
            echo_request(a, b, 9, &payload, &mut buf).unwrap();
            let (hdr, next) = if a.is_ipv4() { (20, 1) } else { (40, 58) };
            assert_eq!(buf.len(), hdr + 8 + 60);
            // The message's checksum verifies (with the pseudo-header over IPv6).
            let sum = match (a, b) {
                (IpAddr::V6(s), IpAddr::V6(d)) => add(add(68 + 58, &s.octets()), &d.octets()),
                _ => 0,
            };
            assert_eq!(finish(add(sum, &buf[hdr..])), 0, "{a}");
            assert_eq!(buf[if a.is_ipv4() { 9 } else { 6 }], next);
            // A request to us is the kernel's to answer.
            assert_eq!(inspect(&buf, b), Inner::Data);
            // The peer's reply: addresses swapped, type echo reply, same identifier and data.
            let mut reply = buf.clone();
            let (s, d) = if a.is_ipv4() {
                (12..16, 16..20)
            } else {
                (8..24, 24..40)
            };
            let (src, dst) = (reply[s.clone()].to_vec(), reply[d.clone()].to_vec());
            reply[s].copy_from_slice(&dst);
            reply[d].copy_from_slice(&src);
            reply[hdr] = if a.is_ipv4() { 0 } else { 129 };
            assert_eq!(inspect(&reply, a), Inner::EchoReply { payload: &payload });
            assert_eq!(inspect(&reply, b), Inner::Data, "not for us");
            // Someone else's ping reply (another identifier) goes to the LAN side.
            reply[hdr + 4] ^= 1;
            assert_eq!(inspect(&reply, a), Inner::Data);
        }
    }

    #[test]
    fn probe_packets_are_built_and_recognised_over_v4_and_v6() {
        let payload = [7u8; 60];
        let mut buf = Vec::new();
        for (a, b) in [("10.255.0.1", "10.255.0.2"), ("fd00:ff::1", "fd00:ff::2")] {
            let (a, b): (IpAddr, IpAddr) = (a.parse().unwrap(), b.parse().unwrap());
            udp_packet(a, b, PROBE_SENDER_PORT, STAMP_PORT, &payload, &mut buf).unwrap();
            assert_eq!(
                inspect(&buf, b),
                Inner::ProbeRequest {
                    payload: &payload,
                    from: a,
                    sport: PROBE_SENDER_PORT,
                    ttl: 64
                }
            );
            assert_eq!(inspect(&buf, a), Inner::Data, "not for us");
            assert_eq!(source(&buf), Some(a));
            udp_packet(b, a, STAMP_PORT, PROBE_SENDER_PORT, &payload, &mut buf).unwrap();
            assert_eq!(inspect(&buf, a), Inner::ProbeReply { payload: &payload });
        }
        // The IPv4 header checksum verifies.
        udp_packet(
            "10.0.0.1".parse().unwrap(),
            "10.0.0.2".parse().unwrap(),
            1,
            2,
            &[],
            &mut buf,
        )
        .unwrap();
        assert_eq!(checksum(&buf[..20]), 0);
        assert!(
            udp_packet(
                "10.0.0.1".parse().unwrap(),
                "::1".parse().unwrap(),
                1,
                2,
                &[],
                &mut buf
            )
            .is_none()
        );
        assert_eq!(inspect(&[0x45], "10.0.0.1".parse().unwrap()), Inner::Data);
    }
}
