//! Settings kept as one versioned JSON document each (`settings`): the failover settings.

use patronus_api::FailoverSettings;

use super::Conn;
#[allow(unused_imports)]
use super::db::{Row, query, query_as, query_scalar};
use super::docs::WriteError;
use crate::error::ApiError;

/// The failover settings and their version (0 and the defaults until first changed).
pub async fn failover(conn: &mut Conn) -> Result<(FailoverSettings, i64), ApiError> {
    let r = query("SELECT value, version FROM settings WHERE key = 'failover'")
        .fetch_optional(&mut *conn)
        .await?;
    match r {
        Some(r) => {
            let v: String = r.try_get("value")?;
            Ok((
                serde_json::from_str(&v).map_err(ApiError::internal)?,
                r.try_get("version")?,
            ))
        }
        None => Ok((FailoverSettings::default(), 0)),
    }
}

/// Writes the failover settings as the next version, if they are still at `version`.
pub async fn set_failover(
    conn: &mut Conn,
    new: &FailoverSettings,
    version: i64,
    now: i64,
) -> Result<(), WriteError> {
    let r = query(
        "INSERT INTO settings (key, value, version, updated_at) VALUES ('failover', ?, 1, ?)
         ON CONFLICT (key) DO UPDATE SET value = excluded.value, version = settings.version + 1,
         updated_at = excluded.updated_at WHERE settings.version = ?",
    )
    .bind(serde_json::to_string(new).map_err(WriteError::Encode)?)
    .bind(now)
    .bind(version)
    .execute(&mut *conn)
    .await?;
    super::one_row_changed(r)
}

/// What [`claim_signing_key`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyClaim {
    /// The key recorded is this one.
    Same,
    /// None was recorded: this one is now.
    Recorded,
    /// Another was recorded, and this one replaced it.
    Replaced,
    /// Another is recorded (its fingerprint), and stays.
    Other(String),
}

/// The fingerprint of the signing key every controller over this database uses, if one is
/// recorded.
pub async fn signing_key(conn: &mut Conn) -> Result<Option<String>, sqlx::Error> {
    query_scalar("SELECT value FROM settings WHERE key = 'signing_key_fingerprint'")
        .fetch_optional(conn)
        .await
}

/// Records `fingerprint` as the signing key's of every controller over this database, if none
/// is yet, or if `replace` (an operator has given every controller a new key).
pub async fn claim_signing_key(
    conn: &mut Conn,
    fingerprint: &str,
    replace: bool,
    now: i64,
) -> Result<KeyClaim, sqlx::Error> {
    let claim = match signing_key(&mut *conn).await? {
        Some(r) if r == fingerprint => return Ok(KeyClaim::Same),
        Some(r) if !replace => return Ok(KeyClaim::Other(r)),
        Some(_) => KeyClaim::Replaced,
        None => KeyClaim::Recorded,
    };
    query(
        "INSERT INTO settings (key, value, version, updated_at)
         VALUES ('signing_key_fingerprint', ?, 1, ?)
         ON CONFLICT (key) DO UPDATE SET value = excluded.value,
             version = settings.version + 1, updated_at = excluded.updated_at",
    )
    .bind(fingerprint)
    .bind(now)
    .execute(conn)
    .await?;
    Ok(claim)
}

/// Claims the next scheduled backup: one controller of those over the database takes each.
/// The `backup_due` row's `version` holds the time (unix ms) before which no controller may
/// start one; a controller whose `now` is past it moves it to `now + lease_ms` (its claim) in
/// one statement, and only the one whose statement changed the row goes on. If it dies
/// meanwhile, the lease runs out and another takes the backup.
pub async fn claim_backup(
    conn: &mut Conn,
    holder: &str,
    now: i64,
    lease_ms: i64,
) -> Result<bool, sqlx::Error> {
    let r = query(
        "INSERT INTO settings (key, value, version, updated_at) VALUES ('backup_due', ?, ?, ?)
         ON CONFLICT (key) DO UPDATE SET value = excluded.value, version = excluded.version,
         updated_at = excluded.updated_at WHERE settings.version <= ?",
    )
    .bind(holder)
    .bind(now + lease_ms)
    .bind(now / 1000)
    .bind(now)
    .execute(&mut *conn)
    .await?;
    Ok(r.rows_affected() == 1)
}

/// The claimed backup is over: the next is due at `next_ms`.
pub async fn backup_due_at(conn: &mut Conn, next_ms: i64, now: i64) -> Result<(), sqlx::Error> {
    query("UPDATE settings SET version = ?, updated_at = ? WHERE key = 'backup_due'")
        .bind(next_ms)
        .bind(now / 1000)
        .execute(&mut *conn)
        .await
        .map(|_| ())
}
