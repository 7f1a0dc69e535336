//! Copying a whole installation's state from one store into another (`patronus controller
//! migrate`): SQLite to PostgreSQL when an installation outgrows one machine, or between two
//! PostgreSQL servers.
//!
//! Every table but the migration history, row by row, ids kept (so every reference, every
//! credential and every token stays valid), read from one snapshot of the source and written
//! in one transaction of the target: the target holds all of it or none. The target must be a
//! fresh PostgreSQL database at the same schema version (what the controller makes on its
//! first start); what its first start seeded (the built-in SLA classes, the topology's row, the
//! generation) is replaced by the source's. Its identity sequences are then moved past the
//! copied ids, and the copy is checked by counting the rows of every table on both sides.

use super::db::{Arg, query, query_as, query_scalar};
use super::{Actor, Store, Tx};

/// Every table, parents before children (foreign keys), and whether it has an identity `id`.
pub const TABLES: &[(&str, bool)] = &[
    ("users", true),
    ("refresh_tokens", true),
    ("audit_log", true),
    ("sites", true),
    ("links", true),
    ("topology", false),
    ("hubs", false),
    ("overlay_addresses", false),
    ("sla_classes", true),
    ("policies", true),
    ("settings", false),
    ("api_keys", true),
    ("enrollment_tokens", true),
    ("site_credentials", true),
    ("path_samples", true),
    ("failover_events", true),
    ("webhooks", true),
    ("webhook_deliveries", true),
    ("traffic_counters", false),
    ("traffic_samples", true),
    ("path_events", true),
    ("config_generation", false),
    ("site_prefixes", false),
    ("presence", false),
    ("rate_buckets", false),
    ("login_failures", false),
    ("events", true),
    ("ui_sessions", false),
];

/// Rows per `INSERT` (PostgreSQL takes at most 65,535 parameters in a statement).
const BATCH: usize = 500;

#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error("the target must be a PostgreSQL database (it is {0})")]
    TargetNotPostgres(&'static str),
    #[error(
        "the source's schema is at version {source_version} and the target's at \
         {target_version}: start the same release on both"
    )]
    Versions {
        source_version: i64,
        target_version: i64,
    },
    #[error(
        "the target already holds {users} users and {sites} sites: migrate copies into a fresh \
         database, and never over one in use"
    )]
    TargetInUse { users: i64, sites: i64 },
    #[error(
        "table {table}: {rows_source} rows in the source, {rows_target} in the target after the copy"
    )]
    Count {
        table: &'static str,
        rows_source: i64,
        rows_target: i64,
    },
    #[error("{what}: {error}")]
    Db { what: String, error: sqlx::Error },
}

fn db(what: impl Into<String>) -> impl FnOnce(sqlx::Error) -> CopyError {
    let what = what.into();
    move |error| CopyError::Db { what, error }
}

/// A column and how its values travel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Int,
    Float,
    Text,
    Bytes,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Int => "int",
            Kind::Float => "float",
            Kind::Text => "text",
            Kind::Bytes => "bytes",
        }
    }

    pub(super) fn parse(s: &str) -> Option<Self> {
        [Kind::Int, Kind::Float, Kind::Text, Kind::Bytes]
            .into_iter()
            .find(|k| k.name() == s)
    }

    /// Column `i` of `r`, as a value of this kind.
    pub(super) fn read(self, r: &super::Row, i: usize) -> Result<Arg, sqlx::Error> {
        match self {
            Kind::Int => r.try_get(i).map(Arg::I64),
            Kind::Float => r.try_get(i).map(Arg::F64),
            Kind::Text => r.try_get(i).map(Arg::Text),
            Kind::Bytes => r.try_get(i).map(Arg::Bytes),
        }
    }
}

/// Copies everything `from` holds into `to` (see the module); returns the rows copied per
/// table. `actor` is recorded in the target's audit log as having done it.
pub async fn copy_all(
    from: &Store,
    to: &Store,
    actor: &Actor,
) -> Result<Vec<(&'static str, i64)>, CopyError> {
    if to.backend() != "postgres" {
        return Err(CopyError::TargetNotPostgres(to.backend()));
    }
    let source_version = from.schema_version().await.map_err(db("source schema"))?;
    let target_version = to.schema_version().await.map_err(db("target schema"))?;
    if source_version != target_version {
        return Err(CopyError::Versions {
            source_version,
            target_version,
        });
    }
    let mut src = from.snapshot().await.map_err(db("reading the source"))?;
    let mut dst = to.begin().await.map_err(db("writing the target"))?;
    let (users, sites): (i64, i64) =
        query_as("SELECT (SELECT COUNT(*) FROM users), (SELECT COUNT(*) FROM sites)")
            .fetch_one(&mut *dst)
            .await
            .map_err(db("reading the target"))?;
    if users > 0 || sites > 0 {
        return Err(CopyError::TargetInUse { users, sites });
    }
    // What the target's first start seeded goes; children first.
    for (table, _) in TABLES.iter().rev() {
        query(&format!("DELETE FROM {table}"))
            .execute(&mut *dst)
            .await
            .map_err(db(format!("emptying {table} in the target")))?;
    }
    let mut copied = Vec::new();
    for (table, identity) in TABLES {
        let columns = columns(&mut *dst, "postgres", table)
            .await
            .map_err(db(format!("reading {table}'s columns")))?;
        let n = copy_table(&mut src, &mut dst, table, *identity, &columns).await?;
        if *identity {
            // Past every id the source ever gave, not only those it still holds: a deleted
            // link's id must not come back (a path's id is its links' ids, and its history
            // is kept by that id).
            let given = ids_given(&mut *src, from.backend(), table)
                .await
                .map_err(db(format!("reading the ids {table} gave")))?;
            set_ids_given(&mut dst, "postgres", table, given)
                .await
                .map_err(db(format!("moving {table}'s id sequence")))?;
        }
        let in_target: i64 = query_scalar(&format!("SELECT COUNT(*) FROM {table}"))
            .fetch_one(&mut *dst)
            .await
            .map_err(db(format!("counting {table} in the target")))?;
        if in_target != n {
            return Err(CopyError::Count {
                table,
                rows_source: n,
                rows_target: in_target,
            });
        }
        copied.push((*table, n));
    }
    let details = serde_json::json!({
        "from": from.backend(),
        "schema_version": source_version,
        "rows": copied.iter().map(|(t, n)| (t.to_string(), serde_json::Value::from(*n))).collect::<serde_json::Map<_, _>>(),
    });
    Store::audit(&mut dst, actor, "store.migrate", "store", details)
        .await
        .map_err(db("auditing the copy"))?;
    dst.commit().await.map_err(db("committing the copy"))?;
    Ok(copied)
}

/// The highest id `table` ever gave (deleted rows included): SQLite's `AUTOINCREMENT` keeps
/// it in `sqlite_sequence`, PostgreSQL in the identity's sequence.
pub(super) async fn ids_given(
    conn: &mut super::Conn,
    backend: &str,
    table: &str,
) -> Result<i64, sqlx::Error> {
    let sql = if backend == "postgres" {
        "SELECT COALESCE((SELECT last_value FROM pg_sequences
                          WHERE schemaname = current_schema() AND sequencename = ?), 0)"
    } else {
        "SELECT COALESCE((SELECT seq FROM sqlite_sequence WHERE name = ?), 0)"
    };
    let name = if backend == "postgres" {
        format!("{table}_id_seq")
    } else {
        table.to_owned()
    };
    query_scalar(sql).bind(name).fetch_one(conn).await
}

/// Moves `table`'s next id past `given`, past every id it holds and past every id it gave
/// already (never back: an id given once is never given again).
pub(super) async fn set_ids_given(
    tx: &mut Tx,
    backend: &str,
    table: &str,
    given: i64,
) -> Result<(), sqlx::Error> {
    let before = ids_given(&mut **tx, backend, table).await?;
    let given = given.max(before);
    if backend == "postgres" {
        query_scalar::<i64>(&format!(
            "SELECT setval(pg_get_serial_sequence('{table}', 'id'),
                           GREATEST(COALESCE((SELECT MAX(id) FROM {table}), 0), ?) + 1, false)"
        ))
        .bind(given)
        .fetch_one(&mut **tx)
        .await?;
    } else {
        query("DELETE FROM sqlite_sequence WHERE name = ?")
            .bind(table)
            .execute(&mut **tx)
            .await?;
        query(&format!(
            "INSERT INTO sqlite_sequence (name, seq)
             SELECT ?, MAX(COALESCE((SELECT MAX(id) FROM {table}), 0), ?)"
        ))
        .bind(table)
        .bind(given)
        .execute(&mut **tx)
        .await?;
    }
    Ok(())
}

/// `table`'s columns, in order, with how each travels.
pub(super) async fn columns(
    conn: &mut super::Conn,
    backend: &str,
    table: &str,
) -> Result<Vec<(String, Kind)>, sqlx::Error> {
    let sql = if backend == "postgres" {
        "SELECT column_name::text, data_type::text FROM information_schema.columns
         WHERE table_schema = current_schema() AND table_name = ? ORDER BY ordinal_position"
    } else {
        "SELECT name, lower(type) FROM pragma_table_info(?) ORDER BY cid"
    };
    let cols: Vec<(String, String)> = query_as(sql).bind(table).fetch_all(conn).await?;
    cols.into_iter()
        .map(|(name, ty)| {
            let kind = match ty.as_str() {
                "bigint" | "integer" | "smallint" | "int" => Kind::Int,
                "double precision" | "real" => Kind::Float,
                "text" | "character varying" => Kind::Text,
                "bytea" | "blob" => Kind::Bytes,
                other => {
                    return Err(sqlx::Error::TypeNotFound {
                        type_name: format!("{table}.{name}: {other}"),
                    });
                }
            };
            Ok((name, kind))
        })
        .collect()
}

/// Copies `table`'s rows, in batches (a table with an `id` is read in pages of ids, so that
/// history of any length is copied in bounded memory); how many.
async fn copy_table(
    src: &mut super::Snapshot,
    dst: &mut Tx,
    table: &'static str,
    identity: bool,
    columns: &[(String, Kind)],
) -> Result<i64, CopyError> {
    let names = column_list(columns);
    let id_at = columns.iter().position(|(n, _)| n == "id");
    let mut after = i64::MIN;
    let mut total = 0;
    loop {
        let rows = match (identity, id_at) {
            (true, Some(_)) => {
                query(&format!(
                    "SELECT {names} FROM {table} WHERE id > ? ORDER BY id LIMIT ?"
                ))
                .bind(after)
                .bind((BATCH * 10) as i64)
                .fetch_all(&mut **src)
                .await
            }
            _ => {
                query(&format!("SELECT {names} FROM {table}"))
                    .fetch_all(&mut **src)
                    .await
            }
        }
        .map_err(db(format!("reading {table} from the source")))?;
        if rows.is_empty() {
            break;
        }
        if let (true, Some(i), Some(last)) = (identity, id_at, rows.last()) {
            after = last.try_get(i).map_err(db(format!("reading {table}.id")))?;
        }
        write_rows(dst, table, columns, &rows).await?;
        total += rows.len() as i64;
        if !identity || id_at.is_none() {
            break;
        }
    }
    Ok(total)
}

/// Inserts `rows` (of `columns`) into `table`, [`BATCH`] to a statement.
async fn write_rows(
    dst: &mut Tx,
    table: &'static str,
    columns: &[(String, Kind)],
    rows: &[super::Row],
) -> Result<(), CopyError> {
    let mut values = Vec::with_capacity(rows.len());
    for r in rows {
        let mut row = Vec::with_capacity(columns.len());
        for (i, (name, kind)) in columns.iter().enumerate() {
            row.push(kind.read(r, i).map_err(|e| CopyError::Db {
                what: format!("reading {table}.{name} from the source"),
                error: e,
            })?);
        }
        values.push(row);
    }
    write_values(dst, table, columns, &values)
        .await
        .map_err(db(format!("writing {table} to the target")))
}

/// `columns`' names, as a statement lists them.
pub(super) fn column_list(columns: &[(String, Kind)]) -> String {
    columns
        .iter()
        .map(|(n, _)| n.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Inserts `rows` (each a value of every one of `columns`) into `table`, [`BATCH`] to a
/// statement.
pub(super) async fn write_values(
    dst: &mut Tx,
    table: &str,
    columns: &[(String, Kind)],
    rows: &[Vec<Arg>],
) -> Result<(), sqlx::Error> {
    let (names, width) = (column_list(columns), columns.len());
    let one = format!("({})", vec!["?"; width].join(", "));
    for batch in rows.chunks(BATCH) {
        let sql = format!(
            "INSERT INTO {table} ({names}) VALUES {}",
            vec![one.as_str(); batch.len()].join(", ")
        );
        let mut q = query(&sql);
        for r in batch {
            for v in r {
                q = q.bind(v.clone());
            }
        }
        q.execute(&mut **dst).await?;
    }
    Ok(())
}
