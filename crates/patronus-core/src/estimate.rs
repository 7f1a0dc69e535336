//! Per-path estimators. Every input carries its own timestamp; nothing here reads a clock.
//!
//! - **RTT**: each sample is `(T4 - T1) - (T3 - T2)`, the round trip minus the time the probe
//!   spent in the reflector (RFC 8762 section 4). The smoothed RTT and its variation follow
//!   RFC 6298 (gains 1/8 and 1/4); the last [`RTT_WINDOW`] samples give percentiles.
//! - **Jitter**: RFC 3550 interarrival jitter (section 6.4.1), `J += (|D| - J) / 16`, where `D` is
//!   the change in transit time between consecutive replies. It is computed separately for each
//!   direction: forward from `T2 - T1`, reverse from `T4 - T3`. Each transit mixes two clocks,
//!   but their offset cancels in `D`, so the clocks need not be synchronized. The path's jitter
//!   is the worse direction.
//! - **Loss**: the share of the last `window` resolved probes that got no reply within the
//!   waiting time (RFC 7680's `Tmax`). A reply that arrives later still proves the path alive and
//!   still yields an RTT sample, but the probe stays counted as lost. While the window holds
//!   fewer than [`LOSS_MIN_SAMPLES`] outcomes, the count is divided by that minimum instead, so a
//!   single early loss does not read as 50 %.

use std::time::Duration;

/// RTT samples kept for percentiles.
pub const RTT_WINDOW: usize = 128;
/// Below this many resolved probes the loss estimate divides by this number instead.
pub const LOSS_MIN_SAMPLES: u32 = 20;

#[derive(Debug, Clone)]
pub(crate) struct RttEstimator {
    srtt: Option<Duration>,
    rttvar: Duration,
    window: Box<[u64; RTT_WINDOW]>,
    len: usize,
    next: usize,
}

impl Default for RttEstimator {
    fn default() -> Self {
        Self {
            srtt: None,
            rttvar: Duration::ZERO,
            window: Box::new([0; RTT_WINDOW]),
            len: 0,
            next: 0,
        }
    }
}

impl RttEstimator {
    pub fn on_sample(&mut self, rtt: Duration) {
        match self.srtt {
            None => {
                self.srtt = Some(rtt);
                self.rttvar = rtt / 2;
            }
            Some(srtt) => {
                let err = srtt.abs_diff(rtt);
                self.rttvar = (self.rttvar * 3 + err) / 4;
                self.srtt = Some((srtt * 7 + rtt) / 8);
            }
        }
        self.window[self.next] = u64::try_from(rtt.as_nanos()).unwrap_or(u64::MAX);
        self.next = (self.next + 1) % RTT_WINDOW;
        self.len = (self.len + 1).min(RTT_WINDOW);
    }

    pub fn srtt(&self) -> Option<Duration> {
        self.srtt
    }

    pub fn rttvar(&self) -> Duration {
        self.rttvar
    }

    /// The `q`-quantile (0.0..=1.0, nearest rank) of the samples in the window. Sorts a copy:
    /// for export, never for the packet path.
    pub fn percentile(&self, q: f64) -> Option<Duration> {
        if self.len == 0 {
            return None;
        }
        let mut v = self.window[..self.len].to_vec();
        v.sort_unstable();
        let rank = ((q.clamp(0.0, 1.0) * self.len as f64).ceil() as usize).clamp(1, self.len);
        Some(Duration::from_nanos(v[rank - 1]))
    }
}

/// RFC 3550 interarrival jitter over a sequence of transit times (in ns, any fixed offset).
#[derive(Debug, Clone, Default)]
pub(crate) struct Jitter {
    /// The previous transit time and the round trip of the probe it came from.
    prev: Option<(i64, i64)>,
    jitter_ns: f64,
}

impl Jitter {
    /// Takes the transit time of one direction of a probe and the probe's round trip. A change
    /// in one-way delay larger than the round trip is not delay: it is the other clock jumping
    /// (the peer restarted, so its timestamps count from a new epoch). The sample then only
    /// restarts the sequence.
    pub fn on_transit(&mut self, transit_ns: i64, rtt_ns: i64) {
        if let Some((prev, prev_rtt)) = self.prev {
            let d = transit_ns.saturating_sub(prev).unsigned_abs();
            if d <= rtt_ns.max(prev_rtt).unsigned_abs() {
                self.jitter_ns += (d as f64 - self.jitter_ns) / 16.0;
            }
        }
        self.prev = Some((transit_ns, rtt_ns));
    }

    pub fn get(&self) -> Duration {
        Duration::from_nanos(self.jitter_ns as u64)
    }
}

/// Outcomes of the last `window` resolved probes.
#[derive(Debug, Clone)]
pub(crate) struct LossWindow {
    lost: Box<[bool]>,
    next: usize,
    len: usize,
    lost_count: u32,
    /// Records made since the window was created, and the first of them still counted (the
    /// window was reset there): each record's index, for [`LossWindow::amend`].
    total: u64,
    base: u64,
}

impl LossWindow {
    pub fn new(window: usize) -> Self {
        Self {
            lost: vec![false; window.max(1)].into_boxed_slice(),
            next: 0,
            len: 0,
            lost_count: 0,
            total: 0,
            base: 0,
        }
    }

    /// Records an outcome; returns its index, for [`LossWindow::amend`].
    pub fn record(&mut self, lost: bool) -> u64 {
        if self.len == self.lost.len() && self.lost[self.next] {
            self.lost_count -= 1;
        }
        self.lost[self.next] = lost;
        self.lost_count += u32::from(lost);
        self.next = (self.next + 1) % self.lost.len();
        self.len = (self.len + 1).min(self.lost.len());
        self.total += 1;
        self.total - 1
    }

    /// Record `index`, recorded as lost, was not lost after all (if it is still counted).
    pub fn amend(&mut self, index: u64) {
        let back = self.total.saturating_sub(index);
        if index < self.base || back == 0 || back > self.len as u64 {
            return;
        }
        let cap = self.lost.len();
        let pos = (self.next + cap - (back as usize % cap)) % cap;
        if std::mem::take(&mut self.lost[pos]) {
            self.lost_count -= 1;
        }
    }

    pub fn reset(&mut self) {
        self.lost.fill(false);
        self.next = 0;
        self.len = 0;
        self.lost_count = 0;
        self.base = self.total;
    }

    /// The loss estimate used for SLAs: lost / max(resolved, LOSS_MIN_SAMPLES).
    pub fn fraction(&self) -> f64 {
        let denom = (self.len as u32).max(LOSS_MIN_SAMPLES);
        f64::from(self.lost_count) / f64::from(denom)
    }

    pub fn resolved(&self) -> u32 {
        self.len as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn srtt_follows_rfc_6298_and_percentiles_use_nearest_rank() {
        let mut r = RttEstimator::default();
        r.on_sample(100 * MS);
        assert_eq!((r.srtt(), r.rttvar()), (Some(100 * MS), 50 * MS));
        r.on_sample(20 * MS);
        // rttvar = 3/4 * 50 + 1/4 * 80 = 57.5; srtt = 7/8 * 100 + 1/8 * 20 = 90
        assert_eq!(r.srtt(), Some(90 * MS));
        assert_eq!(r.rttvar(), Duration::from_micros(57_500));
        for i in 1..=100 {
            r.on_sample(i * MS);
        }
        assert_eq!(r.percentile(0.5), Some(50 * MS)); // 102 samples: 100, 20, 1..=100
        assert_eq!(r.percentile(1.0), Some(100 * MS));
    }

    #[test]
    fn constant_transit_has_no_jitter_and_alternating_transit_converges_to_the_step() {
        let rtt = 40_000_000;
        let mut j = Jitter::default();
        for _ in 0..10 {
            j.on_transit(5_000_000, rtt);
        }
        assert_eq!(j.get(), Duration::ZERO);
        for i in 0..400 {
            j.on_transit(if i % 2 == 0 { 0 } else { 10_000_000 }, rtt);
        }
        let got = j.get().as_secs_f64() * 1e3;
        assert!((9.9..=10.0).contains(&got), "{got}");
    }

    #[test]
    fn a_jump_of_the_reflector_clock_is_not_jitter() {
        let rtt = 20_000_000;
        let mut j = Jitter::default();
        j.on_transit(1_000, rtt);
        j.on_transit(2_000, rtt);
        let before = j.get();
        // The peer restarted: its timestamps now count from a new epoch, an hour earlier.
        j.on_transit(2_000 - 3_600_000_000_000, rtt);
        assert_eq!(j.get(), before);
        j.on_transit(3_000 - 3_600_000_000_000, rtt);
        assert!(j.get() < Duration::from_micros(1), "{:?}", j.get());
    }

    #[test]
    fn the_loss_window_slides_and_shrinks_small_samples() {
        let mut w = LossWindow::new(100);
        w.record(true);
        assert_eq!(w.fraction(), 1.0 / 20.0);
        for _ in 0..99 {
            w.record(false);
        }
        assert_eq!(w.fraction(), 0.01);
        w.record(false); // the loss slides out
        assert_eq!(w.fraction(), 0.0);
        let i = w.record(true);
        w.record(false);
        assert_eq!(w.fraction(), 0.01);
        w.amend(i);
        assert_eq!(w.fraction(), 0.0);
        w.amend(i); // twice changes nothing
        assert_eq!(w.fraction(), 0.0);
        let i = w.record(true);
        w.reset();
        assert_eq!((w.fraction(), w.resolved()), (0.0, 0));
        w.record(true);
        w.amend(i); // from before the reset: not counted any more
        assert_eq!(w.fraction(), 1.0 / 20.0);
    }
}
