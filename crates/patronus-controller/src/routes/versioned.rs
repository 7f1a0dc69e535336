//! The writes every versioned document resource makes, written once: create, update (read in
//! the write transaction, `If-Match`, JSON merge patch, the resource's checks, the next
//! version, audit, the stored object back with its `ETag`) and delete. A resource gives its
//! table, its names and its own checks.

use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use crate::error::ApiError;
use crate::routes::{audit_settings, check_if_match, created, patched, with_etag, write_error};
use crate::store::docs::{Doc, DocTable, WriteError};
use crate::store::{Actor, Conn, Store, Tx, now_s};

/// A resource over a document table.
#[derive(Debug)]
pub struct Resource<T: 'static> {
    pub table: &'static DocTable<T>,
    /// Where its objects live in the API: `/api/v1/policies`.
    pub path: &'static str,
    /// The audit target's prefix: `policy` for `policy/7`.
    pub target: &'static str,
    /// The audit actions of create, update and delete.
    pub actions: [&'static str; 3],
    /// The object's name, for the audit record of its deletion.
    pub name: fn(&T) -> String,
}

impl<T: Serialize + DeserializeOwned + 'static> Resource<T> {
    /// Object `id`, or 404.
    pub async fn load(&self, conn: &mut Conn, id: i64) -> Result<Doc<T>, ApiError> {
        self.table
            .get(conn, id)
            .await?
            .ok_or_else(|| ApiError::not_found(format!("{} {id}", self.table.what)))
    }

    fn write_error(&self, e: WriteError, conflict: impl FnOnce() -> String) -> ApiError {
        write_error(e, self.table.what, conflict)
    }

    /// Creates `spec` after `check` (in the write transaction) passes: 201 with `Location`;
    /// 409 with `conflict` if it breaks a uniqueness rule.
    pub async fn create(
        &self,
        store: &Store,
        actor: &Actor,
        spec: T,
        check: impl AsyncFnOnce(&mut Tx, &T) -> Result<(), ApiError>,
        conflict: impl FnOnce(&T) -> String,
    ) -> Result<Response, ApiError> {
        let mut tx = store.begin().await?;
        check(&mut tx, &spec).await?;
        let id = self
            .table
            .insert(&mut tx, &spec, now_s())
            .await
            .map_err(|e| self.write_error(e, || conflict(&spec)))?;
        audit_settings(
            &mut tx,
            actor,
            self.actions[0],
            &format!("{}/{id}", self.target),
            serde_json::to_value(&spec).unwrap_or_default(),
        )
        .await?;
        let d = self.load(&mut tx, id).await?;
        tx.commit().await?;
        Ok(created(format!("{}/{id}", self.path), d.version, d))
    }

    /// Applies the JSON merge patch `patch` to object `id` if `If-Match` allows and `check`
    /// (given the current object and the patched spec, in the write transaction) passes: 200
    /// with the new version; 412 if it changed meanwhile; 409 with `conflict`.
    #[allow(clippy::too_many_arguments)] // the request's parts, and the resource's two rules
    pub async fn update(
        &self,
        store: &Store,
        actor: &Actor,
        id: i64,
        headers: &HeaderMap,
        patch: Value,
        check: impl AsyncFnOnce(&mut Tx, &Doc<T>, &T) -> Result<(), ApiError>,
        conflict: impl FnOnce(&T) -> String,
    ) -> Result<Response, ApiError> {
        let mut tx = store.begin().await?;
        let cur = self.load(&mut tx, id).await?;
        check_if_match(headers, cur.version)?;
        let spec: T = patched(&cur.spec, &patch)?;
        check(&mut tx, &cur, &spec).await?;
        self.table
            .update(&mut tx, id, cur.version, &spec, now_s())
            .await
            .map_err(|e| self.write_error(e, || conflict(&spec)))?;
        audit_settings(
            &mut tx,
            actor,
            self.actions[1],
            &format!("{}/{id}", self.target),
            patch,
        )
        .await?;
        let d = self.load(&mut tx, id).await?;
        tx.commit().await?;
        Ok(with_etag(StatusCode::OK, d.version, d))
    }

    /// Deletes object `id` if `If-Match` allows and `check` (given it) passes: 204.
    pub async fn delete(
        &self,
        store: &Store,
        actor: &Actor,
        id: i64,
        headers: &HeaderMap,
        check: impl AsyncFnOnce(&mut Tx, &Doc<T>) -> Result<(), ApiError>,
    ) -> Result<StatusCode, ApiError> {
        let mut tx = store.begin().await?;
        let cur = self.load(&mut tx, id).await?;
        check_if_match(headers, cur.version)?;
        check(&mut tx, &cur).await?;
        self.table.delete(&mut tx, id).await?;
        audit_settings(
            &mut tx,
            actor,
            self.actions[2],
            &format!("{}/{id}", self.target),
            json!({ "name": (self.name)(&cur.spec) }),
        )
        .await?;
        tx.commit().await?;
        Ok(StatusCode::NO_CONTENT)
    }
}
