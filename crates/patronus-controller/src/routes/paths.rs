//! `/api/v1/paths`: the paths the topology makes, with what their edges measure, their
//! history and their state-change events.
//!
//! Paths are derived, never stored: one per local link × remote link for every connected pair
//! of active sites, identified by the two link ids (`"3-7"`, lower first). Until an edge reports
//! one, its measurements are `null`: nothing is invented.

use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use axum::Json;
use axum::extract::State;
use patronus_api::{LinkKind, PathEventKind, PathState};
use serde::{Deserialize, Serialize};

use crate::app::{AppState, Principal};
use crate::error::{ApiError, extract};
use crate::routes::sites::{SiteView, load_sites};
use crate::routes::topology::{connected, connected_pair_counts, connected_pairs, load, path_id};
use crate::routes::{Page, Paging};
use crate::store::history;
pub use crate::store::history::{PathEventView, PathSample};

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_paths))
        .routes(routes!(show_path))
        .routes(routes!(path_metrics))
        .routes(routes!(path_events))
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
    pub state: Option<PathState>,
    pub rtt_ms: Option<f64>,
    pub jitter_ms: Option<f64>,
    pub loss_pct: Option<f64>,
    /// Whether the last report says the path goes through the relay (the controller's UDP
    /// port) rather than straight between the two links.
    pub relayed: Option<bool>,
    pub last_report: Option<i64>,
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
        state: m.map(|m| m.state),
        rtt_ms: m.and_then(|m| m.rtt_ms),
        jitter_ms: m.map(|m| m.jitter_ms),
        loss_pct: m.map(|m| m.loss_pct),
        relayed: m.map(|m| m.relayed),
        last_report: live.get(&id).map(|m| m.at),
        id,
    }
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PathQuery {
    /// Items per page, 1 to 500; 50 when left out.
    #[param(minimum = 1, maximum = 500)]
    pub limit: Option<i64>,
    /// Items to skip; 0 when left out.
    #[param(minimum = 0, maximum = 9007199254740991.0)]
    pub offset: Option<i64>,
    /// Paths with this site (id) at one end.
    pub site: Option<i64>,
    /// Only paths in this state (`unknown`: no edge reported it lately).
    #[param(inline)]
    pub state: Option<StateFilter>,
}

/// A path's state, or `unknown`: no edge has reported the path lately.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum StateFilter {
    Up,
    Degraded,
    Down,
    Unknown,
}

impl StateFilter {
    /// The state a path's live fields hold when it matches.
    fn state(self) -> Option<PathState> {
        match self {
            StateFilter::Up => Some(PathState::Up),
            StateFilter::Degraded => Some(PathState::Degraded),
            StateFilter::Down => Some(PathState::Down),
            StateFilter::Unknown => None,
        }
    }
}

#[utoipa::path(
    get,
    path = "/api/v1/paths",
    tag = "paths",
    summary = "List the paths the topology gives.",
    params(PathQuery),
    security(("bearer" = ["viewer"])),
    responses((status = 200, body = Page<PathView>))
)]
async fn list_paths(
    State(s): State<AppState>,
    _p: Principal,
    extract::Query(q): extract::Query<PathQuery>,
) -> Result<Json<Page<PathView>>, ApiError> {
    let paging = Paging::new(q.limit, q.offset)?;
    // One read transaction: the topology and the sites from the same snapshot.
    let mut snapshot = s.store.snapshot().await?;
    let t = load(&mut snapshot).await?;
    let live = s.live_paths();
    let now = crate::store::now_s();
    if let Some(st) = q.state {
        // Filtered by state: every path is looked at.
        let sites = load_sites(&mut snapshot).await?;
        let all: Vec<PathView> = connected_pairs(&t, &sites)
            .into_iter()
            .filter(|(a, b)| q.site.is_none_or(|id| a.id == id || b.id == id))
            .flat_map(|(a, b)| {
                let live = &live;
                a.links
                    .iter()
                    .flat_map(move |la| b.links.iter().map(move |lb| path(a, la, b, lb, live, now)))
            })
            .filter(|p| p.state == st.state())
            .collect();
        let total = all.len() as i64;
        let items = all
            .into_iter()
            .skip(paging.offset as usize)
            .take(paging.limit as usize)
            .collect();
        return Ok(Json(Page::new(items, total, paging)));
    }
    // Otherwise the page is found from each site's link count, and only its own sites are
    // read: a page costs what it holds, not what the network holds.
    let active = crate::store::sites::active_link_counts(&mut snapshot).await?;
    let pairs = || {
        connected_pair_counts(&t, &active)
            .filter(|(a, b)| q.site.is_none_or(|id| a.0 == id || b.0 == id))
    };
    let total: i64 = match (t.mode, q.site) {
        // A full mesh counted without walking it: every pair of links of different sites.
        (crate::routes::topology::Mode::FullMesh, None) => {
            let (sum, squares) = active
                .iter()
                .fold((0i64, 0i64), |(s, q), (_, n)| (s + n, q + n * n));
            (sum * sum - squares) / 2
        }
        _ => pairs().map(|(a, b)| a.1 * b.1).sum(),
    };
    // The pairs the page takes paths from, and how many of the first one's paths to skip.
    let mut skip = paging.offset;
    let mut wanted = Vec::new();
    let mut room = paging.limit;
    for (a, b) in pairs() {
        let n = a.1 * b.1;
        if wanted.is_empty() && skip >= n {
            skip -= n;
            continue;
        }
        if room <= 0 {
            break;
        }
        // Only the first pair starts part-way (at `skip`).
        room -= n - if wanted.is_empty() { skip } else { 0 };
        wanted.push((a.0, b.0));
    }
    let mut ids: Vec<i64> = wanted.iter().flat_map(|(a, b)| [*a, *b]).collect();
    ids.sort_unstable();
    ids.dedup();
    let sites = crate::store::sites::load_sites_by_ids(&mut snapshot, &ids).await?;
    let site = |id: i64| sites.iter().find(|s| s.id == id);
    let mut items = Vec::new();
    'pairs: for (a, b) in &wanted {
        let (Some(a), Some(b)) = (site(*a), site(*b)) else {
            continue;
        };
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
    responses((status = 200, body = PathView))
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
    // One read transaction: the topology and the sites from the same snapshot.
    let mut snapshot = s.store.snapshot().await?;
    let t = load(&mut snapshot).await?;
    // The two links' sites only.
    let mut ids: Vec<i64> = crate::store::sites::link_sites(&mut snapshot, &[x, y])
        .await?
        .into_iter()
        .map(|(_, site)| site)
        .collect();
    ids.sort_unstable();
    ids.dedup();
    let sites = crate::store::sites::load_sites_by_ids(&mut snapshot, &ids).await?;
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
    let kept = history::kept(&mut *s.store.conn().await?, id).await?;
    if kept || current_path(s, id).await?.is_some() {
        Ok(())
    } else {
        Err(ApiError::not_found(format!("path {id}")))
    }
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct MetricsQuery {
    /// Items per page, 1 to 500; 50 when left out.
    #[param(minimum = 1, maximum = 500)]
    pub limit: Option<i64>,
    /// Items to skip; 0 when left out.
    #[param(minimum = 0, maximum = 9007199254740991.0)]
    pub offset: Option<i64>,
    /// Unix seconds, inclusive.
    pub since: Option<i64>,
    /// Unix seconds, exclusive.
    pub until: Option<i64>,
    /// Seconds per bucket (5 to 86400): each reporting site's samples in a bucket summed up
    /// into one. Without it, every kept sample.
    pub resolution: Option<i64>,
}

#[utoipa::path(
    get,
    path = "/api/v1/paths/{id}/metrics",
    tag = "paths",
    summary = "A path's measurements as its edges reported them, oldest first.",
    description = "Every report updates the path's live state (`GET /paths/{id}`); the history \
        keeps a report when the state changed or RTT, jitter or loss moved beyond a deadband \
        (RTT 2 ms and 10 %, jitter 1 ms and 25 %, loss 0.5 points), and once a minute \
        otherwise, for 7 days.",
    params(("id" = String, Path, description = "The two link ids, lower first: 3-7"), MetricsQuery),
    security(("bearer" = ["viewer"])),
    responses((status = 200, body = Page<PathSample>))
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
        let (items, total) = history::samples(
            &mut *s.store.conn().await?,
            &id,
            (since, until),
            Some(res),
            (paging.limit, paging.offset),
        )
        .await?;
        return Ok(Json(Page::new(items, total, paging)));
    }
    let (items, total) = history::samples(
        &mut *s.store.conn().await?,
        &id,
        (since, until),
        None,
        (paging.limit, paging.offset),
    )
    .await?;
    Ok(Json(Page::new(items, total, paging)))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PathEventQuery {
    /// Items per page, 1 to 500; 50 when left out.
    #[param(minimum = 1, maximum = 500)]
    pub limit: Option<i64>,
    /// Items to skip; 0 when left out.
    #[param(minimum = 0, maximum = 9007199254740991.0)]
    pub offset: Option<i64>,
    /// Unix milliseconds, inclusive.
    pub since_ms: Option<i64>,
    /// Unix milliseconds, exclusive.
    pub until_ms: Option<i64>,
    /// Only this kind.
    #[param(inline)]
    pub kind: Option<PathEventKind>,
}

#[utoipa::path(
    get,
    path = "/api/v1/paths/{id}/events",
    tag = "paths",
    summary = "A path's changes of state (down, up, SLA broken or met again) as its edges saw \
               them, to the millisecond, oldest first.",
    params(("id" = String, Path, description = "The two link ids, lower first: 3-7"), PathEventQuery),
    security(("bearer" = ["viewer"])),
    responses((status = 200, body = Page<PathEventView>))
)]
async fn path_events(
    State(s): State<AppState>,
    _p: Principal,
    extract::Path(id): extract::Path<String>,
    extract::Query(q): extract::Query<PathEventQuery>,
) -> Result<Json<Page<PathEventView>>, ApiError> {
    let paging = Paging::new(q.limit, q.offset)?;
    known_path(&s, &id).await?;
    let (since, until) = (q.since_ms.unwrap_or(0), q.until_ms.unwrap_or(i64::MAX));
    let (items, total) = history::events(
        &mut *s.store.conn().await?,
        &id,
        (since, until),
        q.kind,
        (paging.limit, paging.offset),
    )
    .await?;
    Ok(Json(Page::new(items, total, paging)))
}
