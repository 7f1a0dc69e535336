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

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use patronus_api::{FailoverSettings, PeerConfig, Policy, SiteConfig, SlaClass, WgPublicKey};
use serde::Serialize;

use crate::error::ApiError;
use crate::routes::sites::{SiteStatus, SiteView, load_sites};
use crate::routes::topology::{self, Topology, connected_pairs};
use crate::store::Store;

/// Everything the configurations are compiled from, read in one go.
#[derive(Debug, Clone)]
pub struct Network {
    pub sites: Vec<SiteView>,
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
        let rows = sqlx::query_as::<_, (i64, Option<String>, Option<String>, i64)>(
            "SELECT id, public_key, next_public_key, key_rotation FROM sites
             WHERE public_key IS NOT NULL OR key_rotation > 0",
        )
        .fetch_all(store.pool())
        .await?;
        let (mut keys, mut next_keys, mut rotations) =
            (HashMap::new(), HashMap::new(), HashMap::new());
        for (id, key, next, rotation) in rows {
            if let Some(k) = key.and_then(|k| k.parse().ok()) {
                keys.insert(id, k);
            }
            if let Some(k) = next.and_then(|k| k.parse().ok()) {
                next_keys.insert(id, k);
            }
            if rotation > 0 {
                rotations.insert(id, rotation as u64);
            }
        }
        Ok(Self {
            sites: load_sites(store).await?,
            keys,
            next_keys,
            rotations,
            topology: topology::load(store).await?,
            classes: crate::routes::policies::all_classes(store)
                .await?
                .into_iter()
                .map(|d| d.spec)
                .collect(),
            policies: crate::routes::policies::all_policies(store)
                .await?
                .into_iter()
                .map(|d| d.spec)
                .collect(),
            failover: crate::routes::policies::failover(store).await?.0,
        })
    }
}

/// One site's configuration, as sent: the concatenation of `parts`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Compiled {
    pub site_id: i64,
    /// Equal versions, equal configurations (a 64-bit hash of the fragments in order).
    pub version: u64,
    pub parts: Vec<Arc<[u8]>>,
}

impl Compiled {
    /// Length of the JSON, bytes.
    pub fn len(&self) -> usize {
        self.parts.iter().map(|p| p.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The JSON, laid out.
    pub fn to_json(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(self.len());
        for p in &self.parts {
            v.extend_from_slice(p);
        }
        v
    }
}

/// A fragment and its hash.
#[derive(Debug, Clone)]
struct Fragment {
    bytes: Arc<[u8]>,
    hash: u64,
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

/// The configuration of every active site that has an overlay address, in site order.
pub fn compile(net: &Network) -> Result<Vec<Compiled>, ApiError> {
    let active: Vec<&SiteView> = net
        .sites
        .iter()
        .filter(|s| s.status == SiteStatus::Active && s.overlay_address.is_some())
        .collect();
    // Each enrolled site as a peer, serialized once.
    let mut as_peer: HashMap<i64, Fragment> = HashMap::new();
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
            links: s.links.iter().map(|l| l.link.clone()).collect(),
            next_public_key: net.next_keys.get(&s.id).copied(),
        };
        as_peer.insert(s.id, Fragment::new(json(&peer)?));
    }
    // `],` + the fields every site shares + `}`.
    let mut tail = b"],".to_vec();
    tail.extend_from_slice(
        &json(&Tail {
            classes: &net.classes,
            policies: &net.policies,
            failover: &net.failover,
        })?[1..],
    );
    let tail = Fragment::new(tail);
    let comma = Fragment::new(b",".to_vec());
    // Who talks to whom.
    let mut peers_of: BTreeMap<i64, Vec<i64>> = BTreeMap::new();
    for (a, b) in connected_pairs(&net.topology, &net.sites) {
        peers_of.entry(a.id).or_default().push(b.id);
        peers_of.entry(b.id).or_default().push(a.id);
    }
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
        let head = Fragment::new(head);
        let peers: Vec<&Fragment> = peers_of
            .get(&s.id)
            .into_iter()
            .flatten()
            .filter_map(|p| as_peer.get(p))
            .collect();
        let mut parts = Vec::with_capacity(2 * peers.len() + 2);
        let mut version = combine(0, head.hash);
        parts.push(head.bytes);
        for (i, p) in peers.into_iter().enumerate() {
            if i > 0 {
                parts.push(comma.bytes.clone());
            }
            parts.push(p.bytes.clone());
            version = combine(version, p.hash);
        }
        parts.push(tail.bytes.clone());
        version = combine(version, tail.hash);
        out.push(Compiled {
            site_id: s.id,
            version,
            parts,
        });
    }
    Ok(out)
}

/// Reads a compiled configuration back, as an edge does.
pub fn parse(c: &Compiled) -> Result<SiteConfig, serde_json::Error> {
    serde_json::from_slice(&c.to_json())
}
