//! The controller's whole state as one portable stream (`patronus backup`): written from one
//! snapshot of either backend, loaded into either, so that a backup taken on SQLite restores
//! into PostgreSQL and back.
//!
//! The stream is JSON, one value per line (plain text, so that `age -d backup.age | less`
//! shows an operator what a backup holds):
//! - a header: `{"format": "patronus-dump", "version": 1, "schema_version", "backend",
//!   "created_ms"}`;
//! - per table of [`TABLES`], in order: `{"table", "columns": [[name, kind], ...],
//!   "ids_given"}`, then one array per row (integers as numbers, floats as strings in Rust's
//!   shortest exact form, text as strings, bytes as hex, NULL as null), then `{"end": table,
//!   "rows": n}`;
//! - a trailer: `{"end_of_dump": true, "rows": {table: n, ...}}`. A stream without it was cut
//!   short and is refused.
//!
//! Loading replaces everything the target holds in one transaction (its write lock taken): it
//! holds all of the dump or, on any error, what it held before. The target must be at the
//! dump's schema version. Afterwards the configuration generation is bumped, so that every
//! edge (and every controller over a PostgreSQL target) takes the restored configuration.

use std::io::{BufRead, Write};

use super::copy::{Kind, TABLES, column_list, columns, ids_given, set_ids_given, write_values};
use super::db::{Arg, query, query_scalar};
use super::{Actor, Store};

/// The format's name and version, in the header.
pub const FORMAT: &str = "patronus-dump";
pub const VERSION: i64 = 1;

/// Rows read from a table per query (tables with an `id` are read in pages of ids).
const PAGE: i64 = 5_000;
/// Rows inserted per batch while loading.
const LOAD_BATCH: usize = 500;

#[derive(Debug, thiserror::Error)]
pub enum DumpError {
    #[error("{what}: {error}")]
    Db { what: String, error: sqlx::Error },
    #[error("writing the dump: {0}")]
    Write(std::io::Error),
    #[error("reading the dump: {0}")]
    Read(std::io::Error),
    #[error("the dump is not a Patronus dump of a version this binary reads ({0})")]
    NotADump(String),
    #[error("line {line}: {message}")]
    Bad { line: u64, message: String },
    #[error(
        "the dump was cut short (it ends without its trailer, after {rows} rows): \
         nothing was restored"
    )]
    Truncated { rows: u64 },
    #[error(
        "the dump is of schema version {dump} and the database of {database}: restore with \
         the release that made the backup (or a database at its version), then upgrade"
    )]
    Versions { dump: i64, database: i64 },
    #[error(
        "the target already holds {users} users and {sites} sites: restoring replaces \
         everything it holds; say so (--replace)"
    )]
    TargetInUse { users: i64, sites: i64 },
    #[error("table {table}: {message}")]
    Table { table: String, message: String },
    #[error("{0}: nothing was restored")]
    Check(String),
}

fn db(what: impl Into<String>) -> impl FnOnce(sqlx::Error) -> DumpError {
    let what = what.into();
    move |error| DumpError::Db { what, error }
}

/// What a dump held: its header and the rows of each table.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Summary {
    pub schema_version: i64,
    /// The backend it was taken from: `sqlite` or `postgres`.
    pub backend: String,
    pub created_ms: i64,
    /// Rows per table, in the dump's order.
    pub rows: Vec<(String, i64)>,
}

/// Writes everything `store` holds to `out`, from one snapshot (the store keeps serving
/// meanwhile: SQLite's readers and PostgreSQL's repeatable-read transactions block no writer).
pub async fn dump(store: &Store, out: &mut (dyn Write + Send)) -> Result<Summary, DumpError> {
    let backend = store.backend();
    let mut snap = store.snapshot().await.map_err(db("opening a snapshot"))?;
    let schema_version: i64 =
        query_scalar("SELECT COALESCE(MAX(version), 0) FROM schema_migrations")
            .fetch_one(&mut *snap)
            .await
            .map_err(db("reading the schema version"))?;
    let created_ms = super::now_ms();
    let line = |out: &mut (dyn Write + Send), v: &serde_json::Value| -> Result<(), DumpError> {
        serde_json::to_writer(&mut *out, v).map_err(|e| DumpError::Write(e.into()))?;
        out.write_all(b"\n").map_err(DumpError::Write)
    };
    line(
        out,
        &serde_json::json!({
            "format": FORMAT, "version": VERSION, "schema_version": schema_version,
            "backend": backend, "created_ms": created_ms,
        }),
    )?;
    let mut rows = Vec::new();
    for (table, identity) in TABLES {
        let cols = columns(&mut *snap, backend, table)
            .await
            .map_err(|e| DumpError::Db {
                what: format!("reading {table}'s columns"),
                error: e,
            })?;
        let given = if *identity {
            ids_given(&mut *snap, backend, table)
                .await
                .map_err(db(format!("reading the ids {table} gave")))?
        } else {
            0
        };
        line(
            out,
            &serde_json::json!({
                "table": table,
                "columns": cols.iter().map(|(n, k)| [n.as_str(), k.name()]).collect::<Vec<_>>(),
                "ids_given": given,
            }),
        )?;
        let names = column_list(&cols);
        let id_at = cols.iter().position(|(n, _)| n == "id");
        let mut after = i64::MIN;
        let mut n = 0i64;
        loop {
            let page = match id_at {
                Some(_) if *identity => {
                    query(&format!(
                        "SELECT {names} FROM {table} WHERE id > ? ORDER BY id LIMIT ?"
                    ))
                    .bind(after)
                    .bind(PAGE)
                    .fetch_all(&mut *snap)
                    .await
                }
                _ => {
                    query(&format!("SELECT {names} FROM {table}"))
                        .fetch_all(&mut *snap)
                        .await
                }
            }
            .map_err(db(format!("reading {table}")))?;
            for r in &page {
                let mut values = Vec::with_capacity(cols.len());
                for (i, (name, kind)) in cols.iter().enumerate() {
                    let v = kind.read(r, i).map_err(|e| DumpError::Db {
                        what: format!("reading {table}.{name}"),
                        error: e,
                    })?;
                    values.push(to_json(&v));
                }
                line(out, &serde_json::Value::Array(values))?;
            }
            n += page.len() as i64;
            match (id_at, page.last()) {
                (Some(i), Some(last)) if *identity => {
                    after = last.try_get(i).map_err(db(format!("reading {table}.id")))?;
                }
                _ => break,
            }
        }
        line(out, &serde_json::json!({ "end": table, "rows": n }))?;
        rows.push((table.to_string(), n));
    }
    line(
        out,
        &serde_json::json!({
            "end_of_dump": true,
            "rows": rows.iter().map(|(t, n)| (t.clone(), serde_json::Value::from(*n))).collect::<serde_json::Map<_, _>>(),
        }),
    )?;
    out.flush().map_err(DumpError::Write)?;
    Ok(Summary {
        schema_version,
        backend: backend.to_owned(),
        created_ms,
        rows,
    })
}

/// A value as the dump writes it.
fn to_json(v: &Arg) -> serde_json::Value {
    use serde_json::Value as J;
    match v {
        Arg::I64(Some(i)) => J::from(*i),
        // Rust prints the shortest form that parses back to the same bits.
        Arg::F64(Some(f)) => J::String(f.to_string()),
        Arg::Text(Some(s)) => J::String(s.clone()),
        Arg::Bytes(Some(b)) => J::String(crate::auth::hex(b)),
        Arg::Bool(Some(b)) => J::from(i64::from(*b)),
        _ => J::Null,
    }
}

/// A dump's value of a column of `kind`.
fn from_json(v: serde_json::Value, kind: Kind) -> Result<Arg, String> {
    use serde_json::Value as J;
    Ok(match (kind, v) {
        (Kind::Int, J::Null) => Arg::I64(None),
        (Kind::Float, J::Null) => Arg::F64(None),
        (Kind::Text, J::Null) => Arg::Text(None),
        (Kind::Bytes, J::Null) => Arg::Bytes(None),
        (Kind::Int, J::Number(n)) => Arg::I64(Some(n.as_i64().ok_or("not an integer")?)),
        (Kind::Float, J::String(s)) => Arg::F64(Some(
            s.parse().map_err(|_| format!("{s:?} is not a float"))?,
        )),
        (Kind::Text, J::String(s)) => Arg::Text(Some(s)),
        (Kind::Bytes, J::String(s)) => Arg::Bytes(Some(unhex(&s).ok_or("not hex")?)),
        (k, v) => return Err(format!("{v} is not a value of a {} column", k.name())),
    })
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Reads `input` line by line, counting lines for messages.
struct Lines<'a> {
    input: &'a mut (dyn BufRead + Send),
    line: u64,
    buf: String,
}

impl<'a> Lines<'a> {
    fn new(input: &'a mut (dyn BufRead + Send)) -> Self {
        Self {
            input,
            line: 0,
            buf: String::new(),
        }
    }

    /// A table header's columns (`[[name, kind], ...]`).
    fn columns(&self, header: &serde_json::Value, table: &str) -> Result<Columns, DumpError> {
        header["columns"]
            .as_array()
            .ok_or_else(|| self.bad("no columns"))?
            .iter()
            .map(|c| Some((c[0].as_str()?.to_owned(), Kind::parse(c[1].as_str()?)?)))
            .collect::<Option<_>>()
            .ok_or_else(|| self.bad(format!("bad columns of {table}")))
    }

    /// A row of `table`, one value per column of `cols`.
    fn row(
        &self,
        values: Vec<serde_json::Value>,
        table: &str,
        cols: &Columns,
    ) -> Result<Vec<Arg>, DumpError> {
        if values.len() != cols.len() {
            return Err(self.bad(format!(
                "{} values in a row of {table}, which has {} columns",
                values.len(),
                cols.len()
            )));
        }
        values
            .into_iter()
            .zip(cols)
            .map(|(v, (name, kind))| from_json(v, *kind).map_err(|e| format!("{name}: {e}")))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.bad(format!("{table}.{e}")))
    }

    /// The next line as JSON; `None` at the end of the stream.
    fn next(&mut self) -> Result<Option<serde_json::Value>, DumpError> {
        self.buf.clear();
        let n = self
            .input
            .read_line(&mut self.buf)
            .map_err(DumpError::Read)?;
        if n == 0 {
            return Ok(None);
        }
        self.line += 1;
        serde_json::from_str(&self.buf)
            .map(Some)
            .map_err(|e| self.bad(format!("not JSON: {e}")))
    }

    fn bad(&self, message: impl Into<String>) -> DumpError {
        DumpError::Bad {
            line: self.line,
            message: message.into(),
        }
    }
}

/// Reads the dump's header: its schema version, backend and time.
fn header(lines: &mut Lines) -> Result<(i64, String, i64), DumpError> {
    let h = lines
        .next()?
        .ok_or_else(|| DumpError::NotADump("it is empty".into()))?;
    if h["format"] != FORMAT {
        return Err(DumpError::NotADump("no Patronus header".into()));
    }
    if h["version"] != VERSION {
        return Err(DumpError::NotADump(format!(
            "format version {}, this binary reads {VERSION}",
            h["version"]
        )));
    }
    let schema = h["schema_version"]
        .as_i64()
        .ok_or_else(|| lines.bad("no schema_version"))?;
    let backend = h["backend"].as_str().unwrap_or_default().to_owned();
    let created = h["created_ms"].as_i64().unwrap_or_default();
    Ok((schema, backend, created))
}

/// Replaces everything `store` holds with the dump read from `input` (see the module). Refuses
/// a target that holds users or sites unless `replace`. `actor` is recorded in the audit log as
/// having restored it. `check` runs once the whole stream is read, before the commit: an error
/// from it (the stream's hash is not the one expected, say) rolls everything back.
pub async fn load(
    store: &Store,
    input: &mut (dyn BufRead + Send),
    actor: &Actor,
    replace: bool,
    check: &(dyn Fn() -> Result<(), String> + Sync),
) -> Result<Summary, DumpError> {
    let backend = store.backend();
    let mut lines = Lines::new(input);
    let (schema_version, from, created_ms) = header(&mut lines)?;
    let database = store
        .schema_version()
        .await
        .map_err(db("reading the database's schema version"))?;
    if database != schema_version {
        return Err(DumpError::Versions {
            dump: schema_version,
            database,
        });
    }
    let mut tx = store.begin().await.map_err(db("writing the database"))?;
    let (users, sites): (i64, i64) =
        super::db::query_as("SELECT (SELECT COUNT(*) FROM users), (SELECT COUNT(*) FROM sites)")
            .fetch_one(&mut *tx)
            .await
            .map_err(db("reading the database"))?;
    if !replace && (users > 0 || sites > 0) {
        return Err(DumpError::TargetInUse { users, sites });
    }
    // The generation only moves forward: controllers still running, and edges, compare it
    // with what they hold, and one from an older backup would look like no change.
    let generation_before: i64 =
        query_scalar("SELECT COALESCE(MAX(generation), 0) FROM config_generation")
            .fetch_one(&mut *tx)
            .await
            .map_err(db("reading the configuration generation"))?;
    // The signing key the running controllers use stays the one recorded: a backup from
    // before a rotation must not make the old (perhaps stolen) key the one again.
    let signing_key = super::settings::signing_key(&mut tx)
        .await
        .map_err(db("reading the signing key's fingerprint"))?;
    for (table, _) in TABLES.iter().rev() {
        query(&format!("DELETE FROM {table}"))
            .execute(&mut *tx)
            .await
            .map_err(db(format!("emptying {table}")))?;
    }
    let mut rows = Vec::new();
    let mut total = 0u64;
    for (table, identity) in TABLES {
        let t = lines.next()?.ok_or(DumpError::Truncated { rows: total })?;
        if t["table"] != *table {
            return Err(lines.bad(format!("expected table {table}, found {t}")));
        }
        let cols = lines.columns(&t, table)?;
        same_columns(&mut tx, backend, table, &cols).await?;
        let mut batch: Vec<Vec<Arg>> = Vec::with_capacity(LOAD_BATCH);
        let mut n = 0i64;
        let end = loop {
            let v = lines.next()?.ok_or(DumpError::Truncated { rows: total })?;
            let serde_json::Value::Array(values) = v else {
                break v;
            };
            batch.push(lines.row(values, table, &cols)?);
            n += 1;
            total += 1;
            if batch.len() == LOAD_BATCH {
                write_values(&mut tx, table, &cols, &batch)
                    .await
                    .map_err(db(format!("writing {table}")))?;
                batch.clear();
            }
        };
        if !batch.is_empty() {
            write_values(&mut tx, table, &cols, &batch)
                .await
                .map_err(db(format!("writing {table}")))?;
        }
        if end["end"] != *table || end["rows"] != n {
            return Err(lines.bad(format!("{table} ends with {end}, after {n} rows")));
        }
        if *identity {
            let given = t["ids_given"].as_i64().unwrap_or(0);
            set_ids_given(&mut tx, backend, table, given)
                .await
                .map_err(db(format!("moving {table}'s ids")))?;
        }
        let held: i64 = query_scalar(&format!("SELECT COUNT(*) FROM {table}"))
            .fetch_one(&mut *tx)
            .await
            .map_err(db(format!("counting {table}")))?;
        if held != n {
            return Err(DumpError::Table {
                table: table.to_string(),
                message: format!("{n} rows in the dump, {held} in the database after loading"),
            });
        }
        rows.push((table.to_string(), n));
    }
    let trailer = lines.next()?.ok_or(DumpError::Truncated { rows: total })?;
    if trailer["end_of_dump"] != true {
        return Err(lines.bad(format!("expected the trailer, found {trailer}")));
    }
    if lines.next()?.is_some() {
        return Err(lines.bad("more after the trailer"));
    }
    check().map_err(DumpError::Check)?;
    query("UPDATE config_generation SET generation = ? WHERE generation < ?")
        .bind(generation_before)
        .bind(generation_before)
        .execute(&mut *tx)
        .await
        .map_err(db("moving the configuration generation forward"))?;
    // A scheduled backup's dump holds that backup's own claim on the schedule (taken for 30
    // minutes while it ran): restored, it would hold off the next scheduled backup that long.
    // Without it, the restored controllers take one at once (`bench dr` found this).
    query("DELETE FROM settings WHERE key = 'backup_due'")
        .execute(&mut *tx)
        .await
        .map_err(db("clearing the backup schedule"))?;
    if let Some(fingerprint) = &signing_key {
        super::settings::claim_signing_key(&mut tx, fingerprint, true, crate::store::now_s())
            .await
            .map_err(db("keeping the signing key's fingerprint"))?;
    }
    let details = serde_json::json!({
        "from": from,
        "created_ms": created_ms,
        "schema_version": schema_version,
        "rows": rows.iter().map(|(t, n)| (t.clone(), serde_json::Value::from(*n))).collect::<serde_json::Map<_, _>>(),
    });
    Store::audit(&mut tx, actor, "store.restore", "store", details)
        .await
        .map_err(db("auditing the restore"))?;
    // Every edge takes the restored configuration; other controllers are told.
    tx.config_changed()
        .await
        .map_err(db("bumping the configuration generation"))?;
    tx.commit().await.map_err(db("committing the restore"))?;
    Ok(Summary {
        schema_version,
        backend: from,
        created_ms,
        rows,
    })
}

/// The dump's columns of `table` must be the database's, by name and kind (their order may
/// differ by backend): what is written is only ever what the schema has.
async fn same_columns(
    tx: &mut super::Tx,
    backend: &str,
    table: &str,
    cols: &Columns,
) -> Result<(), DumpError> {
    if !TABLES.iter().any(|(t, _)| *t == table) {
        return Err(DumpError::Table {
            table: table.to_owned(),
            message: "not a table of the controller's".into(),
        });
    }
    let here = columns(&mut **tx, backend, table)
        .await
        .map_err(db(format!("reading {table}'s columns")))?;
    let mut a: Vec<(&str, Kind)> = cols.iter().map(|(n, k)| (n.as_str(), *k)).collect();
    let mut b: Vec<(&str, Kind)> = here.iter().map(|(n, k)| (n.as_str(), *k)).collect();
    a.sort_unstable_by_key(|(n, _)| *n);
    b.sort_unstable_by_key(|(n, _)| *n);
    if a != b {
        return Err(DumpError::Table {
            table: table.to_owned(),
            message: format!("the dump has columns {a:?}, the database {b:?}"),
        });
    }
    Ok(())
}

/// A table's columns, in the dump's order, with how each travels.
pub type Columns = Vec<(String, Kind)>;

/// One object of a dump (a site, a policy, a class) and every row that belongs to it: for a
/// site, the rows of every table with a `site_id` of it (links, prefixes, overlay address, hub,
/// credentials, history...), each table with its columns, in the dump's (parents first) order.
#[derive(Debug, Clone)]
pub struct Object {
    pub table: String,
    pub id: i64,
    pub name: String,
    /// Per table: its name, its columns and the object's rows.
    pub rows: Vec<(String, Columns, Vec<Vec<Arg>>)>,
}

impl Object {
    /// Leaves out the rows of `table`.
    pub fn without(&mut self, table: &str) {
        self.rows.retain(|(t, _, _)| t != table);
    }
}

impl Object {
    /// The values of column `col` in the rows of `table` it holds.
    pub fn column(&self, table: &str, col: &str) -> Vec<Arg> {
        self.rows
            .iter()
            .filter(|(t, _, _)| t == table)
            .flat_map(|(_, cols, rows)| {
                let i = cols.iter().position(|(n, _)| n == col);
                rows.iter().filter_map(move |r| i.map(|i| r[i].clone()))
            })
            .collect()
    }
}

/// Reads a whole dump (every line, so that its hash can be checked after) and takes out of it
/// the row of `table` whose `name` is `name`, with what belongs to it when `table` is `sites`.
/// Returns the dump's schema version and the object, if the dump holds it.
pub fn extract(
    input: &mut (dyn BufRead + Send),
    table: &str,
    name: &str,
) -> Result<(i64, Option<Object>), DumpError> {
    let mut lines = Lines::new(input);
    let (schema_version, _, _) = header(&mut lines)?;
    let mut found: Option<Object> = None;
    let mut total = 0;
    // The table being read: its name, columns, and the column that picks rows (`name` in
    // `table`, `site_id` in a site's other tables).
    let mut current: Option<(String, Columns, Option<usize>)> = None;
    loop {
        let v = lines.next()?.ok_or(DumpError::Truncated { rows: total })?;
        match (&current, v) {
            (Some((t, cols, pick)), serde_json::Value::Array(values)) => {
                total += 1;
                if values.len() != cols.len() {
                    return Err(lines.bad(format!(
                        "{} values in a row of {t}, which has {} columns",
                        values.len(),
                        cols.len()
                    )));
                }
                let Some(i) = pick else { continue };
                let hit = if t == table {
                    values.get(*i).and_then(|v| v.as_str()) == Some(name)
                } else {
                    let id = found.as_ref().map(|o| o.id);
                    id.is_some() && values.get(*i).and_then(|v| v.as_i64()) == id
                };
                if !hit {
                    continue;
                }
                let row = lines.row(values, t, cols)?;
                if t == table {
                    let id_at = cols.iter().position(|(n, _)| n == "id");
                    let Some(Arg::I64(Some(id))) = id_at.map(|i| row[i].clone()) else {
                        return Err(lines.bad(format!("a row of {t} without an id")));
                    };
                    found = Some(Object {
                        table: t.clone(),
                        id,
                        name: name.to_owned(),
                        rows: Vec::new(),
                    });
                }
                if let Some(o) = &mut found {
                    match o.rows.last_mut() {
                        Some((lt, _, rows)) if lt == t => rows.push(row),
                        _ => o.rows.push((t.clone(), cols.clone(), vec![row])),
                    }
                }
            }
            (Some(_), _) => current = None,
            (None, v) if v["end_of_dump"] == true => break,
            (None, v) => {
                let t = v["table"]
                    .as_str()
                    .ok_or_else(|| lines.bad(format!("expected a table, found {v}")))?
                    .to_owned();
                let cols = lines.columns(&v, &t)?;
                let pick = if t == table {
                    cols.iter().position(|(n, _)| n == "name")
                } else if table == "sites" {
                    cols.iter().position(|(n, _)| n == "site_id")
                } else {
                    None
                };
                current = Some((t, cols, pick));
            }
        }
    }
    while lines.next()?.is_some() {}
    Ok((schema_version, found))
}

/// The id of the row of `table` whose `column` is `value`, if there is one (read in `tx`);
/// `id` names the id column (`site_id` in a table of sites' parts).
pub async fn taken(
    tx: &mut super::Tx,
    table: &str,
    id: &str,
    column: &str,
    value: Arg,
) -> Result<Option<i64>, sqlx::Error> {
    query_scalar(&format!(
        "SELECT {id} FROM {table} WHERE {column} = ? LIMIT 1"
    ))
    .bind(value)
    .fetch_optional(&mut **tx)
    .await
}

/// Writes every row of `o` (ids kept: the database never gives an id twice, so they are
/// free), once each of its tables is found to be the controller's with the database's
/// columns; then moves each identity past the ids written.
pub async fn insert_object(tx: &mut super::Tx, backend: &str, o: &Object) -> Result<(), DumpError> {
    for (table, cols, _) in &o.rows {
        same_columns(tx, backend, table, cols).await?;
    }
    for (table, cols, rows) in &o.rows {
        write_values(tx, table, cols, rows)
            .await
            .map_err(db(format!("writing {table}")))?;
        if TABLES.iter().any(|(t, id)| t == table && *id) {
            set_ids_given(tx, backend, table, 0)
                .await
                .map_err(db(format!("moving {table}'s ids")))?;
        }
    }
    Ok(())
}
