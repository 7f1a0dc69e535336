//! What the engine needs to know about an IP packet: its flow key (the 5-tuple) and its DSCP.
//!
//! The parser reads only the fixed headers, walks IPv6 extension headers to the transport
//! header, and never trusts a length field further than the bytes it was given. Non-first
//! fragments carry no transport header, so their ports are 0: they form their own flow and may
//! take another path than the first fragment (reordering, not loss). Packets that are too short,
//! or neither IPv4 nor IPv6, are refused with a reason.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// A flow's identity. Addresses are stored as 128-bit values (IPv4 in the low 32 bits) so the
/// key has one fixed layout for both families, in two 64-bit halves so the key is 40 bytes
/// with 8-byte alignment rather than 48 with 16 (it is the flow table's key).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowKey {
    src: [u64; 2],
    dst: [u64; 2],
    sport: u16,
    dport: u16,
    proto: u8,
    v6: bool,
    /// The packet carried a transport header with ports.
    ports: bool,
}

/// Protocols whose transport header starts with a source and a destination port.
fn carries_ports(proto: u8) -> bool {
    matches!(proto, 6 | 17 | 132 | 136)
}

impl FlowKey {
    /// A flow key; for TCP, UDP, SCTP and UDP-Lite the ports are part of it.
    pub fn new(src: IpAddr, dst: IpAddr, proto: u8, sport: u16, dport: u16) -> Self {
        let ports = carries_ports(proto);
        let (src, v6) = ip_to_u128(src);
        let (dst, _) = ip_to_u128(dst);
        Self {
            src: split(src),
            dst: split(dst),
            sport: if ports { sport } else { 0 },
            dport: if ports { dport } else { 0 },
            proto,
            v6,
            ports,
        }
    }

    /// The key of a packet whose ports cannot be read: a later fragment, or a transport header
    /// cut short. It matches only policies without port ranges.
    pub fn without_ports(src: IpAddr, dst: IpAddr, proto: u8) -> Self {
        Self {
            ports: false,
            ..Self::new(src, dst, proto, 0, 0)
        }
    }

    pub fn src(&self) -> IpAddr {
        u128_to_ip(self.src_bits(), self.v6)
    }

    pub fn dst(&self) -> IpAddr {
        u128_to_ip(self.dst_bits(), self.v6)
    }

    pub(crate) fn src_words(&self) -> [u64; 2] {
        self.src
    }

    pub(crate) fn dst_words(&self) -> [u64; 2] {
        self.dst
    }

    pub(crate) fn from_words(
        src: [u64; 2],
        dst: [u64; 2],
        proto: u8,
        (sport, dport): (u16, u16),
        v6: bool,
        ports: bool,
    ) -> Self {
        Self {
            src,
            dst,
            sport,
            dport,
            proto,
            v6,
            ports,
        }
    }

    pub(crate) fn src_bits(&self) -> u128 {
        join(self.src)
    }

    pub(crate) fn dst_bits(&self) -> u128 {
        join(self.dst)
    }

    pub fn is_ipv6(&self) -> bool {
        self.v6
    }

    pub fn proto(&self) -> u8 {
        self.proto
    }

    pub fn sport(&self) -> u16 {
        self.sport
    }

    pub fn dport(&self) -> u16 {
        self.dport
    }

    /// True when the packet carried ports (they are then meaningful, possibly 0).
    pub fn has_ports(&self) -> bool {
        self.ports
    }
}

fn split(x: u128) -> [u64; 2] {
    [(x >> 64) as u64, x as u64]
}

fn join(x: [u64; 2]) -> u128 {
    (u128::from(x[0]) << 64) | u128::from(x[1])
}

fn ip_to_u128(ip: IpAddr) -> (u128, bool) {
    match ip {
        IpAddr::V4(a) => (u128::from(u32::from(a)), false),
        IpAddr::V6(a) => (u128::from(a), true),
    }
}

fn u128_to_ip(bits: u128, v6: bool) -> IpAddr {
    if v6 {
        IpAddr::V6(Ipv6Addr::from(bits))
    } else {
        // Only the low 32 bits are ever set for IPv4 keys.
        IpAddr::V4(Ipv4Addr::from(bits as u32))
    }
}

impl fmt::Debug for FlowKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for FlowKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.has_ports() {
            let (s, d) = (self.src(), self.dst());
            if self.v6 {
                write!(
                    f,
                    "[{s}]:{} > [{d}]:{} proto {}",
                    self.sport, self.dport, self.proto
                )
            } else {
                write!(
                    f,
                    "{s}:{} > {d}:{} proto {}",
                    self.sport, self.dport, self.proto
                )
            }
        } else {
            write!(f, "{} > {} proto {}", self.src(), self.dst(), self.proto)
        }
    }
}

/// The flow key and DSCP of one packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PacketMeta {
    pub key: FlowKey,
    pub dscp: u8,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    #[error("empty packet")]
    Empty,
    #[error("IP version {0} is neither 4 nor 6")]
    BadVersion(u8),
    #[error("truncated {0} header")]
    Truncated(&'static str),
    #[error("IPv4 header length {0} is below the minimum of 20 bytes")]
    BadIhl(usize),
}

/// IPv6 extension headers that share the "next header, length in 8-octet units" layout.
const HOP_BY_HOP: u8 = 0;
const ROUTING: u8 = 43;
const FRAGMENT: u8 = 44;
const DEST_OPTS: u8 = 60;
const MOBILITY: u8 = 135;
/// A bound on the extension header chain; longer chains are treated as having no ports.
const MAX_EXT_HEADERS: usize = 8;

impl PacketMeta {
    /// Reads the flow key and DSCP of an IPv4 or IPv6 packet.
    pub fn parse(pkt: &[u8]) -> Result<PacketMeta, PacketError> {
        let first = *pkt.first().ok_or(PacketError::Empty)?;
        match first >> 4 {
            4 => Self::parse_v4(pkt),
            6 => Self::parse_v6(pkt),
            v => Err(PacketError::BadVersion(v)),
        }
    }

    fn parse_v4(pkt: &[u8]) -> Result<PacketMeta, PacketError> {
        let hdr: &[u8; 20] = pkt
            .get(..20)
            .and_then(|h| h.try_into().ok())
            .ok_or(PacketError::Truncated("IPv4"))?;
        let ihl = usize::from(hdr[0] & 0x0f) * 4;
        if ihl < 20 {
            return Err(PacketError::BadIhl(ihl));
        }
        let dscp = hdr[1] >> 2;
        let proto = hdr[9];
        let src = Ipv4Addr::new(hdr[12], hdr[13], hdr[14], hdr[15]);
        let dst = Ipv4Addr::new(hdr[16], hdr[17], hdr[18], hdr[19]);
        let frag_offset = u16::from_be_bytes([hdr[6], hdr[7]]) & 0x1fff;
        let ports = if frag_offset == 0 {
            ports(proto, pkt.get(ihl..))
        } else {
            None
        };
        Ok(PacketMeta {
            key: key(src.into(), dst.into(), proto, ports),
            dscp,
        })
    }

    fn parse_v6(pkt: &[u8]) -> Result<PacketMeta, PacketError> {
        let hdr: &[u8; 40] = pkt
            .get(..40)
            .and_then(|h| h.try_into().ok())
            .ok_or(PacketError::Truncated("IPv6"))?;
        let traffic_class = (hdr[0] << 4) | (hdr[1] >> 4);
        let dscp = traffic_class >> 2;
        let mut src = [0u8; 16];
        let mut dst = [0u8; 16];
        src.copy_from_slice(&hdr[8..24]);
        dst.copy_from_slice(&hdr[24..40]);
        let mut next = hdr[6];
        let mut off = 40usize;
        let mut first_fragment = true;
        for _ in 0..MAX_EXT_HEADERS {
            match next {
                HOP_BY_HOP | ROUTING | DEST_OPTS | MOBILITY => {
                    let Some(ext) = pkt.get(off..off + 2) else {
                        break;
                    };
                    next = ext[0];
                    off += (usize::from(ext[1]) + 1) * 8;
                }
                FRAGMENT => {
                    let Some(ext) = pkt.get(off..off + 8) else {
                        break;
                    };
                    next = ext[0];
                    first_fragment = u16::from_be_bytes([ext[2], ext[3]]) >> 3 == 0;
                    off += 8;
                }
                _ => break,
            }
        }
        let ports = if first_fragment {
            ports(next, pkt.get(off..))
        } else {
            None
        };
        Ok(PacketMeta {
            key: key(
                Ipv6Addr::from(src).into(),
                Ipv6Addr::from(dst).into(),
                next,
                ports,
            ),
            dscp,
        })
    }
}

fn ports(proto: u8, l4: Option<&[u8]>) -> Option<(u16, u16)> {
    match l4 {
        Some([a, b, c, d, ..]) if carries_ports(proto) => {
            Some((u16::from_be_bytes([*a, *b]), u16::from_be_bytes([*c, *d])))
        }
        _ => None,
    }
}

fn key(src: IpAddr, dst: IpAddr, proto: u8, ports: Option<(u16, u16)>) -> FlowKey {
    match ports {
        Some((s, d)) => FlowKey::new(src, dst, proto, s, d),
        None => FlowKey::without_ports(src, dst, proto),
    }
}

/// The 28 bytes `PacketMeta::parse` reads of an IPv4 packet: a 20-byte header (no options,
/// checksum left zero) and the first 8 bytes of a transport header with the given ports. For
/// tests and benchmarks that feed the engine packets without a network.
pub fn ipv4_header(
    src: [u8; 4],
    dst: [u8; 4],
    proto: u8,
    sport: u16,
    dport: u16,
    dscp: u8,
) -> [u8; 28] {
    let mut p = [0u8; 28];
    p[0] = 0x45;
    p[1] = dscp << 2;
    p[2..4].copy_from_slice(&28u16.to_be_bytes());
    p[8] = 64;
    p[9] = proto;
    p[12..16].copy_from_slice(&src);
    p[16..20].copy_from_slice(&dst);
    p[20..22].copy_from_slice(&sport.to_be_bytes());
    p[22..24].copy_from_slice(&dport.to_be_bytes());
    p
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn ipv4(
        src: [u8; 4],
        dst: [u8; 4],
        proto: u8,
        sport: u16,
        dport: u16,
        dscp: u8,
    ) -> Vec<u8> {
        ipv4_header(src, dst, proto, sport, dport, dscp).to_vec()
    }

    #[test]
    fn an_ipv4_udp_packet_yields_its_five_tuple_and_dscp() {
        let m = PacketMeta::parse(&ipv4([10, 1, 0, 5], [10, 2, 0, 9], 17, 5004, 5006, 46)).unwrap();
        assert_eq!(m.dscp, 46);
        assert_eq!(m.key.to_string(), "10.1.0.5:5004 > 10.2.0.9:5006 proto 17");
    }

    #[test]
    fn ipv4_options_and_non_first_fragments_are_handled() {
        let mut p = ipv4([10, 1, 0, 5], [10, 2, 0, 9], 6, 1, 2, 0);
        p[0] = 0x46; // 24-byte header: the ports move by 4 bytes
        p.splice(20..20, [1, 1, 1, 0]);
        let m = PacketMeta::parse(&p).unwrap();
        assert_eq!((m.key.sport(), m.key.dport()), (1, 2));
        let mut frag = ipv4([10, 1, 0, 5], [10, 2, 0, 9], 17, 1, 2, 0);
        frag[7] = 10; // fragment offset 80 bytes
        let m = PacketMeta::parse(&frag).unwrap();
        assert_eq!(
            (m.key.sport(), m.key.dport(), m.key.has_ports()),
            (0, 0, false)
        );
        // A later fragment is not the flow of the first one, nor of a real port-0 flow.
        let first = PacketMeta::parse(&ipv4([10, 1, 0, 5], [10, 2, 0, 9], 17, 0, 0, 0)).unwrap();
        assert_ne!(m.key, first.key);
    }

    #[test]
    fn an_ipv6_packet_behind_extension_headers_yields_its_ports() {
        let mut p = vec![0u8; 40];
        p[0] = 0x6b; // version 6, traffic class 0xb8 = DSCP 46
        p[1] = 0x80;
        p[6] = HOP_BY_HOP;
        p[8] = 0x20;
        p[24] = 0x20;
        p[39] = 2;
        p.extend_from_slice(&[FRAGMENT, 0, 0, 0, 0, 0, 0, 0]); // hop-by-hop, 8 bytes
        p.extend_from_slice(&[17, 0, 0, 0, 0, 0, 0, 1]); // fragment header, offset 0
        p.extend_from_slice(&[0x13, 0xc4, 0x13, 0xc6, 0, 8, 0, 0]);
        let m = PacketMeta::parse(&p).unwrap();
        assert_eq!(m.dscp, 46);
        assert_eq!(m.key.proto(), 17);
        assert_eq!((m.key.sport(), m.key.dport()), (5060, 5062));
        assert!(m.key.is_ipv6());
    }

    #[test]
    fn short_and_foreign_packets_are_refused() {
        assert_eq!(PacketMeta::parse(&[]), Err(PacketError::Empty));
        assert_eq!(
            PacketMeta::parse(&[0x45; 19]),
            Err(PacketError::Truncated("IPv4"))
        );
        assert_eq!(
            PacketMeta::parse(&[0x60; 39]),
            Err(PacketError::Truncated("IPv6"))
        );
        assert_eq!(
            PacketMeta::parse(&[0x10; 40]),
            Err(PacketError::BadVersion(1))
        );
        let mut p = ipv4([1, 1, 1, 1], [2, 2, 2, 2], 6, 1, 2, 0);
        p[0] = 0x44;
        assert_eq!(PacketMeta::parse(&p), Err(PacketError::BadIhl(16)));
        // A TCP packet cut inside its header keeps its addresses and has no ports.
        let m = PacketMeta::parse(&ipv4([1, 1, 1, 1], [2, 2, 2, 2], 6, 1, 2, 0)[..22]).unwrap();
        assert_eq!(
            (m.key.sport(), m.key.dport(), m.key.has_ports()),
            (0, 0, false)
        );
    }
}
