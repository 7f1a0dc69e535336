//! `/api/v1/sites` and `/api/v1/sites/{id}/links`: the sites of the network and their WAN links.
//!
//! A link is stored as the very [`patronus_api::Link`] the edges will receive. LAN prefixes are
//! valid CIDRs by type, and never overlap, within a site or between sites (409 naming the other
//! site). Deleting a site deletes its links. Updates are JSON merge patches (RFC 7386) checked
//! against the version in `If-Match`.

pub mod enrollment_tokens;
pub mod links;
pub mod rotate_key;

use std::collections::HashMap;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use patronus_api::{FieldErrors, Link, Name, Prefix};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sqlx::Row;
use sqlx::sqlite::SqliteRow;

use sqlx::sqlite::SqliteConnection;

use crate::app::{AppState, Operator, Principal};
use crate::error::{ApiError, extract};
use crate::routes::{
    Page, Paging, audit_config, check_if_match, created, inserted, patched, updated, with_etag,
};
use crate::store::{Store, now_s};

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_sites, create_site))
        .routes(routes!(show_site, update_site, remove_site))
        .merge(links::routes())
        .merge(enrollment_tokens::routes())
        .merge(rotate_key::routes())
}

/// Whether a site is meant to carry traffic. (Whether its edge is online comes from the edge.)
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum SiteStatus {
    /// Defined, not yet deployed.
    Planned,
    #[default]
    Active,
    /// Kept, but given no paths.
    Disabled,
}

impl SiteStatus {
    fn as_str(self) -> &'static str {
        match self {
            SiteStatus::Planned => "planned",
            SiteStatus::Active => "active",
            SiteStatus::Disabled => "disabled",
        }
    }
}

/// What a client writes about a site.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SiteSpec {
    pub name: Name,
    #[serde(default)]
    #[schema(max_length = 1000)]
    pub description: String,
    /// Free text: an address, a city.
    #[serde(default)]
    #[schema(max_length = 500)]
    pub location: String,
    /// With `longitude`, or neither.
    #[serde(default)]
    #[schema(minimum = -90, maximum = 90)]
    pub latitude: Option<f64>,
    #[serde(default)]
    #[schema(minimum = -180, maximum = 180)]
    pub longitude: Option<f64>,
    /// No two overlap, here or with another site's, nor with the overlay prefix; none is a
    /// default route.
    #[serde(default)]
    #[schema(max_items = 256)]
    pub lan_prefixes: Vec<Prefix>,
    #[serde(default)]
    pub status: SiteStatus,
    /// On creation only: the site's WAN links. Afterwards, `/sites/{id}/links`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(max_items = 16)]
    pub links: Option<Vec<Link>>,
}

impl SiteSpec {
    fn validate(&self) -> FieldErrors {
        let mut e = FieldErrors::default();
        if self.description.chars().count() > 1000 {
            e.push("description", "must be at most 1000 characters");
        }
        if self.location.chars().count() > 500 {
            e.push("location", "must be at most 500 characters");
        }
        match (self.latitude, self.longitude) {
            (Some(lat), Some(lon)) => {
                if !(lat.is_finite() && (-90.0..=90.0).contains(&lat)) {
                    e.push("latitude", "must be within -90..=90");
                }
                if !(lon.is_finite() && (-180.0..=180.0).contains(&lon)) {
                    e.push("longitude", "must be within -180..=180");
                }
            }
            (None, None) => {}
            _ => e.push("latitude", "latitude and longitude go together"),
        }
        if self.lan_prefixes.len() > 256 {
            e.push("lan_prefixes", "at most 256 prefixes");
        }
        for (i, a) in self.lan_prefixes.iter().enumerate() {
            if a.prefix_len() == 0 {
                e.push(format!("lan_prefixes[{i}]"), "a default route is not a LAN");
            }
            if let Some(j) = self.lan_prefixes[..i].iter().position(|b| b.overlaps(a)) {
                e.push(
                    format!("lan_prefixes[{i}]"),
                    format!("{a} overlaps lan_prefixes[{j}] ({})", self.lan_prefixes[j]),
                );
            }
        }
        if let Some(links) = &self.links {
            validate_links(links, &mut e);
        }
        e
    }
}

/// The most WAN links one site may have.
pub(crate) const MAX_LINKS: usize = 16;

fn validate_links(links: &[Link], e: &mut FieldErrors) {
    if links.len() > MAX_LINKS {
        e.push("links", format!("at most {MAX_LINKS} links per site"));
    }
    for (i, l) in links.iter().enumerate() {
        if let Err(le) = l.validate() {
            e.extend_prefixed(&format!("links[{i}]"), le);
        }
        if links[..i].iter().any(|o| o.name == l.name) {
            e.push(
                format!("links[{i}].name"),
                format!("{} is used twice", l.name),
            );
        }
    }
}

/// A link as the API shows it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct LinkView {
    pub id: i64,
    pub site_id: i64,
    #[serde(flatten)]
    pub link: Link,
    pub version: i64,
    pub created_at: i64,
    pub updated_at: i64,
}

/// A site as the API shows it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct SiteView {
    pub id: i64,
    pub name: String,
    pub description: String,
    pub location: String,
    pub latitude: Option<f64>,
    pub longitude: Option<f64>,
    pub lan_prefixes: Vec<Prefix>,
    pub status: SiteStatus,
    /// Its address in the overlay (see `/api/v1/topology`).
    #[schema(value_type = Option<String>)]
    pub overlay_address: Option<std::net::IpAddr>,
    /// Its edge's WireGuard public key, once the edge has enrolled.
    pub public_key: Option<String>,
    /// The key its edge is rolling to, while it does (peers accept both).
    pub next_public_key: Option<String>,
    /// Key rotations asked for (`POST .../rotate-key`).
    pub key_rotation: i64,
    /// Whether its edge is in touch with the controller (has a request open, or had one in the
    /// last 15 s). False until the edge first connects after the controller started.
    pub online: bool,
    /// When the controller last heard from its edge (unix seconds), since it started.
    pub last_seen: Option<i64>,
    pub links: Vec<LinkView>,
    pub version: i64,
    pub created_at: i64,
    pub updated_at: i64,
}

impl SiteView {
    fn spec(&self) -> Result<SiteSpec, ApiError> {
        Ok(SiteSpec {
            name: Name::new(self.name.clone()).map_err(ApiError::internal)?,
            description: self.description.clone(),
            location: self.location.clone(),
            latitude: self.latitude,
            longitude: self.longitude,
            lan_prefixes: self.lan_prefixes.clone(),
            status: self.status,
            links: None,
        })
    }
}

fn site_from_row(r: &SqliteRow) -> Result<SiteView, ApiError> {
    let prefixes: String = r.try_get("lan_prefixes")?;
    let status: String = r.try_get("status")?;
    Ok(SiteView {
        id: r.try_get("id")?,
        name: r.try_get("name")?,
        description: r.try_get("description")?,
        location: r.try_get("location")?,
        latitude: r.try_get("latitude")?,
        longitude: r.try_get("longitude")?,
        lan_prefixes: serde_json::from_str(&prefixes).map_err(ApiError::internal)?,
        status: serde_json::from_value(Value::String(status)).map_err(ApiError::internal)?,
        overlay_address: None,
        public_key: r.try_get("public_key")?,
        next_public_key: r.try_get("next_public_key")?,
        key_rotation: r.try_get("key_rotation")?,
        online: false,
        last_seen: None,
        links: Vec::new(),
        version: r.try_get("version")?,
        created_at: r.try_get("created_at")?,
        updated_at: r.try_get("updated_at")?,
    })
}

pub(crate) fn link_from_row(r: &SqliteRow) -> Result<LinkView, ApiError> {
    let spec: String = r.try_get("spec")?;
    Ok(LinkView {
        id: r.try_get("id")?,
        site_id: r.try_get("site_id")?,
        link: serde_json::from_str(&spec).map_err(ApiError::internal)?,
        version: r.try_get("version")?,
        created_at: r.try_get("created_at")?,
        updated_at: r.try_get("updated_at")?,
    })
}

/// Fills in the links of `sites` with one query.
async fn attach_links(conn: &mut SqliteConnection, sites: &mut [SiteView]) -> Result<(), ApiError> {
    if sites.is_empty() {
        return Ok(());
    }
    let ids: Vec<String> = sites.iter().map(|s| s.id.to_string()).collect();
    // Ids are integers from the database: safe to inline.
    let sql = format!(
        "SELECT * FROM links WHERE site_id IN ({}) ORDER BY site_id, id",
        ids.join(",")
    );
    let rows = sqlx::query(&sql).fetch_all(&mut *conn).await?;
    let mut by_site: HashMap<i64, Vec<LinkView>> = HashMap::new();
    for r in &rows {
        let l = link_from_row(r)?;
        by_site.entry(l.site_id).or_default().push(l);
    }
    let ids: Vec<i64> = sites.iter().map(|s| s.id).collect();
    let addrs = crate::store::topology::addresses_of(&mut *conn, &ids).await?;
    for s in sites {
        s.links = by_site.remove(&s.id).unwrap_or_default();
        s.overlay_address = addrs.get(&s.id).copied();
    }
    Ok(())
}

/// Every site with its links, in id order.
pub async fn load_sites(conn: &mut SqliteConnection) -> Result<Vec<SiteView>, ApiError> {
    let rows = sqlx::query("SELECT * FROM sites ORDER BY id")
        .fetch_all(&mut *conn)
        .await?;
    let mut sites = rows
        .iter()
        .map(site_from_row)
        .collect::<Result<Vec<_>, _>>()?;
    attach_links(&mut *conn, &mut sites).await?;
    Ok(sites)
}

pub async fn load_site(conn: &mut SqliteConnection, id: i64) -> Result<SiteView, ApiError> {
    let row = sqlx::query("SELECT * FROM sites WHERE id = ?")
        .bind(id)
        .fetch_optional(&mut *conn)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("site {id}")))?;
    let mut s = [site_from_row(&row)?];
    attach_links(&mut *conn, &mut s).await?;
    let [s] = s;
    Ok(s)
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
    let rows = sqlx::query("SELECT id, name, lan_prefixes FROM sites WHERE id != ?")
        .bind(site_id.unwrap_or(-1))
        .fetch_all(&mut **tx)
        .await?;
    for r in &rows {
        let theirs: Vec<Prefix> =
            serde_json::from_str(r.try_get("lan_prefixes")?).map_err(ApiError::internal)?;
        for (i, p) in prefixes.iter().enumerate() {
            if let Some(q) = theirs.iter().find(|q| q.overlaps(p)) {
                let name: String = r.try_get("name")?;
                let mut e = ApiError::conflict(format!(
                    "lan_prefixes[{i}]: {p} overlaps {q} of site {name}"
                ));
                e.details = Some(json!([{ "field": format!("lan_prefixes[{i}]"),
                    "problem": format!("overlaps {q} of site {name}") }]));
                return Err(e);
            }
        }
    }
    Ok(())
}

pub(crate) async fn insert_link(
    tx: &mut crate::store::Tx,
    site_id: i64,
    link: &Link,
) -> Result<i64, ApiError> {
    let now = now_s();
    let r = sqlx::query(
        "INSERT INTO links (site_id, name, spec, created_at, updated_at) VALUES (?, ?, ?, ?, ?)",
    )
    .bind(site_id)
    .bind(link.name.as_str())
    .bind(serde_json::to_string(link).map_err(ApiError::internal)?)
    .bind(now)
    .bind(now)
    .execute(&mut **tx)
    .await;
    inserted(r, || {
        format!("the site already has a link named {}", link.name)
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
        "id" | "name" | "created_at" | "updated_at" => key,
        _ => {
            return Err(ApiError::field(
                "sort",
                "must be one of id, name, created_at, updated_at (- in front for descending)",
            ));
        }
    };
    let mut filter = String::from(" WHERE 1=1");
    let mut binds: Vec<String> = Vec::new();
    if let Some(n) = q.name {
        filter.push_str(" AND name = ?");
        binds.push(n);
    }
    if let Some(st) = q.status {
        filter.push_str(" AND status = ?");
        binds.push(st.as_str().to_owned());
    }
    if let Some(t) = q.q {
        let like = format!(
            "%{}%",
            t.replace('\\', "\\\\")
                .replace('%', "\\%")
                .replace('_', "\\_")
        );
        filter.push_str(
            " AND (name LIKE ? ESCAPE '\\' OR description LIKE ? ESCAPE '\\' OR location LIKE ? ESCAPE '\\')",
        );
        binds.extend([like.clone(), like.clone(), like]);
    }
    let count_sql = format!("SELECT COUNT(*) FROM sites{filter}");
    let mut count = sqlx::query_scalar::<_, i64>(&count_sql);
    for b in &binds {
        count = count.bind(b);
    }
    let total = count.fetch_one(s.store.pool()).await?;
    let sql = format!(
        "SELECT * FROM sites{filter} ORDER BY {column} {}, id LIMIT ? OFFSET ?",
        if desc { "DESC" } else { "ASC" }
    );
    let mut query = sqlx::query(&sql);
    for b in &binds {
        query = query.bind(b);
    }
    let rows = query
        .bind(paging.limit)
        .bind(paging.offset)
        .fetch_all(s.store.pool())
        .await?;
    let mut items = rows
        .iter()
        .map(site_from_row)
        .collect::<Result<Vec<_>, _>>()?;
    attach_links(&mut *s.store.conn().await?, &mut items).await?;
    for site in &mut items {
        (site.online, site.last_seen) = s.presence_of(site.id);
    }
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
    let r = sqlx::query(
        "INSERT INTO sites (name, description, location, latitude, longitude, lan_prefixes,
         status, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(spec.name.as_str())
    .bind(&spec.description)
    .bind(&spec.location)
    .bind(spec.latitude)
    .bind(spec.longitude)
    .bind(serde_json::to_string(&spec.lan_prefixes).map_err(ApiError::internal)?)
    .bind(spec.status.as_str())
    .bind(now)
    .bind(now)
    .execute(&mut *tx)
    .await;
    let id = inserted(r, || format!("a site named {} exists", spec.name))?;
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
    let mut site = load_site(&mut *s.store.conn().await?, id).await?;
    (site.online, site.last_seen) = s.presence_of(id);
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
    let r = sqlx::query(
        "UPDATE sites SET name = ?, description = ?, location = ?, latitude = ?, longitude = ?,
         lan_prefixes = ?, status = ?, version = version + 1, updated_at = ?
         WHERE id = ? AND version = ?",
    )
    .bind(spec.name.as_str())
    .bind(&spec.description)
    .bind(&spec.location)
    .bind(spec.latitude)
    .bind(spec.longitude)
    .bind(serde_json::to_string(&spec.lan_prefixes).map_err(ApiError::internal)?)
    .bind(spec.status.as_str())
    .bind(now_s())
    .bind(id)
    .bind(cur.version)
    .execute(&mut *tx)
    .await;
    updated(r, "site", || format!("a site named {} exists", spec.name))?;
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
    (site.online, site.last_seen) = s.presence_of(id);
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
    Store::delete_row(&mut tx, "sites", id).await?;
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
