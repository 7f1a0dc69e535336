//! Checks a response against the OpenAPI document: finds the operation by method and path
//! template, the response by status, and validates the JSON body against its schema. The
//! validator covers the JSON Schema the document uses (`$ref`, `type` with "null", `properties`,
//! `required`, `additionalProperties`, `items`, `oneOf`, `anyOf`, `allOf`, `enum`, `minimum`,
//! `maximum`, `minLength`, `maxLength`, `minItems`, `maxItems`; `pattern` and `format` are not
//! checked), and fails loudly on any other keyword, so that nothing passes by being ignored.

use axum::http::HeaderMap;
use serde_json::Value;

fn document() -> &'static Value {
    static DOC: std::sync::OnceLock<Value> = std::sync::OnceLock::new();
    DOC.get_or_init(patronus_controller::app::document)
}

/// The template in the document that `path` (without its query) matches.
fn template(path: &str) -> Option<&'static str> {
    let path = path.split('?').next().unwrap_or(path);
    let segs: Vec<&str> = path.split('/').collect();
    document()["paths"].as_object()?.keys().find_map(|t| {
        let ts: Vec<&str> = t.split('/').collect();
        (ts.len() == segs.len()
            && ts
                .iter()
                .zip(&segs)
                .all(|(a, b)| a.starts_with('{') || a == b))
        .then_some(t.as_str())
    })
}

pub fn check_response(method: String, path: &str, status: u16, headers: &HeaderMap, body: &Value) {
    let Some(t) = template(path) else {
        // Not a documented route: the router's own 404.
        assert_eq!(
            status, 404,
            "{method} {path} is not in the document but answered {status}"
        );
        return;
    };
    let Some(op) = document()["paths"][t].get(&method) else {
        assert_eq!(
            status, 405,
            "{method} {t} is not documented but answered {status}"
        );
        return;
    };
    let responses = &op["responses"];
    let r = responses
        .get(status.to_string())
        .or_else(|| responses.get("default"))
        .unwrap_or_else(|| panic!("{method} {t}: status {status} is not documented"));
    let content_type = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .to_owned();
    let Some(content) = r.get("content") else {
        assert!(
            body.is_null(),
            "{method} {t} {status}: documented without a body, got {body}"
        );
        return;
    };
    let Some(media) = content.get(&content_type) else {
        panic!("{method} {t} {status}: {content_type:?} is not documented ({content})");
    };
    if content_type != "application/json" {
        return;
    }
    if let Some(schema) = media.get("schema") {
        let mut errors = Vec::new();
        validate(schema, body, "$", &mut errors);
        assert!(
            errors.is_empty(),
            "{method} {t} {status}: {errors:#?}\n{body}"
        );
    }
}

fn resolve(schema: &Value) -> &Value {
    match schema.get("$ref").and_then(Value::as_str) {
        Some(r) => {
            let name = r
                .strip_prefix("#/components/schemas/")
                .unwrap_or_else(|| panic!("ref {r}"));
            let s = &document()["components"]["schemas"][name];
            assert!(!s.is_null(), "no schema {name}");
            resolve(s)
        }
        None => schema,
    }
}

fn type_ok(t: &str, v: &Value) -> bool {
    match t {
        "null" => v.is_null(),
        "boolean" => v.is_boolean(),
        "object" => v.is_object(),
        "array" => v.is_array(),
        "string" => v.is_string(),
        "integer" => v.as_i64().is_some() || v.as_u64().is_some(),
        "number" => v.is_number(),
        other => panic!("type {other}"),
    }
}

pub fn validate(schema: &Value, v: &Value, at: &str, errors: &mut Vec<String>) {
    validate_in(schema, v, at, errors, false);
}

/// The properties a schema documents, through `allOf`.
fn documented(s: &Value, into: &mut Vec<String>) {
    let s = resolve(s);
    if let Some(p) = s.get("properties").and_then(Value::as_object) {
        into.extend(p.keys().cloned());
    }
    for sub in s
        .get("allOf")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        documented(sub, into);
    }
}

/// `part`: validating one `allOf` part, whose siblings document the other keys.
fn validate_in(schema: &Value, v: &Value, at: &str, errors: &mut Vec<String>, part: bool) {
    let s = resolve(schema);
    let Some(obj) = s.as_object() else {
        if s == &Value::Bool(false) {
            errors.push(format!("{at}: nothing is allowed here"));
        }
        return;
    };
    for key in obj.keys() {
        assert!(
            matches!(
                key.as_str(),
                "type"
                    | "properties"
                    | "required"
                    | "additionalProperties"
                    | "items"
                    | "oneOf"
                    | "anyOf"
                    | "allOf"
                    | "enum"
                    | "minimum"
                    | "maximum"
                    | "minLength"
                    | "maxLength"
                    | "minItems"
                    | "maxItems"
                    | "format"
                    | "description"
                    | "examples"
                    | "example"
                    | "default"
                    | "title"
                    | "pattern"
                    | "$ref"
                    | "deprecated"
                    | "contentMediaType"
            ),
            "the validator does not know `{key}` (at {at})"
        );
    }
    match s.get("type") {
        Some(Value::String(t)) if !type_ok(t, v) => {
            errors.push(format!("{at}: expected {t}, got {v}"));
            return;
        }
        Some(Value::Array(ts)) if !ts.iter().any(|t| type_ok(t.as_str().unwrap_or(""), v)) => {
            errors.push(format!("{at}: expected one of {ts:?}, got {v}"));
            return;
        }
        _ => {}
    }
    if let Some(e) = s.get("enum").and_then(Value::as_array) {
        if !e.contains(v) {
            errors.push(format!("{at}: {v} is not one of {e:?}"));
        }
    }
    if let (Some(min), Some(n)) = (s.get("minimum").and_then(Value::as_f64), v.as_f64()) {
        if n < min {
            errors.push(format!("{at}: {n} < minimum {min}"));
        }
    }
    if let (Some(max), Some(n)) = (s.get("maximum").and_then(Value::as_f64), v.as_f64()) {
        if n > max {
            errors.push(format!("{at}: {n} > maximum {max}"));
        }
    }
    let bound = |k: &str| s.get(k).and_then(Value::as_u64);
    if let Some(text) = v.as_str() {
        let n = text.chars().count() as u64;
        if bound("minLength").is_some_and(|m| n < m) || bound("maxLength").is_some_and(|m| n > m) {
            errors.push(format!("{at}: {n} characters, outside its length bounds"));
        }
    }
    if let Some(items) = v.as_array() {
        let n = items.len() as u64;
        if bound("minItems").is_some_and(|m| n < m) || bound("maxItems").is_some_and(|m| n > m) {
            errors.push(format!("{at}: {n} items, outside its bounds"));
        }
    }
    if let Some(all) = s.get("allOf").and_then(Value::as_array) {
        for sub in all {
            validate_in(sub, v, at, errors, true);
        }
    }
    for (key, exactly_one) in [("oneOf", true), ("anyOf", false)] {
        if let Some(alts) = s.get(key).and_then(Value::as_array) {
            let ok = alts
                .iter()
                .filter(|sub| {
                    let mut e = Vec::new();
                    validate(sub, v, at, &mut e);
                    e.is_empty()
                })
                .count();
            if ok == 0 || (exactly_one && ok > 1) {
                errors.push(format!("{at}: {v} matches {ok} of the {key} alternatives"));
            }
        }
    }
    if let Some(o) = v.as_object() {
        let props = s.get("properties").and_then(Value::as_object);
        if let Some(req) = s.get("required").and_then(Value::as_array) {
            for r in req {
                let r = r.as_str().unwrap_or("");
                if !o.contains_key(r) {
                    errors.push(format!("{at}: missing required `{r}`"));
                }
            }
        }
        for (k, val) in o {
            match props.and_then(|p| p.get(k)) {
                Some(ps) => validate(ps, val, &format!("{at}.{k}"), errors),
                None => match s.get("additionalProperties") {
                    Some(Value::Bool(false)) => {
                        errors.push(format!("{at}: `{k}` is not in the schema"))
                    }
                    Some(extra @ Value::Object(_)) => {
                        validate(extra, val, &format!("{at}.{k}"), errors)
                    }
                    // An object whose keys are listed carries no undocumented one.
                    _ if !part && (props.is_some() || s.get("allOf").is_some()) => {
                        let mut keys = Vec::new();
                        documented(s, &mut keys);
                        if !keys.contains(k) {
                            errors.push(format!("{at}: `{k}` is not in the schema"));
                        }
                    }
                    _ => {}
                },
            }
        }
    }
    if let (Some(items), Some(arr)) = (s.get("items"), v.as_array()) {
        for (i, x) in arr.iter().enumerate() {
            validate(items, x, &format!("{at}[{i}]"), errors);
        }
    }
}
