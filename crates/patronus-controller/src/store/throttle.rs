//! Rate limits and lockouts, kept in the database so that they hold across every controller
//! over it: a client cannot get another allowance, nor a locked account another guess, by
//! asking a second controller. Each check is one short write transaction; the arithmetic is
//! [`crate::auth::RateLimiter`]'s and [`crate::auth::Lockout`]'s.

use super::Conn;
use super::db::{query, query_as};

/// Client address `address`'s bucket: its tokens, and when they were counted (unix ms).
pub async fn bucket(conn: &mut Conn, address: &str) -> Result<Option<(f64, i64)>, sqlx::Error> {
    query_as("SELECT tokens, at_ms FROM rate_buckets WHERE address = ?")
        .bind(address)
        .fetch_optional(conn)
        .await
}

pub async fn set_bucket(
    conn: &mut Conn,
    address: &str,
    tokens: f64,
    at_ms: i64,
) -> Result<(), sqlx::Error> {
    query(
        "INSERT INTO rate_buckets (address, tokens, at_ms) VALUES (?, ?, ?)
         ON CONFLICT (address) DO UPDATE SET tokens = excluded.tokens, at_ms = excluded.at_ms",
    )
    .bind(address)
    .bind(tokens)
    .bind(at_ms)
    .execute(conn)
    .await?;
    Ok(())
}

/// Account `email`'s failed checks in a row, and the time it is locked until (unix ms).
pub async fn failures(
    conn: &mut Conn,
    email: &str,
) -> Result<Option<(i64, Option<i64>)>, sqlx::Error> {
    query_as("SELECT failures, locked_until_ms FROM login_failures WHERE email = ?")
        .bind(email)
        .fetch_optional(conn)
        .await
}

pub async fn set_failures(
    conn: &mut Conn,
    email: &str,
    failures: i64,
    locked_until_ms: Option<i64>,
    at_ms: i64,
) -> Result<(), sqlx::Error> {
    query(
        "INSERT INTO login_failures (email, failures, locked_until_ms, at_ms) VALUES (?, ?, ?, ?)
         ON CONFLICT (email) DO UPDATE SET failures = excluded.failures,
             locked_until_ms = excluded.locked_until_ms, at_ms = excluded.at_ms",
    )
    .bind(email)
    .bind(failures)
    .bind(locked_until_ms)
    .bind(at_ms)
    .execute(conn)
    .await?;
    Ok(())
}

pub async fn clear_failures(conn: &mut Conn, email: &str) -> Result<(), sqlx::Error> {
    query("DELETE FROM login_failures WHERE email = ?")
        .bind(email)
        .execute(conn)
        .await?;
    Ok(())
}

/// Forgets what no longer limits anyone: buckets untouched since `full_before_ms` (full again
/// by then), and failures neither locked nor recent since `stale_before_ms`. Returns the rows
/// removed.
pub async fn prune(
    conn: &mut Conn,
    full_before_ms: i64,
    stale_before_ms: i64,
    now_ms: i64,
) -> Result<u64, sqlx::Error> {
    let a = query("DELETE FROM rate_buckets WHERE at_ms < ?")
        .bind(full_before_ms)
        .execute(&mut *conn)
        .await?
        .rows_affected();
    let b = query(
        "DELETE FROM login_failures WHERE at_ms < ?
             AND (locked_until_ms IS NULL OR locked_until_ms < ?)",
    )
    .bind(stale_before_ms)
    .bind(now_ms)
    .execute(&mut *conn)
    .await?;
    Ok(a + b.rows_affected())
}
