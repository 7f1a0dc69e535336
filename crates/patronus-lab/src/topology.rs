//! Lab topologies as data: sites, their LAN hosts and their WAN links, from a TOML or JSON file or
//! a named builder, and the address plan the lab derives from them.
//!
//! # Shape of a lab
//!
//! Every site is an **edge** namespace with a LAN bridge (`lan`) and one interface per WAN link
//! (named after the link). Each LAN host is a namespace of its own, addressed from the site's LAN
//! prefix and routed via the edge. Every WAN link is a veth from the edge to one shared **wan**
//! namespace, the "Internet" of the lab, where the WAN emulator sits on every emulated link. Any
//! link can reach any other, so a pair of sites with `m` and `n` links has `m × n` paths.
//!
//! # Address plan (fixed, so that tests and docs can name addresses)
//!
//! | what | IPv4 | IPv6 |
//! |---|---|---|
//! | WAN link `k` (global index, in file order) | `100.64.0.0/10` + k·256: gateway `.1`, edge `.2`, `/24` | `fd00:2:k::/64`: gateway `::1`, edge `::2` |
//! | LAN of site `i` (unless given) | `10.128.0.0/9` + i·256: edge `.1`, host `j` at `.(9+j)`, `/24` | `fd00:1:i::/64`, same host numbers |

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;

use patronus_api::{LinkKind, Name, Prefix};

use crate::impair::Impairment;

/// Longest Linux interface name; link names become interface names in the edge namespace.
pub const MAX_LINK_NAME: usize = 15;
/// Largest number of LAN hosts per site.
pub const MAX_HOSTS: u8 = 50;
/// Largest number of WAN links in one lab (the size of the address plan).
pub const MAX_LINKS: usize = 16_384;
/// Where WAN link addresses come from; LAN prefixes may not overlap them.
pub const WAN_PLAN4: &str = "100.64.0.0/10";
pub const WAN_PLAN6: &str = "fd00:2::/32";
/// Node names the lab uses itself.
pub const RESERVED: [&str; 2] = ["wan", "controller"];

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Topology {
    pub name: String,
    /// Add a `controller` namespace with one unemulated link into the WAN.
    #[serde(default)]
    pub controller: bool,
    pub sites: Vec<SiteSpec>,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteSpec {
    pub name: Name,
    /// IPv4 LAN prefix; allocated from the plan when absent.
    #[serde(default)]
    pub lan: Option<Prefix>,
    /// IPv6 LAN prefix; allocated from the plan when absent.
    #[serde(default)]
    pub lan6: Option<Prefix>,
    /// Number of LAN hosts (`h1`, `h2`, ...).
    #[serde(default = "one")]
    pub hosts: u8,
    pub links: Vec<LinkSpec>,
}

fn one() -> u8 {
    1
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkSpec {
    pub name: Name,
    pub kind: LinkKind,
    /// Pass the link through the WAN emulator. An unemulated link is a bare veth: the kernel
    /// forwards it and no impairment can be set (a baseline for throughput).
    #[serde(default = "yes")]
    pub emulated: bool,
    /// Impairment applied to both directions when the lab starts, as `key=value` settings
    /// (e.g. `"delay=20ms jitter=2ms"`).
    #[serde(default)]
    pub impair: Option<String>,
    #[serde(default)]
    pub mtu: Option<u16>,
    /// The link sits behind a NAT (IPv4; see [`crate::nat`]): `open`, `cgnat` or `symmetric`.
    #[serde(default)]
    pub nat: Option<NatKind>,
    /// How long the NAT keeps a UDP mapping with no traffic, in seconds (default 30).
    #[serde(default)]
    pub nat_timeout_s: Option<u32>,
}

/// How a NAT in front of a link maps and filters UDP (RFC 4787's terms).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NatKind {
    /// Endpoint-independent mapping and filtering ("full cone"): the edge's port has one
    /// public port, which anyone may send to.
    Open,
    /// Endpoint-independent mapping, address-and-port-dependent filtering: one public port,
    /// which only the endpoints the edge has sent to may send to (home routers, RFC 6888
    /// carrier-grade NAT).
    Cgnat,
    /// Endpoint-dependent mapping ("symmetric"): a new random public port for each
    /// destination, address-and-port-dependent filtering.
    Symmetric,
}

impl NatKind {
    pub fn as_str(self) -> &'static str {
        match self {
            NatKind::Open => "open",
            NatKind::Cgnat => "cgnat",
            NatKind::Symmetric => "symmetric",
        }
    }
}

/// The default lifetime of an idle NAT mapping.
pub const NAT_TIMEOUT_S: u32 = 30;

/// A NAT in front of a link: its own namespace (`<site>/<link>/nat`) between the site's edge and
/// the WAN, holding the link's public address.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct NatPlan {
    pub kind: NatKind,
    pub timeout_s: u32,
    /// The edge's (private) address on the link, and the NAT's on the same /24.
    pub inside4: Ipv4Addr,
    pub gw_inside4: Ipv4Addr,
    /// The public port the edge's WireGuard port is mapped to (`open` and `cgnat`).
    pub public_port: u16,
}

/// A topology that cannot be built; each message names the field.
#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    #[error("{0}")]
    Invalid(String),
    #[error("reading {path}: {error}")]
    Read { path: String, error: std::io::Error },
    #[error("parsing {path}: {message}")]
    Parse { path: String, message: String },
}

fn invalid(msg: impl Into<String>) -> TopologyError {
    TopologyError::Invalid(msg.into())
}

fn name(s: &str) -> Name {
    // Builders only use literal names that are valid by construction.
    Name::new(s).unwrap_or_else(|e| panic!("builder name {s:?}: {e}"))
}

fn link(n: &str, kind: LinkKind) -> LinkSpec {
    LinkSpec {
        name: name(n),
        kind,
        emulated: true,
        impair: None,
        mtu: None,
        nat: None,
        nat_timeout_s: None,
    }
}

fn site(n: &str, links: Vec<LinkSpec>) -> SiteSpec {
    SiteSpec {
        name: name(n),
        lan: None,
        lan6: None,
        hosts: 1,
        links,
    }
}

/// The named builders and what they take, for help texts.
pub const BUILDERS: &str = "two-sites-two-links, three-sites-mixed, hub-and-spokes N";

impl Topology {
    /// Two sites `a` and `b`, each with an MPLS link `mpls` and a broadband link `inet`, no
    /// impairment: four paths between the sites, the workhorse of the tests.
    pub fn two_sites_two_links() -> Self {
        Self::two_sites(
            "two-sites-two-links",
            &[
                ("mpls", LinkKind::Mpls, true),
                ("inet", LinkKind::Broadband, true),
            ],
        )
    }

    /// Two sites `a` and `b` with the same links, each `(name, kind, emulated)`; panics on an
    /// invalid link name (for literal names in builders, tests and benchmarks).
    pub fn two_sites(name: &str, links: &[(&str, LinkKind, bool)]) -> Self {
        Self {
            name: name.into(),
            controller: false,
            sites: ["a", "b"]
                .iter()
                .map(|s| {
                    site(
                        s,
                        links
                            .iter()
                            .map(|(n, kind, emulated)| LinkSpec {
                                emulated: *emulated,
                                ..link(n, *kind)
                            })
                            .collect(),
                    )
                })
                .collect(),
        }
    }

    /// Three sites with MPLS, broadband and LTE links of typical quality: MPLS 5 ms one way,
    /// broadband 10 ms ± 1 ms, LTE 25 ms ± 5 ms (per access link and direction, so a path's RTT
    /// is twice the sum of its two links). `hq` has all three kinds, `branch1` MPLS and LTE,
    /// `branch2` broadband and LTE; a controller namespace is attached.
    pub fn three_sites_mixed() -> Self {
        let mpls = || LinkSpec {
            impair: Some("delay=5ms".into()),
            ..link("mpls", LinkKind::Mpls)
        };
        let inet = || LinkSpec {
            impair: Some("delay=10ms jitter=1ms".into()),
            ..link("inet", LinkKind::Broadband)
        };
        let lte = || LinkSpec {
            impair: Some("delay=25ms jitter=5ms".into()),
            ..link("lte", LinkKind::Lte)
        };
        Self {
            name: "three-sites-mixed".into(),
            controller: true,
            sites: vec![
                site("hq", vec![mpls(), inet(), lte()]),
                site("branch1", vec![mpls(), lte()]),
                site("branch2", vec![inet(), lte()]),
            ],
        }
    }

    /// A hub `hub` and `spokes` spokes `spoke1..`, each with a broadband and an LTE link; a
    /// controller namespace is attached.
    pub fn hub_and_spokes(spokes: usize) -> Result<Self, TopologyError> {
        if !(1..=500).contains(&spokes) {
            return Err(invalid(format!(
                "hub-and-spokes: {spokes} spokes is outside 1..=500"
            )));
        }
        let links = || {
            vec![
                link("inet", LinkKind::Broadband),
                link("lte", LinkKind::Lte),
            ]
        };
        let mut sites = vec![site("hub", links())];
        sites.extend((1..=spokes).map(|i| site(&format!("spoke{i}"), links())));
        Ok(Self {
            name: format!("hub-and-spokes-{spokes}"),
            controller: true,
            sites,
        })
    }

    /// A named builder (`args` holds its parameters) or, failing that, a TOML or JSON file.
    pub fn from_cli(what: &str, args: &[String]) -> Result<Self, TopologyError> {
        let no_args = |t: Self| {
            if args.is_empty() {
                Ok(t)
            } else {
                Err(invalid(format!("{what} takes no parameters")))
            }
        };
        match what {
            "two-sites-two-links" => no_args(Self::two_sites_two_links()),
            "three-sites-mixed" => no_args(Self::three_sites_mixed()),
            "hub-and-spokes" => {
                let [n] = args else {
                    return Err(invalid(
                        "hub-and-spokes needs the number of spokes, e.g. `hub-and-spokes 4`",
                    ));
                };
                let n = n
                    .parse()
                    .map_err(|_| invalid(format!("hub-and-spokes: {n:?} is not a number")))?;
                Self::hub_and_spokes(n)
            }
            _ if Path::new(what).exists() => no_args(Self::load(Path::new(what))?),
            _ => Err(invalid(format!(
                "{what:?} is neither a topology ({BUILDERS}) nor a file"
            ))),
        }
    }

    /// Reads a topology from a `.json` file, or a TOML file otherwise.
    pub fn load(path: &Path) -> Result<Self, TopologyError> {
        let p = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|error| TopologyError::Read {
            path: p.clone(),
            error,
        })?;
        let t: Self = if path.extension().is_some_and(|e| e == "json") {
            serde_json::from_str(&text).map_err(|e| TopologyError::Parse {
                path: p.clone(),
                message: e.to_string(),
            })?
        } else {
            toml::from_str(&text).map_err(|e| TopologyError::Parse {
                path: p.clone(),
                message: e.to_string(),
            })?
        };
        Ok(t)
    }

    /// Checks the topology and derives every address.
    pub fn plan(&self) -> Result<Plan, TopologyError> {
        if self.sites.is_empty() {
            return Err(invalid("sites: a lab needs at least one site"));
        }
        let mut seen = HashSet::new();
        let mut sites = Vec::new();
        let mut k = 0usize;
        let mut lans: Vec<(Prefix, String)> = Vec::new();
        for (i, s) in self.sites.iter().enumerate() {
            let at = format!("sites[{i}] ({})", s.name);
            if RESERVED.contains(&s.name.as_str()) {
                return Err(invalid(format!(
                    "{at}.name: {:?} is reserved",
                    s.name.as_str()
                )));
            }
            if s.name.as_str().contains('.') {
                // Host namespaces are `<site>.<host>`: a dotted site name could collide.
                return Err(invalid(format!(
                    "{at}.name: a site name may not contain '.'"
                )));
            }
            if !seen.insert(s.name.clone()) {
                return Err(invalid(format!("{at}.name: another site has this name")));
            }
            if s.links.is_empty() {
                return Err(invalid(format!(
                    "{at}.links: a site needs at least one link"
                )));
            }
            if !(1..=MAX_HOSTS).contains(&s.hosts) {
                return Err(invalid(format!(
                    "{at}.hosts: {} is outside 1..={MAX_HOSTS}",
                    s.hosts
                )));
            }
            let lan4 = match s.lan {
                Some(p) if !p.is_ipv4() || p.prefix_len() > 26 => {
                    return Err(invalid(format!(
                        "{at}.lan: {p} must be IPv4, /26 or larger"
                    )));
                }
                Some(p) => p,
                None => prefix(
                    IpAddr::V4(Ipv4Addr::from(0x0a80_0000u32 + ((i as u32) << 8))),
                    24,
                ),
            };
            let lan6 = match s.lan6 {
                Some(p) if p.is_ipv4() || p.prefix_len() > 120 => {
                    return Err(invalid(format!(
                        "{at}.lan6: {p} must be IPv6, /120 or larger"
                    )));
                }
                Some(p) => p,
                None => prefix(
                    IpAddr::V6(Ipv6Addr::new(0xfd00, 1, i as u16, 0, 0, 0, 0, 0)),
                    64,
                ),
            };
            for (p, field) in [(lan4, "lan"), (lan6, "lan6")] {
                let wan = if p.is_ipv4() { WAN_PLAN4 } else { WAN_PLAN6 };
                let wan: Prefix = wan.parse().map_err(|_| invalid("WAN plan prefix"))?;
                if p.overlaps(&wan) {
                    return Err(invalid(format!(
                        "{at}.{field}: {p} overlaps {wan}, where the lab numbers its WAN links"
                    )));
                }
                if let Some((_, other)) = lans.iter().find(|(q, _)| q.overlaps(&p)) {
                    return Err(invalid(format!(
                        "{at}.{field}: {p} overlaps the LAN of {other}"
                    )));
                }
                lans.push((p, s.name.to_string()));
            }
            let mut links = Vec::new();
            let mut link_names = HashSet::new();
            for (j, l) in s.links.iter().enumerate() {
                let at = format!("{at}.links[{j}] ({})", l.name);
                let n = l.name.as_str();
                let host_port =
                    n.len() > 1 && n.starts_with('h') && n[1..].bytes().all(|b| b.is_ascii_digit());
                if n.len() > MAX_LINK_NAME || n == "lan" || n == "lo" || host_port {
                    return Err(invalid(format!(
                        "{at}.name: a link name becomes an interface name beside `lo`, `lan` and the host ports `h1`, `h2`, ...: at most {MAX_LINK_NAME} characters and none of those"
                    )));
                }
                if !link_names.insert(l.name.clone()) {
                    return Err(invalid(format!(
                        "{at}.name: another link of this site has this name"
                    )));
                }
                let lp = link_plan(k, l, &at)?;
                if let Some(n) = &lp.nat {
                    let inside = prefix(IpAddr::V4(n.inside4), 24);
                    if inside.overlaps(&lan4) {
                        return Err(invalid(format!(
                            "{at}.nat: the NAT's inside network {inside} overlaps the site's LAN \
                             {lan4}: give the site another `lan`"
                        )));
                    }
                }
                links.push(lp);
                k += 1;
            }
            let host_addr = |j: u8| (offset4(lan4, 9 + j as u32), offset6(lan6, 9 + j as u128));
            sites.push(SitePlan {
                name: s.name.clone(),
                lan4,
                lan6,
                edge_lan4: offset4(lan4, 1),
                edge_lan6: offset6(lan6, 1),
                hosts: (1..=s.hosts)
                    .map(|j| {
                        let (addr4, addr6) = host_addr(j);
                        HostPlan {
                            name: format!("h{j}"),
                            addr4,
                            addr6,
                        }
                    })
                    .collect(),
                links,
            });
        }
        let controller = if self.controller {
            let spec = link("uplink", LinkKind::Other);
            let l = link_plan(
                k,
                &LinkSpec {
                    emulated: false,
                    ..spec
                },
                "controller",
            )?;
            k += 1;
            Some(l)
        } else {
            None
        };
        if k > MAX_LINKS {
            return Err(invalid(format!(
                "{k} links is more than the plan holds ({MAX_LINKS})"
            )));
        }
        Ok(Plan { sites, controller })
    }
}

fn prefix(addr: IpAddr, len: u8) -> Prefix {
    Prefix::truncating(addr, len)
}

fn offset4(p: Prefix, n: u32) -> Ipv4Addr {
    match p.addr() {
        IpAddr::V4(a) => Ipv4Addr::from(u32::from(a) + n),
        IpAddr::V6(_) => Ipv4Addr::UNSPECIFIED,
    }
}

fn offset6(p: Prefix, n: u128) -> Ipv6Addr {
    match p.addr() {
        IpAddr::V6(a) => Ipv6Addr::from(u128::from(a) + n),
        IpAddr::V4(_) => Ipv6Addr::UNSPECIFIED,
    }
}

fn link_plan(k: usize, l: &LinkSpec, at: &str) -> Result<LinkPlan, TopologyError> {
    let mut impairment = Impairment::default();
    if let Some(s) = &l.impair {
        if !l.emulated {
            return Err(invalid(format!(
                "{at}.impair: an unemulated link cannot be impaired"
            )));
        }
        let words: Vec<&str> = s.split_whitespace().collect();
        impairment
            .apply(&words)
            .map_err(|e| invalid(format!("{at}.impair: {e}")))?;
    }
    let mtu = l.mtu.unwrap_or(1500);
    if !(1280..=9000).contains(&mtu) {
        return Err(invalid(format!("{at}.mtu: {mtu} is outside 1280..=9000")));
    }
    if l.nat.is_none() && l.nat_timeout_s.is_some() {
        return Err(invalid(format!(
            "{at}.nat_timeout_s: only a link with `nat` has a NAT mapping timeout"
        )));
    }
    let timeout_s = l.nat_timeout_s.unwrap_or(NAT_TIMEOUT_S);
    if !(1..=86_400).contains(&timeout_s) {
        return Err(invalid(format!(
            "{at}.nat_timeout_s: {timeout_s} is outside 1..=86400"
        )));
    }
    if l.nat.is_some() && !l.emulated {
        return Err(invalid(format!(
            "{at}.nat: a NAT sits on an emulated link only"
        )));
    }
    // The inside of link k's NAT: a /24 of 172.16.0.0/12 (4096 of them; the links of one site
    // never share one).
    let inside_net = 0xac10_0000u32 + (((k % 4096) as u32) << 8);
    let nat = l.nat.map(|kind| NatPlan {
        kind,
        timeout_s,
        inside4: Ipv4Addr::from(inside_net + 2),
        gw_inside4: Ipv4Addr::from(inside_net + 1),
        public_port: 20_000 + (k % 40_000) as u16,
    });
    let net4 = 0x6440_0000u32 + ((k as u32) << 8);
    let net6 = Ipv6Addr::new(0xfd00, 2, k as u16, 0, 0, 0, 0, 0);
    let p6 = prefix(IpAddr::V6(net6), 64);
    Ok(LinkPlan {
        name: l.name.clone(),
        kind: l.kind,
        index: k,
        emulated: l.emulated,
        mtu,
        prefix4: prefix(IpAddr::V4(Ipv4Addr::from(net4)), 24),
        prefix6: p6,
        gw4: Ipv4Addr::from(net4 + 1),
        addr4: Ipv4Addr::from(net4 + 2),
        gw6: offset6(p6, 1),
        addr6: offset6(p6, 2),
        impairment,
        nat,
    })
}

/// Every address of a lab, derived from its [`Topology`].
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Plan {
    pub sites: Vec<SitePlan>,
    /// The controller's link into the WAN, if the topology has a controller.
    pub controller: Option<LinkPlan>,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SitePlan {
    pub name: Name,
    pub lan4: Prefix,
    pub lan6: Prefix,
    pub edge_lan4: Ipv4Addr,
    pub edge_lan6: Ipv6Addr,
    pub hosts: Vec<HostPlan>,
    pub links: Vec<LinkPlan>,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct HostPlan {
    pub name: String,
    pub addr4: Ipv4Addr,
    pub addr6: Ipv6Addr,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LinkPlan {
    pub name: Name,
    pub kind: LinkKind,
    /// Global index: names the link's interfaces in the wan namespace (`l<k>`, `t<k>`).
    pub index: usize,
    pub emulated: bool,
    pub mtu: u16,
    pub prefix4: Prefix,
    pub prefix6: Prefix,
    /// The edge's address on this link.
    pub addr4: Ipv4Addr,
    pub addr6: Ipv6Addr,
    /// The WAN-side gateway of this link.
    pub gw4: Ipv4Addr,
    pub gw6: Ipv6Addr,
    /// The impairment both directions start with.
    pub impairment: Impairment,
    /// The NAT in front of the link, if any: then `addr4` is its public address, and the
    /// edge's own is `nat.inside4` (the edge has no IPv6 on such a link).
    #[serde(default)]
    pub nat: Option<NatPlan>,
}

impl LinkPlan {
    /// The edge's own IPv4 address on this link (behind its NAT, if it has one).
    pub fn local4(&self) -> Ipv4Addr {
        self.nat.as_ref().map_or(self.addr4, |n| n.inside4)
    }

    /// The node name of the link's NAT, `<owner>/<link>/nat`.
    pub fn nat_node(&self, owner: &str) -> Option<String> {
        self.nat
            .as_ref()
            .map(|_| format!("{owner}/{}/nat", self.name))
    }
}

impl Plan {
    pub fn site(&self, name: &str) -> Option<&SitePlan> {
        self.sites.iter().find(|s| s.name.as_str() == name)
    }

    /// Every link with the name of its owner (`site` or `controller`).
    pub fn links(&self) -> impl Iterator<Item = (&str, &LinkPlan)> {
        self.sites
            .iter()
            .flat_map(|s| s.links.iter().map(move |l| (s.name.as_str(), l)))
            .chain(self.controller.iter().map(|l| ("controller", l)))
    }

    /// The link `site/link`.
    pub fn link(&self, site_link: &str) -> Option<(&str, &LinkPlan)> {
        let (s, l) = site_link.split_once('/')?;
        self.links()
            .find(|(owner, lp)| *owner == s && lp.name.as_str() == l)
    }

    /// Every node name: `wan`, each site (its edge), each `site/hN` host, each
    /// `site/link/nat` NAT, and `controller`.
    pub fn nodes(&self) -> Vec<String> {
        let mut v = vec!["wan".to_string()];
        for s in &self.sites {
            v.push(s.name.to_string());
            v.extend(s.hosts.iter().map(|h| format!("{}/{}", s.name, h.name)));
            v.extend(s.links.iter().filter_map(|l| l.nat_node(s.name.as_str())));
        }
        if self.controller.is_some() {
            v.push("controller".into());
        }
        v
    }

    /// The address (IPv6 if `v6`) by which the rest of the lab reaches `node`: a host's LAN
    /// address, an edge's first link, the controller's uplink.
    pub fn addr(&self, node: &str, v6: bool) -> Option<IpAddr> {
        let pick = |a4: Ipv4Addr, a6: Ipv6Addr| if v6 { IpAddr::V6(a6) } else { IpAddr::V4(a4) };
        if node == "controller" {
            return self.controller.as_ref().map(|l| pick(l.addr4, l.addr6));
        }
        match node.split_once('/') {
            Some((s, h)) => self
                .site(s)?
                .hosts
                .iter()
                .find(|x| x.name == h)
                .map(|x| pick(x.addr4, x.addr6)),
            None => self
                .site(node)?
                .links
                .first()
                .map(|l| pick(l.addr4, l.addr6)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_builders_plan_without_collisions() {
        for t in [
            Topology::two_sites_two_links(),
            Topology::three_sites_mixed(),
            Topology::hub_and_spokes(20).unwrap(),
        ] {
            let p = t.plan().unwrap();
            let mut addrs = HashSet::new();
            for (_, l) in p.links() {
                assert!(addrs.insert(IpAddr::V4(l.addr4)));
                assert!(addrs.insert(IpAddr::V6(l.addr6)));
            }
            for s in &p.sites {
                for h in &s.hosts {
                    assert!(s.lan4.contains(IpAddr::V4(h.addr4)));
                    assert!(s.lan6.contains(IpAddr::V6(h.addr6)));
                }
            }
        }
        let p = Topology::two_sites_two_links().plan().unwrap();
        assert_eq!(
            p.link("b/inet").unwrap().1.addr4,
            Ipv4Addr::new(100, 64, 3, 2)
        );
        assert_eq!(
            p.addr("a/h1", false),
            Some(IpAddr::V4(Ipv4Addr::new(10, 128, 0, 10)))
        );
        assert_eq!(p.nodes(), ["wan", "a", "a/h1", "b", "b/h1"]);
    }

    #[test]
    fn the_commented_example_file_parses_and_plans() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("topologies/example.toml");
        let t = Topology::load(&path).unwrap();
        let p = t.plan().unwrap();
        assert_eq!(p.sites[0].hosts[1].addr4, Ipv4Addr::new(192, 168, 10, 11));
        assert_eq!(
            p.link("paris/fiber").unwrap().1.impairment.rate_bps,
            Some(500_000_000)
        );
        assert!(!p.link("lyon/bare").unwrap().1.emulated);
        assert!(p.controller.is_some());
        let t2 = Topology::from_cli(path.to_str().unwrap(), &[]).unwrap();
        assert_eq!(t, t2);
    }

    #[test]
    fn a_topology_file_round_trips_and_bad_fields_are_named() {
        let t = Topology::three_sites_mixed();
        let text = toml::to_string(&t).unwrap();
        assert_eq!(toml::from_str::<Topology>(&text).unwrap(), t);

        let bad = |edit: &dyn Fn(&mut Topology), field: &str| {
            let mut t = Topology::two_sites_two_links();
            edit(&mut t);
            let e = t.plan().unwrap_err().to_string();
            assert!(e.contains(field), "{e} should name {field}");
        };
        bad(&|t| t.sites[1].name = name("a"), "sites[1] (a).name");
        bad(
            &|t| t.sites[0].links[1].name = name("mpls"),
            "links[1] (mpls).name",
        );
        bad(
            &|t| t.sites[0].links[0].name = name("a-very-long-link"),
            "links[0] (a-very-long-link).name",
        );
        bad(
            &|t| t.sites[0].links[0].impair = Some("delay=fast".into()),
            "links[0] (mpls).impair: delay",
        );
        bad(
            &|t| {
                t.sites[0].lan = Some("10.0.0.0/16".parse().unwrap());
                t.sites[1].lan = Some("10.0.5.0/24".parse().unwrap());
            },
            "sites[1] (b).lan: 10.0.5.0/24 overlaps the LAN of a",
        );
        bad(&|t| t.sites[0].name = name("wan"), "reserved");
        bad(&|t| t.sites[0].name = name("a.h1"), "may not contain '.'");
        bad(
            &|t| t.sites[0].links[0].name = name("h1"),
            "links[0] (h1).name",
        );
        bad(
            &|t| t.sites[0].lan = Some("100.64.3.0/24".parse().unwrap()),
            "sites[0] (a).lan: 100.64.3.0/24 overlaps 100.64.0.0/10",
        );
        let e = toml::from_str::<Topology>("name = 'x'\nsites = []\nsurprise = 1").unwrap_err();
        assert!(e.to_string().contains("surprise"), "{e}");
    }
}
