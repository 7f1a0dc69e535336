//! `/api/v1/topology`: which sites talk to which, and the overlay address plan.
//!
//! - **Mode**: `full-mesh` (every pair of active sites) or `hub-spoke` (every spoke with every
//!   hub, and the hubs with each other).
//! - **Overlay plan**: one prefix; every site gets the lowest free host address in it when it is
//!   created (in the same transaction, so two sites never get the same one), and loses it when
//!   deleted. Changing the prefix renumbers every site in the order they were created. No LAN
//!   prefix may overlap the overlay prefix.
//! - The **paths** that follow ([`crate::routes::paths`]) are derived, never stored: one per
//!   local link × remote link for every pair of sites [`connected`] here.

use std::collections::BTreeSet;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use patronus_api::Prefix;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::app::{AppState, Operator, Principal};
use crate::error::{ApiError, extract};
use crate::routes::sites::{SiteStatus, SiteView};
use crate::routes::{audit_config, check_if_match, patched, with_etag, write_error};
use crate::store::topology as store;
pub use crate::store::topology::{
    Mode, Topology, addresses, allocate, host_addr, host_range, load, overlay_prefix,
};
use crate::store::{Conn, now_s};

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(show_topology, update_topology))
}

/// What a client may change (a merge patch of it).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopologySpec {
    pub mode: Mode,
    /// Site ids.
    pub hubs: Vec<i64>,
    pub overlay_prefix: Prefix,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct TopologyView {
    mode: Mode,
    pub overlay_prefix: Prefix,
    pub hubs: Vec<Value>,
    /// Each site's overlay address.
    addresses: Vec<Value>,
    version: i64,
    updated_at: i64,
}

async fn view(conn: &mut Conn) -> Result<(TopologyView, i64), ApiError> {
    let t = load(&mut *conn).await?;
    let names = store::site_names(&mut *conn).await?;
    let addrs = addresses(&mut *conn).await?;
    let v = TopologyView {
        mode: t.mode,
        overlay_prefix: t.overlay_prefix,
        hubs: t
            .hubs
            .iter()
            .map(|id| json!({ "site_id": id, "site": names.get(id) }))
            .collect(),
        addresses: addrs
            .iter()
            .map(|(id, a)| json!({ "site_id": id, "site": names.get(id), "address": a }))
            .collect(),
        version: t.version,
        updated_at: t.updated_at,
    };
    Ok((v, t.version))
}

#[utoipa::path(
    get,
    path = "/api/v1/topology",
    tag = "topology",
    summary = "Read the topology and overlay address plan.",
    security(("bearer" = ["viewer"])),
    responses((status = 200, body = TopologyView))
)]
async fn show_topology(State(s): State<AppState>, _p: Principal) -> Result<Response, ApiError> {
    let (v, version) = view(&mut *s.store.conn().await?).await?;
    Ok(with_etag(StatusCode::OK, version, v))
}

#[utoipa::path(
    patch,
    path = "/api/v1/topology",
    tag = "topology",
    summary = "Change mode, hubs or overlay prefix (JSON merge patch; If-Match).",
    request_body(content = serde_json::Value, description = "A JSON merge patch (RFC 7386) of the object"),
    security(("bearer" = ["operator"])),
    responses((status = 200, body = TopologyView), crate::error::Conflict)
)]
async fn update_topology(
    State(s): State<AppState>,
    Operator(p): Operator,
    headers: HeaderMap,
    extract::Json(patch): extract::Json<Value>,
) -> Result<Response, ApiError> {
    let mut tx = s.store.begin().await?;
    let cur = load(&mut tx).await?;
    check_if_match(&headers, cur.version)?;
    let spec: TopologySpec = patched(
        &TopologySpec {
            mode: cur.mode,
            hubs: cur.hubs.iter().copied().collect(),
            overlay_prefix: cur.overlay_prefix,
        },
        &patch,
    )?;
    let hubs: BTreeSet<i64> = spec.hubs.iter().copied().collect();
    if spec.mode == Mode::HubSpoke && hubs.is_empty() {
        return Err(ApiError::field("hubs", "hub-spoke needs at least one hub"));
    }
    let sites = store::sites_for_plan(&mut tx).await?;
    for h in &hubs {
        if !sites.iter().any(|(id, _, _)| id == h) {
            return Err(ApiError::field("hubs", format!("there is no site {h}")));
        }
    }
    let prefix = spec.overlay_prefix;
    if prefix != cur.overlay_prefix {
        let (first, last) = host_range(&prefix);
        if (sites.len() as u128) > last.saturating_sub(first) + 1 {
            return Err(ApiError::field(
                "overlay_prefix",
                format!(
                    "{prefix} has room for {} sites; there are {}",
                    last + 1 - first,
                    sites.len()
                ),
            ));
        }
        for (_, name, lan) in &sites {
            if let Some(q) = lan.iter().find(|q| q.overlaps(&prefix)) {
                return Err(ApiError::conflict(format!(
                    "overlay_prefix: {prefix} overlaps {q} of site {name}"
                )));
            }
        }
        // Renumber in creation order.
        let hosts: Vec<(i64, i64)> = sites
            .iter()
            .enumerate()
            .map(|(i, (id, _, _))| (*id, (first + i as u128) as i64))
            .collect();
        store::renumber(&mut tx, &hosts).await?;
    }
    store::update(&mut tx, cur.version, spec.mode, &prefix, &hubs, now_s())
        .await
        .map_err(|e| write_error(e, "topology", String::new))?;
    audit_config(&mut tx, &p.actor(), "topology.update", "topology", patch).await?;
    let (v, version) = view(&mut tx).await?;
    tx.commit().await?;
    Ok(with_etag(StatusCode::OK, version, v))
}

/// Whether the topology connects sites `a` and `b`: two different active sites, in a full
/// mesh always, in hub and spoke when either is a hub (the pairs [`connected_pairs`] lists).
pub fn connected(t: &Topology, a: &SiteView, b: &SiteView) -> bool {
    a.id != b.id
        && a.status == SiteStatus::Active
        && b.status == SiteStatus::Active
        && match t.mode {
            Mode::FullMesh => true,
            Mode::HubSpoke => t.hubs.contains(&a.id) || t.hubs.contains(&b.id),
        }
}

/// Pairs of sites that the topology connects, lower id first, in order.
pub fn connected_pairs<'a>(
    t: &Topology,
    sites: &'a [SiteView],
) -> Vec<(&'a SiteView, &'a SiteView)> {
    let active: Vec<&SiteView> = sites
        .iter()
        .filter(|s| s.status == SiteStatus::Active)
        .collect();
    pairs_of(t, &active, |s| s.id).collect()
}

/// A site's id and how many links it has.
pub type SiteLinks = (i64, i64);

/// The same pairs as [`connected_pairs`], in the same order, from each active site's id and
/// link count (in id order): what a page of paths is found with, without reading the sites.
pub fn connected_pair_counts<'a>(
    t: &'a Topology,
    active: &'a [SiteLinks],
) -> Box<dyn Iterator<Item = (SiteLinks, SiteLinks)> + 'a> {
    pairs_of(t, active, |s| s.0)
}

/// The pairs the topology makes of `active` sites (in id order; `id` gives each one's id),
/// lower id first, in order. Lazy: a full mesh is walked as far as it is read, not built.
fn pairs_of<'a, T: Copy + 'a>(
    t: &'a Topology,
    active: &'a [T],
    id: fn(&T) -> i64,
) -> Box<dyn Iterator<Item = (T, T)> + 'a> {
    match t.mode {
        Mode::FullMesh => Box::new(
            active
                .iter()
                .enumerate()
                .flat_map(move |(i, a)| active[i + 1..].iter().map(move |b| (*a, *b))),
        ),
        // Every hub with every other site, once: hubs × sites, not sites².
        Mode::HubSpoke => {
            let mut pairs = Vec::new();
            for h in active.iter().filter(|h| t.hubs.contains(&id(h))) {
                for s in active {
                    // A hub with itself never; two hubs once.
                    if id(s) == id(h) || (t.hubs.contains(&id(s)) && id(s) < id(h)) {
                        continue;
                    }
                    pairs.push(if id(h) < id(s) { (*h, *s) } else { (*s, *h) });
                }
            }
            pairs.sort_by_key(|(a, b)| (id(a), id(b)));
            Box::new(pairs.into_iter())
        }
    }
}

/// The id of the path between two links: their ids, lower first.
pub fn path_id(x: i64, y: i64) -> String {
    format!("{}-{}", x.min(y), x.max(y))
}
