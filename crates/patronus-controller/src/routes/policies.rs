//! `/api/v1/policies`: how traffic is steered, stored as the very [`Policy`] the edges receive,
//! with its own `validate()`. Policy names and orders are unique (409 naming the other policy),
//! so "first match" is never ambiguous; a policy names an SLA class that exists.

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use patronus_api::{Policy, SlaClass};
use serde_json::Value;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::app::{AppState, Operator, Principal};
use crate::error::{ApiError, extract};
use crate::routes::versioned::Resource;
use crate::routes::{Doc, Page, Paging, num, page, sort_by, with_etag};
use crate::store::Conn;
use crate::store::docs::{CLASSES, POLICIES};

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_policies, create_policy))
        .routes(routes!(show_policy, update_policy, remove_policy))
}

const RESOURCE: Resource<Policy> = Resource {
    table: &POLICIES,
    path: "/api/v1/policies",
    target: "policy",
    actions: ["policy.create", "policy.update", "policy.delete"],
    name: |p| p.name.to_string(),
};

fn taken(_: &Policy) -> String {
    "a policy with that name or order exists".into()
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
    let mut items: Vec<_> = POLICIES
        .all(&mut *s.store.conn().await?)
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
    let p = RESOURCE.load(&mut *s.store.conn().await?, id).await?;
    Ok(with_etag(StatusCode::OK, p.version, p))
}

/// Validation against the classes, and uniqueness of name and order against the other
/// policies (409 naming the one in the way).
pub(crate) async fn check_policy(
    conn: &mut Conn,
    policy: &Policy,
    id: Option<i64>,
) -> Result<(), ApiError> {
    let classes: Vec<SlaClass> = CLASSES
        .all(&mut *conn)
        .await?
        .into_iter()
        .map(|c| c.spec)
        .collect();
    policy.validate(&classes).map_err(ApiError::validation)?;
    for other in POLICIES.all(&mut *conn).await? {
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
    RESOURCE
        .create(
            &s.store,
            &p.actor(),
            policy,
            async |tx, policy| check_policy(tx, policy, None).await,
            taken,
        )
        .await
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
    let check = async |tx: &mut crate::store::Tx, _: &Doc<Policy>, policy: &Policy| {
        check_policy(tx, policy, Some(id)).await
    };
    RESOURCE
        .update(&s.store, &p.actor(), id, &headers, patch, check, taken)
        .await
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
    RESOURCE
        .delete(&s.store, &p.actor(), id, &headers, async |_, _| Ok(()))
        .await
}
