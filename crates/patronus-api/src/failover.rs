use std::time::Duration;

use crate::FieldErrors;

/// How the edge probes paths and reacts to what it measures. Every knob trades speed of reaction
/// against stability or probe overhead; the defaults are chosen for sub-second failover on
/// terrestrial links.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields, default)]
pub struct FailoverSettings {
    /// Probe interval of a path that carries traffic. Shorter detects failure sooner; each probe
    /// costs about 130 bytes on the wire each way (60 at 50/s ≈ 52 kbit/s per direction).
    #[cfg_attr(feature = "openapi", schema(minimum = 5, maximum = 1000))]
    pub active_probe_interval_ms: u32,
    /// Probe interval of an idle path (standby, or Down and waiting to come back). Longer saves
    /// bandwidth on metered links; shorter keeps standby measurements fresher.
    #[cfg_attr(feature = "openapi", schema(minimum = 20, maximum = 10000))]
    pub standby_probe_interval_ms: u32,
    /// A path is Down after this many probe intervals pass with no sign of life (BFD's detect
    /// multiplier). Lower detects sooner; higher survives short bursts of loss without a move.
    #[cfg_attr(feature = "openapi", schema(minimum = 2, maximum = 50))]
    pub down_after_misses: u32,
    /// A path that failed (went Down or broke a class's SLA) must stay healthy this long before
    /// flows return to it. Longer avoids ping-pong on a flapping link; shorter returns traffic to
    /// the preferred link sooner.
    #[cfg_attr(feature = "openapi", schema(minimum = 0, maximum = 600000))]
    pub hold_down_ms: u32,
    /// Flap damping: each failure adds 1 to a path's penalty, which halves every half-life; the
    /// hold-down doubles for each point of penalty above 1.
    #[cfg_attr(feature = "openapi", schema(minimum = 1000, maximum = 3600000))]
    pub flap_half_life_ms: u32,
    /// The damped hold-down never exceeds this.
    #[cfg_attr(feature = "openapi", schema(minimum = 0, maximum = 3600000))]
    pub max_hold_down_ms: u32,
    /// A path must be better by this share of the current path's score (and by at least 2 % of
    /// the SLA budget) before it attracts flows that are on a path meeting their SLA.
    #[cfg_attr(feature = "openapi", schema(minimum = 0, maximum = 100))]
    pub min_improvement_pct: u32,
}

impl Default for FailoverSettings {
    fn default() -> Self {
        Self {
            active_probe_interval_ms: 20,
            standby_probe_interval_ms: 100,
            down_after_misses: 3,
            hold_down_ms: 5_000,
            flap_half_life_ms: 30_000,
            max_hold_down_ms: 60_000,
            min_improvement_pct: 20,
        }
    }
}

impl FailoverSettings {
    pub fn active_probe_interval(&self) -> Duration {
        Duration::from_millis(self.active_probe_interval_ms.into())
    }

    pub fn standby_probe_interval(&self) -> Duration {
        Duration::from_millis(self.standby_probe_interval_ms.into())
    }

    pub fn hold_down(&self) -> Duration {
        Duration::from_millis(self.hold_down_ms.into())
    }

    pub fn flap_half_life(&self) -> Duration {
        Duration::from_millis(self.flap_half_life_ms.into())
    }

    pub fn max_hold_down(&self) -> Duration {
        Duration::from_millis(self.max_hold_down_ms.into())
    }

    pub fn validate(&self) -> Result<(), FieldErrors> {
        let mut errs = FieldErrors::default();
        let mut range = |field: &str, v: u32, lo: u32, hi: u32| {
            if !(lo..=hi).contains(&v) {
                errs.push(field, format!("must be within {lo}..={hi}, got {v}"));
            }
        };
        range(
            "active_probe_interval_ms",
            self.active_probe_interval_ms,
            5,
            1_000,
        );
        range(
            "standby_probe_interval_ms",
            self.standby_probe_interval_ms,
            20,
            10_000,
        );
        range("down_after_misses", self.down_after_misses, 2, 50);
        range("hold_down_ms", self.hold_down_ms, 0, 600_000);
        range(
            "flap_half_life_ms",
            self.flap_half_life_ms,
            1_000,
            3_600_000,
        );
        range("max_hold_down_ms", self.max_hold_down_ms, 0, 3_600_000);
        range("min_improvement_pct", self.min_improvement_pct, 0, 100);
        if self.standby_probe_interval_ms < self.active_probe_interval_ms {
            errs.push(
                "standby_probe_interval_ms",
                "must not be shorter than active_probe_interval_ms",
            );
        }
        if self.max_hold_down_ms < self.hold_down_ms {
            errs.push("max_hold_down_ms", "must not be shorter than hold_down_ms");
        }
        errs.into_result()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_partial_documents_fill_in_defaults() {
        FailoverSettings::default().validate().unwrap();
        let s: FailoverSettings = serde_json::from_str(r#"{"hold_down_ms": 1000}"#).unwrap();
        assert_eq!(s.hold_down_ms, 1000);
        assert_eq!(s.active_probe_interval_ms, 20);
    }

    #[test]
    fn every_out_of_range_key_is_reported() {
        let s = FailoverSettings {
            active_probe_interval_ms: 1,
            down_after_misses: 1,
            ..Default::default()
        };
        let errs = s.validate().unwrap_err();
        let fields: Vec<_> = errs.0.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, ["active_probe_interval_ms", "down_after_misses"]);
    }
}
