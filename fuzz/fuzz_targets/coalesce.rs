//! Fuzzes the edge's receive-side coalescing (`patronus_edge::coalesce`): decrypted packets go
//! in as the edge feeds them (a slot, the packet and WireGuard's padding written into it, then
//! commit, or discard for a probe or a failed decryption), ready packets come out at any point.
//! Nothing may panic, and nothing may be lost, duplicated, reordered within a flow or
//! corrupted: every output is split again as the kernel's GSO would split it, and each flow's
//! segments must be the ones that went in, in order. That check is written here from the
//! packets' bytes, independently of the code under test.
//!
//! The input is a list of records: an op byte, a length (u16, little endian) and that many
//! bytes. Op bits: 0 discard instead of commit; 1 a segment continuing the last TCP segment
//! committed (its headers, the next sequence number and IP ID; the record's first two bytes give
//! the payload's length, the third its pattern); 2 the record's bytes with their IP and TCP
//! lengths and TCP checksum made right; 3 take the ready packets out after this record; 4-7 how
//! much padding (×4 bytes) follows the packet in its slot. Without bits 1 and 2 the record's
//! bytes are the packet.
#![no_main]

use std::collections::BTreeMap;
use std::fmt;

use libfuzzer_sys::fuzz_target;
use patronus_edge::coalesce::{Coalescer, HDR};

const TCP: u8 = 6;

fuzz_target!(|data: &[u8]| {
    let mut c = Coalescer::new();
    let mut committed: Vec<Vec<u8>> = Vec::new();
    let mut written: Vec<Vec<u8>> = Vec::new();
    let mut last_tcp: Option<Vec<u8>> = None;
    let mut rest = data;
    while let [op, lo, hi, tail @ ..] = rest {
        let n = usize::from(u16::from_le_bytes([*lo, *hi])).min(tail.len());
        let (bytes, next) = tail.split_at(n);
        rest = next;
        let pkt = if op & 2 != 0 {
            match &last_tcp {
                Some(prev) => continued(prev, bytes),
                None => bytes.to_vec(),
            }
        } else if op & 4 != 0 {
            fixed(bytes)
        } else {
            bytes.to_vec()
        };
        let pad = usize::from(op >> 4) * 4;
        let slot = c.slot(pkt.len() + pad);
        slot[..pkt.len()].copy_from_slice(&pkt);
        slot[pkt.len()..pkt.len() + pad].fill(0xee);
        assert_eq!(
            c.packet(pkt.len()),
            &pkt[..],
            "the slot holds what was written"
        );
        if op & 1 != 0 {
            c.discard();
        } else {
            c.commit(pkt.len());
            if segment(&pkt).is_some() {
                last_tcp = Some(pkt.clone());
            }
            committed.push(pkt);
        }
        if op & 8 != 0 {
            c.drain(true, |b| {
                written.push(b.to_vec());
                Ok(())
            });
        }
    }
    c.drain(false, |b| {
        written.push(b.to_vec());
        Ok(())
    });
    assert_eq!(c.pending(), 0);
    let counts = c.counts();
    assert_eq!(counts.packets as usize, committed.len());
    assert_eq!(counts.writes as usize, written.len());
    let want = by_flow(committed.iter().map(|p| unit(p)));
    let got = by_flow(written.iter().flat_map(|b| resegment(b)));
    assert_eq!(got, want);
});

/// Which flow a packet is part of, as the coalescer must group them: IPv4 or IPv6 TCP with its
/// addresses and ports, or anything else.
type Flow = Option<Vec<u8>>;

/// A segment's sequence number and payload, or a packet that is not one, whole.
#[derive(PartialEq, Eq)]
enum Unit {
    Segment(u32, Vec<u8>),
    Packet(Vec<u8>),
}

/// Short enough to read a failure: the length, the first bytes and a hash of all of them.
impl fmt::Debug for Unit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (what, b) = match self {
            Unit::Segment(seq, b) => (format!("seq {seq}"), b),
            Unit::Packet(b) => ("packet".to_string(), b),
        };
        let fnv = b.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &x| {
            (h ^ u64::from(x)).wrapping_mul(0x0100_0000_01b3)
        });
        let head = &b[..b.len().min(8)];
        write!(f, "{what}: {} bytes {head:02x?}.. fnv {fnv:016x}", b.len())
    }
}

/// A TCP segment without IP options: (IPv6, IP header length, IP and TCP header length).
fn segment(p: &[u8]) -> Option<(bool, usize, usize)> {
    let (v6, iph) = match *p.first()? {
        0x45 if p.len() >= 20 && p[9] == TCP => (false, 20),
        b if b >> 4 == 6 && p.len() >= 40 && p[6] == TCP => (true, 40),
        _ => return None,
    };
    let tcph = usize::from(*p.get(iph + 12)? >> 4) * 4;
    (tcph >= 20 && iph + tcph <= p.len()).then_some((v6, iph, iph + tcph))
}

fn flow(p: &[u8]) -> Flow {
    let (v6, iph) = match p.first()? >> 4 {
        4 if p.len() >= 24 && p[9] == TCP => (false, usize::from(p[0] & 0x0f) * 4),
        6 if p.len() >= 44 && p[6] == TCP => (true, 40),
        _ => return None,
    };
    let addrs = if v6 { &p[8..40] } else { &p[12..20] };
    Some([addrs, p.get(iph..iph + 4)?].concat())
}

fn unit(p: &[u8]) -> (Flow, Unit) {
    let u = match segment(p) {
        Some((_, iph, hdrs)) => Unit::Segment(be32(&p[iph + 4..]), p[hdrs..].to_vec()),
        None => Unit::Packet(p.to_vec()),
    };
    (flow(p), u)
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

/// A written buffer (virtio-net header, packet) as the segments the kernel makes of it.
fn resegment(b: &[u8]) -> Vec<(Flow, Unit)> {
    let (hdr, pkt) = b.split_at(HDR);
    if hdr.iter().all(|&x| x == 0) {
        return vec![unit(pkt)];
    }
    let (v6, iph, hdrs) = segment(pkt).expect("a coalesced packet is a TCP segment");
    let field = |i: usize| usize::from(u16::from_ne_bytes([hdr[i], hdr[i + 1]]));
    assert_eq!(hdr[0], 1, "checksum partial");
    assert_eq!(hdr[1], if v6 { 4 } else { 1 }, "GSO TCPv6 or TCPv4");
    assert_eq!((field(2), field(6), field(8)), (hdrs, iph, 16));
    let gso = field(4);
    assert!(gso > 0 && pkt.len() > hdrs + gso, "more than one segment");
    assert!(pkt.len() <= 65_535);
    let seq = be32(&pkt[iph + 4..]);
    pkt[hdrs..]
        .chunks(gso)
        .enumerate()
        .map(|(i, c)| {
            let s = seq.wrapping_add((i * gso) as u32);
            (flow(pkt), Unit::Segment(s, c.to_vec()))
        })
        .collect()
}

fn by_flow(units: impl Iterator<Item = (Flow, Unit)>) -> BTreeMap<Flow, Vec<Unit>> {
    let mut m = BTreeMap::<Flow, Vec<Unit>>::new();
    for (f, u) in units {
        m.entry(f).or_default().push(u);
    }
    m
}

/// RFC 1071 over `parts`, written out plainly.
fn internet_checksum(parts: &[&[u8]]) -> u16 {
    let bytes = parts.concat();
    let mut sum: u64 = 0;
    for w in bytes.chunks(2) {
        sum += u64::from(u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)]));
    }
    while sum > 0xffff {
        sum = (sum >> 16) + (sum & 0xffff);
    }
    !(sum as u16)
}

/// `p` with its IP lengths and TCP checksum made right, if it is a TCP segment.
fn fixed(p: &[u8]) -> Vec<u8> {
    let mut p = p.to_vec();
    let Some((v6, iph, _)) = segment(&p) else {
        return p;
    };
    let len = p.len().min(65_535);
    p.truncate(len);
    if v6 {
        p[4..6].copy_from_slice(&((len - 40) as u16).to_be_bytes());
    } else {
        p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
    }
    p[iph + 16..iph + 18].fill(0);
    let addrs = if v6 { &p[8..40] } else { &p[12..20] };
    let tcp_len = ((len - iph) as u16).to_be_bytes();
    let sum = internet_checksum(&[addrs, &[0, TCP], &tcp_len, &p[iph..]]);
    p[iph + 16..iph + 18].copy_from_slice(&sum.to_be_bytes());
    p
}

/// The segment that follows `prev` in its flow: its headers, the next sequence number and IPv4
/// ID, a payload of the length `spec` names.
fn continued(prev: &[u8], spec: &[u8]) -> Vec<u8> {
    let Some((v6, iph, hdrs)) = segment(prev) else {
        return spec.to_vec();
    };
    let size = match spec {
        [lo, hi, ..] => usize::from(u16::from_le_bytes([*lo, *hi])) % 9001,
        _ => 1400,
    };
    let seed = spec.get(2).copied().unwrap_or(0);
    let mut p = prev[..hdrs].to_vec();
    p.extend((0..size).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)));
    let seq = be32(&prev[iph + 4..]).wrapping_add((prev.len() - hdrs) as u32);
    p[iph + 4..iph + 8].copy_from_slice(&seq.to_be_bytes());
    if !v6 {
        let id = u16::from_be_bytes([prev[4], prev[5]]).wrapping_add(1);
        p[4..6].copy_from_slice(&id.to_be_bytes());
    }
    fixed(&p)
}
