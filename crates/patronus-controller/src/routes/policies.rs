//! `/api/v1/policies`: how traffic is steered, stored as the very [`Policy`] the edges receive,
//! with its own `validate()`. Policy names and orders are unique (409 naming the other policy),
//! so "first match" is never ambiguous; a policy names an SLA class that exists.

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use patronus_api::{Policy, SlaClass};
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
        .routes(routes!(list_policies, create_policy))
        .routes(routes!(show_policy, update_policy, remove_policy))
}

pub async fn all_policies(conn: &mut SqliteConnection) -> Result<Vec<Doc<Policy>>, ApiError> {
    sqlx::query("SELECT * FROM policies ORDER BY ord, id")
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
    /// Policies of this class.
    pub class: Option<String>,
    pub enabled: Option<bool>,
    /// `order` (default), `name` or `id`; `-` in front for descending.
    pub sort: Option<String>,
}

#[utoipa::path(
    get,
    path = "/api/v1/policies",
    tag = "policies",
    summary = "List policies in evaluation order.",
    params(ListQuery),
    security(("bearer" = ["viewer"])),
    responses((status = 200, body = Page<Doc<Policy>>))
)]
async fn list_policies(
    State(s): State<AppState>,
    _p: Principal,
    extract::Query(q): extract::Query<ListQuery>,
) -> Result<Json<Page<Doc<Policy>>>, ApiError> {
    let paging = Paging::new(q.limit, q.offset)?;
    let mut items: Vec<_> = all_policies(&mut *s.store.conn().await?)
        .await?
        .into_iter()
        .filter(|p| {
            q.class
                .as_deref()
                .is_none_or(|c| p.spec.class.as_str() == c)
        })
        .filter(|p| q.enabled.is_none_or(|e| p.spec.enabled == e))
        .collect();
    sort_by(
        &mut items,
        q.sort.as_deref(),
        &[
            ("order", |p| num(p.spec.order.into())),
            ("name", |p| p.spec.name.to_string()),
            ("id", |p| num(p.id)),
        ],
    )?;
    Ok(Json(page(items, paging)))
}

async fn load_policy(conn: &mut SqliteConnection, id: i64) -> Result<Doc<Policy>, ApiError> {
    let r = sqlx::query("SELECT * FROM policies WHERE id = ?")
        .bind(id)
        .fetch_optional(&mut *conn)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("policy {id}")))?;
    doc(&r)
}

#[utoipa::path(
    get,
    path = "/api/v1/policies/{id}",
    tag = "policies",
    summary = "Read a policy.",
    params(("id" = i64, Path, description = "The object's id")),
    security(("bearer" = ["viewer"])),
    responses((status = 200, body = Doc<Policy>))
)]
async fn show_policy(
    State(s): State<AppState>,
    _p: Principal,
    extract::Path(id): extract::Path<i64>,
) -> Result<Response, ApiError> {
    let p = load_policy(&mut *s.store.conn().await?, id).await?;
    Ok(with_etag(StatusCode::OK, p.version, p))
}

/// Validation against the classes, and uniqueness of name and order against the other
/// policies (409 naming the one in the way).
async fn check_policy(
    conn: &mut SqliteConnection,
    policy: &Policy,
    id: Option<i64>,
) -> Result<(), ApiError> {
    let classes: Vec<SlaClass> = crate::routes::sla_classes::all_classes(&mut *conn)
        .await?
        .into_iter()
        .map(|c| c.spec)
        .collect();
    policy.validate(&classes).map_err(ApiError::validation)?;
    for other in all_policies(&mut *conn).await? {
        if Some(other.id) == id {
            continue;
        }
        if other.spec.name == policy.name {
            return Err(ApiError::conflict(format!(
                "a policy named {} exists",
                policy.name
            )));
        }
        if other.spec.order == policy.order {
            return Err(ApiError::conflict(format!(
                "order {} is used by policy {}: first match must be unambiguous",
                policy.order, other.spec.name
            )));
        }
    }
    Ok(())
}

#[utoipa::path(
    post,
    path = "/api/v1/policies",
    tag = "policies",
    summary = "Create a policy.",
    request_body = Policy,
    security(("bearer" = ["operator"])),
    responses((status = 201, body = Doc<Policy>), crate::error::Conflict)
)]
async fn create_policy(
    State(s): State<AppState>,
    Operator(p): Operator,
    extract::Json(policy): extract::Json<Policy>,
) -> Result<Response, ApiError> {
    let mut tx = s.store.begin().await?;
    check_policy(&mut tx, &policy, None).await?;
    let now = now_s();
    let r = sqlx::query(
        "INSERT INTO policies (name, ord, spec, created_at, updated_at) VALUES (?, ?, ?, ?, ?)",
    )
    .bind(policy.name.as_str())
    .bind(i64::from(policy.order))
    .bind(serde_json::to_string(&policy).map_err(ApiError::internal)?)
    .bind(now)
    .bind(now)
    .execute(&mut *tx)
    .await;
    let id = inserted(r, || "a policy with that name or order exists")?;
    audit_config(
        &mut tx,
        &p.actor(),
        "policy.create",
        &format!("policy/{id}"),
        serde_json::to_value(&policy).unwrap_or_default(),
    )
    .await?;
    let d = load_policy(&mut tx, id).await?;
    tx.commit().await?;
    Ok(created(format!("/api/v1/policies/{id}"), d.version, d))
}

#[utoipa::path(
    patch,
    path = "/api/v1/policies/{id}",
    tag = "policies",
    summary = "Change a policy (JSON merge patch; If-Match).",
    params(("id" = i64, Path, description = "The object's id")),
    request_body(content = serde_json::Value, description = "A JSON merge patch (RFC 7386) of the object"),
    security(("bearer" = ["operator"])),
    responses((status = 200, body = Doc<Policy>), crate::error::Conflict)
)]
async fn update_policy(
    State(s): State<AppState>,
    Operator(p): Operator,
    extract::Path(id): extract::Path<i64>,
    headers: HeaderMap,
    extract::Json(patch): extract::Json<Value>,
) -> Result<Response, ApiError> {
    let mut tx = s.store.begin().await?;
    let cur = load_policy(&mut tx, id).await?;
    check_if_match(&headers, cur.version)?;
    let policy: Policy = patched(&cur.spec, &patch)?;
    check_policy(&mut tx, &policy, Some(id)).await?;
    let r = sqlx::query(
        "UPDATE policies SET name = ?, ord = ?, spec = ?, version = version + 1, updated_at = ?
         WHERE id = ? AND version = ?",
    )
    .bind(policy.name.as_str())
    .bind(i64::from(policy.order))
    .bind(serde_json::to_string(&policy).map_err(ApiError::internal)?)
    .bind(now_s())
    .bind(id)
    .bind(cur.version)
    .execute(&mut *tx)
    .await;
    updated(r, "policy", || "a policy with that name or order exists")?;
    audit_config(
        &mut tx,
        &p.actor(),
        "policy.update",
        &format!("policy/{id}"),
        patch,
    )
    .await?;
    let d = load_policy(&mut tx, id).await?;
    tx.commit().await?;
    Ok(with_etag(StatusCode::OK, d.version, d))
}

#[utoipa::path(
    delete,
    path = "/api/v1/policies/{id}",
    tag = "policies",
    summary = "Delete a policy.",
    params(("id" = i64, Path, description = "The object's id")),
    security(("bearer" = ["operator"])),
    responses((status = 204, description = "Deleted"))
)]
async fn remove_policy(
    State(s): State<AppState>,
    Operator(p): Operator,
    extract::Path(id): extract::Path<i64>,
    headers: HeaderMap,
) -> Result<StatusCode, ApiError> {
    let mut tx = s.store.begin().await?;
    let cur = load_policy(&mut tx, id).await?;
    check_if_match(&headers, cur.version)?;
    Store::delete_row(&mut tx, "policies", id).await?;
    audit_config(
        &mut tx,
        &p.actor(),
        "policy.delete",
        &format!("policy/{id}"),
        json!({ "name": cur.spec.name }),
    )
    .await?;
    tx.commit().await?;
    Ok(StatusCode::NO_CONTENT)
}
