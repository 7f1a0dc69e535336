//! `/api/v1/sla-classes`, `/api/v1/policies` and `/api/v1/failover`: what traffic needs and how
//! it is steered, stored as the very [`SlaClass`], [`Policy`] and [`FailoverSettings`] the edges
//! receive, with their own `validate()`.
//!
//! The four built-in classes (`realtime`, `interactive`, `business`, `bulk`) exist from the first
//! start and can be edited, not deleted. A class that a policy uses can be neither deleted nor
//! renamed (409 naming the policy). Policy names and orders are unique (409 naming the other
//! policy), so "first match" is never ambiguous.

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use patronus_api::{FailoverSettings, Policy, SlaClass};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use sqlx::Row;
use sqlx::sqlite::SqliteRow;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::app::{Admin, AppState, Operator, Principal};
use crate::error::{ApiError, extract};
use crate::routes::{Page, Paging, check_if_match, created, inserted, patched, updated, with_etag};
use crate::store::{Audit, Store, now_s};

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_classes, create_class))
        .routes(routes!(show_class, update_class, remove_class))
        .routes(routes!(list_policies, create_policy))
        .routes(routes!(show_policy, update_policy, remove_policy))
        .routes(routes!(show_failover, update_failover))
}

/// A stored document and its bookkeeping, as the API shows it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Doc<T> {
    pub id: i64,
    #[serde(flatten)]
    pub spec: T,
    /// Built-in classes only: these cannot be deleted.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub builtin: bool,
    pub version: i64,
    pub created_at: i64,
    pub updated_at: i64,
}

fn doc<T: DeserializeOwned>(r: &SqliteRow) -> Result<Doc<T>, ApiError> {
    let spec: String = r.try_get("spec")?;
    Ok(Doc {
        id: r.try_get("id")?,
        spec: serde_json::from_str(&spec).map_err(ApiError::internal)?,
        builtin: r.try_get::<i64, _>("builtin").unwrap_or(0) != 0,
        version: r.try_get("version")?,
        created_at: r.try_get("created_at")?,
        updated_at: r.try_get("updated_at")?,
    })
}

pub async fn all_classes(store: &Store) -> Result<Vec<Doc<SlaClass>>, ApiError> {
    sqlx::query("SELECT * FROM sla_classes ORDER BY id")
        .fetch_all(store.pool())
        .await?
        .iter()
        .map(doc)
        .collect()
}

pub async fn all_policies(store: &Store) -> Result<Vec<Doc<Policy>>, ApiError> {
    sqlx::query("SELECT * FROM policies ORDER BY ord, id")
        .fetch_all(store.pool())
        .await?
        .iter()
        .map(doc)
        .collect()
}

fn page<T>(items: Vec<T>, paging: Paging) -> Page<T> {
    let total = items.len() as i64;
    let items = items
        .into_iter()
        .skip(paging.offset as usize)
        .take(paging.limit as usize)
        .collect();
    Page::new(items, total, paging)
}

#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    pub limit: Option<i64>,
    pub offset: Option<i64>,
    /// Policies of this class.
    pub class: Option<String>,
    pub enabled: Option<bool>,
    /// Classes: `id` (default) or `name`; policies: `order` (default), `name` or `id`. `-` in
    /// front for descending.
    pub sort: Option<String>,
}

/// A sort key's name and how to get it.
type SortKey<T> = (&'static str, fn(&T) -> String);

/// Sorts `items` by the key `sort` names among `keys` (the first is the default).
fn sort_by<T>(items: &mut [T], sort: Option<&str>, keys: &[SortKey<T>]) -> Result<(), ApiError> {
    let sort = sort.unwrap_or(keys[0].0);
    let (desc, name) = sort.strip_prefix('-').map_or((false, sort), |k| (true, k));
    let Some((_, key)) = keys.iter().find(|(k, _)| *k == name) else {
        let names: Vec<&str> = keys.iter().map(|(k, _)| *k).collect();
        return Err(ApiError::field(
            "sort",
            format!(
                "must be one of {} (- in front for descending)",
                names.join(", ")
            ),
        ));
    };
    items.sort_by_cached_key(key);
    if desc {
        items.reverse();
    }
    Ok(())
}

/// Zero-padded, so that numbers sort as strings.
fn num(n: i64) -> String {
    format!("{n:020}")
}

// ----- SLA classes -----

#[utoipa::path(
    get,
    path = "/api/v1/sla-classes",
    tag = "sla-classes",
    summary = "List SLA classes.",
    params(ListQuery),
    security(("bearer" = ["viewer"])),
    responses((status = 200, body = Page<Doc<SlaClass>>), crate::error::ApiErrors)
)]
async fn list_classes(
    State(s): State<AppState>,
    _p: Principal,
    extract::Query(q): extract::Query<ListQuery>,
) -> Result<Json<Page<Doc<SlaClass>>>, ApiError> {
    let paging = Paging::new(q.limit, q.offset)?;
    let mut items = all_classes(&s.store).await?;
    sort_by(
        &mut items,
        q.sort.as_deref(),
        &[("id", |c| num(c.id)), ("name", |c| c.spec.name.to_string())],
    )?;
    Ok(Json(page(items, paging)))
}

async fn load_class(store: &Store, id: i64) -> Result<Doc<SlaClass>, ApiError> {
    let r = sqlx::query("SELECT * FROM sla_classes WHERE id = ?")
        .bind(id)
        .fetch_optional(store.pool())
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
    responses((status = 200, body = Doc<SlaClass>), crate::error::ApiErrors)
)]
async fn show_class(
    State(s): State<AppState>,
    _p: Principal,
    extract::Path(id): extract::Path<i64>,
) -> Result<Response, ApiError> {
    let c = load_class(&s.store, id).await?;
    Ok(with_etag(StatusCode::OK, c.version, c))
}

#[utoipa::path(
    post,
    path = "/api/v1/sla-classes",
    tag = "sla-classes",
    summary = "Create an SLA class.",
    request_body = SlaClass,
    security(("bearer" = ["operator"])),
    responses((status = 201, body = Doc<SlaClass>), crate::error::ApiErrors)
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
    Store::audit(
        &mut tx,
        &p.actor(),
        "sla_class.create",
        &format!("sla-class/{id}"),
        serde_json::to_value(&class).unwrap_or_default(),
    )
    .await?;
    tx.commit().await?;
    let c = load_class(&s.store, id).await?;
    Ok(created(format!("/api/v1/sla-classes/{id}"), c.version, c))
}

/// The enabled or disabled policies that use class `name`.
async fn users_of_class(store: &Store, name: &str) -> Result<Vec<String>, ApiError> {
    Ok(all_policies(store)
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
    responses((status = 200, body = Doc<SlaClass>), crate::error::ApiErrors)
)]
async fn update_class(
    State(s): State<AppState>,
    Operator(p): Operator,
    extract::Path(id): extract::Path<i64>,
    headers: HeaderMap,
    extract::Json(patch): extract::Json<Value>,
) -> Result<Response, ApiError> {
    let cur = load_class(&s.store, id).await?;
    check_if_match(&headers, cur.version)?;
    let class: SlaClass = patched(&cur.spec, &patch)?;
    class.validate().map_err(ApiError::validation)?;
    if class.name != cur.spec.name {
        let users = users_of_class(&s.store, cur.spec.name.as_str()).await?;
        if !users.is_empty() {
            return Err(ApiError::conflict(format!(
                "class {} is used by policies {}; it cannot be renamed",
                cur.spec.name,
                users.join(", ")
            )));
        }
    }
    let mut tx = s.store.begin().await?;
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
    Store::audit(
        &mut tx,
        &p.actor(),
        "sla_class.update",
        &format!("sla-class/{id}"),
        patch,
    )
    .await?;
    tx.commit().await?;
    let c = load_class(&s.store, id).await?;
    Ok(with_etag(StatusCode::OK, c.version, c))
}

#[utoipa::path(
    delete,
    path = "/api/v1/sla-classes/{id}",
    tag = "sla-classes",
    summary = "Delete an SLA class no policy uses (not a built-in).",
    params(("id" = i64, Path, description = "The object's id")),
    security(("bearer" = ["operator"])),
    responses((status = 204, description = "Deleted"), crate::error::ApiErrors)
)]
async fn remove_class(
    State(s): State<AppState>,
    Operator(p): Operator,
    extract::Path(id): extract::Path<i64>,
) -> Result<StatusCode, ApiError> {
    let cur = load_class(&s.store, id).await?;
    if cur.builtin {
        return Err(ApiError::conflict(format!(
            "{} is a built-in class: edit it, but it stays",
            cur.spec.name
        )));
    }
    let users = users_of_class(&s.store, cur.spec.name.as_str()).await?;
    if !users.is_empty() {
        return Err(ApiError::conflict(format!(
            "class {} is used by policies {}",
            cur.spec.name,
            users.join(", ")
        )));
    }
    let audit = Audit::new(
        p.actor(),
        "sla_class.delete",
        &format!("sla-class/{id}"),
        json!({ "name": cur.spec.name }),
    );
    s.store.delete_audited("sla_classes", id, audit).await?;
    Ok(StatusCode::NO_CONTENT)
}

// ----- policies -----

#[utoipa::path(
    get,
    path = "/api/v1/policies",
    tag = "policies",
    summary = "List policies in evaluation order.",
    params(ListQuery),
    security(("bearer" = ["viewer"])),
    responses((status = 200, body = Page<Doc<Policy>>), crate::error::ApiErrors)
)]
async fn list_policies(
    State(s): State<AppState>,
    _p: Principal,
    extract::Query(q): extract::Query<ListQuery>,
) -> Result<Json<Page<Doc<Policy>>>, ApiError> {
    let paging = Paging::new(q.limit, q.offset)?;
    let mut items: Vec<_> = all_policies(&s.store)
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

async fn load_policy(store: &Store, id: i64) -> Result<Doc<Policy>, ApiError> {
    let r = sqlx::query("SELECT * FROM policies WHERE id = ?")
        .bind(id)
        .fetch_optional(store.pool())
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
    responses((status = 200, body = Doc<Policy>), crate::error::ApiErrors)
)]
async fn show_policy(
    State(s): State<AppState>,
    _p: Principal,
    extract::Path(id): extract::Path<i64>,
) -> Result<Response, ApiError> {
    let p = load_policy(&s.store, id).await?;
    Ok(with_etag(StatusCode::OK, p.version, p))
}

/// Validation against the classes, and uniqueness of name and order against the other
/// policies (409 naming the one in the way).
async fn check_policy(store: &Store, policy: &Policy, id: Option<i64>) -> Result<(), ApiError> {
    let classes: Vec<SlaClass> = all_classes(store)
        .await?
        .into_iter()
        .map(|c| c.spec)
        .collect();
    policy.validate(&classes).map_err(ApiError::validation)?;
    for other in all_policies(store).await? {
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
    responses((status = 201, body = Doc<Policy>), crate::error::ApiErrors)
)]
async fn create_policy(
    State(s): State<AppState>,
    Operator(p): Operator,
    extract::Json(policy): extract::Json<Policy>,
) -> Result<Response, ApiError> {
    check_policy(&s.store, &policy, None).await?;
    let now = now_s();
    let mut tx = s.store.begin().await?;
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
    Store::audit(
        &mut tx,
        &p.actor(),
        "policy.create",
        &format!("policy/{id}"),
        serde_json::to_value(&policy).unwrap_or_default(),
    )
    .await?;
    tx.commit().await?;
    let d = load_policy(&s.store, id).await?;
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
    responses((status = 200, body = Doc<Policy>), crate::error::ApiErrors)
)]
async fn update_policy(
    State(s): State<AppState>,
    Operator(p): Operator,
    extract::Path(id): extract::Path<i64>,
    headers: HeaderMap,
    extract::Json(patch): extract::Json<Value>,
) -> Result<Response, ApiError> {
    let cur = load_policy(&s.store, id).await?;
    check_if_match(&headers, cur.version)?;
    let policy: Policy = patched(&cur.spec, &patch)?;
    check_policy(&s.store, &policy, Some(id)).await?;
    let mut tx = s.store.begin().await?;
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
    Store::audit(
        &mut tx,
        &p.actor(),
        "policy.update",
        &format!("policy/{id}"),
        patch,
    )
    .await?;
    tx.commit().await?;
    let d = load_policy(&s.store, id).await?;
    Ok(with_etag(StatusCode::OK, d.version, d))
}

#[utoipa::path(
    delete,
    path = "/api/v1/policies/{id}",
    tag = "policies",
    summary = "Delete a policy.",
    params(("id" = i64, Path, description = "The object's id")),
    security(("bearer" = ["operator"])),
    responses((status = 204, description = "Deleted"), crate::error::ApiErrors)
)]
async fn remove_policy(
    State(s): State<AppState>,
    Operator(p): Operator,
    extract::Path(id): extract::Path<i64>,
) -> Result<StatusCode, ApiError> {
    let cur = load_policy(&s.store, id).await?;
    let audit = Audit::new(
        p.actor(),
        "policy.delete",
        &format!("policy/{id}"),
        json!({ "name": cur.spec.name }),
    );
    s.store.delete_audited("policies", id, audit).await?;
    Ok(StatusCode::NO_CONTENT)
}

// ----- failover settings -----

pub async fn failover(store: &Store) -> Result<(FailoverSettings, i64), ApiError> {
    let r = sqlx::query("SELECT value, version FROM settings WHERE key = 'failover'")
        .fetch_optional(store.pool())
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
    responses((status = 200, body = FailoverSettings), crate::error::ApiErrors)
)]
async fn show_failover(State(s): State<AppState>, _p: Principal) -> Result<Response, ApiError> {
    let (f, version) = failover(&s.store).await?;
    Ok(with_etag(StatusCode::OK, version, f))
}

#[utoipa::path(
    patch,
    path = "/api/v1/failover",
    tag = "failover",
    summary = "Change the failover settings (JSON merge patch; If-Match).",
    request_body(content = serde_json::Value, description = "A JSON merge patch (RFC 7386) of the object"),
    security(("bearer" = ["admin"])),
    responses((status = 200, body = FailoverSettings), crate::error::ApiErrors)
)]
async fn update_failover(
    State(s): State<AppState>,
    Admin(p): Admin,
    headers: HeaderMap,
    extract::Json(patch): extract::Json<Value>,
) -> Result<Response, ApiError> {
    // Settings are the admins' (operators write network objects).
    let (cur, version) = failover(&s.store).await?;
    check_if_match(&headers, version)?;
    let new: FailoverSettings = patched(&cur, &patch)?;
    new.validate().map_err(ApiError::validation)?;
    let mut tx = s.store.begin().await?;
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
    Store::audit(&mut tx, &p.actor(), "failover.update", "failover", patch).await?;
    tx.commit().await?;
    let (f, version) = failover(&s.store).await?;
    Ok(with_etag(StatusCode::OK, version, f))
}
