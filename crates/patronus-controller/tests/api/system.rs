//! Public endpoints, the error shape, limits, metrics, the OpenAPI document, paging and the
//! sweep over every documented operation.

use super::harness::*;

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
    assert_eq!(r.body["schema_version"], 21);
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
    if crate::BACKEND == "sqlite" {
        assert_eq!(mode("state/controller.db"), 0o600);
    }
    let _ = &a.state;
}

#[tokio::test]
async fn metrics_count_requests_by_route_and_objects_by_kind_for_authenticated_scrapers() {
    let a = api().await;
    let t = a.admin().await;
    sites(&a, &t, &["hq"]).await;
    a.call(Method::GET, "/api/v1/sites/999", Some(&t), None)
        .await;
    let r = a
        .send(Request::get("/metrics").body(Body::empty()).unwrap())
        .await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let req = Request::get("/metrics")
        .header(header::AUTHORIZATION, format!("Bearer {t}"))
        .body(Body::empty())
        .unwrap();
    let r = a.send(req).await;
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
async fn no_method_or_path_a_client_makes_up_adds_a_metric_series() {
    let a = api().await;
    let t = a.admin().await;
    // Without logging in: made-up methods on a real route, made-up paths; then as many
    // again, all different: the second round adds no line to /metrics.
    // (Reading /metrics is a request too: its own series exist from the first read.)
    metrics_text(&a, &t).await;
    let mut lines = Vec::new();
    for round in 0..2 {
        for n in 0..100 {
            let m = Method::from_bytes(format!("ZZTEST{round}X{n}").as_bytes()).unwrap();
            let r = a.call(m, "/health", None, None).await;
            assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED);
            let r = a
                .call(Method::GET, &format!("/made/up/{round}/{n}"), None, None)
                .await;
            assert_eq!(r.status, StatusCode::NOT_FOUND);
        }
        lines.push(metrics_text(&a, &t).await.lines().count());
    }
    assert_eq!(lines[0], lines[1]);
    let text = metrics_text(&a, &t).await;
    assert!(
        !text.contains("ZZTEST") && !text.contains("/made/up"),
        "{text}"
    );
    assert!(
        text.contains(r#"route="/health",method="other",status="405"} 200"#),
        "{text}"
    );
    assert!(
        text.contains(r#"route="unmatched",method="GET",status="404"} 200"#),
        "{text}"
    );
    patronus_lab::harness::promtool_accepts(&text);
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
            let resp = a.send(req).await;
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
    let expired = t
        .access(1, Role::Admin, patronus_controller::store::now_s() - 3600)
        .unwrap();
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
    // no plain axum `.route(` anywhere in the controller's source, but for the dashboard's
    // pages (`src/ui`: HTML for browsers, not API operations; they read through the API).
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = vec![src.clone()];
    while let Some(p) = files.pop() {
        if p.is_dir() {
            if p == src.join("ui") {
                continue;
            }
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
    let resp = a.send(req).await;
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
        // A list paged by key (`before`, the events) instead of by offset.
        let bads = if params.contains(&"before") && !params.contains(&"offset") {
            ["limit=0", "before=-1", "limit=many"]
        } else {
            ["limit=0", "offset=-1", "limit=many"]
        };
        for bad in bads {
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

/// One of every object, for the sweeps over every documented operation.
struct World {
    admin: String,
    operator: String,
    viewer: String,
    /// The viewer's and the operator's own user ids, with their tokens.
    own: [(i64, String); 2],
    /// hq's site credential, as its edge holds it.
    site: String,
    /// The id a path parameter stands for, by the path segment before it.
    ids: std::collections::HashMap<&'static str, String>,
}

async fn world(a: &Api) -> World {
    let admin = a.admin().await;
    let (operator_id, operator) = a.user(&admin, "op@example.net", "operator").await;
    let (viewer_id, viewer) = a.user(&admin, "viewer@example.net", "viewer").await;
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
        own: [(viewer_id, viewer.clone()), (operator_id, operator.clone())],
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
            // A stream (`text/event-stream`) never ends: its status is read, then it is dropped.
            if op["responses"]["200"]["content"]
                .get("text/event-stream")
                .is_some()
            {
                let status = |t: String| {
                    let req = Request::builder()
                        .method(m.clone())
                        .uri(here.clone())
                        .header(header::AUTHORIZATION, format!("Bearer {t}"))
                        .body(Body::empty())
                        .unwrap();
                    async { a.send(req).await.status() }
                };
                assert_eq!(
                    status(w.site.clone()).await,
                    StatusCode::FORBIDDEN,
                    "{path}"
                );
                for (role, t) in roles {
                    let want = if role < least {
                        StatusCode::FORBIDDEN
                    } else {
                        StatusCode::OK
                    };
                    assert_eq!(status(t.to_owned()).await, want, "{role:?} {path}");
                }
                checked += 1;
                continue;
            }
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

    // On `/users/{id}`, a user below the role named acts on itself exactly where the document
    // lists the `self` requirement.
    let mut own_checked = 0;
    for (path, item) in doc["paths"].as_object().unwrap() {
        if !path.starts_with("/api/v1/users/{id}") {
            continue;
        }
        for (method, op) in item.as_object().unwrap() {
            let selfish = op["security"]
                .as_array()
                .unwrap()
                .iter()
                .any(|r| r["bearer"] == json!(["self"]));
            let m = Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
            for (id, t) in &w.own {
                let mine = path.replace("{id}", &id.to_string());
                let r = a
                    .call(m.clone(), &mine, Some(t), body_for(method, path))
                    .await;
                if selfish {
                    assert_ne!(r.status, StatusCode::FORBIDDEN, "{method} {mine}: {r:?}");
                } else {
                    assert_eq!(r.status, StatusCode::FORBIDDEN, "{method} {mine}: {r:?}");
                }
                own_checked += 1;
            }
        }
    }
    assert!(own_checked >= 8, "{own_checked}");

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

    // So does every delete: a stale version is 412 and deletes nothing.
    let mut deletes = 0;
    for (path, item) in doc["paths"].as_object().unwrap() {
        if item.get("delete").is_none() {
            continue;
        }
        let here = concrete(path, &w, None);
        let before = match item.get("get") {
            Some(_) => Some(a.call(Method::GET, &here, Some(&w.admin), None).await.body),
            None => None,
        };
        let r = a
            .call_with(
                Method::DELETE,
                &here,
                Some(&w.admin),
                None,
                &[("if-match", "\"999999\"")],
            )
            .await;
        assert_eq!(r.status, StatusCode::PRECONDITION_FAILED, "{path}: {r:?}");
        if let Some(before) = before {
            let after = a.call(Method::GET, &here, Some(&w.admin), None).await;
            assert_eq!(before, after.body, "{path}");
        }
        deletes += 1;
    }
    assert!(deletes >= 7, "{deletes} deletes");

    // A delivery is tried again by hand only once it has failed.
    let hook = &w.ids["webhooks"];
    let delivery = &w.ids["deliveries"];
    let retry = format!("/api/v1/webhooks/{hook}/deliveries/{delivery}/retry");
    let r = a.call(Method::POST, &retry, Some(&w.admin), None).await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{r:?}");
    patronus_controller::store::db::query(
        "UPDATE webhook_deliveries SET status = 'failed', attempts = 10 WHERE id = ?",
    )
    .bind(delivery.parse::<i64>().unwrap())
    .execute(&mut *a.state.store.conn().await.unwrap())
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

#[tokio::test]
async fn the_served_document_passes_a_standard_validator_and_names_each_operation_once() {
    let a = api().await;
    let r = a
        .call(Method::GET, "/api/v1/openapi.json", None, None)
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let doc = r.body;
    let mut ids = std::collections::BTreeMap::<String, Vec<String>>::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            let id = op["operationId"]
                .as_str()
                .unwrap_or_else(|| panic!("{method} {path} has no operationId"));
            ids.entry(id.to_owned())
                .or_default()
                .push(format!("{method} {path}"));
        }
    }
    let repeated: Vec<_> = ids.iter().filter(|(_, ops)| ops.len() > 1).collect();
    assert!(
        repeated.is_empty(),
        "operation ids used twice: {repeated:?}"
    );
    // An independent validator of the OpenAPI 3.1 specification: PyPI's
    // openapi-spec-validator, which .ci/deps (the README's test command) installs in
    // target/tools/python.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("openapi.json");
    std::fs::write(&file, serde_json::to_vec_pretty(&doc).unwrap()).unwrap();
    let installed = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../target/tools/python/bin/openapi-spec-validator");
    let validator = if installed.exists() {
        installed
    } else {
        "openapi-spec-validator".into()
    };
    let out = std::process::Command::new(&validator)
        .arg(&file)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "{} checks the document ({e}): run .ci/deps to install it",
                validator.display()
            )
        });
    assert!(
        out.status.success(),
        "the document is not valid OpenAPI:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The `minimum` and `maximum` the document states for `field` of schema `name` (through a
/// nullable type or a `$ref`).
fn stated(doc: &Value, name: &str, field: &str) -> (Option<f64>, Option<f64>) {
    let s = &doc["components"]["schemas"][name]["properties"][field];
    assert!(!s.is_null(), "{name}.{field} is not in the document");
    (s["minimum"].as_f64(), s["maximum"].as_f64())
}

/// The same for query parameter `param` of `method path`.
fn stated_param(doc: &Value, method: &str, path: &str, param: &str) -> (Option<f64>, Option<f64>) {
    let p = doc["paths"][path][method]["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == param)
        .unwrap_or_else(|| panic!("{method} {path} has no parameter {param}"));
    (
        p["schema"]["minimum"].as_f64(),
        p["schema"]["maximum"].as_f64(),
    )
}

#[tokio::test]
async fn the_bounds_the_document_states_are_the_ones_the_server_enforces() {
    let a = api().await;
    let t = a.admin().await;
    let doc = a
        .call(Method::GET, "/api/v1/openapi.json", None, None)
        .await
        .body;
    let id = sites(&a, &t, &["hq"]).await[0];
    let status = |r: Reply| r.status;

    // Paging, on every list alike.
    assert_eq!(
        stated_param(&doc, "get", "/api/v1/sites", "limit"),
        (Some(1.0), Some(500.0))
    );
    assert_eq!(
        stated_param(&doc, "get", "/api/v1/sites", "offset"),
        (Some(0.0), Some(9007199254740991.0))
    );
    for (q, want) in [
        ("limit=1", 200),
        ("limit=500", 200),
        ("limit=0", 422),
        ("limit=501", 422),
        ("offset=0", 200),
        ("offset=9007199254740991", 200),
        ("offset=-1", 422),
        ("offset=9007199254740992", 422),
    ] {
        let r = a
            .call(Method::GET, &format!("/api/v1/sites?{q}"), Some(&t), None)
            .await;
        assert_eq!(r.status.as_u16(), want, "{q}: {r:?}");
    }

    // An API key's lifetime.
    assert_eq!(
        stated(&doc, "NewKey", "expires_in_days"),
        (Some(1.0), Some(365.0))
    );
    for (days, want) in [(1, 201), (365, 201), (0, 422), (366, 422)] {
        let r = a
            .call(
                Method::POST,
                "/api/v1/api-keys",
                Some(&t),
                Some(json!({ "name": "k", "role": "viewer", "expires_in_days": days })),
            )
            .await;
        assert_eq!(r.status.as_u16(), want, "{days} days: {r:?}");
    }

    // An enrolment token's lifetime.
    assert_eq!(
        stated(&doc, "NewToken", "expires_in_minutes"),
        (Some(1.0), Some(10080.0))
    );
    for (minutes, want) in [(1, 201), (10080, 201), (0, 422), (10081, 422)] {
        let r = a
            .call(
                Method::POST,
                &format!("/api/v1/sites/{id}/enrollment-tokens"),
                Some(&t),
                Some(json!({ "expires_in_minutes": minutes })),
            )
            .await;
        assert_eq!(r.status.as_u16(), want, "{minutes} minutes: {r:?}");
    }

    // A link's MTU and capacity.
    assert_eq!(stated(&doc, "Link", "mtu"), (Some(1280.0), Some(9216.0)));
    assert_eq!(stated(&doc, "Link", "up_kbps").0, Some(1.0));
    for (n, (field, value, want)) in [
        ("mtu", json!(1280), 201),
        ("mtu", json!(9216), 201),
        ("mtu", json!(1279), 422),
        ("mtu", json!(9217), 422),
        ("up_kbps", json!(1), 201),
        ("up_kbps", json!(0), 422),
    ]
    .into_iter()
    .enumerate()
    {
        let mut link = json!({ "name": format!("l{n}"), "kind": "lte" });
        link[field] = value.clone();
        let r = a
            .call(
                Method::POST,
                &format!("/api/v1/sites/{id}/links"),
                Some(&t),
                Some(link),
            )
            .await;
        assert_eq!(r.status.as_u16(), want, "{field} {value}: {r:?}");
        if r.status == StatusCode::CREATED {
            let path = format!("/api/v1/sites/{id}/links/{}", r.body["id"]);
            assert_eq!(
                status(a.call(Method::DELETE, &path, Some(&t), None).await),
                StatusCode::NO_CONTENT
            );
        }
    }

    // An SLA class's latency bound is a u32 above 0: all of it, and no more.
    assert_eq!(
        stated(&doc, "SlaClass", "max_latency_ms"),
        (Some(1.0), Some(4294967295.0))
    );
    for (n, (ms, want)) in [
        (json!(1), 201),
        (json!(4294967295u64), 201),
        (json!(0), 422),
        (json!(4294967296u64), 422),
    ]
    .into_iter()
    .enumerate()
    {
        let r = a
            .call(
                Method::POST,
                "/api/v1/sla-classes",
                Some(&t),
                Some(json!({ "name": format!("c{n}"), "max_latency_ms": ms })),
            )
            .await;
        assert_eq!(r.status.as_u16(), want, "{ms}: {r:?}");
    }

    // The long poll's wait.
    let cred = enrolled(&a, &t, id, 3).await;
    assert_eq!(
        stated_param(&doc, "get", "/api/v1/edge/config", "wait"),
        (Some(0.0), Some(25.0))
    );
    for (wait, want) in [(25, 200), (26, 422)] {
        let r = a
            .call(
                Method::GET,
                &format!("/api/v1/edge/config?wait={wait}"),
                Some(&cred),
                None,
            )
            .await;
        assert_eq!(r.status.as_u16(), want, "wait={wait}: {r:?}");
    }

    // A user's email and password.
    let email = &doc["components"]["schemas"]["NewUser"]["properties"]["email"];
    assert_eq!(email["maxLength"], 254);
    let password = &doc["components"]["schemas"]["NewUser"]["properties"]["password"];
    assert_eq!(
        (&password["minLength"], &password["maxLength"]),
        (&json!(12), &json!(1024))
    );
    let long = format!("{}@example.net", "a".repeat(254 - 12));
    for (email, password, want) in [
        (long.clone(), "Some-Password-9".to_owned(), 201),
        (format!("b{long}"), "Some-Password-9".to_owned(), 422),
        ("c@example.net".to_owned(), "Short-Pass-9".to_owned(), 201),
        ("d@example.net".to_owned(), "Short-Pass9".to_owned(), 422),
        (
            "e@example.net".to_owned(),
            format!("Aa1-{}", "x".repeat(1020)),
            201,
        ),
        (
            "f@example.net".to_owned(),
            format!("Aa1-{}", "x".repeat(1021)),
            422,
        ),
    ] {
        let r = a
            .call(
                Method::POST,
                "/api/v1/users",
                Some(&t),
                Some(json!({ "email": email, "role": "viewer", "password": password })),
            )
            .await;
        assert_eq!(r.status.as_u16(), want, "{email}: {r:?}");
    }

    // Every integer in the document has both bounds, within what its format holds.
    let mut unbounded = Vec::new();
    every_integer(&doc, "$", &mut unbounded);
    assert!(unbounded.is_empty(), "{unbounded:#?}");
}

/// Integer schemas in `v` without both bounds, or with bounds their format cannot hold.
fn every_integer(v: &Value, at: &str, bad: &mut Vec<String>) {
    match v {
        Value::Object(o) => {
            let integer = o.get("type").is_some_and(|t| {
                t == "integer" || t.as_array().is_some_and(|a| a.contains(&json!("integer")))
            });
            if integer {
                let (lo, hi) = (o.get("minimum"), o.get("maximum"));
                let fits = match o.get("format").and_then(Value::as_str) {
                    Some("int32") => (i32::MIN as f64, i32::MAX as f64),
                    Some("int64") => (i64::MIN as f64, i64::MAX as f64),
                    None => (0.0, u64::MAX as f64),
                    Some(other) => {
                        bad.push(format!("{at}: format {other}"));
                        return;
                    }
                };
                match (lo.and_then(Value::as_f64), hi.and_then(Value::as_f64)) {
                    (Some(lo), Some(hi)) if lo >= fits.0 && hi <= fits.1 => {}
                    _ => bad.push(format!("{at}: {}", Value::Object(o.clone()))),
                }
            }
            for (k, x) in o {
                every_integer(x, &format!("{at}.{k}"), bad);
            }
        }
        Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                every_integer(x, &format!("{at}[{i}]"), bad);
            }
        }
        _ => {}
    }
}

#[tokio::test]
async fn each_operation_documents_only_the_errors_it_can_give() {
    let a = api().await;
    let doc = a
        .call(Method::GET, "/api/v1/openapi.json", None, None)
        .await
        .body;
    let mut checked = 0;
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            let statuses: Vec<&str> = op["responses"]
                .as_object()
                .unwrap()
                .keys()
                .map(String::as_str)
                .collect();
            let has = |s: &str| statuses.contains(&s);
            let params = op["parameters"].as_array().cloned().unwrap_or_default();
            let body = op.get("requestBody").is_some();
            let secured = op.get("security").is_some();
            let at = format!("{method} {path}");
            // A body's errors only with a body.
            for s in ["413", "415"] {
                assert_eq!(has(s), body, "{at}: {s}");
            }
            // 412 only where If-Match is read: updates and deletes.
            assert_eq!(
                has("412"),
                matches!(method.as_str(), "patch" | "delete"),
                "{at}"
            );
            // 404 with path parameters (or what a handler names); 401 and 403 where secured.
            if params.iter().any(|p| p["in"] == "path") {
                assert!(has("404"), "{at}");
            }
            if secured {
                assert!(has("401"), "{at}");
            }
            checked += 1;
        }
    }
    assert!(checked >= 60, "{checked}");
    // The public operations that take no credential at all document no credential's errors.
    for (method, path) in [
        ("get", "/health"),
        ("get", "/ready"),
        ("get", "/api/v1/version"),
        ("get", "/api/v1/openapi.json"),
    ] {
        let r = doc["paths"][path][method]["responses"].as_object().unwrap();
        let mut errors: Vec<&str> = r
            .keys()
            .map(String::as_str)
            .filter(|s| s.starts_with(['4', '5']))
            .collect();
        errors.sort_unstable();
        assert_eq!(errors, ["500", "503"], "{method} {path}");
    }
    // A list of SLA classes documents the filters it takes, and no others.
    let params: Vec<&str> = doc["paths"]["/api/v1/sla-classes"]["get"]["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(params, ["limit", "offset", "sort"]);
}

/// `patronus controller migrate`'s copy: a populated controller (on the suite's backend:
/// SQLite, or PostgreSQL in `api_postgres`, i.e. between two PostgreSQL servers) copied into a
/// fresh PostgreSQL database serves the same objects and history to the same tokens, its
/// edges' credentials still work, and new objects get new ids.
#[tokio::test]
async fn the_whole_state_is_copied_into_a_fresh_postgres_and_served_the_same() {
    use patronus_controller::config::Database;
    let a = api().await;
    let t = a.admin().await;
    let ids = sites(&a, &t, &["hq", "b1", "b2"]).await;
    let cred = enrolled(&a, &t, ids[0], 5).await;
    a.user(&t, "ops@example.net", "operator").await;
    let r = a
        .call(
            Method::POST,
            "/api/v1/api-keys",
            Some(&t),
            Some(json!({ "name": "ci", "role": "viewer", "expires_in_days": 30 })),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{r:?}");
    let api_key = r.body["key"].as_str().unwrap().to_owned();
    let (url, _got) = receiver(0).await;
    let r = a
        .call(
            Method::POST,
            "/api/v1/webhooks",
            Some(&t),
            Some(json!({ "url": url, "events": ["config.changed", "path.down"] })),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{r:?}");
    let hook = r.body["id"].as_i64().unwrap();
    // A configuration change: a delivery for the webhook.
    let r = a
        .call(
            Method::POST,
            "/api/v1/policies",
            Some(&t),
            Some(voice("voice", 10, "realtime")),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{r:?}");
    for (state, rtt) in [("up", 21.5), ("down", 0.0), ("up", 19.0)] {
        let r = a
            .call(
                Method::POST,
                "/api/v1/edge/telemetry",
                Some(&cred),
                Some(json!({ "paths": [
                    { "peer": "b1", "local_link": "mpls", "remote_link": "mpls", "state": state,
                      "rtt_ms": rtt, "jitter_ms": 0.4, "loss_pct": 0.0,
                      "tx_bytes": 1000, "rx_bytes": 900 }
                ]})),
            )
            .await;
        assert_eq!(r.status, StatusCode::NO_CONTENT, "{r:?}");
    }
    let path = v_path_id(&a, &t).await;
    // The newest site and its links deleted: their ids are never given again, on the copy
    // either.
    let r = a
        .call(
            Method::POST,
            "/api/v1/sites",
            Some(&t),
            Some(site("gone", &["10.77.0.0/16"])),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{r:?}");
    let gone = r.body["id"].as_i64().unwrap();
    let r = a
        .call(
            Method::DELETE,
            &format!("/api/v1/sites/{gone}"),
            Some(&t),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{r:?}");

    let pg = patronus_lab::postgres::shared().unwrap();
    let name = format!("migrated_{}", crate::BACKEND);
    pg.create_database(&name).unwrap();
    let target = Database::Postgres(pg.url(&name));
    let store = patronus_controller::store::Store::connect(&target)
        .await
        .unwrap();
    let actor = patronus_controller::store::Actor {
        id: None,
        name: "cli".into(),
        source: "local".into(),
    };
    let copied = patronus_controller::store::copy::copy_all(&a.state.store, &store, &actor)
        .await
        .unwrap();
    let rows = |t: &str| copied.iter().find(|(n, _)| *n == t).unwrap().1;
    assert_eq!(rows("sites"), 3);
    assert!(rows("path_samples") >= 3, "{copied:?}");
    assert!(rows("webhook_deliveries") >= 1, "{copied:?}");
    // Copying again, over a database now in use, is refused.
    let e = patronus_controller::store::copy::copy_all(&a.state.store, &store, &actor)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("already holds"), "{e}");
    store.close().await;

    // A controller on the copy, with the same configuration otherwise (the signing key).
    let mut config = a.state.config.clone();
    config.database = target;
    let b = api_on(config, tempfile::tempdir().unwrap()).await;
    let mut same = vec![
        "/api/v1/sites".to_owned(),
        "/api/v1/users".to_owned(),
        "/api/v1/api-keys".to_owned(),
        "/api/v1/policies".to_owned(),
        "/api/v1/sla-classes".to_owned(),
        "/api/v1/topology".to_owned(),
        "/api/v1/webhooks".to_owned(),
        format!("/api/v1/webhooks/{hook}/deliveries"),
        format!("/api/v1/paths/{path}/metrics?since=0"),
        format!("/api/v1/paths/{path}/events"),
        "/api/v1/failover".to_owned(),
        "/api/v1/failover/events".to_owned(),
    ];
    same.extend(ids.iter().map(|id| format!("/api/v1/sites/{id}")));
    for p in &same {
        let (ra, rb) = (
            a.call(Method::GET, p, Some(&t), None).await,
            b.call(Method::GET, p, Some(&t), None).await,
        );
        assert_eq!(ra.status, StatusCode::OK, "{p}: {ra:?}");
        // Whether an edge is in touch is each controller's own knowledge (the copy's has
        // heard from no edge yet): everything else is the same.
        fn stored(mut v: Value) -> Value {
            match &mut v {
                Value::Object(m) => {
                    m.remove("online");
                    m.remove("last_seen");
                    for x in m.values_mut() {
                        *x = stored(x.take());
                    }
                }
                Value::Array(a) => {
                    for x in a {
                        *x = stored(x.take());
                    }
                }
                _ => {}
            }
            v
        }
        assert_eq!(stored(ra.body), stored(rb.body), "{p}");
        assert_eq!(
            ra.headers.get(header::ETAG),
            rb.headers.get(header::ETAG),
            "{p}"
        );
    }
    // The audit log, and one more record: the copy itself.
    let mut logs = Vec::new();
    for x in [&a, &b] {
        let r = x
            .call(Method::GET, "/api/v1/audit?limit=500", Some(&t), None)
            .await;
        logs.push(r.body["items"].as_array().unwrap().clone());
    }
    let (la, lb) = (&logs[0], &logs[1]);
    assert_eq!(lb[0]["action"], "store.migrate", "{:?}", lb[0]);
    assert_eq!(la[..], lb[1..]);
    // The API key and the edge's credential work on the copy.
    let r = b
        .call(Method::GET, "/api/v1/sites", Some(&api_key), None)
        .await;
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    let r = b
        .call(
            Method::POST,
            "/api/v1/edge/telemetry",
            Some(&cred),
            Some(json!({ "paths": [] })),
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{r:?}");
    // A new site gets an id past every one the source gave, its links too.
    let r = b
        .call(
            Method::POST,
            "/api/v1/sites",
            Some(&t),
            Some(site("b3", &["10.9.0.0/16"])),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{r:?}");
    assert!(r.body["id"].as_i64().unwrap() > gone, "{r:?}");
    let newest_link = r.body["links"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["id"].as_i64().unwrap())
        .min()
        .unwrap();
    assert!(
        newest_link > 8,
        "the deleted site's links were 7 and 8: {r:?}"
    );
}

/// Three controllers over one PostgreSQL database (and one data directory: the signing key),
/// each serving: a token issued by A is good on C; a refresh token rotated on A and replayed on
/// B revokes the session everywhere; an edge waiting on C gets the change written on A as it
/// is made. (In the `api` run the suite's SQLite controller plays no part: these controllers
/// are on a PostgreSQL database of their own.)
#[tokio::test]
async fn three_controllers_over_one_postgres_share_tokens_sessions_and_changes() {
    use patronus_controller::config::Database;
    let pg = patronus_lab::postgres::shared().unwrap();
    let name = format!("three_{}", crate::BACKEND);
    pg.create_database(&name).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::with_data_dir(dir.path().join("state"));
    config.database = Database::Postgres(pg.url(&name));
    config.auth_rate_per_minute = 10_000;
    let a = api_on(config.clone(), tempfile::tempdir().unwrap()).await;
    let b = api_on(config.clone(), tempfile::tempdir().unwrap()).await;
    let c = api_on(config, tempfile::tempdir().unwrap()).await;

    // A token from A works on C.
    let r = a.login(ADMIN, ADMIN_PW).await;
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    let t = r.body["access_token"].as_str().unwrap().to_owned();
    let refresh1 = r.body["refresh_token"].as_str().unwrap().to_owned();
    let r = c.call(Method::GET, "/api/v1/sites", Some(&t), None).await;
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    // Rotated on A, replayed on B: refused, and the rotated one dies with it (on C too).
    async fn refresh(x: &Api, token: &str) -> Reply {
        let body = json!({ "refresh_token": token });
        x.call(Method::POST, "/api/v1/auth/refresh", None, Some(body))
            .await
    }
    let r = refresh(&a, &refresh1).await;
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    let refresh2 = r.body["refresh_token"].as_str().unwrap().to_owned();
    let r = refresh(&b, &refresh1).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{r:?}");
    let r = refresh(&c, &refresh2).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{r:?}");

    // An edge waits on C; the change is written on A.
    let ids = sites(&a, &t, &["hq", "b1"]).await;
    let cred = enrolled(&a, &t, ids[0], 5).await;
    let r = c
        .call(Method::GET, "/api/v1/edge/config", Some(&cred), None)
        .await;
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    let etag = r.headers[header::ETAG].to_str().unwrap().to_owned();
    let waiting = waiting_poll(&c, ids[0], &cred, &etag).await;
    let announced = c.state.store.generations_followed().0;
    let r = a
        .call(
            Method::POST,
            "/api/v1/policies",
            Some(&t),
            Some(voice("voice", 10, "realtime")),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{r:?}");
    let (status, new_etag, _) = waiting.await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_ne!(new_etag.to_str().unwrap(), etag);
    // C learnt it from A's announcement or its own periodic read: either way, counted.
    let (n, reread) = c.state.store.generations_followed();
    assert!(n + reread > announced, "{n} {reread}");
    let _ = &b;
}

#[tokio::test]
async fn the_newest_contact_with_an_edge_wins_and_each_announcement_is_made_once() {
    use patronus_controller::store::presence::{record, transitions};
    let a = api().await;
    let t = a.admin().await;
    let id = sites(&a, &t, &["hq"]).await[0];
    let t0: i64 = 1_900_000_000_000;
    let mut tx = a.state.store.begin().await.unwrap();
    // The edge moved from controller A to B: B hears it at t0 + 5 s; A's write of its older
    // contact (the connection the edge left) lands after B's, and takes nothing back.
    record(&mut tx, &[(id, t0 + 5_000)]).await.unwrap();
    record(&mut tx, &[(id, t0)]).await.unwrap();
    let on = transitions(&mut tx, t0 + 5_000).await.unwrap();
    assert_eq!(on.len(), 1, "{on:?}");
    assert!(on[0].online && on[0].site == "hq", "{on:?}");
    // Another controller looking at the same moment announces nothing more.
    assert_eq!(transitions(&mut tx, t0 + 5_000).await.unwrap(), []);
    // 15 s after A's contact but not after B's: still online.
    assert_eq!(transitions(&mut tx, t0 + 16_000).await.unwrap(), []);
    // 15 s after B's: offline, once, with B's contact as the last.
    let off = transitions(&mut tx, t0 + 20_001).await.unwrap();
    assert_eq!(off.len(), 1, "{off:?}");
    assert!(
        !off[0].online && off[0].last_seen == (t0 + 5_000) / 1000,
        "{off:?}"
    );
    assert_eq!(transitions(&mut tx, t0 + 20_001).await.unwrap(), []);
    // A site deleted meanwhile is not brought back by a late write.
    record(&mut tx, &[(id + 1000, t0)]).await.unwrap();
    tx.commit().await.unwrap();
    let seen = patronus_controller::store::presence::last_seen(
        &mut *a.state.store.conn().await.unwrap(),
        &[id, id + 1000],
    )
    .await
    .unwrap();
    assert_eq!(seen, [(id, t0 + 5_000)].into_iter().collect());
}

#[tokio::test]
async fn presence_lockouts_and_rate_limits_hold_across_controllers() {
    use patronus_controller::config::Database;
    use patronus_controller::presence::flush;
    let pg = patronus_lab::postgres::shared().unwrap();
    let name = format!("shared_limits_{}", crate::BACKEND);
    pg.create_database(&name).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::with_data_dir(dir.path().join("state"));
    config.database = Database::Postgres(pg.url(&name));
    config.auth_rate_per_minute = 12;
    config.lockout_after_failures = 3;
    let a = api_on(config.clone(), tempfile::tempdir().unwrap()).await;
    let b = api_on(config, tempfile::tempdir().unwrap()).await;
    // Auth requests (logins, enrolments) from the test's one address, 127.0.0.7: this login
    // and the enrolment.
    let started = std::time::Instant::now();
    let t = a.admin().await;
    let id = sites(&a, &t, &["hq"]).await[0];
    let cred = enrolled(&a, &t, id, 5).await;
    let mut requests: u64 = 2;

    // The edge is heard on A: A announces it online, B finds nothing to announce, and B shows
    // it online.
    let r = a
        .call(Method::GET, "/api/v1/edge/config", Some(&cred), None)
        .await;
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    assert_eq!(flush(&a.state).await.unwrap(), 1);
    assert_eq!(flush(&b.state).await.unwrap(), 0);
    let path = format!("/api/v1/sites/{id}");
    let r = b.call(Method::GET, &path, Some(&t), None).await;
    assert_eq!(r.body["online"], true, "{r:?}");
    // It moves to B: nothing to announce on either.
    let r = b
        .call(Method::GET, "/api/v1/edge/config", Some(&cred), None)
        .await;
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    assert_eq!(flush(&b.state).await.unwrap(), 0);
    assert_eq!(flush(&a.state).await.unwrap(), 0);

    // Two wrong passwords on A and one on B lock the account on every controller.
    let other = a.token(ADMIN, ADMIN_PW).await;
    requests += 1;
    let r = a
        .call(
            Method::POST,
            "/api/v1/users",
            Some(&other),
            Some(
                json!({ "email": "ops@example.com", "name": "Ops", "role": "operator",
                         "password": "Tr0ub4dor&3-horse" }),
            ),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{r:?}");
    for x in [&a, &a, &b] {
        let r = x.login("ops@example.com", "wrong-password-1").await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{r:?}");
        requests += 1;
    }
    let r = b.login("OPS@example.com", "Tr0ub4dor&3-horse").await;
    requests += 1;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS, "{r:?}");
    assert!(
        r.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("locked"),
        "{r:?}"
    );

    // The address's allowance (12 a minute, one more every 5 s) is one, whichever controller
    // it asks: alternating between two controllers does not double it.
    let mut refused_at = None;
    for i in (requests + 1)..=24 {
        let x = if i % 2 == 0 { &a } else { &b };
        // A refresh with a token nobody holds: as limited as a login, and cheap to refuse.
        let body = json!({ "refresh_token": format!("not-a-token-{i}") });
        let r = x
            .call(Method::POST, "/api/v1/auth/refresh", None, Some(body))
            .await;
        if r.status == StatusCode::TOO_MANY_REQUESTS {
            assert!(
                r.body["error"]["message"]
                    .as_str()
                    .unwrap()
                    .contains("this address"),
                "{r:?}"
            );
            refused_at = Some(i);
            break;
        }
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{r:?}");
    }
    let refilled = started.elapsed().as_secs() / 5 + 1;
    let refused_at = refused_at.expect("never refused");
    assert!(
        (13..=13 + refilled).contains(&refused_at),
        "refused at request {refused_at}"
    );
}

#[tokio::test]
async fn rate_buckets_and_failure_counts_that_limit_nobody_are_forgotten() {
    use patronus_controller::store::throttle::{count_failure, lock, prune, take_token};
    let a = api().await;
    let mut c = a.state.store.conn().await.unwrap();
    let t0: i64 = 1_900_000_000_000;
    // Two tokens a minute: the third request within the minute is refused, with what is left.
    let per_ms = 2.0 / 60_000.0;
    assert_eq!(
        take_token(&mut c, "192.0.2.1", 2.0, per_ms, t0)
            .await
            .unwrap(),
        (true, 1.0)
    );
    assert!(
        take_token(&mut c, "192.0.2.1", 2.0, per_ms, t0)
            .await
            .unwrap()
            .0
    );
    let (taken, left) = take_token(&mut c, "192.0.2.1", 2.0, per_ms, t0 + 15_000)
        .await
        .unwrap();
    assert!(!taken && (left - 0.5).abs() < 1e-9, "{left}");
    // An earlier time (another controller's clock behind) refills nothing.
    let (taken, left) = take_token(&mut c, "192.0.2.1", 2.0, per_ms, t0)
        .await
        .unwrap();
    assert!(!taken && (left - 0.5).abs() < 1e-9, "{left}");
    assert_eq!(count_failure(&mut c, "quiet", t0).await.unwrap(), 1);
    assert_eq!(count_failure(&mut c, "locked", t0).await.unwrap(), 1);
    assert_eq!(count_failure(&mut c, "locked", t0).await.unwrap(), 2);
    lock(&mut c, "locked", t0 + 3_600_000).await.unwrap();
    // A minute on, the bucket is full again and goes; a day on, the count that locks nothing
    // goes too, and the locked account's stays while locked.
    let n = prune(&mut c, t0 + 15_001, t0 - 1, t0 + 60_000)
        .await
        .unwrap();
    assert_eq!(n, 1);
    let n = prune(&mut c, t0, t0 + 1, t0 + 60_000).await.unwrap();
    assert_eq!(n, 1);
    let n = prune(&mut c, t0, t0 + 1, t0 + 3_600_001).await.unwrap();
    assert_eq!(n, 1);
}
