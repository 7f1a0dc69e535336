//! NAT in front of a WAN link, as a branch's broadband router or an LTE carrier's CGNAT puts
//! one: its own namespace (`<site>/<link>/nat`) between the site's edge and the WAN, with the
//! link's public address on its `out` interface and the edge's private one behind `in`, and an
//! nftables ruleset that maps and filters UDP the way the link's [`NatKind`] says (RFC 4787):
//!
//! - `open`: the edge's WireGuard port has one public port (`public_port`, not the same number:
//!   a peer must learn it), which anyone may send to (endpoint-independent mapping and
//!   filtering);
//! - `cgnat`: that same one public port, but only the endpoints the edge has sent to get in
//!   (address-and-port-dependent filtering, through conntrack);
//! - `symmetric`: `masquerade random`, a new random public port for each destination.
//!
//! Everything else the edge sends (its TCP to the controller, other UDP ports) is masqueraded.
//! A mapping lives `timeout_s` without traffic: conntrack's UDP timeouts in the NAT's namespace
//! (both the unreplied and the "stream" one), so a mapping that is not kept alive expires as in
//! a real NAT. Inbound UDP that no mapping lets in is dropped and counted (the `unsolicited`
//! counter, [`unsolicited`]): a test proves a packet was kept out by that count, not by waiting.
//!
//! [`Lab::renumber`](crate::lab::Lab::renumber) gives a link a new address at run time, as a new DHCP lease (or a modem
//! restart) would: the edge's own address on a link without NAT, the NAT's public address on
//! one with (its mappings, removed with the address, are gone too).

use std::net::Ipv4Addr;
use std::process::Command;

use crate::netns::NetnsError;
use crate::topology::{NatKind, NatPlan};

/// The port the edges listen on, whose mapping `open` and `cgnat` fix.
pub use crate::edges::EDGE_PORT;

/// The nftables ruleset of a link's NAT.
pub fn ruleset(nat: &NatPlan) -> String {
    let inside = nat.inside4;
    let port = nat.public_port;
    let (pre, post) = match nat.kind {
        NatKind::Open => (
            format!(
                // Whatever the public address is now (a renumbering changes it).
                "        iifname \"out\" udp dport {port} dnat to {inside}:{EDGE_PORT}\n"
            ),
            format!(
                "        oifname \"out\" ip saddr {inside} udp sport {EDGE_PORT} masquerade to :{port}\n\
                 \x20       oifname \"out\" masquerade\n"
            ),
        ),
        NatKind::Cgnat => (
            String::new(),
            format!(
                "        oifname \"out\" ip saddr {inside} udp sport {EDGE_PORT} masquerade to :{port}\n\
                 \x20       oifname \"out\" masquerade\n"
            ),
        ),
        NatKind::Symmetric => (
            String::new(),
            "        oifname \"out\" masquerade random\n".to_owned(),
        ),
    };
    format!(
        "table ip patronus_nat {{\n\
         \x20   counter unsolicited {{ }}\n\
         \x20   chain prerouting {{\n\
         \x20       type nat hook prerouting priority dstnat; policy accept;\n\
         {pre}\
         \x20   }}\n\
         \x20   chain postrouting {{\n\
         \x20       type nat hook postrouting priority srcnat; policy accept;\n\
         {post}\
         \x20   }}\n\
         \x20   chain input {{\n\
         \x20       type filter hook input priority filter; policy accept;\n\
         \x20       iifname \"out\" meta l4proto udp counter name \"unsolicited\" drop\n\
         \x20   }}\n\
         }}\n"
    )
}

/// Loads `rules` with `nft -f -` in namespace `ns`.
pub fn load(ns: &str, rules: &str) -> Result<(), NetnsError> {
    let out =
        crate::netns::ip_with_input(&["netns", "exec", ns, "nft", "-f", "-"], rules.as_bytes())?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        return Err(NetnsError::Command {
            command: format!("nft -f - in {ns}"),
            message: if err.contains("No such file") || err.contains("not found") {
                format!(
                    "{} (a NAT in the lab needs nftables: apt-get install nftables)",
                    err.trim()
                )
            } else {
                err.trim().to_owned()
            },
        });
    }
    Ok(())
}

/// The conntrack settings of a NAT's namespace: UDP mappings live `timeout_s` without traffic.
/// (Set once the ruleset has loaded conntrack there.)
pub fn timeouts(timeout_s: u32) -> [(&'static str, String); 2] {
    [
        (
            "net/netfilter/nf_conntrack_udp_timeout",
            timeout_s.to_string(),
        ),
        (
            "net/netfilter/nf_conntrack_udp_timeout_stream",
            timeout_s.to_string(),
        ),
    ]
}

/// Inbound UDP packets the NAT in namespace `ns` has kept out so far (no mapping let them in).
pub fn unsolicited(ns: &str) -> Result<u64, NetnsError> {
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            ns,
            "nft",
            "list",
            "counter",
            "ip",
            "patronus_nat",
            "unsolicited",
        ])
        .output()
        .map_err(NetnsError::NoIp)?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(NetnsError::Command {
            command: format!("nft list counter in {ns}"),
            message: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    // "packets 3 bytes 150"
    text.split_whitespace()
        .skip_while(|w| *w != "packets")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| NetnsError::Command {
            command: format!("nft list counter in {ns}"),
            message: format!("no packet count in {text:?}"),
        })
}

/// The address a renumbered link moves to: the next in its /24 after `current` (wrapping
/// after .254 to .2; .1 is the gateway).
pub fn next_address(current: Ipv4Addr) -> Ipv4Addr {
    let o = current.octets();
    let last = if o[3] >= 254 { 2 } else { o[3] + 1 };
    Ipv4Addr::new(o[0], o[1], o[2], last)
}

/// The `ip` batch lines (IPv4) that move the address `old` on `dev` to `new`, with the default
/// routes through `gw` (in the main table with `metric`, and in `table`, if given) and the
/// source rule of `table`.
pub fn move_address_lines(
    dev: &str,
    old: Ipv4Addr,
    new: Ipv4Addr,
    gw: Ipv4Addr,
    metric: Option<usize>,
    table: Option<u32>,
) -> Vec<String> {
    // The old one goes first (deleting a primary address would take a secondary in the same
    // subnet with it), and with it the routes through it; they are added again.
    let mut v = vec![
        format!("addr del {old}/24 dev {dev}"),
        format!("addr add {new}/24 dev {dev}"),
    ];
    match metric {
        Some(m) => v.push(format!(
            "route replace default via {gw} dev {dev} metric {m}"
        )),
        None => v.push(format!("route replace default via {gw} dev {dev}")),
    }
    if let Some(t) = table {
        v.push(format!(
            "route replace default via {gw} dev {dev} table {t}"
        ));
        v.push(format!("rule del from {old} lookup {t} pref 100"));
        v.push(format!("rule add from {new} lookup {t} pref 100"));
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_next_address_stays_in_the_link_and_off_the_gateway() {
        assert_eq!(
            next_address(Ipv4Addr::new(100, 64, 3, 2)),
            Ipv4Addr::new(100, 64, 3, 3)
        );
        assert_eq!(
            next_address(Ipv4Addr::new(100, 64, 3, 254)),
            Ipv4Addr::new(100, 64, 3, 2)
        );
    }
}
