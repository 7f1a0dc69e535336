//! WAN impairments: what one direction of an emulated link does to each packet.
//!
//! # Model
//!
//! Every emulated link has two directions, `up` (from the site into the WAN) and `down` (from the
//! WAN to the site), each with its own [`Impairment`] and its own [`Shaper`]. A packet from site
//! A's link to site B's link passes A's `up` shaper, then B's `down` shaper, so the quality of a
//! path is the sum of the two access links it uses, as on the Internet.
//!
//! A shaper decides, for one packet arriving at time `now`, in this order:
//!
//! 1. **cut**: a cut link drops everything (a blackhole: no ICMP, no reset, nothing).
//! 2. **loss**: random (Bernoulli) loss with probability `loss`, then, if configured, bursty loss
//!    from a Gilbert-Elliott chain (state `good` or `bad`; each packet first moves the chain,
//!    `good → bad` with probability `p` and `bad → good` with probability `r`, then is lost with
//!    `bad_loss` or `good_loss`). With `bad_loss = 100 %` and `good_loss = 0` the mean loss
//!    rate is `p / (p + r)` and the mean loss burst is `1 / r` packets.
//! 3. **rate**: a link of `rate` bit/s serialises packets one after the other; a packet leaves
//!    the line when the ones before it have and its own bits are sent. A packet that would wait
//!    longer than `queue` in that line is dropped (tail drop), as a router buffer of that depth
//!    would.
//! 4. **delay and jitter**: the one-way propagation delay of each packet is `delay` plus a sample
//!    of the jitter distribution (`normal`: standard deviation `jitter`; `uniform`: spread evenly
//!    over `delay ± jitter`), never below zero.
//! 5. **order**: unless `reorder` is on, a packet never leaves before the one in front of it
//!    (its release time is raised to that of its predecessor), as on a FIFO link. So when packets
//!    are closer together than the jitter, the FIFO raises their mean delay and narrows their
//!    spread, exactly as netem with a FIFO child would; at spacings of twice the jitter or more
//!    the effect is small (see the accuracy tests).
//!
//! Times are nanoseconds of `CLOCK_MONOTONIC`, passed in: the shaper reads no clock.

use std::fmt;
use std::time::Duration;

use crate::stats::SplitMix64;

/// The jitter distribution.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum JitterDist {
    /// Gaussian with standard deviation `jitter`.
    #[default]
    Normal,
    /// Uniform over `delay - jitter ..= delay + jitter`.
    Uniform,
}

/// Gilbert-Elliott bursty loss, as probabilities in `0.0..=1.0`.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct GilbertElliott {
    /// Probability that a packet moves the chain from `good` to `bad`.
    pub p: f64,
    /// Probability that a packet moves the chain from `bad` to `good`.
    pub r: f64,
    /// Loss probability in the `bad` state (1 - h in the usual notation).
    pub bad_loss: f64,
    /// Loss probability in the `good` state (1 - k in the usual notation).
    pub good_loss: f64,
}

/// What one direction of a link does to packets. The default is a perfect link.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Impairment {
    /// One-way delay added to every packet, in microseconds.
    pub delay_us: u64,
    /// Jitter, in microseconds (see [`JitterDist`] for what it scales).
    pub jitter_us: u64,
    pub dist: JitterDist,
    /// Let jitter reorder packets. Off by default: a WAN link is a FIFO.
    pub reorder: bool,
    /// Random loss probability, `0.0..=1.0`.
    pub loss: f64,
    /// Bursty loss on top of random loss.
    pub ge: Option<GilbertElliott>,
    /// Line rate in bit/s; `None` is unlimited.
    pub rate_bps: Option<u64>,
    /// Buffer depth in microseconds of queueing at `rate`; later packets are tail-dropped.
    pub queue_us: u64,
    /// Blackhole: drop every packet.
    pub cut: bool,
}

/// Default buffer depth when a rate is set: 50 ms, a common WAN router buffer.
pub const DEFAULT_QUEUE: Duration = Duration::from_millis(50);

impl Default for Impairment {
    fn default() -> Self {
        Self {
            delay_us: 0,
            jitter_us: 0,
            dist: JitterDist::Normal,
            reorder: false,
            loss: 0.0,
            ge: None,
            rate_bps: None,
            queue_us: DEFAULT_QUEUE.as_micros() as u64,
            cut: false,
        }
    }
}

/// A `key=value` setting that could not be applied. The message names the key and the problem.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {problem}")]
pub struct ImpairError {
    pub key: String,
    pub problem: String,
}

fn err(key: &str, problem: impl Into<String>) -> ImpairError {
    ImpairError {
        key: key.to_string(),
        problem: problem.into(),
    }
}

/// The keys [`Impairment::apply`] accepts, for help texts.
pub const KEYS_HELP: &str = "delay=40ms jitter=5ms dist=normal|uniform reorder=on|off loss=2% \
ge=P%:R%[:BAD%[:GOOD%]]|off rate=10mbit|off queue=50ms cut=on|off";

impl Impairment {
    /// Applies `key=value` settings in order, leaving keys not named unchanged. Nothing is
    /// changed if any setting is bad.
    pub fn apply<S: AsRef<str>>(&mut self, settings: &[S]) -> Result<(), ImpairError> {
        let mut next = self.clone();
        for s in settings {
            let s = s.as_ref();
            let (key, value) = s
                .split_once('=')
                .ok_or_else(|| err(s, format!("expected key=value ({KEYS_HELP})")))?;
            match key {
                "delay" => next.delay_us = parse_duration_us(key, value)?,
                "jitter" => next.jitter_us = parse_duration_us(key, value)?,
                "dist" => {
                    next.dist = match value {
                        "normal" => JitterDist::Normal,
                        "uniform" => JitterDist::Uniform,
                        _ => return Err(err(key, "expected normal or uniform")),
                    }
                }
                "reorder" => next.reorder = parse_on_off(key, value)?,
                "cut" => next.cut = parse_on_off(key, value)?,
                "loss" => next.loss = parse_percent(key, value)?,
                "ge" => {
                    next.ge = if value == "off" {
                        None
                    } else {
                        Some(parse_ge(key, value)?)
                    }
                }
                "rate" => {
                    next.rate_bps = if value == "off" {
                        None
                    } else {
                        Some(parse_rate(key, value)?)
                    }
                }
                "queue" => next.queue_us = parse_duration_us(key, value)?,
                _ => return Err(err(key, format!("unknown key; known keys: {KEYS_HELP}"))),
            }
        }
        *self = next;
        Ok(())
    }

    /// True if this direction changes nothing.
    pub fn is_clear(&self) -> bool {
        *self == Impairment::default()
    }
}

impl fmt::Display for Impairment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_clear() {
            return f.write_str("clear");
        }
        let mut parts = Vec::new();
        if self.cut {
            parts.push("cut".to_string());
        }
        if self.delay_us > 0 {
            parts.push(format!("delay={}", fmt_us(self.delay_us)));
        }
        if self.jitter_us > 0 {
            parts.push(format!("jitter={}", fmt_us(self.jitter_us)));
            if self.dist == JitterDist::Uniform {
                parts.push("dist=uniform".into());
            }
        }
        if self.reorder {
            parts.push("reorder=on".into());
        }
        if self.loss > 0.0 {
            parts.push(format!("loss={}%", pct(self.loss)));
        }
        if let Some(ge) = self.ge {
            parts.push(format!(
                "ge={}%:{}%:{}%:{}%",
                pct(ge.p),
                pct(ge.r),
                pct(ge.bad_loss),
                pct(ge.good_loss)
            ));
        }
        if let Some(r) = self.rate_bps {
            parts.push(format!("rate={}", fmt_rate(r)));
        }
        if self.rate_bps.is_some() || self.queue_us != DEFAULT_QUEUE.as_micros() as u64 {
            parts.push(format!("queue={}", fmt_us(self.queue_us)));
        }
        f.write_str(&parts.join(" "))
    }
}

fn pct(x: f64) -> f64 {
    (x * 100_000.0).round() / 1000.0
}

fn fmt_us(us: u64) -> String {
    if us % 1000 == 0 {
        format!("{}ms", us / 1000)
    } else {
        format!("{us}us")
    }
}

fn fmt_rate(bps: u64) -> String {
    for (unit, scale) in [("gbit", 1_000_000_000), ("mbit", 1_000_000), ("kbit", 1000)] {
        if bps >= scale && bps % scale == 0 {
            return format!("{}{unit}", bps / scale);
        }
    }
    format!("{bps}bit")
}

fn parse_on_off(key: &str, v: &str) -> Result<bool, ImpairError> {
    match v {
        "on" | "true" | "yes" | "1" => Ok(true),
        "off" | "false" | "no" | "0" => Ok(false),
        _ => Err(err(key, format!("expected on or off, got {v:?}"))),
    }
}

/// `40ms`, `1.5ms`, `250us`, `2s`, or `0`. At most 10 s: a WAN delay beyond that is a mistake.
pub fn parse_duration_us(key: &str, v: &str) -> Result<u64, ImpairError> {
    if v == "0" {
        return Ok(0);
    }
    let (num, scale) = if let Some(n) = v.strip_suffix("us") {
        (n, 1.0)
    } else if let Some(n) = v.strip_suffix("ms") {
        (n, 1e3)
    } else if let Some(n) = v.strip_suffix('s') {
        (n, 1e6)
    } else {
        return Err(err(key, format!("{v:?} needs a unit: us, ms or s")));
    };
    let x: f64 = num
        .parse()
        .map_err(|_| err(key, format!("{num:?} is not a number")))?;
    let us = x * scale;
    if !(0.0..=10e6).contains(&us) {
        return Err(err(key, format!("{v} is outside 0..=10s")));
    }
    Ok(us.round() as u64)
}

/// `2%` or `2` (percent), in `0..=100`.
fn parse_percent(key: &str, v: &str) -> Result<f64, ImpairError> {
    let n = v.strip_suffix('%').unwrap_or(v);
    let x: f64 = n
        .parse()
        .map_err(|_| err(key, format!("{v:?} is not a percentage")))?;
    if !(0.0..=100.0).contains(&x) {
        return Err(err(key, format!("{v} is outside 0..=100%")));
    }
    Ok(x / 100.0)
}

fn parse_ge(key: &str, v: &str) -> Result<GilbertElliott, ImpairError> {
    let parts: Vec<&str> = v.split(':').collect();
    if !(2..=4).contains(&parts.len()) {
        return Err(err(key, "expected P%:R%[:BAD%[:GOOD%]]"));
    }
    let ge = GilbertElliott {
        p: parse_percent(key, parts[0])?,
        r: parse_percent(key, parts[1])?,
        bad_loss: parts.get(2).map_or(Ok(1.0), |s| parse_percent(key, s))?,
        good_loss: parts.get(3).map_or(Ok(0.0), |s| parse_percent(key, s))?,
    };
    if ge.r == 0.0 {
        return Err(err(
            key,
            "R must be above 0%, or the first burst never ends",
        ));
    }
    Ok(ge)
}

/// `10mbit`, `1.5gbit`, `800kbit`, `64000bit`; at least 8 kbit/s.
fn parse_rate(key: &str, v: &str) -> Result<u64, ImpairError> {
    let lower = v.to_ascii_lowercase();
    let (num, scale) = [("gbit", 1e9), ("mbit", 1e6), ("kbit", 1e3), ("bit", 1.0)]
        .iter()
        .find_map(|(unit, scale)| lower.strip_suffix(unit).map(|n| (n.to_string(), *scale)))
        .ok_or_else(|| err(key, format!("{v:?} needs a unit: bit, kbit, mbit or gbit")))?;
    let x: f64 = num
        .parse()
        .map_err(|_| err(key, format!("{num:?} is not a number")))?;
    let bps = x * scale;
    if !(8e3..=1e12).contains(&bps) {
        return Err(err(key, format!("{v} is outside 8kbit..=1000gbit")));
    }
    Ok(bps.round() as u64)
}

/// Why a shaper dropped a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drop {
    Cut,
    Random,
    Burst,
    Queue,
}

/// Per-direction counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DirStats {
    pub packets: u64,
    pub bytes: u64,
    pub forwarded: u64,
    pub dropped_cut: u64,
    pub dropped_random: u64,
    pub dropped_burst: u64,
    pub dropped_queue: u64,
    /// The longest a forwarded packet spent on the rate-limited line, µs: waiting in the buffer
    /// for the line, then its own transmission. The emulator's queueing, from the real arrival
    /// times; at most `queue` plus one packet's transmission time. 0 without a `rate`.
    #[serde(default)]
    pub line_max_us: u64,
}

/// One direction of one emulated link: its impairment and the state that applying it needs.
#[derive(Debug)]
pub struct Shaper {
    imp: Impairment,
    rng: SplitMix64,
    ge_bad: bool,
    /// When the line finishes sending what it has accepted (rate limiting).
    line_free_at: u64,
    /// Release time of the last packet let through (FIFO order).
    last_release: u64,
    pub stats: DirStats,
}

impl Shaper {
    pub fn new(imp: Impairment, seed: u64) -> Self {
        Self {
            imp,
            rng: SplitMix64(seed),
            ge_bad: false,
            line_free_at: 0,
            last_release: 0,
            stats: DirStats::default(),
        }
    }

    pub fn impairment(&self) -> &Impairment {
        &self.imp
    }

    /// Replaces the impairment. Packets already admitted keep their release times; the loss chain
    /// restarts in `good` when bursty loss is switched off.
    pub fn set(&mut self, imp: Impairment) {
        if imp.ge.is_none() {
            self.ge_bad = false;
        }
        self.imp = imp;
    }

    /// Decides the fate of a packet of `len` bytes arriving at `now`: dropped, or released at the
    /// returned time (never before `now`).
    pub fn admit(&mut self, now: u64, len: usize) -> Result<u64, Drop> {
        self.stats.packets += 1;
        self.stats.bytes += len as u64;
        let imp = &self.imp;
        if imp.cut {
            self.stats.dropped_cut += 1;
            return Err(Drop::Cut);
        }
        if imp.loss > 0.0 && self.rng.next_f64() < imp.loss {
            self.stats.dropped_random += 1;
            return Err(Drop::Random);
        }
        if let Some(ge) = imp.ge {
            let flip = self.rng.next_f64();
            self.ge_bad = if self.ge_bad {
                flip >= ge.r
            } else {
                flip < ge.p
            };
            let p_loss = if self.ge_bad {
                ge.bad_loss
            } else {
                ge.good_loss
            };
            if p_loss > 0.0 && self.rng.next_f64() < p_loss {
                self.stats.dropped_burst += 1;
                return Err(Drop::Burst);
            }
        }
        let mut sent = now;
        if let Some(rate) = imp.rate_bps {
            let start = self.line_free_at.max(now);
            if start - now > imp.queue_us * 1000 {
                self.stats.dropped_queue += 1;
                return Err(Drop::Queue);
            }
            let tx_ns = (len as u64 * 8).saturating_mul(1_000_000_000) / rate.max(1);
            self.line_free_at = start + tx_ns;
            sent = self.line_free_at;
            self.stats.line_max_us = self.stats.line_max_us.max((sent - now) / 1000);
        }
        let mut delay_ns = imp.delay_us as f64 * 1000.0;
        if imp.jitter_us > 0 {
            let j = imp.jitter_us as f64 * 1000.0;
            delay_ns += match imp.dist {
                JitterDist::Normal => j * self.rng.next_gaussian(),
                JitterDist::Uniform => j * (2.0 * self.rng.next_f64() - 1.0),
            };
        }
        let mut release = sent + delay_ns.max(0.0) as u64;
        if !imp.reorder {
            release = release.max(self.last_release);
        }
        self.last_release = self.last_release.max(release);
        self.stats.forwarded += 1;
        Ok(release)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn imp(s: &str) -> Impairment {
        let mut i = Impairment::default();
        i.apply(&s.split_whitespace().collect::<Vec<_>>()).unwrap();
        i
    }

    #[test]
    fn settings_parse_and_print_back() {
        let i = imp("delay=40ms jitter=5ms loss=2% rate=10mbit ge=1%:25%");
        assert_eq!(i.delay_us, 40_000);
        assert_eq!(i.jitter_us, 5_000);
        assert!((i.loss - 0.02).abs() < 1e-12);
        assert_eq!(i.rate_bps, Some(10_000_000));
        assert_eq!(
            i.to_string(),
            "delay=40ms jitter=5ms loss=2% ge=1%:25%:100%:0% rate=10mbit queue=50ms"
        );
        assert_eq!(imp(&i.to_string().replace("cut ", "")), i);
        assert_eq!(Impairment::default().to_string(), "clear");
    }

    #[test]
    fn a_bad_setting_names_its_key_and_changes_nothing() {
        let mut i = imp("delay=10ms");
        for bad in [
            "delay=10",
            "loss=120%",
            "rate=fast",
            "bogus=1",
            "jitter",
            "ge=1%",
            "ge=1%:0%",
        ] {
            let e = i.apply(&["delay=20ms", bad]).unwrap_err();
            assert!(bad.starts_with(&e.key), "{bad}: {e}");
            assert_eq!(i.delay_us, 10_000, "{bad} changed the delay");
        }
    }

    #[test]
    fn a_cut_link_drops_everything_and_a_clear_one_nothing() {
        let mut s = Shaper::new(imp("cut=on"), 1);
        assert!((0..1000).all(|t| s.admit(t, 100) == Err(Drop::Cut)));
        let mut s = Shaper::new(Impairment::default(), 1);
        assert!((0..1000).all(|t| s.admit(t, 100) == Ok(t)));
    }

    #[test]
    fn the_rate_limit_serialises_packets_and_tail_drops_beyond_the_queue() {
        // 1500 bytes at 12 Mbit/s take exactly 1 ms on the line.
        let mut s = Shaper::new(imp("rate=12mbit queue=5ms"), 1);
        let releases: Vec<_> = (0..10).map(|_| s.admit(0, 1500)).collect();
        for (i, r) in releases.iter().enumerate().take(6) {
            assert_eq!(*r, Ok((i as u64 + 1) * 1_000_000));
        }
        assert_eq!(releases[6], Err(Drop::Queue), "6 ms of queue is over 5 ms");
        assert_eq!(s.stats.dropped_queue, 4);
        // The last packet let through waited 5 ms for the line and took 1 ms on it.
        assert_eq!(s.stats.line_max_us, 6_000);
    }

    #[test]
    fn jitter_never_reorders_unless_asked() {
        let mut s = Shaper::new(imp("delay=50ms jitter=20ms"), 7);
        let mut last = 0;
        for t in 0..10_000u64 {
            let r = s.admit(t * 100_000, 100).unwrap();
            assert!(r >= last);
            last = r;
        }
        let mut s = Shaper::new(imp("delay=50ms jitter=20ms reorder=on"), 7);
        let r: Vec<u64> = (0..1000u64)
            .map(|t| s.admit(t * 100_000, 100).unwrap())
            .collect();
        assert!(r.windows(2).any(|w| w[1] < w[0]));
    }

    #[test]
    fn random_loss_and_bursty_loss_have_the_configured_rates() {
        let n = 200_000;
        let mut s = Shaper::new(imp("loss=10%"), 3);
        let lost = (0..n).filter(|&t| s.admit(t, 100).is_err()).count();
        assert!((lost as f64 / n as f64 - 0.10).abs() < 0.005, "{lost}");

        // p = 2 %, r = 25 %: loss p/(p+r) = 7.4 %, mean burst 1/r = 4 packets.
        let mut s = Shaper::new(imp("ge=2%:25%"), 3);
        let outcome: Vec<bool> = (0..n).map(|t| s.admit(t, 100).is_err()).collect();
        let lost = outcome.iter().filter(|l| **l).count();
        let bursts = outcome.windows(2).filter(|w| !w[0] && w[1]).count();
        assert!((lost as f64 / n as f64 - 0.074).abs() < 0.005, "{lost}");
        let mean_burst = lost as f64 / bursts as f64;
        assert!((mean_burst - 4.0).abs() < 0.2, "{mean_burst}");
    }
}
