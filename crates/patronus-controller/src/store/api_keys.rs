//! API keys (only their SHA-256 is stored).

use serde::Serialize;

use super::Conn;
#[allow(unused_imports)]
use super::db::{Row, query, query_as, query_scalar};
use crate::auth::Role;
use crate::error::ApiError;

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct KeyView {
    pub id: i64,
    pub name: String,
    pub role: Role,
    /// The first characters of the key, to recognise it.
    pub hint: String,
    pub created_by: Option<i64>,
    pub created_at: i64,
    pub expires_at: i64,
    pub last_used_at: Option<i64>,
    pub revoked: bool,
    /// Only in the response that creates the key.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

fn view(r: &Row) -> Result<KeyView, ApiError> {
    Ok(KeyView {
        id: r.try_get("id")?,
        name: r.try_get("name")?,
        role: Role::parse(r.str("role")?).ok_or_else(|| ApiError::internal("bad role"))?,
        hint: r.try_get("hint")?,
        created_by: r.try_get("created_by")?,
        created_at: r.try_get("created_at")?,
        expires_at: r.try_get("expires_at")?,
        last_used_at: r.try_get("last_used_at")?,
        revoked: r.try_get::<i64, _>("revoked")? != 0,
        key: None,
    })
}

/// The list's sort keys (columns).
pub const SORT_KEYS: [&str; 4] = ["id", "name", "created_at", "expires_at"];

/// The id, name and role of the valid (unrevoked, unexpired) key with this hash; records its
/// use, at most once a minute.
pub async fn check(
    conn: &mut Conn,
    hash: &[u8],
    now: i64,
) -> Result<Option<(i64, String, Role)>, ApiError> {
    let Some(r) = query(
        "SELECT id, name, role FROM api_keys WHERE key_hash = ? AND revoked = 0 AND expires_at > ?",
    )
    .bind(hash)
    .bind(now)
    .fetch_optional(&mut *conn)
    .await?
    else {
        return Ok(None);
    };
    let id: i64 = r.try_get("id")?;
    query("UPDATE api_keys SET last_used_at = ? WHERE id = ? AND COALESCE(last_used_at, 0) < ?")
        .bind(now)
        .bind(id)
        .bind(now - 60)
        .execute(&mut *conn)
        .await?;
    let role = Role::parse(r.str("role")?).ok_or_else(|| ApiError::internal("bad role"))?;
    Ok(Some((id, r.try_get("name")?, role)))
}

/// A page of keys sorted by `column` (one of [`SORT_KEYS`]), and how many there are.
pub async fn page(
    conn: &mut Conn,
    column: &str,
    desc: bool,
    (limit, offset): (i64, i64),
) -> Result<(Vec<KeyView>, i64), ApiError> {
    let Some(column) = SORT_KEYS.iter().find(|k| **k == column) else {
        return Err(ApiError::internal(format!("sort column {column}")));
    };
    let total: i64 = query_scalar("SELECT COUNT(*) FROM api_keys")
        .fetch_one(&mut *conn)
        .await?;
    let sql = format!(
        "SELECT * FROM api_keys ORDER BY {column} {}, id LIMIT ? OFFSET ?",
        if desc { "DESC" } else { "ASC" }
    );
    let items = query(&sql)
        .bind(limit)
        .bind(offset)
        .fetch_all(&mut *conn)
        .await?
        .iter()
        .map(view)
        .collect::<Result<Vec<_>, _>>()?;
    Ok((items, total))
}

/// Key `id`, if there is one.
pub async fn get(conn: &mut Conn, id: i64) -> Result<Option<KeyView>, ApiError> {
    query("SELECT * FROM api_keys WHERE id = ?")
        .bind(id)
        .fetch_optional(&mut *conn)
        .await?
        .as_ref()
        .map(view)
        .transpose()
}

/// Stores a new key (`name`, `role`, `hint`: its first characters) by its hash; its id.
pub async fn insert(
    conn: &mut Conn,
    (name, role, hint): (&str, Role, &str),
    hash: &[u8],
    created_by: Option<i64>,
    (now, expires): (i64, i64),
) -> Result<i64, sqlx::Error> {
    let r = query_scalar::<i64>(
        "INSERT INTO api_keys (name, role, key_hash, hint, created_by, created_at, expires_at)
         VALUES (?, ?, ?, ?, ?, ?, ?) RETURNING id",
    )
    .bind(name)
    .bind(role.as_str())
    .bind(hash)
    .bind(hint)
    .bind(created_by)
    .bind(now)
    .bind(expires)
    .fetch_one(&mut *conn)
    .await?;
    Ok(r)
}

/// Revokes key `id`; whether there was one.
pub async fn revoke(conn: &mut Conn, id: i64) -> Result<bool, sqlx::Error> {
    let r = query("UPDATE api_keys SET revoked = 1 WHERE id = ?")
        .bind(id)
        .execute(&mut *conn)
        .await?;
    Ok(r.rows_affected() > 0)
}
