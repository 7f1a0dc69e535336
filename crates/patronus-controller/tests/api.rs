//! The API over HTTP semantics, through the real router, against a real SQLite file in a
//! temporary directory: success, validation, 401/403/404/405/409/412/413/422/429.

#![allow(clippy::unwrap_used)] // test code: a panic is a failed test with a line number

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;

use axum::Router;
use axum::body::Body;
use axum::extract::connect_info::MockConnectInfo;
use axum::http::{HeaderMap, Method, Request, StatusCode, header};
use http_body_util::BodyExt;
use patronus_controller::auth::{Role, Tokens};
use patronus_controller::config::Config;
use patronus_controller::{AppState, router};
use serde_json::{Value, json};
use tower::ServiceExt;

mod schema;

const ADMIN: &str = "admin@example.net";
const ADMIN_PW: &str = "Correct-Horse-Battery-1";

struct Api {
    app: Router,
    state: AppState,
    dir: tempfile::TempDir,
}

struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: Value,
}

impl std::fmt::Debug for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.status, self.body)
    }
}

async fn api_with(tune: impl FnOnce(&mut Config)) -> Api {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::with_data_dir(dir.path().join("state"));
    config.auth_rate_per_minute = 10_000;
    tune(&mut config);
    let env = vec![
        ("PATRONUS_ADMIN_EMAIL".to_string(), ADMIN.to_string()),
        ("PATRONUS_ADMIN_PASSWORD".to_string(), ADMIN_PW.to_string()),
    ];
    let state = patronus_controller::server::prepare(config, &env)
        .await
        .unwrap();
    let app =
        router(state.clone()).layer(MockConnectInfo(SocketAddr::from(([192, 0, 2, 7], 40000))));
    Api { app, state, dir }
}

async fn api() -> Api {
    api_with(|_| {}).await
}

impl Api {
    async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> Reply {
        self.call_with(method, path, token, body, &[]).await
    }

    async fn call_with(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
        extra: &[(&str, &str)],
    ) -> Reply {
        let method_name = method.as_str().to_lowercase();
        let mut req = Request::builder().method(method).uri(path);
        if let Some(t) = token {
            req = req.header(header::AUTHORIZATION, format!("Bearer {t}"));
        }
        for (k, v) in extra {
            req = req.header(*k, *v);
        }
        let req = match body {
            Some(b) => req
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from(b.to_string())),
            None => req.body(Body::empty()),
        }
        .unwrap();
        let resp = self.app.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            // Text (the metrics) as a JSON string; everything else must be JSON.
            serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                assert!(status.is_success(), "{status}: {e}");
                Value::String(String::from_utf8_lossy(&bytes).into_owned())
            })
        };
        // Every response matches what the OpenAPI document says of it.
        schema::check_response(method_name, path, status.as_u16(), &headers, &body);
        // Every error has the one shape.
        if status.as_u16() >= 400 {
            assert!(body["error"]["code"].is_string(), "{status} {body}");
            assert!(body["error"]["message"].is_string(), "{status} {body}");
        }
        assert!(headers.contains_key("x-request-id"));
        Reply {
            status,
            headers,
            body,
        }
    }

    async fn login(&self, email: &str, password: &str) -> Reply {
        self.call(
            Method::POST,
            "/api/v1/auth/login",
            None,
            Some(json!({ "email": email, "password": password })),
        )
        .await
    }

    async fn token(&self, email: &str, password: &str) -> String {
        let r = self.login(email, password).await;
        assert_eq!(r.status, StatusCode::OK, "{r:?}");
        r.body["access_token"].as_str().unwrap().to_owned()
    }

    async fn admin(&self) -> String {
        self.token(ADMIN, ADMIN_PW).await
    }

    /// Creates a user with `role`; returns (id, access token).
    async fn user(&self, admin: &str, email: &str, role: &str) -> (i64, String) {
        let r = self
            .call(
                Method::POST,
                "/api/v1/users",
                Some(admin),
                Some(json!({ "email": email, "role": role, "password": "Some-Password-9" })),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{r:?}");
        let id = r.body["id"].as_i64().unwrap();
        (id, self.token(email, "Some-Password-9").await)
    }
}

#[tokio::test]
async fn public_endpoints_answer_and_unknown_routes_and_methods_get_the_error_shape() {
    let a = api().await;
    let r = a.call(Method::GET, "/health", None, None).await;
    assert_eq!(
        (r.status, r.body["status"].as_str()),
        (StatusCode::OK, Some("ok"))
    );
    let r = a.call(Method::GET, "/ready", None, None).await;
    assert_eq!(r.status, StatusCode::OK);
    let r = a.call(Method::GET, "/api/v1/version", None, None).await;
    assert_eq!(r.body["api"], "v1");
    assert_eq!(r.body["schema_version"], 13);
    let r = a
        .call(Method::GET, "/api/v1/nothing-here", None, None)
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let r = a.call(Method::PUT, "/api/v1/auth/login", None, None).await;
    assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED);
    // A sane request id is echoed; anything else is replaced.
    let r = a
        .call_with(
            Method::GET,
            "/health",
            None,
            None,
            &[("x-request-id", "abc-123")],
        )
        .await;
    assert_eq!(r.headers["x-request-id"], "abc-123");
    let r = a
        .call_with(
            Method::GET,
            "/health",
            None,
            None,
            &[("x-request-id", "a b\tc")],
        )
        .await;
    assert_ne!(r.headers["x-request-id"], "a b\tc");
}

#[tokio::test]
async fn login_refresh_rotation_reuse_and_logout() {
    let a = api().await;
    let r = a.login(ADMIN, ADMIN_PW).await;
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    assert_eq!(r.body["token_type"], "Bearer");
    assert_eq!(r.body["expires_in"], 900);
    let access = r.body["access_token"].as_str().unwrap().to_owned();
    let refresh1 = r.body["refresh_token"].as_str().unwrap().to_owned();

    let me = a
        .call(Method::GET, "/api/v1/auth/me", Some(&access), None)
        .await;
    assert_eq!(
        (me.status, me.body["email"].as_str()),
        (StatusCode::OK, Some(ADMIN))
    );
    assert!(me.body.get("password_hash").is_none());

    // A refresh token is never an access token.
    let r = a
        .call(Method::GET, "/api/v1/auth/me", Some(&refresh1), None)
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);

    // Rotation: the first refresh gives a new pair.
    let r = a
        .call(
            Method::POST,
            "/api/v1/auth/refresh",
            None,
            Some(json!({ "refresh_token": refresh1 })),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    let refresh2 = r.body["refresh_token"].as_str().unwrap().to_owned();
    assert_ne!(refresh1, refresh2);
    // Reusing the rotated token revokes the family: the new one dies too.
    let r = a
        .call(
            Method::POST,
            "/api/v1/auth/refresh",
            None,
            Some(json!({ "refresh_token": refresh1 })),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert!(
        r.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("already used")
    );
    let r = a
        .call(
            Method::POST,
            "/api/v1/auth/refresh",
            None,
            Some(json!({ "refresh_token": refresh2 })),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);

    // Logout ends a session.
    let r = a.login(ADMIN, ADMIN_PW).await;
    let (access, refresh) = (
        r.body["access_token"].as_str().unwrap().to_owned(),
        r.body["refresh_token"].as_str().unwrap().to_owned(),
    );
    let r = a
        .call(
            Method::POST,
            "/api/v1/auth/logout",
            Some(&access),
            Some(json!({ "refresh_token": refresh })),
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    let r = a
        .call(
            Method::POST,
            "/api/v1/auth/refresh",
            None,
            Some(json!({ "refresh_token": refresh })),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn missing_bad_expired_and_foreign_tokens_are_401() {
    let a = api().await;
    let r = a.call(Method::GET, "/api/v1/users", None, None).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    let r = a
        .call(Method::GET, "/api/v1/users", Some("not.a.token"), None)
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    let key = std::fs::read(a.dir.path().join("state/jwt.key")).unwrap();
    let t = Tokens::new(
        &key,
        std::time::Duration::from_secs(60),
        std::time::Duration::from_secs(60),
    );
    let now = patronus_controller::store::now_s();
    let expired = t.access(1, Role::Admin, now - 3600);
    let r = a
        .call(Method::GET, "/api/v1/users", Some(&expired), None)
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    let valid = t.access(1, Role::Admin, now);
    let r = a
        .call(Method::GET, "/api/v1/users", Some(&valid), None)
        .await;
    assert_eq!(r.status, StatusCode::OK);
    // Signed with another key (another controller's, or a guess).
    let other = Tokens::new(
        &[1; 32],
        std::time::Duration::from_secs(60),
        std::time::Duration::from_secs(60),
    );
    let r = a
        .call(
            Method::GET,
            "/api/v1/users",
            Some(&other.access(1, Role::Admin, now)),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    // Wrong password and unknown account: the same answer.
    let r1 = a.login(ADMIN, "Wrong-Password-1").await;
    let r2 = a.login("nobody@example.net", "Wrong-Password-1").await;
    assert_eq!(
        (r1.status, r2.status),
        (StatusCode::UNAUTHORIZED, StatusCode::UNAUTHORIZED)
    );
    assert_eq!(r1.body, r2.body);
}

#[tokio::test]
async fn each_role_below_the_required_one_is_403() {
    let a = api().await;
    let admin = a.admin().await;
    let (op_id, op) = a.user(&admin, "op@example.net", "operator").await;
    let (_, viewer) = a.user(&admin, "viewer@example.net", "viewer").await;
    let (target, _) = a.user(&admin, "target@example.net", "viewer").await;
    let new_user =
        json!({ "email": "x#N@example.net", "role": "viewer", "password": "Some-Password-9" });
    // (method, path, body, least role that may)
    let other = format!("/api/v1/users/{target}");
    let cases: Vec<(Method, String, Option<Value>, Role)> = vec![
        (Method::GET, "/api/v1/users".into(), None, Role::Admin),
        (
            Method::POST,
            "/api/v1/users".into(),
            Some(new_user),
            Role::Admin,
        ),
        (Method::GET, other.clone(), None, Role::Admin),
        (
            Method::PATCH,
            other.clone(),
            Some(json!({ "name": "V" })),
            Role::Admin,
        ),
        (
            Method::POST,
            format!("{other}/password"),
            Some(json!({ "new_password": "Another-Password-7" })),
            Role::Admin,
        ),
        (Method::GET, "/api/v1/audit".into(), None, Role::Admin),
        (Method::GET, "/api/v1/auth/me".into(), None, Role::Viewer),
        (
            Method::GET,
            format!("/api/v1/users/{op_id}"),
            None,
            Role::Operator,
        ),
        (Method::GET, "/api/v1/sites".into(), None, Role::Viewer),
        (
            Method::POST,
            "/api/v1/sites".into(),
            Some(site("s#N", &["10.#N.0.0/16"])),
            Role::Operator,
        ),
        (Method::GET, "/api/v1/sites/1".into(), None, Role::Viewer),
        (
            Method::PATCH,
            "/api/v1/sites/1".into(),
            Some(json!({ "location": "Paris" })),
            Role::Operator,
        ),
        (
            Method::GET,
            "/api/v1/sites/1/links".into(),
            None,
            Role::Viewer,
        ),
        (
            Method::POST,
            "/api/v1/sites/1/links".into(),
            Some(json!({ "name": "lte#N", "kind": "lte" })),
            Role::Operator,
        ),
        (
            Method::GET,
            "/api/v1/sites/1/links/1".into(),
            None,
            Role::Viewer,
        ),
        (
            Method::PATCH,
            "/api/v1/sites/1/links/1".into(),
            Some(json!({ "priority": 5 })),
            Role::Operator,
        ),
        // Links 5 and 6 are the operator's and the admin's from the case above (1 to 4 came
        // with sites 1 and 2).
        (
            Method::DELETE,
            "/api/v1/sites/1/links/#L".into(),
            None,
            Role::Operator,
        ),
        (Method::GET, "/api/v1/topology".into(), None, Role::Viewer),
        (
            Method::PATCH,
            "/api/v1/topology".into(),
            Some(json!({ "mode": "full-mesh" })),
            Role::Operator,
        ),
        (Method::GET, "/api/v1/paths".into(), None, Role::Viewer),
        (
            Method::GET,
            "/api/v1/sla-classes".into(),
            None,
            Role::Viewer,
        ),
        (
            Method::POST,
            "/api/v1/sla-classes".into(),
            Some(json!({ "name": "c#N" })),
            Role::Operator,
        ),
        (
            Method::GET,
            "/api/v1/sla-classes/1".into(),
            None,
            Role::Viewer,
        ),
        (
            Method::PATCH,
            "/api/v1/sla-classes/1".into(),
            Some(json!({ "max_jitter_ms": 20 })),
            Role::Operator,
        ),
        (
            Method::POST,
            "/api/v1/policies".into(),
            Some(json!({ "name": "p#N", "order": "#O", "class": "realtime" })),
            Role::Operator,
        ),
        (Method::GET, "/api/v1/policies".into(), None, Role::Viewer),
        (Method::GET, "/api/v1/failover".into(), None, Role::Viewer),
        (
            Method::PATCH,
            "/api/v1/failover".into(),
            Some(json!({ "hold_down_ms": 6000 })),
            Role::Admin,
        ),
        (Method::GET, "/api/v1/api-keys".into(), None, Role::Admin),
        (
            Method::POST,
            "/api/v1/api-keys".into(),
            Some(json!({ "name": "k#N", "role": "viewer" })),
            Role::Admin,
        ),
        (Method::GET, "/metrics".into(), None, Role::Viewer),
        (Method::GET, "/api/v1/webhooks".into(), None, Role::Admin),
        (
            Method::POST,
            "/api/v1/webhooks".into(),
            Some(json!({ "url": "http://127.0.0.1:9/h#N", "events": ["failover"] })),
            Role::Admin,
        ),
        (Method::DELETE, other.clone(), None, Role::Admin),
    ];
    // `#N` in a path or body is the caller's number, `#L` that plus 4, `"#O"` that plus 1000 (a
    // number): each caller creates or deletes its own object, so that a case never fails for
    // what the one before did.
    for (method, path, body, least) in cases {
        let callers = [
            (Role::Viewer, &viewer),
            (Role::Operator, &op),
            (Role::Admin, &admin),
        ];
        for (n, (role, token)) in callers.into_iter().enumerate() {
            let fill = |t: &str| {
                t.replace("#N", &n.to_string())
                    .replace("#L", &(n + 4).to_string())
                    .replace("\"#O\"", &(1000 + n).to_string())
            };
            let path = fill(&path);
            let body = body
                .as_ref()
                .map(|b| serde_json::from_str(&fill(&b.to_string())).unwrap());
            let r = a.call(method.clone(), &path, Some(token), body).await;
            if role >= least {
                assert!(r.status.is_success(), "{method} {path} as {role:?}: {r:?}");
            } else {
                assert_eq!(
                    r.status,
                    StatusCode::FORBIDDEN,
                    "{method} {path} as {role:?}: {r:?}"
                );
            }
        }
    }
}

#[tokio::test]
async fn users_validate_conflict_paginate_and_update_with_if_match() {
    let a = api().await;
    let admin = a.admin().await;
    // 422 naming every bad field.
    let r = a
        .call(
            Method::POST,
            "/api/v1/users",
            Some(&admin),
            Some(json!({ "email": "not an email", "role": "viewer", "password": "short" })),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{r:?}");
    let fields: Vec<&str> = r.body["error"]["details"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["field"].as_str().unwrap())
        .collect();
    assert_eq!(fields, ["email", "password"]);
    // An unknown role or field, or a missing one: 422 naming it; broken JSON: 400.
    for (body, want) in [
        (
            json!({ "email": "a@b.c", "role": "god", "password": "Some-Password-9" }),
            "god",
        ),
        (
            json!({ "email": "a@b.c", "role": "viewer", "password": "Some-Password-9", "x": 1 }),
            "x",
        ),
        (json!({ "email": "a@b.c", "role": "viewer" }), "password"),
    ] {
        let r = a
            .call(Method::POST, "/api/v1/users", Some(&admin), Some(body))
            .await;
        assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{r:?}");
        assert!(
            r.body["error"]["message"].as_str().unwrap().contains(want),
            "{r:?}"
        );
    }
    let req = Request::builder()
        .method(Method::POST)
        .uri("/api/v1/users")
        .header(header::AUTHORIZATION, format!("Bearer {admin}"))
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from("{\"email\": "))
        .unwrap();
    let resp = a.app.clone().oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let headers = resp.headers().clone();
    let body: Value =
        serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
    // The one error shape, and what the document says of a 400 here.
    assert_eq!(body["error"]["code"], "bad_request", "{body}");
    assert!(body["error"]["message"].is_string(), "{body}");
    schema::check_response("post".into(), "/api/v1/users", 400, &headers, &body);

    let r = a
        .call(
            Method::POST,
            "/api/v1/users",
            Some(&admin),
            Some(json!({ "email": "Bob@Example.net", "name": "Bob", "role": "operator", "password": "Some-Password-9" })),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{r:?}");
    let id = r.body["id"].as_i64().unwrap();
    assert_eq!(r.headers[header::LOCATION], format!("/api/v1/users/{id}"));
    assert_eq!(r.headers[header::ETAG], "\"1\"");
    // Email is case-insensitive: 409.
    let r = a
        .call(
            Method::POST,
            "/api/v1/users",
            Some(&admin),
            Some(json!({ "email": "bob@example.net", "role": "viewer", "password": "Some-Password-9" })),
        )
        .await;
    assert_eq!(r.status, StatusCode::CONFLICT);

    for i in 0..5 {
        a.user(&admin, &format!("v{i}@example.net"), "viewer").await;
    }
    let r = a
        .call(
            Method::GET,
            "/api/v1/users?role=viewer&limit=2&offset=1&sort=-email",
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    assert_eq!(r.body["total"], 5);
    let emails: Vec<&str> = r.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["email"].as_str().unwrap())
        .collect();
    assert_eq!(emails, ["v3@example.net", "v2@example.net"]);
    let r = a
        .call(Method::GET, "/api/v1/users?q=bob", Some(&admin), None)
        .await;
    assert_eq!(r.body["total"], 1);
    for bad in [
        "limit=0",
        "limit=501",
        "offset=-1",
        "sort=password_hash",
        "limit=x",
        "role=god",
    ] {
        let r = a
            .call(
                Method::GET,
                &format!("/api/v1/users?{bad}"),
                Some(&admin),
                None,
            )
            .await;
        assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{bad}: {r:?}");
    }

    // Optimistic concurrency.
    let path = format!("/api/v1/users/{id}");
    let r = a
        .call_with(
            Method::PATCH,
            &path,
            Some(&admin),
            Some(json!({ "name": "Robert" })),
            &[("if-match", "\"1\"")],
        )
        .await;
    assert_eq!(
        (r.status, r.body["version"].as_i64()),
        (StatusCode::OK, Some(2)),
        "{r:?}"
    );
    let r = a
        .call_with(
            Method::PATCH,
            &path,
            Some(&admin),
            Some(json!({ "name": "Rob" })),
            &[("if-match", "\"1\"")],
        )
        .await;
    assert_eq!(r.status, StatusCode::PRECONDITION_FAILED, "{r:?}");
    let r = a.call(Method::GET, &path, Some(&admin), None).await;
    assert_eq!(r.body["name"], "Robert");
    // 404s.
    for p in ["/api/v1/users/9999", "/api/v1/users/abc"] {
        let r = a.call(Method::GET, p, Some(&admin), None).await;
        assert_eq!(r.status, StatusCode::NOT_FOUND, "{p}");
    }
}

#[tokio::test]
async fn the_last_admin_stays_and_a_disabled_user_is_out_at_once() {
    let a = api().await;
    let admin = a.admin().await;
    let me = a
        .call(Method::GET, "/api/v1/auth/me", Some(&admin), None)
        .await;
    let admin_id = me.body["id"].as_i64().unwrap();
    let path = format!("/api/v1/users/{admin_id}");
    let r = a
        .call(
            Method::PATCH,
            &path,
            Some(&admin),
            Some(json!({ "role": "viewer" })),
        )
        .await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{r:?}");
    let r = a.call(Method::DELETE, &path, Some(&admin), None).await;
    assert_eq!(r.status, StatusCode::CONFLICT);

    let (id, op) = a.user(&admin, "op@example.net", "operator").await;
    let r = a
        .call(Method::GET, "/api/v1/auth/me", Some(&op), None)
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let r = a
        .call(
            Method::PATCH,
            &format!("/api/v1/users/{id}"),
            Some(&admin),
            Some(json!({ "disabled": true })),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let r = a
        .call(Method::GET, "/api/v1/auth/me", Some(&op), None)
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    let r = a.login("op@example.net", "Some-Password-9").await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn changing_a_password_needs_the_current_one_and_ends_sessions() {
    let a = api().await;
    let admin = a.admin().await;
    let (id, op) = a.user(&admin, "op@example.net", "operator").await;
    let refresh = a.login("op@example.net", "Some-Password-9").await.body["refresh_token"]
        .as_str()
        .unwrap()
        .to_owned();
    let path = format!("/api/v1/users/{id}/password");
    let r = a
        .call(
            Method::POST,
            &path,
            Some(&op),
            Some(json!({ "new_password": "Brand-New-Pass-1" })),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    let r = a
        .call(
            Method::POST,
            &path,
            Some(&op),
            Some(json!({ "current_password": "Wrong-Password-9", "new_password": "Brand-New-Pass-1" })),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    let r = a
        .call(
            Method::POST,
            &path,
            Some(&op),
            Some(json!({ "current_password": "Some-Password-9", "new_password": "weak" })),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    let r = a
        .call(
            Method::POST,
            &path,
            Some(&op),
            Some(json!({ "current_password": "Some-Password-9", "new_password": "Brand-New-Pass-1" })),
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{r:?}");
    let r = a
        .call(
            Method::POST,
            "/api/v1/auth/refresh",
            None,
            Some(json!({ "refresh_token": refresh })),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        a.login("op@example.net", "Some-Password-9").await.status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        a.login("op@example.net", "Brand-New-Pass-1").await.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn logins_are_rate_limited_per_client_and_failures_lock_the_account() {
    let a = api_with(|c| {
        c.auth_rate_per_minute = 4;
        c.lockout_after_failures = 2;
    })
    .await;
    for _ in 0..2 {
        assert_eq!(
            a.login(ADMIN, "Wrong-Password-1").await.status,
            StatusCode::UNAUTHORIZED
        );
    }
    // Locked: even the right password waits.
    let r = a.login(ADMIN, ADMIN_PW).await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS, "{r:?}");
    assert_eq!(r.headers[header::RETRY_AFTER], "60");
    // The fourth request from this address in the minute is over the limit.
    let r = a.login("other@example.net", "x").await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    let r = a.login("other@example.net", "x").await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    assert!(r.headers.contains_key(header::RETRY_AFTER));
    // Refreshing and enrolling count against the same allowance: guessing a refresh token or
    // an enrolment token is no cheaper than guessing a password.
    for (path, body) in [
        ("/api/v1/auth/refresh", json!({ "refresh_token": "guess" })),
        (
            "/api/v1/enroll",
            json!({ "token": "guess", "public_key": patronus_api::key_to_base64(&[7; 32]) }),
        ),
    ] {
        let r = a.call(Method::POST, path, None, Some(body)).await;
        assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS, "{path}: {r:?}");
        assert!(r.headers.contains_key(header::RETRY_AFTER), "{path}");
    }
}

#[tokio::test]
async fn writes_are_audited_with_who_and_from_where() {
    let a = api().await;
    let admin = a.admin().await;
    let (id, _) = a.user(&admin, "op@example.net", "operator").await;
    a.call(
        Method::PATCH,
        &format!("/api/v1/users/{id}"),
        Some(&admin),
        Some(json!({ "name": "Op" })),
    )
    .await;
    let r = a
        .call(
            Method::GET,
            "/api/v1/audit?action=user.update",
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(r.body["total"], 1, "{r:?}");
    let e = &r.body["items"][0];
    assert_eq!(e["actor"], ADMIN);
    assert_eq!(e["source"], "192.0.2.7");
    assert_eq!(e["target"], format!("user/{id}"));
    let r = a
        .call(
            Method::GET,
            "/api/v1/audit?order=asc&limit=1",
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(r.body["items"][0]["action"], "user.create");
    assert_eq!(r.body["items"][0]["actor"], "bootstrap");
}

#[tokio::test]
async fn a_body_over_the_limit_is_413_and_state_files_are_private() {
    let a = api_with(|c| c.max_body_bytes = 2048).await;
    let admin = a.admin().await;
    let r = a
        .call(
            Method::POST,
            "/api/v1/users",
            Some(&admin),
            Some(json!({ "email": "a@b.c", "role": "viewer", "password": "x".repeat(4096) })),
        )
        .await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE, "{r:?}");
    let mode = |p: &str| {
        std::fs::metadata(a.dir.path().join(p))
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode("state"), 0o700);
    assert_eq!(mode("state/jwt.key"), 0o600);
    assert_eq!(mode("state/controller.db"), 0o600);
    let _ = &a.state;
}

fn site(name: &str, prefixes: &[&str]) -> Value {
    json!({
        "name": name,
        "location": "Lyon",
        "lan_prefixes": prefixes,
        "links": [
            { "name": "mpls", "kind": "mpls", "endpoint": "198.51.100.1:51820", "up_kbps": 50000 },
            { "name": "inet", "kind": "broadband", "metered": false, "monthly_cost": 40.0 }
        ]
    })
}

#[tokio::test]
async fn sites_with_links_are_created_read_by_viewers_and_written_by_operators() {
    let a = api().await;
    let admin = a.admin().await;
    let (_, op) = a.user(&admin, "op@example.net", "operator").await;
    let (_, viewer) = a.user(&admin, "viewer@example.net", "viewer").await;
    let r = a
        .call(
            Method::POST,
            "/api/v1/sites",
            Some(&viewer),
            Some(site("hq", &["10.1.0.0/16"])),
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    let r = a
        .call(
            Method::POST,
            "/api/v1/sites",
            Some(&op),
            Some(site("hq", &["10.1.0.0/16"])),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{r:?}");
    let id = r.body["id"].as_i64().unwrap();
    assert_eq!(r.headers[header::LOCATION], format!("/api/v1/sites/{id}"));
    assert_eq!(r.body["links"][0]["kind"], "mpls");
    assert_eq!(r.body["links"][0]["mtu"], 1500, "defaults filled in");
    assert_eq!(r.body["links"][1]["monthly_cost"], 40.0);
    assert_eq!(r.body["status"], "active");
    let r = a
        .call(
            Method::GET,
            &format!("/api/v1/sites/{id}"),
            Some(&viewer),
            None,
        )
        .await;
    assert_eq!(
        (r.status, r.body["name"].as_str()),
        (StatusCode::OK, Some("hq"))
    );
    let r = a
        .call(
            Method::POST,
            "/api/v1/sites",
            Some(&op),
            Some(site("hq", &["10.2.0.0/16"])),
        )
        .await;
    assert_eq!(r.status, StatusCode::CONFLICT, "same name");
    let r = a
        .call(
            Method::POST,
            "/api/v1/sites",
            Some(&op),
            Some(site("branch", &["10.1.128.0/24"])),
        )
        .await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{r:?}");
    assert!(
        r.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("site hq"),
        "{r:?}"
    );
    let r = a
        .call(
            Method::POST,
            "/api/v1/sites",
            Some(&op),
            Some(site("branch", &["10.2.0.0/24"])),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED);

    let r = a
        .call(
            Method::GET,
            "/api/v1/sites?sort=-name&limit=1",
            Some(&viewer),
            None,
        )
        .await;
    assert_eq!(
        (
            r.body["total"].as_i64(),
            r.body["items"][0]["name"].as_str()
        ),
        (Some(2), Some("hq"))
    );
    assert_eq!(r.body["items"][0]["links"].as_array().unwrap().len(), 2);
    let r = a
        .call(Method::GET, "/api/v1/sites?q=bran", Some(&viewer), None)
        .await;
    assert_eq!(r.body["total"], 1);
    let r = a
        .call(
            Method::GET,
            "/api/v1/sites?status=disabled",
            Some(&viewer),
            None,
        )
        .await;
    assert_eq!(r.body["total"], 0);
}

#[tokio::test]
async fn bad_sites_and_links_are_422_naming_the_field() {
    let a = api().await;
    let admin = a.admin().await;
    for (body, field) in [
        (site("a", &["10.0.0.0/33"]), "lan_prefixes"),
        (site("a", &["10.0.0.1/8x"]), "lan_prefixes"),
        (site("bad name", &[]), "name"),
        (json!({ "name": "a", "latitude": 45.0 }), "latitude"),
        (
            json!({ "name": "a", "latitude": 95.0, "longitude": 0.0 }),
            "latitude",
        ),
        (
            json!({ "name": "a", "lan_prefixes": ["10.0.0.0/8", "10.9.0.0/16"] }),
            "lan_prefixes[1]",
        ),
        (
            json!({ "name": "a", "links": [{ "name": "x", "kind": "lte", "mtu": 100 }] }),
            "links[0].mtu",
        ),
        (
            json!({ "name": "a", "links": [{ "name": "x", "kind": "lte" }, { "name": "x", "kind": "mpls" }] }),
            "links[1].name",
        ),
        (
            json!({ "name": "a", "links": [{ "name": "x", "kind": "carrier-pigeon" }] }),
            "carrier-pigeon",
        ),
        (json!({ "name": "a", "colour": "red" }), "colour"),
    ] {
        let r = a
            .call(
                Method::POST,
                "/api/v1/sites",
                Some(&admin),
                Some(body.clone()),
            )
            .await;
        assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{body}: {r:?}");
        assert!(
            r.body["error"].to_string().contains(field),
            "{field} in {r:?}"
        );
    }
}

#[tokio::test]
async fn sites_and_links_update_by_merge_patch_with_if_match_and_delete_together() {
    let a = api().await;
    let op = a.admin().await;
    let hq = a
        .call(
            Method::POST,
            "/api/v1/sites",
            Some(&op),
            Some(site("hq", &["10.1.0.0/16"])),
        )
        .await;
    let id = hq.body["id"].as_i64().unwrap();
    a.call(
        Method::POST,
        "/api/v1/sites",
        Some(&op),
        Some(site("branch", &["10.2.0.0/16"])),
    )
    .await;
    let path = format!("/api/v1/sites/{id}");
    let r = a
        .call_with(
            Method::PATCH,
            &path,
            Some(&op),
            Some(json!({ "description": "head office", "latitude": 45.75, "longitude": 4.85 })),
            &[("if-match", "\"1\"")],
        )
        .await;
    assert_eq!(
        (r.status, r.body["version"].as_i64()),
        (StatusCode::OK, Some(2)),
        "{r:?}"
    );
    assert_eq!(r.body["location"], "Lyon", "untouched keys stay");
    let r = a
        .call_with(
            Method::PATCH,
            &path,
            Some(&op),
            Some(json!({ "description": "x" })),
            &[("if-match", "\"1\"")],
        )
        .await;
    assert_eq!(r.status, StatusCode::PRECONDITION_FAILED);
    let r = a
        .call(
            Method::PATCH,
            &path,
            Some(&op),
            Some(json!({ "latitude": null, "longitude": null })),
        )
        .await;
    assert_eq!(
        (r.status, &r.body["latitude"]),
        (StatusCode::OK, &Value::Null)
    );
    let r = a
        .call(
            Method::PATCH,
            &path,
            Some(&op),
            Some(json!({ "lan_prefixes": ["10.2.5.0/24"] })),
        )
        .await;
    assert_eq!(r.status, StatusCode::CONFLICT, "overlaps branch");
    let r = a
        .call(
            Method::PATCH,
            &path,
            Some(&op),
            Some(json!({ "links": [] })),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);

    // Links.
    let links = format!("{path}/links");
    let r = a
        .call(
            Method::POST,
            &links,
            Some(&op),
            Some(json!({ "name": "lte", "kind": "lte", "metered": true })),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{r:?}");
    let lte = r.body["id"].as_i64().unwrap();
    let r = a
        .call(
            Method::POST,
            &links,
            Some(&op),
            Some(json!({ "name": "lte", "kind": "lte" })),
        )
        .await;
    assert_eq!(r.status, StatusCode::CONFLICT);
    let r = a
        .call(
            Method::POST,
            &links,
            Some(&op),
            Some(json!({ "name": "sat", "kind": "satellite", "up_kbps": 0 })),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(r.body["error"]["details"][0]["field"], "up_kbps", "{r:?}");
    let r = a
        .call_with(
            Method::PATCH,
            &format!("{links}/{lte}"),
            Some(&op),
            Some(json!({ "priority": 10 })),
            &[("if-match", "\"1\"")],
        )
        .await;
    assert_eq!(
        (
            r.status,
            r.body["priority"].as_i64(),
            r.body["metered"].as_bool()
        ),
        (StatusCode::OK, Some(10), Some(true)),
        "{r:?}"
    );
    let r = a.call(Method::GET, &links, Some(&op), None).await;
    assert_eq!(r.body["total"], 3);
    // A link is reached only through its own site.
    let other = format!("/api/v1/sites/{}/links/{lte}", id + 1);
    assert_eq!(
        a.call(Method::GET, &other, Some(&op), None).await.status,
        StatusCode::NOT_FOUND
    );
    let r = a
        .call(Method::DELETE, &format!("{links}/{lte}"), Some(&op), None)
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);

    let mpls = hq.body["links"][0]["id"].as_i64().unwrap();
    let r = a.call(Method::DELETE, &path, Some(&op), None).await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    assert_eq!(
        a.call(Method::GET, &path, Some(&op), None).await.status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        a.call(Method::GET, &format!("{links}/{mpls}"), Some(&op), None)
            .await
            .status,
        StatusCode::NOT_FOUND
    );
    let r = a
        .call(
            Method::GET,
            "/api/v1/audit?action=site.delete",
            Some(&op),
            None,
        )
        .await;
    assert_eq!(r.body["items"][0]["details"]["links"], 2);
}

/// Creates sites named `names`, each with `10.<i+1>.0.0/16` and two links; returns their ids.
async fn sites(a: &Api, token: &str, names: &[&str]) -> Vec<i64> {
    let mut ids = Vec::new();
    for (i, n) in names.iter().enumerate() {
        let r = a
            .call(
                Method::POST,
                "/api/v1/sites",
                Some(token),
                Some(site(n, &[&format!("10.{}.0.0/16", i + 1)])),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{r:?}");
        ids.push(r.body["id"].as_i64().unwrap());
    }
    ids
}

#[tokio::test]
async fn overlay_addresses_are_allocated_without_collisions_and_renumbered_with_the_prefix() {
    let a = api().await;
    let t = a.admin().await;
    let ids = sites(&a, &t, &["hq", "b1", "b2"]).await;
    let addr = |r: &Reply| r.body["overlay_address"].as_str().unwrap().to_owned();
    let r = a
        .call(
            Method::GET,
            &format!("/api/v1/sites/{}", ids[1]),
            Some(&t),
            None,
        )
        .await;
    assert_eq!(addr(&r), "10.255.0.2");
    // A freed address is the next one given.
    a.call(
        Method::DELETE,
        &format!("/api/v1/sites/{}", ids[1]),
        Some(&t),
        None,
    )
    .await;
    let r = a
        .call(
            Method::POST,
            "/api/v1/sites",
            Some(&t),
            Some(site("b3", &["10.9.0.0/16"])),
        )
        .await;
    assert_eq!(addr(&r), "10.255.0.2");
    // A LAN inside the overlay is refused.
    let r = a
        .call(
            Method::POST,
            "/api/v1/sites",
            Some(&t),
            Some(site("b4", &["10.255.8.0/24"])),
        )
        .await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{r:?}");

    let r = a
        .call(Method::GET, "/api/v1/topology", Some(&t), None)
        .await;
    assert_eq!(
        (r.body["mode"].as_str(), r.body["overlay_prefix"].as_str()),
        (Some("full-mesh"), Some("10.255.0.0/16"))
    );
    assert_eq!(r.body["addresses"].as_array().unwrap().len(), 3);
    let v = r.body["version"].as_i64().unwrap();
    for (patch, status) in [
        (
            json!({ "overlay_prefix": "10.254.0.0/30" }),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            json!({ "overlay_prefix": "10.1.0.0/24" }),
            StatusCode::CONFLICT,
        ),
        (
            json!({ "overlay_prefix": "10.254.0.0/33" }),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (json!({ "mode": "ring" }), StatusCode::UNPROCESSABLE_ENTITY),
    ] {
        let r = a
            .call(
                Method::PATCH,
                "/api/v1/topology",
                Some(&t),
                Some(patch.clone()),
            )
            .await;
        assert_eq!(r.status, status, "{patch}: {r:?}");
    }
    let r = a
        .call_with(
            Method::PATCH,
            "/api/v1/topology",
            Some(&t),
            Some(json!({ "overlay_prefix": "fd00:ff::/64" })),
            &[("if-match", &format!("\"{v}\""))],
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    let got: Vec<(&str, &str)> = r.body["addresses"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| (x["site"].as_str().unwrap(), x["address"].as_str().unwrap()))
        .collect();
    // Renumbered in creation order (b1 was deleted, b3 came last).
    assert_eq!(
        got,
        [
            ("hq", "fd00:ff::1"),
            ("b2", "fd00:ff::2"),
            ("b3", "fd00:ff::3")
        ]
    );
}

#[tokio::test]
async fn paths_follow_sites_links_and_the_topology_and_invent_no_measurements() {
    let a = api().await;
    let t = a.admin().await;
    let ids = sites(&a, &t, &["hq", "b1", "b2"]).await;
    let r = a
        .call(Method::GET, "/api/v1/paths?limit=500", Some(&t), None)
        .await;
    assert_eq!(r.body["total"], 12, "3 pairs x 2 x 2 links");
    let p = &r.body["items"][0];
    assert_eq!(
        (p["a"]["site"].as_str(), p["b"]["site"].as_str()),
        (Some("hq"), Some("b1"))
    );
    for k in ["state", "rtt_ms", "jitter_ms", "loss_pct", "last_report"] {
        assert!(p[k].is_null(), "{k}: {p}");
    }
    let id = p["id"].as_str().unwrap().to_owned();
    let r = a
        .call(Method::GET, &format!("/api/v1/paths/{id}"), Some(&t), None)
        .await;
    assert_eq!(r.body["id"], id.as_str());
    for bad in [
        "/api/v1/paths/1-1",
        "/api/v1/paths/x",
        "/api/v1/paths/999-1000",
    ] {
        assert_eq!(
            a.call(Method::GET, bad, Some(&t), None).await.status,
            StatusCode::NOT_FOUND,
            "{bad}"
        );
    }
    let r = a
        .call(
            Method::GET,
            &format!("/api/v1/paths?site={}", ids[2]),
            Some(&t),
            None,
        )
        .await;
    assert_eq!(r.body["total"], 8);
    let r = a
        .call(
            Method::GET,
            "/api/v1/paths?limit=5&offset=10",
            Some(&t),
            None,
        )
        .await;
    assert_eq!(r.body["items"].as_array().unwrap().len(), 2);
    let r = a
        .call(Method::GET, "/api/v1/paths?state=up", Some(&t), None)
        .await;
    assert_eq!(r.body["total"], 0, "no edge has reported: nothing is up");
    let r = a
        .call(Method::GET, "/api/v1/paths?state=unknown", Some(&t), None)
        .await;
    assert_eq!(r.body["total"], 12);

    // Hub and spoke: the spokes do not talk to each other.
    let r = a
        .call(
            Method::PATCH,
            "/api/v1/topology",
            Some(&t),
            Some(json!({ "mode": "hub-spoke" })),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "no hub: {r:?}");
    let r = a
        .call(
            Method::PATCH,
            "/api/v1/topology",
            Some(&t),
            Some(json!({ "mode": "hub-spoke", "hubs": [999] })),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    let r = a
        .call(
            Method::PATCH,
            "/api/v1/topology",
            Some(&t),
            Some(json!({ "mode": "hub-spoke", "hubs": [ids[0]] })),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    let r = a.call(Method::GET, "/api/v1/paths", Some(&t), None).await;
    assert_eq!(r.body["total"], 8);
    // A disabled site has no paths.
    a.call(
        Method::PATCH,
        &format!("/api/v1/sites/{}", ids[1]),
        Some(&t),
        Some(json!({ "status": "disabled" })),
    )
    .await;
    let r = a.call(Method::GET, "/api/v1/paths", Some(&t), None).await;
    assert_eq!(r.body["total"], 4);
    // Deleting the hub removes it from the hubs.
    a.call(
        Method::DELETE,
        &format!("/api/v1/sites/{}", ids[0]),
        Some(&t),
        None,
    )
    .await;
    let r = a
        .call(Method::GET, "/api/v1/topology", Some(&t), None)
        .await;
    assert_eq!(r.body["hubs"], json!([]));
}

fn voice(name: &str, order: u32, class: &str) -> Value {
    json!({
        "name": name,
        "order": order,
        "match": { "protocol": "udp", "dst_ports": ["16384-32767"], "dscp": ["ef"] },
        "class": class,
        "steering": "duplicate",
        "links": { "avoid": ["lte"] }
    })
}

#[tokio::test]
async fn sla_classes_start_with_four_built_ins_that_can_be_edited_not_deleted() {
    let a = api().await;
    let t = a.admin().await;
    let r = a
        .call(Method::GET, "/api/v1/sla-classes", Some(&t), None)
        .await;
    let names: Vec<&str> = r.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["realtime", "interactive", "business", "bulk"]);
    assert_eq!(r.body["items"][0]["max_latency_ms"], 150);
    assert_eq!(r.body["items"][0]["builtin"], true);
    let r = a
        .call(
            Method::PATCH,
            "/api/v1/sla-classes/1",
            Some(&t),
            Some(json!({ "max_latency_ms": 200 })),
        )
        .await;
    assert_eq!(
        (r.status, r.body["max_latency_ms"].as_i64()),
        (StatusCode::OK, Some(200)),
        "{r:?}"
    );
    let r = a
        .call(Method::DELETE, "/api/v1/sla-classes/1", Some(&t), None)
        .await;
    assert_eq!(r.status, StatusCode::CONFLICT);
    let r = a
        .call(
            Method::POST,
            "/api/v1/sla-classes",
            Some(&t),
            Some(json!({ "name": "gold", "max_loss_pct": 200.0 })),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(r.body["error"]["details"][0]["field"], "max_loss_pct");
    let r = a
        .call(
            Method::POST,
            "/api/v1/sla-classes",
            Some(&t),
            Some(json!({ "name": "gold", "max_latency_ms": 80 })),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{r:?}");
    let r = a
        .call(
            Method::POST,
            "/api/v1/sla-classes",
            Some(&t),
            Some(json!({ "name": "gold" })),
        )
        .await;
    assert_eq!(r.status, StatusCode::CONFLICT);
}

#[tokio::test]
async fn policies_reference_classes_and_keep_names_and_orders_unique() {
    let a = api().await;
    let t = a.admin().await;
    let r = a
        .call(
            Method::POST,
            "/api/v1/sla-classes",
            Some(&t),
            Some(json!({ "name": "gold" })),
        )
        .await;
    let gold = r.body["id"].as_i64().unwrap();
    let r = a
        .call(
            Method::POST,
            "/api/v1/policies",
            Some(&t),
            Some(voice("voice", 10, "gold")),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{r:?}");
    let id = r.body["id"].as_i64().unwrap();
    assert_eq!(r.body["match"]["dst_ports"], json!(["16384-32767"]));
    assert_eq!(r.body["enabled"], true);
    let r = a
        .call(
            Method::POST,
            "/api/v1/policies",
            Some(&t),
            Some(voice("voice", 20, "gold")),
        )
        .await;
    assert_eq!(r.status, StatusCode::CONFLICT);
    let r = a
        .call(
            Method::POST,
            "/api/v1/policies",
            Some(&t),
            Some(voice("video", 10, "gold")),
        )
        .await;
    assert_eq!(r.status, StatusCode::CONFLICT);
    assert!(
        r.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("voice"),
        "{r:?}"
    );
    let r = a
        .call(
            Method::POST,
            "/api/v1/policies",
            Some(&t),
            Some(voice("video", 20, "platinum")),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(r.body["error"]["details"][0]["field"], "class");
    let mut icmp = voice("ping", 30, "bulk");
    icmp["match"]["protocol"] = json!("icmp");
    let r = a
        .call(Method::POST, "/api/v1/policies", Some(&t), Some(icmp))
        .await;
    assert_eq!(
        r.body["error"]["details"][0]["field"], "match.protocol",
        "{r:?}"
    );
    let mut bad = voice("bad", 40, "bulk");
    bad["match"]["dst_ports"] = json!(["90-80"]);
    let r = a
        .call(Method::POST, "/api/v1/policies", Some(&t), Some(bad))
        .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{r:?}");

    // The class is in use: it stays, under its name.
    let r = a
        .call(
            Method::DELETE,
            &format!("/api/v1/sla-classes/{gold}"),
            Some(&t),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::CONFLICT);
    let r = a
        .call(
            Method::PATCH,
            &format!("/api/v1/sla-classes/{gold}"),
            Some(&t),
            Some(json!({ "name": "au" })),
        )
        .await;
    assert_eq!(r.status, StatusCode::CONFLICT);
    let r = a
        .call(Method::GET, "/api/v1/policies?class=gold", Some(&t), None)
        .await;
    assert_eq!(r.body["total"], 1);
    let r = a
        .call_with(
            Method::PATCH,
            &format!("/api/v1/policies/{id}"),
            Some(&t),
            Some(json!({ "enabled": false, "match": { "dscp": null } })),
            &[("if-match", "\"1\"")],
        )
        .await;
    assert_eq!(
        (r.status, r.body["enabled"].as_bool()),
        (StatusCode::OK, Some(false)),
        "{r:?}"
    );
    assert_eq!(r.body["match"]["dscp"], json!([]));
    assert_eq!(r.body["match"]["protocol"], "udp");
    let r = a
        .call(Method::GET, "/api/v1/policies?enabled=true", Some(&t), None)
        .await;
    assert_eq!(r.body["total"], 0);
    a.call(
        Method::DELETE,
        &format!("/api/v1/policies/{id}"),
        Some(&t),
        None,
    )
    .await;
    let r = a
        .call(
            Method::DELETE,
            &format!("/api/v1/sla-classes/{gold}"),
            Some(&t),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
}

#[tokio::test]
async fn failover_settings_have_defaults_and_validated_ranges() {
    let a = api().await;
    let t = a.admin().await;
    let r = a
        .call(Method::GET, "/api/v1/failover", Some(&t), None)
        .await;
    assert_eq!(
        (
            r.body["down_after_misses"].as_i64(),
            r.body["hold_down_ms"].as_i64()
        ),
        (Some(3), Some(5000))
    );
    assert_eq!(r.headers[header::ETAG], "\"0\"");
    let r = a
        .call(
            Method::PATCH,
            "/api/v1/failover",
            Some(&t),
            Some(json!({ "down_after_misses": 0 })),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(r.body["error"]["details"][0]["field"], "down_after_misses");
    let r = a
        .call_with(
            Method::PATCH,
            "/api/v1/failover",
            Some(&t),
            Some(json!({ "hold_down_ms": 10000 })),
            &[("if-match", "\"0\"")],
        )
        .await;
    assert_eq!(
        (r.status, r.body["hold_down_ms"].as_i64()),
        (StatusCode::OK, Some(10000)),
        "{r:?}"
    );
    let r = a
        .call_with(
            Method::PATCH,
            "/api/v1/failover",
            Some(&t),
            Some(json!({ "hold_down_ms": 9000 })),
            &[("if-match", "\"0\"")],
        )
        .await;
    assert_eq!(r.status, StatusCode::PRECONDITION_FAILED);
}

#[tokio::test]
async fn api_keys_are_shown_once_work_as_bearer_tokens_with_their_role_and_die_when_revoked() {
    let a = api().await;
    let t = a.admin().await;
    let (_, op) = a.user(&t, "op@example.net", "operator").await;
    let body = json!({ "name": "ci", "role": "viewer", "expires_in_days": 30 });
    let r = a
        .call(
            Method::POST,
            "/api/v1/api-keys",
            Some(&op),
            Some(body.clone()),
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    let r = a
        .call(
            Method::POST,
            "/api/v1/api-keys",
            Some(&t),
            Some(json!({ "name": "x", "role": "viewer", "expires_in_days": 0 })),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    let r = a
        .call(Method::POST, "/api/v1/api-keys", Some(&t), Some(body))
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{r:?}");
    let key = r.body["key"].as_str().unwrap().to_owned();
    let id = r.body["id"].as_i64().unwrap();
    assert!(key.starts_with("pak_") && key.len() > 40);
    // Never shown again.
    let r = a
        .call(Method::GET, "/api/v1/api-keys", Some(&t), None)
        .await;
    assert!(r.body["items"][0].get("key").is_none());
    assert!(!r.body.to_string().contains(&key));
    // A viewer key reads, and writes nothing.
    let r = a.call(Method::GET, "/api/v1/sites", Some(&key), None).await;
    assert_eq!(r.status, StatusCode::OK);
    let r = a
        .call(
            Method::POST,
            "/api/v1/sites",
            Some(&key),
            Some(site("x", &[])),
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    let r = a
        .call(Method::GET, "/api/v1/auth/me", Some(&key), None)
        .await;
    assert_eq!(
        (r.body["role"].as_str(), r.body["api_key"]["name"].as_str()),
        (Some("viewer"), Some("ci"))
    );
    let r = a
        .call(Method::GET, "/api/v1/sites", Some("pak_guessed"), None)
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        a.call(
            Method::DELETE,
            &format!("/api/v1/api-keys/{id}"),
            Some(&t),
            None
        )
        .await
        .status,
        StatusCode::NO_CONTENT
    );
    let r = a.call(Method::GET, "/api/v1/sites", Some(&key), None).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    // The database holds no key, only its hash.
    let db = std::fs::read(a.dir.path().join("state/controller.db")).unwrap();
    let wal = std::fs::read(a.dir.path().join("state/controller.db-wal")).unwrap_or_default();
    for bytes in [db, wal] {
        assert!(!bytes.windows(key.len()).any(|w| w == key.as_bytes()));
    }
}

#[tokio::test]
async fn metrics_count_requests_by_route_and_objects_by_kind_for_authenticated_scrapers() {
    let a = api().await;
    let t = a.admin().await;
    sites(&a, &t, &["hq"]).await;
    a.call(Method::GET, "/api/v1/sites/999", Some(&t), None)
        .await;
    let r = a
        .app
        .clone()
        .oneshot(Request::get("/metrics").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let req = Request::get("/metrics")
        .header(header::AUTHORIZATION, format!("Bearer {t}"))
        .body(Body::empty())
        .unwrap();
    let r = a.app.clone().oneshot(req).await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert!(
        r.headers()[header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    let text =
        String::from_utf8(r.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap();
    for want in [
        r#"patronus_http_requests_total{route="/api/v1/sites",method="POST",status="201"} 1"#,
        r#"patronus_http_requests_total{route="/api/v1/sites/{id}",method="GET",status="404"} 1"#,
        r#"patronus_http_request_duration_seconds_count{route="/api/v1/auth/login",method="POST"} 1"#,
        r#"patronus_objects{kind="sites"} 1"#,
        r#"patronus_objects{kind="links"} 2"#,
        r#"patronus_objects{kind="sla_classes"} 4"#,
        "patronus_db_pool_connections{state=\"idle\"}",
    ] {
        assert!(text.contains(want), "{want} in\n{text}");
    }
}

#[tokio::test]
async fn the_document_lists_every_route_the_router_serves_and_nothing_else() {
    let a = api().await;
    let r = a
        .call(Method::GET, "/api/v1/openapi.json", None, None)
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(
        r.body["openapi"].as_str().unwrap().starts_with("3.1"),
        "{}",
        r.body["openapi"]
    );
    let doc = patronus_controller::app::document();
    let mut operations = 0;
    for (path, item) in doc["paths"].as_object().unwrap() {
        let concrete = path.replace("{id}", "1").replace("{link}", "1");
        for method in [
            Method::GET,
            Method::POST,
            Method::PATCH,
            Method::DELETE,
            Method::PUT,
        ] {
            let documented = item.get(method.as_str().to_lowercase()).is_some();
            let req = Request::builder()
                .method(method.clone())
                .uri(&concrete)
                .body(Body::empty())
                .unwrap();
            let resp = a.app.clone().oneshot(req).await.unwrap();
            let status = resp.status();
            let bytes = resp.into_body().collect().await.unwrap().to_bytes();
            let text = String::from_utf8_lossy(&bytes);
            let unrouted =
                status == StatusCode::METHOD_NOT_ALLOWED || text.contains("no such route");
            assert_eq!(!unrouted, documented, "{method} {path}: {status} {text}");
            operations += usize::from(documented);
        }
    }
    assert!(operations >= 40, "{operations} operations");

    // Every operation that needs credentials refuses none, a bad one, a refresh token and an
    // expired access token with 401; the public ones are the system's.
    let login = a.login(ADMIN, ADMIN_PW).await;
    let refresh = login.body["refresh_token"].as_str().unwrap().to_owned();
    let key = std::fs::read(a.dir.path().join("state/jwt.key")).unwrap();
    let t = Tokens::new(
        &key,
        std::time::Duration::from_secs(60),
        std::time::Duration::from_secs(60),
    );
    let expired = t.access(1, Role::Admin, patronus_controller::store::now_s() - 3600);
    let mut public = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        let concrete = path.replace("{id}", "1").replace("{link}", "1");
        for (method, op) in item.as_object().unwrap() {
            if op.get("security").is_none() {
                public.push(format!("{method} {path}"));
                continue;
            }
            let method = Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
            for token in [
                None,
                Some("garbage"),
                Some(refresh.as_str()),
                Some(expired.as_str()),
            ] {
                let r = a
                    .call(method.clone(), &concrete, token, Some(json!({})))
                    .await;
                assert_eq!(
                    r.status,
                    StatusCode::UNAUTHORIZED,
                    "{method} {path} with {token:?}: {r:?}"
                );
            }
        }
    }
    public.sort();
    assert_eq!(
        public,
        [
            "get /api/v1/openapi.json",
            "get /api/v1/version",
            "get /docs",
            "get /health",
            "get /ready",
            "post /api/v1/auth/login",
            "post /api/v1/auth/refresh",
            "post /api/v1/enroll",
        ]
    );
    // Every route is registered with its documentation (`routes!` of an annotated handler):
    // no plain axum `.route(` anywhere in the controller's source.
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = vec![src.clone()];
    while let Some(p) = files.pop() {
        if p.is_dir() {
            files.extend(std::fs::read_dir(&p).unwrap().map(|e| e.unwrap().path()));
        } else if p.extension().is_some_and(|e| e == "rs") {
            let text = std::fs::read_to_string(&p).unwrap();
            assert!(
                !text.contains(".route("),
                "{} registers an undocumented route",
                p.display()
            );
        }
    }
    // The page renders the document, with nothing fetched from elsewhere.
    let req = Request::get("/docs").body(Body::empty()).unwrap();
    let resp = a.app.clone().oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let page = String::from_utf8(
        resp.into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec(),
    )
    .unwrap();
    assert!(page.contains("/api/v1/sites/{id}/links") && page.contains("SiteView"));
    assert!(!page.contains("<script") && !page.contains("https://"));
}

#[tokio::test]
async fn every_list_checks_its_paging_and_sort_and_sorts() {
    let a = api().await;
    let t = a.admin().await;
    let doc = patronus_controller::app::document();
    let mut lists = 0;
    for (path, item) in doc["paths"].as_object().unwrap() {
        let Some(get) = item.get("get") else { continue };
        let params: Vec<&str> = get["parameters"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| p["name"].as_str())
            .collect();
        if !params.contains(&"limit") {
            continue;
        }
        lists += 1;
        let path = path.replace("{id}", "1");
        if path.contains("/sites/1") {
            continue; // needs a site; the links list is a site's, not paged
        }
        for bad in ["limit=0", "offset=-1", "limit=many"] {
            let r = a
                .call(Method::GET, &format!("{path}?{bad}"), Some(&t), None)
                .await;
            assert_eq!(
                r.status,
                StatusCode::UNPROCESSABLE_ENTITY,
                "{path}?{bad}: {r:?}"
            );
        }
        if params.contains(&"sort") {
            let r = a
                .call(
                    Method::GET,
                    &format!("{path}?sort=password_hash"),
                    Some(&t),
                    None,
                )
                .await;
            assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{path}: {r:?}");
        }
    }
    assert!(lists >= 7, "{lists} lists");
    let r = a
        .call(
            Method::GET,
            "/api/v1/sla-classes?sort=-name&limit=1",
            Some(&t),
            None,
        )
        .await;
    assert_eq!(
        (
            r.body["total"].as_i64(),
            r.body["items"][0]["name"].as_str()
        ),
        (Some(4), Some("realtime"))
    );
    for (name, order) in [("b", 20), ("a", 30), ("c", 10)] {
        let r = a
            .call(
                Method::POST,
                "/api/v1/policies",
                Some(&t),
                Some(voice(name, order, "bulk")),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED);
    }
    let names = |r: &Reply| -> Vec<String> {
        r.body["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["name"].as_str().unwrap().to_owned())
            .collect()
    };
    let r = a
        .call(Method::GET, "/api/v1/policies", Some(&t), None)
        .await;
    assert_eq!(names(&r), ["c", "b", "a"], "evaluation order by default");
    let r = a
        .call(Method::GET, "/api/v1/policies?sort=name", Some(&t), None)
        .await;
    assert_eq!(names(&r), ["a", "b", "c"]);
    let id = r.body["items"][0]["id"].as_i64().unwrap();
    let r = a
        .call(
            Method::GET,
            &format!("/api/v1/policies/{id}"),
            Some(&t),
            None,
        )
        .await;
    assert_eq!(
        (r.status, r.body["order"].as_i64()),
        (StatusCode::OK, Some(30))
    );
    assert_eq!(r.headers[header::ETAG], "\"1\"");
}

/// Enrols site `id` with a token and a key made of `key_byte`; returns its credential.
async fn enrolled(a: &Api, t: &str, id: i64, key_byte: u8) -> String {
    let r = a
        .call(
            Method::POST,
            &format!("/api/v1/sites/{id}/enrollment-tokens"),
            Some(t),
            Some(json!({})),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{r:?}");
    let key = patronus_api::key_to_base64(&[key_byte; 32]);
    let r = a
        .call(
            Method::POST,
            "/api/v1/enroll",
            None,
            Some(json!({ "token": r.body["token"], "public_key": key })),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    r.body["credential"].as_str().unwrap().to_owned()
}

/// Gives site `id` a public key, as its edge's enrolment will.
async fn enrol(a: &Api, id: i64, key_byte: u8) {
    let key = patronus_api::key_to_base64(&[key_byte; 32]);
    sqlx::query("UPDATE sites SET public_key = ? WHERE id = ?")
        .bind(key)
        .bind(id)
        .execute(a.state.store.pool())
        .await
        .unwrap();
}

#[tokio::test]
async fn each_site_gets_its_peers_by_topology_and_a_change_reaches_only_the_configurations_it_concerns()
 {
    use patronus_controller::compile::{Network, compile, parse};
    let a = api().await;
    let t = a.admin().await;
    let ids = sites(&a, &t, &["hq", "b1", "b2", "b3"]).await;
    for (i, id) in ids[..3].iter().enumerate() {
        enrol(&a, *id, i as u8 + 1).await;
    }
    let configs =
        |net: &Network| -> std::collections::BTreeMap<String, (u64, patronus_api::SiteConfig)> {
            compile(net)
                .unwrap()
                .iter()
                .map(|c| {
                    let s = parse(c).unwrap();
                    (s.site.to_string(), (c.version, s))
                })
                .collect()
        };
    let peers = |c: &patronus_api::SiteConfig| -> Vec<String> {
        c.peers.iter().map(|p| p.name.to_string()).collect()
    };
    let full = configs(&Network::load(&a.state.store).await.unwrap());
    // b3 has not enrolled: it has a configuration, but is nobody's peer.
    assert_eq!(full.len(), 4);
    assert_eq!(peers(&full["hq"].1), ["b1", "b2"]);
    assert_eq!(peers(&full["b3"].1), ["hq", "b1", "b2"]);
    let hq = &full["hq"].1;
    assert_eq!(hq.overlay.to_string(), "10.255.0.1");
    assert_eq!(hq.classes.len(), 4);
    assert_eq!(hq.links.len(), 2);
    let b1 = &hq.peers[0];
    assert_eq!(
        (
            b1.overlay.to_string(),
            b1.links[0].endpoint.unwrap().to_string()
        ),
        ("10.255.0.2".into(), "198.51.100.1:51820".into())
    );

    // Hub and spoke around hq: the spokes see only the hub.
    let r = a
        .call(
            Method::PATCH,
            "/api/v1/topology",
            Some(&t),
            Some(json!({ "mode": "hub-spoke", "hubs": [ids[0]] })),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let hs = configs(&Network::load(&a.state.store).await.unwrap());
    assert_eq!(peers(&hs["hq"].1), ["b1", "b2"]);
    assert_eq!(peers(&hs["b1"].1), ["hq"]);
    // A change to b2's link: b2 and the hub change, b1 does not.
    let link = json!({ "priority": 7 });
    let r = a
        .call(
            Method::GET,
            &format!("/api/v1/sites/{}", ids[2]),
            Some(&t),
            None,
        )
        .await;
    let link_id = r.body["links"][0]["id"].as_i64().unwrap();
    a.call(
        Method::PATCH,
        &format!("/api/v1/sites/{}/links/{link_id}", ids[2]),
        Some(&t),
        Some(link),
    )
    .await;
    let after = configs(&Network::load(&a.state.store).await.unwrap());
    assert_ne!(after["b2"].0, hs["b2"].0);
    assert_ne!(after["hq"].0, hs["hq"].0);
    assert_eq!(after["b1"].0, hs["b1"].0);
    assert_eq!(after["b3"].0, hs["b3"].0);
    // A policy reaches everyone.
    let r = a
        .call(
            Method::POST,
            "/api/v1/policies",
            Some(&t),
            Some(voice("voice", 10, "realtime")),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED);
    let with_policy = configs(&Network::load(&a.state.store).await.unwrap());
    for site in ["hq", "b1", "b2", "b3"] {
        assert_ne!(with_policy[site].0, after[site].0, "{site}");
        assert_eq!(with_policy[site].1.policies.len(), 1);
    }
    // A disabled site has no configuration and is no one's peer.
    a.call(
        Method::PATCH,
        &format!("/api/v1/sites/{}", ids[1]),
        Some(&t),
        Some(json!({ "status": "disabled" })),
    )
    .await;
    let d = configs(&Network::load(&a.state.store).await.unwrap());
    assert!(!d.contains_key("b1"));
    assert_eq!(peers(&d["hq"].1), ["b2"]);
}

#[tokio::test]
async fn an_edge_enrols_once_with_a_token_and_then_acts_as_its_own_site_only() {
    let a = api().await;
    let t = a.admin().await;
    let (_, viewer) = a.user(&t, "viewer@example.net", "viewer").await;
    let ids = sites(&a, &t, &["hq", "b1"]).await;
    let path = format!("/api/v1/sites/{}/enrollment-tokens", ids[0]);
    assert_eq!(
        a.call(Method::POST, &path, Some(&viewer), Some(json!({})))
            .await
            .status,
        StatusCode::FORBIDDEN
    );
    let r = a
        .call(
            Method::POST,
            &path,
            Some(&t),
            Some(json!({ "expires_in_minutes": 0 })),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    let r = a.call(Method::POST, &path, Some(&t), Some(json!({}))).await;
    assert_eq!(r.status, StatusCode::CREATED, "{r:?}");
    let token = r.body["token"].as_str().unwrap().to_owned();
    assert!(token.starts_with("pet_"));
    let key = patronus_api::key_to_base64(&[9; 32]);
    let enroll = |token: &str, endpoints: Value| json!({ "token": token, "public_key": key, "endpoints": endpoints });

    // A link the site does not have: refused, and the token is not spent.
    let r = a
        .call(
            Method::POST,
            "/api/v1/enroll",
            None,
            Some(enroll(&token, json!({ "sat": "203.0.113.9:51820" }))),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{r:?}");
    let r = a
        .call(
            Method::POST,
            "/api/v1/enroll",
            None,
            Some(enroll(&token, json!({ "inet": "203.0.113.9:51820" }))),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    assert_eq!(r.body["site"], "hq");
    let cred = r.body["credential"].as_str().unwrap().to_owned();
    // Spent.
    let r = a
        .call(
            Method::POST,
            "/api/v1/enroll",
            None,
            Some(enroll(&token, json!({}))),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert!(
        r.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("already used"),
        "{r:?}"
    );
    let r = a
        .call(
            Method::POST,
            "/api/v1/enroll",
            None,
            Some(enroll("pet_nothing", json!({}))),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    // Expired.
    let r = a
        .call(
            Method::POST,
            &path,
            Some(&t),
            Some(json!({ "expires_in_minutes": 1 })),
        )
        .await;
    let old = r.body["token"].as_str().unwrap().to_owned();
    sqlx::query("UPDATE enrollment_tokens SET expires_at = 0 WHERE used_at IS NULL")
        .execute(a.state.store.pool())
        .await
        .unwrap();
    let r = a
        .call(
            Method::POST,
            "/api/v1/enroll",
            None,
            Some(enroll(&old, json!({}))),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{r:?}");
    assert!(
        r.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("expired"),
        "{r:?}"
    );

    // The credential gets its own site's configuration, and nothing else.
    let r = a
        .call(Method::GET, "/api/v1/edge/config", Some(&cred), None)
        .await;
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    assert_eq!(
        (r.body["site"].as_str(), r.body["overlay"].as_str()),
        (Some("hq"), Some("10.255.0.1"))
    );
    assert_eq!(r.body["links"][1]["endpoint"], "203.0.113.9:51820");
    let etag = r.headers[header::ETAG].to_str().unwrap().to_owned();
    let r = a
        .call_with(
            Method::GET,
            "/api/v1/edge/config",
            Some(&cred),
            None,
            &[("if-none-match", &etag)],
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_MODIFIED);
    for p in ["/api/v1/sites", "/api/v1/auth/me", "/api/v1/policies"] {
        let r = a.call(Method::GET, p, Some(&cred), None).await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{p}: {r:?}");
    }
    let r = a
        .call(Method::GET, "/api/v1/edge/config", Some(&t), None)
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "a user is not an edge");
    // hq's key is now what its peers get.
    let b1 = a
        .call(
            Method::POST,
            &format!("/api/v1/sites/{}/enrollment-tokens", ids[1]),
            Some(&t),
            Some(json!({})),
        )
        .await;
    let b1_key = patronus_api::key_to_base64(&[7; 32]);
    let r = a
        .call(
            Method::POST,
            "/api/v1/enroll",
            None,
            Some(json!({ "token": b1.body["token"], "public_key": b1_key })),
        )
        .await;
    let b1_cred = r.body["credential"].as_str().unwrap().to_owned();
    let r = a
        .call(Method::GET, "/api/v1/edge/config", Some(&b1_cred), None)
        .await;
    assert_eq!(
        (r.body["site"].as_str(), r.body["peers"][0]["name"].as_str()),
        (Some("b1"), Some("hq"))
    );
    assert_eq!(r.body["peers"][0]["public_key"], key.as_str());
    // Enrolling again (a new machine) retires the old credential.
    let r = a.call(Method::POST, &path, Some(&t), Some(json!({}))).await;
    let again = r.body["token"].as_str().unwrap().to_owned();
    let r = a
        .call(
            Method::POST,
            "/api/v1/enroll",
            None,
            Some(enroll(&again, json!({}))),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let r = a
        .call(Method::GET, "/api/v1/edge/config", Some(&cred), None)
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    // Nothing secret went into the audit log.
    let r = a
        .call(Method::GET, "/api/v1/audit?limit=500", Some(&t), None)
        .await;
    let log = r.body.to_string();
    for secret in [&token, &cred, &again] {
        assert!(!log.contains(secret.as_str()));
    }
}

#[tokio::test]
async fn a_waiting_edge_gets_a_change_as_soon_as_it_is_made_and_304_when_there_is_none() {
    let a = api().await;
    let t = a.admin().await;
    let ids = sites(&a, &t, &["hq", "b1"]).await;
    let cred = enrolled(&a, &t, ids[0], 5).await;
    let r = a
        .call(Method::GET, "/api/v1/edge/config", Some(&cred), None)
        .await;
    let etag = r.headers[header::ETAG].to_str().unwrap().to_owned();
    // Nothing changes: 304 once the wait is over.
    let t0 = std::time::Instant::now();
    let r = a
        .call_with(
            Method::GET,
            "/api/v1/edge/config?wait=1",
            Some(&cred),
            None,
            &[("if-none-match", &etag)],
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_MODIFIED);
    assert!(t0.elapsed() >= std::time::Duration::from_millis(900));
    let r = a
        .call(
            Method::GET,
            "/api/v1/edge/config?wait=99",
            Some(&cred),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    // A change while the edge waits: the answer comes with it, not at the end of the wait.
    let app = a.app.clone();
    let (c2, e2) = (cred.clone(), etag.clone());
    let waiting = tokio::spawn(async move {
        let req = Request::get("/api/v1/edge/config?wait=20")
            .header(header::AUTHORIZATION, format!("Bearer {c2}"))
            .header(header::IF_NONE_MATCH, e2)
            .body(Body::empty())
            .unwrap();
        let started = std::time::Instant::now();
        let resp = app.oneshot(req).await.unwrap();
        (
            resp.status(),
            resp.headers()[header::ETAG].clone(),
            started.elapsed(),
        )
    });
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let r = a
        .call(
            Method::POST,
            "/api/v1/policies",
            Some(&t),
            Some(voice("voice", 10, "realtime")),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED);
    let (status, new_etag, took) = waiting.await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_ne!(new_etag.to_str().unwrap(), etag);
    assert!(took < std::time::Duration::from_secs(5), "{took:?}");
}

#[tokio::test]
async fn a_site_is_online_while_its_edge_is_in_touch() {
    let a = api().await;
    let t = a.admin().await;
    let ids = sites(&a, &t, &["hq"]).await;
    let path = format!("/api/v1/sites/{}", ids[0]);
    let r = a.call(Method::GET, &path, Some(&t), None).await;
    assert_eq!(
        (r.body["online"].as_bool(), &r.body["last_seen"]),
        (Some(false), &Value::Null)
    );
    let cred = enrolled(&a, &t, ids[0], 5).await;
    let r = a
        .call(Method::GET, "/api/v1/edge/config", Some(&cred), None)
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let r = a.call(Method::GET, &path, Some(&t), None).await;
    assert_eq!(r.body["online"], true);
    assert!(r.body["last_seen"].as_i64().unwrap() > 0);
    let r = a.call(Method::GET, "/api/v1/sites", Some(&t), None).await;
    assert_eq!(r.body["items"][0]["online"], true);
}

#[tokio::test]
async fn edges_report_their_paths_and_the_api_shows_what_they_measured() {
    let a = api().await;
    let t = a.admin().await;
    let ids = sites(&a, &t, &["hq", "b1"]).await;
    let cred = enrolled(&a, &t, ids[0], 5).await;
    let report = |state: &str, rtt: f64| {
        json!({ "paths": [
            { "peer": "b1", "local_link": "mpls", "remote_link": "mpls", "state": state,
              "rtt_ms": rtt, "jitter_ms": 0.4, "loss_pct": 0.0, "tx_bytes": 1000, "rx_bytes": 900 },
            { "peer": "gone", "local_link": "mpls", "remote_link": "x", "state": "down",
              "rtt_ms": null, "jitter_ms": 0.0, "loss_pct": 100.0, "tx_bytes": 0, "rx_bytes": 0 }
        ]})
    };
    let r = a
        .call(
            Method::POST,
            "/api/v1/edge/telemetry",
            Some(&cred),
            Some(report("up", 21.5)),
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{r:?}");
    let r = a
        .call(
            Method::POST,
            "/api/v1/edge/telemetry",
            Some(&t),
            Some(report("up", 21.5)),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "only an edge reports");
    let r = a
        .call(
            Method::POST,
            "/api/v1/edge/telemetry",
            Some(&cred),
            Some(report("sideways", 1.0)),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    let r = a
        .call(Method::GET, "/api/v1/paths?state=up", Some(&t), None)
        .await;
    assert_eq!(r.body["total"], 1, "{r:?}");
    let p = &r.body["items"][0];
    assert_eq!(
        (
            p["a"]["link"].as_str(),
            p["b"]["site"].as_str(),
            p["rtt_ms"].as_f64()
        ),
        (Some("mpls"), Some("b1"), Some(21.5))
    );
    let id = p["id"].as_str().unwrap().to_owned();
    let r = a
        .call(Method::GET, "/api/v1/paths?state=unknown", Some(&t), None)
        .await;
    assert_eq!(r.body["total"], 3);
    a.call(
        Method::POST,
        "/api/v1/edge/telemetry",
        Some(&cred),
        Some(report("degraded", 180.0)),
    )
    .await;
    let r = a
        .call(Method::GET, &format!("/api/v1/paths/{id}"), Some(&t), None)
        .await;
    assert_eq!(
        (r.body["state"].as_str(), r.body["rtt_ms"].as_f64()),
        (Some("degraded"), Some(180.0))
    );
    let r = a
        .call(
            Method::GET,
            &format!("/api/v1/paths/{id}/metrics"),
            Some(&t),
            None,
        )
        .await;
    assert_eq!(r.body["total"], 2);
    assert_eq!(r.body["items"][1]["state"], "degraded");
    // At a resolution: the reports of a bucket summed up, the worst state kept.
    let r = a
        .call(
            Method::GET,
            &format!("/api/v1/paths/{id}/metrics?resolution=86400"),
            Some(&t),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    let items = r.body["items"].as_array().unwrap();
    let n: i64 = items.iter().map(|i| i["samples"].as_i64().unwrap()).sum();
    assert_eq!(n, 2, "{r:?}");
    assert!(items.iter().any(|i| i["state"] == "degraded"), "{r:?}");
    assert!(
        items
            .iter()
            .any(|i| i["rtt_ms_max"].as_f64() == Some(180.0)),
        "{r:?}"
    );
    if let [one] = items.as_slice() {
        assert_eq!(one["rtt_ms"].as_f64(), Some(100.75), "{r:?}");
    }
    let r = a
        .call(
            Method::GET,
            &format!("/api/v1/paths/{id}/metrics?resolution=1"),
            Some(&t),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{r:?}");
    let req = Request::get("/metrics")
        .header(header::AUTHORIZATION, format!("Bearer {t}"))
        .body(Body::empty())
        .unwrap();
    let text = String::from_utf8(
        a.app
            .clone()
            .oneshot(req)
            .await
            .unwrap()
            .into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec(),
    )
    .unwrap();
    assert!(
        text.contains(&format!("patronus_path_rtt_ms{{path=\"{id}\"}} 180")),
        "{text}"
    );
    assert!(
        text.contains(&format!("patronus_path_up{{path=\"{id}\"}} 0.5")),
        "{text}"
    );
    // A failover, reported twice (an answer lost on the way back): kept once.
    let event = json!({ "paths": [], "failovers": [{
        "seq": 1, "at_ms": 1_795_000_000_000i64, "peer": "b1",
        "from_local_link": "mpls", "from_remote_link": "mpls",
        "to_local_link": "inet", "to_remote_link": "mpls",
        "reason": "path-down", "flows": 3 }] });
    for _ in 0..2 {
        let r = a
            .call(
                Method::POST,
                "/api/v1/edge/telemetry",
                Some(&cred),
                Some(event.clone()),
            )
            .await;
        assert_eq!(r.status, StatusCode::NO_CONTENT, "{r:?}");
    }
    let r = a
        .call(
            Method::GET,
            "/api/v1/failover/events?reason=path-down",
            Some(&t),
            None,
        )
        .await;
    assert_eq!(r.body["total"], 1, "{r:?}");
    let e = &r.body["items"][0];
    assert_eq!(
        (
            e["site"].as_str(),
            e["from_path"].as_str(),
            e["flows"].as_i64()
        ),
        (Some("hq"), Some(id.as_str()), Some(3))
    );
    assert_eq!(e["to"], "inet>mpls");
    let r = a
        .call(
            Method::GET,
            "/api/v1/failover/events?reason=sla-violated",
            Some(&t),
            None,
        )
        .await;
    assert_eq!(r.body["total"], 0);
    // An old report is no data: the path reads unknown again, its history stays.
    a.state.live.lock().unwrap().get_mut(&id).unwrap().at -= 3600;
    let r = a
        .call(Method::GET, &format!("/api/v1/paths/{id}"), Some(&t), None)
        .await;
    assert!(
        r.body["state"].is_null() && r.body["rtt_ms"].is_null(),
        "{r:?}"
    );
    assert!(r.body["last_report"].as_i64().is_some());
}

/// What a webhook receiver got: (headers, body) of each request.
type Received = std::sync::Arc<std::sync::Mutex<Vec<(HeaderMap, String)>>>;

/// A webhook receiver on loopback that answers 500 to its first `fail_first` requests, then 204.
async fn receiver(fail_first: usize) -> (String, Received) {
    let got: Received = Default::default();
    let seen = got.clone();
    let app = Router::new().route(
        "/hook",
        axum::routing::post(move |headers: HeaderMap, body: String| {
            let seen = seen.clone();
            async move {
                let mut g = seen.lock().unwrap();
                g.push((headers, body));
                if g.len() <= fail_first {
                    StatusCode::INTERNAL_SERVER_ERROR
                } else {
                    StatusCode::NO_CONTENT
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, got)
}

/// Waits until the receiver has a request whose body's `type` is `kind`; its body.
async fn wait_for(got: &Received, kind: &str) -> (HeaderMap, Value) {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let found = got.lock().unwrap().iter().find_map(|(h, b)| {
            let v: Value = serde_json::from_str(b).unwrap();
            (v["type"] == kind).then(|| (h.clone(), v))
        });
        if let Some(f) = found {
            return f;
        }
        let kinds: Vec<String> = got.lock().unwrap().iter().map(|(_, b)| b.clone()).collect();
        assert!(
            tokio::time::Instant::now() < deadline,
            "no {kind} delivered: {kinds:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// Checks a request's signature as a receiver would, with the hmac crate directly.
fn signed_with(secret: &str, headers: &HeaderMap, body: &str) -> bool {
    use hmac::Mac;
    let sig = headers["x-patronus-signature"].to_str().unwrap();
    let (t, v1) = sig.split_once(",v1=").unwrap();
    let t = t.strip_prefix("t=").unwrap();
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(format!("{t}.{body}").as_bytes());
    let want: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let age = patronus_controller::store::now_s() - t.parse::<i64>().unwrap();
    want == v1 && (0..60).contains(&age)
}

#[tokio::test]
async fn webhooks_get_signed_events_retried_until_delivered_with_their_status_in_the_api() {
    let a = api().await;
    let t = a.admin().await;
    patronus_controller::webhooks::start(&a.state);
    let (url, got) = receiver(1).await;
    // Refused: not http(s), no events, an unknown event.
    for (body, field) in [
        (
            json!({ "url": "ftp://example.net/h", "events": ["failover"] }),
            "url",
        ),
        (json!({ "url": url, "events": [] }), "events"),
    ] {
        let r = a
            .call(Method::POST, "/api/v1/webhooks", Some(&t), Some(body))
            .await;
        assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{r:?}");
        assert!(
            r.body["error"]["details"].to_string().contains(field),
            "{r:?}"
        );
    }
    let r = a
        .call(
            Method::POST,
            "/api/v1/webhooks",
            Some(&t),
            Some(json!({ "url": url, "events": ["sideways"] })),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{r:?}");
    let r = a
        .call(
            Method::POST,
            "/api/v1/webhooks",
            Some(&t),
            Some(json!({
                "url": url,
                "events": ["config.changed", "site.online", "site.offline", "path.down",
                           "path.up", "sla.violated", "failover"],
                "description": "the NOC"
            })),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{r:?}");
    let hook = r.body["id"].as_i64().unwrap();
    let secret = r.body["secret"].as_str().unwrap().to_owned();
    assert!(secret.starts_with("whsec_"));
    let r = a
        .call(
            Method::GET,
            &format!("/api/v1/webhooks/{hook}"),
            Some(&t),
            None,
        )
        .await;
    assert!(r.body.get("secret").is_none(), "shown once: {r:?}");

    // A change of the desired state: the first attempt gets a 500, the retry (after about a
    // second) gets through; both are signed, and carry the same event id.
    let ids = sites(&a, &t, &["hq", "b1"]).await;
    let (h, v) = wait_for(&got, "config.changed").await;
    assert_eq!(v["data"]["path"], "/api/v1/sites");
    assert_eq!(v["data"]["method"], "POST");
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let r = a
            .call(
                Method::GET,
                &format!("/api/v1/webhooks/{hook}/deliveries?event=config.changed"),
                Some(&t),
                None,
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{r:?}");
        let first = r.body["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["event_id"] == v["id"])
            .cloned()
            .unwrap();
        if first["status"] == "delivered" {
            assert_eq!(first["attempts"], 2, "{first}");
            assert_eq!(first["last_status"], 204, "{first}");
            assert_eq!(first["payload"], v);
            break;
        }
        assert_eq!(first["status"], "pending", "{first}");
        assert!(tokio::time::Instant::now() < deadline, "{first}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    {
        let g = got.lock().unwrap();
        let same: Vec<_> = g
            .iter()
            .filter(|(_, b)| serde_json::from_str::<Value>(b).unwrap()["id"] == v["id"])
            .collect();
        assert_eq!(same.len(), 2);
        for (h, b) in same {
            assert!(signed_with(&secret, h, b), "bad signature");
            assert!(!signed_with("whsec_other", h, b));
            assert_eq!(h["x-patronus-event"], "config.changed");
        }
    }
    assert_eq!(h["content-type"], "application/json");

    // An edge: online, a path down, a failover.
    let cred = enrolled(&a, &t, ids[0], 5).await;
    let r = a
        .call(Method::GET, "/api/v1/edge/config", Some(&cred), None)
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let (_, v) = wait_for(&got, "site.online").await;
    assert_eq!(v["data"]["site"], "hq");
    let report = json!({
        "paths": [{ "peer": "b1", "local_link": "mpls", "remote_link": "mpls", "state": "down",
                    "rtt_ms": null, "jitter_ms": 0.0, "loss_pct": 100.0,
                    "tx_bytes": 0, "rx_bytes": 0 }],
        "failovers": [{ "seq": 1, "at_ms": 1_795_000_000_000i64, "peer": "b1",
                        "from_local_link": "mpls", "from_remote_link": "mpls",
                        "to_local_link": "inet", "to_remote_link": "mpls",
                        "reason": "path-down", "flows": 3 }],
        "path_events": [{ "seq": 1, "at_ms": 1_794_999_999_940i64, "peer": "b1",
                          "local_link": "mpls", "remote_link": "mpls", "kind": "down",
                          "silent_ms": 64.5, "flows": 3 }]
    });
    for _ in 0..2 {
        let r = a
            .call(
                Method::POST,
                "/api/v1/edge/telemetry",
                Some(&cred),
                Some(report.clone()),
            )
            .await;
        assert_eq!(r.status, StatusCode::NO_CONTENT, "{r:?}");
    }
    let (_, v) = wait_for(&got, "path.down").await;
    assert_eq!(
        (v["data"]["from"].as_str(), v["data"]["to"].as_str()),
        (Some("hq/mpls"), Some("b1/mpls"))
    );
    // At the moment the edge saw it, to the millisecond.
    assert_eq!(v["data"]["at_ms"], 1_794_999_999_940i64);
    assert_eq!(v["data"]["silent_ms"], 64.5);
    let (_, v) = wait_for(&got, "failover").await;
    assert_eq!(
        (v["data"]["reason"].as_str(), v["data"]["flows"].as_u64()),
        (Some("path-down"), Some(3))
    );
    // A report repeated is not news: one path.down, one failover.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let count = |kind: &str| {
        got.lock()
            .unwrap()
            .iter()
            .filter(|(_, b)| serde_json::from_str::<Value>(b).unwrap()["type"] == kind)
            .count()
    };
    assert_eq!(
        (count("path.down"), count("failover")),
        (1, 1),
        "{:?}",
        got.lock()
            .unwrap()
            .iter()
            .map(|(_, b)| b.clone())
            .collect::<Vec<_>>()
    );
    let up = report["paths"][0].clone();
    let mut up = json!({ "paths": [up], "path_events": [
        { "seq": 2, "at_ms": 1_795_000_004_000i64, "peer": "b1", "local_link": "mpls",
          "remote_link": "mpls", "kind": "up", "rtt_ms": 20.0 },
        { "seq": 3, "at_ms": 1_795_000_009_000i64, "peer": "b1", "local_link": "mpls",
          "remote_link": "mpls", "kind": "sla-violated", "class": "realtime",
          "rtt_ms": 180.5, "jitter_ms": 4.0, "loss_pct": 0.0 }] });
    up["paths"][0]["state"] = json!("up");
    up["paths"][0]["rtt_ms"] = json!(20.0);
    a.call(
        Method::POST,
        "/api/v1/edge/telemetry",
        Some(&cred),
        Some(up),
    )
    .await;
    wait_for(&got, "path.up").await;
    // The class the path broke, and what it measured, at the edge's millisecond.
    let (_, v) = wait_for(&got, "sla.violated").await;
    assert_eq!(
        (
            v["data"]["class"].as_str(),
            v["data"]["rtt_ms"].as_f64(),
            v["data"]["at_ms"].as_i64()
        ),
        (Some("realtime"), Some(180.5), Some(1_795_000_009_000)),
        "{v}"
    );
    // The path's history of state changes.
    let path_id = v_path_id(&a, &t).await;
    let r = a
        .call(
            Method::GET,
            &format!("/api/v1/paths/{path_id}/events"),
            Some(&t),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    let kinds: Vec<&str> = r.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["down", "up", "sla-violated"], "{r:?}");
    assert_eq!(r.body["items"][0]["detail"]["flows"], 3);
    let r = a
        .call(
            Method::GET,
            &format!("/api/v1/paths/{path_id}/events?kind=sideways"),
            Some(&t),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);

    // The edge falls silent: once it has not been heard from for 15 s, its site is
    // announced offline, with when it was last seen.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(25);
    let offline = loop {
        let found = got.lock().unwrap().iter().find_map(|(_, b)| {
            let v: Value = serde_json::from_str(b).unwrap();
            (v["type"] == "site.offline").then_some(v)
        });
        if let Some(v) = found {
            break v;
        }
        assert!(tokio::time::Instant::now() < deadline, "no site.offline");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    };
    assert_eq!(offline["data"]["site"], "hq", "{offline}");
    assert!(offline["data"]["last_seen"].is_i64(), "{offline}");
    let r = a
        .call(
            Method::GET,
            &format!("/api/v1/sites/{}", ids[0]),
            Some(&t),
            None,
        )
        .await;
    assert_eq!(
        (r.body["online"].as_bool(), r.body["last_seen"].as_i64()),
        (Some(false), offline["data"]["last_seen"].as_i64()),
        "{r:?}"
    );

    // A ping on request; a disabled webhook hears nothing, and cannot be pinged.
    let r = a
        .call(
            Method::POST,
            &format!("/api/v1/webhooks/{hook}/ping"),
            Some(&t),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{r:?}");
    let (_, v) = wait_for(&got, "ping").await;
    assert_eq!(v["id"], r.body["event_id"]);
    let r = a
        .call(
            Method::PATCH,
            &format!("/api/v1/webhooks/{hook}"),
            Some(&t),
            Some(json!({ "enabled": false })),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    assert_eq!(r.body["enabled"], false);
    let r = a
        .call(
            Method::POST,
            &format!("/api/v1/webhooks/{hook}/ping"),
            Some(&t),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{r:?}");
    let before = got.lock().unwrap().len();
    let r = a
        .call(
            Method::POST,
            "/api/v1/sites",
            Some(&t),
            Some(site("b2", &["10.9.0.0/16"])),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{r:?}");
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert_eq!(got.lock().unwrap().len(), before);
    // Deleted with its deliveries; the secret is in no audit record.
    let r = a
        .call(
            Method::DELETE,
            &format!("/api/v1/webhooks/{hook}"),
            Some(&t),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    let left: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM webhook_deliveries")
        .fetch_one(a.state.store.pool())
        .await
        .unwrap();
    assert_eq!(left, 0);
    let r = a
        .call(Method::GET, "/api/v1/audit?limit=500", Some(&t), None)
        .await;
    assert!(r.body.to_string().contains("webhook.create"));
    assert!(!r.body.to_string().contains(&secret));
}

#[tokio::test]
async fn traffic_stats_add_up_what_edges_sent_per_class_path_and_site_across_restarts() {
    let a = api().await;
    let t = a.admin().await;
    let ids = sites(&a, &t, &["hq", "b1"]).await;
    let cred = enrolled(&a, &t, ids[0], 5).await;
    let report = |started: i64, tx: u64, voice: u64| {
        json!({
            "started_ms": started,
            "paths": [{ "peer": "b1", "local_link": "mpls", "remote_link": "mpls", "state": "up",
                        "rtt_ms": 20.0, "jitter_ms": 0.1, "loss_pct": 0.0,
                        "tx_bytes": tx, "rx_bytes": tx / 2, "tx_packets": tx / 100,
                        "rx_packets": tx / 200 }],
            "classes": [{ "class": "realtime", "tx_packets": voice / 100, "tx_bytes": voice },
                        { "class": "business", "tx_packets": 3, "tx_bytes": 300 }]
        })
    };
    // Running totals: 1000, the same again (an answer lost, the report sent twice), 1500;
    // then the edge restarts and has sent 200 since.
    // A late report (older totals of the same run) adds nothing either.
    for body in [
        report(1000, 1000, 500),
        report(1000, 1000, 500),
        report(1000, 1500, 800),
        report(1000, 1200, 600),
        report(2000, 200, 100),
    ] {
        let r = a
            .call(
                Method::POST,
                "/api/v1/edge/telemetry",
                Some(&cred),
                Some(body),
            )
            .await;
        assert_eq!(r.status, StatusCode::NO_CONTENT, "{r:?}");
    }
    let sum = |v: &Value, field: &str, filter: &dyn Fn(&Value) -> bool| -> i64 {
        v["items"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|i| filter(i))
            .map(|i| i[field].as_i64().unwrap())
            .sum()
    };
    let r = a
        .call(Method::GET, "/api/v1/traffic/stats", Some(&t), None)
        .await;
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    let class = |c: &'static str| move |i: &Value| i["class"] == c;
    assert_eq!(sum(&r.body, "tx_bytes", &class("realtime")), 900);
    assert_eq!(sum(&r.body, "tx_bytes", &class("business")), 600);
    assert!(r.body["items"][0]["rx_bytes"].is_null(), "{r:?}");
    assert_eq!(r.body["items"][0]["site"], "hq");
    let r = a
        .call(
            Method::GET,
            "/api/v1/traffic/stats?by=path&bucket=5",
            Some(&t),
            None,
        )
        .await;
    let all = |_: &Value| true;
    assert_eq!(sum(&r.body, "tx_bytes", &all), 1700);
    assert_eq!(sum(&r.body, "rx_bytes", &all), 850);
    assert_eq!(sum(&r.body, "tx_packets", &all), 17);
    let path_id = r.body["items"][0]["path_id"].as_str().unwrap().to_owned();
    let r = a
        .call(
            Method::GET,
            &format!("/api/v1/traffic/stats?path={path_id}&site={}", ids[0]),
            Some(&t),
            None,
        )
        .await;
    assert_eq!(sum(&r.body, "tx_bytes", &all), 1700);
    let r = a
        .call(Method::GET, "/api/v1/traffic/stats?by=site", Some(&t), None)
        .await;
    assert_eq!(sum(&r.body, "tx_bytes", &all), 1700);
    assert!(r.body["items"][0].get("path_id").is_none());
    let r = a
        .call(
            Method::GET,
            &format!("/api/v1/traffic/stats?site={}", ids[1]),
            Some(&t),
            None,
        )
        .await;
    assert_eq!(r.body["total"], 0);
    for bad in [
        "bucket=1",
        "by=nope",
        "from=100&to=50",
        "by=class&path=1-2",
        "path=1-2&class=bulk",
    ] {
        let r = a
            .call(
                Method::GET,
                &format!("/api/v1/traffic/stats?{bad}"),
                Some(&t),
                None,
            )
            .await;
        assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{bad}: {r:?}");
    }
}

#[tokio::test]
async fn a_key_rotation_is_asked_by_an_operator_announced_to_peers_then_committed_by_the_edge() {
    let a = api().await;
    let t = a.admin().await;
    let ids = sites(&a, &t, &["hq", "b1"]).await;
    let (_, viewer) = a.user(&t, "v@example.net", "viewer").await;
    let path = format!("/api/v1/sites/{}/rotate-key", ids[0]);
    // Not before the site has an edge; not by a viewer.
    let r = a.call(Method::POST, &path, Some(&t), None).await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{r:?}");
    let hq = enrolled(&a, &t, ids[0], 5).await;
    let b1 = enrolled(&a, &t, ids[1], 6).await;
    let r = a.call(Method::POST, &path, Some(&viewer), None).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    let r = a.call(Method::POST, &path, Some(&t), None).await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{r:?}");
    assert_eq!(r.body["key_rotation"], 1);
    let config = |cred: &str| {
        let cred = cred.to_owned();
        let a = &a;
        async move {
            a.call(Method::GET, "/api/v1/edge/config", Some(&cred), None)
                .await
                .body
        }
    };
    assert_eq!(config(&hq).await["key_rotation"], 1);
    assert!(config(&b1).await.get("key_rotation").is_none());
    let old = patronus_api::key_to_base64(&[5; 32]);
    let new = patronus_api::key_to_base64(&[7; 32]);
    let step = |v: Value| {
        let hq = hq.clone();
        let a = &a;
        async move {
            a.call(Method::POST, "/api/v1/edge/key", Some(&hq), Some(v))
                .await
        }
    };
    // The edge announces its new key: the peers accept both.
    let r = step(json!({ "next": old })).await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{r:?}");
    // Its own code: the edge finishing an interrupted roll reads it (not the message).
    assert_eq!(r.body["error"]["code"], "key_is_current", "{r:?}");
    let r = step(json!({ "commit": new })).await;
    assert_eq!(r.status, StatusCode::CONFLICT, "not announced: {r:?}");
    let r = step(json!({ "next": new })).await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{r:?}");
    let peer = config(&b1).await["peers"][0].clone();
    assert_eq!(
        (
            peer["public_key"].as_str(),
            peer["next_public_key"].as_str()
        ),
        (Some(old.as_str()), Some(new.as_str()))
    );
    // One roll at a time between connected sites: b1 waits for hq's to end.
    let r = a
        .call(
            Method::POST,
            &format!("/api/v1/sites/{}/rotate-key", ids[1]),
            Some(&t),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{r:?}");
    assert_eq!(r.body["error"]["code"], "peer_rolling");
    let b1_next = patronus_api::key_to_base64(&[8; 32]);
    let r = a
        .call(
            Method::POST,
            "/api/v1/edge/key",
            Some(&b1),
            Some(json!({ "next": b1_next })),
        )
        .await;
    assert_eq!(r.body["error"]["code"], "peer_rolling", "{r:?}");
    // Nor may a site announce another site's key.
    let r = a
        .call(
            Method::POST,
            "/api/v1/edge/key",
            Some(&b1),
            Some(json!({ "next": old })),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{r:?}");
    let r = a
        .call(
            Method::GET,
            &format!("/api/v1/sites/{}", ids[0]),
            Some(&t),
            None,
        )
        .await;
    assert_eq!(r.body["next_public_key"], new.as_str());
    // Another site's credential cannot roll hq's key: it acts as its own site only.
    let r = a
        .call(
            Method::POST,
            "/api/v1/edge/key",
            Some(&b1),
            Some(json!({ "commit": new })),
        )
        .await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{r:?}");
    // Committed (twice: an answer lost): the new key is the site's, the old one goes.
    for _ in 0..2 {
        let r = step(json!({ "commit": new })).await;
        assert_eq!(r.status, StatusCode::NO_CONTENT, "{r:?}");
    }
    let peer = config(&b1).await["peers"][0].clone();
    assert_eq!(peer["public_key"], new.as_str());
    assert!(peer.get("next_public_key").is_none(), "{peer}");
    let r = a
        .call(Method::GET, "/api/v1/audit?limit=500", Some(&t), None)
        .await;
    let text = r.body.to_string();
    assert!(
        text.contains("site.rotate_key") && text.contains("site.key_rotated"),
        "{text}"
    );
}

#[tokio::test]
async fn a_delta_carries_only_what_changed_and_makes_the_same_configuration() {
    let a = api().await;
    let t = a.admin().await;
    let ids = sites(&a, &t, &["hq", "b1", "b2"]).await;
    let hq = enrolled(&a, &t, ids[0], 5).await;
    enrolled(&a, &t, ids[1], 6).await;
    let full = |cred: &str| {
        let cred = cred.to_owned();
        let a = &a;
        async move {
            let r = a
                .call(Method::GET, "/api/v1/edge/config", Some(&cred), None)
                .await;
            let etag = r.headers[header::ETAG].to_str().unwrap().to_owned();
            let c: patronus_api::SiteConfig = serde_json::from_value(r.body).unwrap();
            (etag, c)
        }
    };
    let delta = |etag: &str| {
        let (hq, etag) = (hq.clone(), etag.to_owned());
        let a = &a;
        async move {
            a.call_with(
                Method::GET,
                "/api/v1/edge/config/delta",
                Some(&hq),
                None,
                &[("if-none-match", etag.as_str())],
            )
            .await
        }
    };
    let (e1, c1) = full(&hq).await;
    let r = delta(&e1).await;
    assert_eq!(r.status, StatusCode::NOT_MODIFIED);
    // A policy: only the shared fields travel.
    let r = a
        .call(
            Method::POST,
            "/api/v1/policies",
            Some(&t),
            Some(voice("voice", 10, "realtime")),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED);
    let r = delta(&e1).await;
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    assert!(
        r.body.get("head").is_none() || r.body["head"].is_null(),
        "{r:?}"
    );
    assert_eq!(r.body["upsert"], json!([]));
    assert_eq!(r.body["shared"]["policies"][0]["name"], "voice");
    let d: patronus_api::ConfigDelta = serde_json::from_value(r.body.clone()).unwrap();
    let (e2, c2) = full(&hq).await;
    assert_eq!(format!("\"{}\"", d.version), e2);
    assert_eq!(d.apply(&c1), c2);
    // A peer enrols: it is the one peer sent.
    enrolled(&a, &t, ids[2], 7).await;
    let r = delta(&e2).await;
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    let d: patronus_api::ConfigDelta = serde_json::from_value(r.body.clone()).unwrap();
    assert_eq!(d.upsert.len(), 1, "{r:?}");
    assert_eq!(d.upsert[0].name.as_str(), "b2");
    assert!(d.shared.is_none() && d.remove.is_empty());
    let (e3, c3) = full(&hq).await;
    assert_eq!(d.apply(&c2), c3);
    // A peer disabled: it goes, by name.
    let r = a
        .call(
            Method::PATCH,
            &format!("/api/v1/sites/{}", ids[1]),
            Some(&t),
            Some(json!({ "status": "disabled" })),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    let r = delta(&e3).await;
    let d: patronus_api::ConfigDelta = serde_json::from_value(r.body.clone()).unwrap();
    assert_eq!(
        d.remove.iter().map(|n| n.as_str()).collect::<Vec<_>>(),
        ["b1"],
        "{r:?}"
    );
    assert!(
        d.upsert.is_empty() && d.head.is_none() && d.shared.is_none(),
        "{r:?}"
    );
    let (_, c4) = full(&hq).await;
    assert_eq!(d.apply(&c3), c4);
    // A version the controller no longer has; no version at all.
    let r = delta("\"0000000000000000\"").await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{r:?}");
    assert_eq!(r.body["error"]["code"], "base_unknown");
    let r = a
        .call(Method::GET, "/api/v1/edge/config/delta", Some(&hq), None)
        .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{r:?}");
}

/// A TLS webhook receiver on loopback with a certificate for `localhost` that `issuer`
/// signed; it answers 204 to one request per connection and keeps the bodies.
async fn tls_receiver(
    issuer: &rcgen::Issuer<'_, rcgen::KeyPair>,
) -> (u16, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .signed_by(&key, issuer)
        .unwrap();
    let server = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        vec![cert.der().clone()],
        rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
    )
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(server));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let got: std::sync::Arc<std::sync::Mutex<Vec<String>>> = Default::default();
    let seen = got.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let (acceptor, seen) = (acceptor.clone(), seen.clone());
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                // Headers, then Content-Length bytes of body.
                loop {
                    let Ok(n) = tls.read(&mut chunk).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    let text = String::from_utf8_lossy(&buf).into_owned();
                    let Some(end) = text.find("\r\n\r\n") else {
                        continue;
                    };
                    let len: usize = text[..end]
                        .lines()
                        .find_map(|l| {
                            let (k, v) = l.split_once(':')?;
                            k.eq_ignore_ascii_case("content-length")
                                .then(|| v.trim().parse().ok())?
                        })
                        .unwrap_or(0);
                    if buf.len() >= end + 4 + len {
                        seen.lock()
                            .unwrap()
                            .push(String::from_utf8_lossy(&buf[end + 4..]).into_owned());
                        let _ = tls
                            .write_all(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n")
                            .await;
                        let _ = tls.shutdown().await;
                        return;
                    }
                }
            });
        }
    });
    (port, got)
}

#[tokio::test]
async fn https_webhooks_are_verified_against_the_configured_ca_and_refused_otherwise() {
    // A CA of our own, given to the controller as `webhook_ca_file`.
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "Patronus test CA");
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca_cert.pem()).unwrap();
    let trusted = rcgen::Issuer::new(ca, ca_key);
    // Another CA, that nobody told the controller about.
    let rogue_key = rcgen::KeyPair::generate().unwrap();
    let mut rogue = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    rogue.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let rogue = rcgen::Issuer::new(rogue, rogue_key);

    let a = api_with(|c| c.webhook_ca_file = Some(ca_file.clone())).await;
    let t = a.admin().await;
    patronus_controller::webhooks::start(&a.state);
    let (good_port, good) = tls_receiver(&trusted).await;
    let (bad_port, bad) = tls_receiver(&rogue).await;
    let mut hooks = Vec::new();
    for port in [good_port, bad_port] {
        let url = format!("https://localhost:{port}/hook");
        let r = a
            .call(
                Method::POST,
                "/api/v1/webhooks",
                Some(&t),
                Some(json!({ "url": url, "events": ["failover"] })),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{r:?}");
        let id = r.body["id"].as_i64().unwrap();
        let r = a
            .call(
                Method::POST,
                &format!("/api/v1/webhooks/{id}/ping"),
                Some(&t),
                None,
            )
            .await;
        assert_eq!(r.status, StatusCode::ACCEPTED);
        hooks.push(id);
    }
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let mut last = Vec::new();
        for id in &hooks {
            let r = a
                .call(
                    Method::GET,
                    &format!("/api/v1/webhooks/{id}/deliveries"),
                    Some(&t),
                    None,
                )
                .await;
            last.push(r.body["items"][0].clone());
        }
        let (ok, refused) = (&last[0], &last[1]);
        if ok["status"] == "delivered" && refused["attempts"].as_i64() >= Some(1) {
            assert_eq!(ok["last_status"], 204);
            assert_eq!(refused["status"], "pending", "retried later: {refused}");
            let why = refused["last_error"].as_str().unwrap_or("");
            assert!(why.contains("TLS") && why.contains("certificate"), "{why}");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{ok} {refused}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(good.lock().unwrap().len(), 1);
    assert!(
        bad.lock().unwrap().is_empty(),
        "nothing sent to an untrusted server"
    );
    // A CA file that holds no certificate stops the controller at start, by name.
    let empty = dir.path().join("empty.pem");
    std::fs::write(&empty, "").unwrap();
    let mut config = Config::with_data_dir(dir.path().join("other"));
    config.webhook_ca_file = Some(empty);
    let e = patronus_controller::server::prepare(config, &[])
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("webhook_ca_file") && e.contains("no PEM certificate"),
        "{e}"
    );
}

/// The id of hq's MPLS path to b1 (link ids, lower first).
async fn v_path_id(a: &Api, t: &str) -> String {
    let r = a
        .call(Method::GET, "/api/v1/paths?limit=500", Some(t), None)
        .await;
    r.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| {
            p["a"]["site"] == "hq"
                && p["a"]["link"] == "mpls"
                && p["b"]["site"] == "b1"
                && p["b"]["link"] == "mpls"
        })
        .map(|p| p["id"].as_str().unwrap().to_owned())
        .unwrap_or_else(|| panic!("no hq/mpls - b1/mpls path: {r:?}"))
}

/// One of every object, for the sweeps over every documented operation.
struct World {
    admin: String,
    operator: String,
    viewer: String,
    /// hq's site credential, as its edge holds it.
    site: String,
    /// The id a path parameter stands for, by the path segment before it.
    ids: std::collections::HashMap<&'static str, String>,
}

async fn world(a: &Api) -> World {
    let admin = a.admin().await;
    let (_, operator) = a.user(&admin, "op@example.net", "operator").await;
    let (_, viewer) = a.user(&admin, "viewer@example.net", "viewer").await;
    let (target, _) = a.user(&admin, "target@example.net", "viewer").await;
    let s = sites(a, &admin, &["hq", "b1"]).await;
    let site = enrolled(a, &admin, s[0], 1).await;
    let mut ids = std::collections::HashMap::new();
    let post = async |path: &str, body: Value| {
        let r = a.call(Method::POST, path, Some(&admin), Some(body)).await;
        assert_eq!(r.status, StatusCode::CREATED, "{path}: {r:?}");
        r.body["id"].to_string()
    };
    ids.insert("users", target.to_string());
    ids.insert("sites", s[0].to_string());
    ids.insert(
        "sla-classes",
        post("/api/v1/sla-classes", json!({ "name": "gold" })).await,
    );
    ids.insert(
        "policies",
        post("/api/v1/policies", voice("voice", 10, "gold")).await,
    );
    let hook = post(
        "/api/v1/webhooks",
        json!({ "url": "http://127.0.0.1:9/h", "events": ["failover"] }),
    )
    .await;
    ids.insert(
        "api-keys",
        post("/api/v1/api-keys", json!({ "name": "k", "role": "viewer" })).await,
    );
    let r = a
        .call(
            Method::GET,
            &format!("/api/v1/sites/{}/links", s[0]),
            Some(&admin),
            None,
        )
        .await;
    ids.insert("links", r.body["items"][0]["id"].to_string());
    ids.insert("paths", v_path_id(a, &admin).await);
    let r = a
        .call(
            Method::POST,
            &format!("/api/v1/webhooks/{hook}/ping"),
            Some(&admin),
            None,
        )
        .await;
    assert!(r.status.is_success(), "{r:?}");
    let r = a
        .call(
            Method::GET,
            &format!("/api/v1/webhooks/{hook}/deliveries"),
            Some(&admin),
            None,
        )
        .await;
    ids.insert("deliveries", r.body["items"][0]["id"].to_string());
    ids.insert("webhooks", hook);
    World {
        admin,
        operator,
        viewer,
        site,
        ids,
    }
}

/// `path` with its parameters filled from `w`; the `missing`-th one names nothing.
fn concrete(path: &str, w: &World, missing: Option<usize>) -> String {
    let mut out = Vec::new();
    let mut n = 0;
    let segments: Vec<&str> = path.split('/').collect();
    for (i, seg) in segments.iter().enumerate() {
        if seg.starts_with('{') {
            let of = segments[i - 1];
            out.push(if missing == Some(n) {
                if of == "paths" {
                    "999998-999999"
                } else {
                    "999999"
                }
                .to_owned()
            } else {
                w.ids
                    .get(of)
                    .unwrap_or_else(|| panic!("no fixture for {seg} after {of} in {path}"))
                    .clone()
            });
            n += 1;
        } else {
            out.push((*seg).to_owned());
        }
    }
    out.join("/")
}

/// A body the operation accepts (so that what is checked is not the body).
fn body_for(method: &str, path: &str) -> Option<Value> {
    match (method, path) {
        ("get" | "delete", _) => None,
        ("post", "/api/v1/sites/{id}/links") => Some(json!({ "name": "lte9", "kind": "lte" })),
        ("post", "/api/v1/users/{id}/password") => {
            Some(json!({ "new_password": "Another-Password-7" }))
        }
        _ => Some(json!({})),
    }
}

#[tokio::test]
async fn every_operation_enforces_the_role_its_document_names_and_404s_what_does_not_exist() {
    let a = api().await;
    let w = world(&a).await;
    let doc = patronus_controller::app::document();
    let roles = [
        (Role::Viewer, w.viewer.as_str()),
        (Role::Operator, w.operator.as_str()),
        (Role::Admin, w.admin.as_str()),
    ];
    let mut checked = 0;
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            let Some(security) = op.get("security") else {
                continue;
            };
            let m = Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
            let body = body_for(method, path);
            let params = path.matches('{').count();
            let (scheme, scopes) = security[0].as_object().unwrap().iter().next().unwrap();
            let here = concrete(path, &w, None);
            if scheme == "site" {
                // An edge's operation: no user's token is its credential...
                for (role, t) in roles {
                    let r = a.call(m.clone(), &here, Some(t), body.clone()).await;
                    assert_eq!(
                        r.status,
                        StatusCode::UNAUTHORIZED,
                        "{role:?} {method} {path}"
                    );
                }
                // ... and the site's is let in.
                let r = a.call(m.clone(), &here, Some(&w.site), body.clone()).await;
                assert!(
                    !matches!(r.status.as_u16(), 401 | 403),
                    "site {method} {path}: {r:?}"
                );
                checked += 1;
                continue;
            }
            assert_eq!(scheme, "bearer", "{method} {path}");
            let least = scopes
                .as_array()
                .and_then(|s| s.first())
                .and_then(Value::as_str)
                .and_then(Role::parse)
                .unwrap_or_else(|| panic!("{method} {path} names no role: {security}"));
            // A site's credential is for its edge's operations only.
            let r = a.call(m.clone(), &here, Some(&w.site), body.clone()).await;
            assert_eq!(
                r.status,
                StatusCode::FORBIDDEN,
                "site {method} {path}: {r:?}"
            );
            for (role, t) in roles {
                if role < least {
                    // Refused before anything else is looked at: a body that does not even
                    // parse gets the same 403.
                    for b in [body.clone(), Some(json!({ "unexpected": [1, 2] }))] {
                        let r = a.call(m.clone(), &here, Some(t), b).await;
                        assert_eq!(
                            r.status,
                            StatusCode::FORBIDDEN,
                            "{role:?} {method} {path}: {r:?}"
                        );
                    }
                } else if params == 0 {
                    if method == "get" {
                        let r = a.call(m.clone(), &here, Some(t), None).await;
                        assert!(r.status.is_success(), "{role:?} {method} {path}: {r:?}");
                    }
                } else {
                    // Let in, and told that what the path names does not exist, whichever
                    // of its parameters names nothing.
                    for missing in 0..params {
                        let there = concrete(path, &w, Some(missing));
                        let r = a.call(m.clone(), &there, Some(t), body.clone()).await;
                        assert_eq!(
                            r.status,
                            StatusCode::NOT_FOUND,
                            "{role:?} {method} {there}: {r:?}"
                        );
                    }
                }
            }
            checked += 1;
        }
    }
    assert!(checked >= 55, "{checked} operations");

    // Every update checks If-Match: a stale version is 412 and changes nothing.
    let mut patches = 0;
    for (path, item) in doc["paths"].as_object().unwrap() {
        if item.get("patch").is_none() {
            continue;
        }
        let here = concrete(path, &w, None);
        let before = a.call(Method::GET, &here, Some(&w.admin), None).await;
        assert_eq!(before.status, StatusCode::OK, "{path}: {before:?}");
        let r = a
            .call_with(
                Method::PATCH,
                &here,
                Some(&w.admin),
                Some(json!({})),
                &[("if-match", "\"999999\"")],
            )
            .await;
        assert_eq!(r.status, StatusCode::PRECONDITION_FAILED, "{path}: {r:?}");
        let after = a.call(Method::GET, &here, Some(&w.admin), None).await;
        assert_eq!(before.body, after.body, "{path}");
        patches += 1;
    }
    assert!(patches >= 8, "{patches} updates");

    // A delivery is tried again by hand only once it has failed.
    let hook = &w.ids["webhooks"];
    let delivery = &w.ids["deliveries"];
    let retry = format!("/api/v1/webhooks/{hook}/deliveries/{delivery}/retry");
    let r = a.call(Method::POST, &retry, Some(&w.admin), None).await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{r:?}");
    sqlx::query("UPDATE webhook_deliveries SET status = 'failed', attempts = 10 WHERE id = ?")
        .bind(delivery.parse::<i64>().unwrap())
        .execute(a.state.store.pool())
        .await
        .unwrap();
    let r = a.call(Method::POST, &retry, Some(&w.admin), None).await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{r:?}");
    let r = a
        .call(
            Method::GET,
            &format!("/api/v1/webhooks/{hook}/deliveries"),
            Some(&w.admin),
            None,
        )
        .await;
    let d = &r.body["items"][0];
    assert_eq!(
        (d["status"].as_str(), d["attempts"].as_i64()),
        (Some("pending"), Some(0)),
        "{d}"
    );
}
