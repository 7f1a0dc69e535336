//! Dashboard sessions (`/ui`): a row per login, in the database, so that every controller over
//! it serves the same sessions and a logout on one is a logout on all.
//!
//! The cookie carries 32 random bytes; the row keys on their SHA-256, so a copy of the database
//! (a backup) holds no usable session. A session ends at logout, after [`IDLE_MS`] unused,
//! [`MAX_MS`] after the login whatever its use, and with every other session of its user when
//! the user's password, role or state changes ([`super::Store::revoke_all_refresh`]) or the
//! secrets are rotated.

use super::db::query;
use super::{Conn, Tx};

/// A session unused this long has ended.
pub const IDLE_MS: i64 = 30 * 60_000;
/// A session ends this long after its login, however busy.
pub const MAX_MS: i64 = 12 * 3_600_000;
/// Use is written back at most this often (a page view is not a write each time).
const SEEN_EVERY_MS: i64 = 60_000;

/// A live session.
#[derive(Debug, Clone)]
pub struct Session {
    pub user_id: i64,
    /// What every form of the session carries (`csrf`), compared with this.
    pub csrf: String,
}

/// Records a new session.
pub async fn create(
    tx: &mut Tx,
    token_hash: &[u8],
    user_id: i64,
    csrf: &str,
    now_ms: i64,
) -> Result<(), sqlx::Error> {
    query(
        "INSERT INTO ui_sessions (token_hash, user_id, csrf, created_ms, seen_ms, expires_ms)
         VALUES (?, ?, ?, ?, ?, ?)",
    )
    .bind(token_hash)
    .bind(user_id)
    .bind(csrf)
    .bind(now_ms)
    .bind(now_ms)
    .bind(now_ms + MAX_MS)
    .execute(&mut **tx)
    .await
    .map(|_| ())
}

/// The session whose cookie hashes to `token_hash`, if it has not ended; its use is recorded.
pub async fn find(
    conn: &mut Conn,
    token_hash: &[u8],
    now_ms: i64,
) -> Result<Option<Session>, sqlx::Error> {
    let Some(r) = query(
        "SELECT user_id, csrf, seen_ms FROM ui_sessions
         WHERE token_hash = ? AND expires_ms > ? AND seen_ms > ?",
    )
    .bind(token_hash)
    .bind(now_ms)
    .bind(now_ms - IDLE_MS)
    .fetch_optional(&mut *conn)
    .await?
    else {
        return Ok(None);
    };
    let seen: i64 = r.try_get("seen_ms")?;
    if now_ms - seen > SEEN_EVERY_MS {
        // One statement on one row: no write lock needed.
        query("UPDATE ui_sessions SET seen_ms = ? WHERE token_hash = ? AND seen_ms < ?")
            .bind(now_ms)
            .bind(token_hash)
            .bind(now_ms)
            .execute(&mut *conn)
            .await?;
    }
    Ok(Some(Session {
        user_id: r.try_get("user_id")?,
        csrf: r.try_get("csrf")?,
    }))
}

/// Ends one session; whether there was one.
pub async fn end(conn: &mut Conn, token_hash: &[u8]) -> Result<bool, sqlx::Error> {
    Ok(query("DELETE FROM ui_sessions WHERE token_hash = ?")
        .bind(token_hash)
        .execute(&mut *conn)
        .await?
        .rows_affected()
        > 0)
}

/// Ends every session of `user_id` (`None`: of everyone); how many.
pub async fn end_all(tx: &mut Tx, user_id: Option<i64>) -> Result<u64, sqlx::Error> {
    let (sql, arg) = match user_id {
        Some(id) => ("DELETE FROM ui_sessions WHERE user_id = ?", Some(id)),
        None => ("DELETE FROM ui_sessions", None),
    };
    let mut q = query(sql);
    if let Some(id) = arg {
        q = q.bind(id);
    }
    Ok(q.execute(&mut **tx).await?.rows_affected())
}

/// Forgets sessions that have ended; how many.
pub async fn prune(conn: &mut Conn, now_ms: i64) -> Result<u64, sqlx::Error> {
    Ok(
        query("DELETE FROM ui_sessions WHERE expires_ms <= ? OR seen_ms <= ?")
            .bind(now_ms)
            .bind(now_ms - IDLE_MS)
            .execute(&mut *conn)
            .await?
            .rows_affected(),
    )
}
