//! `/api/v1/traffic/stats`: what the edges sent and received, per SLA class, per path or per
//! site, in time buckets. The edges report running totals; the controller keeps what changed
//! between two reports (see `edge::telemetry::record_traffic`), so a bucket holds what was sent in it,
//! to the resolution of the reports (5 s).

use axum::Json;
use axum::extract::State;
use serde::{Deserialize, Serialize};
use sqlx::Row;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::app::{AppState, Principal};
use crate::error::{ApiError, extract};
use crate::routes::{Page, Paging};
use crate::store::now_s;

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(traffic_stats))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct StatsQuery {
    /// Items per page, 1 to 500; 50 when left out.
    #[param(minimum = 1, maximum = 500)]
    pub limit: Option<i64>,
    /// Items to skip; 0 when left out.
    #[param(minimum = 0, maximum = 9007199254740991.0)]
    pub offset: Option<i64>,
    /// `class` (default: what each SLA class's traffic sent, per site), `path` (each path's
    /// traffic as the site at one end sent and received it) or `site` (all of a site's paths).
    pub by: Option<String>,
    /// Only this site (id).
    pub site: Option<i64>,
    /// Only this path (id, as in `/paths`); implies `by=path`.
    pub path: Option<String>,
    /// Only this SLA class (name); implies `by=class`.
    pub class: Option<String>,
    /// Unix seconds; an hour before `to` when left out.
    pub from: Option<i64>,
    /// Unix seconds, excluded; now when left out.
    pub to: Option<i64>,
    /// Seconds per bucket, 5 to 86400; 60 when left out.
    pub bucket: Option<i64>,
}

/// What was sent (and, for paths and sites, received) in one bucket.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TrafficBucket {
    /// Unix seconds at which the bucket starts.
    pub start: i64,
    pub site_id: i64,
    pub site: String,
    /// With `by=path`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path_id: Option<String>,
    /// With `by=class`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub class: Option<String>,
    /// Sums over the bucket, summed as floating point so that no report can make them
    /// overflow: exact up to 2^53 (9 PB) per bucket, and never more than 2^64 - 1.
    pub tx_packets: u64,
    pub tx_bytes: u64,
    /// Not measured per class: `null` there.
    pub rx_packets: Option<u64>,
    pub rx_bytes: Option<u64>,
}

#[utoipa::path(
    get,
    path = "/api/v1/traffic/stats",
    tag = "paths",
    summary = "Traffic the edges reported, per SLA class, path or site, in time buckets.",
    params(StatsQuery),
    security(("bearer" = ["viewer"])),
    responses((status = 200, body = Page<TrafficBucket>))
)]
async fn traffic_stats(
    State(s): State<AppState>,
    _p: Principal,
    extract::Query(q): extract::Query<StatsQuery>,
) -> Result<Json<Page<TrafficBucket>>, ApiError> {
    let paging = Paging::new(q.limit, q.offset)?;
    let by = match (q.by.as_deref(), &q.path, &q.class) {
        (_, Some(_), Some(_)) => {
            return Err(ApiError::field("path", "give path or class, not both"));
        }
        (None | Some("path"), Some(_), None) => "path",
        (None | Some("class"), None, Some(_)) => "class",
        (None, None, None) => "class",
        (Some(b @ ("class" | "path" | "site")), None, None) => b,
        (Some(_), _, _) => {
            return Err(ApiError::field(
                "by",
                "must be class, path or site (and agree with path or class)",
            ));
        }
    };
    let bucket = q.bucket.unwrap_or(60);
    let to = q.to.unwrap_or_else(|| now_s() + 1);
    let from = q.from.unwrap_or(to.saturating_sub(3600));
    let mut e = patronus_api::FieldErrors::default();
    if !(5..=86_400).contains(&bucket) {
        e.push("bucket", "must be between 5 and 86400 seconds");
    }
    if from >= to {
        e.push("from", "must be before to");
    } else if bucket > 0 && to.saturating_sub(from) / bucket > 100_000 {
        e.push(
            "bucket",
            "makes more than 100000 buckets: widen it or narrow the range",
        );
    }
    e.into_result().map_err(ApiError::validation)?;
    let (key, kind) = match by {
        "class" => ("t.class", "t.class IS NOT NULL"),
        "path" => ("t.path_id", "t.path_id IS NOT NULL"),
        _ => ("NULL", "t.path_id IS NOT NULL"),
    };
    let grouped = format!(
        "SELECT (t.at_s / ?1) * ?1 AS start, t.site_id, s.name AS site, {key} AS k,
                TOTAL(t.tx_packets) AS tx_packets, TOTAL(t.tx_bytes) AS tx_bytes,
                TOTAL(t.rx_packets) AS rx_packets, TOTAL(t.rx_bytes) AS rx_bytes
         FROM traffic_samples t JOIN sites s ON s.id = t.site_id
         WHERE t.at_s >= ?2 AND t.at_s < ?3 AND {kind}
           AND (?4 IS NULL OR t.site_id = ?4)
           AND (?5 IS NULL OR t.path_id = ?5)
           AND (?6 IS NULL OR t.class = ?6)
         GROUP BY start, t.site_id, k"
    );
    let total: i64 = sqlx::query_scalar(&format!("SELECT COUNT(*) FROM ({grouped})"))
        .bind(bucket)
        .bind(from)
        .bind(to)
        .bind(q.site)
        .bind(&q.path)
        .bind(&q.class)
        .fetch_one(s.store.pool())
        .await?;
    let rows = sqlx::query(&format!(
        "{grouped} ORDER BY start, t.site_id, k LIMIT ?7 OFFSET ?8"
    ))
    .bind(bucket)
    .bind(from)
    .bind(to)
    .bind(q.site)
    .bind(&q.path)
    .bind(&q.class)
    .bind(paging.limit)
    .bind(paging.offset)
    .fetch_all(s.store.pool())
    .await?;
    let items = rows
        .iter()
        .map(|r| {
            let k: Option<String> = r.try_get("k")?;
            let per_class = by == "class";
            Ok(TrafficBucket {
                start: r.try_get("start")?,
                site_id: r.try_get("site_id")?,
                site: r.try_get("site")?,
                path_id: if by == "path" { k.clone() } else { None },
                class: if per_class { k } else { None },
                tx_packets: sum(r, "tx_packets")?,
                tx_bytes: sum(r, "tx_bytes")?,
                rx_packets: (!per_class).then(|| sum(r, "rx_packets")).transpose()?,
                rx_bytes: (!per_class).then(|| sum(r, "rx_bytes")).transpose()?,
            })
        })
        .collect::<Result<Vec<_>, ApiError>>()?;
    Ok(Json(Page::new(items, total, paging)))
}

/// A `TOTAL()` column as a count: a float sum (SQLite's `SUM` of integers fails on overflow),
/// rounded, never negative, saturating at `u64::MAX`.
fn sum(r: &sqlx::sqlite::SqliteRow, column: &str) -> Result<u64, sqlx::Error> {
    let v: f64 = r.try_get(column)?;
    // `as` from f64 saturates (and maps NaN to 0).
    Ok(v.round().max(0.0) as u64)
}
