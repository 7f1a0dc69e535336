//! A constant-rate UDP stream with sequence numbers and send timestamps, for measuring loss,
//! outages and one-way delay between two namespaces of a lab.
//!
//! # What it reports
//!
//! - `lost` = packets sent − distinct packets received; `loss_pct` over the packets sent.
//! - **Loss-derived outage** (RFC 6412 §3.2 / RFC 6413 §4.2 "loss-derived method"): packets lost
//!   divided by the offered rate, in milliseconds. With one outage in a stream this is the
//!   outage's length, resolved to one packet interval; `gaps` lists each run of consecutive lost
//!   packets with its own loss-derived duration, so that several cuts in one stream can be told
//!   apart.
//! - The longest run of lost packets, and the longest time between two arrivals.
//! - Duplicates and reordered packets (a packet whose sequence number is below one already seen).
//! - **One-way delay** (receive time − send time). Both ends run in this process and read the same
//!   `CLOCK_MONOTONIC`, so the difference is the true one-way delay, with no clock offset. Its mean,
//!   standard deviation, nearest-rank percentiles, and the RFC 3550 interarrival jitter (the
//!   smoothed mean of |ΔD| between consecutive arrivals, gain 1/16).
//! - When the sender sent its first and last packet (Unix ms), to place the stream beside
//!   events that other processes stamp, such as an edge's.
//!
//! A figure that nothing measured is `None` (`null` in JSON), never 0: the loss of a stream
//! that sent nothing, the delay of one of which nothing arrived, jitter with fewer than two
//! arrivals, the mean burst length of a stream that lost nothing.
//!
//! The stream's packets are `magic "PLS1"`, a random stream id, a 64-bit sequence number and a
//! 64-bit send time, padded to `size`; anything else arriving on the port is ignored and counted.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::emulator::now_ns;
use crate::netns::{self, NetnsError};
use crate::stats::percentile;

const MAGIC: &[u8; 4] = b"PLS1";
/// Bytes of header in each stream packet; smaller sizes are raised to this.
pub const HEADER: usize = 24;
/// Longest list of gaps a report carries.
pub const MAX_GAPS: usize = 1000;
/// Most packets in one stream (the receiver keeps 25 bytes per packet).
pub const MAX_PACKETS: u64 = 10_000_000;

#[derive(Debug, Clone)]
pub struct StreamConfig {
    /// Packets per second (1..=1,000,000).
    pub rate_pps: u32,
    /// How long the sender sends (at most, with [`run_until`]).
    pub duration: Duration,
    /// UDP payload bytes per packet (at least [`HEADER`]).
    pub size: usize,
    /// Destination port (0: let the receiver pick one).
    pub port: u16,
    /// How long the receiver keeps listening after the last packet is sent; must exceed the
    /// path's delay or late packets count as lost.
    pub linger: Duration,
}

impl Default for StreamConfig {
    fn default() -> Self {
        Self {
            rate_pps: 1000,
            duration: Duration::from_secs(5),
            size: 200,
            port: 0,
            linger: Duration::from_secs(1),
        }
    }
}

/// One-way delay of the packets that arrived (at least one did).
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct DelayStats {
    pub mean_ms: f64,
    pub stddev_ms: f64,
    pub min_ms: f64,
    /// Nearest-rank percentiles ([`crate::stats::percentile`]).
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// RFC 3550 interarrival jitter: the smoothed (gain 1/16) |ΔD| at the end of the stream;
    /// `None` with a single arrival.
    pub jitter_ms: Option<f64>,
    /// Mean |IPDV| (RFC 5481) over all consecutive arrivals: the unsmoothed counterpart of
    /// `jitter_ms`, steadier for comparing runs. For independent normal delays of standard
    /// deviation σ it is 2σ/√π ≈ 1.13σ. `None` with a single arrival.
    pub ipdv_mean_ms: Option<f64>,
}

/// A run of consecutive lost packets.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Gap {
    /// Sequence number of the first lost packet.
    pub first_seq: u64,
    pub lost: u64,
    /// Loss-derived duration: `lost / rate`.
    pub ms: f64,
}

#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct StreamReport {
    pub rate_pps: u32,
    pub size: usize,
    pub sent: u64,
    /// Sends the kernel refused (e.g. no route): those packets are lost too.
    pub send_errors: u64,
    pub received: u64,
    pub lost: u64,
    /// `None` when nothing was sent.
    pub loss_pct: Option<f64>,
    /// Loss-derived outage time: `lost / rate_pps`, in ms (RFC 6412, RFC 6413).
    pub outage_ms: f64,
    pub duplicates: u64,
    pub reordered: u64,
    /// Datagrams on the port that were not this stream's.
    pub foreign: u64,
    /// Longest run of consecutive lost packets.
    pub longest_gap_packets: u64,
    /// Longest time between two consecutive arrivals, in ms; `None` with fewer than two.
    pub longest_silence_ms: Option<f64>,
    pub loss_bursts: u64,
    /// Mean length of a loss burst, in packets; `None` when nothing was lost.
    pub mean_burst: Option<f64>,
    /// `None` when nothing arrived.
    pub delay: Option<DelayStats>,
    /// When the first and the last packet were sent, Unix ms; `None` for a stream that never
    /// ran (a [`model`]).
    pub first_sent_unix_ms: Option<u64>,
    pub last_sent_unix_ms: Option<u64>,
    /// When the first packet was sent on this boot's `CLOCK_MONOTONIC`, ns ([`monotonic_ns`]):
    /// a gap's time is this plus its sequence number over the rate, and neither moves when the
    /// wall clock is stepped during a run (NTP on a VM does).
    pub first_sent_mono_ns: Option<u64>,
    pub gaps: Vec<Gap>,
}

/// Now on `CLOCK_MONOTONIC`, ns: the clock of [`StreamReport::first_sent_mono_ns`].
pub fn monotonic_ns() -> u64 {
    now_ns()
}

/// Watches and stops a running stream from another thread (see [`run_until`]).
#[derive(Debug, Default)]
pub struct Control {
    stop: AtomicBool,
    sent: AtomicU64,
}

impl Control {
    /// Asks the sender to stop after the packet it is sending (it sends at least one).
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
    }

    /// Packets sent so far.
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Acquire)
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("stream: {0}")]
    Config(String),
    #[error("stream: {0}")]
    Netns(NetnsError),
    #[error("stream: {what}: {error}")]
    Io {
        what: &'static str,
        error: std::io::Error,
    },
}

fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> StreamError {
    move |error| StreamError::Io { what, error }
}

/// One received packet: sequence number, receive time, send time (ns, CLOCK_MONOTONIC).
type Arrival = (u64, u64, u64);

/// Sends a stream from namespace `src_ns` to `dst` in namespace `dst_ns` and reports what
/// arrived. Blocks for `duration + linger`.
pub fn run(
    src_ns: &str,
    dst_ns: &str,
    dst: IpAddr,
    cfg: &StreamConfig,
) -> Result<StreamReport, StreamError> {
    run_until(src_ns, dst_ns, dst, cfg, &Control::default())
}

/// [`run`], which another thread can watch ([`Control::sent`]) and end early
/// ([`Control::stop`]): the sender sends until told to stop or for `duration`, whichever comes
/// first, then the receiver lingers as usual. Blocks until then.
pub fn run_until(
    src_ns: &str,
    dst_ns: &str,
    dst: IpAddr,
    cfg: &StreamConfig,
    control: &Control,
) -> Result<StreamReport, StreamError> {
    if !(1..=1_000_000).contains(&cfg.rate_pps) {
        return Err(StreamError::Config(format!(
            "rate {} pps is outside 1..=1000000",
            cfg.rate_pps
        )));
    }
    if cfg.size > 65_000 {
        return Err(StreamError::Config(format!(
            "size {} is over 65000",
            cfg.size
        )));
    }
    let size = cfg.size.max(HEADER);
    let count = (cfg.duration.as_secs_f64() * cfg.rate_pps as f64).round() as u64;
    if count > MAX_PACKETS {
        return Err(StreamError::Config(format!(
            "{count} packets (rate × duration) is more than one stream holds ({MAX_PACKETS})"
        )));
    }
    if count == 0 {
        return Err(StreamError::Config(format!(
            "rate × duration is no packet at all ({} pps for {:?})",
            cfg.rate_pps, cfg.duration
        )));
    }
    let stream_id = (now_ns() as u32) ^ std::process::id().rotate_left(16);
    let done = &AtomicBool::new(false);
    let (port_tx, port_rx) = mpsc::channel();

    std::thread::scope(|s| {
        let receiver = s.spawn(move || -> Result<(Vec<Arrival>, u64), StreamError> {
            let bound = netns::run_in(dst_ns, || {
                let any = match dst {
                    IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                    IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
                };
                Ok(UdpSocket::bind(SocketAddr::new(any, cfg.port))?)
            });
            let sock = match bound {
                Ok(s) => s,
                Err(e) => {
                    let _ = port_tx.send(None);
                    return Err(StreamError::Netns(e));
                }
            };
            let port = sock.local_addr().map_err(io("receiver address"))?.port();
            let _ = port_tx.send(Some(port));
            sock.set_read_timeout(Some(Duration::from_millis(10)))
                .map_err(io("receiver timeout"))?;
            let mut arrivals = Vec::with_capacity(count as usize + 16);
            let mut foreign = 0;
            let mut buf = vec![0u8; 65_536];
            let mut stop_at: Option<u64> = None;
            loop {
                match sock.recv(&mut buf) {
                    Ok(n) => {
                        let rx = now_ns();
                        match parse(&buf[..n], stream_id) {
                            Some((seq, tx)) => arrivals.push((seq, rx, tx)),
                            None => foreign += 1,
                        }
                    }
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) => {}
                    Err(e) => return Err(io("receiving")(e)),
                }
                if done.load(Ordering::Acquire) {
                    let t = *stop_at.get_or_insert(now_ns() + cfg.linger.as_nanos() as u64);
                    if now_ns() >= t {
                        return Ok((arrivals, foreign));
                    }
                }
            }
        });

        let sender = s.spawn(move || -> Result<(u64, u64, u64, u64, u64), StreamError> {
            let port = match port_rx.recv() {
                Ok(Some(p)) => p,
                _ => return Err(StreamError::Config("the receiver did not start".into())),
            };
            let r = netns::run_in(src_ns, || {
                // The sender's sleeps end when asked, not 50 µs later.
                let _ = nix::sys::prctl::set_timerslack(1);
                let any = match dst {
                    IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                    IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
                };
                let sock = UdpSocket::bind(SocketAddr::new(any, 0))?;
                let to = SocketAddr::new(dst, port);
                let mut pkt = vec![0u8; size];
                pkt[..4].copy_from_slice(MAGIC);
                pkt[4..8].copy_from_slice(&stream_id.to_be_bytes());
                let interval = 1e9 / cfg.rate_pps as f64;
                let start = now_ns();
                let mut errors = 0;
                let mut sent = 0;
                let (mut first_ms, mut last_ms, mut first_ns) = (0, 0, 0);
                for seq in 0..count {
                    if seq > 0 && control.stop.load(Ordering::Acquire) {
                        break;
                    }
                    let due = start + (seq as f64 * interval) as u64;
                    let now = now_ns();
                    if due > now {
                        std::thread::sleep(Duration::from_nanos(due - now));
                    }
                    pkt[8..16].copy_from_slice(&seq.to_be_bytes());
                    pkt[16..24].copy_from_slice(&now_ns().to_be_bytes());
                    if sock.send_to(&pkt, to).is_err() {
                        errors += 1;
                    }
                    last_ms = unix_ms();
                    if seq == 0 {
                        first_ms = last_ms;
                        first_ns = now_ns();
                    }
                    sent += 1;
                    control.sent.store(sent, Ordering::Release);
                }
                Ok((sent, errors, first_ms, last_ms, first_ns))
            });
            done.store(true, Ordering::Release);
            r.map_err(StreamError::Netns)
        });

        let sent = sender
            .join()
            .unwrap_or_else(|_| Err(StreamError::Config("the sender panicked".into())));
        done.store(true, Ordering::Release);
        let received = receiver
            .join()
            .unwrap_or_else(|_| Err(StreamError::Config("the receiver panicked".into())));
        // The receiver's error first: when it failed, the sender only knows that it did.
        let (arrivals, foreign) = received?;
        let (sent, send_errors, first_ms, last_ms, first_ns) = sent?;
        let mut r = report(cfg.rate_pps, size, sent, send_errors, &arrivals, foreign);
        r.first_sent_unix_ms = Some(first_ms);
        r.last_sent_unix_ms = Some(last_ms);
        r.first_sent_mono_ns = Some(first_ns);
        Ok(r)
    })
}

/// What a perfect emulator would report for this stream through one direction set to `imp`:
/// the same [`crate::impair::Shaper`] driven in virtual time, packets sent exactly on schedule
/// and delivered exactly at their release time. Measured reports are compared with this, so that
/// what is tested is the emulator's timing, not the statistics of the settings (the FIFO rule, for
/// one, narrows the delay's spread below `jitter`).
pub fn model(imp: &crate::impair::Impairment, cfg: &StreamConfig, seed: u64) -> StreamReport {
    let mut shaper = crate::impair::Shaper::new(imp.clone(), seed);
    let size = cfg.size.max(HEADER);
    let count = (cfg.duration.as_secs_f64() * cfg.rate_pps as f64).round() as u64;
    let interval = 1e9 / cfg.rate_pps as f64;
    let wire = size + 28; // the IPv4 and UDP headers the emulator sees
    let mut arrivals: Vec<Arrival> = (0..count)
        .filter_map(|seq| {
            let t = (seq as f64 * interval) as u64;
            shaper.admit(t, wire).ok().map(|r| (seq, r, t))
        })
        .collect();
    arrivals.sort_by_key(|a| (a.1, a.0));
    report(cfg.rate_pps, size, count, 0, &arrivals, 0)
}

fn parse(b: &[u8], stream_id: u32) -> Option<(u64, u64)> {
    if b.len() < HEADER || &b[..4] != MAGIC || b[4..8] != stream_id.to_be_bytes() {
        return None;
    }
    let seq = u64::from_be_bytes(b[8..16].try_into().ok()?);
    let tx = u64::from_be_bytes(b[16..24].try_into().ok()?);
    Some((seq, tx))
}

/// Computes the report from what arrived, in arrival order.
pub fn report(
    rate_pps: u32,
    size: usize,
    sent: u64,
    send_errors: u64,
    arrivals: &[Arrival],
    foreign: u64,
) -> StreamReport {
    let mut seen = vec![false; sent as usize];
    let mut duplicates = 0;
    let mut reordered = 0;
    let mut max_seq: Option<u64> = None;
    let mut delays = Vec::with_capacity(arrivals.len());
    let mut jitter = 0.0f64;
    let mut ipdv_sum = 0.0f64;
    let mut last_transit: Option<f64> = None;
    let mut longest_silence = 0u64;
    let mut foreign = foreign;
    for (i, &(seq, rx, tx)) in arrivals.iter().enumerate() {
        let Some(slot) = seen.get_mut(seq as usize) else {
            foreign += 1; // a sequence number never sent: not ours after all
            continue;
        };
        if *slot {
            duplicates += 1;
            continue;
        }
        *slot = true;
        if max_seq.is_some_and(|m| seq < m) {
            reordered += 1;
        }
        max_seq = Some(max_seq.map_or(seq, |m| m.max(seq)));
        let transit = rx as f64 - tx as f64;
        delays.push(transit / 1e6);
        if let Some(prev) = last_transit {
            jitter += ((transit - prev).abs() - jitter) / 16.0;
            ipdv_sum += (transit - prev).abs();
        }
        last_transit = Some(transit);
        if i > 0 {
            longest_silence = longest_silence.max(rx.saturating_sub(arrivals[i - 1].1));
        }
    }
    let received = seen.iter().filter(|s| **s).count() as u64;
    let lost = sent - received;
    let interval_ms = 1000.0 / rate_pps as f64;
    let mut gaps = Vec::new();
    let mut bursts = 0u64;
    let mut longest = 0u64;
    let mut close = |first: u64, n: u64| {
        bursts += 1;
        longest = longest.max(n);
        if gaps.len() < MAX_GAPS {
            gaps.push(Gap {
                first_seq: first,
                lost: n,
                ms: n as f64 * interval_ms,
            });
        }
    };
    let mut run: Option<(u64, u64)> = None;
    for (seq, got) in seen.iter().enumerate() {
        match (got, run.as_mut()) {
            (false, Some((_, n))) => *n += 1,
            (false, None) => run = Some((seq as u64, 1)),
            (true, Some(&mut (first, n))) => {
                close(first, n);
                run = None;
            }
            (true, None) => {}
        }
    }
    if let Some((first, n)) = run {
        close(first, n);
    }
    StreamReport {
        rate_pps,
        size,
        sent,
        send_errors,
        received,
        lost,
        loss_pct: (sent > 0).then(|| 100.0 * lost as f64 / sent as f64),
        outage_ms: lost as f64 * interval_ms,
        duplicates,
        reordered,
        foreign,
        longest_gap_packets: longest,
        longest_silence_ms: (arrivals.len() >= 2).then(|| longest_silence as f64 / 1e6),
        loss_bursts: bursts,
        mean_burst: (bursts > 0).then(|| lost as f64 / bursts as f64),
        delay: delay_stats(&mut delays, jitter / 1e6, ipdv_sum / 1e6),
        first_sent_unix_ms: None,
        last_sent_unix_ms: None,
        first_sent_mono_ns: None,
        gaps,
    }
}

/// `jitter_ms` is the final smoothed value, `ipdv_sum_ms` the sum of |ΔD| over the
/// `d.len() - 1` consecutive pairs.
fn delay_stats(d: &mut [f64], jitter_ms: f64, ipdv_sum_ms: f64) -> Option<DelayStats> {
    let n = d.len() as f64;
    let mean = d.iter().sum::<f64>() / n;
    let var = d.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
    d.sort_by(f64::total_cmp);
    let pairs = (d.len() >= 2).then(|| (d.len() - 1) as f64);
    Some(DelayStats {
        mean_ms: mean,
        stddev_ms: var.sqrt(),
        min_ms: *d.first()?,
        p50_ms: percentile(d, 0.5)?,
        p99_ms: percentile(d, 0.99)?,
        max_ms: *d.last()?,
        jitter_ms: pairs.map(|_| jitter_ms),
        ipdv_mean_ms: pairs.map(|p| ipdv_sum_ms / p),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outage_is_lost_packets_over_the_rate_and_each_gap_is_listed() {
        // 1000 pps, 100 packets; 10..20 and 50..55 lost; 70 arrives twice; 80 after 81.
        let mut arrivals: Vec<Arrival> = (0..100u64)
            .filter(|s| !(10..20).contains(s) && !(50..55).contains(s))
            .map(|s| (s, s * 1_000_000 + 5_000_000, s * 1_000_000))
            .collect();
        arrivals.push((70, 200_000_000, 70_000_000));
        let i80 = arrivals.iter().position(|a| a.0 == 80).unwrap();
        arrivals.swap(i80, i80 + 1);
        let r = report(1000, 200, 100, 0, &arrivals, 0);
        assert_eq!(
            (r.received, r.lost, r.duplicates, r.reordered),
            (85, 15, 1, 1)
        );
        assert_eq!(r.outage_ms, 15.0);
        assert_eq!(
            r.gaps,
            vec![
                Gap {
                    first_seq: 10,
                    lost: 10,
                    ms: 10.0
                },
                Gap {
                    first_seq: 50,
                    lost: 5,
                    ms: 5.0
                }
            ]
        );
        assert_eq!(r.longest_gap_packets, 10);
        assert_eq!(r.loss_bursts, 2);
        let d = r.delay.unwrap();
        assert!((d.mean_ms - 5.0).abs() < 1e-9 && d.jitter_ms.unwrap() < 1e-9);
        assert_eq!(r.mean_burst, Some(7.5));
    }

    #[test]
    fn what_nothing_measured_is_reported_as_no_data_not_as_zero() {
        let r = report(100, 24, 0, 0, &[], 0);
        assert_eq!((r.loss_pct, r.mean_burst), (None, None));
        assert!(r.delay.is_none() && r.longest_silence_ms.is_none());
        // Sent, and nothing arrived: a loss of 100 %, and still no delay.
        let r = report(100, 24, 10, 0, &[], 0);
        assert_eq!(r.loss_pct, Some(100.0));
        assert!(r.delay.is_none());
        // One arrival: a delay, no jitter.
        let r = report(100, 24, 1, 0, &[(0, 3_000_000, 1_000_000)], 0);
        assert_eq!((r.loss_pct, r.mean_burst), (Some(0.0), None));
        let d = r.delay.unwrap();
        assert_eq!((d.mean_ms, d.p99_ms), (2.0, 2.0));
        assert_eq!((d.jitter_ms, d.ipdv_mean_ms), (None, None));
        let json = serde_json::to_value(report(100, 24, 0, 0, &[], 0)).unwrap();
        assert!(
            json["loss_pct"].is_null() && json["delay"].is_null(),
            "{json}"
        );
    }

    #[test]
    fn a_stream_that_lost_its_tail_counts_it_and_strangers_are_ignored() {
        let arrivals: Vec<Arrival> = (0..50u64)
            .map(|s| (s, s + 1, s))
            .chain([(500, 0, 0)])
            .collect();
        let r = report(100, 24, 60, 0, &arrivals, 2);
        assert_eq!((r.lost, r.foreign), (10, 3));
        assert_eq!(
            r.gaps,
            vec![Gap {
                first_seq: 50,
                lost: 10,
                ms: 100.0
            }]
        );
        assert_eq!(parse(b"PLS1", 0), None);
        assert_eq!(parse(&[0u8; 24], 0), None);
    }
}
