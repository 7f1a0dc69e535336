//! The OpenAPI 3.1 document (generated from the handlers' `#[utoipa::path]` annotations and the
//! types' schemas) at `/api/v1/openapi.json`, and a page at `/docs` that renders it on the
//! server: self-contained HTML, no script, nothing fetched from elsewhere.

use std::fmt::Write as _;

use utoipa::Modify;
use utoipa::openapi::OpenApi;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};

/// Public: the document and the page describe the API, not its data.
pub const OPENAPI_PATH: &str = "/api/v1/openapi.json";
pub const DOCS_PATH: &str = "/docs";

/// The document as JSON and as the page, made once.
fn rendered() -> &'static (String, String) {
    static R: std::sync::OnceLock<(String, String)> = std::sync::OnceLock::new();
    R.get_or_init(|| {
        let doc = crate::app::document();
        (
            serde_json::to_string_pretty(&doc).unwrap_or_default(),
            page(&doc),
        )
    })
}

/// The OpenAPI document.
#[utoipa::path(
    get,
    path = "/api/v1/openapi.json",
    tag = "system",
    summary = "This document (OpenAPI 3.1).",
    responses((status = 200, body = serde_json::Value))
)]
pub async fn openapi_json() -> impl axum::response::IntoResponse {
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        rendered().0.clone(),
    )
}

/// The document as a page.
#[utoipa::path(
    get,
    path = "/docs",
    tag = "system",
    summary = "This document as an HTML page, rendered on the server.",
    responses((status = 200, content_type = "text/html", body = String))
)]
pub async fn docs_page() -> axum::response::Html<String> {
    axum::response::Html(rendered().1.clone())
}

#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "Patronus controller API",
        description = "The desired state of a Patronus SD-WAN. Authenticate with \
            `POST /api/v1/auth/login` and send `Authorization: Bearer <access_token>` (or an API \
            key). Each operation's security requirement names the least role it needs (`viewer`, \
            `operator`, `admin`); a caller below it gets 403. An operation on `/users/{id}` that \
            also lists the requirement `self` may be done by the user the path names, whatever \
            its role (reading oneself, changing one's own password). Every error is an object `error` with `code`, `message` and `details`. \
            Updates are JSON merge patches; send the `ETag` you read as `If-Match` to get 412 \
            instead of overwriting a change you have not seen."
    ),
    components(schemas(crate::error::ErrorBody, crate::error::ErrorDetail, patronus_api::FieldError)),
    modifiers(&Bearer),
)]
#[derive(Debug)]
pub struct ApiDoc;

struct Bearer;

impl Modify for Bearer {
    fn modify(&self, openapi: &mut OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "An access token from /api/v1/auth/login, or an API key (pak_...).",
                    ))
                    .build(),
            ),
        );
        components.add_security_scheme(
            "site",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "An enrolled edge's site credential (from POST /api/v1/enroll): it \
                         authenticates that site on /api/v1/edge/... and nowhere else.",
                    ))
                    .build(),
            ),
        );
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The document as one HTML page: every operation with its parameters, body and responses, and
/// every schema as JSON.
pub fn page(doc: &serde_json::Value) -> String {
    use serde_json::Value;
    let text = |v: &Value| esc(v.as_str().unwrap_or(""));
    let schema_name = |s: &Value| match s.get("$ref").and_then(Value::as_str) {
        Some(r) => r.rsplit('/').next().unwrap_or("").to_owned(),
        None => s.to_string(),
    };
    let mut h = String::new();
    let info = &doc["info"];
    let _ = write!(
        h,
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>{t}</title><style>\
         body{{font-family:system-ui,sans-serif;max-width:72rem;margin:2rem auto;padding:0 1rem}}\
         code,pre{{font-family:ui-monospace,monospace}}pre{{background:#f4f4f4;padding:.5rem;overflow:auto}}\
         .op{{border-top:1px solid #ddd;padding:.5rem 0}}.m{{font-weight:bold;text-transform:uppercase;display:inline-block;width:5rem}}\
         </style></head><body><h1>{t} {v}</h1><p>{d}</p><p>The machine-readable document: \
         <a href=\"{OPENAPI_PATH}\"><code>{OPENAPI_PATH}</code></a>.</p>",
        t = text(&info["title"]),
        v = text(&info["version"]),
        d = text(&info["description"]),
    );
    let mut by_tag: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    for (path, item) in doc["paths"].as_object().into_iter().flatten() {
        for method in ["get", "post", "put", "patch", "delete"] {
            let Some(op) = item.get(method) else { continue };
            let tag = op["tags"][0].as_str().unwrap_or("").to_owned();
            let mut s = String::new();
            let _ = write!(
                s,
                "<div class=\"op\"><span class=\"m\">{method}</span><code>{}</code> {}",
                esc(path),
                text(&op["summary"])
            );
            if op.get("security").is_none() {
                s.push_str(" <em>(public)</em>");
            }
            if let Some(params) = op["parameters"].as_array() {
                s.push_str("<ul>");
                for p in params {
                    let _ = write!(
                        s,
                        "<li><code>{}</code> ({}) {}</li>",
                        text(&p["name"]),
                        text(&p["in"]),
                        text(&p["description"])
                    );
                }
                s.push_str("</ul>");
            }
            for (ct, c) in op["requestBody"]["content"]
                .as_object()
                .into_iter()
                .flatten()
            {
                let _ = write!(
                    s,
                    "<div>Body ({}): <code>{}</code></div>",
                    esc(ct),
                    esc(&schema_name(&c["schema"]))
                );
            }
            let codes: Vec<String> = op["responses"]
                .as_object()
                .into_iter()
                .flatten()
                .filter(|(code, _)| code.starts_with('2'))
                .map(|(code, r)| {
                    let schema = r["content"]
                        .as_object()
                        .and_then(|c| c.values().next())
                        .map(|m| schema_name(&m["schema"]))
                        .unwrap_or_default();
                    format!("{code} <code>{}</code>", esc(&schema))
                })
                .collect();
            let _ = write!(
                s,
                "<div>Returns {}; errors in the error shape.</div></div>",
                codes.join(", ")
            );
            by_tag.entry(tag).or_default().push(s);
        }
    }
    for (tag, ops) in by_tag {
        let _ = write!(h, "<h2>{}</h2>", esc(&tag));
        for op in ops {
            h.push_str(&op);
        }
    }
    h.push_str("<h2>Schemas</h2>");
    for (name, schema) in doc["components"]["schemas"]
        .as_object()
        .into_iter()
        .flatten()
    {
        let json = serde_json::to_string_pretty(schema).unwrap_or_default();
        let _ = write!(
            h,
            "<h3 id=\"{n}\">{n}</h3><pre>{}</pre>",
            esc(&json),
            n = esc(name)
        );
    }
    h.push_str("</body></html>");
    h
}

/// The document as served: generated, then
/// - the error responses each operation can give added from its shape (see
///   [`crate::error::error_response`]), beside those its handler names;
/// - every integer given the range of the Rust type behind it (a `u32` is not an `int32`);
/// - composed objects closed (see [`close_composed_objects`]).
pub fn finish(doc: OpenApi) -> serde_json::Value {
    let mut v = close_composed_objects(doc);
    add_errors(&mut v);
    integer_ranges(&mut v);
    v
}

/// Adds to every operation the error responses its shape implies.
fn add_errors(doc: &mut serde_json::Value) {
    use serde_json::Value;
    let Some(paths) = doc.get_mut("paths").and_then(Value::as_object_mut) else {
        return;
    };
    for item in paths.values_mut() {
        let Some(item) = item.as_object_mut() else {
            continue;
        };
        for (method, op) in item.iter_mut() {
            let params = op["parameters"].as_array().cloned().unwrap_or_default();
            let has = |place: &str| params.iter().any(|p| p["in"] == place);
            let bearer = op["security"]
                .as_array()
                .is_some_and(|s| s.iter().any(|r| r.get("bearer").is_some()));
            let secured = op.get("security").is_some();
            let body = op.get("requestBody").is_some();
            let mut errors: Vec<(&str, &str)> = vec![
                ("500", "Internal error; the log has the cause"),
                (
                    "503",
                    "Not ready, or the request took longer than the controller allows",
                ),
            ];
            if secured {
                errors.push(("401", "Missing, invalid or expired credentials"));
            }
            if bearer {
                errors.push(("403", "The caller's role does not allow this"));
            }
            if has("path") {
                errors.push(("404", "No such object"));
            }
            if body {
                errors.push(("400", "Malformed request (not JSON)"));
                errors.push(("413", "Body too large"));
                errors.push(("415", "Body not sent as application/json"));
            }
            if body || has("query") {
                errors.push(("422", "Invalid fields; `details` names each"));
            }
            if matches!(method.as_str(), "patch" | "delete") {
                errors.push(("412", "If-Match names another version than the current one"));
            }
            let Some(responses) = op.get_mut("responses").and_then(Value::as_object_mut) else {
                continue;
            };
            for (status, description) in errors {
                if !responses.contains_key(status) {
                    let r = serde_json::to_value(crate::error::error_response(description))
                        .unwrap_or_default();
                    responses.insert(status.to_owned(), r);
                }
            }
        }
    }
}

/// Gives every integer schema the range the Rust type behind it holds. The generator writes
/// an unsigned type as its signed format with `minimum: 0` (`u32` as `int32`, `u64` as `int64`),
/// which says less than the server takes (a `u32` is not an `int32`): such a schema becomes the
/// unsigned range, in the smallest standard format that holds it (`u32`: `int64` up to
/// 4294967295; `u64`: no format, up to 18446744073709551615). Signed ones get their format's
/// range. Bounds already stated (by validation) are kept. `u8` and `u16` fields state their
/// own bounds.
fn integer_ranges(v: &mut serde_json::Value) {
    use serde_json::Value;
    match v {
        Value::Array(a) => a.iter_mut().for_each(integer_ranges),
        Value::Object(o) => {
            let integer = match o.get("type") {
                Some(Value::String(t)) => t == "integer",
                Some(Value::Array(ts)) => ts.iter().any(|t| t == "integer"),
                _ => false,
            };
            if integer {
                let unsigned = o
                    .get("minimum")
                    .and_then(Value::as_f64)
                    .is_some_and(|m| m >= 0.0);
                // A bound of i64::MAX, written as a float in an attribute, is i64::MAX exactly.
                if o.get("maximum").and_then(Value::as_f64) == Some(i64::MAX as f64) {
                    o.insert("maximum".into(), i64::MAX.into());
                }
                let stated_max = o.get("maximum").and_then(Value::as_f64);
                let format = o.get("format").and_then(Value::as_str).unwrap_or("int64");
                let (format, lo, hi): (Option<&str>, i128, i128) = match (format, unsigned) {
                    ("int32", true) => (Some("int64"), 0, u32::MAX.into()),
                    ("int32", false) => (Some("int32"), i32::MIN.into(), i32::MAX.into()),
                    // An i64 with a stated non-negative range is left in int64.
                    (_, true) if stated_max.is_some_and(|m| m <= i64::MAX as f64) => {
                        (Some("int64"), 0, i64::MAX.into())
                    }
                    (_, true) => (None, 0, u64::MAX.into()),
                    (_, false) => (Some("int64"), i64::MIN.into(), i64::MAX.into()),
                };
                match format {
                    Some(f) => o.insert("format".into(), f.into()),
                    None => o.remove("format"),
                };
                let number = |n: i128| -> Value {
                    u64::try_from(n)
                        .map(Value::from)
                        .or_else(|_| i64::try_from(n).map(Value::from))
                        .unwrap_or(Value::Null)
                };
                if o.get("minimum").and_then(Value::as_f64).is_none() {
                    o.insert("minimum".into(), number(lo));
                }
                if stated_max.is_none() {
                    o.insert("maximum".into(), number(hi));
                }
            }
            for x in o.values_mut() {
                integer_ranges(x);
            }
        }
        _ => {}
    }
}

/// A view that flattens a closed type (`deny_unknown_fields`: `additionalProperties: false`)
/// comes out of the derive as `allOf: [closed type, its own fields]`, which no object can
/// satisfy: the closed part rejects the view's own fields. Such compositions become one closed
/// object with the fields of both, which is what the API sends.
pub fn close_composed_objects(doc: OpenApi) -> serde_json::Value {
    let mut v = serde_json::to_value(&doc).unwrap_or_default();
    let schemas = v["components"]["schemas"].clone();
    close(&mut v, &schemas);
    v
}

/// Merges, everywhere in `v`, the `allOf` compositions described on
/// [`close_composed_objects`].
fn close(v: &mut serde_json::Value, schemas: &serde_json::Value) {
    use serde_json::Value;
    match v {
        Value::Array(a) => a.iter_mut().for_each(|x| close(x, schemas)),
        Value::Object(o) => {
            for x in o.values_mut() {
                close(x, schemas);
            }
            let Some(parts) = o.get("allOf").and_then(Value::as_array) else {
                return;
            };
            let parts: Vec<Value> = parts
                .iter()
                .map(|s| match s.get("$ref").and_then(Value::as_str) {
                    Some(r) => schemas[r.rsplit('/').next().unwrap_or("")].clone(),
                    None => s.clone(),
                })
                .collect();
            let closed = parts
                .iter()
                .any(|p| p.get("additionalProperties") == Some(&Value::Bool(false)));
            let all_objects = parts
                .iter()
                .all(|p| p.get("properties").is_some() && p.get("allOf").is_none());
            if !closed || !all_objects {
                return;
            }
            let mut properties = serde_json::Map::new();
            let mut required = Vec::new();
            for p in &parts {
                if let Some(props) = p["properties"].as_object() {
                    properties.extend(props.clone());
                }
                if let Some(r) = p["required"].as_array() {
                    required.extend(r.iter().cloned());
                }
            }
            let description = o.get("description").cloned();
            o.clear();
            o.insert("type".into(), "object".into());
            o.insert("properties".into(), Value::Object(properties));
            o.insert("required".into(), Value::Array(required));
            o.insert("additionalProperties".into(), Value::Bool(false));
            if let Some(d) = description {
                o.insert("description".into(), d);
            }
        }
        _ => {}
    }
}
