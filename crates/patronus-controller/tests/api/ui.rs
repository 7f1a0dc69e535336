//! The dashboard (`/ui`) over HTTP, as a browser would use it, without the browser: its
//! session cookie, CSRF tokens, the pages each role gets, forms through the API's validation.
//! (The browser itself, the live topology and the CSP in Chromium: `patronus`'s
//! `dashboard_lab`.)

use axum::body::Body;
use axum::http::{HeaderMap, Method, Request, StatusCode, header};
use http_body_util::BodyExt;
use serde_json::json;

use super::harness::*;

struct Page {
    status: StatusCode,
    headers: HeaderMap,
    body: String,
}

impl Page {
    fn location(&self) -> &str {
        self.headers
            .get(header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }

    /// The value of the first `name="{field}" value="..."` in the page.
    fn field(&self, field: &str) -> String {
        let at = self
            .body
            .find(&format!("name=\"{field}\" value=\""))
            .unwrap_or_else(|| panic!("no {field} in {}", self.body));
        let rest = &self.body[at + field.len() + 15..];
        rest[..rest.find('"').unwrap()].to_owned()
    }

    /// `name=value` of a `Set-Cookie` for `name`, and the whole header.
    fn cookie(&self, name: &str) -> (String, String) {
        let set = self
            .headers
            .get_all(header::SET_COOKIE)
            .iter()
            .map(|v| v.to_str().unwrap().to_owned())
            .find(|c| c.starts_with(&format!("{name}=")))
            .unwrap_or_else(|| panic!("no {name} cookie: {:?}", self.headers));
        (set.split(';').next().unwrap().to_owned(), set)
    }
}

async fn page(a: &Api, method: Method, path: &str, cookie: &str, form: &[(&str, &str)]) -> Page {
    let mut req = Request::builder().method(method).uri(path);
    if !cookie.is_empty() {
        req = req.header(header::COOKIE, cookie);
    }
    let body = if form.is_empty() {
        Body::empty()
    } else {
        req = req.header(header::CONTENT_TYPE, "application/x-www-form-urlencoded");
        let encoded: Vec<String> = form
            .iter()
            .map(|(k, v)| format!("{k}={}", enc(v)))
            .collect();
        Body::from(encoded.join("&"))
    };
    let resp = a.send(req.body(body).unwrap()).await;
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = String::from_utf8(
        resp.into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec(),
    )
    .unwrap();
    Page {
        status,
        headers,
        body,
    }
}

fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// Logs in through the dashboard's form: the session's cookie (`name=value`) and its CSRF token.
async fn ui_login(a: &Api, email: &str, password: &str) -> (String, String) {
    let form = page(a, Method::GET, "/ui/login", "", &[]).await;
    assert_eq!(form.status, StatusCode::OK);
    let (login_cookie, _) = form.cookie("patronus_login");
    let r = page(
        a,
        Method::POST,
        "/ui/login",
        &login_cookie,
        &[
            ("email", email),
            ("password", password),
            ("csrf", &form.field("csrf")),
            ("next", "/ui/"),
        ],
    )
    .await;
    assert_eq!(r.status, StatusCode::SEE_OTHER, "{}", r.body);
    let (session, _) = r.cookie("patronus_session");
    let home = page(a, Method::GET, "/ui/", &session, &[]).await;
    assert_eq!(home.status, StatusCode::OK, "{}", home.body);
    (session, home.field("csrf"))
}

#[tokio::test]
async fn the_login_sets_a_strict_cookie_and_every_page_is_behind_it() {
    let a = api().await;
    // No session: every page goes to the login, saying where to come back.
    let r = page(&a, Method::GET, "/ui/topology", "", &[]).await;
    assert_eq!(r.status, StatusCode::SEE_OTHER);
    assert_eq!(r.location(), "/ui/login?next=/ui/topology");
    let r = page(&a, Method::GET, "/ui/stream", "", &[]).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);

    let form = page(&a, Method::GET, "/ui/login", "", &[]).await;
    assert_eq!(
        form.headers[header::CONTENT_SECURITY_POLICY],
        patronus_controller::ui::CSP
    );
    assert!(!form.body.contains("<script>") && !form.body.contains("style="));
    let (login_cookie, set) = form.cookie("patronus_login");
    assert!(set.contains("HttpOnly") && set.contains("SameSite=Strict") && set.contains("Secure"));
    let csrf = form.field("csrf");
    // A login post without the form's token (another site's form) is refused before the
    // password is looked at.
    let r = page(
        &a,
        Method::POST,
        "/ui/login",
        "",
        &[("email", ADMIN), ("password", ADMIN_PW), ("csrf", &csrf)],
    )
    .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    // A wrong password: the page says so, no session.
    let r = page(
        &a,
        Method::POST,
        "/ui/login",
        &login_cookie,
        &[
            ("email", ADMIN),
            ("password", "Wrong-Password-1"),
            ("csrf", &csrf),
        ],
    )
    .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert!(r.body.contains("Wrong email or password"));
    assert!(
        r.headers
            .get_all(header::SET_COOKIE)
            .iter()
            .all(|c| !c.to_str().unwrap().starts_with("patronus_session"))
    );
    // Right: the session cookie, strict, and back to where the login was asked from; never
    // to another site.
    let r = page(
        &a,
        Method::POST,
        "/ui/login",
        &login_cookie,
        &[
            ("email", ADMIN),
            ("password", ADMIN_PW),
            ("csrf", &csrf),
            ("next", "//evil.example/"),
        ],
    )
    .await;
    assert_eq!(r.status, StatusCode::SEE_OTHER, "{}", r.body);
    assert_eq!(r.location(), "/ui/");
    let (session, set) = r.cookie("patronus_session");
    for flag in ["HttpOnly", "SameSite=Strict", "Secure", "Path=/ui"] {
        assert!(set.contains(flag), "{set}");
    }
    for path in ["/ui/", "/ui/topology", "/ui/events", "/ui/config"] {
        let p = page(&a, Method::GET, path, &session, &[]).await;
        assert_eq!(p.status, StatusCode::OK, "{path}: {}", p.body);
        assert_eq!(
            p.headers[header::CONTENT_SECURITY_POLICY],
            patronus_controller::ui::CSP
        );
        assert!(
            !p.body.contains("<script>") && !p.body.contains(" style="),
            "{path}: inline script or style"
        );
    }
    let p = page(&a, Method::GET, "/ui/sites/999", &session, &[]).await;
    assert_eq!(p.status, StatusCode::NOT_FOUND);
    let p = page(&a, Method::GET, "/ui/nothing-here", &session, &[]).await;
    assert_eq!(p.status, StatusCode::NOT_FOUND);
    // The script and the stylesheet come from the binary.
    let js = page(&a, Method::GET, "/ui/assets/app.js", "", &[]).await;
    assert_eq!(js.status, StatusCode::OK);
    assert!(js.body.contains("EventSource"));

    // A session unused for 30 minutes has ended, and the housekeeping forgets it; one in use
    // lasts.
    {
        use patronus_controller::store::{now_ms, sessions};
        let hash = patronus_controller::auth::sha256(session.split_once('=').unwrap().1.as_bytes());
        let mut conn = a.state.store.conn().await.unwrap();
        let now = now_ms();
        assert!(
            sessions::find(&mut conn, &hash, now + sessions::IDLE_MS - 1_000)
                .await
                .unwrap()
                .is_some()
        );
        assert!(
            sessions::find(&mut conn, &hash, now + 2 * sessions::IDLE_MS)
                .await
                .unwrap()
                .is_none(),
            "unused for 30 minutes"
        );
        assert!(
            sessions::find(&mut conn, &hash, now + sessions::MAX_MS + 1)
                .await
                .unwrap()
                .is_none()
        );
        assert_eq!(
            sessions::prune(&mut conn, now).await.unwrap(),
            0,
            "a live session is kept"
        );
    }

    // Logout ends the session on the server: the cookie is worth nothing after it.
    let csrf = page(&a, Method::GET, "/ui/", &session, &[])
        .await
        .field("csrf");
    let r = page(&a, Method::POST, "/ui/logout", &session, &[("csrf", "x")]).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "a forged logout");
    let r = page(&a, Method::POST, "/ui/logout", &session, &[("csrf", &csrf)]).await;
    assert_eq!(r.status, StatusCode::SEE_OTHER);
    assert!(r.cookie("patronus_session").1.contains("Max-Age=0"));
    let r = page(&a, Method::GET, "/ui/", &session, &[]).await;
    assert_eq!(r.status, StatusCode::SEE_OTHER);
    assert!(r.location().starts_with("/ui/login"));
    // Both logins and the logout are in the audit log.
    let t = a.admin().await;
    let audit = a
        .call(Method::GET, "/api/v1/audit?limit=100", Some(&t), None)
        .await;
    let actions: Vec<&str> = audit.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["details"]["via"] == "dashboard")
        .map(|r| r["action"].as_str().unwrap())
        .collect();
    assert!(
        actions.contains(&"auth.login") && actions.contains(&"auth.logout"),
        "{actions:?}"
    );
}

#[tokio::test]
async fn forms_go_through_the_api_and_a_viewer_or_a_forged_post_changes_nothing() {
    let a = api().await;
    let admin = a.admin().await;
    let (session, csrf) = ui_login(&a, ADMIN, ADMIN_PW).await;
    // An admin's pages have the write forms.
    let home = page(&a, Method::GET, "/ui/", &session, &[]).await;
    assert!(home.body.contains("class=\"write grid\""));

    // A site made through the form: the API made it, and the page shows it.
    let r = page(
        &a,
        Method::POST,
        "/ui/do/site-create",
        &session,
        &[
            ("csrf", &csrf),
            ("back", "/ui/"),
            ("name", "paris"),
            ("lan_prefixes", "10.9.0.0/24"),
            ("location", ""),
            ("description", "via the dashboard"),
        ],
    )
    .await;
    assert_eq!(r.status, StatusCode::SEE_OTHER, "{}", r.body);
    let sites = a
        .call(Method::GET, "/api/v1/sites", Some(&admin), None)
        .await;
    assert_eq!(sites.body["total"], 1);
    let id = sites.body["items"][0]["id"].as_i64().unwrap();
    assert_eq!(r.location(), format!("/ui/sites/{id}"));
    let p = page(&a, Method::GET, r.location(), &session, &[]).await;
    assert_eq!(p.status, StatusCode::OK);
    assert!(p.body.contains("Site paris") && p.body.contains("10.9.0.0/24"));

    // Invalid: the API's own message, word for word, and what was typed is still there.
    let api_says = a
        .call(
            Method::POST,
            "/api/v1/sites",
            Some(&admin),
            Some(json!({ "name": "lyon", "lan_prefixes": ["10.300.0.0/24"], "location": "", "description": "" })),
        )
        .await;
    assert_eq!(
        api_says.status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "{api_says:?}"
    );
    let r = page(
        &a,
        Method::POST,
        "/ui/do/site-create",
        &session,
        &[
            ("csrf", &csrf),
            ("back", "/ui/"),
            ("name", "lyon"),
            ("lan_prefixes", "10.300.0.0/24"),
            ("location", ""),
            ("description", ""),
        ],
    )
    .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    let mut lines = vec![
        api_says.body["error"]["message"]
            .as_str()
            .unwrap()
            .to_owned(),
    ];
    for d in api_says.body["error"]["details"]
        .as_array()
        .into_iter()
        .flatten()
    {
        lines.push(format!(
            "{}: {}",
            d["field"].as_str().unwrap(),
            d["message"].as_str().unwrap()
        ));
    }
    for line in &lines {
        let escaped = line
            .replace('&', "&amp;")
            .replace('"', "&quot;")
            .replace('<', "&lt;")
            .replace('>', "&gt;");
        assert!(r.body.contains(&escaped), "{line} not in {}", r.body);
    }
    assert!(r.body.contains("value=\"10.300.0.0/24\""));

    // A forged post (no token, or another session's): 403, nothing made.
    for token in ["", "forged"] {
        let r = page(
            &a,
            Method::POST,
            "/ui/do/site-create",
            &session,
            &[
                ("csrf", token),
                ("name", "forged"),
                ("lan_prefixes", "10.8.0.0/24"),
            ],
        )
        .await;
        assert_eq!(r.status, StatusCode::FORBIDDEN);
    }

    // A viewer: no write control on any page, no audit log, and a post with their own valid
    // token is the API's 403.
    let (vid, _) = a.user(&admin, "vera@example.net", "viewer").await;
    let (vs, vcsrf) = ui_login(&a, "vera@example.net", "Some-Password-9").await;
    for path in [
        "/ui/".to_owned(),
        "/ui/config".to_owned(),
        format!("/ui/sites/{id}"),
        "/ui/topology".to_owned(),
        "/ui/events".to_owned(),
    ] {
        let p = page(&a, Method::GET, &path, &vs, &[]).await;
        assert_eq!(p.status, StatusCode::OK, "{path}");
        assert!(
            !p.body.contains("class=\"write"),
            "{path} has a write form for a viewer"
        );
        assert!(!p.body.contains("Audit log"), "{path}");
    }
    let r = page(
        &a,
        Method::POST,
        "/ui/do/site-create",
        &vs,
        &[
            ("csrf", &vcsrf),
            ("back", "/ui/"),
            ("name", "viewer-site"),
            ("lan_prefixes", "10.7.0.0/24"),
        ],
    )
    .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    let events = page(&a, Method::GET, "/ui/events", &session, &[]).await;
    assert!(
        events.body.contains("Audit log"),
        "an admin reads the audit log"
    );
    let sites = a
        .call(Method::GET, "/api/v1/sites", Some(&admin), None)
        .await;
    assert_eq!(sites.body["total"], 1, "nothing but paris was made");

    // The viewer's role changes: their dashboard session ends with it.
    let r = a
        .call(
            Method::PATCH,
            &format!("/api/v1/users/{vid}"),
            Some(&admin),
            Some(json!({ "role": "operator" })),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    let r = page(&a, Method::GET, "/ui/", &vs, &[]).await;
    assert_eq!(r.status, StatusCode::SEE_OTHER);
}

#[tokio::test]
async fn the_events_list_pages_back_and_hides_the_author_from_viewers() {
    let a = api().await;
    let admin = a.admin().await;
    for i in 0..5 {
        let r = a
            .call(
                Method::POST,
                "/api/v1/policies",
                Some(&admin),
                Some(voice(&format!("p{i}"), 10 + i, "realtime")),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{r:?}");
    }
    let r = a
        .call(
            Method::GET,
            "/api/v1/events?kind=config.changed&limit=3",
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    let items = r.body["items"].as_array().unwrap();
    assert_eq!(items.len(), 3);
    let seqs: Vec<i64> = items.iter().map(|e| e["seq"].as_i64().unwrap()).collect();
    assert!(
        seqs.windows(2).all(|w| w[0] > w[1]),
        "newest first: {seqs:?}"
    );
    assert!(items[0]["data"]["actor"].is_string(), "an admin sees who");
    let before = r.body["next_before"].as_i64().unwrap();
    let r = a
        .call(
            Method::GET,
            &format!("/api/v1/events?kind=config.changed&before={before}"),
            Some(&admin),
            None,
        )
        .await;
    let older: Vec<i64> = r.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["seq"].as_i64().unwrap())
        .collect();
    assert_eq!(older.len(), 2, "five in all: {older:?}");
    assert!(older.iter().all(|s| *s < before));
    assert!(r.body["next_before"].is_null());
    let (_, viewer) = a.user(&admin, "vic@example.net", "viewer").await;
    let r = a
        .call(Method::GET, "/api/v1/events?limit=50", Some(&viewer), None)
        .await;
    assert!(
        r.body["items"]
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["data"].get("actor").is_none())
    );
    let r = a
        .call(Method::GET, "/api/v1/events?kind=nope", Some(&viewer), None)
        .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
}
