//! `/api/v1/traffic/stats`: what the edges sent and received, per SLA class, per path or per
//! site, in time buckets. The edges report running totals; the controller keeps what changed
//! between two reports (see `edge::telemetry::record_traffic`), so a bucket holds what was sent in it,
//! to the resolution of the reports (5 s).

use axum::Json;
use axum::extract::State;
use serde::Deserialize;
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

pub use crate::store::telemetry::TrafficBucket;

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
    let (items, total) = crate::store::telemetry::traffic(
        &mut *s.store.conn().await?,
        by,
        (bucket, from, to),
        (q.site, q.path.as_deref(), q.class.as_deref()),
        (paging.limit, paging.offset),
    )
    .await?;
    Ok(Json(Page::new(items, total, paging)))
}
