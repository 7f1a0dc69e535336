//! What an edge runs from: its links, its peers and their links, and the steering configuration.
//! Until the controller pushes it (a later issue), an edge reads it from a local TOML file; the
//! controller will serve these same types.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::str::FromStr;

use crate::{
    FailoverReason, FailoverSettings, FieldErrors, Link, Name, PathEventKind, PathState, Policy,
    Prefix, SlaClass, SteeringMode, validate_policies,
};

/// A WireGuard public key (Curve25519), written as WireGuard writes it: 44 characters of
/// standard base64. Only public keys appear in configuration; a private key never leaves the
/// edge that generated it.
#[derive(Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct WgPublicKey(pub [u8; 32]);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a WireGuard key is 44 characters of base64 encoding 32 bytes: {0}")]
pub struct KeyError(String);

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 of 32 bytes (44 characters with one `=`).
pub fn key_to_base64(k: &[u8; 32]) -> String {
    let mut out = String::with_capacity(44);
    for chunk in k.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(B64[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Parses the 44-character base64 form of a 32-byte key.
pub fn key_from_base64(s: &str) -> Result<[u8; 32], KeyError> {
    let s = s.trim();
    let bytes = s.as_bytes();
    if bytes.len() != 44 || bytes[43] != b'=' || bytes[42] == b'=' {
        return Err(KeyError(format!("got {} characters", s.len())));
    }
    let mut out = [0u8; 32];
    let mut acc = 0u32;
    let mut bits = 0;
    let mut n = 0;
    for &c in &bytes[..43] {
        let v = B64
            .iter()
            .position(|&x| x == c)
            .ok_or_else(|| KeyError(format!("{:?} is not a base64 character", c as char)))?;
        acc = (acc << 6) | v as u32;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            if n < 32 {
                out[n] = (acc >> bits) as u8;
            }
            n += 1;
        }
    }
    if acc & ((1 << bits) - 1) != 0 {
        return Err(KeyError("trailing bits are not zero".into()));
    }
    Ok(out)
}

impl FromStr for WgPublicKey {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, KeyError> {
        key_from_base64(s).map(WgPublicKey)
    }
}

impl TryFrom<String> for WgPublicKey {
    type Error = KeyError;
    fn try_from(s: String) -> Result<Self, KeyError> {
        s.parse()
    }
}

impl From<WgPublicKey> for String {
    fn from(k: WgPublicKey) -> String {
        k.to_string()
    }
}

impl fmt::Display for WgPublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&key_to_base64(&self.0))
    }
}

impl fmt::Debug for WgPublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "WgPublicKey({self})")
    }
}

fn default_port() -> u16 {
    51820
}

fn default_class() -> Name {
    Name::new("business").unwrap_or_else(|_| unreachable!("a valid literal name"))
}

/// One of the edge's own WAN links.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EdgeLink {
    #[serde(flatten)]
    pub link: Link,
    /// The interface the link's socket is bound to (SO_BINDTODEVICE); defaults to the link name.
    #[serde(default)]
    pub interface: Option<String>,
    /// The local address the link's socket is bound to.
    pub address: IpAddr,
}

/// Another site this edge builds tunnels to.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct PeerConfig {
    pub name: Name,
    pub public_key: WgPublicKey,
    /// The peer's overlay address (probes are addressed to it inside the tunnels).
    #[cfg_attr(feature = "openapi", schema(value_type = String))]
    pub overlay: IpAddr,
    /// Prefixes reached through this peer.
    pub lan_prefixes: Vec<Prefix>,
    /// The peer's WAN links; those with an `endpoint` are dialled from every local link.
    pub links: Vec<Link>,
    /// The peer's next key while it rotates: handshakes made with it are accepted too, so
    /// that the peer can move its sessions to it without losing a packet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_public_key: Option<WgPublicKey>,
    /// How this peer's paths are probed.
    #[serde(default, skip_serializing_if = "ProbeMode::is_stamp")]
    pub probe: ProbeMode,
}

/// How a peer answers the probes that measure its paths.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize,
)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "kebab-case")]
pub enum ProbeMode {
    /// STAMP (RFC 8762 layout) to port 862 of the peer's overlay address: a Patronus edge, or
    /// `patronus edge reflect` beside a stock WireGuard peer. Both directions' jitter.
    #[default]
    Stamp,
    /// ICMP echo requests to the peer's overlay address, which any IP stack answers: a stock
    /// WireGuard peer with nothing else installed. Round trip and loss are measured as with
    /// STAMP; with no timestamps from the peer, the round trip's whole variation counts as the
    /// jitter (an upper bound for either direction's).
    IcmpEcho,
}

impl ProbeMode {
    pub fn is_stamp(&self) -> bool {
        *self == Self::Stamp
    }
}

/// What the controller compiles for one site: everything its edge needs that is not a fact of
/// the edge's own machine (its key file, which interface and address each link uses). The edge
/// combines it with those local facts into an [`EdgeConfig`].
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct SiteConfig {
    pub site: Name,
    #[cfg_attr(feature = "openapi", schema(value_type = String))]
    pub overlay: IpAddr,
    pub lan_prefixes: Vec<Prefix>,
    /// The site's own links, as the controller knows them.
    pub links: Vec<Link>,
    /// Key rotations asked for this site (`patronus site rotate-key`): an edge that has done
    /// fewer makes a new key pair and rolls to it.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub key_rotation: u64,
    /// The sites the topology connects this one to, that have enrolled (have a key).
    pub peers: Vec<PeerConfig>,
    pub classes: Vec<SlaClass>,
    pub policies: Vec<Policy>,
    pub failover: FailoverSettings,
}

/// A [`SiteConfig`]'s own fields (all but the peers and the shared fields).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct SiteHead {
    pub site: Name,
    #[cfg_attr(feature = "openapi", schema(value_type = String))]
    pub overlay: IpAddr,
    pub lan_prefixes: Vec<Prefix>,
    pub links: Vec<Link>,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub key_rotation: u64,
}

/// The fields every site's [`SiteConfig`] shares.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct SiteShared {
    pub classes: Vec<SlaClass>,
    pub policies: Vec<Policy>,
    pub failover: FailoverSettings,
}

/// What turns one version of a site's configuration into the next: only what changed. A
/// policy change in a full mesh of 1000 sites is then a few hundred bytes per edge instead of
/// the whole list of 999 peers.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ConfigDelta {
    /// The version (ETag, without quotes) it applies to.
    pub base: String,
    /// The version it makes.
    pub version: String,
    /// The site's own fields, when they changed.
    #[serde(default)]
    pub head: Option<SiteHead>,
    /// The shared fields (classes, policies, failover settings), when they changed.
    #[serde(default)]
    pub shared: Option<SiteShared>,
    /// Peers that are gone, by name.
    #[serde(default)]
    pub remove: Vec<Name>,
    /// Peers that are new or changed (replacing the one of that name).
    #[serde(default)]
    pub upsert: Vec<PeerConfig>,
}

impl ConfigDelta {
    /// `base` with this delta applied. Peers keep their order; new ones go last.
    pub fn apply(&self, base: &SiteConfig) -> SiteConfig {
        let mut c = base.clone();
        if let Some(h) = &self.head {
            c.site = h.site.clone();
            c.overlay = h.overlay;
            c.lan_prefixes = h.lan_prefixes.clone();
            c.links = h.links.clone();
            c.key_rotation = h.key_rotation;
        }
        if let Some(s) = &self.shared {
            c.classes = s.classes.clone();
            c.policies = s.policies.clone();
            c.failover = s.failover.clone();
        }
        c.peers.retain(|p| !self.remove.contains(&p.name));
        for u in &self.upsert {
            match c.peers.iter_mut().find(|p| p.name == u.name) {
                Some(p) => *p = u.clone(),
                None => c.peers.push(u.clone()),
            }
        }
        c
    }
}

/// What an edge reports to its controller about its paths, every few seconds.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Telemetry {
    #[cfg_attr(feature = "openapi", schema(max_items = 4096))]
    pub paths: Vec<PathReport>,
    /// Failovers since the last report (an edge keeps its last 256).
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(max_items = 1024))]
    pub failovers: Vec<FailoverEvent>,
    /// Path state changes since the last report, each at the moment the edge saw it (an edge
    /// keeps its last 256).
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(max_items = 1024))]
    pub path_events: Vec<PathEvent>,
    /// What each SLA class's traffic sent since this run of the edge started.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(max_items = 256))]
    pub classes: Vec<ClassReport>,
    /// When this run of the edge started (Unix ms): its counters count from 0 since then, so
    /// a report with another start is a new run, not a counter going backwards.
    #[serde(default)]
    pub started_ms: i64,
}

/// One SLA class's traffic, as the reporting edge sent it (counters since the edge started).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ClassReport {
    pub class: String,
    #[cfg_attr(feature = "openapi", schema(maximum = 9223372036854775807.0))]
    pub tx_packets: u64,
    #[cfg_attr(feature = "openapi", schema(maximum = 9223372036854775807.0))]
    pub tx_bytes: u64,
}

/// A path's change of state, as the reporting edge saw it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct PathEvent {
    /// The edge's own count of path events in this run, from 1.
    #[cfg_attr(feature = "openapi", schema(maximum = 9223372036854775807.0))]
    pub seq: u64,
    /// Unix milliseconds.
    pub at_ms: i64,
    pub peer: String,
    pub local_link: String,
    pub remote_link: String,
    /// `sla-violated` and `sla-restored` are for `class`. A kind this build does not know is
    /// kept as `unknown`: it comes from a newer edge.
    #[serde(deserialize_with = "PathEventKind::reported")]
    pub kind: PathEventKind,
    #[serde(default)]
    pub class: Option<String>,
    /// What the path measured: the first reply's RTT for `up`; RTT, jitter and loss for
    /// `sla-violated`.
    #[serde(default)]
    pub rtt_ms: Option<f64>,
    #[serde(default)]
    pub jitter_ms: Option<f64>,
    #[serde(default)]
    pub loss_pct: Option<f64>,
    /// For `down`: how long the path had been silent, and the flows that were on it.
    #[serde(default)]
    pub silent_ms: Option<f64>,
    #[serde(default)]
    pub flows: Option<u32>,
}

/// Flows that moved from one path to another at once, for one reason.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct FailoverEvent {
    /// The edge's own count of failover events, from 1.
    #[cfg_attr(feature = "openapi", schema(maximum = 9223372036854775807.0))]
    pub seq: u64,
    /// Unix milliseconds.
    pub at_ms: i64,
    /// The peer site of both paths.
    pub peer: String,
    pub from_local_link: String,
    pub from_remote_link: String,
    pub to_local_link: String,
    pub to_remote_link: String,
    /// A reason this build does not know is kept as `unknown`: it comes from a newer edge.
    #[serde(deserialize_with = "FailoverReason::reported")]
    pub reason: FailoverReason,
    pub flows: u32,
}

/// One path as the reporting edge measures it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct PathReport {
    /// The peer site's name.
    pub peer: String,
    /// The reporting site's link.
    pub local_link: String,
    /// The peer's link.
    pub remote_link: String,
    pub state: PathState,
    /// Round-trip time, ms (none before the first reply).
    pub rtt_ms: Option<f64>,
    /// RFC 3550 interarrival jitter, ms.
    pub jitter_ms: f64,
    /// Probe loss over the sliding window, percent.
    pub loss_pct: f64,
    /// Counters since the edge started.
    #[cfg_attr(feature = "openapi", schema(maximum = 9223372036854775807.0))]
    pub tx_bytes: u64,
    #[cfg_attr(feature = "openapi", schema(maximum = 9223372036854775807.0))]
    pub rx_bytes: u64,
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(maximum = 9223372036854775807.0))]
    pub tx_packets: u64,
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(maximum = 9223372036854775807.0))]
    pub rx_packets: u64,
    /// Whether the path's datagrams go through the relay rather than straight to the peer.
    #[serde(default)]
    pub relayed: bool,
}

/// What an edge that a controller runs knows of its own machine; everything else comes from the
/// controller as a [`SiteConfig`].
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EdgeLocal {
    /// The controller's base URL (`https://host[:port]`, or `http://` on a trusted network),
    /// or a list of them: several controllers over one database, used one at a time.
    pub controller: ControllerUrls,
    /// CA certificates (PEM) trusted for an `https://` controller, beside the Mozilla roots
    /// compiled in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// The controller's certificate fingerprint (`sha256:…`, as it prints it at start), or a
    /// list of them (several controllers with certificates of their own): trusted instead of
    /// any CA. `patronus edge enroll --ca-fingerprint` keeps one in the state directory
    /// instead.
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "one_or_many"
    )]
    pub ca_fingerprint: Vec<String>,
    /// Where the edge keeps its private key, its credential and the last configuration it got
    /// (created 0700; the files in it 0600).
    pub state_dir: PathBuf,
    #[serde(default = "default_port")]
    pub listen_port: u16,
    #[serde(default = "default_tun")]
    pub tun_name: String,
    #[serde(default)]
    pub metrics_listen: Option<SocketAddr>,
    /// A file holding the bearer token every request to `metrics_listen` must carry (see
    /// [`EdgeConfig::metrics_token_file`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_token_file: Option<PathBuf>,
    /// This machine's WAN links, named as the controller knows them.
    pub links: Vec<LocalLink>,
    /// Bounds on the replies to handshake initiations (see [`HandshakeLimits`]).
    #[serde(default)]
    pub handshake: HandshakeLimits,
    /// WireGuard's persistent keepalive on every path, seconds (0: off; see
    /// [`EdgeConfig::keepalive_s`]).
    #[serde(default = "default_keepalive")]
    pub keepalive_s: u16,
}

/// A string, or a list of them.
fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(serde::Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match <OneOrMany as serde::Deserialize>::deserialize(d)? {
        OneOrMany::One(s) => vec![s],
        OneOrMany::Many(v) => v,
    })
}

/// The controllers an edge talks to: one base URL, or several controllers over one database
/// (written as a TOML array). The edge uses one at a time: the last that answered, and the
/// next in the list when it fails.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControllerUrls(Vec<String>);

impl ControllerUrls {
    /// At least one URL.
    pub fn new(urls: Vec<String>) -> Result<Self, String> {
        if urls.is_empty() {
            return Err("give at least one controller URL".into());
        }
        if let Some(u) = urls.iter().find(|u| u.trim().is_empty()) {
            return Err(format!("an empty controller URL: {u:?}"));
        }
        Ok(Self(urls))
    }

    pub fn urls(&self) -> &[String] {
        &self.0
    }
}

impl From<&str> for ControllerUrls {
    fn from(url: &str) -> Self {
        Self(vec![url.to_owned()])
    }
}

impl fmt::Display for ControllerUrls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.join(", "))
    }
}

impl serde::Serialize for ControllerUrls {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0.as_slice() {
            [one] => s.serialize_str(one),
            many => many.serialize(s),
        }
    }
}

impl<'de> serde::Deserialize<'de> for ControllerUrls {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(serde::Deserialize)]
        #[serde(untagged)]
        enum OneOrMany {
            One(String),
            Many(Vec<String>),
        }
        let urls = match OneOrMany::deserialize(d)
            .map_err(|_| serde::de::Error::custom("a controller URL, or a list of them"))?
        {
            OneOrMany::One(u) => vec![u],
            OneOrMany::Many(v) => v,
        };
        Self::new(urls).map_err(serde::de::Error::custom)
    }
}

/// One of this machine's WAN links.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalLink {
    pub name: Name,
    /// The interface the link's socket is bound to; defaults to the link name.
    #[serde(default)]
    pub interface: Option<String>,
    /// The local address the link's socket is bound to.
    pub address: IpAddr,
    /// The `ip:port` peers reach this link at, registered at enrolment; leave it out behind
    /// NAT or on a dynamic address.
    #[serde(default)]
    pub public_endpoint: Option<SocketAddr>,
}

impl EdgeLocal {
    /// The edge's whole configuration: the controller's view of the site, on this machine's
    /// links. A link the controller lists but this machine does not have is left out (and
    /// named in the returned notes); a link of this machine the controller does not know is
    /// an error, as is having none in common.
    pub fn edge_config(
        &self,
        site: &SiteConfig,
        private_key_file: PathBuf,
    ) -> Result<(EdgeConfig, Vec<String>), FieldErrors> {
        let mut errs = FieldErrors::default();
        let mut notes = Vec::new();
        for (i, l) in self.links.iter().enumerate() {
            if !site.links.iter().any(|s| s.name == l.name) {
                errs.push(
                    format!("links[{i}].name"),
                    format!(
                        "the controller knows no link {} at site {}",
                        l.name, site.site
                    ),
                );
            }
        }
        let links: Vec<EdgeLink> = site
            .links
            .iter()
            .filter_map(|s| {
                let Some(l) = self.links.iter().find(|l| l.name == s.name) else {
                    notes.push(format!("link {} is not on this machine: not used", s.name));
                    return None;
                };
                Some(EdgeLink {
                    link: s.clone(),
                    interface: l.interface.clone(),
                    address: l.address,
                })
            })
            .collect();
        if links.is_empty() {
            errs.push("links", "no link of this machine is one of the site's");
        }
        errs.into_result()?;
        let cfg = EdgeConfig {
            site: site.site.clone(),
            private_key_file,
            overlay: site.overlay,
            listen_port: self.listen_port,
            tun_name: self.tun_name.clone(),
            links,
            peers: site.peers.clone(),
            classes: site.classes.clone(),
            policies: site.policies.clone(),
            failover: site.failover.clone(),
            default_class: default_class(),
            default_steering: SteeringMode::default(),
            metrics_listen: self.metrics_listen,
            metrics_token_file: self.metrics_token_file.clone(),
            handshake: self.handshake,
            keepalive_s: self.keepalive_s,
        };
        cfg.validate()?;
        Ok((cfg, notes))
    }
}

/// Everything an edge runs from.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EdgeConfig {
    /// This site's name.
    pub site: Name,
    /// Where the private key lives (created 0600 on first start if missing).
    pub private_key_file: PathBuf,
    /// This site's overlay address, put on the tunnel interface.
    pub overlay: IpAddr,
    /// The UDP port every link's socket listens on.
    #[serde(default = "default_port")]
    pub listen_port: u16,
    /// Name of the TUN interface.
    #[serde(default = "default_tun")]
    pub tun_name: String,
    pub links: Vec<EdgeLink>,
    pub peers: Vec<PeerConfig>,
    #[serde(default = "SlaClass::builtins")]
    pub classes: Vec<SlaClass>,
    #[serde(default)]
    pub policies: Vec<Policy>,
    #[serde(default)]
    pub failover: FailoverSettings,
    /// The class of traffic no policy matches.
    #[serde(default = "default_class")]
    pub default_class: Name,
    #[serde(default)]
    pub default_steering: SteeringMode,
    /// Where the edge serves Prometheus metrics (`/metrics`) and its status (`/status`). A
    /// loopback address, unless `metrics_token_file` is set.
    #[serde(default)]
    pub metrics_listen: Option<SocketAddr>,
    /// A file holding a bearer token (one line, not readable by other users): every request to
    /// `metrics_listen` must then carry `Authorization: Bearer <token>` (Prometheus's
    /// `authorization.credentials_file`), and the address may be any, so that a Prometheus on
    /// another host scrapes the edge directly.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_token_file: Option<PathBuf>,
    /// How many cookie replies the edge sends to handshake initiations it is too busy for.
    #[serde(default)]
    pub handshake: HandshakeLimits,
    /// WireGuard's persistent keepalive on every path, seconds; 0 turns it off. A NAT forgets
    /// an idle UDP mapping after 30 s or more (RFC 4787 asks for at least 2 minutes; carrier
    /// NATs do less), so 25 s keeps a path's mapping open whatever else it carries. (The path
    /// engine's probes cross every path at least once a second anyway: the keepalive matters
    /// for probes that stop, with the edge's own loop, say.)
    #[serde(default = "default_keepalive")]
    pub keepalive_s: u16,
}

fn default_keepalive() -> u16 {
    25
}

/// Bounds on what unauthenticated handshake initiations can make an edge do.
///
/// Anyone who knows an edge's public key can make initiations that pass its first MAC check,
/// and send them from a spoofed address. Beyond a few per second on a path, the edge stops
/// doing the X25519 work for initiations that do not prove they can receive at their source
/// (WireGuard's cookie, MAC2) and answers them with a cookie reply instead; these limits bound
/// those replies (1 s of burst each), per path (a link and a source) and for the whole edge.
/// What they leave over is dropped and counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HandshakeLimits {
    /// Cookie replies per second to one path's source (1 to 1000).
    #[serde(default = "default_cookies_per_path")]
    pub cookies_per_path_per_s: u32,
    /// Cookie replies per second for the whole edge (1 to 100000).
    #[serde(default = "default_cookies_per_edge")]
    pub cookies_per_edge_per_s: u32,
}

fn default_cookies_per_path() -> u32 {
    10
}

fn default_cookies_per_edge() -> u32 {
    200
}

impl Default for HandshakeLimits {
    fn default() -> Self {
        Self {
            cookies_per_path_per_s: default_cookies_per_path(),
            cookies_per_edge_per_s: default_cookies_per_edge(),
        }
    }
}

impl HandshakeLimits {
    pub fn validate(&self) -> Result<(), FieldErrors> {
        let mut errs = FieldErrors::default();
        if !(1..=1000).contains(&self.cookies_per_path_per_s) {
            errs.push("cookies_per_path_per_s", "must be 1 to 1000");
        }
        if !(1..=100_000).contains(&self.cookies_per_edge_per_s) {
            errs.push("cookies_per_edge_per_s", "must be 1 to 100000");
        }
        errs.into_result()
    }
}

fn default_tun() -> String {
    "patronus0".into()
}

impl EdgeConfig {
    /// Checks everything that can be checked without the machine; every problem is reported
    /// with its dotted path (`peers[1].links[0].endpoint`).
    pub fn validate(&self) -> Result<(), FieldErrors> {
        let mut errs = FieldErrors::default();
        if self.links.is_empty() {
            errs.push("links", "an edge needs at least one WAN link");
        }
        if self.tun_name.is_empty() || self.tun_name.len() > 15 {
            errs.push("tun_name", "an interface name is 1 to 15 characters");
        }
        let mut names = Vec::new();
        for (i, l) in self.links.iter().enumerate() {
            if let Err(e) = l.link.validate() {
                errs.extend_prefixed(&format!("links[{i}]"), e);
            }
            if names.contains(&&l.link.name) {
                errs.push(format!("links[{i}].name"), "another link has this name");
            }
            names.push(&l.link.name);
            if l.address.is_unspecified() {
                errs.push(
                    format!("links[{i}].address"),
                    "must be the link's own address",
                );
            }
        }
        let mut peer_names = Vec::new();
        for (i, p) in self.peers.iter().enumerate() {
            let at = format!("peers[{i}]");
            if p.name == self.site || peer_names.contains(&&p.name) {
                errs.push(format!("{at}.name"), "names another peer or this site");
            }
            peer_names.push(&p.name);
            if p.overlay == self.overlay {
                errs.push(
                    format!("{at}.overlay"),
                    "is this edge's own overlay address",
                );
            }
            if p.links.is_empty() {
                errs.push(format!("{at}.links"), "a peer needs at least one link");
            }
            for (j, l) in p.links.iter().enumerate() {
                if let Err(e) = l.validate() {
                    errs.extend_prefixed(&format!("{at}.links[{j}]"), e);
                }
            }
        }
        if let Some(a) = self.metrics_listen {
            if !a.ip().is_loopback() && self.metrics_token_file.is_none() {
                errs.push(
                    "metrics_listen",
                    format!(
                        "{a} is not a loopback address; the status endpoint has no \
                         authentication unless metrics_token_file is set"
                    ),
                );
            }
        }
        if let Err(e) = self.failover.validate() {
            errs.extend_prefixed("failover", e);
        }
        if let Err(e) = self.handshake.validate() {
            errs.extend_prefixed("handshake", e);
        }
        if self.keepalive_s > 3600 {
            errs.push("keepalive_s", "must be 0 (off) to 3600 seconds");
        }
        if !self.classes.iter().any(|c| c.name == self.default_class) {
            errs.push("default_class", "names no class in `classes`");
        }
        if let Err(e) = validate_policies(&self.policies, &self.classes) {
            errs.0.extend(e.0);
        }
        errs.into_result()
    }
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_controller_is_one_url_or_a_list_and_never_none() {
        let one: ControllerUrls =
            serde_json::from_value(serde_json::json!("http://a:8080")).unwrap();
        assert_eq!(one.urls(), ["http://a:8080"]);
        assert_eq!(serde_json::to_value(&one).unwrap(), "http://a:8080");
        let two: ControllerUrls =
            serde_json::from_value(serde_json::json!(["http://a:8080", "http://b:8080"])).unwrap();
        assert_eq!(two.urls().len(), 2);
        assert_eq!(
            serde_json::to_value(&two).unwrap(),
            serde_json::json!(["http://a:8080", "http://b:8080"])
        );
        for bad in [
            serde_json::json!([]),
            serde_json::json!([""]),
            serde_json::json!(3),
        ] {
            assert!(serde_json::from_value::<ControllerUrls>(bad).is_err());
        }
    }

    /// A report as today's edges write it, with an event kind and a failover reason from a
    /// newer edge: the events are kept, their word read as `unknown`; a state nobody knows is
    /// refused with the values that exist.
    #[test]
    fn a_report_keeps_events_of_unknown_kind_or_reason_and_refuses_an_unknown_state() {
        let report = |state: &str, kind: &str, reason: &str| {
            serde_json::json!({
                "paths": [{ "peer": "b1", "local_link": "mpls", "remote_link": "lte",
                    "state": state, "rtt_ms": 20.5, "jitter_ms": 0.5, "loss_pct": 0.0,
                    "tx_bytes": 1, "rx_bytes": 2 }],
                "failovers": [{ "seq": 1, "at_ms": 5, "peer": "b1",
                    "from_local_link": "mpls", "from_remote_link": "mpls",
                    "to_local_link": "lte", "to_remote_link": "mpls",
                    "reason": reason, "flows": 3 }],
                "path_events": [{ "seq": 1, "at_ms": 5, "peer": "b1", "local_link": "mpls",
                    "remote_link": "lte", "kind": kind }],
            })
        };
        let t: Telemetry =
            serde_json::from_value(report("degraded", "sla-restored", "path-down")).unwrap();
        assert_eq!(t.paths[0].state, PathState::Degraded);
        assert_eq!(t.path_events[0].kind, PathEventKind::SlaRestored);
        assert_eq!(t.failovers[0].reason, FailoverReason::PathDown);
        assert_eq!(
            serde_json::to_value(&t).unwrap()["failovers"][0]["reason"],
            "path-down"
        );

        let t: Telemetry = serde_json::from_value(report("up", "rekeyed", "returned")).unwrap();
        assert_eq!(t.path_events[0].kind, PathEventKind::Unknown);
        assert_eq!(
            (t.failovers[0].reason, t.failovers[0].flows),
            (FailoverReason::Unknown, 3)
        );

        let e = serde_json::from_value::<Telemetry>(report("sideways", "up", "better"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("unknown variant `sideways`, expected one of"),
            "{e}"
        );
        let mut numeric = report("up", "up", "better");
        numeric["failovers"][0]["reason"] = serde_json::json!(7);
        assert!(
            serde_json::from_value::<Telemetry>(numeric).is_err(),
            "a reason is a word"
        );
    }

    #[test]
    fn keys_round_trip_through_wireguard_base64_and_bad_ones_are_refused() {
        // A key printed by `wg genkey | wg pubkey`.
        let s = "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=";
        let k: WgPublicKey = s.parse().unwrap();
        assert_eq!(k.to_string(), s);
        assert_eq!(
            key_to_base64(&[0; 32]),
            "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="
        );
        for (i, k) in [[0u8; 32], [255; 32], core::array::from_fn(|i| i as u8)]
            .iter()
            .enumerate()
        {
            assert_eq!(key_from_base64(&key_to_base64(k)).unwrap(), *k, "{i}");
        }
        for bad in [
            "",
            "short=",
            &s[..43],
            &format!("{}A", &s[..43]),
            "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8D!=",
        ] {
            assert!(bad.parse::<WgPublicKey>().is_err(), "{bad:?}");
        }
    }
}
