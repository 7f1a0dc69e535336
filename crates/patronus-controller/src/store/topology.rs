//! The topology row, the hubs and the overlay address plan (see `routes::topology`).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use patronus_api::Prefix;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::Conn;
#[allow(unused_imports)]
use super::db::{Row, query, query_as, query_scalar};
use super::docs::WriteError;
use crate::error::ApiError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    FullMesh,
    HubSpoke,
}

/// The topology as stored.
#[derive(Debug, Clone)]
pub struct Topology {
    pub mode: Mode,
    pub overlay_prefix: Prefix,
    pub hubs: BTreeSet<i64>,
    pub version: i64,
    pub updated_at: i64,
}

pub async fn load(conn: &mut Conn) -> Result<Topology, ApiError> {
    let row = query("SELECT mode, overlay_prefix, version, updated_at FROM topology WHERE id = 1")
        .fetch_one(&mut *conn)
        .await?;
    let hubs = query_scalar::<i64>("SELECT site_id FROM hubs")
        .fetch_all(&mut *conn)
        .await?;
    Ok(Topology {
        mode: serde_json::from_value(Value::String(row.try_get("mode")?))
            .map_err(ApiError::internal)?,
        overlay_prefix: row
            .try_get::<String, _>("overlay_prefix")?
            .parse()
            .map_err(ApiError::internal)?,
        hubs: hubs.into_iter().collect(),
        version: row.try_get("version")?,
        updated_at: row.try_get("updated_at")?,
    })
}

/// The overlay prefix, inside a transaction.
pub async fn overlay_prefix(tx: &mut crate::store::Tx) -> Result<Prefix, ApiError> {
    let p: String = query_scalar("SELECT overlay_prefix FROM topology WHERE id = 1")
        .fetch_one(&mut **tx)
        .await?;
    p.parse().map_err(ApiError::internal)
}

/// Host numbers usable in `p`: not the network address, nor the IPv4 broadcast. (Capped for
/// IPv6: nobody has 2^32 sites.)
pub fn host_range(p: &Prefix) -> (u128, u128) {
    let (lo, hi) = p.range();
    let size = hi - lo + 1;
    let last = if p.is_ipv4() {
        size.saturating_sub(2)
    } else {
        (size - 1).min(u128::from(u32::MAX))
    };
    (1, last)
}

pub fn host_addr(p: &Prefix, host: u128) -> IpAddr {
    let (lo, _) = p.range();
    match p.addr() {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::from((lo + host) as u32)),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::from(lo + host)),
    }
}

/// Gives `site` the lowest free overlay address, in the site's own transaction. The gap is found
/// by the database (the lowest used host whose successor is free), not by reading every
/// address.
pub async fn allocate(tx: &mut crate::store::Tx, site: i64) -> Result<IpAddr, ApiError> {
    let prefix = overlay_prefix(tx).await?;
    let (first, last) = host_range(&prefix);
    // Hosts are unique and start at 1: when the largest equals the count there is no gap, and
    // the next is one more (the common case, without looking for a gap).
    let host: i64 = query_scalar(
        "SELECT CASE WHEN NOT EXISTS (SELECT 1 FROM overlay_addresses WHERE host = ?1) THEN ?1
         WHEN (SELECT MAX(host) FROM overlay_addresses) = (SELECT COUNT(*) FROM overlay_addresses)
         THEN (SELECT MAX(host) FROM overlay_addresses) + 1
         ELSE (SELECT MIN(a.host) + 1 FROM overlay_addresses a WHERE NOT EXISTS
               (SELECT 1 FROM overlay_addresses b WHERE b.host = a.host + 1)) END",
    )
    .bind(first as i64)
    .fetch_one(&mut **tx)
    .await?;
    let host = host as u128;
    if host > last {
        return Err(ApiError::conflict(format!(
            "the overlay prefix {prefix} has no free address; widen it in /api/v1/topology"
        )));
    }
    query("INSERT INTO overlay_addresses (site_id, host) VALUES (?, ?)")
        .bind(site)
        .bind(host as i64)
        .execute(&mut **tx)
        .await?;
    Ok(host_addr(&prefix, host))
}

pub async fn addresses(conn: &mut Conn) -> Result<BTreeMap<i64, IpAddr>, ApiError> {
    let prefix = load(&mut *conn).await?.overlay_prefix;
    let rows = query("SELECT site_id, host FROM overlay_addresses")
        .fetch_all(&mut *conn)
        .await?;
    rows.iter()
        .map(|r| {
            Ok((
                r.try_get("site_id")?,
                host_addr(&prefix, r.try_get::<i64, _>("host")? as u128),
            ))
        })
        .collect()
}

/// The overlay addresses of the sites `ids` (those that have one).
pub async fn addresses_of(conn: &mut Conn, ids: &[i64]) -> Result<BTreeMap<i64, IpAddr>, ApiError> {
    if ids.is_empty() {
        return Ok(BTreeMap::new());
    }
    let prefix = load(&mut *conn).await?.overlay_prefix;
    let rows = super::rows_for_ids(
        &mut *conn,
        "SELECT site_id, host FROM overlay_addresses WHERE site_id IN ({})",
        ids,
    )
    .await?;
    rows.iter()
        .map(|r| {
            Ok((
                r.try_get("site_id")?,
                host_addr(&prefix, r.try_get::<i64, _>("host")? as u128),
            ))
        })
        .collect()
}

/// Every site's name, by id.
pub async fn site_names(conn: &mut Conn) -> Result<BTreeMap<i64, String>, sqlx::Error> {
    query("SELECT id, name FROM sites")
        .fetch_all(&mut *conn)
        .await?
        .iter()
        .map(|r| Ok((r.try_get("id")?, r.try_get("name")?)))
        .collect()
}

/// Every site's id, name and LAN prefixes, in creation (id) order: what a change of the plan
/// is checked against.
pub async fn sites_for_plan(conn: &mut Conn) -> Result<Vec<(i64, String, Vec<Prefix>)>, ApiError> {
    query("SELECT id, name, lan_prefixes FROM sites ORDER BY id")
        .fetch_all(&mut *conn)
        .await?
        .iter()
        .map(|r| {
            let lan: String = r.try_get("lan_prefixes")?;
            Ok((
                r.try_get("id")?,
                r.try_get("name")?,
                serde_json::from_str(&lan).map_err(ApiError::internal)?,
            ))
        })
        .collect()
}

/// Gives the sites these host numbers, and no other site any.
pub async fn renumber(conn: &mut Conn, hosts: &[(i64, i64)]) -> Result<(), sqlx::Error> {
    query("DELETE FROM overlay_addresses")
        .execute(&mut *conn)
        .await?;
    for (site, host) in hosts {
        query("INSERT INTO overlay_addresses (site_id, host) VALUES (?, ?)")
            .bind(site)
            .bind(host)
            .execute(&mut *conn)
            .await?;
    }
    Ok(())
}

/// Writes the topology's mode, prefix and hubs as its next version, if it is still at
/// `version`.
pub async fn update(
    conn: &mut Conn,
    version: i64,
    mode: Mode,
    prefix: &Prefix,
    hubs: &BTreeSet<i64>,
    now: i64,
) -> Result<(), WriteError> {
    let mode = serde_json::to_value(mode).map_err(WriteError::Encode)?;
    let r = query(
        "UPDATE topology SET mode = ?, overlay_prefix = ?, version = version + 1, updated_at = ?
         WHERE id = 1 AND version = ?",
    )
    .bind(mode.as_str())
    .bind(prefix.to_string())
    .bind(now)
    .bind(version)
    .execute(&mut *conn)
    .await?;
    super::one_row_changed(r)?;
    query("DELETE FROM hubs").execute(&mut *conn).await?;
    for h in hubs {
        query("INSERT INTO hubs (site_id) VALUES (?)")
            .bind(h)
            .execute(&mut *conn)
            .await?;
    }
    Ok(())
}
