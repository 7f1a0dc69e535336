//! Rate limits and lockouts, kept in the database so that they hold across every controller
//! over it: a client cannot get another allowance, nor a locked account another guess, by
//! asking a second controller.
//!
//! Each change is one statement on one row (an upsert that reads and writes the row at once),
//! atomic on both backends without the store's write lock: a flood of refused logins must not
//! queue behind, or hold up, the writes every controller makes.

use super::Conn;
use super::db::{query, query_as, query_scalar};

/// Takes a token from client address `address`'s bucket (holding at most `cap`, refilled at
/// `per_ms` tokens a millisecond) at `now_ms`: whether one was taken, and the tokens left. A
/// bucket last counted "later" (by a controller whose clock is ahead) is not refilled
/// backwards.
pub async fn take_token(
    conn: &mut Conn,
    address: &str,
    cap: f64,
    per_ms: f64,
    now_ms: i64,
) -> Result<(bool, f64), sqlx::Error> {
    // ?1 address, ?2 now, ?3 cap, ?4 refill per ms. `refilled` is written out three times:
    // an UPDATE's SET cannot name an expression, and every SET reads the row as it was.
    let refilled = "(CASE WHEN ?2 <= rate_buckets.at_ms THEN rate_buckets.tokens
          WHEN rate_buckets.tokens + (?2 - rate_buckets.at_ms) * ?4 >= ?3 THEN ?3
          ELSE rate_buckets.tokens + (?2 - rate_buckets.at_ms) * ?4 END)";
    let sql = format!(
        "INSERT INTO rate_buckets (address, tokens, at_ms, taken) VALUES (?1, ?3 - 1, ?2, 1)
         ON CONFLICT (address) DO UPDATE SET
             taken = CASE WHEN {refilled} >= 1 THEN 1 ELSE 0 END,
             tokens = CASE WHEN {refilled} >= 1 THEN {refilled} - 1 ELSE {refilled} END,
             at_ms = CASE WHEN ?2 > rate_buckets.at_ms THEN ?2 ELSE rate_buckets.at_ms END
         RETURNING taken, tokens"
    );
    let (taken, tokens): (i64, f64) = query_as(&sql)
        .bind(address)
        .bind(now_ms)
        .bind(cap)
        .bind(per_ms)
        .fetch_one(conn)
        .await?;
    Ok((taken == 1, tokens))
}

/// Until when (unix ms) account `account` is locked, if it ever was.
pub async fn locked_until(conn: &mut Conn, account: &str) -> Result<Option<i64>, sqlx::Error> {
    Ok(
        query_scalar("SELECT locked_until_ms FROM login_failures WHERE account = ?")
            .bind(account)
            .fetch_optional(conn)
            .await?
            .flatten(),
    )
}

/// Counts a failed check of `account` at `now_ms`: its failures in a row, this one included.
pub async fn count_failure(
    conn: &mut Conn,
    account: &str,
    now_ms: i64,
) -> Result<i64, sqlx::Error> {
    query_scalar(
        "INSERT INTO login_failures (account, failures, locked_until_ms, at_ms) VALUES (?, 1, NULL, ?)
         ON CONFLICT (account) DO UPDATE SET failures = login_failures.failures + 1,
             at_ms = excluded.at_ms
         RETURNING failures",
    )
    .bind(account)
    .bind(now_ms)
    .fetch_one(conn)
    .await
}

/// Locks `account` until `until_ms` (never shortening a lock already longer).
pub async fn lock(conn: &mut Conn, account: &str, until_ms: i64) -> Result<(), sqlx::Error> {
    query(
        "UPDATE login_failures SET locked_until_ms = ?
         WHERE account = ? AND (locked_until_ms IS NULL OR locked_until_ms < ?)",
    )
    .bind(until_ms)
    .bind(account)
    .bind(until_ms)
    .execute(conn)
    .await?;
    Ok(())
}

pub async fn clear_failures(conn: &mut Conn, account: &str) -> Result<(), sqlx::Error> {
    query("DELETE FROM login_failures WHERE account = ?")
        .bind(account)
        .execute(conn)
        .await?;
    Ok(())
}

/// Failure counts kept at most, locked accounts aside: anyone can add one by trying an email.
pub const FAILURES_KEPT: i64 = 100_000;

/// Forgets what no longer limits anyone: buckets untouched since `full_before_ms` (full again
/// by then); failure counts that lock nothing, older than `stale_before_ms` or beyond the
/// newest [`FAILURES_KEPT`]. Returns the rows removed.
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
        "DELETE FROM login_failures
         WHERE (locked_until_ms IS NULL OR locked_until_ms < ?1)
           AND (at_ms < ?2 OR at_ms < (SELECT at_ms FROM login_failures
                                       ORDER BY at_ms DESC LIMIT 1 OFFSET ?3))",
    )
    .bind(now_ms)
    .bind(stale_before_ms)
    .bind(FAILURES_KEPT)
    .execute(&mut *conn)
    .await?
    .rows_affected();
    Ok(a + b)
}
