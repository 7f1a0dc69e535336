//! The one scoring function, shared by selection, failover and export.
//!
//! A path's score for a class is the largest share of an SLA budget that any metric uses:
//!
//! ```text
//! score = max(rtt / latency_budget, jitter / jitter_budget, loss / loss_budget)
//! ```
//!
//! Each budget is the class's bound when it has one, or a generous reference (500 ms, 100 ms,
//! 10 %) when it does not, so that unbounded metrics still rank paths. Lower is better. The score
//! is continuous in every metric (no cliffs): a path at 99 % of its latency budget and one at
//! 101 % are neighbours, and only the SLA test itself is a threshold.
//!
//! A path **meets** a class when every metric the class bounds is within its bound; a path that
//! broke a class meets it again only once every bounded metric is back within
//! `(1 - SLA_HYSTERESIS)` of its bound, so a metric hovering at the bound does not make the
//! path's compliance flap.

use std::time::Duration;

use patronus_api::SlaClass;

/// The share of the bound a metric must fall below before a path that broke a class meets it
/// again.
pub const SLA_HYSTERESIS: f64 = 0.10;

const REF_LATENCY_NS: f64 = 500e6;
const REF_JITTER_NS: f64 = 100e6;
const REF_LOSS: f64 = 0.10;

/// What the estimators say about a live path.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Metrics {
    /// Smoothed round-trip time (reflector dwell removed).
    pub rtt: Duration,
    /// RFC 3550 interarrival jitter, the worse direction.
    pub jitter: Duration,
    /// Loss as a fraction 0.0..=1.0.
    pub loss: f64,
}

/// A class's bounds in the units the estimators produce.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SlaBounds {
    latency_ns: Option<f64>,
    jitter_ns: Option<f64>,
    loss: Option<f64>,
}

impl SlaBounds {
    pub fn from_class(c: &SlaClass) -> Self {
        Self {
            latency_ns: c.max_latency_ms.map(|ms| f64::from(ms) * 1e6),
            jitter_ns: c.max_jitter_ms.map(|ms| f64::from(ms) * 1e6),
            loss: c.max_loss_pct.map(|p| p / 100.0),
        }
    }

    fn ratios(&self, m: &Metrics) -> [(f64, bool); 3] {
        let rtt = m.rtt.as_nanos() as f64;
        let jitter = m.jitter.as_nanos() as f64;
        [
            (
                ratio(rtt, self.latency_ns.unwrap_or(REF_LATENCY_NS)),
                self.latency_ns.is_some(),
            ),
            (
                ratio(jitter, self.jitter_ns.unwrap_or(REF_JITTER_NS)),
                self.jitter_ns.is_some(),
            ),
            (
                ratio(m.loss, self.loss.unwrap_or(REF_LOSS)),
                self.loss.is_some(),
            ),
        ]
    }

    /// True when some bounded metric is beyond its bound.
    pub fn violated_by(&self, m: &Metrics) -> bool {
        self.ratios(m)
            .iter()
            .any(|&(r, bounded)| bounded && r > 1.0)
    }

    /// True when every bounded metric is back within `1 - SLA_HYSTERESIS` of its bound.
    pub fn cleared_by(&self, m: &Metrics) -> bool {
        self.ratios(m)
            .iter()
            .all(|&(r, bounded)| !bounded || r <= 1.0 - SLA_HYSTERESIS)
    }
}

/// The score of a live path for a class: lower is better, 1.0 is the edge of the tightest bound.
pub fn score(m: &Metrics, sla: &SlaBounds) -> f64 {
    sla.ratios(m).iter().fold(0.0, |acc, &(r, _)| acc.max(r))
}

fn ratio(value: f64, budget: f64) -> f64 {
    if budget > 0.0 {
        value / budget
    } else if value > 0.0 {
        f64::INFINITY
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn realtime() -> SlaBounds {
        SlaBounds::from_class(&SlaClass::builtins()[0]) // 150 ms, 30 ms, 1 %
    }

    fn m(rtt_ms: u64, jitter_ms: u64, loss: f64) -> Metrics {
        Metrics {
            rtt: Duration::from_millis(rtt_ms),
            jitter: Duration::from_millis(jitter_ms),
            loss,
        }
    }

    #[test]
    fn the_score_is_the_largest_share_of_a_budget() {
        assert_eq!(score(&m(75, 3, 0.0), &realtime()), 0.5);
        assert_eq!(score(&m(15, 27, 0.0), &realtime()), 0.9);
        assert!((score(&m(15, 3, 0.02), &realtime()) - 2.0).abs() < 1e-9);
    }

    #[test]
    fn the_score_has_no_cliff_at_the_bound() {
        let below = score(&m(149, 0, 0.0), &realtime());
        let above = score(&m(151, 0, 0.0), &realtime());
        assert!(above - below < 0.014, "{below} {above}");
        assert!(!realtime().violated_by(&m(150, 0, 0.0)));
        assert!(realtime().violated_by(&m(151, 0, 0.0)));
    }

    #[test]
    fn a_broken_class_is_met_again_only_below_the_hysteresis_band() {
        let sla = realtime();
        assert!(!sla.cleared_by(&m(140, 0, 0.0)));
        assert!(sla.cleared_by(&m(135, 0, 0.0)));
        assert!(!sla.cleared_by(&m(10, 0, 0.01)));
    }

    #[test]
    fn unbounded_metrics_rank_but_never_violate() {
        let bulk = SlaBounds::from_class(&SlaClass::builtins()[3]); // loss 10 % only
        assert!(!bulk.violated_by(&m(900, 200, 0.0)));
        assert!(score(&m(900, 0, 0.0), &bulk) > score(&m(100, 0, 0.0), &bulk));
        let zero_loss = SlaBounds::from_class(&SlaClass {
            max_loss_pct: Some(0.0),
            ..SlaClass::builtins()[3].clone()
        });
        assert_eq!(score(&m(0, 0, 0.0), &zero_loss), 0.0);
        assert!(zero_loss.violated_by(&m(0, 0, 0.001)));
    }
}
