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

pub mod coalesce;
pub mod crypto_rate;
pub mod edge;
pub mod handshake;
pub mod keys;
pub mod linksock;
pub mod routes;
pub mod session;
pub mod status;
pub mod wire;

pub use edge::{Edge, EdgeError, StopHandle};
pub use keys::PrivateKey;

#[cfg(test)]
mod tests {
    #[test]
    fn the_commented_example_configuration_parses_and_validates() {
        let text = include_str!("../edge.example.toml");
        let cfg: patronus_api::EdgeConfig = toml::from_str(text).unwrap_or_else(|e| panic!("{e}"));
        cfg.validate().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(cfg.peers[0].links.len(), 2);
        assert_eq!(cfg.policies.len(), 2);
    }

    /// The handshake limits are the defaults when left out, and a bad one is named by its key.
    #[test]
    fn handshake_limits_default_and_a_bad_one_is_named() {
        let text = include_str!("../edge.example.toml");
        let cfg: patronus_api::EdgeConfig = toml::from_str(text).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(cfg.handshake, patronus_api::HandshakeLimits::default());
        let text = text.replace("cookies_per_path_per_s = 10", "cookies_per_path_per_s = 0");
        let cfg: patronus_api::EdgeConfig = toml::from_str(&text).unwrap_or_else(|e| panic!("{e}"));
        let e = cfg.validate().unwrap_err().to_string();
        assert!(e.contains("handshake.cookies_per_path_per_s"), "{e}");
    }

    /// What a running edge would refuse is refused before anything is applied or kept: here a
    /// policy naming a class the configuration does not define.
    #[test]
    fn a_configuration_the_engine_would_refuse_fails_the_check() {
        let text = include_str!("../edge.example.toml");
        let cfg: patronus_api::EdgeConfig = toml::from_str(text).unwrap_or_else(|e| panic!("{e}"));
        crate::edge::check(&cfg).unwrap_or_else(|e| panic!("{e}"));
        let text = text.replace("class = \"realtime\"", "class = \"platinum\"");
        let cfg: patronus_api::EdgeConfig = toml::from_str(&text).unwrap_or_else(|e| panic!("{e}"));
        let e = crate::edge::check(&cfg).unwrap_err().to_string();
        assert!(e.contains("platinum"), "{e}");
    }

    #[test]
    fn a_bad_configuration_is_reported_key_by_key() {
        let text = include_str!("../edge.example.toml")
            .replace("down_after_misses = 3", "down_after_misses = 0")
            .replace("overlay = \"10.255.0.2\"", "overlay = \"10.255.0.1\"")
            .replace("127.0.0.1:9101", "0.0.0.0:9101");
        let cfg: patronus_api::EdgeConfig = toml::from_str(&text).unwrap_or_else(|e| panic!("{e}"));
        let e = cfg.validate().unwrap_err().to_string();
        assert!(e.contains("failover.down_after_misses"), "{e}");
        assert!(e.contains("peers[0].overlay"), "{e}");
        assert!(
            e.contains("metrics_listen: 0.0.0.0:9101 is not a loopback address"),
            "{e}"
        );
        let e = toml::from_str::<patronus_api::EdgeConfig>(
            &include_str!("../edge.example.toml").replace("site = ", "sight = "),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("sight"), "{e}");
    }
}
