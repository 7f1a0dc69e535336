//! Tables of versioned documents: each row holds an object exactly as the API takes it and the
//! edges receive it (its spec, as JSON), its version and times, and beside the spec the
//! columns the database keeps unique or sorts by (a name, an order). SLA classes and policies
//! are such tables; every statement on them is here, written once for all of them.

use std::marker::PhantomData;

use serde::Serialize;
use serde::de::DeserializeOwned;

use super::Conn;
#[allow(unused_imports)]
use super::db::{Row, query, query_as, query_scalar};

/// A stored document and its bookkeeping, as the API shows it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Doc<T> {
    pub id: i64,
    #[serde(flatten)]
    pub spec: T,
    /// Built-in classes only: these cannot be deleted.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub builtin: bool,
    pub version: i64,
    pub created_at: i64,
    pub updated_at: i64,
}

/// Why a write did not happen.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// It broke a uniqueness rule (a name, an order).
    #[error("a uniqueness rule")]
    Unique,
    /// The row is not at the version the write was based on (another writer got there first),
    /// or is gone.
    #[error("the row changed")]
    Stale,
    #[error(transparent)]
    Db(sqlx::Error),
    /// The spec could not be written as JSON (a bug, not the client's).
    #[error("encoding the document: {0}")]
    Encode(serde_json::Error),
}

impl From<sqlx::Error> for WriteError {
    fn from(e: sqlx::Error) -> Self {
        match &e {
            sqlx::Error::Database(d) if d.is_unique_violation() => Self::Unique,
            _ => Self::Db(e),
        }
    }
}

/// A column kept beside the spec, taken from it.
#[derive(Debug, Clone)]
pub enum Col {
    Text(String),
    Int(i64),
}

/// A column beside the spec: its name, and how it is taken from the spec.
pub type Column<T> = (&'static str, fn(&T) -> Col);

/// One table of documents of type `T`.
#[derive(Debug)]
pub struct DocTable<T: 'static> {
    /// Its name in the schema (a constant, never a client's input).
    table: &'static str,
    /// What an object is called in messages: "policy", "SLA class".
    pub what: &'static str,
    /// The order of [`DocTable::all`].
    order: &'static str,
    /// The columns beside the spec, and how each is taken from it.
    columns: &'static [Column<T>],
    _t: PhantomData<fn() -> T>,
}

pub const CLASSES: DocTable<patronus_api::SlaClass> = DocTable {
    table: "sla_classes",
    what: "SLA class",
    order: "id",
    columns: &[("name", |c| Col::Text(c.name.to_string()))],
    _t: PhantomData,
};

pub const POLICIES: DocTable<patronus_api::Policy> = DocTable {
    table: "policies",
    what: "policy",
    order: "ord, id",
    columns: &[
        ("name", |p| Col::Text(p.name.to_string())),
        ("ord", |p| Col::Int(i64::from(p.order))),
    ],
    _t: PhantomData,
};

type Query<'q> = super::db::Query<'q>;

fn bind_col(q: Query<'_>, c: Col) -> Query<'_> {
    match c {
        Col::Text(s) => q.bind(s),
        Col::Int(i) => q.bind(i),
    }
}

impl<T: Serialize + DeserializeOwned + 'static> DocTable<T> {
    fn read(&self, r: &Row) -> Result<Doc<T>, sqlx::Error> {
        let spec: String = r.try_get("spec")?;
        let spec = serde_json::from_str(&spec).map_err(|e| sqlx::Error::ColumnDecode {
            index: format!("{}.spec", self.table),
            source: Box::new(e),
        })?;
        Ok(Doc {
            id: r.try_get("id")?,
            spec,
            builtin: r.try_get::<i64, _>("builtin").unwrap_or(0) != 0,
            version: r.try_get("version")?,
            created_at: r.try_get("created_at")?,
            updated_at: r.try_get("updated_at")?,
        })
    }

    /// Every document, in the table's order.
    pub async fn all(&self, conn: &mut Conn) -> Result<Vec<Doc<T>>, sqlx::Error> {
        query(&format!(
            "SELECT * FROM {} ORDER BY {}",
            self.table, self.order
        ))
        .fetch_all(&mut *conn)
        .await?
        .iter()
        .map(|r| self.read(r))
        .collect()
    }

    /// Document `id`, if there is one.
    pub async fn get(&self, conn: &mut Conn, id: i64) -> Result<Option<Doc<T>>, sqlx::Error> {
        query(&format!("SELECT * FROM {} WHERE id = ?", self.table))
            .bind(id)
            .fetch_optional(&mut *conn)
            .await?
            .map(|r| self.read(&r))
            .transpose()
    }

    /// Stores `spec` as a new document (version 1); its id.
    pub async fn insert(&self, conn: &mut Conn, spec: &T, now: i64) -> Result<i64, WriteError> {
        let names: Vec<&str> = self.columns.iter().map(|(n, _)| *n).collect();
        let sql = format!(
            "INSERT INTO {} ({}, spec, created_at, updated_at) VALUES ({}?, ?, ?) RETURNING id",
            self.table,
            names.join(", "),
            "?, ".repeat(names.len()),
        );
        let json = serde_json::to_string(spec).map_err(WriteError::Encode)?;
        let mut q = query(&sql);
        for (_, get) in self.columns {
            q = bind_col(q, get(spec));
        }
        let id = q
            .bind(json)
            .bind(now)
            .bind(now)
            .fetch_one(&mut *conn)
            .await?;
        Ok(id.try_get("id")?)
    }

    /// Replaces document `id`, if it is still at `version`, with `spec` as the next version.
    pub async fn update(
        &self,
        conn: &mut Conn,
        id: i64,
        version: i64,
        spec: &T,
        now: i64,
    ) -> Result<(), WriteError> {
        let sets: String = self
            .columns
            .iter()
            .map(|(n, _)| format!("{n} = ?, "))
            .collect();
        let sql = format!(
            "UPDATE {} SET {sets}spec = ?, version = version + 1, updated_at = ?
             WHERE id = ? AND version = ?",
            self.table
        );
        let json = serde_json::to_string(spec).map_err(WriteError::Encode)?;
        let mut q = query(&sql);
        for (_, get) in self.columns {
            q = bind_col(q, get(spec));
        }
        let r = q
            .bind(json)
            .bind(now)
            .bind(id)
            .bind(version)
            .execute(&mut *conn)
            .await?;
        super::one_row_changed(r)
    }

    /// Deletes document `id` (nothing if it is gone).
    pub async fn delete(&self, conn: &mut Conn, id: i64) -> Result<(), sqlx::Error> {
        super::delete_by_id(conn, self.table, id).await
    }
}
