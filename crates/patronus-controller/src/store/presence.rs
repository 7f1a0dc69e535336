//! Whether each site's edge is online, as every controller over the database sees it.
//!
//! A controller writes what it has heard of its own edges ([`record`]): the time an edge was
//! last heard from, refreshed every few seconds while the controller holds one of its requests
//! open. The time only moves forward (a slow write from a controller the edge has left cannot
//! take it back), so the newest contact wins, whoever made it. That is the fencing value: an
//! edge that moves from controller A to B is kept online by B's writes, and A's closing the old
//! connection writes nothing that could mark it offline.
//!
//! The announcements are transitions of the `online` column made by conditional updates
//! ([`transitions`]): whichever controller makes one queues its webhook event in the same
//! transaction, so each `site.online` and `site.offline` is announced once, not once per
//! controller, and no controller needs to be the one that watches.

use super::Conn;
use super::db::{query, query_as, query_scalar};

/// A site's edge heard from within this many milliseconds is online. (An edge reports every
/// 5 s and keeps a long poll open, which its controller refreshes every few seconds.)
pub const ONLINE_WITHIN_MS: i64 = 15_000;

/// Each `(site_id, at_ms)`: that site's edge was heard from at `at_ms` (unix ms). A few
/// statements whatever the number of sites; a site deleted meanwhile is skipped.
pub async fn record(conn: &mut Conn, heard: &[(i64, i64)]) -> Result<(), sqlx::Error> {
    // 500 rows (1,000 parameters) a statement. VALUES' columns are column1, column2 on both
    // backends.
    for chunk in heard.chunks(500) {
        let rows = vec!["(?, ?)"; chunk.len()].join(", ");
        let sql = format!(
            "INSERT INTO presence (site_id, last_seen, online)
             SELECT v.column1, v.column2, 0 FROM (VALUES {rows}) AS v
             WHERE EXISTS (SELECT 1 FROM sites WHERE id = v.column1)
             ON CONFLICT (site_id) DO UPDATE SET last_seen = CASE
                 WHEN excluded.last_seen > presence.last_seen THEN excluded.last_seen
                 ELSE presence.last_seen END"
        );
        let mut q = query(&sql);
        for (id, at) in chunk {
            q = q.bind(*id).bind(*at);
        }
        q.execute(&mut *conn).await?;
    }
    Ok(())
}

/// A site whose announcement is due: it came online, or went quiet, since the last one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    pub site_id: i64,
    pub site: String,
    pub online: bool,
    /// Unix seconds.
    pub last_seen: i64,
}

/// Whether any site's announcement is due at `now_ms`: a read, so that a controller with
/// nothing to write takes no write lock to find out.
pub async fn any_due(conn: &mut Conn, now_ms: i64) -> Result<bool, sqlx::Error> {
    query_scalar(
        "SELECT EXISTS (SELECT 1 FROM presence
             WHERE (online = 0 AND last_seen >= ?1) OR (online = 1 AND last_seen < ?1))",
    )
    .bind(now_ms - ONLINE_WITHIN_MS)
    .fetch_one(conn)
    .await
}

/// Makes every announcement due at `now_ms`, in `conn`'s transaction (which should queue their
/// events): each row changes once, so of several controllers doing this at the same time one
/// announces each transition.
pub async fn transitions(conn: &mut Conn, now_ms: i64) -> Result<Vec<Transition>, sqlx::Error> {
    let since = now_ms - ONLINE_WITHIN_MS;
    let mut out = Vec::new();
    for (online, sql) in [
        (
            true,
            "UPDATE presence SET online = 1 WHERE online = 0 AND last_seen >= ?
             RETURNING site_id, last_seen, (SELECT name FROM sites WHERE id = presence.site_id)",
        ),
        (
            false,
            "UPDATE presence SET online = 0 WHERE online = 1 AND last_seen < ?
             RETURNING site_id, last_seen, (SELECT name FROM sites WHERE id = presence.site_id)",
        ),
    ] {
        let changed: Vec<(i64, i64, Option<String>)> =
            query_as(sql).bind(since).fetch_all(&mut *conn).await?;
        out.extend(
            changed
                .into_iter()
                .map(|(site_id, last_seen, site)| Transition {
                    site_id,
                    site: site.unwrap_or_default(),
                    online,
                    last_seen: last_seen / 1000,
                }),
        );
    }
    Ok(out)
}

/// The active sites with an enrolled edge (a public key), by id: those whose edge is expected
/// to be online.
pub async fn enrolled_active(conn: &mut Conn) -> Result<Vec<(i64, String)>, sqlx::Error> {
    query_as::<(i64, String)>(
        "SELECT id, name FROM sites WHERE status = 'active' AND public_key IS NOT NULL ORDER BY id",
    )
    .fetch_all(&mut *conn)
    .await
}

/// When each of `ids`' edges was last heard from by any controller (unix ms); a site never
/// heard from is absent.
pub async fn last_seen(
    conn: &mut Conn,
    ids: &[i64],
) -> Result<std::collections::HashMap<i64, i64>, sqlx::Error> {
    let mut out = std::collections::HashMap::new();
    // A page's worth at a time (PostgreSQL takes at most 65,535 parameters in a statement).
    for chunk in ids.chunks(500) {
        let marks = vec!["?"; chunk.len()].join(", ");
        let sql = format!("SELECT site_id, last_seen FROM presence WHERE site_id IN ({marks})");
        let mut q = query_as::<(i64, i64)>(&sql);
        for id in chunk {
            q = q.bind(*id);
        }
        out.extend(q.fetch_all(&mut *conn).await?);
    }
    Ok(out)
}

/// Longest version an edge's `User-Agent` may give that is kept.
pub const MAX_VERSION: usize = 32;

/// The version in a `User-Agent` of Patronus's (`patronus-cli/0.1.0`, `patronus-edge/0.2.0-rc.1`):
/// digits, letters, `.`, `-` and `+`, at most [`MAX_VERSION`]; anything else is no version.
pub fn version_of(user_agent: &str) -> Option<&str> {
    let (product, version) = user_agent.split_whitespace().next()?.split_once('/')?;
    (product.starts_with("patronus")
        && !version.is_empty()
        && version.len() <= MAX_VERSION
        && version
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".-+".contains(&b)))
    .then_some(version)
}

/// Records the version site `site_id`'s edge runs (a write only when it changed).
pub async fn set_version(conn: &mut Conn, site_id: i64, version: &str) -> Result<(), sqlx::Error> {
    query(
        "UPDATE presence SET edge_version = ?
         WHERE site_id = ? AND (edge_version IS NULL OR edge_version <> ?)",
    )
    .bind(version)
    .bind(site_id)
    .bind(version)
    .execute(&mut *conn)
    .await
    .map(|_| ())
}

/// The version each of `ids`' edges last said it runs; a site with none is absent.
pub async fn versions(
    conn: &mut Conn,
    ids: &[i64],
) -> Result<std::collections::HashMap<i64, String>, sqlx::Error> {
    let mut out = std::collections::HashMap::new();
    for chunk in ids.chunks(500) {
        let marks = vec!["?"; chunk.len()].join(", ");
        let sql = format!(
            "SELECT site_id, edge_version FROM presence
             WHERE edge_version IS NOT NULL AND site_id IN ({marks})"
        );
        let mut q = query_as::<(i64, String)>(&sql);
        for id in chunk {
            q = q.bind(*id);
        }
        out.extend(q.fetch_all(&mut *conn).await?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_a_plain_version_of_a_patronus_agent_is_kept() {
        use super::version_of;
        assert_eq!(version_of("patronus-cli/0.1.0"), Some("0.1.0"));
        assert_eq!(
            version_of("patronus-edge/0.2.0-rc.1+g1 (linux)"),
            Some("0.2.0-rc.1+g1")
        );
        for bad in [
            "curl/8.0",
            "patronus-cli/",
            "patronus-cli/0.1\"><script>",
            "patronus-cli",
            &format!("patronus-cli/{}", "1".repeat(33)),
        ] {
            assert_eq!(version_of(bad), None, "{bad}");
        }
    }
}
