//! `/api/v1/sites` and `/api/v1/sites/{id}/links`: the sites of the network and their WAN links.
//!
//! A link is stored as the very [`patronus_api::Link`] the edges will receive. LAN prefixes are
//! valid CIDRs by type, and never overlap, within a site or between sites (409 naming the other
//! site). Deleting a site deletes its links. Updates are JSON merge patches (RFC 7386) checked
//! against the version in `If-Match`.

pub mod enrollment_tokens;
pub mod links;
pub mod replace_edge;
pub mod rotate_key;

use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use patronus_api::{Link, Prefix};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::app::{AppState, Operator, Principal};
use crate::error::{ApiError, extract};
use crate::routes::{
    Page, Paging, audit_config, check_if_match, created, patched, with_etag, write_error,
};
use crate::store::now_s;
use crate::store::sites::{self as store, SiteFilter, SiteSpec};
pub use crate::store::sites::{
    LinkView, MAX_LINKS, SiteStatus, SiteView, link_from_row, load_site, load_sites, validate_links,
};

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_sites, create_site))
        .routes(routes!(show_site, update_site, remove_site))
        .merge(links::routes())
        .merge(enrollment_tokens::routes())
        .merge(rotate_key::routes())
        .merge(replace_edge::routes())
}

/// 409 if one of `prefixes` overlaps a prefix of another site.
async fn check_overlap(
    tx: &mut crate::store::Tx,
    site_id: Option<i64>,
    prefixes: &[Prefix],
) -> Result<(), ApiError> {
    let overlay = crate::routes::topology::overlay_prefix(tx).await?;
    for (i, p) in prefixes.iter().enumerate() {
        if p.overlaps(&overlay) {
            return Err(ApiError::conflict(format!(
                "lan_prefixes[{i}]: {p} overlaps the overlay prefix {overlay}"
            )));
        }
    }
    for (i, p) in prefixes.iter().enumerate() {
        if let Some((name, q)) = store::overlapping(tx, site_id, p).await? {
            let mut e = ApiError::conflict(format!(
                "lan_prefixes[{i}]: {p} overlaps {q} of site {name}"
            ));
            e.details = Some(json!([{ "field": format!("lan_prefixes[{i}]"),
                "problem": format!("overlaps {q} of site {name}") }]));
            return Err(e);
        }
    }
    Ok(())
}

pub(crate) async fn insert_link(
    tx: &mut crate::store::Tx,
    site_id: i64,
    link: &Link,
) -> Result<i64, ApiError> {
    store::insert_link(tx, site_id, link, now_s())
        .await
        .map_err(|e| {
            write_error(e, "link", || {
                format!("the site already has a link named {}", link.name)
            })
        })
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
    /// Exact name.
    pub name: Option<String>,
    /// Part of the name, description or location.
    pub q: Option<String>,
    pub status: Option<SiteStatus>,
    /// `id` (default), `name`, `created_at`, `updated_at`; `-` in front for descending.
    pub sort: Option<String>,
}

#[utoipa::path(
    get,
    path = "/api/v1/sites",
    tag = "sites",
    summary = "List sites with their links.",
    params(ListQuery),
    security(("bearer" = ["viewer"])),
    responses((status = 200, body = Page<SiteView>))
)]
async fn list_sites(
    State(s): State<AppState>,
    _p: Principal,
    extract::Query(q): extract::Query<ListQuery>,
) -> Result<Json<Page<SiteView>>, ApiError> {
    let paging = Paging::new(q.limit, q.offset)?;
    let sort = q.sort.as_deref().unwrap_or("id");
    let (desc, key) = sort.strip_prefix('-').map_or((false, sort), |k| (true, k));
    let column = match key {
        k if store::SORT_KEYS.contains(&k) => key,
        _ => {
            return Err(ApiError::field(
                "sort",
                "must be one of id, name, created_at, updated_at (- in front for descending)",
            ));
        }
    };
    let filter = SiteFilter {
        name: q.name,
        status: q.status,
        text: q.q,
    };
    let mut conn = s.store.conn().await?;
    let (mut items, total) = store::page(
        &mut conn,
        &filter,
        column,
        desc,
        paging.limit,
        paging.offset,
    )
    .await?;
    with_presence(&s, &mut conn, &mut items).await?;
    Ok(Json(Page::new(items, total, paging)))
}

#[utoipa::path(
    post,
    path = "/api/v1/sites",
    tag = "sites",
    summary = "Create a site, with its links.",
    request_body = SiteSpec,
    security(("bearer" = ["operator"])),
    responses((status = 201, body = SiteView), crate::error::Conflict)
)]
async fn create_site(
    State(s): State<AppState>,
    Operator(p): Operator,
    extract::Json(spec): extract::Json<SiteSpec>,
) -> Result<Response, ApiError> {
    spec.validate()
        .into_result()
        .map_err(ApiError::validation)?;
    let now = now_s();
    let mut tx = s.store.begin().await?;
    check_overlap(&mut tx, None, &spec.lan_prefixes).await?;
    let id = store::insert(&mut tx, &spec, now)
        .await
        .map_err(|e| write_error(e, "site", || format!("a site named {} exists", spec.name)))?;
    for l in spec.links.iter().flatten() {
        insert_link(&mut tx, id, l).await?;
    }
    crate::routes::topology::allocate(&mut tx, id).await?;
    audit_config(
        &mut tx,
        &p.actor(),
        "site.create",
        &format!("site/{id}"),
        serde_json::to_value(&spec).unwrap_or_default(),
    )
    .await?;
    let site = load_site(&mut tx, id).await?;
    tx.commit().await?;
    Ok(created(format!("/api/v1/sites/{id}"), site.version, site))
}

#[utoipa::path(
    get,
    path = "/api/v1/sites/{id}",
    tag = "sites",
    summary = "Read a site.",
    params(("id" = i64, Path, description = "The object's id")),
    security(("bearer" = ["viewer"])),
    responses((status = 200, body = SiteView))
)]
async fn show_site(
    State(s): State<AppState>,
    _p: Principal,
    extract::Path(id): extract::Path<i64>,
) -> Result<Response, ApiError> {
    let mut conn = s.store.conn().await?;
    let mut site = load_site(&mut conn, id).await?;
    with_presence(&s, &mut conn, std::slice::from_mut(&mut site)).await?;
    Ok(with_etag(StatusCode::OK, site.version, site))
}

#[utoipa::path(
    patch,
    path = "/api/v1/sites/{id}",
    tag = "sites",
    summary = "Change a site (JSON merge patch; If-Match).",
    params(("id" = i64, Path, description = "The object's id")),
    request_body(content = serde_json::Value, description = "A JSON merge patch (RFC 7386) of the object"),
    security(("bearer" = ["operator"])),
    responses((status = 200, body = SiteView), crate::error::Conflict)
)]
async fn update_site(
    State(s): State<AppState>,
    Operator(p): Operator,
    extract::Path(id): extract::Path<i64>,
    headers: HeaderMap,
    extract::Json(patch): extract::Json<Value>,
) -> Result<Response, ApiError> {
    let mut tx = s.store.begin().await?;
    let cur = load_site(&mut tx, id).await?;
    check_if_match(&headers, cur.version)?;
    if patch.get("links").is_some() {
        return Err(ApiError::field(
            "links",
            "links change through /api/v1/sites/{id}/links",
        ));
    }
    let spec: SiteSpec = patched(&cur.spec()?, &patch)?;
    spec.validate()
        .into_result()
        .map_err(ApiError::validation)?;
    check_overlap(&mut tx, Some(id), &spec.lan_prefixes).await?;
    store::update(&mut tx, id, cur.version, &spec, now_s())
        .await
        .map_err(|e| write_error(e, "site", || format!("a site named {} exists", spec.name)))?;
    audit_config(
        &mut tx,
        &p.actor(),
        "site.update",
        &format!("site/{id}"),
        patch,
    )
    .await?;
    let mut site = load_site(&mut tx, id).await?;
    tx.commit().await?;
    with_presence(
        &s,
        &mut *s.store.conn().await?,
        std::slice::from_mut(&mut site),
    )
    .await?;
    Ok(with_etag(StatusCode::OK, site.version, site))
}

#[utoipa::path(
    delete,
    path = "/api/v1/sites/{id}",
    tag = "sites",
    summary = "Delete a site and its links.",
    params(("id" = i64, Path, description = "The object's id")),
    security(("bearer" = ["operator"])),
    responses((status = 204, description = "Deleted"))
)]
async fn remove_site(
    State(s): State<AppState>,
    Operator(p): Operator,
    extract::Path(id): extract::Path<i64>,
    headers: HeaderMap,
) -> Result<StatusCode, ApiError> {
    let mut tx = s.store.begin().await?;
    let cur = load_site(&mut tx, id).await?;
    check_if_match(&headers, cur.version)?;
    // Its links go with it (ON DELETE CASCADE), and so does its place among the hubs.
    store::delete(&mut tx, id).await?;
    audit_config(
        &mut tx,
        &p.actor(),
        "site.delete",
        &format!("site/{id}"),
        json!({ "name": cur.name, "links": cur.links.len() }),
    )
    .await?;
    tx.commit().await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Fills in whether each site's edge is online, as every controller over the database sees it.
async fn with_presence(
    s: &AppState,
    conn: &mut crate::store::Conn,
    sites: &mut [SiteView],
) -> Result<(), ApiError> {
    let ids: Vec<i64> = sites.iter().map(|site| site.id).collect();
    let seen = s.presence_of(conn, &ids).await?;
    let mut versions = crate::store::presence::versions(conn, &ids).await?;
    for site in sites {
        let (online, last_seen) = seen
            .get(&site.id)
            .map_or((false, None), |(o, at)| (*o, Some(*at)));
        site.online = online;
        site.last_seen = last_seen;
        site.edge_version = versions.remove(&site.id);
    }
    Ok(())
}
