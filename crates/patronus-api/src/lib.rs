//! Types shared by the Patronus controller, edge and CLI.
//!
//! Everything here is data with a serde shape: the controller stores and serves these types, the
//! edge receives them in its configuration, and the path engine (`patronus-core`) compiles them.
//!
//! Values are parsed into valid types at the boundary ("parse, don't validate"): a [`Prefix`],
//! a [`Name`], a [`PortRange`] or a [`Dscp`] cannot hold an invalid value once built, so a
//! malformed document fails in deserialization with a message naming the problem. Rules that
//! span several fields (a port range on ICMP, a failover interval out of range, two policies with
//! the same order) are checked by `validate()`, which reports every problem with the dotted path
//! of the offending key, never only the first.

mod edge;
mod error;
mod failover;
mod link;
mod name;
#[cfg(feature = "openapi")]
mod openapi;
mod path;
mod policy;
mod prefix;
pub mod relay;
mod sla;
pub mod stun;

pub use edge::{
    ClassReport, ConfigDelta, ControllerUrls, EdgeConfig, EdgeLink, EdgeLocal, FailoverEvent,
    HandshakeLimits, KeyError, LocalLink, PathEvent, PathReport, PeerConfig, ProbeMode, SiteConfig,
    SiteHead, SiteShared, Telemetry, WgPublicKey, key_from_base64, key_to_base64,
};
pub use error::{FieldError, FieldErrors};
pub use failover::FailoverSettings;
pub use link::{Link, LinkKind};
pub use name::{Name, NameError};
pub use path::{FailoverReason, PathEventKind, PathState, UnknownValue};
pub use policy::{
    Dscp, LinkPreference, MAX_POLICIES, Match, MeteredUse, Policy, PortRange, Protocol,
    SteeringMode, validate_policies,
};
pub use prefix::{Prefix, PrefixError};
pub use sla::SlaClass;
