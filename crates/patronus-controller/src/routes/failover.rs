//! `/api/v1/failover`: the failover settings every edge runs with (the very
//! [`FailoverSettings`] the edges receive, admins only), and `/api/v1/failover/events`, the
//! failovers the edges reported.

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use patronus_api::{FailoverReason, FailoverSettings};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sqlx::Row;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use sqlx::sqlite::SqliteConnection;

use crate::app::{Admin, AppState, Principal};
use crate::error::{ApiError, extract};
use crate::routes::{Page, Paging, audit_config, check_if_match, patched, with_etag};
use crate::store::now_s;

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(show_failover, update_failover))
        .routes(routes!(failover_events))
}

// ----- failover settings -----

pub async fn failover(conn: &mut SqliteConnection) -> Result<(FailoverSettings, i64), ApiError> {
    let r = sqlx::query("SELECT value, version FROM settings WHERE key = 'failover'")
        .fetch_optional(&mut *conn)
        .await?;
    match r {
        Some(r) => {
            let v: String = r.try_get("value")?;
            Ok((
                serde_json::from_str(&v).map_err(ApiError::internal)?,
                r.try_get("version")?,
            ))
        }
        None => Ok((FailoverSettings::default(), 0)),
    }
}

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
    let r = sqlx::query(
        "INSERT INTO settings (key, value, version, updated_at) VALUES ('failover', ?, 1, ?)
         ON CONFLICT (key) DO UPDATE SET value = excluded.value, version = version + 1,
         updated_at = excluded.updated_at WHERE version = ?",
    )
    .bind(serde_json::to_string(&new).map_err(ApiError::internal)?)
    .bind(now_s())
    .bind(version)
    .execute(&mut *tx)
    .await?;
    if r.rows_affected() == 0 {
        return Err(ApiError::precondition_failed(
            "the settings changed while this update ran; read them again",
        ));
    }
    audit_config(&mut tx, &p.actor(), "failover.update", "failover", patch).await?;
    let (f, version) = failover(&mut tx).await?;
    tx.commit().await?;
    Ok(with_etag(StatusCode::OK, version, f))
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
    let filter = " WHERE (? IS NULL OR e.site_id = ?) AND (? IS NULL OR e.reason = ?)
                   AND e.at_ms >= ? AND e.at_ms < ?";
    let (since, until) = (q.since.unwrap_or(0), q.until.unwrap_or(i64::MAX));
    let count = format!("SELECT COUNT(*) FROM failover_events e{filter}");
    let total: i64 = sqlx::query_scalar(&count)
        .bind(q.site)
        .bind(q.site)
        .bind(q.reason.map(FailoverReason::as_str))
        .bind(q.reason.map(FailoverReason::as_str))
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
        .bind(q.reason.map(FailoverReason::as_str))
        .bind(q.reason.map(FailoverReason::as_str))
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
                reason: e.reason,
                flows: r.try_get("flows")?,
            })
        })
        .collect::<Result<Vec<_>, ApiError>>()?;
    Ok(Json(Page::new(items, total, paging)))
}
