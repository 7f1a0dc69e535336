//! `/api/v1/api-keys`: credentials for scripts and integrations. An admin issues a key with a
//! role and an expiry; the key is shown once, in the response that creates it, and stored only
//! as its SHA-256 (it is 32 random bytes: a fast hash is enough, unlike a password). It is used
//! exactly like an access token: `Authorization: Bearer pak_...`.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use serde::{Deserialize, Serialize};
use serde_json::json;
use sqlx::Row;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::app::{Admin, AppState};
use crate::auth::{self as a, Role};
use crate::error::{ApiError, extract};
use crate::routes::{Page, Paging, created};
use crate::store::{Store, now_s};

/// Every API key starts with this, so that it is told apart from an access token (and found by
/// secret scanners).
pub const PREFIX: &str = "pak_";

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_api_keys, create_api_key))
        .routes(routes!(revoke_api_key))
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewKey {
    #[schema(min_length = 1, max_length = 100)]
    pub name: String,
    pub role: Role,
    /// 1 to 365 days; 90 when left out.
    #[serde(default = "default_days")]
    #[schema(minimum = 1, maximum = 365)]
    pub expires_in_days: u32,
}

fn default_days() -> u32 {
    90
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct KeyView {
    pub id: i64,
    pub name: String,
    pub role: Role,
    /// The first characters of the key, to recognise it.
    pub hint: String,
    pub created_by: Option<i64>,
    pub created_at: i64,
    pub expires_at: i64,
    pub last_used_at: Option<i64>,
    pub revoked: bool,
    /// Only in the response that creates the key.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

fn view(r: &sqlx::sqlite::SqliteRow) -> Result<KeyView, ApiError> {
    Ok(KeyView {
        id: r.try_get("id")?,
        name: r.try_get("name")?,
        role: Role::parse(r.try_get("role")?).ok_or_else(|| ApiError::internal("bad role"))?,
        hint: r.try_get("hint")?,
        created_by: r.try_get("created_by")?,
        created_at: r.try_get("created_at")?,
        expires_at: r.try_get("expires_at")?,
        last_used_at: r.try_get("last_used_at")?,
        revoked: r.try_get::<i64, _>("revoked")? != 0,
        key: None,
    })
}

/// The id, name and role of a valid key; records its use.
pub async fn check(store: &Store, key: &str) -> Result<Option<(i64, String, Role)>, ApiError> {
    let hash = a::sha256(key.as_bytes());
    let now = now_s();
    let Some(r) = sqlx::query(
        "SELECT id, name, role FROM api_keys WHERE key_hash = ? AND revoked = 0 AND expires_at > ?",
    )
    .bind(&hash[..])
    .bind(now)
    .fetch_optional(store.pool())
    .await?
    else {
        return Ok(None);
    };
    let id: i64 = r.try_get("id")?;
    // At most one write a minute per key.
    sqlx::query(
        "UPDATE api_keys SET last_used_at = ? WHERE id = ? AND COALESCE(last_used_at, 0) < ?",
    )
    .bind(now)
    .bind(id)
    .bind(now - 60)
    .execute(store.pool())
    .await?;
    let role = Role::parse(r.try_get("role")?).ok_or_else(|| ApiError::internal("bad role"))?;
    Ok(Some((id, r.try_get("name")?, role)))
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
    /// `id` (default), `name`, `created_at`, `expires_at`; `-` in front for descending.
    pub sort: Option<String>,
}

#[utoipa::path(
    get,
    path = "/api/v1/api-keys",
    tag = "api-keys",
    summary = "List API keys (never the keys themselves).",
    params(ListQuery),
    security(("bearer" = ["admin"])),
    responses((status = 200, body = Page<KeyView>))
)]
async fn list_api_keys(
    State(s): State<AppState>,
    Admin(_p): Admin,
    extract::Query(q): extract::Query<ListQuery>,
) -> Result<Json<Page<KeyView>>, ApiError> {
    let paging = Paging::new(q.limit, q.offset)?;
    let total: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM api_keys")
        .fetch_one(s.store.pool())
        .await?;
    let sort = q.sort.as_deref().unwrap_or("id");
    let (desc, key) = sort.strip_prefix('-').map_or((false, sort), |k| (true, k));
    if !matches!(key, "id" | "name" | "created_at" | "expires_at") {
        return Err(ApiError::field(
            "sort",
            "must be one of id, name, created_at, expires_at (- in front for descending)",
        ));
    }
    let sql = format!(
        "SELECT * FROM api_keys ORDER BY {key} {}, id LIMIT ? OFFSET ?",
        if desc { "DESC" } else { "ASC" }
    );
    let items = sqlx::query(&sql)
        .bind(paging.limit)
        .bind(paging.offset)
        .fetch_all(s.store.pool())
        .await?
        .iter()
        .map(view)
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Json(Page::new(items, total, paging)))
}

#[utoipa::path(
    post,
    path = "/api/v1/api-keys",
    tag = "api-keys",
    summary = "Issue an API key; the key is in this response only.",
    request_body = NewKey,
    security(("bearer" = ["admin"])),
    responses((status = 201, body = KeyView))
)]
async fn create_api_key(
    State(s): State<AppState>,
    Admin(p): Admin,
    extract::Json(new): extract::Json<NewKey>,
) -> Result<Response, ApiError> {
    let mut e = patronus_api::FieldErrors::default();
    let name = new.name.trim().to_owned();
    if name.is_empty() || name.chars().count() > 100 {
        e.push("name", "must be 1 to 100 characters");
    }
    if !(1..=365).contains(&new.expires_in_days) {
        e.push("expires_in_days", "must be between 1 and 365");
    }
    e.into_result().map_err(ApiError::validation)?;
    let key = format!("{PREFIX}{}", a::b64url(&a::random_bytes::<32>()));
    let hint = key.chars().take(PREFIX.len() + 6).collect::<String>();
    let now = now_s();
    let expires = now + i64::from(new.expires_in_days) * 86_400;
    let mut tx = s.store.begin().await?;
    let id = sqlx::query(
        "INSERT INTO api_keys (name, role, key_hash, hint, created_by, created_at, expires_at)
         VALUES (?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(&name)
    .bind(new.role.as_str())
    .bind(&a::sha256(key.as_bytes())[..])
    .bind(&hint)
    .bind(p.user_id())
    .bind(now)
    .bind(expires)
    .execute(&mut *tx)
    .await?
    .last_insert_rowid();
    Store::audit(
        &mut tx,
        &p.actor(),
        "api_key.create",
        &format!("api-key/{id}"),
        json!({ "name": name, "role": new.role, "expires_at": expires }),
    )
    .await?;
    tx.commit().await?;
    let r = sqlx::query("SELECT * FROM api_keys WHERE id = ?")
        .bind(id)
        .fetch_one(s.store.pool())
        .await?;
    let mut v = view(&r)?;
    v.key = Some(key);
    Ok(created(format!("/api/v1/api-keys/{id}"), 1, v))
}

#[utoipa::path(
    delete,
    path = "/api/v1/api-keys/{id}",
    tag = "api-keys",
    summary = "Revoke an API key.",
    params(("id" = i64, Path, description = "The object's id")),
    security(("bearer" = ["admin"])),
    responses((status = 204, description = "Revoked"))
)]
async fn revoke_api_key(
    State(s): State<AppState>,
    Admin(p): Admin,
    extract::Path(id): extract::Path<i64>,
    headers: axum::http::HeaderMap,
) -> Result<StatusCode, ApiError> {
    // An API key has no versions (it is never changed, only revoked): no entity tag but `*`
    // can match it (RFC 9110, 13.1.1).
    crate::routes::check_if_match_unversioned(&headers)?;
    let mut tx = s.store.begin().await?;
    let r = sqlx::query("UPDATE api_keys SET revoked = 1 WHERE id = ?")
        .bind(id)
        .execute(&mut *tx)
        .await?;
    if r.rows_affected() == 0 {
        return Err(ApiError::not_found(format!("API key {id}")));
    }
    Store::audit(
        &mut tx,
        &p.actor(),
        "api_key.revoke",
        &format!("api-key/{id}"),
        json!({}),
    )
    .await?;
    tx.commit().await?;
    Ok(StatusCode::NO_CONTENT)
}
