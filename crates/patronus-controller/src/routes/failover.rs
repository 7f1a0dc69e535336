//! `/api/v1/failover`: the failover settings every edge runs with (the very
//! [`FailoverSettings`] the edges receive, admins only), and `/api/v1/failover/events`, the
//! failovers the edges reported.

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use patronus_api::{FailoverReason, FailoverSettings};
use serde::Deserialize;
use serde_json::Value;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::app::{Admin, AppState, Principal};
use crate::error::{ApiError, extract};
use crate::routes::{
    Page, Paging, audit_settings, check_if_match, patched, with_etag, write_error,
};
use crate::store::now_s;

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(show_failover, update_failover))
        .routes(routes!(failover_events))
}

// ----- failover settings -----

pub use crate::store::settings::failover;

#[utoipa::path(
    get,
    path = "/api/v1/failover",
    tag = "failover",
    summary = "Read the failover settings.",
    security(("bearer" = ["viewer"])),
    responses((status = 200, body = FailoverSettings))
)]
async fn show_failover(State(s): State<AppState>, _p: Principal) -> Result<Response, ApiError> {
    let (f, version) = failover(&mut *s.store.conn().await?).await?;
    Ok(with_etag(StatusCode::OK, version, f))
}

#[utoipa::path(
    patch,
    path = "/api/v1/failover",
    tag = "failover",
    summary = "Change the failover settings (JSON merge patch; If-Match).",
    request_body(content = serde_json::Value, description = "A JSON merge patch (RFC 7386) of the object"),
    security(("bearer" = ["admin"])),
    responses((status = 200, body = FailoverSettings))
)]
async fn update_failover(
    State(s): State<AppState>,
    Admin(p): Admin,
    headers: HeaderMap,
    extract::Json(patch): extract::Json<Value>,
) -> Result<Response, ApiError> {
    // Settings are the admins' (operators write network objects).
    let mut tx = s.store.begin().await?;
    let (cur, version) = failover(&mut tx).await?;
    check_if_match(&headers, version)?;
    let new: FailoverSettings = patched(&cur, &patch)?;
    new.validate().map_err(ApiError::validation)?;
    crate::store::settings::set_failover(&mut tx, &new, version, now_s())
        .await
        .map_err(|e| write_error(e, "settings", String::new))?;
    audit_settings(&mut tx, &p.actor(), "failover.update", "failover", patch).await?;
    let (f, version) = failover(&mut tx).await?;
    tx.commit().await?;
    Ok(with_etag(StatusCode::OK, version, f))
}

pub use crate::store::history::FailoverView;

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct FailoverQuery {
    /// Items per page, 1 to 500; 50 when left out.
    #[param(minimum = 1, maximum = 500)]
    pub limit: Option<i64>,
    /// Items to skip; 0 when left out.
    #[param(minimum = 0, maximum = 9007199254740991.0)]
    pub offset: Option<i64>,
    /// Events reported by this site's edge (id).
    pub site: Option<i64>,
    /// Only this reason.
    #[param(inline)]
    pub reason: Option<FailoverReason>,
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
    responses((status = 200, body = Page<FailoverView>))
)]
async fn failover_events(
    State(s): State<AppState>,
    _p: Principal,
    extract::Query(q): extract::Query<FailoverQuery>,
) -> Result<Json<Page<FailoverView>>, ApiError> {
    let paging = Paging::new(q.limit, q.offset)?;
    let (since, until) = (q.since.unwrap_or(0), q.until.unwrap_or(i64::MAX));
    let (items, total) = crate::store::history::failovers(
        &mut *s.store.conn().await?,
        (q.site, q.reason),
        (since, until),
        (paging.limit, paging.offset),
    )
    .await?;
    Ok(Json(Page::new(items, total, paging)))
}
