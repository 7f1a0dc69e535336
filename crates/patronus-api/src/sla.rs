use crate::{FieldErrors, Name};

/// What a traffic class needs from a path. Each bound is optional; a path *meets* the class when
/// every given bound holds.
///
/// - `max_latency_ms` bounds the **round-trip** time measured by probes, with the reflector's
///   dwell time removed (RFC 8762 section 4). Round trip is what can be measured without
///   synchronized clocks; halve it for a one-way budget such as ITU-T G.114's.
/// - `max_jitter_ms` bounds the RFC 3550 interarrival jitter (section 6.4.1), computed per
///   direction from the probe timestamps; the worse direction counts.
/// - `max_loss_pct` bounds the share of probes lost (no reply within the waiting time, RFC 7680)
///   over the path's sliding window.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct SlaClass {
    pub name: Name,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(minimum = 1))]
    pub max_latency_ms: Option<u32>,
    #[serde(default)]
    pub max_jitter_ms: Option<u32>,
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(minimum = 0, maximum = 100))]
    pub max_loss_pct: Option<f64>,
}

impl SlaClass {
    fn builtin(
        name: &str,
        description: &str,
        latency: Option<u32>,
        jitter: Option<u32>,
        loss: Option<f64>,
    ) -> Self {
        Self {
            name: Name::new(name).expect("built-in class names are valid"),
            description: description.to_owned(),
            max_latency_ms: latency,
            max_jitter_ms: jitter,
            max_loss_pct: loss,
        }
    }

    /// The four classes every deployment starts with; operators may edit them.
    pub fn builtins() -> Vec<SlaClass> {
        vec![
            Self::builtin(
                "realtime",
                "voice and video calls",
                Some(150),
                Some(30),
                Some(1.0),
            ),
            Self::builtin(
                "interactive",
                "remote desktop, SSH, transactional apps",
                Some(250),
                Some(50),
                Some(2.0),
            ),
            Self::builtin(
                "business",
                "business applications",
                Some(400),
                None,
                Some(3.0),
            ),
            Self::builtin(
                "bulk",
                "backups, updates, transfers",
                None,
                None,
                Some(10.0),
            ),
        ]
    }

    /// True when the class bounds nothing (every live path meets it).
    pub fn is_unbounded(&self) -> bool {
        self.max_latency_ms.is_none() && self.max_jitter_ms.is_none() && self.max_loss_pct.is_none()
    }

    pub fn validate(&self) -> Result<(), FieldErrors> {
        let mut errs = FieldErrors::default();
        if self.max_latency_ms == Some(0) {
            errs.push("max_latency_ms", "must be > 0 (leave it out for no bound)");
        }
        if let Some(l) = self.max_loss_pct {
            if !l.is_finite() || !(0.0..=100.0).contains(&l) {
                errs.push("max_loss_pct", format!("must be within 0..=100, got {l}"));
            }
        }
        errs.into_result()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtins_are_valid_and_distinct() {
        let b = SlaClass::builtins();
        assert_eq!(b.len(), 4);
        for c in &b {
            c.validate().unwrap();
        }
        assert_eq!(b[0].max_latency_ms, Some(150));
    }

    #[test]
    fn out_of_range_bounds_are_named() {
        let c: SlaClass =
            serde_json::from_str(r#"{"name":"x","max_latency_ms":0,"max_loss_pct":101}"#).unwrap();
        let errs = c.validate().unwrap_err();
        assert_eq!(
            errs.to_string(),
            "max_latency_ms: must be > 0 (leave it out for no bound); max_loss_pct: must be within 0..=100, got 101"
        );
    }
}
