//! The API's routes, one module per resource.

pub mod audit;
pub mod auth;
pub mod system;
pub mod users;

use serde::Serialize;

use crate::error::ApiError;

/// A page of a list, with the total that matched.
#[derive(Debug, Serialize)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub total: i64,
    pub limit: i64,
    pub offset: i64,
}

/// `limit` and `offset` of a list request. (Each list's query type has them as its own fields:
/// `#[serde(flatten)]` would make every query value a string.)
#[derive(Debug, Clone, Copy)]
pub struct Paging {
    pub limit: i64,
    pub offset: i64,
}

/// Items per page when the request does not say.
pub const DEFAULT_LIMIT: i64 = 50;

/// The most items one page holds.
pub const MAX_LIMIT: i64 = 500;

impl Paging {
    pub fn new(limit: Option<i64>, offset: Option<i64>) -> Result<Self, ApiError> {
        Self {
            limit: limit.unwrap_or(DEFAULT_LIMIT),
            offset: offset.unwrap_or(0),
        }
        .check()
    }

    fn check(self) -> Result<Self, ApiError> {
        let mut e = patronus_api::FieldErrors::default();
        if !(1..=MAX_LIMIT).contains(&self.limit) {
            e.push("limit", format!("must be between 1 and {MAX_LIMIT}"));
        }
        if self.offset < 0 {
            e.push("offset", "must not be negative");
        }
        e.into_result().map_err(ApiError::validation)?;
        Ok(self)
    }
}
