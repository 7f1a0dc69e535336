//! Receive-side coalescing (GRO) of decrypted packets on their way to the TUN.
//!
//! TCP segments of one flow that arrive in order are joined into one large packet that the
//! kernel takes in a single TUN write, described by a virtio-net header (GSO TCPv4 or TCPv6,
//! checksum partial), as the kernel's own GRO does for a NIC. The common case costs no copy:
//! the next datagram is decrypted straight behind the last byte of the packet most recently
//! added to, its headers landing on that packet's final bytes, which are saved first and put
//! back, so a segment's payload is written once, by the decryption. A packet of another flow
//! that can join its own flow's packet is appended there with one copy.
//!
//! The rules follow the kernel's `tcp_gro_receive`: same addresses, ports and IP header fields
//! (TOS or traffic class and flow label, TTL or hop limit, DF, IP IDs that increase by one or,
//! with DF, stay fixed), no IP options or extension headers, TCP flags ACK with PSH allowed on
//! the last segment, the same ACK number, window and options, the next sequence number, a payload
//! no longer than the first segment's (a shorter one ends the packet) and 64 KB in all. Every
//! joined segment's checksum is checked first: one with a bad checksum is written on its own for
//! the kernel to drop, never hidden inside a packet whose checksum the kernel then computes.

use std::os::fd::BorrowedFd;

use tun_rs::{VIRTIO_NET_HDR_LEN, VirtioNetHdr, checksum, checksum_no_fold};

/// Room before each packet for its virtio-net header.
pub const HDR: usize = VIRTIO_NET_HDR_LEN;
/// The largest IP packet (IPv4 total length, IPv6 payload length plus 40 for simplicity).
const MAX_IP: usize = 65_535;
/// Every buffer can hold the largest packet.
const CAP: usize = HDR + MAX_IP + 64;
/// Flows coalesced at once.
const MAX_OPEN: usize = 8;
/// Segments smaller than this start no coalesced packet (they gain little, and a packet's
/// payload must be longer than its headers for in-place decryption behind it).
const MIN_SEGMENT: usize = 256;
const TCP: u8 = 6;
const ACK: u8 = 0x10;
const PSH: u8 = 0x08;
const GSO_TCPV4: u8 = 1;
const GSO_TCPV6: u8 = 4;
const NEEDS_CSUM: u8 = 1;

struct Buf {
    data: Box<[u8]>,
    /// Length of the IP packet at `data[HDR..]`.
    len: usize,
}

impl Buf {
    fn new() -> Self {
        Self {
            data: vec![0; CAP].into_boxed_slice(),
            len: 0,
        }
    }

    fn packet(&self) -> &[u8] {
        &self.data[HDR..HDR + self.len]
    }
}

/// A packet that more segments of its flow may join.
#[derive(Debug, Clone, Copy)]
struct Open {
    /// Its buffer in `out`.
    idx: usize,
    v6: bool,
    iph: usize,
    /// IP and TCP headers.
    hdrs: usize,
    /// The first segment's payload: the size every segment but the last has.
    gso: usize,
    next_seq: u32,
    last_id: u16,
    /// How the IPv4 ID moves from segment to segment (known from the second on).
    id_step: Option<u16>,
    segs: usize,
}

/// What the parser learned of a TCP segment that could be coalesced.
#[derive(Debug, Clone, Copy)]
struct Seg {
    v6: bool,
    iph: usize,
    hdrs: usize,
    seq: u32,
    payload: usize,
    psh: bool,
    id: u16,
    df: bool,
}

impl Seg {
    /// A TCP segment carrying data with flags ACK or ACK|PSH, no IP options, extension headers
    /// or fragmentation, and lengths that agree.
    fn parse(pkt: &[u8]) -> Option<Self> {
        let (v6, iph, id, df) = match pkt.first()? >> 4 {
            4 => {
                if pkt.len() < 20 || pkt[0] != 0x45 || pkt[9] != TCP {
                    return None;
                }
                let total = usize::from(u16::from_be_bytes([pkt[2], pkt[3]]));
                let frag = u16::from_be_bytes([pkt[6], pkt[7]]);
                // More fragments, or an offset: not a whole segment.
                if total != pkt.len() || frag & 0x3fff != 0 {
                    return None;
                }
                (
                    false,
                    20,
                    u16::from_be_bytes([pkt[4], pkt[5]]),
                    frag & 0x4000 != 0,
                )
            }
            6 => {
                if pkt.len() < 40 || pkt[6] != TCP {
                    return None;
                }
                let payload = usize::from(u16::from_be_bytes([pkt[4], pkt[5]]));
                if payload + 40 != pkt.len() {
                    return None;
                }
                (true, 40, 0, true)
            }
            _ => return None,
        };
        let tcp = pkt.get(iph..iph + 20)?;
        let tcph = usize::from(tcp[12] >> 4) * 4;
        let flags = tcp[13];
        if tcph < 20 || pkt.len() <= iph + tcph || (flags != ACK && flags != ACK | PSH) {
            return None;
        }
        Some(Self {
            v6,
            iph,
            hdrs: iph + tcph,
            seq: u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]),
            payload: pkt.len() - iph - tcph,
            psh: flags & PSH != 0,
            id,
            df,
        })
    }
}

/// Where the source and destination addresses are in an IP header.
fn addrs(v6: bool) -> std::ops::Range<usize> {
    if v6 { 8..40 } else { 12..20 }
}

/// The one's-complement sum of the TCP pseudo-header, unfolded.
/// `tcp_len` is at most 65,535: no packet here is longer.
fn pseudo(pkt: &[u8], v6: bool, tcp_len: usize) -> u64 {
    let sum = checksum_no_fold(&pkt[addrs(v6)], 0);
    let len = (tcp_len as u16).to_be_bytes();
    checksum_no_fold(&[0, TCP, len[0], len[1]], sum)
}

fn checksum_ok(pkt: &[u8], s: &Seg) -> bool {
    let tcp_len = pkt.len() - s.iph;
    checksum(&pkt[s.iph..], pseudo(pkt, s.v6, tcp_len)) == 0xffff
}

/// Whether `s` (`pkt`) belongs to the flow of `first`, the first segment's headers.
fn same_flow(first: &[u8], o: &Open, pkt: &[u8], s: &Seg) -> bool {
    same_tcp_flow(first, o, pkt, s.v6, s.iph)
}

fn same_tcp_flow(first: &[u8], o: &Open, pkt: &[u8], v6: bool, iph: usize) -> bool {
    o.v6 == v6
        && pkt.len() >= iph + 4
        && first[addrs(v6)] == pkt[addrs(v6)]
        && first[o.iph..o.iph + 4] == pkt[iph..iph + 4]
}

/// The IP header length of any TCP packet (a SYN, a FIN, a bare ACK, ...).
fn tcp_header_at(pkt: &[u8]) -> Option<(bool, usize)> {
    match pkt.first()? >> 4 {
        4 if pkt.len() >= 24 && pkt[9] == TCP => Some((false, usize::from(pkt[0] & 0xf) * 4)),
        6 if pkt.len() >= 44 && pkt[6] == TCP => Some((true, 40)),
        _ => None,
    }
}

/// Whether `s` (`pkt`, of the same flow) may follow what `o` holds.
fn joinable(first: &[u8], o: &Open, pkt: &[u8], s: &Seg) -> bool {
    if s.hdrs != o.hdrs || s.seq != o.next_seq || s.payload > o.gso {
        return false;
    }
    let ip_same = if s.v6 {
        // Version, traffic class, flow label; hop limit.
        first[..4] == pkt[..4] && first[7] == pkt[7]
    } else {
        let id_ok = match o.id_step {
            Some(step) => s.id == o.last_id.wrapping_add(step),
            None => s.id == o.last_id.wrapping_add(1) || (s.df && s.id == o.last_id),
        };
        // TOS, flags (DF), TTL.
        id_ok && first[1] == pkt[1] && first[6] == pkt[6] && first[8] == pkt[8]
    };
    let (a, b) = (&first[o.iph..o.hdrs], &pkt[s.iph..s.hdrs]);
    // ACK number, data offset, window, options; the flags were checked by the parser, and
    // the first segment has no PSH (it would have ended the packet).
    ip_same
        && a[8..13] == b[8..13]
        && a[14..16] == b[14..16]
        && a[20..] == b[20..]
        && o.hdrs + (o.segs * o.gso) + s.payload <= MAX_IP
        && checksum_ok(pkt, s)
}

/// Where the last [`Coalescer::slot`] pointed.
#[derive(Debug, Clone, Copy)]
enum Slot {
    None,
    /// A new buffer, the last in `out`.
    Fresh,
    /// Behind the open packet `opens[open]`, at `pos` in its buffer.
    Behind {
        open: usize,
        pos: usize,
    },
}

/// Counts, for status.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CoalesceCounts {
    /// Packets that went to the TUN.
    pub packets: u64,
    /// Writes that carried them.
    pub writes: u64,
    /// Writes the TUN refused.
    pub errors: u64,
}

/// Decrypted packets on their way to the TUN, coalesced where the rules allow.
pub struct Coalescer {
    out: Vec<Buf>,
    pool: Vec<Buf>,
    opens: Vec<Open>,
    /// The open packet most recently added to: the next datagram is decrypted behind it.
    last: Option<usize>,
    slot: Slot,
    saved: [u8; 128],
    counts: CoalesceCounts,
}

impl std::fmt::Debug for Coalescer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Coalescer")
            .field("pending", &self.out.len())
            .field("open", &self.opens)
            .field("counts", &self.counts)
            .finish()
    }
}

impl Default for Coalescer {
    fn default() -> Self {
        Self::new()
    }
}

impl Coalescer {
    pub fn new() -> Self {
        Self {
            out: Vec::new(),
            pool: Vec::new(),
            opens: Vec::new(),
            last: None,
            slot: Slot::None,
            saved: [0; 128],
            counts: CoalesceCounts::default(),
        }
    }

    pub fn counts(&self) -> CoalesceCounts {
        self.counts
    }

    /// Buffers waiting to be written.
    pub fn pending(&self) -> usize {
        self.out.len()
    }

    /// Where to decrypt a packet of at most `max_len` bytes; then call [`Self::commit`] (it goes
    /// to the TUN) or [`Self::discard`] (anything else, including a failed decryption), before
    /// the next `slot`. Whatever is written here beyond the packet is ignored.
    pub fn slot(&mut self, max_len: usize) -> &mut [u8] {
        let max_len = max_len.min(MAX_IP);
        let behind = self.last.and_then(|k| {
            let o = self.opens[k];
            let len = self.out[o.idx].len;
            (len - o.hdrs + max_len <= MAX_IP).then_some((k, o.idx, HDR + len - o.hdrs, o.hdrs))
        });
        if let Some((k, idx, pos, hdrs)) = behind {
            let b = &mut self.out[idx];
            self.saved[..hdrs].copy_from_slice(&b.data[pos..pos + hdrs]);
            self.slot = Slot::Behind { open: k, pos };
            return &mut b.data[pos..];
        }
        let b = self.pool.pop().unwrap_or_else(Buf::new);
        self.out.push(b);
        self.slot = Slot::Fresh;
        let last = self.out.len() - 1;
        &mut self.out[last].data[HDR..]
    }

    /// The packet of `len` bytes decrypted into the slot.
    pub fn packet(&self, len: usize) -> &[u8] {
        match self.slot {
            Slot::Behind { open, pos } => &self.out[self.opens[open].idx].data[pos..pos + len],
            Slot::Fresh => self.out.last().map_or(&[], |b| &b.data[HDR..HDR + len]),
            Slot::None => &[],
        }
    }

    /// Nothing from the slot goes to the TUN.
    pub fn discard(&mut self) {
        match std::mem::replace(&mut self.slot, Slot::None) {
            Slot::Behind { open, pos } => self.restore(open, pos),
            Slot::Fresh => {
                if let Some(b) = self.out.pop() {
                    self.pool.push(b);
                }
            }
            Slot::None => {}
        }
    }

    /// The packet of `len` bytes in the slot goes to the TUN.
    pub fn commit(&mut self, len: usize) {
        let slot = std::mem::replace(&mut self.slot, Slot::None);
        if !matches!(slot, Slot::None) {
            self.counts.packets += 1;
        }
        match slot {
            Slot::None => {}
            Slot::Fresh => {
                let i = self.out.len() - 1;
                self.out[i].len = len;
                self.consider(i);
            }
            Slot::Behind { open: k, pos } => {
                let o = self.opens[k];
                let b = &self.out[o.idx];
                let pkt = &b.data[pos..pos + len];
                if let Some(s) = Seg::parse(pkt) {
                    let first = &b.data[HDR..HDR + o.hdrs];
                    if same_flow(first, &o, pkt, &s) && joinable(first, &o, pkt, &s) {
                        self.restore(k, pos);
                        self.out[o.idx].len += s.payload;
                        self.joined(k, &s);
                        return;
                    }
                }
                // Not a continuation: the packet moves to a buffer of its own.
                let mut nb = self.pool.pop().unwrap_or_else(Buf::new);
                nb.data[HDR..HDR + len].copy_from_slice(&self.out[o.idx].data[pos..pos + len]);
                nb.len = len;
                self.restore(k, pos);
                self.out.push(nb);
                self.consider(self.out.len() - 1);
            }
        }
    }

    /// Puts back the bytes the slot behind `opens[k]` overwrote.
    fn restore(&mut self, k: usize, pos: usize) {
        let o = self.opens[k];
        self.out[o.idx].data[pos..pos + o.hdrs].copy_from_slice(&self.saved[..o.hdrs]);
    }

    /// `s` was added to `opens[k]`.
    fn joined(&mut self, k: usize, s: &Seg) {
        let o = &mut self.opens[k];
        o.next_seq = o.next_seq.wrapping_add(s.payload as u32);
        if !o.v6 && o.id_step.is_none() {
            o.id_step = Some(s.id.wrapping_sub(o.last_id));
        }
        o.last_id = s.id;
        o.segs += 1;
        if s.psh {
            // PSH is carried on the coalesced packet, and ends it.
            let (idx, iph) = (o.idx, o.iph);
            self.out[idx].data[HDR + iph + 13] |= PSH;
            self.close(k);
        } else if s.payload < o.gso {
            self.close(k);
        } else {
            self.last = Some(k);
        }
    }

    /// `out[i]`, the last buffer, holds one new packet: join it to its flow's open packet,
    /// or make it one.
    fn consider(&mut self, i: usize) {
        self.out[i].data[..HDR].fill(0);
        let pkt = self.out[i].packet();
        let Some((v6, iph)) = tcp_header_at(pkt) else {
            return;
        };
        let seg = Seg::parse(pkt);
        let found = self
            .opens
            .iter()
            .position(|o| same_tcp_flow(&self.out[o.idx].data[HDR..HDR + o.hdrs], o, pkt, v6, iph));
        if let Some(k) = found {
            let o = self.opens[k];
            if let Some(s) =
                seg.filter(|s| joinable(&self.out[o.idx].data[HDR..HDR + o.hdrs], &o, pkt, s))
            {
                // Append the payload to the flow's packet; the buffer goes back.
                let Some(nb) = self.out.pop() else { return };
                let at = HDR + self.out[o.idx].len;
                self.out[o.idx].data[at..at + s.payload]
                    .copy_from_slice(&nb.data[HDR + s.hdrs..HDR + nb.len]);
                self.out[o.idx].len += s.payload;
                self.pool.push(nb);
                self.joined(k, &s);
                return;
            }
            // Out of order, different, or another kind of TCP packet of the flow (a bare ACK,
            // a FIN): the flow's packet is finished, and this one is written after it.
            self.close(k);
        }
        let Some(s) = seg else {
            return;
        };
        if s.payload >= MIN_SEGMENT && !s.psh && checksum_ok(self.out[i].packet(), &s) {
            if self.opens.len() == MAX_OPEN {
                self.close(0);
            }
            self.opens.push(Open {
                idx: i,
                v6: s.v6,
                iph: s.iph,
                hdrs: s.hdrs,
                gso: s.payload,
                next_seq: s.seq.wrapping_add(s.payload as u32),
                last_id: s.id,
                id_step: None,
                segs: 1,
            });
            self.last = Some(self.opens.len() - 1);
        }
    }

    /// No more segments join `opens[k]`: give it its virtio-net header.
    fn close(&mut self, k: usize) {
        let o = self.opens.remove(k);
        self.last = match self.last {
            Some(l) if l == k => None,
            Some(l) if l > k => Some(l - 1),
            l => l,
        };
        if o.segs < 2 {
            return;
        }
        let b = &mut self.out[o.idx];
        let len = b.len;
        let pkt = &mut b.data[HDR..HDR + len];
        if o.v6 {
            pkt[4..6].copy_from_slice(&((len - 40) as u16).to_be_bytes());
        } else {
            pkt[2..4].copy_from_slice(&(len as u16).to_be_bytes());
            pkt[10..12].fill(0);
            let sum = !checksum(&pkt[..20], 0);
            pkt[10..12].copy_from_slice(&sum.to_be_bytes());
        }
        // Checksum partial: the TCP checksum field holds the pseudo-header's sum, and the
        // kernel finishes it (or trusts it, delivering locally).
        let sum = checksum(&[], pseudo(pkt, o.v6, len - o.iph));
        pkt[o.iph + 16..o.iph + 18].copy_from_slice(&sum.to_be_bytes());
        let hdr = VirtioNetHdr {
            flags: NEEDS_CSUM,
            gso_type: if o.v6 { GSO_TCPV6 } else { GSO_TCPV4 },
            hdr_len: o.hdrs as u16,
            gso_size: o.gso as u16,
            csum_start: o.iph as u16,
            csum_offset: 16,
        };
        let _ = hdr.encode(&mut b.data[..HDR]);
    }

    /// Ends every open packet.
    fn close_all(&mut self) {
        while !self.opens.is_empty() {
            self.close(self.opens.len() - 1);
        }
    }

    /// Writes what is ready to `tun`: everything, or with `keep_open` all but the packets
    /// more segments may still join.
    pub fn flush(&mut self, tun: BorrowedFd<'_>, keep_open: bool) {
        self.drain(keep_open, |pkt| {
            nix::unistd::write(tun, pkt).map(|_| ()).map_err(|_| ())
        });
    }

    /// Hands each buffer ready to go (virtio-net header and packet) to `write`, in order:
    /// everything, or with `keep_open` all but the packets more segments may still join. An
    /// `Err` from `write` counts as a write the TUN refused. [`Self::flush`] writes them to the
    /// TUN; this is for whatever else takes them (a test, a fuzzer). Call it between a
    /// [`Self::commit`] or [`Self::discard`] and the next [`Self::slot`].
    pub fn drain(&mut self, keep_open: bool, mut write: impl FnMut(&[u8]) -> Result<(), ()>) {
        debug_assert!(matches!(self.slot, Slot::None));
        if !keep_open {
            self.close_all();
        }
        let mut kept = 0;
        let out = std::mem::take(&mut self.out);
        for (i, b) in out.into_iter().enumerate() {
            if let Some(o) = self.opens.iter_mut().find(|o| o.idx == i) {
                o.idx = kept;
                kept += 1;
                self.out.push(b);
                continue;
            }
            self.counts.writes += 1;
            if write(&b.data[..HDR + b.len]).is_err() {
                self.counts.errors += 1;
            }
            self.pool.push(b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An IPv4 or IPv6 TCP segment with a correct checksum and a timestamp option.
    fn segment(v6: bool, seq: u32, id: u16, payload: &[u8], flags: u8) -> Vec<u8> {
        let iph = if v6 { 40 } else { 20 };
        let tcph = 32;
        let len = iph + tcph + payload.len();
        let mut p = vec![0u8; len];
        if v6 {
            p[0] = 0x60;
            p[4..6].copy_from_slice(&((len - 40) as u16).to_be_bytes());
            p[6] = TCP;
            p[7] = 64;
            p[8..24].copy_from_slice(
                &"fd00:1:1::10"
                    .parse::<std::net::Ipv6Addr>()
                    .unwrap()
                    .octets(),
            );
            p[24..40].copy_from_slice(
                &"fd00:1:2::10"
                    .parse::<std::net::Ipv6Addr>()
                    .unwrap()
                    .octets(),
            );
        } else {
            p[0] = 0x45;
            p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
            p[4..6].copy_from_slice(&id.to_be_bytes());
            p[6] = 0x40;
            p[8] = 64;
            p[9] = TCP;
            p[12..16].copy_from_slice(&[10, 128, 0, 10]);
            p[16..20].copy_from_slice(&[10, 128, 1, 10]);
            let sum = !checksum(&p[..20], 0);
            p[10..12].copy_from_slice(&sum.to_be_bytes());
        }
        let t = &mut p[iph..];
        t[0..2].copy_from_slice(&40000u16.to_be_bytes());
        t[2..4].copy_from_slice(&5201u16.to_be_bytes());
        t[4..8].copy_from_slice(&seq.to_be_bytes());
        t[8..12].copy_from_slice(&7u32.to_be_bytes());
        t[12] = (tcph as u8 / 4) << 4;
        t[13] = flags;
        t[14..16].copy_from_slice(&512u16.to_be_bytes());
        t[20..32].copy_from_slice(&[1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2]);
        t[32..].copy_from_slice(payload);
        let sum = tcp_checksum(&p, iph);
        p[iph + 16..iph + 18].copy_from_slice(&sum.to_be_bytes());
        p
    }

    /// RFC 1071 over the pseudo-header and the segment, written out plainly, independent of
    /// the code under test; the checksum field must be zero.
    fn tcp_checksum(p: &[u8], iph: usize) -> u16 {
        let addrs = if iph == 40 { &p[8..40] } else { &p[12..20] };
        let mut bytes = addrs.to_vec();
        bytes.extend_from_slice(&[0, TCP]);
        bytes.extend_from_slice(&((p.len() - iph) as u16).to_be_bytes());
        bytes.extend_from_slice(&p[iph..]);
        if bytes.len() % 2 == 1 {
            bytes.push(0);
        }
        let mut sum: u32 = 0;
        for w in bytes.chunks(2) {
            sum += u32::from(u16::from_be_bytes([w[0], w[1]]));
        }
        while sum > 0xffff {
            sum = (sum >> 16) + (sum & 0xffff);
        }
        !(sum as u16)
    }

    #[test]
    fn checksums_agree_with_a_plain_rfc_1071_sum_and_a_real_segment() {
        // The test's segments carry checksums from the plain sum; odd lengths pad with zero.
        for v6 in [false, true] {
            for n in [1, 7, 1388] {
                let mut p = segment(v6, 5, 9, &payload(n, 3), ACK);
                let s = Seg::parse(&p).unwrap();
                assert!(checksum_ok(&p, &s), "v6 {v6} n {n}");
                p[s.iph + 16] ^= 0x80;
                assert!(!checksum_ok(&p, &s));
            }
        }
    }

    /// Feeds `pkts` through slot/commit as the edge does; returns what would be written.
    fn run(pkts: &[Vec<u8>]) -> (Vec<Vec<u8>>, CoalesceCounts) {
        let mut c = Coalescer::new();
        for p in pkts {
            // The decryption writes the packet and then some (WireGuard's padding).
            let slot = c.slot(p.len() + 16);
            slot[..p.len()].copy_from_slice(p);
            slot[p.len()..p.len() + 16].fill(0xee);
            c.commit(p.len());
        }
        let mut written = Vec::new();
        c.drain(false, |b| {
            written.push(b.to_vec());
            Ok(())
        });
        (written, c.counts())
    }

    fn payload(n: usize, seed: u8) -> Vec<u8> {
        (0..n)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    /// Splits a written buffer back into segments the way the kernel's GSO would, checking
    /// the virtio-net header and the headers of the coalesced packet; returns each segment's
    /// (source port, sequence number, payload).
    fn resegment(b: &[u8]) -> Vec<(u16, u32, Vec<u8>)> {
        let (hdr, pkt) = b.split_at(HDR);
        let s = Seg::parse(pkt);
        let port = |p: &[u8], iph: usize| u16::from_be_bytes([p[iph], p[iph + 1]]);
        if hdr.iter().all(|&x| x == 0) {
            return match s {
                Some(s) => vec![(port(pkt, s.iph), s.seq, pkt[s.hdrs..].to_vec())],
                None => vec![(0, 0, pkt.to_vec())],
            };
        }
        let s = s.expect("a coalesced packet parses");
        assert_eq!(hdr[0], NEEDS_CSUM);
        assert_eq!(hdr[1], if s.v6 { GSO_TCPV6 } else { GSO_TCPV4 });
        let field = |i: usize| usize::from(u16::from_ne_bytes([hdr[i], hdr[i + 1]]));
        let (hdr_len, gso, csum_start) = (field(2), field(4), field(6));
        assert_eq!((hdr_len, csum_start, field(8)), (s.hdrs, s.iph, 16));
        assert!(pkt.len() <= MAX_IP);
        if !s.v6 {
            assert_eq!(checksum(&pkt[..20], 0), 0xffff, "IPv4 header checksum");
        }
        // Partial: the field holds the pseudo-header's sum, and what the kernel then does
        // (sum from csum_start to the end, complement, store) gives the packet's checksum.
        let mut done = pkt.to_vec();
        let mut sum: u32 = 0;
        let tcp = &pkt[s.iph..];
        for w in tcp.chunks(2) {
            sum += u32::from(u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)]));
        }
        while sum > 0xffff {
            sum = (sum >> 16) + (sum & 0xffff);
        }
        done[s.iph + 16..s.iph + 18].fill(0);
        assert_eq!(
            !(sum as u16),
            tcp_checksum(&done, s.iph),
            "partial checksum"
        );
        pkt[hdr_len..]
            .chunks(gso)
            .enumerate()
            .map(|(i, c)| {
                let seq = s.seq.wrapping_add((i * gso) as u32);
                (port(pkt, s.iph), seq, c.to_vec())
            })
            .collect()
    }

    fn segments(pkts: &[Vec<u8>]) -> Vec<(u16, u32, Vec<u8>)> {
        pkts.iter()
            .map(|p| resegment(&[&[0u8; HDR][..], p].concat()).remove(0))
            .collect()
    }

    /// Per flow (source port), the segments in order.
    fn by_flow(
        segs: Vec<(u16, u32, Vec<u8>)>,
    ) -> std::collections::BTreeMap<u16, Vec<(u32, Vec<u8>)>> {
        let mut m = std::collections::BTreeMap::<u16, Vec<_>>::new();
        for (port, seq, data) in segs {
            m.entry(port).or_default().push((seq, data));
        }
        m
    }

    fn flow(v6: bool, port: u16, seq: u32, n: usize, size: usize) -> Vec<Vec<u8>> {
        (0..n)
            .map(|i| {
                let mut p = segment(
                    v6,
                    seq + (i * size) as u32,
                    100 + i as u16,
                    &payload(size, i as u8),
                    ACK,
                );
                set_port(&mut p, port);
                p
            })
            .collect()
    }

    fn set_port(p: &mut [u8], port: u16) {
        let (_, iph) = tcp_header_at(p).unwrap();
        p[iph..iph + 2].copy_from_slice(&port.to_be_bytes());
        p[iph + 16..iph + 18].fill(0);
        let sum = tcp_checksum(p, iph);
        p[iph + 16..iph + 18].copy_from_slice(&sum.to_be_bytes());
    }

    fn check_lossless(pkts: &[Vec<u8>], written: &[Vec<u8>]) {
        let got: Vec<_> = written.iter().flat_map(|b| resegment(b)).collect();
        assert_eq!(by_flow(got), by_flow(segments(pkts)));
    }

    #[test]
    fn in_order_segments_of_one_flow_become_one_write_with_every_byte_in_place() {
        for v6 in [false, true] {
            let mut pkts = flow(v6, 40000, 1000, 29, 1400);
            pkts.push(segment(
                v6,
                1000 + 29 * 1400,
                129,
                &payload(700, 9),
                ACK | PSH,
            ));
            let (w, counts) = run(&pkts);
            assert_eq!(w.len(), 1, "v6 {v6}");
            assert_eq!((counts.packets, counts.writes, counts.errors), (30, 1, 0));
            check_lossless(&pkts, &w);
            // PSH on the last segment is carried on the coalesced packet.
            let s = Seg::parse(&w[0][HDR..]).unwrap();
            assert!(s.psh);
        }
    }

    #[test]
    fn a_coalesced_packet_stops_at_64_kilobytes() {
        let pkts = flow(false, 40000, 1, 100, 1400);
        let (w, _) = run(&pkts);
        assert_eq!(w.len(), 3, "46 + 46 + 8 segments");
        check_lossless(&pkts, &w);
    }

    #[test]
    fn a_bad_checksum_a_gap_or_a_changed_header_ends_the_packet_and_loses_nothing() {
        let mut pkts = flow(false, 40000, 1, 20, 1400);
        pkts[5][40] ^= 0xff; // a payload byte: the checksum no longer matches
        pkts.swap(10, 11); // out of order
        pkts[15][8] = 12; // another TTL
        let (w, counts) = run(&pkts);
        assert_eq!(counts.packets, 20);
        // [0..5) [5] [6..10) [11] [10] [12..15) [15] [16..20): 15's TTL differs from both
        // sides.
        assert_eq!(w.len(), 8);
        check_lossless(&pkts, &w);
        // The corrupt segment is written alone, as it came, for the kernel to drop.
        assert_eq!(w[1][HDR..], pkts[5][..]);
    }

    #[test]
    fn interleaved_flows_each_coalesce_and_other_packets_pass_through() {
        let a = flow(false, 40000, 1, 20, 1400);
        let b = flow(false, 40001, 9, 20, 1200);
        let c = flow(true, 40002, 5, 20, 1000);
        let mut udp = segment(false, 0, 0, &payload(300, 1), ACK);
        udp[9] = 17;
        let mut ack = segment(false, 77, 1, &[], ACK);
        set_port(&mut ack, 40099);
        let mut pkts = Vec::new();
        for i in 0..20 {
            pkts.extend([a[i].clone(), b[i].clone(), c[i].clone()]);
            if i % 7 == 3 {
                pkts.extend([udp.clone(), ack.clone()]);
            }
        }
        let (w, counts) = run(&pkts);
        assert_eq!(counts.packets as usize, pkts.len());
        // One write per flow, one per UDP packet and pure ACK.
        assert_eq!(w.len(), 3 + 2 * 3);
        check_lossless(&pkts, &w);
    }

    #[test]
    fn another_tcp_packet_of_the_flow_ends_its_packet_so_order_is_kept() {
        let a = flow(false, 40000, 1, 10, 1400);
        let fin = segment(false, 1 + 5 * 1400, 200, &[], ACK | 0x01);
        let pkts = [&a[..5], std::slice::from_ref(&fin), &a[5..]].concat();
        let (w, _) = run(&pkts);
        assert_eq!(w.len(), 3);
        assert_eq!(w[1][HDR..], fin[..]);
    }

    #[test]
    fn a_discarded_slot_behind_an_open_packet_leaves_it_intact() {
        let pkts = flow(false, 40000, 1, 10, 1400);
        let mut c = Coalescer::new();
        for (i, p) in pkts.iter().enumerate() {
            c.slot(p.len() + 16)[..p.len()].copy_from_slice(p);
            c.commit(p.len());
            // A probe or a failed decryption scribbles over the slot and goes nowhere.
            let junk = c.slot(1500);
            junk[..200].fill(i as u8);
            assert_eq!(c.packet(200)[0], i as u8);
            c.discard();
        }
        let mut w = Vec::new();
        c.drain(false, |b| {
            w.push(b.to_vec());
            Ok(())
        });
        assert_eq!(w.len(), 1);
        check_lossless(&pkts, &w);
    }

    #[test]
    fn keep_open_writes_finished_packets_and_keeps_the_one_still_growing() {
        let a = flow(false, 40000, 1, 10, 1400);
        let mut c = Coalescer::new();
        let mut w = Vec::new();
        let feed = |c: &mut Coalescer, p: &Vec<u8>| {
            c.slot(p.len())[..p.len()].copy_from_slice(p);
            c.commit(p.len());
        };
        let mut udp = segment(false, 0, 0, &payload(300, 1), ACK);
        udp[9] = 17;
        for p in &a[..5] {
            feed(&mut c, p);
        }
        feed(&mut c, &udp);
        c.drain(true, |b| {
            w.push(b.to_vec());
            Ok(())
        });
        assert_eq!(w.len(), 1, "the UDP packet");
        for p in &a[5..] {
            feed(&mut c, p);
        }
        c.drain(false, |b| {
            w.push(b.to_vec());
            Ok(())
        });
        assert_eq!(w.len(), 2);
        check_lossless(&[a, vec![udp]].concat(), &w);
    }

    #[test]
    fn random_arrivals_are_never_lost_reordered_within_a_flow_or_corrupted() {
        let mut rng = patronus_lab::stats::SplitMix64(0x9e37_79b9_7f4a_7c15);
        let mut next = move || rng.next_u64();
        for _ in 0..200 {
            let mut flows: Vec<_> = (0..3u16)
                .map(|f| {
                    flow(
                        f == 2,
                        40000 + f,
                        f as u32 * 1000,
                        40,
                        300 + 500 * f as usize,
                    )
                })
                .collect();
            let mut pkts = Vec::new();
            while flows.iter().any(|f| !f.is_empty()) {
                let f = (next() % 3) as usize;
                if flows[f].is_empty() {
                    continue;
                }
                let mut p = flows[f].remove(0);
                match next() % 40 {
                    0 => {
                        let last = p.len() - 1;
                        p[last] ^= 1;
                    }
                    1 => p.truncate(p.len() - 100),
                    2 if flows[f].len() > 1 => flows[f].swap(0, 1),
                    _ => {}
                }
                pkts.push(p);
            }
            let (w, counts) = run(&pkts);
            assert_eq!(counts.packets as usize, pkts.len());
            check_lossless(&pkts, &w);
        }
    }
}
