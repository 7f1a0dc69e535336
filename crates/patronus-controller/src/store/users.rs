//! Users: the writes of the user routes (reads and sessions are in the store's root).

use super::Conn;
#[allow(unused_imports)]
use super::db::{Row, query, query_as, query_scalar};
use super::docs::WriteError;

/// Stores a new user (`email`, `name`, `role`) with this password hash; its id.
pub async fn insert(
    conn: &mut Conn,
    (email, name, role): (&str, &str, &str),
    password_hash: &str,
    now: i64,
) -> Result<i64, WriteError> {
    let r = query_scalar::<i64>(
        "INSERT INTO users (email, name, role, password_hash, created_at, updated_at)
         VALUES (?, ?, ?, ?, ?, ?) RETURNING id",
    )
    .bind(email)
    .bind(name)
    .bind(role)
    .bind(password_hash)
    .bind(now)
    .bind(now)
    .fetch_one(&mut *conn)
    .await?;
    Ok(r)
}

/// Enabled admins other than `except`.
pub async fn other_admins(conn: &mut Conn, except: i64) -> Result<i64, sqlx::Error> {
    query_scalar("SELECT COUNT(*) FROM users WHERE role = 'admin' AND disabled = 0 AND id != ?")
        .bind(except)
        .fetch_one(&mut *conn)
        .await
}

/// Writes user `id`'s email, name, role and whether it is disabled as its next version, if it
/// is still at `version`.
pub async fn update(
    conn: &mut Conn,
    (id, version): (i64, i64),
    (email, name, role, disabled): (&str, &str, &str, bool),
    now: i64,
) -> Result<(), WriteError> {
    let r = query(
        "UPDATE users SET email = ?, name = ?, role = ?, disabled = ?, version = version + 1,
         updated_at = ? WHERE id = ? AND version = ?",
    )
    .bind(email)
    .bind(name)
    .bind(role)
    .bind(i64::from(disabled))
    .bind(now)
    .bind(id)
    .bind(version)
    .execute(&mut *conn)
    .await?;
    super::one_row_changed(r)
}

/// Gives user `id` a new password hash.
pub async fn set_password(
    conn: &mut Conn,
    id: i64,
    password_hash: &str,
    now: i64,
) -> Result<(), sqlx::Error> {
    query("UPDATE users SET password_hash = ?, version = version + 1, updated_at = ? WHERE id = ?")
        .bind(password_hash)
        .bind(now)
        .bind(id)
        .execute(&mut *conn)
        .await
        .map(|_| ())
}

/// Deletes user `id` (their sessions go with them: ON DELETE CASCADE).
pub async fn delete(conn: &mut Conn, id: i64) -> Result<(), sqlx::Error> {
    super::delete_by_id(conn, "users", id).await
}
