//! `/api/v1/audit`: every write, who made it, when, and from where. Admins only.

use axum::Json;
use axum::extract::State;
use serde::Deserialize;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::app::{Admin, AppState};
use crate::error::{ApiError, extract};
use crate::routes::{Page, Paging};
use crate::store::{AuditQuery, AuditRow};

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(list_audit))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Items per page, 1 to 500; 50 when left out.
    #[param(minimum = 1, maximum = 500)]
    pub limit: Option<i64>,
    /// Items to skip; 0 when left out.
    #[param(minimum = 0, maximum = 9007199254740991.0)]
    pub offset: Option<i64>,
    /// The actor's email (or `cli`, `bootstrap`).
    pub actor: Option<String>,
    /// `user.create`, `user.update`, ...
    pub action: Option<String>,
    /// Unix milliseconds, inclusive.
    pub since: Option<i64>,
    /// Unix milliseconds, exclusive.
    pub until: Option<i64>,
    /// `asc` for oldest first; newest first by default.
    pub order: Option<String>,
}

#[utoipa::path(
    get,
    path = "/api/v1/audit",
    tag = "audit",
    summary = "Read the audit log, newest first.",
    params(ListQuery),
    security(("bearer" = ["admin"])),
    responses((status = 200, body = Page<AuditRow>))
)]
async fn list_audit(
    State(s): State<AppState>,
    Admin(_p): Admin,
    extract::Query(q): extract::Query<ListQuery>,
) -> Result<Json<Page<AuditRow>>, ApiError> {
    let paging = Paging::new(q.limit, q.offset)?;
    let oldest_first = match q.order.as_deref() {
        None | Some("desc") => false,
        Some("asc") => true,
        Some(_) => return Err(ApiError::field("order", "must be asc or desc")),
    };
    let (items, total) = s
        .store
        .audit_log(&AuditQuery {
            actor: q.actor,
            action: q.action,
            since_ms: q.since,
            until_ms: q.until,
            oldest_first,
            limit: paging.limit,
            offset: paging.offset,
        })
        .await?;
    Ok(Json(Page::new(items, total, paging)))
}
