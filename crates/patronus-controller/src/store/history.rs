//! Paths' history: the measurements their edges reported and their changes of state, read a
//! page at a time (the writes are the edges' telemetry, `routes::edge::telemetry`).

use patronus_api::{FailoverReason, PathEventKind, PathState};
use serde::Serialize;

use super::Conn;
#[allow(unused_imports)]
use super::db::{Row, query, query_as, query_scalar};
use crate::error::ApiError;

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
    /// With `resolution`: the kept samples the bucket sums up (RTT, jitter and loss are their
    /// means, the RTT's worst is `rtt_ms_max`, and `state` the worst state among them). A
    /// sample is kept when it differs from the last one kept beyond a deadband, and once a
    /// minute otherwise (see the controller's `sampling` module).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub samples: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rtt_ms_max: Option<f64>,
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

/// Whether path `id` has any history (samples or events) kept.
pub async fn kept(conn: &mut Conn, id: &str) -> Result<bool, sqlx::Error> {
    query_scalar(
        "SELECT EXISTS (SELECT 1 FROM path_samples WHERE path_id = ?1)
             OR EXISTS (SELECT 1 FROM path_events WHERE path_id = ?1)",
    )
    .bind(id)
    .fetch_one(&mut *conn)
    .await
}

/// A page (`limit`, `offset`) of path `id`'s samples in `[since, until)` (unix seconds),
/// oldest first, and how many there are: every report, or with `resolution` each reporting
/// site's reports summed up per that many seconds.
pub async fn samples(
    conn: &mut Conn,
    id: &str,
    (since, until): (i64, i64),
    resolution: Option<i64>,
    (limit, offset): (i64, i64),
) -> Result<(Vec<PathSample>, i64), ApiError> {
    if let Some(res) = resolution {
        return bucketed(conn, id, (since, until), res, (limit, offset)).await;
    }
    let total: i64 = query_scalar(
        "SELECT COUNT(*) FROM path_samples WHERE path_id = ? AND at_s >= ? AND at_s < ?",
    )
    .bind(id)
    .bind(since)
    .bind(until)
    .fetch_one(&mut *conn)
    .await?;
    let rows = query(
        "SELECT at_s, site_id, state, rtt_ms, jitter_ms, loss_pct FROM path_samples
         WHERE path_id = ? AND at_s >= ? AND at_s < ? ORDER BY id LIMIT ? OFFSET ?",
    )
    .bind(id)
    .bind(since)
    .bind(until)
    .bind(limit)
    .bind(offset)
    .fetch_all(&mut *conn)
    .await?;
    let items = rows
        .iter()
        .map(|r| {
            Ok(PathSample {
                at: r.try_get("at_s")?,
                site_id: r.try_get("site_id")?,
                state: r
                    .try_get::<String, _>("state")?
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
    Ok((items, total))
}

/// A path's samples summed up per `res` seconds and reporting site.
async fn bucketed(
    conn: &mut Conn,
    id: &str,
    (since, until): (i64, i64),
    res: i64,
    (limit, offset): (i64, i64),
) -> Result<(Vec<PathSample>, i64), ApiError> {
    let grouped = "SELECT (at_s / ?1) * ?1 AS bucket, site_id, COUNT(*) AS n,
                AVG(rtt_ms) AS rtt, MAX(rtt_ms) AS rtt_max, AVG(jitter_ms) AS jitter,
                AVG(loss_pct) AS loss,
                CAST(MAX(CASE state WHEN 'down' THEN 2 WHEN 'degraded' THEN 1 ELSE 0 END) AS BIGINT)
                  AS worst
         FROM path_samples WHERE path_id = ?2 AND at_s >= ?3 AND at_s < ?4
         GROUP BY bucket, site_id";
    let total: i64 = query_scalar(&format!("SELECT COUNT(*) FROM ({grouped}) AS g"))
        .bind(res)
        .bind(id)
        .bind(since)
        .bind(until)
        .fetch_one(&mut *conn)
        .await?;
    let rows = query(&format!(
        "{grouped} ORDER BY bucket, site_id LIMIT ?5 OFFSET ?6"
    ))
    .bind(res)
    .bind(id)
    .bind(since)
    .bind(until)
    .bind(limit)
    .bind(offset)
    .fetch_all(&mut *conn)
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
    Ok((items, total))
}

/// A page of path `id`'s events in `[since, until)` (unix ms), of `kind` if given, oldest
/// first, and how many there are.
pub async fn events(
    conn: &mut Conn,
    id: &str,
    (since, until): (i64, i64),
    kind: Option<PathEventKind>,
    (limit, offset): (i64, i64),
) -> Result<(Vec<PathEventView>, i64), ApiError> {
    let filter =
        "e.path_id = ?1 AND e.at_ms >= ?2 AND e.at_ms < ?3 AND (?4 IS NULL OR e.kind = ?4)";
    let total: i64 = query_scalar(&format!(
        "SELECT COUNT(*) FROM path_events e WHERE {filter}"
    ))
    .bind(id)
    .bind(since)
    .bind(until)
    .bind(kind.map(PathEventKind::as_str))
    .fetch_one(&mut *conn)
    .await?;
    let rows = query(&format!(
        "SELECT e.id, e.site_id, s.name AS site, e.at_ms, e.kind, e.class, e.detail
         FROM path_events e JOIN sites s ON s.id = e.site_id WHERE {filter}
         ORDER BY e.at_ms, e.id LIMIT ?5 OFFSET ?6"
    ))
    .bind(id)
    .bind(since)
    .bind(until)
    .bind(kind.map(PathEventKind::as_str))
    .bind(limit)
    .bind(offset)
    .fetch_all(&mut *conn)
    .await?;
    let items = rows
        .iter()
        .map(|r| {
            let detail: patronus_api::PathEvent =
                serde_json::from_str(r.str("detail")?).map_err(ApiError::internal)?;
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
    Ok((items, total))
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
    pub reason: FailoverReason,
    pub flows: i64,
}

/// A page of the failovers edges reported (of site `site`, for `reason`, if given) in
/// `[since, until)` (unix ms), newest first, and how many there are.
pub async fn failovers(
    conn: &mut Conn,
    (site, reason): (Option<i64>, Option<FailoverReason>),
    (since, until): (i64, i64),
    (limit, offset): (i64, i64),
) -> Result<(Vec<FailoverView>, i64), ApiError> {
    // Only the filters given are written: `(? IS NULL OR e.site_id = ?)` would keep the
    // planner off the site's index, and a site's page would walk every failover in time order.
    let mut conds = vec!["e.at_ms >= ?", "e.at_ms < ?"];
    if site.is_some() {
        conds.push("e.site_id = ?");
    }
    if reason.is_some() {
        conds.push("e.reason = ?");
    }
    let filter = format!(" WHERE {}", conds.join(" AND "));
    macro_rules! bind_filter {
        ($q:expr) => {{
            let mut q = $q.bind(since).bind(until);
            if let Some(site) = site {
                q = q.bind(site);
            }
            if let Some(reason) = reason {
                q = q.bind(reason.as_str());
            }
            q
        }};
    }
    let count = format!("SELECT COUNT(*) FROM failover_events e{filter}");
    let total: i64 = bind_filter!(query_scalar(&count))
        .fetch_one(&mut *conn)
        .await?;
    let sql = format!(
        "SELECT e.*, s.name AS site FROM failover_events e JOIN sites s ON s.id = e.site_id{filter}
         ORDER BY e.at_ms DESC, e.id DESC LIMIT ? OFFSET ?"
    );
    let rows = bind_filter!(query(&sql))
        .bind(limit)
        .bind(offset)
        .fetch_all(&mut *conn)
        .await?;
    let items = rows
        .iter()
        .map(|r| {
            let e: patronus_api::FailoverEvent =
                serde_json::from_str(r.str("detail")?).map_err(ApiError::internal)?;
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
                reason: e.reason,
                flows: r.try_get("flows")?,
            })
        })
        .collect::<Result<Vec<_>, ApiError>>()?;
    Ok((items, total))
}
