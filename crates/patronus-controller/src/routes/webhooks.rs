//! `/api/v1/webhooks`: admins register URLs to be told of events ([`crate::webhooks`] delivers
//! them), and read how each delivery went.

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::app::{Admin, AppState};
use crate::auth::{self as a};
use crate::error::{ApiError, extract};
use crate::routes::{Page, Paging, check_if_match, created, patched, with_etag, write_error};
use crate::store::{Conn, Store, now_ms, now_s};
use crate::webhooks::EventKind;

/// Every webhook secret starts with this.
pub const SECRET_PREFIX: &str = "whsec_";

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_webhooks, create_webhook))
        .routes(routes!(show_webhook, update_webhook, remove_webhook))
        .routes(routes!(ping_webhook))
        .routes(routes!(list_deliveries))
        .routes(routes!(retry_delivery))
}

use crate::store::webhooks as store;
pub use crate::store::webhooks::{DeliveryView, WebhookSpec, WebhookView};

async fn load(conn: &mut Conn, id: i64) -> Result<WebhookView, ApiError> {
    store::get(conn, id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("webhook {id}")))
}

/// Validates a webhook; `allowed` are the internal networks it may post to. A URL naming an
/// internal address is refused here; one naming a host is checked again at every delivery, on
/// what the name resolves to then.
fn check(spec: &mut WebhookSpec, allowed: &[patronus_api::Prefix]) -> Result<(), ApiError> {
    let mut e = patronus_api::FieldErrors::default();
    spec.url = spec.url.trim().to_owned();
    match crate::webhooks::check_url(&spec.url) {
        Err(why) => e.push("url", why),
        Ok(uri) => {
            let host = uri.host().unwrap_or_default();
            let bare = host.trim_start_matches('[').trim_end_matches(']');
            let ip = match bare.parse::<std::net::IpAddr>() {
                Ok(ip) => Some(ip),
                // `localhost` is loopback by definition (RFC 6761), whatever a resolver says.
                Err(_)
                    if bare.eq_ignore_ascii_case("localhost")
                        || bare.to_ascii_lowercase().ends_with(".localhost") =>
                {
                    Some(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST))
                }
                Err(_) => None,
            };
            if let Some(Err(why)) = ip.map(|ip| crate::webhooks::check_destination(ip, allowed)) {
                e.push("url", why);
            }
        }
    }
    if spec.events.is_empty() {
        e.push("events", "name at least one event");
    }
    if spec.events.contains(&EventKind::Ping) {
        e.push(
            "events",
            "ping is sent on request (POST .../ping), not subscribed to",
        );
    }
    spec.events.sort_by_key(|k| k.as_str());
    spec.events.dedup();
    if spec.description.chars().count() > 500 {
        e.push("description", "must be at most 500 characters");
    }
    e.into_result().map_err(ApiError::validation)
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
}

#[utoipa::path(
    get,
    path = "/api/v1/webhooks",
    tag = "webhooks",
    summary = "List webhooks (never their secrets).",
    params(ListQuery),
    security(("bearer" = ["admin"])),
    responses((status = 200, body = Page<WebhookView>))
)]
async fn list_webhooks(
    State(s): State<AppState>,
    Admin(_p): Admin,
    extract::Query(q): extract::Query<ListQuery>,
) -> Result<axum::Json<Page<WebhookView>>, ApiError> {
    let paging = Paging::new(q.limit, q.offset)?;
    let (items, total) =
        store::page(&mut *s.store.conn().await?, (paging.limit, paging.offset)).await?;
    Ok(axum::Json(Page::new(items, total, paging)))
}

#[utoipa::path(
    post,
    path = "/api/v1/webhooks",
    tag = "webhooks",
    summary = "Register a webhook; its signing secret is in this response only.",
    request_body = WebhookSpec,
    security(("bearer" = ["admin"])),
    responses((status = 201, body = WebhookView))
)]
async fn create_webhook(
    State(s): State<AppState>,
    Admin(p): Admin,
    extract::Json(mut spec): extract::Json<WebhookSpec>,
) -> Result<Response, ApiError> {
    check(&mut spec, &s.config.webhook_allowed_networks)?;
    let secret = format!("{SECRET_PREFIX}{}", a::b64url(&a::random_bytes::<32>()));
    let now = now_s();
    let mut tx = s.store.begin().await?;
    let id = store::insert(&mut tx, &spec, &secret, now).await?;
    Store::audit(
        &mut tx,
        &p.actor(),
        "webhook.create",
        &format!("webhook/{id}"),
        json!({ "url": spec.url, "events": spec.events }),
    )
    .await?;
    tx.commit().await?;
    let mut v = load(&mut *s.store.conn().await?, id).await?;
    v.secret = Some(secret);
    Ok(created(format!("/api/v1/webhooks/{id}"), v.version, v))
}

#[utoipa::path(
    get,
    path = "/api/v1/webhooks/{id}",
    tag = "webhooks",
    summary = "Read a webhook.",
    params(("id" = i64, Path, description = "The object's id")),
    security(("bearer" = ["admin"])),
    responses((status = 200, body = WebhookView))
)]
async fn show_webhook(
    State(s): State<AppState>,
    Admin(_p): Admin,
    extract::Path(id): extract::Path<i64>,
) -> Result<Response, ApiError> {
    let v = load(&mut *s.store.conn().await?, id).await?;
    Ok(with_etag(StatusCode::OK, v.version, v))
}

#[utoipa::path(
    patch,
    path = "/api/v1/webhooks/{id}",
    tag = "webhooks",
    summary = "Change a webhook (JSON merge patch; If-Match): its URL, events, description, \
               or `enabled`.",
    params(("id" = i64, Path, description = "The object's id")),
    request_body(content = serde_json::Value, description = "A JSON merge patch (RFC 7386) of the object"),
    security(("bearer" = ["admin"])),
    responses((status = 200, body = WebhookView))
)]
async fn update_webhook(
    State(s): State<AppState>,
    Admin(p): Admin,
    extract::Path(id): extract::Path<i64>,
    headers: HeaderMap,
    extract::Json(patch): extract::Json<Value>,
) -> Result<Response, ApiError> {
    let mut tx = s.store.begin().await?;
    let cur = load(&mut tx, id).await?;
    check_if_match(&headers, cur.version)?;
    let mut spec: WebhookSpec = patched(&cur.spec, &patch)?;
    check(&mut spec, &s.config.webhook_allowed_networks)?;
    store::update(&mut tx, (id, cur.version), &spec, now_s())
        .await
        .map_err(|e| write_error(e, "webhook", || "conflict".into()))?;
    Store::audit(
        &mut tx,
        &p.actor(),
        "webhook.update",
        &format!("webhook/{id}"),
        patch,
    )
    .await?;
    let v = load(&mut tx, id).await?;
    tx.commit().await?;
    Ok(with_etag(StatusCode::OK, v.version, v))
}

#[utoipa::path(
    delete,
    path = "/api/v1/webhooks/{id}",
    tag = "webhooks",
    summary = "Delete a webhook and its deliveries.",
    params(("id" = i64, Path, description = "The object's id")),
    security(("bearer" = ["admin"])),
    responses((status = 204, description = "Deleted"))
)]
async fn remove_webhook(
    State(s): State<AppState>,
    Admin(p): Admin,
    extract::Path(id): extract::Path<i64>,
    headers: HeaderMap,
) -> Result<StatusCode, ApiError> {
    let mut tx = s.store.begin().await?;
    let cur = load(&mut tx, id).await?;
    check_if_match(&headers, cur.version)?;
    store::delete(&mut tx, id).await?;
    Store::audit(
        &mut tx,
        &p.actor(),
        "webhook.delete",
        &format!("webhook/{id}"),
        json!({ "url": cur.spec.url }),
    )
    .await?;
    tx.commit().await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Queued {
    /// The event's id (the body's `id`).
    pub event_id: String,
}

#[utoipa::path(
    post,
    path = "/api/v1/webhooks/{id}/ping",
    tag = "webhooks",
    summary = "Send this webhook a `ping` event now, to test it; see its deliveries for how it went.",
    params(("id" = i64, Path, description = "The object's id")),
    security(("bearer" = ["admin"])),
    responses((status = 202, body = Queued), crate::error::Conflict)
)]
async fn ping_webhook(
    State(s): State<AppState>,
    Admin(p): Admin,
    extract::Path(id): extract::Path<i64>,
) -> Result<Response, ApiError> {
    let hook = load(&mut *s.store.conn().await?, id).await?;
    if !hook.spec.enabled {
        return Err(ApiError::conflict(format!(
            "webhook {id} is disabled: enable it first"
        )));
    }
    let event_id = crate::webhooks::emit(
        &s,
        EventKind::Ping,
        json!({ "webhook_id": id, "by": p.actor().name }),
        Some(id),
    )
    .await?
    .ok_or_else(|| ApiError::internal("the ping was not queued"))?;
    Ok((StatusCode::ACCEPTED, axum::Json(Queued { event_id })).into_response())
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct DeliveryQuery {
    /// Items per page, 1 to 500; 50 when left out.
    #[param(minimum = 1, maximum = 500)]
    pub limit: Option<i64>,
    /// Items to skip; 0 when left out.
    #[param(minimum = 0, maximum = 9007199254740991.0)]
    pub offset: Option<i64>,
    /// `pending`, `delivered` or `failed`.
    pub status: Option<String>,
    /// An event kind, e.g. `failover`.
    pub event: Option<String>,
}

#[utoipa::path(
    get,
    path = "/api/v1/webhooks/{id}/deliveries",
    tag = "webhooks",
    summary = "This webhook's deliveries, newest first.",
    params(("id" = i64, Path, description = "The object's id"), DeliveryQuery),
    security(("bearer" = ["admin"])),
    responses((status = 200, body = Page<DeliveryView>))
)]
async fn list_deliveries(
    State(s): State<AppState>,
    Admin(_p): Admin,
    extract::Path(id): extract::Path<i64>,
    extract::Query(q): extract::Query<DeliveryQuery>,
) -> Result<axum::Json<Page<DeliveryView>>, ApiError> {
    let paging = Paging::new(q.limit, q.offset)?;
    load(&mut *s.store.conn().await?, id).await?;
    if let Some(st) = &q.status {
        if !matches!(st.as_str(), "pending" | "delivered" | "failed") {
            return Err(ApiError::field(
                "status",
                "must be pending, delivered or failed",
            ));
        }
    }
    let (items, total) = store::deliveries(
        &mut *s.store.conn().await?,
        id,
        (q.status.as_deref(), q.event.as_deref()),
        (paging.limit, paging.offset),
    )
    .await?;
    Ok(axum::Json(Page::new(items, total, paging)))
}

#[utoipa::path(
    post,
    path = "/api/v1/webhooks/{id}/deliveries/{delivery_id}/retry",
    tag = "webhooks",
    summary = "Try a failed delivery again, now (its attempts start over).",
    params(
        ("id" = i64, Path, description = "The webhook's id"),
        ("delivery_id" = i64, Path, description = "The delivery's id")
    ),
    security(("bearer" = ["admin"])),
    responses((status = 202, description = "Queued"), crate::error::Conflict)
)]
async fn retry_delivery(
    State(s): State<AppState>,
    Admin(_p): Admin,
    extract::Path((id, delivery)): extract::Path<(i64, i64)>,
) -> Result<StatusCode, ApiError> {
    let status = store::delivery_status(&mut *s.store.conn().await?, id, delivery).await?;
    match status.as_deref() {
        None => Err(ApiError::not_found(format!(
            "delivery {delivery} of webhook {id}"
        ))),
        Some("failed") => {
            store::retry(&mut *s.store.conn().await?, delivery, now_ms()).await?;
            s.store.webhook_wake().notify_one();
            Ok(StatusCode::ACCEPTED)
        }
        Some(other) => Err(ApiError::conflict(format!(
            "delivery {delivery} is {other}: only a failed one is tried again"
        ))),
    }
}
