//! `/api/v1/topology` and `/api/v1/paths`: which sites talk to which, the overlay address plan,
//! and the paths that follow from them.
//!
//! - **Mode**: `full-mesh` (every pair of active sites) or `hub-spoke` (every spoke with every
//!   hub, and the hubs with each other).
//! - **Overlay plan**: one prefix; every site gets the lowest free host address in it when it is
//!   created (in the same transaction, so two sites never get the same one), and loses it when
//!   deleted. Changing the prefix renumbers every site in the order they were created. No LAN
//!   prefix may overlap the overlay prefix.
//! - **Paths** are derived, never stored: one per local link × remote link for every connected
//!   pair of active sites, identified by the two link ids (`"3-7"`, lower first). Until the edges
//!   report (a later issue), their measurements are `null`: nothing is invented.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use patronus_api::{LinkKind, Prefix};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sqlx::{Row, Sqlite, Transaction};

use crate::app::{AppState, Operator, Principal};
use crate::error::{ApiError, extract};
use crate::routes::sites::{SiteStatus, SiteView, load_sites};
use crate::routes::{Page, Paging, check_if_match, patched, with_etag};
use crate::store::{Store, now_s};

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(show, update))
        .routes(routes!(list_paths))
        .routes(routes!(show_path))
        .routes(routes!(path_metrics))
        .routes(routes!(path_events))
        .routes(routes!(failover_events))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    FullMesh,
    HubSpoke,
}

/// The topology as stored.
#[derive(Debug, Clone)]
pub struct Topology {
    pub mode: Mode,
    pub overlay_prefix: Prefix,
    pub hubs: BTreeSet<i64>,
    pub version: i64,
    pub updated_at: i64,
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

pub async fn load(store: &Store) -> Result<Topology, ApiError> {
    let row =
        sqlx::query("SELECT mode, overlay_prefix, version, updated_at FROM topology WHERE id = 1")
            .fetch_one(store.pool())
            .await?;
    let hubs = sqlx::query_scalar::<_, i64>("SELECT site_id FROM hubs")
        .fetch_all(store.pool())
        .await?;
    Ok(Topology {
        mode: serde_json::from_value(Value::String(row.try_get("mode")?))
            .map_err(ApiError::internal)?,
        overlay_prefix: row
            .try_get::<String, _>("overlay_prefix")?
            .parse()
            .map_err(ApiError::internal)?,
        hubs: hubs.into_iter().collect(),
        version: row.try_get("version")?,
        updated_at: row.try_get("updated_at")?,
    })
}

/// The overlay prefix, inside a transaction.
pub async fn overlay_prefix(tx: &mut Transaction<'static, Sqlite>) -> Result<Prefix, ApiError> {
    let p: String = sqlx::query_scalar("SELECT overlay_prefix FROM topology WHERE id = 1")
        .fetch_one(&mut **tx)
        .await?;
    p.parse().map_err(ApiError::internal)
}

/// Host numbers usable in `p`: not the network address, nor the IPv4 broadcast. (Capped for
/// IPv6: nobody has 2^32 sites.)
fn host_range(p: &Prefix) -> (u128, u128) {
    let (lo, hi) = p.range();
    let size = hi - lo + 1;
    let last = if p.is_ipv4() {
        size.saturating_sub(2)
    } else {
        (size - 1).min(u128::from(u32::MAX))
    };
    (1, last)
}

pub fn host_addr(p: &Prefix, host: u128) -> IpAddr {
    let (lo, _) = p.range();
    match p.addr() {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::from((lo + host) as u32)),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::from(lo + host)),
    }
}

/// Gives `site` the lowest free overlay address, in the site's own transaction.
pub async fn allocate(
    tx: &mut Transaction<'static, Sqlite>,
    site: i64,
) -> Result<IpAddr, ApiError> {
    let prefix = overlay_prefix(tx).await?;
    let used: Vec<i64> = sqlx::query_scalar("SELECT host FROM overlay_addresses ORDER BY host")
        .fetch_all(&mut **tx)
        .await?;
    let (first, last) = host_range(&prefix);
    let mut host = first;
    for u in used {
        let u = u as u128;
        if u == host {
            host += 1;
        } else if u > host {
            break;
        }
    }
    if host > last {
        return Err(ApiError::conflict(format!(
            "the overlay prefix {prefix} has no free address; widen it in /api/v1/topology"
        )));
    }
    sqlx::query("INSERT INTO overlay_addresses (site_id, host) VALUES (?, ?)")
        .bind(site)
        .bind(host as i64)
        .execute(&mut **tx)
        .await?;
    Ok(host_addr(&prefix, host))
}

/// Every site's overlay address.
pub async fn addresses(store: &Store) -> Result<BTreeMap<i64, IpAddr>, ApiError> {
    let prefix = load(store).await?.overlay_prefix;
    let rows = sqlx::query("SELECT site_id, host FROM overlay_addresses")
        .fetch_all(store.pool())
        .await?;
    rows.iter()
        .map(|r| {
            Ok((
                r.try_get("site_id")?,
                host_addr(&prefix, r.try_get::<i64, _>("host")? as u128),
            ))
        })
        .collect()
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

async fn view(store: &Store) -> Result<(TopologyView, i64), ApiError> {
    let t = load(store).await?;
    let names: BTreeMap<i64, String> = sqlx::query("SELECT id, name FROM sites")
        .fetch_all(store.pool())
        .await?
        .iter()
        .map(|r| Ok((r.try_get("id")?, r.try_get("name")?)))
        .collect::<Result<_, sqlx::Error>>()?;
    let addrs = addresses(store).await?;
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
    responses((status = 200, body = TopologyView), crate::error::ApiErrors)
)]
async fn show(State(s): State<AppState>, _p: Principal) -> Result<Response, ApiError> {
    let (v, version) = view(&s.store).await?;
    Ok(with_etag(StatusCode::OK, version, v))
}

#[utoipa::path(
    patch,
    path = "/api/v1/topology",
    tag = "topology",
    summary = "Change mode, hubs or overlay prefix (JSON merge patch; If-Match).",
    request_body(content = serde_json::Value, description = "A JSON merge patch (RFC 7386) of the object"),
    security(("bearer" = ["operator"])),
    responses((status = 200, body = TopologyView), crate::error::ApiErrors)
)]
async fn update(
    State(s): State<AppState>,
    Operator(p): Operator,
    headers: HeaderMap,
    extract::Json(patch): extract::Json<Value>,
) -> Result<Response, ApiError> {
    let cur = load(&s.store).await?;
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
    let mut tx = s.store.begin().await?;
    let sites: Vec<(i64, String, String)> =
        sqlx::query("SELECT id, name, lan_prefixes FROM sites ORDER BY id")
            .fetch_all(&mut *tx)
            .await?
            .iter()
            .map(|r| {
                Ok((
                    r.try_get("id")?,
                    r.try_get("name")?,
                    r.try_get("lan_prefixes")?,
                ))
            })
            .collect::<Result<_, sqlx::Error>>()?;
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
            let lan: Vec<Prefix> = serde_json::from_str(lan).map_err(ApiError::internal)?;
            if let Some(q) = lan.iter().find(|q| q.overlaps(&prefix)) {
                return Err(ApiError::conflict(format!(
                    "overlay_prefix: {prefix} overlaps {q} of site {name}"
                )));
            }
        }
        // Renumber in creation order.
        sqlx::query("DELETE FROM overlay_addresses")
            .execute(&mut *tx)
            .await?;
        for (i, (id, _, _)) in sites.iter().enumerate() {
            sqlx::query("INSERT INTO overlay_addresses (site_id, host) VALUES (?, ?)")
                .bind(id)
                .bind((first + i as u128) as i64)
                .execute(&mut *tx)
                .await?;
        }
    }
    let mode = serde_json::to_value(spec.mode).map_err(ApiError::internal)?;
    let r = sqlx::query(
        "UPDATE topology SET mode = ?, overlay_prefix = ?, version = version + 1, updated_at = ?
         WHERE id = 1 AND version = ?",
    )
    .bind(mode.as_str())
    .bind(prefix.to_string())
    .bind(now_s())
    .bind(cur.version)
    .execute(&mut *tx)
    .await?;
    if r.rows_affected() == 0 {
        return Err(ApiError::precondition_failed(
            "the topology changed while this update ran; read it again",
        ));
    }
    sqlx::query("DELETE FROM hubs").execute(&mut *tx).await?;
    for h in &hubs {
        sqlx::query("INSERT INTO hubs (site_id) VALUES (?)")
            .bind(h)
            .execute(&mut *tx)
            .await?;
    }
    Store::audit(&mut tx, &p.actor(), "topology.update", "topology", patch).await?;
    tx.commit().await?;
    let (v, version) = view(&s.store).await?;
    Ok(with_etag(StatusCode::OK, version, v))
}

// ----- paths -----

/// One end of a path.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct PathEnd {
    pub site_id: i64,
    pub site: String,
    pub link_id: i64,
    pub link: String,
    pub kind: LinkKind,
}

/// A path between two sites, over one link of each. Its live fields are `null` until an edge
/// reports them.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct PathView {
    pub id: String,
    pub a: PathEnd,
    pub b: PathEnd,
    pub state: Option<String>,
    pub rtt_ms: Option<f64>,
    pub jitter_ms: Option<f64>,
    pub loss_pct: Option<f64>,
    pub last_report: Option<i64>,
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
    let mut pairs = Vec::new();
    match t.mode {
        Mode::FullMesh => {
            for (i, a) in active.iter().enumerate() {
                for b in &active[i + 1..] {
                    pairs.push((*a, *b));
                }
            }
        }
        // Every hub with every other site, once: hubs × sites, not sites².
        Mode::HubSpoke => {
            let hubs = active.iter().filter(|h| t.hubs.contains(&h.id));
            for h in hubs {
                for s in &active {
                    // A hub with itself never; two hubs once.
                    if s.id == h.id || (t.hubs.contains(&s.id) && s.id < h.id) {
                        continue;
                    }
                    pairs.push(if h.id < s.id { (*h, *s) } else { (*s, *h) });
                }
            }
            pairs.sort_by_key(|(a, b)| (a.id, b.id));
        }
    }
    pairs
}

fn end(s: &SiteView, l: &crate::routes::sites::LinkView) -> PathEnd {
    PathEnd {
        site_id: s.id,
        site: s.name.clone(),
        link_id: l.id,
        link: l.link.name.to_string(),
        kind: l.link.kind,
    }
}

/// The id of the path between two links: their ids, lower first.
pub fn path_id(x: i64, y: i64) -> String {
    format!("{}-{}", x.min(y), x.max(y))
}

type Live = std::collections::HashMap<String, crate::app::LivePath>;

fn path(
    a: &SiteView,
    la: &crate::routes::sites::LinkView,
    b: &SiteView,
    lb: &crate::routes::sites::LinkView,
    live: &Live,
    now: i64,
) -> PathView {
    let id = path_id(la.id, lb.id);
    // Only a recent report speaks for the path now; an old one is no data.
    let m = live
        .get(&id)
        .filter(|m| now - m.at <= crate::app::LIVE_FOR_S);
    PathView {
        a: end(a, la),
        b: end(b, lb),
        state: m.map(|m| m.state.clone()),
        rtt_ms: m.and_then(|m| m.rtt_ms),
        jitter_ms: m.map(|m| m.jitter_ms),
        loss_pct: m.map(|m| m.loss_pct),
        last_report: live.get(&id).map(|m| m.at),
        id,
    }
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PathQuery {
    pub limit: Option<i64>,
    pub offset: Option<i64>,
    /// Paths with this site (id) at one end.
    pub site: Option<i64>,
    /// `up`, `degraded`, `down` or `unknown` (no report yet).
    pub state: Option<String>,
}

#[utoipa::path(
    get,
    path = "/api/v1/paths",
    tag = "paths",
    summary = "List the paths the topology gives.",
    params(PathQuery),
    security(("bearer" = ["viewer"])),
    responses((status = 200, body = Page<PathView>), crate::error::ApiErrors)
)]
async fn list_paths(
    State(s): State<AppState>,
    _p: Principal,
    extract::Query(q): extract::Query<PathQuery>,
) -> Result<Json<Page<PathView>>, ApiError> {
    let paging = Paging::new(q.limit, q.offset)?;
    if let Some(st) = q.state.as_deref() {
        if !matches!(st, "up" | "degraded" | "down" | "unknown") {
            return Err(ApiError::field(
                "state",
                "must be up, degraded, down or unknown",
            ));
        }
    }
    let t = load(&s.store).await?;
    let sites = load_sites(&s.store).await?;
    let live = s.live.lock().map(|l| l.clone()).unwrap_or_default();
    let now = crate::store::now_s();
    let pairs: Vec<_> = connected_pairs(&t, &sites)
        .into_iter()
        .filter(|(a, b)| q.site.is_none_or(|id| a.id == id || b.id == id))
        .collect();
    if let Some(st) = q.state.as_deref() {
        // Filtered by state: every path is looked at.
        let all: Vec<PathView> = pairs
            .iter()
            .flat_map(|(a, b)| {
                let live = &live;
                a.links
                    .iter()
                    .flat_map(move |la| b.links.iter().map(move |lb| path(a, la, b, lb, live, now)))
            })
            .filter(|p| p.state.as_deref().unwrap_or("unknown") == st)
            .collect();
        let total = all.len() as i64;
        let items = all
            .into_iter()
            .skip(paging.offset as usize)
            .take(paging.limit as usize)
            .collect();
        return Ok(Json(Page::new(items, total, paging)));
    }
    let total: i64 = pairs
        .iter()
        .map(|(a, b)| (a.links.len() * b.links.len()) as i64)
        .sum();
    let mut skip = paging.offset;
    let mut items = Vec::new();
    'pairs: for (a, b) in pairs {
        let n = (a.links.len() * b.links.len()) as i64;
        if skip >= n {
            skip -= n;
            continue;
        }
        for la in &a.links {
            for lb in &b.links {
                if skip > 0 {
                    skip -= 1;
                    continue;
                }
                if items.len() as i64 == paging.limit {
                    break 'pairs;
                }
                items.push(path(a, la, b, lb, &live, now));
            }
        }
    }
    Ok(Json(Page::new(items, total, paging)))
}

#[utoipa::path(
    get,
    path = "/api/v1/paths/{id}",
    tag = "paths",
    summary = "Read a path.",
    params(("id" = String, Path, description = "The two link ids, lower first: 3-7")),
    security(("bearer" = ["viewer"])),
    responses((status = 200, body = PathView), crate::error::ApiErrors)
)]
async fn show_path(
    State(s): State<AppState>,
    _p: Principal,
    extract::Path(id): extract::Path<String>,
) -> Result<Json<PathView>, ApiError> {
    current_path(&s, &id)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("path {id}")))
}

/// The path `id` names in the current sites, links and topology, if any.
async fn current_path(s: &AppState, id: &str) -> Result<Option<PathView>, ApiError> {
    let Some((x, y)) = id
        .split_once('-')
        .and_then(|(x, y)| Some((x.parse::<i64>().ok()?, y.parse::<i64>().ok()?)))
    else {
        return Ok(None);
    };
    let t = load(&s.store).await?;
    let sites = load_sites(&s.store).await?;
    let owner = |link: i64| {
        sites
            .iter()
            .find_map(|s| s.links.iter().find(|l| l.id == link).map(|l| (s, l)))
    };
    let (Some(ex), Some(ey)) = (owner(x), owner(y)) else {
        return Ok(None);
    };
    if !connected(&t, ex.0, ey.0) {
        return Ok(None);
    }
    // Oriented as `connected_pairs` orients a pair: the site with the lower id first.
    let ((a, la), (b, lb)) = if ex.0.id < ey.0.id {
        (ex, ey)
    } else {
        (ey, ex)
    };
    let live = s.live.lock().unwrap_or_else(|e| e.into_inner());
    Ok(Some(path(a, la, b, lb, &live, crate::store::now_s())))
}

/// 404 unless `id` is a path now, or was one whose history is still kept (a removed link's
/// measurements stay readable until their retention ends).
async fn known_path(s: &AppState, id: &str) -> Result<(), ApiError> {
    // The indexed look-up first; the topology only for a path with no history yet.
    let kept: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM path_samples WHERE path_id = ?1)
             OR EXISTS (SELECT 1 FROM path_events WHERE path_id = ?1)",
    )
    .bind(id)
    .fetch_one(s.store.pool())
    .await?;
    if kept || current_path(s, id).await?.is_some() {
        Ok(())
    } else {
        Err(ApiError::not_found(format!("path {id}")))
    }
}

/// One reported measurement of a path.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct PathSample {
    /// Unix seconds.
    pub at: i64,
    /// The site whose edge reported it.
    pub site_id: i64,
    pub state: String,
    pub rtt_ms: Option<f64>,
    pub jitter_ms: f64,
    pub loss_pct: f64,
    /// With `resolution`: the reports the bucket sums up (RTT, jitter and loss are their
    /// means, the RTT's worst is `rtt_ms_max`, and `state` the worst state among them).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub samples: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rtt_ms_max: Option<f64>,
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct MetricsQuery {
    pub limit: Option<i64>,
    pub offset: Option<i64>,
    /// Unix seconds, inclusive.
    pub since: Option<i64>,
    /// Unix seconds, exclusive.
    pub until: Option<i64>,
    /// Seconds per bucket (5 to 86400): each reporting site's samples in a bucket summed up
    /// into one. Without it, every report.
    pub resolution: Option<i64>,
}

#[utoipa::path(
    get,
    path = "/api/v1/paths/{id}/metrics",
    tag = "paths",
    summary = "A path's measurements as its edges reported them, oldest first.",
    params(("id" = String, Path, description = "The two link ids, lower first: 3-7"), MetricsQuery),
    security(("bearer" = ["viewer"])),
    responses((status = 200, body = Page<PathSample>), crate::error::ApiErrors)
)]
async fn path_metrics(
    State(s): State<AppState>,
    _p: Principal,
    extract::Path(id): extract::Path<String>,
    extract::Query(q): extract::Query<MetricsQuery>,
) -> Result<Json<Page<PathSample>>, ApiError> {
    let paging = Paging::new(q.limit, q.offset)?;
    known_path(&s, &id).await?;
    let (since, until) = (q.since.unwrap_or(0), q.until.unwrap_or(i64::MAX));
    if let Some(res) = q.resolution {
        if !(5..=86_400).contains(&res) {
            return Err(ApiError::field(
                "resolution",
                "must be between 5 and 86400 seconds",
            ));
        }
        return path_metrics_bucketed(&s, &id, since, until, res, paging).await;
    }
    let total: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM path_samples WHERE path_id = ? AND at_s >= ? AND at_s < ?",
    )
    .bind(&id)
    .bind(since)
    .bind(until)
    .fetch_one(s.store.pool())
    .await?;
    let rows = sqlx::query(
        "SELECT at_s, site_id, state, rtt_ms, jitter_ms, loss_pct FROM path_samples
         WHERE path_id = ? AND at_s >= ? AND at_s < ? ORDER BY id LIMIT ? OFFSET ?",
    )
    .bind(&id)
    .bind(since)
    .bind(until)
    .bind(paging.limit)
    .bind(paging.offset)
    .fetch_all(s.store.pool())
    .await?;
    let items = rows
        .iter()
        .map(|r| {
            Ok(PathSample {
                at: r.try_get("at_s")?,
                site_id: r.try_get("site_id")?,
                state: r.try_get("state")?,
                rtt_ms: r.try_get("rtt_ms")?,
                jitter_ms: r.try_get("jitter_ms")?,
                loss_pct: r.try_get("loss_pct")?,
                samples: None,
                rtt_ms_max: None,
            })
        })
        .collect::<Result<Vec<_>, sqlx::Error>>()?;
    Ok(Json(Page::new(items, total, paging)))
}

/// A path's samples summed up per `res` seconds and reporting site.
async fn path_metrics_bucketed(
    s: &AppState,
    id: &str,
    since: i64,
    until: i64,
    res: i64,
    paging: Paging,
) -> Result<Json<Page<PathSample>>, ApiError> {
    let grouped = "SELECT (at_s / ?1) * ?1 AS bucket, site_id, COUNT(*) AS n,
                AVG(rtt_ms) AS rtt, MAX(rtt_ms) AS rtt_max, AVG(jitter_ms) AS jitter,
                AVG(loss_pct) AS loss,
                MAX(CASE state WHEN 'down' THEN 2 WHEN 'degraded' THEN 1 ELSE 0 END) AS worst
         FROM path_samples WHERE path_id = ?2 AND at_s >= ?3 AND at_s < ?4
         GROUP BY bucket, site_id";
    let total: i64 = sqlx::query_scalar(&format!("SELECT COUNT(*) FROM ({grouped})"))
        .bind(res)
        .bind(id)
        .bind(since)
        .bind(until)
        .fetch_one(s.store.pool())
        .await?;
    let rows = sqlx::query(&format!(
        "{grouped} ORDER BY bucket, site_id LIMIT ?5 OFFSET ?6"
    ))
    .bind(res)
    .bind(id)
    .bind(since)
    .bind(until)
    .bind(paging.limit)
    .bind(paging.offset)
    .fetch_all(s.store.pool())
    .await?;
    let items = rows
        .iter()
        .map(|r| {
            let worst: i64 = r.try_get("worst")?;
            Ok(PathSample {
                at: r.try_get("bucket")?,
                site_id: r.try_get("site_id")?,
                state: ["up", "degraded", "down"][worst.clamp(0, 2) as usize].to_owned(),
                rtt_ms: r.try_get("rtt")?,
                jitter_ms: r.try_get("jitter")?,
                loss_pct: r.try_get("loss")?,
                samples: Some(r.try_get("n")?),
                rtt_ms_max: r.try_get("rtt_max")?,
            })
        })
        .collect::<Result<Vec<_>, sqlx::Error>>()?;
    Ok(Json(Page::new(items, total, paging)))
}

/// A path's change of state, as the edge of `site_id` saw it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct PathEventView {
    pub id: i64,
    pub site_id: i64,
    pub site: String,
    /// Unix milliseconds, the edge's clock.
    pub at_ms: i64,
    /// `down`, `up`, `sla-violated`, `sla-restored`.
    pub kind: String,
    pub class: Option<String>,
    /// The event as the edge reported it.
    pub detail: patronus_api::PathEvent,
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PathEventQuery {
    pub limit: Option<i64>,
    pub offset: Option<i64>,
    /// Unix milliseconds, inclusive.
    pub since_ms: Option<i64>,
    /// Unix milliseconds, exclusive.
    pub until_ms: Option<i64>,
    /// Only this kind.
    pub kind: Option<String>,
}

#[utoipa::path(
    get,
    path = "/api/v1/paths/{id}/events",
    tag = "paths",
    summary = "A path's changes of state (down, up, SLA broken or met again) as its edges saw \
               them, to the millisecond, oldest first.",
    params(("id" = String, Path, description = "The two link ids, lower first: 3-7"), PathEventQuery),
    security(("bearer" = ["viewer"])),
    responses((status = 200, body = Page<PathEventView>), crate::error::ApiErrors)
)]
async fn path_events(
    State(s): State<AppState>,
    _p: Principal,
    extract::Path(id): extract::Path<String>,
    extract::Query(q): extract::Query<PathEventQuery>,
) -> Result<Json<Page<PathEventView>>, ApiError> {
    let paging = Paging::new(q.limit, q.offset)?;
    if let Some(k) = q.kind.as_deref() {
        if !matches!(k, "down" | "up" | "sla-violated" | "sla-restored") {
            return Err(ApiError::field(
                "kind",
                "must be down, up, sla-violated or sla-restored",
            ));
        }
    }
    known_path(&s, &id).await?;
    let (since, until) = (q.since_ms.unwrap_or(0), q.until_ms.unwrap_or(i64::MAX));
    let filter =
        "e.path_id = ?1 AND e.at_ms >= ?2 AND e.at_ms < ?3 AND (?4 IS NULL OR e.kind = ?4)";
    let total: i64 = sqlx::query_scalar(&format!(
        "SELECT COUNT(*) FROM path_events e WHERE {filter}"
    ))
    .bind(&id)
    .bind(since)
    .bind(until)
    .bind(&q.kind)
    .fetch_one(s.store.pool())
    .await?;
    let rows = sqlx::query(&format!(
        "SELECT e.id, e.site_id, s.name AS site, e.at_ms, e.kind, e.class, e.detail
         FROM path_events e JOIN sites s ON s.id = e.site_id WHERE {filter}
         ORDER BY e.at_ms, e.id LIMIT ?5 OFFSET ?6"
    ))
    .bind(&id)
    .bind(since)
    .bind(until)
    .bind(&q.kind)
    .bind(paging.limit)
    .bind(paging.offset)
    .fetch_all(s.store.pool())
    .await?;
    let items = rows
        .iter()
        .map(|r| {
            Ok(PathEventView {
                id: r.try_get("id")?,
                site_id: r.try_get("site_id")?,
                site: r.try_get("site")?,
                at_ms: r.try_get("at_ms")?,
                kind: r.try_get("kind")?,
                class: r.try_get("class")?,
                detail: serde_json::from_str(r.try_get::<&str, _>("detail")?)
                    .map_err(ApiError::internal)?,
            })
        })
        .collect::<Result<Vec<_>, ApiError>>()?;
    Ok(Json(Page::new(items, total, paging)))
}

/// Flows that moved from one path to another, as the edge of `site_id` reported it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct FailoverView {
    pub id: i64,
    pub site_id: i64,
    pub site: String,
    /// Unix milliseconds, the edge's clock.
    pub at_ms: i64,
    pub peer: String,
    /// The path ids (null if the controller no longer has one of the links).
    pub from_path: Option<String>,
    pub to_path: Option<String>,
    /// The links by name, as the edge reported them.
    pub from: String,
    pub to: String,
    pub reason: String,
    pub flows: i64,
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct FailoverQuery {
    pub limit: Option<i64>,
    pub offset: Option<i64>,
    /// Events reported by this site's edge (id).
    pub site: Option<i64>,
    /// `path-down`, `sla-violated`, ...
    pub reason: Option<String>,
    /// Unix milliseconds, inclusive.
    pub since: Option<i64>,
    /// Unix milliseconds, exclusive.
    pub until: Option<i64>,
}

#[utoipa::path(
    get,
    path = "/api/v1/failover/events",
    tag = "paths",
    summary = "Failovers the edges reported, newest first.",
    params(FailoverQuery),
    security(("bearer" = ["viewer"])),
    responses((status = 200, body = Page<FailoverView>), crate::error::ApiErrors)
)]
async fn failover_events(
    State(s): State<AppState>,
    _p: Principal,
    extract::Query(q): extract::Query<FailoverQuery>,
) -> Result<Json<Page<FailoverView>>, ApiError> {
    let paging = Paging::new(q.limit, q.offset)?;
    let filter = " WHERE (? IS NULL OR e.site_id = ?) AND (? IS NULL OR e.reason = ?)
                   AND e.at_ms >= ? AND e.at_ms < ?";
    let (since, until) = (q.since.unwrap_or(0), q.until.unwrap_or(i64::MAX));
    let count = format!("SELECT COUNT(*) FROM failover_events e{filter}");
    let total: i64 = sqlx::query_scalar(&count)
        .bind(q.site)
        .bind(q.site)
        .bind(&q.reason)
        .bind(&q.reason)
        .bind(since)
        .bind(until)
        .fetch_one(s.store.pool())
        .await?;
    let sql = format!(
        "SELECT e.*, s.name AS site FROM failover_events e JOIN sites s ON s.id = e.site_id{filter}
         ORDER BY e.at_ms DESC, e.id DESC LIMIT ? OFFSET ?"
    );
    let rows = sqlx::query(&sql)
        .bind(q.site)
        .bind(q.site)
        .bind(&q.reason)
        .bind(&q.reason)
        .bind(since)
        .bind(until)
        .bind(paging.limit)
        .bind(paging.offset)
        .fetch_all(s.store.pool())
        .await?;
    let items = rows
        .iter()
        .map(|r| {
            let e: patronus_api::FailoverEvent =
                serde_json::from_str(r.try_get("detail")?).map_err(ApiError::internal)?;
            Ok(FailoverView {
                id: r.try_get("id")?,
                site_id: r.try_get("site_id")?,
                site: r.try_get("site")?,
                at_ms: r.try_get("at_ms")?,
                peer: r.try_get("peer")?,
                from_path: r.try_get("from_path")?,
                to_path: r.try_get("to_path")?,
                from: format!("{}>{}", e.from_local_link, e.from_remote_link),
                to: format!("{}>{}", e.to_local_link, e.to_remote_link),
                reason: r.try_get("reason")?,
                flows: r.try_get("flows")?,
            })
        })
        .collect::<Result<Vec<_>, ApiError>>()?;
    Ok(Json(Page::new(items, total, paging)))
}
