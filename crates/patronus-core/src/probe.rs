//! The probe codec: path measurement packets laid out after STAMP (RFC 8762, unauthenticated
//! mode) with the session identifier of RFC 8972, so the same code can serve a standards-based
//! reflector later.
//!
//! A probe travels as the UDP payload of an IP packet sent inside the WireGuard tunnel of the
//! path it measures (to the peer's overlay address, STAMP port 862), so the tunnel authenticates
//! it; this codec still refuses anything malformed, truncated, of an unknown version or of the
//! wrong kind, and the sender side ([`crate::Engine::handle_probe_reply`]) refuses replies that
//! are stale, duplicated, echo a timestamp it never sent, or arrive on another path.
//!
//! Both packets are 60 bytes (requests are as long as replies, as RFC 8762 section 4.2.1 asks,
//! so a reflector never amplifies):
//!
//! ```text
//! request (session-sender)                 reply (session-reflector)
//!  0 sequence number            u32         0 sequence number (= request's)  u32
//!  4 T1 transmit timestamp      NTP 64      4 T3 transmit timestamp          NTP 64
//! 12 error estimate             u16        12 error estimate                 u16
//! 14 SSID (path id, low 16 bits) u16       14 SSID (echoed)                  u16
//! 16 heard (see below)          u32        16 T2 receive timestamp           NTP 64
//! 20 MBZ                        24 bytes
//!                                          24 session-sender sequence number u32
//!                                          28 session-sender timestamp T1    NTP 64
//!                                          36 session-sender error estimate  u16
//!                                          38 MBZ                            2 bytes
//!                                          40 session-sender TTL             u8
//!                                          41 MBZ                            3 bytes
//! 44 Patronus TLV (RFC 8972 section 4 layout), echoed by the reflector with kind = reply:
//!    44 flags u8 = 0 | 45 type u8 = 252 (private use) | 46 length u16 = 12
//!    48 version u8 = 1 | 49 kind u8 (1 request, 2 reply) | 50 reserved u16 = 0
//!    52 path id u32 (the sender's) | 56 sender instance u32 (changes on every restart)
//! ```
//!
//! **What the sender hears** (the path's other direction). A request's `heard` field says how long
//! ago, in microseconds plus one, the sender last received anything from the reflector on this
//! path (data, probes, replies); 0 means "not carried". It travels in the direction opposite to
//! the reflector's own traffic, so it tells the reflector whether *its* sending direction works
//! even while its own probes are unanswered: a path whose one direction died is then detected by
//! both ends, and traffic the peer acknowledges this way is evidence of life for both directions.
//!
//! Edges of the first codec revision refuse a request whose bytes 16..44 are not zero, and
//! ignore the TLV's flags byte. So every packet an edge of this revision sends sets bit 0 of the
//! flags byte
//! ([`FLAG_HEARD`]: "I read the heard field"), and a sender fills `heard` only on a path where
//! a packet from the peer carried that bit. Old and new edges keep measuring each other.
//!
//! All integers are big-endian. Timestamps are in NTP 32.32 format (RFC 5905) counted from an
//! epoch of the sender's choosing: only differences are used, and each difference is taken
//! between two timestamps of the same clock, so the reflector needs no synchronized clock.

use std::time::Duration;

/// The length of every probe packet, request or reply.
pub const PROBE_LEN: usize = 60;
/// The UDP port probes are sent to (STAMP's well-known port).
pub const STAMP_PORT: u16 = 862;
/// The codec version this build speaks.
pub const VERSION: u8 = 1;

const BASE_LEN: usize = 44;
const TLV_TYPE: u8 = 252;
const TLV_VALUE_LEN: u16 = 12;
const KIND_REQUEST: u8 = 1;
const KIND_REPLY: u8 = 2;
/// RFC 4656 error estimate: S=0 (not synchronized), Z=0 (NTP format), scale 12, multiplier 1:
/// an error of 2^-20 s, about 1 µs, the resolution of the timestamps the edge takes.
const ERROR_ESTIMATE: u16 = (12 << 8) | 1;
/// Bit of the TLV's flags byte set by every packet of this revision: "I read `heard`".
/// (RFC 8972 defines the byte's three high bits; the low ones are unused.)
pub const FLAG_HEARD: u8 = 0x01;

/// A timestamp in NTP 32.32 fixed-point format: seconds in the high 32 bits, the fraction of a
/// second in the low 32. Arithmetic wraps, as NTP's does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct NtpTime(pub u64);

impl NtpTime {
    /// The timestamp `d` after the epoch.
    pub fn from_duration(d: Duration) -> Self {
        let secs = d.as_secs() as u32 as u64;
        // Rounded to the nearest 2^-32 s, so a round trip through NTP loses under a nanosecond.
        let frac = ((u64::from(d.subsec_nanos()) << 32) + 500_000_000) / 1_000_000_000;
        NtpTime((secs << 32) | frac)
    }

    /// `self - earlier` in nanoseconds, negative when `self` is the earlier one. Correct across
    /// the 136-year wrap as long as the two are less than 68 years apart.
    pub fn nanos_since(self, earlier: NtpTime) -> i64 {
        let diff = self.0.wrapping_sub(earlier.0) as i64;
        ((i128::from(diff) * 1_000_000_000 + (1 << 31)) >> 32) as i64
    }
}

/// What a session-sender sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbeRequest {
    pub seq: u32,
    /// T1: when the sender sent it, by the sender's clock.
    pub t1: NtpTime,
    /// The sender's path id.
    pub path: u32,
    /// The sender's instance tag; replies to a previous run of the sender carry another one.
    pub instance: u32,
    /// How long before sending this the sender last heard from the reflector on this path;
    /// `None` when not carried. Whole microseconds, saturating at about 71 minutes.
    pub heard: Option<Duration>,
    /// The sender reads `heard` fields ([`FLAG_HEARD`]).
    pub reads_heard: bool,
}

/// What a session-reflector sends back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbeReply {
    /// The request, as echoed.
    pub request: ProbeRequest,
    /// T2: when the reflector received the request, by the reflector's clock.
    pub t2: NtpTime,
    /// T3: when the reflector sent the reply, by the reflector's clock.
    pub t3: NtpTime,
    /// The TTL (hop limit) the request arrived with, as the reflector saw it; 0 if unknown.
    pub sender_ttl: u8,
    /// The reflector reads `heard` fields ([`FLAG_HEARD`]).
    pub reads_heard: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ProbeError {
    #[error("probe is {0} bytes, expected {PROBE_LEN}")]
    BadLength(usize),
    #[error("no Patronus TLV (type {TLV_TYPE}, length {TLV_VALUE_LEN}): not a Patronus probe")]
    NotAProbe,
    #[error("probe version {0} is not supported (this build speaks {VERSION})")]
    UnsupportedVersion(u8),
    #[error("expected a probe {expected}, got kind {got}")]
    WrongKind { expected: &'static str, got: u8 },
    #[error("must-be-zero field at offset {0} is not zero")]
    NonZeroMbz(usize),
    #[error("SSID {ssid} does not match path id {path}")]
    SsidMismatch { ssid: u16, path: u32 },
    #[error("reply echoes sequence number {echoed} but is numbered {seq}")]
    SeqMismatch { seq: u32, echoed: u32 },
    // The rest are found by the sender, which knows what it sent.
    #[error("no path {0}")]
    UnknownPath(u32),
    #[error("reply is for path {got}, but arrived on path {expected}")]
    WrongPath { expected: u32, got: u32 },
    #[error("reply is for sender instance {got}, this sender is {expected}: stale")]
    WrongInstance { expected: u32, got: u32 },
    #[error("reply to probe {0}, which is not outstanding: stale")]
    Stale(u32),
    #[error("second reply to probe {0}")]
    Duplicate(u32),
    #[error("reply echoes a T1 that probe {0} was not sent with")]
    EchoMismatch(u32),
    #[error("reflector timestamps are inconsistent (dwell {dwell_ns} ns, round trip {rtt_ns} ns)")]
    BadTimestamps { dwell_ns: i64, rtt_ns: i64 },
}

fn put_u16(b: &mut [u8; PROBE_LEN], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_be_bytes());
}

fn put_u32(b: &mut [u8; PROBE_LEN], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

fn put_u64(b: &mut [u8; PROBE_LEN], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_be_bytes());
}

fn get_u16(b: &[u8; PROBE_LEN], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn get_u32(b: &[u8; PROBE_LEN], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn get_u64(b: &[u8; PROBE_LEN], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(x)
}

fn check_zero(b: &[u8; PROBE_LEN], from: usize, to: usize) -> Result<(), ProbeError> {
    match b[from..to].iter().position(|&x| x != 0) {
        Some(i) => Err(ProbeError::NonZeroMbz(from + i)),
        None => Ok(()),
    }
}

fn put_tlv(b: &mut [u8; PROBE_LEN], kind: u8, path: u32, instance: u32, reads_heard: bool) {
    b[44] = if reads_heard { FLAG_HEARD } else { 0 };
    b[45] = TLV_TYPE;
    put_u16(b, 46, TLV_VALUE_LEN);
    b[48] = VERSION;
    b[49] = kind;
    put_u16(b, 50, 0);
    put_u32(b, 52, path);
    put_u32(b, 56, instance);
}

/// Checks the length and the TLV; returns the packet as an array with its kind, path and
/// instance.
fn check_tlv(bytes: &[u8]) -> Result<(&[u8; PROBE_LEN], u8, u32, u32), ProbeError> {
    let b: &[u8; PROBE_LEN] = bytes
        .try_into()
        .map_err(|_| ProbeError::BadLength(bytes.len()))?;
    // The TLV's flags byte may carry RFC 8972's U/M/I bits from a reflector; the type and
    // length say whether this is ours at all.
    if b[45] != TLV_TYPE || get_u16(b, 46) != TLV_VALUE_LEN {
        return Err(ProbeError::NotAProbe);
    }
    if b[48] != VERSION {
        return Err(ProbeError::UnsupportedVersion(b[48]));
    }
    check_zero(b, 50, 52)?;
    let path = get_u32(b, 52);
    let ssid = get_u16(b, 14);
    if ssid != path as u16 {
        return Err(ProbeError::SsidMismatch { ssid, path });
    }
    Ok((b, b[49], path, get_u32(b, 56)))
}

impl ProbeRequest {
    pub fn encode(&self) -> [u8; PROBE_LEN] {
        let mut b = [0u8; PROBE_LEN];
        put_u32(&mut b, 0, self.seq);
        put_u64(&mut b, 4, self.t1.0);
        put_u16(&mut b, 12, ERROR_ESTIMATE);
        // RFC 8972's SSID is 16 bits; the TLV carries the full path id.
        put_u16(&mut b, 14, self.path as u16);
        if let Some(h) = self.heard {
            let us = u32::try_from(h.as_micros()).unwrap_or(u32::MAX - 1);
            put_u32(&mut b, 16, us.saturating_add(1));
        }
        put_tlv(
            &mut b,
            KIND_REQUEST,
            self.path,
            self.instance,
            self.reads_heard,
        );
        b
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, ProbeError> {
        let (b, kind, path, instance) = check_tlv(bytes)?;
        if kind != KIND_REQUEST {
            return Err(ProbeError::WrongKind {
                expected: "request",
                got: kind,
            });
        }
        check_zero(b, 20, BASE_LEN)?;
        let heard = get_u32(b, 16);
        Ok(ProbeRequest {
            seq: get_u32(b, 0),
            t1: NtpTime(get_u64(b, 4)),
            path,
            instance,
            heard: (heard > 0).then(|| Duration::from_micros(u64::from(heard - 1))),
            reads_heard: b[44] & FLAG_HEARD != 0,
        })
    }
}

impl ProbeReply {
    pub fn encode(&self) -> [u8; PROBE_LEN] {
        let r = &self.request;
        let mut b = [0u8; PROBE_LEN];
        // A stateless reflector numbers its reply with the request's sequence number
        // (RFC 8762 section 4.3.1).
        put_u32(&mut b, 0, r.seq);
        put_u64(&mut b, 4, self.t3.0);
        put_u16(&mut b, 12, ERROR_ESTIMATE);
        put_u16(&mut b, 14, r.path as u16);
        put_u64(&mut b, 16, self.t2.0);
        put_u32(&mut b, 24, r.seq);
        put_u64(&mut b, 28, r.t1.0);
        put_u16(&mut b, 36, ERROR_ESTIMATE);
        b[40] = self.sender_ttl;
        put_tlv(&mut b, KIND_REPLY, r.path, r.instance, self.reads_heard);
        b
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, ProbeError> {
        let (b, kind, path, instance) = check_tlv(bytes)?;
        if kind != KIND_REPLY {
            return Err(ProbeError::WrongKind {
                expected: "reply",
                got: kind,
            });
        }
        check_zero(b, 38, 40)?;
        check_zero(b, 41, BASE_LEN)?;
        let seq = get_u32(b, 0);
        let echoed = get_u32(b, 24);
        if seq != echoed {
            return Err(ProbeError::SeqMismatch { seq, echoed });
        }
        Ok(ProbeReply {
            request: ProbeRequest {
                seq: echoed,
                t1: NtpTime(get_u64(b, 28)),
                path,
                instance,
                // A reply does not echo these.
                heard: None,
                reads_heard: false,
            },
            t2: NtpTime(get_u64(b, 16)),
            t3: NtpTime(get_u64(b, 4)),
            sender_ttl: b[40],
            reads_heard: b[44] & FLAG_HEARD != 0,
        })
    }
}

/// The reflector: answers a request received at `t2` with a reply sent at `t3` (both by the
/// reflector's clock). Stateless, so any number of senders and paths can share it.
pub fn reflect(
    request: &[u8],
    t2: NtpTime,
    t3: NtpTime,
    sender_ttl: u8,
) -> Result<[u8; PROBE_LEN], ProbeError> {
    let request = ProbeRequest::decode(request)?;
    Ok(ProbeReply {
        request,
        t2,
        t3,
        sender_ttl,
        reads_heard: true,
    }
    .encode())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req() -> ProbeRequest {
        ProbeRequest {
            seq: 7,
            t1: NtpTime::from_duration(Duration::from_millis(1500)),
            path: 0x0001_0002,
            instance: 0xdead_beef,
            heard: None,
            reads_heard: true,
        }
    }

    #[test]
    fn a_request_round_trips_and_the_reflector_echoes_it() {
        let r = req();
        let bytes = r.encode();
        assert_eq!(ProbeRequest::decode(&bytes), Ok(r));
        let t2 = NtpTime::from_duration(Duration::from_secs(100));
        let t3 = NtpTime::from_duration(Duration::from_micros(100_000_050));
        let reply = ProbeReply::decode(&reflect(&bytes, t2, t3, 64).unwrap()).unwrap();
        assert_eq!(
            reply.request,
            ProbeRequest {
                reads_heard: false,
                ..r
            }
        );
        assert_eq!((reply.t2, reply.t3, reply.sender_ttl), (t2, t3, 64));
        assert!(reply.reads_heard);
        assert_eq!(reply.t3.nanos_since(reply.t2), 50_000);
    }

    #[test]
    fn heard_round_trips_in_microseconds_and_a_first_revision_request_carries_none() {
        for (heard, read) in [
            (Duration::ZERO, Duration::ZERO),
            (
                Duration::from_nanos(20_001_999),
                Duration::from_micros(20_001),
            ),
            (
                Duration::from_secs(1 << 40),
                Duration::from_micros(u64::from(u32::MAX) - 1),
            ),
        ] {
            let r = ProbeRequest {
                heard: Some(heard),
                ..req()
            };
            let got = ProbeRequest::decode(&r.encode()).unwrap();
            assert_eq!(got.heard, Some(read), "{heard:?}");
        }
        // What an edge of the first revision sends: zeros at 16..44, no flag.
        let mut old = req().encode();
        old[44] = 0;
        let got = ProbeRequest::decode(&old).unwrap();
        assert_eq!((got.heard, got.reads_heard), (None, false));
        // What it accepts: a request without `heard` (only the flags byte differs, which it
        // does not read).
        let new = req().encode();
        assert_eq!(new[16..44], [0u8; 28]);
        assert_eq!(new[44], FLAG_HEARD);
    }

    #[test]
    fn requests_and_replies_are_not_mistaken_for_each_other() {
        let bytes = req().encode();
        assert_eq!(
            ProbeReply::decode(&bytes),
            Err(ProbeError::WrongKind {
                expected: "reply",
                got: 1
            })
        );
        let reply = reflect(&bytes, NtpTime(0), NtpTime(0), 0).unwrap();
        assert!(matches!(
            ProbeRequest::decode(&reply),
            Err(ProbeError::WrongKind {
                expected: "request",
                got: 2
            })
        ));
    }

    #[test]
    fn truncated_foreign_and_future_packets_are_refused() {
        let bytes = req().encode();
        assert_eq!(
            ProbeRequest::decode(&bytes[..59]),
            Err(ProbeError::BadLength(59))
        );
        assert_eq!(ProbeRequest::decode(&[]), Err(ProbeError::BadLength(0)));
        let mut long = bytes.to_vec();
        long.push(0);
        assert_eq!(ProbeRequest::decode(&long), Err(ProbeError::BadLength(61)));
        let mut foreign = bytes;
        foreign[45] = 1;
        assert_eq!(ProbeRequest::decode(&foreign), Err(ProbeError::NotAProbe));
        let mut future = bytes;
        future[48] = 2;
        assert_eq!(
            ProbeRequest::decode(&future),
            Err(ProbeError::UnsupportedVersion(2))
        );
        let mut mbz = bytes;
        mbz[30] = 1;
        assert_eq!(ProbeRequest::decode(&mbz), Err(ProbeError::NonZeroMbz(30)));
        let mut ssid = bytes;
        ssid[15] ^= 1;
        assert!(matches!(
            ProbeRequest::decode(&ssid),
            Err(ProbeError::SsidMismatch { .. })
        ));
    }

    #[test]
    fn ntp_differences_are_exact_to_the_nanosecond_scale_and_survive_the_wrap() {
        let a = NtpTime::from_duration(Duration::from_nanos(1_000_000_123));
        let b = NtpTime::from_duration(Duration::from_nanos(1_020_000_123));
        let d = b.nanos_since(a);
        assert!((19_999_999..=20_000_001).contains(&d), "{d}");
        assert!((-20_000_001..=-19_999_999).contains(&a.nanos_since(b)));
        let before_wrap = NtpTime(0u64.wrapping_sub(1 << 31)); // half a second before the wrap
        let after_wrap = NtpTime(1 << 31); // half a second after
        assert_eq!(after_wrap.nanos_since(before_wrap), 1_000_000_000);
    }
}
