//! Running real edges in a lab: each site's edge generates its own key in the lab's run
//! directory (the lab only ever reads the public half), gets a configuration naming every other
//! site as a peer over all of its links, and runs as `patronus edge run` in the site's namespace.
//!
//! Overlay addresses: site `i` is `10.255.0.(i+1)` (IPv4 underlay) and talks to its peers over
//! every local × remote link pair of the same address family.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use patronus_api::{EdgeConfig, EdgeLink, Link, PeerConfig, WgPublicKey};

use crate::lab::{Lab, LabError, run_dir};
use crate::topology::Plan;

/// The UDP port every edge listens on in the lab.
pub const EDGE_PORT: u16 = 51820;

/// Overlay address of the site at `index` in the plan.
pub fn overlay4(index: usize) -> Ipv4Addr {
    Ipv4Addr::from(0x0aff_0000u32 + index as u32 + 1)
}

/// Which underlay the edges use between each other.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Underlay {
    #[default]
    V4,
    V6,
}

/// The configuration of site `index`'s edge, given every site's public key.
pub fn edge_config(
    plan: &Plan,
    index: usize,
    keys: &[WgPublicKey],
    key_file: PathBuf,
    underlay: Underlay,
) -> EdgeConfig {
    let addr = |l: &crate::topology::LinkPlan| -> IpAddr {
        match underlay {
            Underlay::V4 => l.addr4.into(),
            Underlay::V6 => l.addr6.into(),
        }
    };
    let link = |l: &crate::topology::LinkPlan, endpoint: bool| {
        let mut k = Link::new(l.name.clone(), l.kind);
        k.mtu = l.mtu;
        if endpoint {
            k.endpoint = Some(SocketAddr::new(addr(l), EDGE_PORT));
        }
        k
    };
    let me = &plan.sites[index];
    EdgeConfig {
        site: me.name.clone(),
        private_key_file: key_file,
        overlay: overlay4(index).into(),
        listen_port: EDGE_PORT,
        tun_name: "patronus0".into(),
        links: me
            .links
            .iter()
            .map(|l| EdgeLink {
                link: link(l, false),
                interface: None,
                address: addr(l),
            })
            .collect(),
        peers: plan
            .sites
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != index)
            .map(|(j, s)| PeerConfig {
                name: s.name.clone(),
                public_key: keys[j],
                overlay: overlay4(j).into(),
                lan_prefixes: vec![s.lan4, s.lan6],
                links: s.links.iter().map(|l| link(l, true)).collect(),
            })
            .collect(),
        classes: patronus_api::SlaClass::builtins(),
        policies: Vec::new(),
        failover: Default::default(),
        default_class: patronus_api::Name::new("business").unwrap_or_else(|_| unreachable!()),
        default_steering: Default::default(),
        metrics_listen: None,
    }
}

/// Where site `site`'s edge keeps its files in the lab.
pub fn edge_dir(lab: &Lab, site: &str) -> PathBuf {
    run_dir(lab.run_id()).join("edges").join(site)
}

/// Starts an edge in every site of `lab` with `patronus` (the binary), after letting `adjust`
/// change each configuration. Returns once every edge process runs; use
/// [`wait_for_tunnel`] for the tunnels.
pub fn start_edges(
    lab: &Lab,
    patronus: &Path,
    underlay: Underlay,
    adjust: impl Fn(&mut EdgeConfig),
) -> Result<Vec<EdgeConfig>, LabError> {
    let plan = lab.plan().clone();
    let mut keys = Vec::new();
    for s in &plan.sites {
        let dir = edge_dir(lab, s.name.as_str());
        crate::lab::create_private_dir(&dir)?;
        let out = lab.exec(
            s.name.as_str(),
            &[
                patronus.to_string_lossy().as_ref(),
                "edge",
                "pubkey",
                "--key",
                dir.join("private.key").to_string_lossy().as_ref(),
            ],
        )?;
        let text = String::from_utf8_lossy(&out.stdout);
        let key: WgPublicKey = text.trim().parse().map_err(|e| {
            LabError::Other(format!(
                "edge {}: no public key ({e}): {}",
                s.name,
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        })?;
        keys.push(key);
    }
    let mut configs = Vec::new();
    for (i, s) in plan.sites.iter().enumerate() {
        let dir = edge_dir(lab, s.name.as_str());
        let mut cfg = edge_config(&plan, i, &keys, dir.join("private.key"), underlay);
        adjust(&mut cfg);
        let path = dir.join("edge.toml");
        let text = toml::to_string(&cfg)
            .map_err(|e| LabError::Other(format!("edge {}: writing config: {e}", s.name)))?;
        std::fs::write(&path, text).map_err(|error| LabError::Io {
            what: format!("writing {}", path.display()),
            error,
        })?;
        let log = std::fs::File::create(dir.join("edge.log")).map_err(|error| LabError::Io {
            what: "creating the edge log".into(),
            error,
        })?;
        let mut cmd = Command::new(patronus);
        cmd.args(["edge", "run", "--config"]).arg(&path);
        lab.spawn_logged(s.name.as_str(), cmd, log)?;
        configs.push(cfg);
    }
    Ok(configs)
}

/// Waits until `from` can ping `to` (an address across the tunnels), or `timeout` passes.
pub fn wait_for_tunnel(
    lab: &Lab,
    from: &str,
    to: IpAddr,
    timeout: Duration,
) -> Result<(), LabError> {
    let deadline = Instant::now() + timeout;
    loop {
        let out = lab.exec(from, &["ping", "-c", "1", "-W", "1", &to.to_string()])?;
        if out.status.success() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(LabError::Other(format!(
                "no tunnel from {from} to {to} within {timeout:?}"
            )));
        }
    }
}
