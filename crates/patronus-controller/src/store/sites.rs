//! Sites and their WAN links: what a client writes ([`SiteSpec`]), what the API shows
//! ([`SiteView`], [`LinkView`]), and every statement on the `sites` and `links` tables that
//! the site routes make.

use std::collections::HashMap;

use patronus_api::{FieldErrors, Link, Name, Prefix};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::Conn;
#[allow(unused_imports)]
use super::db::{Row, query, query_as, query_scalar};
use super::docs::WriteError;
use crate::error::ApiError;

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
    pub fn as_str(self) -> &'static str {
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
    pub fn validate(&self) -> FieldErrors {
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
pub const MAX_LINKS: usize = 16;

pub fn validate_links(links: &[Link], e: &mut FieldErrors) {
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
    /// Where the controller's STUN responder last saw this link's edge from (`ip:port`, what
    /// NATs made of its address); peers are given it when the link has no `endpoint`.
    #[schema(value_type = Option<String>)]
    pub observed_endpoint: Option<std::net::SocketAddr>,
    /// Since when (Unix seconds) the link has been seen from there.
    pub observed_since: Option<i64>,
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
    /// Whether its edge is in touch with a controller (has a request open with one, or had one
    /// in the last 15 s), whichever controller it is on.
    pub online: bool,
    /// When a controller last heard from its edge (unix seconds); null if none ever did.
    pub last_seen: Option<i64>,
    /// The version of Patronus its edge runs, as its last report said (its `User-Agent`);
    /// null before the first.
    pub edge_version: Option<String>,
    pub links: Vec<LinkView>,
    pub version: i64,
    pub created_at: i64,
    pub updated_at: i64,
}

impl SiteView {
    pub fn spec(&self) -> Result<SiteSpec, ApiError> {
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

fn site_from_row(r: &Row) -> Result<SiteView, ApiError> {
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
        edge_version: None,
        links: Vec::new(),
        version: r.try_get("version")?,
        created_at: r.try_get("created_at")?,
        updated_at: r.try_get("updated_at")?,
    })
}

pub fn link_from_row(r: &Row) -> Result<LinkView, ApiError> {
    let spec: String = r.try_get("spec")?;
    Ok(LinkView {
        id: r.try_get("id")?,
        site_id: r.try_get("site_id")?,
        link: serde_json::from_str(&spec).map_err(ApiError::internal)?,
        observed_endpoint: r
            .try_get::<Option<String>, _>("observed_endpoint")?
            .and_then(|e| e.parse().ok()),
        observed_since: r.try_get("observed_since")?,
        version: r.try_get("version")?,
        created_at: r.try_get("created_at")?,
        updated_at: r.try_get("updated_at")?,
    })
}

impl LinkView {
    /// The link as its peers are told of it: its configured endpoint, else where it was
    /// observed.
    pub fn for_peers(&self) -> Link {
        let mut l = self.link.clone();
        if l.endpoint.is_none() {
            l.endpoint = self.observed_endpoint;
        }
        l
    }
}

/// Records that site `site_id`'s link `link` was seen from `endpoint` (by the STUN
/// responder). `None` if it was already recorded there (or there is no such link); else whether
/// its peers see the change (the link has no configured endpoint, so they are given this one).
pub async fn observe_link(
    conn: &mut Conn,
    site_id: i64,
    link: &str,
    endpoint: std::net::SocketAddr,
    now_s: i64,
) -> Result<Option<bool>, sqlx::Error> {
    let e = endpoint.to_string();
    let spec: Option<String> = query_scalar(
        "UPDATE links SET observed_endpoint = ?, observed_since = ?
         WHERE site_id = ? AND name = ? AND (observed_endpoint IS NULL OR observed_endpoint <> ?)
         RETURNING spec",
    )
    .bind(&e)
    .bind(now_s)
    .bind(site_id)
    .bind(link)
    .bind(&e)
    .fetch_optional(&mut *conn)
    .await?;
    Ok(spec.map(|spec| serde_json::from_str::<Link>(&spec).map_or(true, |l| l.endpoint.is_none())))
}

/// Fills in the links of `sites` with one query.
async fn attach_links(conn: &mut Conn, sites: &mut [SiteView]) -> Result<(), ApiError> {
    if sites.is_empty() {
        return Ok(());
    }
    let ids: Vec<i64> = sites.iter().map(|s| s.id).collect();
    // Chunks split the list by site: each site's links stay in id order.
    let rows = super::rows_for_ids(
        &mut *conn,
        "SELECT * FROM links WHERE site_id IN ({}) ORDER BY site_id, id",
        &ids,
    )
    .await?;
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
pub async fn load_sites(conn: &mut Conn) -> Result<Vec<SiteView>, ApiError> {
    let rows = query("SELECT * FROM sites ORDER BY id")
        .fetch_all(&mut *conn)
        .await?;
    let mut sites = rows
        .iter()
        .map(site_from_row)
        .collect::<Result<Vec<_>, _>>()?;
    attach_links(&mut *conn, &mut sites).await?;
    Ok(sites)
}

pub async fn load_site(conn: &mut Conn, id: i64) -> Result<SiteView, ApiError> {
    load_sites_by_ids(conn, &[id])
        .await?
        .pop()
        .ok_or_else(|| ApiError::not_found(format!("site {id}")))
}

/// A prefix's family and its first and last address as 16 big-endian bytes (how
/// `site_prefixes` keeps them: bytes compare as the addresses do).
fn range_of(p: &Prefix) -> (i64, [u8; 16], [u8; 16]) {
    let (lo, hi) = p.range();
    (
        if p.is_ipv4() { 4 } else { 6 },
        lo.to_be_bytes(),
        hi.to_be_bytes(),
    )
}

/// Indexes site `site_id`'s LAN prefixes (replacing what was indexed for it).
async fn set_prefixes(
    conn: &mut Conn,
    site_id: i64,
    prefixes: &[Prefix],
) -> Result<(), sqlx::Error> {
    query("DELETE FROM site_prefixes WHERE site_id = ?")
        .bind(site_id)
        .execute(&mut *conn)
        .await?;
    for p in prefixes {
        let (family, lo, hi) = range_of(p);
        query("INSERT INTO site_prefixes (site_id, family, lo, hi, prefix) VALUES (?, ?, ?, ?, ?)")
            .bind(site_id)
            .bind(family)
            .bind(&lo[..])
            .bind(&hi[..])
            .bind(p.to_string())
            .execute(&mut *conn)
            .await?;
    }
    Ok(())
}

/// Indexes every site's LAN prefixes (the migration that made the index fills it with this).
pub async fn index_all_prefixes(conn: &mut Conn) -> Result<(), sqlx::Error> {
    let rows: Vec<(i64, String)> = query_as("SELECT id, lan_prefixes FROM sites")
        .fetch_all(&mut *conn)
        .await?;
    for (id, json) in rows {
        let prefixes: Vec<Prefix> =
            serde_json::from_str(&json).map_err(|e| sqlx::Error::ColumnDecode {
                index: format!("sites.lan_prefixes of site {id}"),
                source: Box::new(e),
            })?;
        set_prefixes(conn, id, &prefixes).await?;
    }
    Ok(())
}

/// A LAN prefix of a site other than `except` that overlaps `p`: the site's name and the
/// prefix. One indexed look-up: the sites' prefixes never overlap each other (every write
/// checks), so among those that start at or before `p`'s last address, only the one that
/// starts last can reach `p`.
pub async fn overlapping(
    conn: &mut Conn,
    except: Option<i64>,
    p: &Prefix,
) -> Result<Option<(String, String)>, sqlx::Error> {
    let (family, lo, hi) = range_of(p);
    let row: Option<(String, String, Vec<u8>)> = query_as(
        "SELECT s.name, p.prefix, p.hi FROM site_prefixes p JOIN sites s ON s.id = p.site_id
         WHERE p.family = ? AND p.lo <= ? AND p.site_id != ? ORDER BY p.lo DESC LIMIT 1",
    )
    .bind(family)
    .bind(&hi[..])
    .bind(except.unwrap_or(-1))
    .fetch_optional(&mut *conn)
    .await?;
    Ok(row.and_then(|(name, prefix, their_hi)| {
        (their_hi.as_slice() >= &lo[..]).then_some((name, prefix))
    }))
}

/// Stores `link` as a new link of site `site_id`; its id.
pub async fn insert_link(
    conn: &mut Conn,
    site_id: i64,
    link: &Link,
    now: i64,
) -> Result<i64, WriteError> {
    let r = query_scalar::<i64>(
        "INSERT INTO links (site_id, name, spec, created_at, updated_at) VALUES (?, ?, ?, ?, ?) RETURNING id",
    )
    .bind(site_id)
    .bind(link.name.as_str())
    .bind(serde_json::to_string(link).map_err(WriteError::Encode)?)
    .bind(now)
    .bind(now)
    .fetch_one(&mut *conn)
    .await?;
    Ok(r)
}

/// Link `link` of site `site`, if there is one.
pub async fn get_link(conn: &mut Conn, site: i64, link: i64) -> Result<Option<LinkView>, ApiError> {
    let row = query("SELECT * FROM links WHERE id = ? AND site_id = ?")
        .bind(link)
        .bind(site)
        .fetch_optional(&mut *conn)
        .await?;
    row.as_ref().map(link_from_row).transpose()
}

/// Replaces link `id`, if it is still at `version`, with `link` as the next version.
pub async fn update_link(
    conn: &mut Conn,
    id: i64,
    version: i64,
    link: &Link,
    now: i64,
) -> Result<(), WriteError> {
    let r = query(
        "UPDATE links SET name = ?, spec = ?, version = version + 1, updated_at = ?
         WHERE id = ? AND version = ?",
    )
    .bind(link.name.as_str())
    .bind(serde_json::to_string(link).map_err(WriteError::Encode)?)
    .bind(now)
    .bind(id)
    .bind(version)
    .execute(&mut *conn)
    .await?;
    super::one_row_changed(r)
}

/// Deletes link `id`.
pub async fn delete_link(conn: &mut Conn, id: i64) -> Result<(), sqlx::Error> {
    super::delete_by_id(conn, "links", id).await
}

/// Asks site `id`'s edge to roll its key (counts one more rotation, as a new version of the
/// site); the new count, or none if the site has no edge yet (or is gone).
pub async fn ask_rotation(conn: &mut Conn, id: i64, now: i64) -> Result<Option<i64>, sqlx::Error> {
    query_scalar(
        "UPDATE sites SET key_rotation = key_rotation + 1, version = version + 1, updated_at = ?
         WHERE id = ? AND public_key IS NOT NULL RETURNING key_rotation",
    )
    .bind(now)
    .bind(id)
    .fetch_optional(&mut *conn)
    .await
}

/// The sites whose edges are rolling their keys (id, name).
pub async fn rolling(conn: &mut Conn) -> Result<Vec<(i64, String)>, sqlx::Error> {
    query_as("SELECT id, name FROM sites WHERE next_public_key IS NOT NULL")
        .fetch_all(&mut *conn)
        .await
}

/// Site `id`'s edge's key and the key it is rolling to, if any.
pub async fn keys(
    conn: &mut Conn,
    id: i64,
) -> Result<(Option<String>, Option<String>), sqlx::Error> {
    query_as("SELECT public_key, next_public_key FROM sites WHERE id = ?")
        .bind(id)
        .fetch_one(&mut *conn)
        .await
}

/// The name of a site other than `except` whose key, or next key, is `key`.
pub async fn key_owner(
    conn: &mut Conn,
    except: i64,
    key: &str,
) -> Result<Option<String>, sqlx::Error> {
    query_scalar("SELECT name FROM sites WHERE id != ? AND (public_key = ? OR next_public_key = ?)")
        .bind(except)
        .bind(key)
        .bind(key)
        .fetch_optional(&mut *conn)
        .await
}

/// Site `id`'s edge announces the key it rolls to.
pub async fn set_next_key(
    conn: &mut Conn,
    id: i64,
    key: &str,
    now: i64,
) -> Result<(), sqlx::Error> {
    query(
        "UPDATE sites SET next_public_key = ?, version = version + 1, updated_at = ? WHERE id = ?",
    )
    .bind(key)
    .bind(now)
    .bind(id)
    .execute(&mut *conn)
    .await
    .map(|_| ())
}

/// Site `id`'s edge finished its roll: `key` is its key.
pub async fn commit_key(conn: &mut Conn, id: i64, key: &str, now: i64) -> Result<(), sqlx::Error> {
    query(
        "UPDATE sites SET public_key = ?, next_public_key = NULL, version = version + 1,
         updated_at = ? WHERE id = ?",
    )
    .bind(key)
    .bind(now)
    .bind(id)
    .execute(&mut *conn)
    .await
    .map(|_| ())
}

/// Every active site's id and number of links, in id order: what the paths between them
/// are counted and paged by, without reading the sites themselves.
pub async fn active_link_counts(conn: &mut Conn) -> Result<Vec<(i64, i64)>, sqlx::Error> {
    query_as(
        "SELECT s.id, COUNT(l.id) FROM sites s LEFT JOIN links l ON l.site_id = s.id
         WHERE s.status = 'active' GROUP BY s.id ORDER BY s.id",
    )
    .fetch_all(&mut *conn)
    .await
}

/// The sites `ids` (those that exist), with their links and overlay addresses, in id order.
pub async fn load_sites_by_ids(conn: &mut Conn, ids: &[i64]) -> Result<Vec<SiteView>, ApiError> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let rows = super::rows_for_ids(&mut *conn, "SELECT * FROM sites WHERE id IN ({})", ids).await?;
    let mut sites = rows
        .iter()
        .map(site_from_row)
        .collect::<Result<Vec<_>, _>>()?;
    sites.sort_by_key(|s| s.id);
    attach_links(&mut *conn, &mut sites).await?;
    Ok(sites)
}

/// The site each of these links belongs to (those that exist): (link, site).
pub async fn link_sites(conn: &mut Conn, links: &[i64]) -> Result<Vec<(i64, i64)>, sqlx::Error> {
    if links.is_empty() {
        return Ok(Vec::new());
    }
    super::rows_for_ids(
        &mut *conn,
        "SELECT id, site_id FROM links WHERE id IN ({})",
        links,
    )
    .await?
    .iter()
    .map(|r| Ok((r.try_get("id")?, r.try_get("site_id")?)))
    .collect()
}

/// Site `id`'s name, if there is such a site.
pub async fn name_of(conn: &mut Conn, id: i64) -> Result<Option<String>, sqlx::Error> {
    query_scalar("SELECT name FROM sites WHERE id = ?")
        .bind(id)
        .fetch_optional(&mut *conn)
        .await
}

/// Which sites a list shows.
#[derive(Debug, Default)]
pub struct SiteFilter {
    /// Exact name.
    pub name: Option<String>,
    pub status: Option<SiteStatus>,
    /// Part of the name, description or location.
    pub text: Option<String>,
}

/// The list's sort keys (columns).
pub const SORT_KEYS: [&str; 4] = ["id", "name", "created_at", "updated_at"];

/// A page of sites (with their links and overlay addresses) by `filter`, sorted by `column`
/// (one of [`SORT_KEYS`]), and how many match in all. Costs what the page holds.
pub async fn page(
    conn: &mut Conn,
    filter: &SiteFilter,
    column: &str,
    desc: bool,
    limit: i64,
    offset: i64,
) -> Result<(Vec<SiteView>, i64), ApiError> {
    let Some(column) = SORT_KEYS.iter().find(|k| **k == column) else {
        return Err(ApiError::internal(format!("sort column {column}")));
    };
    let mut sql = String::from(" WHERE 1=1");
    let mut binds: Vec<String> = Vec::new();
    if let Some(n) = &filter.name {
        sql.push_str(" AND name = ?");
        binds.push(n.clone());
    }
    if let Some(st) = filter.status {
        sql.push_str(" AND status = ?");
        binds.push(st.as_str().to_owned());
    }
    if let Some(t) = &filter.text {
        let like = format!(
            "%{}%",
            t.replace('\\', "\\\\")
                .replace('%', "\\%")
                .replace('_', "\\_")
        );
        sql.push_str(
            " AND (lower(name) LIKE lower(?) ESCAPE '\\' OR lower(description) LIKE lower(?) ESCAPE '\\' \
               OR lower(location) LIKE lower(?) ESCAPE '\\')",
        );
        binds.extend([like.clone(), like.clone(), like]);
    }
    let count_sql = format!("SELECT COUNT(*) FROM sites{sql}");
    let mut count = query_scalar::<i64>(&count_sql);
    for b in &binds {
        count = count.bind(b);
    }
    let total = count.fetch_one(&mut *conn).await?;
    let list_sql = format!(
        "SELECT * FROM sites{sql} ORDER BY {column} {}, id LIMIT ? OFFSET ?",
        if desc { "DESC" } else { "ASC" }
    );
    let mut query = query(&list_sql);
    for b in &binds {
        query = query.bind(b);
    }
    let rows = query.bind(limit).bind(offset).fetch_all(&mut *conn).await?;
    let mut items = rows
        .iter()
        .map(site_from_row)
        .collect::<Result<Vec<_>, _>>()?;
    attach_links(&mut *conn, &mut items).await?;
    Ok((items, total))
}

/// Stores a new site (version 1, without its links); its id.
pub async fn insert(conn: &mut Conn, spec: &SiteSpec, now: i64) -> Result<i64, WriteError> {
    let r = query_scalar::<i64>(
        "INSERT INTO sites (name, description, location, latitude, longitude, lan_prefixes,
         status, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
    )
    .bind(spec.name.as_str())
    .bind(&spec.description)
    .bind(&spec.location)
    .bind(spec.latitude)
    .bind(spec.longitude)
    .bind(serde_json::to_string(&spec.lan_prefixes).map_err(WriteError::Encode)?)
    .bind(spec.status.as_str())
    .bind(now)
    .bind(now)
    .fetch_one(&mut *conn)
    .await?;
    let id = r;
    set_prefixes(conn, id, &spec.lan_prefixes).await?;
    Ok(id)
}

/// Replaces site `id`'s fields (not its links), if it is still at `version`.
pub async fn update(
    conn: &mut Conn,
    id: i64,
    version: i64,
    spec: &SiteSpec,
    now: i64,
) -> Result<(), WriteError> {
    let r = query(
        "UPDATE sites SET name = ?, description = ?, location = ?, latitude = ?, longitude = ?,
         lan_prefixes = ?, status = ?, version = version + 1, updated_at = ?
         WHERE id = ? AND version = ?",
    )
    .bind(spec.name.as_str())
    .bind(&spec.description)
    .bind(&spec.location)
    .bind(spec.latitude)
    .bind(spec.longitude)
    .bind(serde_json::to_string(&spec.lan_prefixes).map_err(WriteError::Encode)?)
    .bind(spec.status.as_str())
    .bind(now)
    .bind(id)
    .bind(version)
    .execute(&mut *conn)
    .await?;
    super::one_row_changed(r)?;
    set_prefixes(conn, id, &spec.lan_prefixes).await?;
    Ok(())
}

/// Deletes site `id`; its links, overlay address and place among the hubs go with it (ON
/// DELETE CASCADE).
pub async fn delete(conn: &mut Conn, id: i64) -> Result<(), sqlx::Error> {
    super::delete_by_id(conn, "sites", id).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, prefixes: &[&str]) -> SiteSpec {
        serde_json::from_value(serde_json::json!({ "name": name, "lan_prefixes": prefixes }))
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// An overlap is found by one look-up in the index, whatever the number of sites (the
    /// query plan says so: no scan of the table), on either side of the new prefix; a site's own
    /// prefixes do not count against it; and the migration's fill indexes sites written before
    /// the index existed.
    #[tokio::test]
    async fn overlaps_are_found_through_the_index_and_the_index_is_filled_for_old_sites() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let store = super::super::Store::open(&dir.path().join("db.sqlite"))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let mut tx = store.begin().await.unwrap_or_else(|e| panic!("{e}"));
        let a = insert(&mut tx, &spec("a", &["10.1.0.0/16", "2001:db8:1::/48"]), 0)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        insert(&mut tx, &spec("b", &["10.3.0.0/24"]), 0)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let over = async |tx: &mut super::super::Tx, except, p: &str| {
            overlapping(tx, except, &p.parse().unwrap_or_else(|e| panic!("{e}")))
                .await
                .unwrap_or_else(|e| panic!("{e}"))
        };
        let hit = |site: &str, prefix: &str| Some((site.to_owned(), prefix.to_owned()));
        // Inside, around, and across the start of a's prefix; after b's; between them.
        assert_eq!(
            over(&mut tx, None, "10.1.2.0/24").await,
            hit("a", "10.1.0.0/16")
        );
        assert_eq!(
            over(&mut tx, None, "10.0.0.0/8").await,
            hit("b", "10.3.0.0/24")
        );
        assert_eq!(
            over(&mut tx, None, "10.0.0.0/15").await,
            hit("a", "10.1.0.0/16")
        );
        assert_eq!(
            over(&mut tx, None, "10.3.0.128/25").await,
            hit("b", "10.3.0.0/24")
        );
        assert_eq!(over(&mut tx, None, "10.2.0.0/16").await, None);
        assert_eq!(over(&mut tx, None, "10.4.0.0/16").await, None);
        assert_eq!(
            over(&mut tx, None, "2001:db8::/32").await,
            hit("a", "2001:db8:1::/48")
        );
        // IPv4 and IPv6 never meet; a site's own prefixes are not in its way.
        assert_eq!(over(&mut tx, None, "::/96").await, None);
        assert_eq!(over(&mut tx, Some(a), "10.1.2.0/24").await, None);

        let plan: Vec<(i64, i64, i64, String)> = query_as(
            "EXPLAIN QUERY PLAN SELECT s.name, p.prefix, p.hi FROM site_prefixes p
             JOIN sites s ON s.id = p.site_id
             WHERE p.family = 4 AND p.lo <= x'00' AND p.site_id != 1 ORDER BY p.lo DESC LIMIT 1",
        )
        .fetch_all(&mut *tx)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
        let plan: Vec<&str> = plan.iter().map(|r| r.3.as_str()).collect();
        assert!(
            plan.iter()
                .any(|d| d.contains("USING INDEX site_prefixes_lo")),
            "{plan:?}"
        );
        assert!(!plan.iter().any(|d| d.starts_with("SCAN")), "{plan:?}");

        // Sites from before the index: the migration's fill finds them.
        query("DELETE FROM site_prefixes")
            .execute(&mut *tx)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(over(&mut tx, None, "10.1.2.0/24").await, None);
        index_all_prefixes(&mut tx)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            over(&mut tx, None, "10.1.2.0/24").await,
            hit("a", "10.1.0.0/16")
        );
    }
}
