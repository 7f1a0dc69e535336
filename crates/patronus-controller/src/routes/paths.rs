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
use sqlx::Row;

use crate::app::{AppState, Principal};
use crate::error::{ApiError, extract};
use crate::routes::sites::{SiteView, load_sites};
use crate::routes::topology::{connected, connected_pairs, load, path_id};
use crate::routes::{Page, Paging};

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
    let mut snapshot = s.store.pool().begin().await?;
    let t = load(&mut snapshot).await?;
    let sites = load_sites(&mut snapshot).await?;
    let live = s.live_paths();
    let now = crate::store::now_s();
    let pairs: Vec<_> = connected_pairs(&t, &sites)
        .into_iter()
        .filter(|(a, b)| q.site.is_none_or(|id| a.id == id || b.id == id))
        .collect();
    if let Some(st) = q.state {
        // Filtered by state: every path is looked at.
        let all: Vec<PathView> = pairs
            .iter()
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
    let mut snapshot = s.store.pool().begin().await?;
    let t = load(&mut snapshot).await?;
    let sites = load_sites(&mut snapshot).await?;
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
    pub state: PathState,
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
                state: r
                    .try_get::<&str, _>("state")?
                    .parse()
                    .map_err(ApiError::internal)?,
                rtt_ms: r.try_get("rtt_ms")?,
                jitter_ms: r.try_get("jitter_ms")?,
                loss_pct: r.try_get("loss_pct")?,
                samples: None,
                rtt_ms_max: None,
            })
        })
        .collect::<Result<Vec<_>, ApiError>>()?;
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
                state: [PathState::Up, PathState::Degraded, PathState::Down]
                    [worst.clamp(0, 2) as usize],
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
    pub kind: PathEventKind,
    pub class: Option<String>,
    /// The event as the edge reported it.
    pub detail: patronus_api::PathEvent,
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
    let filter =
        "e.path_id = ?1 AND e.at_ms >= ?2 AND e.at_ms < ?3 AND (?4 IS NULL OR e.kind = ?4)";
    let total: i64 = sqlx::query_scalar(&format!(
        "SELECT COUNT(*) FROM path_events e WHERE {filter}"
    ))
    .bind(&id)
    .bind(since)
    .bind(until)
    .bind(q.kind.map(PathEventKind::as_str))
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
    .bind(q.kind.map(PathEventKind::as_str))
    .bind(paging.limit)
    .bind(paging.offset)
    .fetch_all(s.store.pool())
    .await?;
    let items = rows
        .iter()
        .map(|r| {
            let detail: patronus_api::PathEvent =
                serde_json::from_str(r.try_get::<&str, _>("detail")?)
                    .map_err(ApiError::internal)?;
            Ok(PathEventView {
                id: r.try_get("id")?,
                site_id: r.try_get("site_id")?,
                site: r.try_get("site")?,
                at_ms: r.try_get("at_ms")?,
                kind: detail.kind,
                class: r.try_get("class")?,
                detail,
            })
        })
        .collect::<Result<Vec<_>, ApiError>>()?;
    Ok(Json(Page::new(items, total, paging)))
}
