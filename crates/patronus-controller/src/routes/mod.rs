//! The API's routes, one module per resource.

pub mod api_keys;
pub mod audit;
pub mod auth;
pub mod edge;
pub mod enroll;
pub mod events;
pub mod failover;
pub mod paths;
pub mod policies;
pub mod sites;
pub mod sla_classes;
pub mod system;
pub mod topology;
pub mod traffic;
pub mod users;
pub mod versioned;
pub mod webhooks;

use serde::Serialize;

use crate::error::ApiError;
use crate::store::Touches;

/// A page of a list, with the total that matched.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub total: i64,
    pub limit: i64,
    pub offset: i64,
}

impl<T> Page<T> {
    pub fn new(items: Vec<T>, total: i64, paging: Paging) -> Self {
        Self {
            items,
            total,
            limit: paging.limit,
            offset: paging.offset,
        }
    }
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

/// The largest offset: 2^53 - 1, the largest integer every JSON client reads exactly.
pub const MAX_OFFSET: i64 = (1 << 53) - 1;

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
        if !(0..=MAX_OFFSET).contains(&self.offset) {
            e.push("offset", format!("must be between 0 and {MAX_OFFSET}"));
        }
        e.into_result().map_err(ApiError::validation)?;
        Ok(self)
    }
}

pub use crate::store::docs::Doc;

pub(crate) fn page<T>(items: Vec<T>, paging: Paging) -> Page<T> {
    let total = items.len() as i64;
    let items = items
        .into_iter()
        .skip(paging.offset as usize)
        .take(paging.limit as usize)
        .collect();
    Page::new(items, total, paging)
}

/// A sort key's name and how to get it.
pub(crate) type SortKey<T> = (&'static str, fn(&T) -> String);

/// Sorts `items` by the key `sort` names among `keys` (the first is the default).
pub(crate) fn sort_by<T>(
    items: &mut [T],
    sort: Option<&str>,
    keys: &[SortKey<T>],
) -> Result<(), ApiError> {
    let sort = sort.unwrap_or(keys[0].0);
    let (desc, name) = sort.strip_prefix('-').map_or((false, sort), |k| (true, k));
    let Some((_, key)) = keys.iter().find(|(k, _)| *k == name) else {
        let names: Vec<&str> = keys.iter().map(|(k, _)| *k).collect();
        return Err(ApiError::field(
            "sort",
            format!(
                "must be one of {} (- in front for descending)",
                names.join(", ")
            ),
        ));
    };
    items.sort_by_cached_key(key);
    if desc {
        items.reverse();
    }
    Ok(())
}

/// Zero-padded, so that numbers sort as strings.
pub(crate) fn num(n: i64) -> String {
    format!("{n:020}")
}

/// Audits a write that changes what some edge runs, in its transaction: the audit record, the
/// configuration generation bumped and `config.changed` queued commit with the change, or none
/// of them does.
pub async fn audit_config(
    tx: &mut crate::store::Tx,
    actor: &crate::store::Actor,
    action: &'static str,
    target: &str,
    details: serde_json::Value,
) -> Result<(), ApiError> {
    audit_change(tx, actor, (action, target, details), Touches::Sites).await
}

/// [`audit_config`] for a change of the network-wide settings only (policies, SLA classes,
/// failover settings; not the topology, which renumbers sites): the next compile keeps the
/// sites it read last ([`Touches::Settings`]). A policy written to a thousand sites is then
/// one read of the policies, not of every site and link.
pub async fn audit_settings(
    tx: &mut crate::store::Tx,
    actor: &crate::store::Actor,
    action: &'static str,
    target: &str,
    details: serde_json::Value,
) -> Result<(), ApiError> {
    audit_change(tx, actor, (action, target, details), Touches::Settings).await
}

async fn audit_change(
    tx: &mut crate::store::Tx,
    actor: &crate::store::Actor,
    (action, target, details): (&'static str, &str, serde_json::Value),
    touches: Touches,
) -> Result<(), ApiError> {
    crate::store::Store::audit(tx, actor, action, target, details).await?;
    crate::webhooks::config_changed(tx, actor, action, target, touches).await?;
    Ok(())
}

/// The `ETag` of a versioned object: its version, quoted.
pub fn etag(version: i64) -> axum::http::HeaderValue {
    axum::http::HeaderValue::from_str(&format!("\"{version}\""))
        .unwrap_or(axum::http::HeaderValue::from_static("\"0\""))
}

/// A JSON response with the object's `ETag`.
pub fn with_etag(
    status: axum::http::StatusCode,
    version: i64,
    body: impl Serialize,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let mut r = (status, axum::Json(body)).into_response();
    r.headers_mut()
        .insert(axum::http::header::ETAG, etag(version));
    r
}

/// 201 with `Location` and `ETag`.
pub fn created(location: String, version: i64, body: impl Serialize) -> axum::response::Response {
    let mut r = with_etag(axum::http::StatusCode::CREATED, version, body);
    if let Ok(v) = axum::http::HeaderValue::from_str(&location) {
        r.headers_mut().insert(axum::http::header::LOCATION, v);
    }
    r
}

/// `If-Match`, when given, must name the current version (or be `*`): 412 otherwise, so that an
/// update based on a stale read fails instead of undoing someone else's.
pub fn check_if_match(headers: &axum::http::HeaderMap, version: i64) -> Result<(), ApiError> {
    let Some(v) = headers.get(axum::http::header::IF_MATCH) else {
        return Ok(());
    };
    let given = v.to_str().unwrap_or("");
    let current = format!("\"{version}\"");
    if given
        .split(',')
        .map(|t| t.trim().trim_start_matches("W/"))
        .any(|t| t == "*" || t == current)
    {
        Ok(())
    } else {
        Err(ApiError::precondition_failed(format!(
            "it changed since you read it (now version {version}); read it again"
        )))
    }
}

/// `If-Match` on an object that has no versions: only `*` (it exists) can match; any entity tag
/// is 412.
pub fn check_if_match_unversioned(headers: &axum::http::HeaderMap) -> Result<(), ApiError> {
    match headers.get(axum::http::header::IF_MATCH) {
        Some(v) if v.to_str().map(str::trim).ok() != Some("*") => Err(
            ApiError::precondition_failed("this object has no versions: If-Match can only be *"),
        ),
        _ => Ok(()),
    }
}

/// A store write's error as the API says it: 409 with `conflict` for a uniqueness rule, 412 if
/// the `what` changed since it was read.
pub(crate) fn write_error(
    e: crate::store::docs::WriteError,
    what: &str,
    conflict: impl FnOnce() -> String,
) -> ApiError {
    use crate::store::docs::WriteError;
    match e {
        WriteError::Unique => ApiError::conflict(conflict()),
        WriteError::Stale => ApiError::precondition_failed(format!(
            "the {what} changed while this update ran; read it again"
        )),
        WriteError::Db(e) => e.into(),
        WriteError::Encode(e) => ApiError::internal(e),
    }
}

/// `current` with a JSON merge patch applied, read back as a `T`: 422 (serde names the field)
/// if the result is not one.
pub fn patched<T: Serialize + serde::de::DeserializeOwned>(
    current: &T,
    patch: &serde_json::Value,
) -> Result<T, ApiError> {
    let mut doc = serde_json::to_value(current).map_err(ApiError::internal)?;
    merge_patch(&mut doc, patch);
    serde_json::from_value(doc).map_err(|e| {
        ApiError::new(
            axum::http::StatusCode::UNPROCESSABLE_ENTITY,
            "validation_failed",
            e.to_string(),
        )
    })
}

/// JSON merge patch (RFC 7386): objects merge key by key, `null` removes, anything else replaces.
pub fn merge_patch(target: &mut serde_json::Value, patch: &serde_json::Value) {
    use serde_json::Value;
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(serde_json::Map::new());
    }
    if let Value::Object(t) = target {
        for (k, v) in p {
            if v.is_null() {
                t.remove(k);
            } else {
                merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    #[test]
    fn merge_patch_follows_rfc_7386_appendix_a() {
        for (target, patch, want) in [
            (json!({"a": "b"}), json!({"a": "c"}), json!({"a": "c"})),
            (
                json!({"a": "b"}),
                json!({"b": "c"}),
                json!({"a": "b", "b": "c"}),
            ),
            (json!({"a": "b"}), json!({"a": null}), json!({})),
            (
                json!({"a": "b", "b": "c"}),
                json!({"a": null}),
                json!({"b": "c"}),
            ),
            (json!({"a": ["b"]}), json!({"a": "c"}), json!({"a": "c"})),
            (
                json!({"a": {"b": "c"}}),
                json!({"a": {"b": "d", "c": null}}),
                json!({"a": {"b": "d"}}),
            ),
            (
                json!({"a": [{"b": "c"}]}),
                json!({"a": [1]}),
                json!({"a": [1]}),
            ),
            (
                json!({"e": null}),
                json!({"a": 1}),
                json!({"e": null, "a": 1}),
            ),
            (
                json!([1, 2]),
                json!({"a": "b", "c": null}),
                json!({"a": "b"}),
            ),
            (
                json!({}),
                json!({"a": {"bb": {"ccc": null}}}),
                json!({"a": {"bb": {}}}),
            ),
        ] {
            let mut t = target.clone();
            super::merge_patch(&mut t, &patch);
            assert_eq!(t, want, "{target} + {patch}");
        }
    }
}
