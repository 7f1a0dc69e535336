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
use serde_json::Value;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::app::{AppState, Operator, Principal};
use crate::error::{ApiError, extract};
use crate::routes::versioned::Resource;
use crate::routes::{Doc, Page, Paging, num, page, sort_by, with_etag};
use crate::store::Conn;
use crate::store::docs::CLASSES;

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_classes, create_class))
        .routes(routes!(show_class, update_class, remove_class))
}

const RESOURCE: Resource<SlaClass> = Resource {
    table: &CLASSES,
    path: "/api/v1/sla-classes",
    target: "sla-class",
    actions: ["sla_class.create", "sla_class.update", "sla_class.delete"],
    name: |c| c.name.to_string(),
};

fn name_taken(c: &SlaClass) -> String {
    format!("an SLA class named {} exists", c.name)
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
    let mut items = CLASSES.all(&mut *s.store.conn().await?).await?;
    sort_by(
        &mut items,
        q.sort.as_deref(),
        &[("id", |c| num(c.id)), ("name", |c| c.spec.name.to_string())],
    )?;
    Ok(Json(page(items, paging)))
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
    let c = RESOURCE.load(&mut *s.store.conn().await?, id).await?;
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
    RESOURCE
        .create(
            &s.store,
            &p.actor(),
            class,
            async |_, c| c.validate().map_err(ApiError::validation),
            name_taken,
        )
        .await
}

/// The enabled or disabled policies that use class `name`.
async fn users_of_class(conn: &mut Conn, name: &str) -> Result<Vec<String>, ApiError> {
    Ok(crate::store::docs::POLICIES
        .all(&mut *conn)
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
    let check = async |tx: &mut crate::store::Tx, cur: &Doc<SlaClass>, class: &SlaClass| {
        class.validate().map_err(ApiError::validation)?;
        if class.name != cur.spec.name {
            let users = users_of_class(tx, cur.spec.name.as_str()).await?;
            if !users.is_empty() {
                return Err(ApiError::conflict(format!(
                    "class {} is used by policies {}; it cannot be renamed",
                    cur.spec.name,
                    users.join(", ")
                )));
            }
        }
        Ok(())
    };
    RESOURCE
        .update(&s.store, &p.actor(), id, &headers, patch, check, name_taken)
        .await
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
    let check = async |tx: &mut crate::store::Tx, cur: &Doc<SlaClass>| {
        if cur.builtin {
            return Err(ApiError::conflict(format!(
                "{} is a built-in class: edit it, but it stays",
                cur.spec.name
            )));
        }
        let users = users_of_class(tx, cur.spec.name.as_str()).await?;
        if !users.is_empty() {
            return Err(ApiError::conflict(format!(
                "class {} is used by policies {}",
                cur.spec.name,
                users.join(", ")
            )));
        }
        Ok(())
    };
    RESOURCE
        .delete(&s.store, &p.actor(), id, &headers, check)
        .await
}
