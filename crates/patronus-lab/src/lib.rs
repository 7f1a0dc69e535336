//! `patronus-lab`: a multi-site WAN inside one Linux machine.
//!
//! A [`Topology`] (data: a file or a named builder) becomes a running [`Lab`]: one network
//! namespace per site edge, per LAN host and for the WAN in between, joined by veth pairs, with a
//! userspace [`emulator`] that applies delay, jitter, loss (random and bursty), rate limits and
//! cuts to every emulated WAN link, changeable while the lab runs. The lab provides the
//! measurement tools the rest of Patronus is tested and benchmarked with: a constant-rate UDP
//! [`stream`] with loss-derived outage time, TCP throughput through `iperf3`, and a [`webhook`]
//! receiver.
//!
//! Everything here needs root; [`netns::privilege_problem`] says why when it is missing.

pub mod edges;
pub mod emulator;
pub mod flood;
#[cfg(feature = "harness")]
pub mod harness;
pub mod impair;
pub mod iperf;
pub mod lab;
pub mod nat;
pub mod netns;
pub mod postgres;
pub mod s3;
pub mod stats;
pub mod stream;
pub mod topology;
pub mod webhook;

pub use emulator::{Dir, EmulatorStatus, LinkStatus};
pub use impair::Impairment;
pub use lab::{Lab, LabError, LabOptions, LabState};
pub use topology::{Plan, Topology};
