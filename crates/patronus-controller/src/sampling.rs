//! What of the edges' path measurements the store keeps.
//!
//! Every edge reports every path it holds every 5 s, from both ends: a 1,000-site hub and spoke
//! sends about 3,200 measurements a second, near 2 billion a week. Each report updates the live
//! view (`AppState::live`, what `GET /paths` shows), but a measurement is written to the
//! history (`path_samples`) only when it says something the last one kept for that path and
//! reporting site did not:
//!
//! - the path's state changed (up, degraded, down), or its RTT appeared or vanished;
//! - the RTT moved by at least [`RTT_DEADBAND_MS`] and [`RTT_DEADBAND`] of the last kept value,
//!   the jitter by at least [`JITTER_DEADBAND_MS`] and [`JITTER_DEADBAND`], or the loss by
//!   [`LOSS_DEADBAND_PCT`] percentage points;
//! - or [`HEARTBEAT_S`] passed since the last kept one.
//!
//! So a change is kept at the resolution it was reported at, and a quiet path costs one row a
//! minute per end instead of twelve (`patronus bench db-stress` measures what that leaves). The
//! decision is each controller's own (several controllers behind one database each keep the
//! first report they hear of a path), and a restarted controller keeps the first report of
//! every path again: nothing is lost by either, a few rows are written twice.
//!
//! What is not thinned: failovers and path events (each one kept, once). Traffic is summed,
//! not sampled: the edges report running totals, what was sent between two reports is added to
//! what is pending in the store, and the sum is kept as one sample a minute per path and class
//! (`store::telemetry::TRAFFIC_EVERY_S`), so that no byte is lost to a restart of either end.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use patronus_api::{PathReport, PathState};

/// A quiet path's measurement is kept at least this often (seconds).
pub const HEARTBEAT_S: i64 = 60;
/// The RTT must move by this much (ms) ...
pub const RTT_DEADBAND_MS: f64 = 2.0;
/// ... and by this fraction of the last kept RTT to be kept.
pub const RTT_DEADBAND: f64 = 0.10;
/// The jitter must move by this much (ms) ...
pub const JITTER_DEADBAND_MS: f64 = 1.0;
/// ... and by this fraction of the last kept jitter.
pub const JITTER_DEADBAND: f64 = 0.25;
/// The loss must move by this many percentage points.
pub const LOSS_DEADBAND_PCT: f64 = 0.5;

/// The last measurement kept of one path, as one site reported it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Kept {
    /// Unix seconds.
    pub at: i64,
    pub state: PathState,
    pub rtt_ms: Option<f64>,
    pub jitter_ms: f64,
    pub loss_pct: f64,
}

impl Kept {
    pub fn of(p: &PathReport, at: i64) -> Self {
        Self {
            at,
            state: p.state,
            rtt_ms: p.rtt_ms,
            jitter_ms: p.jitter_ms,
            loss_pct: p.loss_pct,
        }
    }
}

/// Whether `moved` from `last` is beyond a deadband of `floor` and `fraction` of `last`.
fn beyond(last: f64, now: f64, floor: f64, fraction: f64) -> bool {
    (now - last).abs() >= floor.max(last.abs() * fraction)
}

/// Whether report `p` at `now` (unix seconds) is worth keeping after `last`.
pub fn worth_keeping(last: Option<&Kept>, now: i64, p: &PathReport) -> bool {
    let Some(last) = last else { return true };
    if now - last.at >= HEARTBEAT_S || now < last.at || p.state != last.state {
        return true;
    }
    let rtt = match (last.rtt_ms, p.rtt_ms) {
        (Some(a), Some(b)) => beyond(a, b, RTT_DEADBAND_MS, RTT_DEADBAND),
        (None, None) => false,
        _ => true,
    };
    rtt || beyond(
        last.jitter_ms,
        p.jitter_ms,
        JITTER_DEADBAND_MS,
        JITTER_DEADBAND,
    ) || (p.loss_pct - last.loss_pct).abs() >= LOSS_DEADBAND_PCT
}

/// The last kept measurement of every (path id, reporting site) this controller heard of in
/// the last two heartbeats, and how many reports it kept and passed over.
#[derive(Debug, Default)]
pub struct Sampler {
    kept: Mutex<Table>,
    pub reported: AtomicU64,
    pub written: AtomicU64,
}

#[derive(Debug, Default)]
struct Table {
    last: HashMap<(String, i64), Kept>,
    /// When entries older than two heartbeats were last removed (unix seconds).
    swept_at: i64,
}

impl Sampler {
    /// Which of site `site_id`'s `reports` (path id, report) at `now` to write.
    pub fn select(&self, site_id: i64, now: i64, reports: &[(String, &PathReport)]) -> Vec<bool> {
        let t = self.kept.lock().unwrap_or_else(|e| e.into_inner());
        reports
            .iter()
            .map(|(id, p)| worth_keeping(t.last.get(&(id.clone(), site_id)), now, p))
            .collect()
    }

    /// Notes that `written` of site `site_id`'s `reports` are in the store now (after the
    /// transaction that wrote them committed: a report that failed is not taken as kept).
    pub fn kept(
        &self,
        site_id: i64,
        now: i64,
        reports: &[(String, &PathReport)],
        written: &[bool],
    ) {
        let mut t = self.kept.lock().unwrap_or_else(|e| e.into_inner());
        let mut n = 0;
        for ((id, p), _) in reports.iter().zip(written).filter(|(_, w)| **w) {
            t.last.insert((id.clone(), site_id), Kept::of(p, now));
            n += 1;
        }
        // What was not heard of for two heartbeats would be kept anyway: the table holds only
        // the paths that edges report now (deleted sites and paths leave it).
        if now - t.swept_at >= HEARTBEAT_S {
            t.last.retain(|_, k| now - k.at < 2 * HEARTBEAT_S);
            t.swept_at = now;
        }
        self.reported
            .fetch_add(reports.len() as u64, Ordering::Relaxed);
        self.written.fetch_add(n, Ordering::Relaxed);
    }

    /// Paths (by reporting site) whose last kept measurement is held.
    pub fn len(&self) -> usize {
        self.kept
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .last
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(state: PathState, rtt: Option<f64>, jitter: f64, loss: f64) -> PathReport {
        PathReport {
            peer: "b".into(),
            local_link: "mpls".into(),
            remote_link: "mpls".into(),
            state,
            rtt_ms: rtt,
            jitter_ms: jitter,
            loss_pct: loss,
            tx_bytes: 0,
            rx_bytes: 0,
            tx_packets: 0,
            rx_packets: 0,
            relayed: false,
        }
    }

    #[test]
    fn a_change_beyond_a_deadband_or_a_heartbeat_is_kept_and_noise_is_not() {
        let up = |rtt, jitter, loss| report(PathState::Up, Some(rtt), jitter, loss);
        let last = Kept::of(&up(20.0, 0.5, 0.0), 1000);
        let at = |s: i64| 1000 + s;
        // Noise: within every deadband, before the heartbeat.
        for p in [up(21.9, 0.5, 0.0), up(18.1, 1.4, 0.0), up(20.0, 0.0, 0.4)] {
            assert!(!worth_keeping(Some(&last), at(5), &p), "{p:?}");
            assert!(!worth_keeping(Some(&last), at(59), &p), "{p:?}");
            assert!(worth_keeping(Some(&last), at(60), &p), "{p:?}");
        }
        // Beyond a deadband: kept at once.
        for p in [
            up(22.0, 0.5, 0.0),
            up(17.9, 0.5, 0.0),
            up(20.0, 1.5, 0.0),
            up(20.0, 0.5, 0.5),
            report(PathState::Degraded, Some(20.0), 0.5, 0.0),
            report(PathState::Up, None, 0.5, 0.0),
        ] {
            assert!(worth_keeping(Some(&last), at(5), &p), "{p:?}");
        }
        // The RTT's deadband grows with it: 10 % of 300 ms is 30 ms.
        let far = Kept::of(&up(300.0, 5.0, 0.0), 1000);
        assert!(!worth_keeping(Some(&far), at(5), &up(320.0, 5.0, 0.0)));
        assert!(worth_keeping(Some(&far), at(5), &up(331.0, 5.0, 0.0)));
        // The first report of a path, and one from a clock gone back, are kept.
        assert!(worth_keeping(None, at(0), &up(20.0, 0.5, 0.0)));
        assert!(worth_keeping(Some(&last), 990, &up(20.0, 0.5, 0.0)));
    }

    #[test]
    fn the_sampler_keeps_per_path_and_site_and_forgets_what_nobody_reports() {
        let s = Sampler::default();
        let p = report(PathState::Up, Some(20.0), 0.5, 0.0);
        let reports = vec![("1-3".to_owned(), &p), ("2-4".to_owned(), &p)];
        assert_eq!(s.select(7, 1000, &reports), [true, true]);
        // Not written (the transaction failed): still to keep.
        s.kept(7, 1000, &reports, &[false, true]);
        assert_eq!(s.select(7, 1005, &reports), [true, false]);
        // The other end of the same path is a report of its own.
        assert_eq!(s.select(8, 1005, &reports), [true, true]);
        s.kept(7, 1005, &reports, &[true, false]);
        assert_eq!(s.len(), 2);
        assert_eq!(s.reported.load(Ordering::Relaxed), 4);
        assert_eq!(s.written.load(Ordering::Relaxed), 2);
        // Two heartbeats without a report: gone from the table.
        s.kept(9, 1000 + 2 * HEARTBEAT_S + 10, &[], &[]);
        assert!(s.is_empty());
    }
}
