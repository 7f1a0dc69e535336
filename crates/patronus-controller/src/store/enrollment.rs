//! Enrolment: one-time tokens an operator makes for a site, spent by the edge that enrols with
//! one, and the credential that edge gets (only hashes are stored).

use patronus_api::Link;

use super::Conn;
#[allow(unused_imports)]
use super::db::{Row, query, query_as, query_scalar};

/// Stores a token (its hash) for site `site_id`, valid until `expires_at`.
pub async fn create_token(
    conn: &mut Conn,
    site_id: i64,
    token_hash: &[u8],
    expires_at: i64,
    created_by: Option<i64>,
    now: i64,
) -> Result<(), sqlx::Error> {
    query(
        "INSERT INTO enrollment_tokens (site_id, token_hash, expires_at, created_by, created_at)
         VALUES (?, ?, ?, ?, ?)",
    )
    .bind(site_id)
    .bind(token_hash)
    .bind(expires_at)
    .bind(created_by)
    .bind(now)
    .execute(&mut *conn)
    .await
    .map(|_| ())
}

/// Why a token was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    Used,
    Expired,
    Unknown,
}

/// Spends the token with this hash if it is unused and unexpired, in one statement (two
/// enrolments racing with one token: one wins); its site, or why not.
pub async fn spend_token(
    conn: &mut Conn,
    token_hash: &[u8],
    now: i64,
) -> Result<Result<i64, Refused>, sqlx::Error> {
    let site_id: Option<i64> = query_scalar(
        "UPDATE enrollment_tokens SET used_at = ?
         WHERE token_hash = ? AND used_at IS NULL AND expires_at > ? RETURNING site_id",
    )
    .bind(now)
    .bind(token_hash)
    .bind(now)
    .fetch_optional(&mut *conn)
    .await?;
    if let Some(id) = site_id {
        return Ok(Ok(id));
    }
    let used: Option<Option<i64>> =
        query_scalar("SELECT used_at FROM enrollment_tokens WHERE token_hash = ?")
            .bind(token_hash)
            .fetch_optional(&mut *conn)
            .await?;
    Ok(Err(match used {
        Some(Some(_)) => Refused::Used,
        Some(None) => Refused::Expired,
        None => Refused::Unknown,
    }))
}

/// Records the endpoint an enrolling edge gave for link `link_id` (`link` as it now is).
pub async fn set_link(
    conn: &mut Conn,
    link_id: i64,
    link: &Link,
    now: i64,
) -> Result<(), sqlx::Error> {
    let spec = serde_json::to_string(link).map_err(|e| sqlx::Error::Encode(Box::new(e)))?;
    query("UPDATE links SET spec = ?, version = version + 1, updated_at = ? WHERE id = ?")
        .bind(spec)
        .bind(now)
        .bind(link_id)
        .execute(&mut *conn)
        .await
        .map(|_| ())
}

/// Gives site `site_id` its enrolled edge's key (ending any key roll the replaced machine left
/// unfinished) and a new credential (its hash), revoking the old machine's; returns the site's
/// key rotation count.
pub async fn enrol(
    conn: &mut Conn,
    site_id: i64,
    public_key: &str,
    secret_hash: &[u8],
    now: i64,
) -> Result<i64, sqlx::Error> {
    let key_rotation: i64 = query_scalar(
        "UPDATE sites SET public_key = ?, next_public_key = NULL, version = version + 1,
         updated_at = ? WHERE id = ? RETURNING key_rotation",
    )
    .bind(public_key)
    .bind(now)
    .bind(site_id)
    .fetch_one(&mut *conn)
    .await?;
    query("UPDATE site_credentials SET revoked = 1 WHERE site_id = ?")
        .bind(site_id)
        .execute(&mut *conn)
        .await?;
    query("INSERT INTO site_credentials (site_id, secret_hash, created_at) VALUES (?, ?, ?)")
        .bind(site_id)
        .bind(secret_hash)
        .bind(now)
        .execute(&mut *conn)
        .await?;
    Ok(key_rotation)
}

/// The site (id, name) whose unrevoked credential has this hash.
pub async fn site_of_credential(
    conn: &mut Conn,
    secret_hash: &[u8],
) -> Result<Option<(i64, String)>, sqlx::Error> {
    query_as(
        "SELECT s.id, s.name FROM site_credentials c JOIN sites s ON s.id = c.site_id
         WHERE c.secret_hash = ? AND c.revoked = 0",
    )
    .bind(secret_hash)
    .fetch_optional(&mut *conn)
    .await
}

/// The hashes of site `site`'s unrevoked credentials, with its id: the keys of its STUN
/// requests.
pub async fn credential_hashes(
    conn: &mut Conn,
    site: &str,
) -> Result<Vec<(i64, Vec<u8>)>, sqlx::Error> {
    query_as(
        "SELECT c.site_id, c.secret_hash FROM site_credentials c JOIN sites s ON s.id = c.site_id
         WHERE s.name = ? AND c.revoked = 0",
    )
    .bind(site)
    .fetch_all(&mut *conn)
    .await
}

/// Revokes the unrevoked credentials of site `site_id` (of every site if `None`); how many.
pub async fn revoke_credentials(conn: &mut Conn, site_id: Option<i64>) -> Result<u64, sqlx::Error> {
    let r = match site_id {
        Some(id) => {
            query("UPDATE site_credentials SET revoked = 1 WHERE revoked = 0 AND site_id = ?")
                .bind(id)
                .execute(&mut *conn)
                .await?
        }
        None => {
            query("UPDATE site_credentials SET revoked = 1 WHERE revoked = 0")
                .execute(&mut *conn)
                .await?
        }
    };
    Ok(r.rows_affected())
}

/// Site `site_id` has no edge any more (its machine is lost): its key, and any key it was
/// rolling to, are forgotten, so its peers stop accepting them; the next enrolment gives it
/// one. Whether it had a key.
pub async fn forget_edge(conn: &mut Conn, site_id: i64, now: i64) -> Result<bool, sqlx::Error> {
    let r = query(
        "UPDATE sites SET public_key = NULL, next_public_key = NULL, version = version + 1,
         updated_at = ? WHERE id = ? AND public_key IS NOT NULL",
    )
    .bind(now)
    .bind(site_id)
    .execute(&mut *conn)
    .await?;
    Ok(r.rows_affected() > 0)
}

/// Makes every unused, unexpired enrolment token of site `site_id` (of every site if `None`)
/// expired now: tokens handed out before a breach, or for a machine now cut off, enrol
/// nothing. How many.
pub async fn expire_tokens(
    conn: &mut Conn,
    site_id: Option<i64>,
    now: i64,
) -> Result<u64, sqlx::Error> {
    let r = match site_id {
        Some(id) => {
            query(
                "UPDATE enrollment_tokens SET expires_at = ?
                 WHERE used_at IS NULL AND expires_at >= ? AND site_id = ?",
            )
            .bind(now - 1)
            .bind(now)
            .bind(id)
            .execute(&mut *conn)
            .await?
        }
        None => {
            query(
                "UPDATE enrollment_tokens SET expires_at = ?
                 WHERE used_at IS NULL AND expires_at >= ?",
            )
            .bind(now - 1)
            .bind(now)
            .execute(&mut *conn)
            .await?
        }
    };
    Ok(r.rows_affected())
}
