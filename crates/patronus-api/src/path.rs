//! What a path is and what happens to it, in the words every part uses: the path engine decides
//! these values, the edge reports them, the controller stores, filters and serves them. Each is
//! an enum whose JSON spelling is fixed (`"up"`, `"sla-violated"`, `"path-down"`, ...), so an
//! edge and a controller of different versions read each other.
//!
//! # Values this side does not know
//!
//! A [`PathState`] is refused if unknown: the engine, the gauges (1, 0.5, 0) and the controller's
//! "worst state" all give each state a meaning, and there is none to give a new one; a state
//! is a change of the model, which reaches controllers before edges.
//!
//! A [`PathEventKind`] or a [`FailoverReason`] that this side does not know is refused where
//! someone chose it (a query filter), but kept as `Unknown` where an edge reports it (the
//! `kind` of a [`PathEvent`](crate::PathEvent), the `reason` of a
//! [`FailoverEvent`](crate::FailoverEvent)): an edge resends its events until the controller
//! takes them, so refusing a report for one reason a newer engine gained would stall all of
//! that edge's telemetry until its controller is upgraded. The event is kept (when, which paths,
//! how many flows) and only the word is lost.

use std::fmt;
use std::str::FromStr;

/// The state of a path, as its edge's path engine sees it.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize,
)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "kebab-case")]
pub enum PathState {
    /// Replies arrive and the path meets every class's SLA.
    Up,
    /// Replies arrive but the path breaks at least one class's SLA.
    Degraded,
    /// No reply yet, or no sign of life for the detection time. Every path starts here.
    #[default]
    Down,
}

/// A path's change of state, as an edge reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "kebab-case")]
pub enum PathEventKind {
    /// No sign of life for the detection time.
    Down,
    /// Alive again, or for the first time.
    Up,
    /// The path broke a class's SLA.
    SlaViolated,
    /// The path meets a class's SLA again.
    SlaRestored,
    /// A kind this build does not know, reported by a newer edge (see the module doc).
    Unknown,
}

/// Why flows moved from one path to another.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "kebab-case")]
pub enum FailoverReason {
    /// Their path went down.
    PathDown,
    /// Their path was removed from the configuration.
    PathRemoved,
    /// Their path broke their class's SLA.
    SlaViolated,
    /// A path they prefer became eligible: back from a failure and past its hold-down, or
    /// cheaper (`lowest-cost`), or better by the margin.
    Better,
    /// A policy change reclassified them or no longer admits their path.
    PolicyChanged,
    /// A reason this build does not know, reported by a newer edge (see the module doc).
    Unknown,
}

impl PathState {
    pub const ALL: [PathState; 3] = [PathState::Up, PathState::Degraded, PathState::Down];

    /// The JSON spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            PathState::Up => "up",
            PathState::Degraded => "degraded",
            PathState::Down => "down",
        }
    }
}

impl PathEventKind {
    pub const ALL: [PathEventKind; 5] = [
        PathEventKind::Down,
        PathEventKind::Up,
        PathEventKind::SlaViolated,
        PathEventKind::SlaRestored,
        PathEventKind::Unknown,
    ];

    /// The JSON spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            PathEventKind::Down => "down",
            PathEventKind::Up => "up",
            PathEventKind::SlaViolated => "sla-violated",
            PathEventKind::SlaRestored => "sla-restored",
            PathEventKind::Unknown => "unknown",
        }
    }

    /// Deserializes a kind an edge reported, keeping one this build does not know as
    /// [`PathEventKind::Unknown`].
    pub(crate) fn reported<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <String as serde::Deserialize>::deserialize(d)?;
        Ok(s.parse().unwrap_or(PathEventKind::Unknown))
    }
}

impl FailoverReason {
    pub const ALL: [FailoverReason; 6] = [
        FailoverReason::PathDown,
        FailoverReason::PathRemoved,
        FailoverReason::SlaViolated,
        FailoverReason::Better,
        FailoverReason::PolicyChanged,
        FailoverReason::Unknown,
    ];

    /// The JSON spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            FailoverReason::PathDown => "path-down",
            FailoverReason::PathRemoved => "path-removed",
            FailoverReason::SlaViolated => "sla-violated",
            FailoverReason::Better => "better",
            FailoverReason::PolicyChanged => "policy-changed",
            FailoverReason::Unknown => "unknown",
        }
    }

    /// Deserializes a reason an edge reported, keeping one this build does not know as
    /// [`FailoverReason::Unknown`].
    pub(crate) fn reported<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <String as serde::Deserialize>::deserialize(d)?;
        Ok(s.parse().unwrap_or(FailoverReason::Unknown))
    }
}

/// A spelling that names no value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{got:?} is not one of {expected}")]
pub struct UnknownValue {
    pub got: String,
    pub expected: String,
}

/// `Display` (padding honoured, for tables), and `FromStr` that takes exactly the JSON spellings.
macro_rules! text {
    ($($t:ty),*) => {$(
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.pad(self.as_str())
            }
        }

        impl FromStr for $t {
            type Err = UnknownValue;
            fn from_str(s: &str) -> Result<Self, UnknownValue> {
                <$t>::ALL.into_iter().find(|v| v.as_str() == s).ok_or_else(|| UnknownValue {
                    got: s.to_owned(),
                    expected: <$t>::ALL.map(<$t>::as_str).join(", "),
                })
            }
        }
    )*};
}

text!(PathState, PathEventKind, FailoverReason);

/// Compares with the JSON spelling, as a reader of the edge's status does (`state == "up"`).
impl PartialEq<&str> for PathState {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `as_str`, `FromStr` and serde agree on every value, and each value is in `ALL` once.
    fn agree<T>(all: &[T])
    where
        T: Copy + PartialEq + fmt::Debug + fmt::Display + FromStr,
        T: serde::Serialize + serde::de::DeserializeOwned,
        <T as FromStr>::Err: fmt::Debug,
    {
        for (i, v) in all.iter().enumerate() {
            let s = v.to_string();
            assert_eq!(serde_json::to_value(v).unwrap(), serde_json::json!(s));
            assert_eq!(
                serde_json::from_value::<T>(serde_json::json!(s)).unwrap(),
                *v
            );
            assert_eq!(s.parse::<T>().unwrap(), *v);
            assert_eq!(all.iter().position(|x| x == v), Some(i), "{v:?} twice");
        }
    }

    #[test]
    fn every_value_has_one_spelling_in_json_and_in_text() {
        agree(&PathState::ALL);
        agree(&PathEventKind::ALL);
        agree(&FailoverReason::ALL);
    }

    /// What old edges send and old controllers read: these strings may never change.
    #[test]
    fn the_wire_spellings_are_the_ones_edges_have_always_sent() {
        let words = |v: Vec<&str>| v.join(" ");
        assert_eq!(
            words(PathState::ALL.map(PathState::as_str).to_vec()),
            "up degraded down"
        );
        assert_eq!(
            words(PathEventKind::ALL.map(PathEventKind::as_str).to_vec()),
            "down up sla-violated sla-restored unknown"
        );
        assert_eq!(
            words(FailoverReason::ALL.map(FailoverReason::as_str).to_vec()),
            "path-down path-removed sla-violated better policy-changed unknown"
        );
    }

    #[test]
    fn a_misspelt_value_is_refused_naming_the_ones_that_exist() {
        let e = "sideways".parse::<PathState>().unwrap_err();
        assert_eq!(
            e.to_string(),
            r#""sideways" is not one of up, degraded, down"#
        );
        assert!("Up".parse::<PathState>().is_err());
        assert!("better-path".parse::<FailoverReason>().is_err());
        let e = serde_json::from_str::<PathEventKind>(r#""flapped""#).unwrap_err();
        assert!(e.to_string().contains("unknown variant `flapped`"), "{e}");
    }

    #[test]
    fn tables_can_pad_a_value() {
        assert_eq!(format!("[{:<9}]", PathState::Up), "[up       ]");
        assert!(PathState::Degraded == "degraded" && PathState::Up != "down");
    }
}
