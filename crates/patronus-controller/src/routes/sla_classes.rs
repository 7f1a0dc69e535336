//! `/api/v1/sla-classes`: what each class of traffic needs, stored as the very [`SlaClass`] the
//! edges receive, with its own `validate()`.
//!
//! The four built-in classes (`realtime`, `interactive`, `business`, `bulk`) exist from the first
//! start and can be edited, not deleted. A class that a policy uses can be neither deleted nor
//! renamed (409 naming the policy).

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use patronus_api::SlaClass;
use serde_json::{Value, json};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use sqlx::sqlite::SqliteConnection;

use crate::app::{AppState, Operator, Principal};
use crate::error::{ApiError, extract};
use crate::routes::{
    Doc, Page, Paging, audit_config, check_if_match, created, doc, inserted, num, page, patched,
    sort_by, updated, with_etag,
};
use crate::store::{Store, now_s};

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_classes, create_class))
        .routes(routes!(show_class, update_class, remove_class))
}

pub async fn all_classes(conn: &mut SqliteConnection) -> Result<Vec<Doc<SlaClass>>, ApiError> {
    sqlx::query("SELECT * FROM sla_classes ORDER BY id")
        .fetch_all(&mut *conn)
        .await?
        .iter()
        .map(doc)
        .collect()
}

#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Items per page, 1 to 500; 50 when left out.
    #[param(minimum = 1, maximum = 500)]
    pub limit: Option<i64>,
    /// Items to skip; 0 when left out.
    #[param(minimum = 0, maximum = 9007199254740991.0)]
    pub offset: Option<i64>,
    /// `id` (default) or `name`; `-` in front for descending.
    pub sort: Option<String>,
}

#[utoipa::path(
    get,
    path = "/api/v1/sla-classes",
    tag = "sla-classes",
    summary = "List SLA classes.",
    params(ListQuery),
    security(("bearer" = ["viewer"])),
    responses((status = 200, body = Page<Doc<SlaClass>>))
)]
async fn list_classes(
    State(s): State<AppState>,
    _p: Principal,
    extract::Query(q): extract::Query<ListQuery>,
) -> Result<Json<Page<Doc<SlaClass>>>, ApiError> {
    let paging = Paging::new(q.limit, q.offset)?;
    let mut items = all_classes(&mut *s.store.conn().await?).await?;
    sort_by(
        &mut items,
        q.sort.as_deref(),
        &[("id", |c| num(c.id)), ("name", |c| c.spec.name.to_string())],
    )?;
    Ok(Json(page(items, paging)))
}

async fn load_class(conn: &mut SqliteConnection, id: i64) -> Result<Doc<SlaClass>, ApiError> {
    let r = sqlx::query("SELECT * FROM sla_classes WHERE id = ?")
        .bind(id)
        .fetch_optional(&mut *conn)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("SLA class {id}")))?;
    doc(&r)
}

#[utoipa::path(
    get,
    path = "/api/v1/sla-classes/{id}",
    tag = "sla-classes",
    summary = "Read an SLA class.",
    params(("id" = i64, Path, description = "The object's id")),
    security(("bearer" = ["viewer"])),
    responses((status = 200, body = Doc<SlaClass>))
)]
async fn show_class(
    State(s): State<AppState>,
    _p: Principal,
    extract::Path(id): extract::Path<i64>,
) -> Result<Response, ApiError> {
    let c = load_class(&mut *s.store.conn().await?, id).await?;
    Ok(with_etag(StatusCode::OK, c.version, c))
}

#[utoipa::path(
    post,
    path = "/api/v1/sla-classes",
    tag = "sla-classes",
    summary = "Create an SLA class.",
    request_body = SlaClass,
    security(("bearer" = ["operator"])),
    responses((status = 201, body = Doc<SlaClass>), crate::error::Conflict)
)]
async fn create_class(
    State(s): State<AppState>,
    Operator(p): Operator,
    extract::Json(class): extract::Json<SlaClass>,
) -> Result<Response, ApiError> {
    class.validate().map_err(ApiError::validation)?;
    let now = now_s();
    let mut tx = s.store.begin().await?;
    let r = sqlx::query(
        "INSERT INTO sla_classes (name, spec, builtin, created_at, updated_at) VALUES (?, ?, 0, ?, ?)",
    )
    .bind(class.name.as_str())
    .bind(serde_json::to_string(&class).map_err(ApiError::internal)?)
    .bind(now)
    .bind(now)
    .execute(&mut *tx)
    .await;
    let id = inserted(r, || format!("an SLA class named {} exists", class.name))?;
    audit_config(
        &mut tx,
        &p.actor(),
        "sla_class.create",
        &format!("sla-class/{id}"),
        serde_json::to_value(&class).unwrap_or_default(),
    )
    .await?;
    let c = load_class(&mut tx, id).await?;
    tx.commit().await?;
    Ok(created(format!("/api/v1/sla-classes/{id}"), c.version, c))
}

/// The enabled or disabled policies that use class `name`.
async fn users_of_class(conn: &mut SqliteConnection, name: &str) -> Result<Vec<String>, ApiError> {
    Ok(crate::routes::policies::all_policies(&mut *conn)
        .await?
        .into_iter()
        .filter(|p| p.spec.class.as_str() == name)
        .map(|p| p.spec.name.to_string())
        .collect())
}

#[utoipa::path(
    patch,
    path = "/api/v1/sla-classes/{id}",
    tag = "sla-classes",
    summary = "Change an SLA class (JSON merge patch; If-Match).",
    params(("id" = i64, Path, description = "The object's id")),
    request_body(content = serde_json::Value, description = "A JSON merge patch (RFC 7386) of the object"),
    security(("bearer" = ["operator"])),
    responses((status = 200, body = Doc<SlaClass>), crate::error::Conflict)
)]
async fn update_class(
    State(s): State<AppState>,
    Operator(p): Operator,
    extract::Path(id): extract::Path<i64>,
    headers: HeaderMap,
    extract::Json(patch): extract::Json<Value>,
) -> Result<Response, ApiError> {
    let mut tx = s.store.begin().await?;
    let cur = load_class(&mut tx, id).await?;
    check_if_match(&headers, cur.version)?;
    let class: SlaClass = patched(&cur.spec, &patch)?;
    class.validate().map_err(ApiError::validation)?;
    if class.name != cur.spec.name {
        let users = users_of_class(&mut tx, cur.spec.name.as_str()).await?;
        if !users.is_empty() {
            return Err(ApiError::conflict(format!(
                "class {} is used by policies {}; it cannot be renamed",
                cur.spec.name,
                users.join(", ")
            )));
        }
    }
    let r = sqlx::query(
        "UPDATE sla_classes SET name = ?, spec = ?, version = version + 1, updated_at = ?
         WHERE id = ? AND version = ?",
    )
    .bind(class.name.as_str())
    .bind(serde_json::to_string(&class).map_err(ApiError::internal)?)
    .bind(now_s())
    .bind(id)
    .bind(cur.version)
    .execute(&mut *tx)
    .await;
    updated(r, "class", || {
        format!("an SLA class named {} exists", class.name)
    })?;
    audit_config(
        &mut tx,
        &p.actor(),
        "sla_class.update",
        &format!("sla-class/{id}"),
        patch,
    )
    .await?;
    let c = load_class(&mut tx, id).await?;
    tx.commit().await?;
    Ok(with_etag(StatusCode::OK, c.version, c))
}

#[utoipa::path(
    delete,
    path = "/api/v1/sla-classes/{id}",
    tag = "sla-classes",
    summary = "Delete an SLA class no policy uses (not a built-in).",
    params(("id" = i64, Path, description = "The object's id")),
    security(("bearer" = ["operator"])),
    responses((status = 204, description = "Deleted"), crate::error::Conflict)
)]
async fn remove_class(
    State(s): State<AppState>,
    Operator(p): Operator,
    extract::Path(id): extract::Path<i64>,
    headers: HeaderMap,
) -> Result<StatusCode, ApiError> {
    let mut tx = s.store.begin().await?;
    let cur = load_class(&mut tx, id).await?;
    check_if_match(&headers, cur.version)?;
    if cur.builtin {
        return Err(ApiError::conflict(format!(
            "{} is a built-in class: edit it, but it stays",
            cur.spec.name
        )));
    }
    let users = users_of_class(&mut tx, cur.spec.name.as_str()).await?;
    if !users.is_empty() {
        return Err(ApiError::conflict(format!(
            "class {} is used by policies {}",
            cur.spec.name,
            users.join(", ")
        )));
    }
    Store::delete_row(&mut tx, "sla_classes", id).await?;
    audit_config(
        &mut tx,
        &p.actor(),
        "sla_class.delete",
        &format!("sla-class/{id}"),
        json!({ "name": cur.spec.name }),
    )
    .await?;
    tx.commit().await?;
    Ok(StatusCode::NO_CONTENT)
}
