//! The path engine of a Patronus edge, free of I/O.
//!
//! `patronus-core` decides; the edge shell acts. The engine never opens a socket, never reads a
//! clock and never spawns anything: time comes in as the `now` argument of every call, packets
//! and probe replies come in as bytes, and what to do comes out as values ("send this packet on
//! path 3", "send this probe on path 7", "path 2 is down", "wake me at t"). This keeps every
//! decision testable on a simulated network with a virtual clock, and makes the edge's event
//! loop a thin shell.
//!
//! # Driving an [`Engine`]
//!
//! ```text
//! loop {
//!     for each packet from the LAN:    engine.decide(&PacketMeta::parse(pkt)?, len, now)
//!                                          → send on the path(s) it names, or drop
//!     for each probe request received:  engine.handle_probe_request(path, bytes, ttl, arrived, now)
//!                                          → send the reply back on the same path
//!     for each probe reply received:    engine.handle_probe_reply(path, bytes, now)
//!     for each data packet received:    engine.handle_data_received(path, len, now)
//!     when poll_timeout() is reached:   engine.handle_timeout(now)
//!     then drain:                       engine.poll_transmit()  → probes to send
//!                                       engine.poll_event()     → what steering did, for metrics
//!                                       engine.poll_report()    → reported path changes, for
//!                                                                 operators and telemetry
//!     sleep until engine.poll_timeout() or the next packet
//! }
//! ```
//!
//! The modules document the model they implement: [`probe`] the wire format, [`estimate`] the
//! estimators, [`path`] liveness and health, [`score`] the one scoring function, [`select`] the
//! ranking, the modes and the move rule, [`classify`] the classifier, and [`engine`] how they are
//! put together, including the flow table.

pub mod classify;
pub mod engine;
pub mod estimate;
mod flow_table;
pub mod packet;
pub mod path;
pub mod probe;
mod route;
pub mod score;
pub mod select;

use std::fmt;
use std::time::Duration;

pub use engine::{
    Engine, EngineConfig, EngineStats, OUTAGE_BOUNDS_S, Outages, PathSnapshot, Transmit,
};
pub use packet::{FlowKey, PacketError, PacketMeta};
pub use path::PathCounters;
pub use patronus_api::PathState;
pub use probe::{PROBE_LEN, ProbeError, STAMP_PORT};
pub use score::Metrics;

/// A path (local link × remote link to one peer), numbered by the engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PathId(pub u32);

/// A peer site, numbered by the engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerId(pub u32);

/// An SLA class, by its position in the engine's configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClassId(pub u8);

impl fmt::Display for PathId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "path#{}", self.0)
    }
}

/// What to do with a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Send(PathId),
    /// Send on both paths (the `duplicate` steering mode); see [`select`] for how the receiver
    /// drops the second copy.
    Duplicate {
        primary: PathId,
        secondary: PathId,
    },
    Drop(DropReason),
}

impl Decision {
    /// The path the packet is (first) sent on.
    pub fn primary(self) -> Option<PathId> {
        match self {
            Decision::Send(p) | Decision::Duplicate { primary: p, .. } => Some(p),
            Decision::Drop(_) => None,
        }
    }

    /// Every path the packet is sent on.
    pub fn paths(self) -> impl Iterator<Item = PathId> {
        let (a, b) = match self {
            Decision::Send(p) => (Some(p), None),
            Decision::Duplicate { primary, secondary } => (Some(primary), Some(secondary)),
            Decision::Drop(_) => (None, None),
        };
        a.into_iter().chain(b)
    }
}

/// Why a packet is not sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// The destination is in no peer's LAN prefixes.
    NoRoute,
    /// The peer has no live path the policy admits.
    NoPath,
    /// The policy is strict and no path meets its SLA.
    SlaUnavailable,
}

/// Why a flow moved to another path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MoveReason {
    /// Its path went Down.
    PathDown,
    /// Its path was removed from the configuration.
    PathRemoved,
    /// Its path broke the flow's SLA.
    SlaViolated,
    /// A path it prefers became eligible (failback, cheaper, or better by the margin).
    Better,
    /// A policy change reclassified the flow or no longer admits its path.
    PolicyChanged,
}

/// What an edge reports: every reason the engine has is one the wire carries.
impl From<MoveReason> for patronus_api::FailoverReason {
    fn from(r: MoveReason) -> Self {
        match r {
            MoveReason::PathDown => Self::PathDown,
            MoveReason::PathRemoved => Self::PathRemoved,
            MoveReason::SlaViolated => Self::SlaViolated,
            MoveReason::Better => Self::Better,
            MoveReason::PolicyChanged => Self::PolicyChanged,
        }
    }
}

/// Something worth telling metrics and telemetry. [`Engine::poll_event`] returns each with the
/// `now` of the call that produced it.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A path answered a probe after being Down (or for the first time).
    PathUp { path: PathId, rtt: Duration },
    /// A path showed no sign of life for its detection time. `flows` were on it.
    PathDown {
        path: PathId,
        silent_for: Duration,
        flows: u32,
    },
    /// A path stopped meeting a class's SLA.
    SlaViolated {
        path: PathId,
        class: ClassId,
        metrics: Metrics,
    },
    /// A path meets a class's SLA again (it still serves its hold-down).
    SlaRestored { path: PathId, class: ClassId },
    /// A flow changed path. Flows move when their next packet is decided, which is the first
    /// moment the move matters.
    FlowMoved {
        flow: FlowKey,
        from: PathId,
        to: PathId,
        reason: MoveReason,
    },
}
