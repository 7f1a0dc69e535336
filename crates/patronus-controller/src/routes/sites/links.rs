//! `/api/v1/sites/{id}/links`: a site's WAN links.

use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use patronus_api::Link;
use serde_json::{Value, json};

use crate::app::{AppState, Operator, Principal};
use crate::error::{ApiError, extract};
use crate::routes::sites::{LinkView, MAX_LINKS, insert_link, load_site};
use crate::routes::{Page, audit_config, check_if_match, created, patched, with_etag, write_error};
use crate::store::{Conn, now_s, sites as store};

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_links, create_link))
        .routes(routes!(show_link, update_link, remove_link))
}

async fn load_link(conn: &mut Conn, site: i64, link: i64) -> Result<LinkView, ApiError> {
    store::get_link(conn, site, link)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("link {link} of site {site}")))
}

#[utoipa::path(
    get,
    path = "/api/v1/sites/{id}/links",
    tag = "links",
    summary = "List the links of a site.",
    params(("id" = i64, Path, description = "The object's id")),
    security(("bearer" = ["viewer"])),
    responses((status = 200, body = Page<LinkView>))
)]
async fn list_links(
    State(s): State<AppState>,
    _p: Principal,
    extract::Path(id): extract::Path<i64>,
) -> Result<Json<Page<LinkView>>, ApiError> {
    let site = load_site(&mut *s.store.conn().await?, id).await?;
    let n = site.links.len() as i64;
    Ok(Json(Page {
        items: site.links,
        total: n,
        limit: n,
        offset: 0,
    }))
}

#[utoipa::path(
    post,
    path = "/api/v1/sites/{id}/links",
    tag = "links",
    summary = "Add a WAN link to a site.",
    params(("id" = i64, Path, description = "The object's id")),
    request_body = Link,
    security(("bearer" = ["operator"])),
    responses((status = 201, body = LinkView), crate::error::Conflict)
)]
async fn create_link(
    State(s): State<AppState>,
    Operator(p): Operator,
    extract::Path(id): extract::Path<i64>,
    extract::Json(link): extract::Json<Link>,
) -> Result<Response, ApiError> {
    let mut tx = s.store.begin().await?;
    let site = load_site(&mut tx, id).await?;
    link.validate().map_err(ApiError::validation)?;
    if site.links.len() >= MAX_LINKS {
        return Err(ApiError::field(
            "links",
            format!("at most {MAX_LINKS} links per site"),
        ));
    }
    // A name the site already has is a conflict, found by the insert (UNIQUE (site_id, name)).
    let link_id = insert_link(&mut tx, id, &link).await?;
    audit_config(
        &mut tx,
        &p.actor(),
        "link.create",
        &format!("site/{id}/link/{link_id}"),
        serde_json::to_value(&link).unwrap_or_default(),
    )
    .await?;
    let l = load_link(&mut tx, id, link_id).await?;
    tx.commit().await?;
    Ok(created(
        format!("/api/v1/sites/{id}/links/{link_id}"),
        l.version,
        l,
    ))
}

#[utoipa::path(
    get,
    path = "/api/v1/sites/{id}/links/{link}",
    tag = "links",
    summary = "Read a link.",
    params(("id" = i64, Path, description = "The site's id"), ("link" = i64, Path, description = "The link's id")),
    security(("bearer" = ["viewer"])),
    responses((status = 200, body = LinkView))
)]
async fn show_link(
    State(s): State<AppState>,
    _p: Principal,
    extract::Path((site, link)): extract::Path<(i64, i64)>,
) -> Result<Response, ApiError> {
    let l = load_link(&mut *s.store.conn().await?, site, link).await?;
    Ok(with_etag(StatusCode::OK, l.version, l))
}

#[utoipa::path(
    patch,
    path = "/api/v1/sites/{id}/links/{link}",
    tag = "links",
    summary = "Change a link (JSON merge patch; If-Match).",
    params(("id" = i64, Path, description = "The site's id"), ("link" = i64, Path, description = "The link's id")),
    request_body(content = serde_json::Value, description = "A JSON merge patch (RFC 7386) of the object"),
    security(("bearer" = ["operator"])),
    responses((status = 200, body = LinkView), crate::error::Conflict)
)]
async fn update_link(
    State(s): State<AppState>,
    Operator(p): Operator,
    extract::Path((site, link)): extract::Path<(i64, i64)>,
    headers: HeaderMap,
    extract::Json(patch): extract::Json<Value>,
) -> Result<Response, ApiError> {
    let mut tx = s.store.begin().await?;
    let cur = load_link(&mut tx, site, link).await?;
    check_if_match(&headers, cur.version)?;
    let new: Link = patched(&cur.link, &patch)?;
    new.validate().map_err(ApiError::validation)?;
    store::update_link(&mut tx, link, cur.version, &new, now_s())
        .await
        .map_err(|e| {
            write_error(e, "link", || {
                format!("the site already has a link named {}", new.name)
            })
        })?;
    audit_config(
        &mut tx,
        &p.actor(),
        "link.update",
        &format!("site/{site}/link/{link}"),
        patch,
    )
    .await?;
    let l = load_link(&mut tx, site, link).await?;
    tx.commit().await?;
    Ok(with_etag(StatusCode::OK, l.version, l))
}

#[utoipa::path(
    delete,
    path = "/api/v1/sites/{id}/links/{link}",
    tag = "links",
    summary = "Delete a link.",
    params(("id" = i64, Path, description = "The site's id"), ("link" = i64, Path, description = "The link's id")),
    security(("bearer" = ["operator"])),
    responses((status = 204, description = "Deleted"))
)]
async fn remove_link(
    State(s): State<AppState>,
    Operator(p): Operator,
    extract::Path((site, link)): extract::Path<(i64, i64)>,
    headers: HeaderMap,
) -> Result<StatusCode, ApiError> {
    let mut tx = s.store.begin().await?;
    let cur = load_link(&mut tx, site, link).await?;
    check_if_match(&headers, cur.version)?;
    store::delete_link(&mut tx, link).await?;
    audit_config(
        &mut tx,
        &p.actor(),
        "link.delete",
        &format!("site/{site}/link/{link}"),
        json!({ "name": cur.link.name }),
    )
    .await?;
    tx.commit().await?;
    Ok(StatusCode::NO_CONTENT)
}
