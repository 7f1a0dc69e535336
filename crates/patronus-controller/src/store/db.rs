//! One query type over the store's two backends, SQLite and PostgreSQL.
//!
//! A statement is written once, with `?` for its parameters (SQLite's form); on PostgreSQL the
//! `?` outside quoted literals become `$1`, `$2`, ... in order when the statement runs. Its
//! parameters are bound from a closed set of values ([`Arg`]: integers, floats, text, bytes,
//! booleans, each possibly NULL), and it runs on the native sqlx driver of the connection it is
//! given, so rows are decoded by each driver's own types ([`Row::try_get`]). This is what sqlx's
//! `Any` driver aims at, without its gaps: rows are native (JSON text, bytes and floats decode
//! as on the native drivers), SQLite's pragmas are set, and the native connections stay at hand
//! for what only one backend has (PostgreSQL's advisory locks, `LISTEN`/`NOTIFY`).
//!
//! A connection is anything that can lend its native connection ([`AsConn`]): a pooled
//! connection, a transaction, or a native connection itself. The store's functions take
//! `&mut Conn` (`dyn AsConn`), so handlers pass `&mut *tx` whatever the backend.

use sqlx::postgres::{PgConnection, PgRow};
use sqlx::sqlite::{SqliteConnection, SqliteRow};
use sqlx::{Postgres, Sqlite};

/// Which database a connection is to, with the native connection.
#[derive(Debug)]
pub enum Raw<'a> {
    Sqlite(&'a mut SqliteConnection),
    Pg(&'a mut PgConnection),
}

/// Something that lends a native connection: what the store's statements run on.
pub trait AsConn: Send {
    fn raw(&mut self) -> Raw<'_>;
}

/// A connection to the store's database, whatever the backend.
pub type Conn = dyn AsConn;

impl AsConn for SqliteConnection {
    fn raw(&mut self) -> Raw<'_> {
        Raw::Sqlite(self)
    }
}

impl AsConn for PgConnection {
    fn raw(&mut self) -> Raw<'_> {
        Raw::Pg(self)
    }
}

/// A parameter's value.
#[derive(Debug, Clone, PartialEq)]
pub enum Arg {
    I64(Option<i64>),
    F64(Option<f64>),
    Text(Option<String>),
    Bytes(Option<Vec<u8>>),
    Bool(Option<bool>),
}

macro_rules! arg_from {
    ($variant:ident: $($t:ty => |$v:ident| $e:expr),+ $(,)?) => {$(
        impl From<$t> for Arg {
            fn from($v: $t) -> Self {
                Arg::$variant($e)
            }
        }
    )+};
}

arg_from!(I64:
    i64 => |v| Some(v),
    &i64 => |v| Some(*v),
    i32 => |v| Some(i64::from(v)),
    u32 => |v| Some(i64::from(v)),
    Option<i64> => |v| v,
);
arg_from!(F64:
    f64 => |v| Some(v),
    Option<f64> => |v| v,
);
arg_from!(Text:
    &str => |v| Some(v.to_owned()),
    String => |v| Some(v),
    &String => |v| Some(v.clone()),
    Option<String> => |v| v,
    Option<&str> => |v| v.map(str::to_owned),
    &Option<String> => |v| v.clone(),
);
arg_from!(Bytes:
    &[u8] => |v| Some(v.to_vec()),
    Vec<u8> => |v| Some(v),
    &Vec<u8> => |v| Some(v.clone()),
    Option<Vec<u8>> => |v| v,
);
arg_from!(Bool:
    bool => |v| Some(v),
);

/// `sql` with PostgreSQL's numbered parameters, numbered as SQLite numbers them: `?NNN`
/// becomes `$NNN`, and each bare `?` outside a quoted literal or identifier the next number
/// after the largest so far.
pub fn numbered(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len() + 16);
    let mut quote: Option<char> = None;
    let mut largest = 0u32;
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        match quote {
            Some(q) => {
                if c == q {
                    quote = None;
                }
                out.push(c);
            }
            None if c == '\'' || c == '"' => {
                quote = Some(c);
                out.push(c);
            }
            None if c == '?' => {
                out.push('$');
                if chars.peek().is_some_and(char::is_ascii_digit) {
                    let mut digits = String::new();
                    while let Some(d) = chars.next_if(char::is_ascii_digit) {
                        digits.push(d);
                    }
                    largest = largest.max(digits.parse().unwrap_or(u32::MAX));
                    out.push_str(&digits);
                } else {
                    largest += 1;
                    out.push_str(&largest.to_string());
                }
            }
            None => out.push(c),
        }
    }
    out
}

macro_rules! bind_args {
    ($query:expr, $args:expr) => {{
        let mut q = $query;
        for a in $args {
            q = match a {
                Arg::I64(v) => q.bind(v),
                Arg::F64(v) => q.bind(v),
                Arg::Text(v) => q.bind(v),
                Arg::Bytes(v) => q.bind(v),
                Arg::Bool(v) => q.bind(v),
            };
        }
        q
    }};
}

/// A statement and its parameters.
#[must_use = "a query does nothing until it runs"]
#[derive(Debug)]
pub struct Query<'q> {
    sql: &'q str,
    args: Vec<Arg>,
}

/// A statement (`?` for parameters), to bind and run on a [`Conn`].
pub fn query(sql: &str) -> Query<'_> {
    Query {
        sql,
        args: Vec::new(),
    }
}

/// What a statement that returns no rows did.
#[derive(Debug, Clone, Copy)]
pub struct Done {
    rows: u64,
}

impl Done {
    pub fn rows_affected(&self) -> u64 {
        self.rows
    }
}

/// A row of either backend.
pub enum Row {
    Sqlite(SqliteRow),
    Pg(PgRow),
}

impl std::fmt::Debug for Row {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let columns = match self {
            Row::Sqlite(r) => sqlx::Row::len(r),
            Row::Pg(r) => sqlx::Row::len(r),
        };
        write!(f, "Row({columns} columns)")
    }
}

/// A Rust type both drivers decode (and encode).
pub trait Value:
    for<'r> sqlx::Decode<'r, Sqlite>
    + sqlx::Type<Sqlite>
    + for<'r> sqlx::Decode<'r, Postgres>
    + sqlx::Type<Postgres>
{
}

impl<T> Value for T where
    T: for<'r> sqlx::Decode<'r, Sqlite>
        + sqlx::Type<Sqlite>
        + for<'r> sqlx::Decode<'r, Postgres>
        + sqlx::Type<Postgres>
{
}

/// A column, by name or position.
pub trait Column: sqlx::ColumnIndex<SqliteRow> + sqlx::ColumnIndex<PgRow> {}

impl<I: sqlx::ColumnIndex<SqliteRow> + sqlx::ColumnIndex<PgRow>> Column for I {}

impl Row {
    /// Column `col`, decoded as `T` by the row's own driver.
    pub fn try_get<T: Value, I: Column>(&self, col: I) -> Result<T, sqlx::Error> {
        match self {
            Row::Sqlite(r) => sqlx::Row::try_get(r, col),
            Row::Pg(r) => sqlx::Row::try_get(r, col),
        }
    }

    /// Text column `col`, borrowed from the row.
    pub fn str<I: Column>(&self, col: I) -> Result<&str, sqlx::Error> {
        match self {
            Row::Sqlite(r) => sqlx::Row::try_get(r, col),
            Row::Pg(r) => sqlx::Row::try_get(r, col),
        }
    }
}

impl<'q> Query<'q> {
    pub fn bind(mut self, v: impl Into<Arg>) -> Self {
        self.args.push(v.into());
        self
    }

    pub async fn execute(self, conn: &mut Conn) -> Result<Done, sqlx::Error> {
        let rows = match conn.raw() {
            Raw::Sqlite(c) => bind_args!(sqlx::query(self.sql), self.args)
                .execute(c)
                .await?
                .rows_affected(),
            Raw::Pg(c) => {
                let sql = numbered(self.sql);
                bind_args!(sqlx::query(&sql), self.args)
                    .execute(c)
                    .await?
                    .rows_affected()
            }
        };
        Ok(Done { rows })
    }

    pub async fn fetch_all(self, conn: &mut Conn) -> Result<Vec<Row>, sqlx::Error> {
        Ok(match conn.raw() {
            Raw::Sqlite(c) => bind_args!(sqlx::query(self.sql), self.args)
                .fetch_all(c)
                .await?
                .into_iter()
                .map(Row::Sqlite)
                .collect(),
            Raw::Pg(c) => {
                let sql = numbered(self.sql);
                bind_args!(sqlx::query(&sql), self.args)
                    .fetch_all(c)
                    .await?
                    .into_iter()
                    .map(Row::Pg)
                    .collect()
            }
        })
    }

    pub async fn fetch_optional(self, conn: &mut Conn) -> Result<Option<Row>, sqlx::Error> {
        Ok(match conn.raw() {
            Raw::Sqlite(c) => bind_args!(sqlx::query(self.sql), self.args)
                .fetch_optional(c)
                .await?
                .map(Row::Sqlite),
            Raw::Pg(c) => {
                let sql = numbered(self.sql);
                bind_args!(sqlx::query(&sql), self.args)
                    .fetch_optional(c)
                    .await?
                    .map(Row::Pg)
            }
        })
    }

    pub async fn fetch_one(self, conn: &mut Conn) -> Result<Row, sqlx::Error> {
        self.fetch_optional(conn)
            .await?
            .ok_or(sqlx::Error::RowNotFound)
    }
}

/// What a row decodes into: a tuple of [`Value`]s, by position.
pub trait FromRow: Sized {
    fn from_row(r: &Row) -> Result<Self, sqlx::Error>;
}

macro_rules! tuple_from_row {
    ($($t:ident $i:tt),+) => {
        impl<$($t: Value),+> FromRow for ($($t,)+) {
            fn from_row(r: &Row) -> Result<Self, sqlx::Error> {
                Ok(($(r.try_get::<$t, usize>($i)?,)+))
            }
        }
    };
}

tuple_from_row!(A 0);
tuple_from_row!(A 0, B 1);
tuple_from_row!(A 0, B 1, C 2);
tuple_from_row!(A 0, B 1, C 2, D 3);
tuple_from_row!(A 0, B 1, C 2, D 3, E 4);
tuple_from_row!(A 0, B 1, C 2, D 3, E 4, F 5);
tuple_from_row!(A 0, B 1, C 2, D 3, E 4, F 5, G 6);
tuple_from_row!(A 0, B 1, C 2, D 3, E 4, F 5, G 6, H 7);

/// A statement whose rows each decode into a `T` (a tuple: [`query_as`]; the first column:
/// [`query_scalar`]).
#[must_use = "a query does nothing until it runs"]
#[derive(Debug)]
pub struct QueryAs<'q, T> {
    q: Query<'q>,
    decode: fn(&Row) -> Result<T, sqlx::Error>,
}

/// A statement whose rows decode into tuples.
pub fn query_as<T: FromRow>(sql: &str) -> QueryAs<'_, T> {
    QueryAs {
        q: query(sql),
        decode: T::from_row,
    }
}

/// A statement whose rows are one value each (the first column).
pub fn query_scalar<T: Value>(sql: &str) -> QueryAs<'_, T> {
    QueryAs {
        q: query(sql),
        decode: |r| r.try_get(0usize),
    }
}

impl<'q, T> QueryAs<'q, T> {
    pub fn bind(mut self, v: impl Into<Arg>) -> Self {
        self.q = self.q.bind(v);
        self
    }

    pub async fn fetch_all(self, conn: &mut Conn) -> Result<Vec<T>, sqlx::Error> {
        self.q
            .fetch_all(conn)
            .await?
            .iter()
            .map(self.decode)
            .collect()
    }

    pub async fn fetch_optional(self, conn: &mut Conn) -> Result<Option<T>, sqlx::Error> {
        self.q
            .fetch_optional(conn)
            .await?
            .as_ref()
            .map(self.decode)
            .transpose()
    }

    pub async fn fetch_one(self, conn: &mut Conn) -> Result<T, sqlx::Error> {
        (self.decode)(&self.q.fetch_one(conn).await?)
    }
}

#[cfg(test)]
mod tests {
    use super::numbered;

    #[test]
    fn parameters_are_numbered_outside_literals() {
        assert_eq!(
            numbered("SELECT a FROM t WHERE b = ? AND c LIKE ? ESCAPE '\\' AND d = '?' LIMIT ?"),
            "SELECT a FROM t WHERE b = $1 AND c LIKE $2 ESCAPE '\\' AND d = '?' LIMIT $3"
        );
        assert_eq!(numbered("x = ?2 OR y = ?1"), "x = $2 OR y = $1");
        // A bare ? after ?N is N + 1, as SQLite counts.
        assert_eq!(numbered("a = ?3 AND b = ?"), "a = $3 AND b = $4");
        assert_eq!(numbered("SELECT \"a?\" FROM t"), "SELECT \"a?\" FROM t");
    }
}
