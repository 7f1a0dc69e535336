//! Compiles each site's [`SiteConfig`] from the controller's state: its own overlay address,
//! prefixes and links, the peers the topology connects it to (enrolled sites only: a peer
//! without a key cannot be dialled), and the classes, policies and failover settings.
//!
//! A configuration is the JSON its edge receives, held as a list of fragments serialized once
//! and shared: a site's entry as a peer is the same bytes in every configuration that lists it,
//! and the classes, policies and settings are the same bytes in all of them. A full mesh of N
//! sites therefore serializes N peers, not N², and holds N² pointers, not N² copies; the bytes
//! are laid end to end only when a configuration is written out. Each configuration's version
//! combines the hashes of its fragments (each hashed once): it changes exactly when the
//! configuration does, so a change reaches only the edges it concerns.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use patronus_api::{FailoverSettings, PeerConfig, Policy, SiteConfig, SlaClass, WgPublicKey};
use serde::Serialize;

use crate::error::ApiError;
use crate::routes::sites::{SiteStatus, SiteView, load_sites};
use crate::routes::topology::{self, Mode, Topology};
use crate::store::Store;

/// Everything the configurations are compiled from, read in one go.
#[derive(Debug, Clone)]
pub struct Network {
    /// Shared with the compile before when it read them and none changed since.
    pub sites: Arc<Vec<SiteView>>,
    pub keys: HashMap<i64, WgPublicKey>,
    /// The key a site's edge is rolling to, while it does.
    pub next_keys: HashMap<i64, WgPublicKey>,
    /// Key rotations asked for, by site (absent: none).
    pub rotations: HashMap<i64, u64>,
    pub topology: Topology,
    pub classes: Vec<SlaClass>,
    pub policies: Vec<Policy>,
    pub failover: FailoverSettings,
}

impl Network {
    pub async fn load(store: &Store) -> Result<Self, ApiError> {
        Self::load_reusing(store, None).await
    }

    /// [`Network::load`], with `sites` (read earlier) in place of reading the sites and their
    /// links again: the caller knows none changed since ([`crate::store::Touches`]). At a
    /// thousand sites that read is most of a compile.
    pub async fn load_reusing(
        store: &Store,
        sites: Option<Arc<Vec<SiteView>>>,
    ) -> Result<Self, ApiError> {
        // One read transaction: every part from the same snapshot of the database.
        let mut tx = store.snapshot().await?;
        let sites = match sites {
            Some(s) => s,
            None => Arc::new(load_sites(&mut tx).await?),
        };
        let parse = |k: &Option<String>| k.as_deref().and_then(|k| k.parse().ok());
        let keys = sites
            .iter()
            .filter_map(|s| Some((s.id, parse(&s.public_key)?)))
            .collect();
        let next_keys = sites
            .iter()
            .filter_map(|s| Some((s.id, parse(&s.next_public_key)?)))
            .collect();
        let rotations = sites
            .iter()
            .filter(|s| s.key_rotation > 0)
            .map(|s| (s.id, s.key_rotation as u64))
            .collect();
        Ok(Self {
            sites,
            keys,
            next_keys,
            rotations,
            topology: topology::load(&mut tx).await?,
            classes: crate::store::docs::CLASSES
                .all(&mut tx)
                .await?
                .into_iter()
                .map(|d| d.spec)
                .collect(),
            policies: crate::store::docs::POLICIES
                .all(&mut tx)
                .await?
                .into_iter()
                .map(|d| d.spec)
                .collect(),
            failover: crate::routes::failover::failover(&mut tx).await?.0,
        })
    }
}

/// One site's configuration, as sent: `head`, the peers separated by commas, `tail`.
#[derive(Debug, Clone)]
pub struct Compiled {
    pub site_id: i64,
    /// Equal versions, equal configurations (a 64-bit hash of the fragments).
    pub version: u64,
    /// `{` + the site's own fields + `,"peers":[`.
    pub head: Fragment,
    /// Its peers, as a selection of the one list of every site as a peer.
    pub peers: Peers,
    /// `],` + the fields every site shares + `}`.
    pub tail: Fragment,
}

/// One site as a peer: serialized once, shared by every configuration that lists it.
#[derive(Debug, Clone)]
pub struct PeerEntry {
    pub site_id: i64,
    pub name: Arc<str>,
    pub fragment: Fragment,
}

/// A site's peers: all of the shared list but itself (a full mesh, a hub), or some of it (a
/// spoke: its hubs). Nothing is copied per site: a full mesh of N sites holds N peers, not N².
#[derive(Debug, Clone)]
pub struct Peers {
    pub all: Arc<[PeerEntry]>,
    pub selection: Selection,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selection {
    /// Every entry but this one (the site itself, when it is in the list).
    AllBut(Option<usize>),
    /// These entries, in order.
    Only(Vec<u32>),
}

impl Peers {
    pub fn iter(&self) -> impl Iterator<Item = &PeerEntry> + '_ {
        let n = match &self.selection {
            Selection::AllBut(_) => self.all.len(),
            Selection::Only(v) => v.len(),
        };
        (0..n).filter_map(move |k| match &self.selection {
            Selection::AllBut(skip) => (Some(k) != *skip).then(|| &self.all[k]),
            Selection::Only(v) => self.all.get(v[k] as usize),
        })
    }

    pub fn len(&self) -> usize {
        match &self.selection {
            Selection::AllBut(skip) => self.all.len() - usize::from(skip.is_some()),
            Selection::Only(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Compiled {
    /// Length of the JSON, bytes.
    pub fn len(&self) -> usize {
        self.head.bytes.len()
            + self
                .peers
                .iter()
                .map(|p| p.fragment.bytes.len())
                .sum::<usize>()
            + self.peers.len().saturating_sub(1)
            + self.tail.bytes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Its version as an HTTP entity tag (quoted hex).
    pub fn etag(&self) -> String {
        format!("\"{:016x}\"", self.version)
    }

    /// Appends the JSON to `out`.
    pub fn write_to(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.head.bytes);
        for (i, p) in self.peers.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            out.extend_from_slice(&p.fragment.bytes);
        }
        out.extend_from_slice(&self.tail.bytes);
    }

    /// The JSON, laid out.
    pub fn to_json(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(self.len());
        self.write_to(&mut v);
        v
    }

    /// What turns configuration `base` of the same site into this one, as a
    /// [`patronus_api::ConfigDelta`] in JSON: the site's own fields if they changed, the shared
    /// ones if they changed, the peers that went (by name) and those that are new or changed.
    /// The bytes are the fragments' own: nothing is serialized again. Both peer lists are in
    /// site order, so they are compared in one walk.
    pub fn delta_from(&self, base: &Compiled) -> Vec<u8> {
        let mut out = format!(
            "{{\"base\":\"{:016x}\",\"version\":\"{:016x}\"",
            base.version, self.version
        )
        .into_bytes();
        if self.head.hash != base.head.hash {
            // `{...,"peers":[` → `{...}`.
            let h = &self.head.bytes;
            out.extend_from_slice(b",\"head\":");
            out.extend_from_slice(&h[..h.len() - b",\"peers\":[".len()]);
            out.push(b'}');
        }
        if self.tail.hash != base.tail.hash {
            // `],...}` → `{...}`.
            out.extend_from_slice(b",\"shared\":{");
            out.extend_from_slice(&self.tail.bytes[2..]);
        }
        let (mut removed, mut upserted) = (Vec::new(), Vec::new());
        if !(Arc::ptr_eq(&self.peers.all, &base.peers.all)
            && self.peers.selection == base.peers.selection)
        {
            let (mut old, mut new) = (base.peers.iter().peekable(), self.peers.iter().peekable());
            loop {
                match (old.peek(), new.peek()) {
                    (None, None) => break,
                    (Some(o), Some(n)) if o.site_id == n.site_id => {
                        if o.fragment.hash != n.fragment.hash || o.name != n.name {
                            if o.name != n.name {
                                removed.push(o.name.clone());
                            }
                            upserted.push(n.fragment.bytes.clone());
                        }
                        old.next();
                        new.next();
                    }
                    (Some(o), Some(n)) if o.site_id < n.site_id => {
                        removed.push(o.name.clone());
                        old.next();
                    }
                    (Some(o), None) => {
                        removed.push(o.name.clone());
                        old.next();
                    }
                    (_, Some(n)) => {
                        upserted.push(n.fragment.bytes.clone());
                        new.next();
                    }
                }
            }
        }
        out.extend_from_slice(b",\"remove\":[");
        for (i, n) in removed.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            out.extend_from_slice(&serde_json::to_vec(&**n).unwrap_or_default());
        }
        out.extend_from_slice(b"],\"upsert\":[");
        for (i, f) in upserted.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            out.extend_from_slice(f);
        }
        out.extend_from_slice(b"]}");
        out
    }
}

/// A fragment and its hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fragment {
    pub bytes: Arc<[u8]>,
    pub hash: u64,
}

impl Fragment {
    fn new(bytes: Vec<u8>) -> Self {
        Self {
            hash: fnv1a(&bytes),
            bytes: bytes.into(),
        }
    }
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Folds a fragment's hash into a running one (order matters).
fn combine(h: u64, part: u64) -> u64 {
    (h ^ part).wrapping_mul(0x0100_0000_01b3).rotate_left(29)
}

fn json(v: &impl Serialize) -> Result<Vec<u8>, ApiError> {
    serde_json::to_vec(v).map_err(ApiError::internal)
}

/// Fields of a [`SiteConfig`] that are the site's own, in the order they are written.
#[derive(Serialize)]
struct Head<'a> {
    site: &'a str,
    overlay: IpAddr,
    lan_prefixes: &'a [patronus_api::Prefix],
    links: Vec<&'a patronus_api::Link>,
    #[serde(skip_serializing_if = "is_zero")]
    key_rotation: u64,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

/// Fields that are the same for every site.
#[derive(Serialize)]
struct Tail<'a> {
    classes: &'a [SlaClass],
    policies: &'a [Policy],
    failover: &'a FailoverSettings,
}

/// Mixes a peer's hash before it is summed into a version, so that peers do not cancel out.
fn mix(h: u64) -> u64 {
    (h ^ (h >> 29))
        .wrapping_mul(0xbf58_476d_1ce4_e5b9)
        .rotate_left(31)
}

/// The configuration of every active site that has an overlay address, in site order. The
/// work is linear in the number of sites whatever the topology: every site is serialized once
/// as a peer, and each configuration selects from that one list; its version sums its peers'
/// (mixed) hashes, so that "all but me" costs one subtraction.
pub fn compile(net: &Network) -> Result<Vec<Compiled>, ApiError> {
    compile_reusing(net, None)
}

/// [`compile`], sharing with `previous` (the generation compiled before, by site id) every
/// fragment whose bytes did not change, and its whole peer list if none did. Older generations
/// kept for deltas then cost their tables, not copies of every peer; and a delta between two
/// generations that share the peer list needs no walk of it.
pub fn compile_reusing(
    net: &Network,
    previous: Option<&HashMap<i64, Compiled>>,
) -> Result<Vec<Compiled>, ApiError> {
    let old_all: Option<&Arc<[PeerEntry]>> = previous
        .and_then(|p| p.values().next())
        .map(|c| &c.peers.all);
    let old_peer: HashMap<i64, &PeerEntry> = old_all
        .map(|a| a.iter().map(|p| (p.site_id, p)).collect())
        .unwrap_or_default();
    let active: Vec<&SiteView> = net
        .sites
        .iter()
        .filter(|s| s.status == SiteStatus::Active)
        .collect();
    // Each active, enrolled site with an address, as a peer, in site order.
    let mut all = Vec::new();
    let mut index_of: HashMap<i64, usize> = HashMap::new();
    for s in &active {
        let (Some(key), Some(overlay)) = (net.keys.get(&s.id), s.overlay_address) else {
            continue;
        };
        let name = patronus_api::Name::new(s.name.clone()).map_err(ApiError::internal)?;
        let peer = PeerConfig {
            name,
            public_key: *key,
            overlay,
            lan_prefixes: s.lan_prefixes.clone(),
            // As the peers reach it: configured, else observed (`crate::stun`).
            links: s.links.iter().map(|l| l.for_peers()).collect(),
            next_public_key: net.next_keys.get(&s.id).copied(),
            // Every site the controller knows runs a Patronus edge.
            probe: patronus_api::ProbeMode::Stamp,
        };
        index_of.insert(s.id, all.len());
        let bytes = json(&peer)?;
        all.push(match old_peer.get(&s.id) {
            Some(o) if *o.name == *s.name && *o.fragment.bytes == *bytes => (*o).clone(),
            _ => PeerEntry {
                site_id: s.id,
                name: Arc::from(s.name.as_str()),
                fragment: Fragment::new(bytes),
            },
        });
    }
    let all: Arc<[PeerEntry]> = match old_all {
        Some(o)
            if o.len() == all.len()
                && o.iter().zip(&all).all(|(a, b)| {
                    a.site_id == b.site_id && Arc::ptr_eq(&a.fragment.bytes, &b.fragment.bytes)
                }) =>
        {
            o.clone()
        }
        _ => all.into(),
    };
    let sum_all = all
        .iter()
        .fold(0u64, |h, p| h.wrapping_add(mix(p.fragment.hash)));
    // `],` + the fields every site shares + `}`.
    let mut tail = b"],".to_vec();
    tail.extend_from_slice(
        &json(&Tail {
            classes: &net.classes,
            policies: &net.policies,
            failover: &net.failover,
        })?[1..],
    );
    let tail = match previous.and_then(|p| p.values().next()) {
        Some(o) if *o.tail.bytes == *tail => o.tail.clone(),
        _ => Fragment::new(tail),
    };
    // Who talks to whom (as `connected_pairs` says): in a full mesh everyone with everyone; in
    // hub and spoke, a hub with everyone and a spoke with the hubs.
    let hubs: Vec<u32> = match net.topology.mode {
        Mode::HubSpoke => active
            .iter()
            .filter(|s| net.topology.hubs.contains(&s.id))
            .filter_map(|s| index_of.get(&s.id).map(|i| *i as u32))
            .collect(),
        Mode::FullMesh => Vec::new(),
    };
    let mut out = Vec::with_capacity(active.len());
    for s in active {
        let Some(overlay) = s.overlay_address else {
            continue;
        };
        // The site's own fields, then `,"peers":[`.
        let mut head = json(&Head {
            site: &s.name,
            overlay,
            lan_prefixes: &s.lan_prefixes,
            links: s.links.iter().map(|l| &l.link).collect(),
            key_rotation: net.rotations.get(&s.id).copied().unwrap_or(0),
        })?;
        head.pop();
        head.extend_from_slice(b",\"peers\":[");
        let head = match previous.and_then(|p| p.get(&s.id)) {
            Some(o) if *o.head.bytes == *head => o.head.clone(),
            _ => Fragment::new(head),
        };
        let me = index_of.get(&s.id).copied();
        let everyone = net.topology.mode == Mode::FullMesh || net.topology.hubs.contains(&s.id);
        let (selection, peers_sum) = if everyone {
            let own = me.map_or(0, |i| mix(all[i].fragment.hash));
            (Selection::AllBut(me), sum_all.wrapping_sub(own))
        } else {
            let only: Vec<u32> = hubs
                .iter()
                .copied()
                .filter(|i| Some(*i as usize) != me)
                .collect();
            let sum = only.iter().fold(0u64, |h, i| {
                h.wrapping_add(mix(all[*i as usize].fragment.hash))
            });
            (Selection::Only(only), sum)
        };
        let version = combine(combine(combine(0, head.hash), peers_sum), tail.hash);
        out.push(Compiled {
            site_id: s.id,
            version,
            head,
            peers: Peers {
                all: all.clone(),
                selection,
            },
            tail: tail.clone(),
        });
    }
    Ok(out)
}

/// Reads a compiled configuration back, as an edge does.
pub fn parse(c: &Compiled) -> Result<SiteConfig, serde_json::Error> {
    serde_json::from_slice(&c.to_json())
}
