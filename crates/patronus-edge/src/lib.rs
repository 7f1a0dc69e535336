//! `patronus-edge`: the data plane of a site. WireGuard tunnels (boringtun's noise state machine)
//! over every pair of local and remote WAN links, each pair a path, probed all the time and
//! steered by the path engine (`patronus-core`).
//!
//! # Sessions: one per path
//!
//! Each path has its own WireGuard session between the two sites' keys. A path is then keyed,
//! rekeyed and monitored on its own: a handshake lost on one link delays only that path, and
//! the probes that travel in every path's session keep all of them established, so moving a flow
//! is a table change that never waits for a handshake. The cost is one handshake per path every
//! two minutes instead of one per peer. The receiver finds the session from the receiver index
//! in each message, not from the socket, which is also how `duplicate` works: the packet is
//! encrypted once under the primary path's session and the same datagram sent on both paths; the
//! second copy to arrive fails that session's replay check and is dropped.

pub mod edge;
pub mod keys;
pub mod routes;
pub mod status;
pub mod wire;

pub use edge::{Edge, EdgeError, StopHandle};
pub use keys::PrivateKey;
