//! `/api/v1/api-keys`: credentials for scripts and integrations. An admin issues a key with a
//! role and an expiry; the key is shown once, in the response that creates it, and stored only
//! as its SHA-256 (it is 32 random bytes: a fast hash is enough, unlike a password). It is used
//! exactly like an access token: `Authorization: Bearer pak_...`.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use serde::Deserialize;
use serde_json::json;
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

use crate::store::api_keys;
pub use crate::store::api_keys::KeyView;

/// The id, name and role of a valid key; records its use.
pub async fn check(store: &Store, key: &str) -> Result<Option<(i64, String, Role)>, ApiError> {
    let hash = a::sha256(key.as_bytes());
    let now = now_s();
    api_keys::check(&mut *store.conn().await?, &hash[..], now).await
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
    let sort = q.sort.as_deref().unwrap_or("id");
    let (desc, key) = sort.strip_prefix('-').map_or((false, sort), |k| (true, k));
    if !api_keys::SORT_KEYS.contains(&key) {
        return Err(ApiError::field(
            "sort",
            "must be one of id, name, created_at, expires_at (- in front for descending)",
        ));
    }
    let (items, total) = api_keys::page(
        &mut *s.store.conn().await?,
        key,
        desc,
        (paging.limit, paging.offset),
    )
    .await?;
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
    let id = api_keys::insert(
        &mut tx,
        (&name, new.role, &hint),
        &a::sha256(key.as_bytes())[..],
        p.user_id(),
        (now, expires),
    )
    .await?;
    Store::audit(
        &mut tx,
        &p.actor(),
        "api_key.create",
        &format!("api-key/{id}"),
        json!({ "name": name, "role": new.role, "expires_at": expires }),
    )
    .await?;
    tx.commit().await?;
    let mut v = api_keys::get(&mut *s.store.conn().await?, id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("API key {id}")))?;
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
    if !api_keys::revoke(&mut tx, id).await? {
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
