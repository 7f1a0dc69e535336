//! `/ui`: the dashboard, served by the controller from its own binary.
//!
//! Pages are rendered on the server ([`maud`], escaped by construction); one script of our own
//! (`/ui/assets/app.js`) keeps them live: it follows the API's event stream and, when something
//! happens, fetches the page again and swaps its live regions. Nothing comes from anywhere else,
//! and the Content-Security-Policy says so (`default-src 'none'`, `script-src 'self'`): no
//! inline script or style, no `eval`.
//!
//! **Every page reads through the API, as its user.** A page's handler calls the API's own
//! router in-process with an access token minted for the session's user, so a page shows
//! exactly what the API shows that user (the API's role checks, its redaction of what only
//! admins read) and a form's errors are the API's validation messages, word for word. A page
//! never reads the store itself, but for the session.
//!
//! **Sessions** ([`crate::store::sessions`]) are rows in the database, so that every controller
//! over it serves them: a cookie `patronus_session` (`HttpOnly`, `SameSite=Strict`, `Path=/ui`,
//! `Secure` when the controller serves TLS) carries 32 random bytes, the row their SHA-256. A
//! session ends at logout, after 30 minutes unused, 12 hours after the login, and when its
//! user's password, role or state changes. Every form carries the session's CSRF token, checked
//! before anything else of the post is read (403 without it); the login form, before there is
//! a session, a token of its own in a cookie (double submit).

mod pages;
mod svg;

use std::net::SocketAddr;

use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use http_body_util::BodyExt as _;
use serde_json::Value;

use crate::app::{AppState, RequestId};
use crate::auth::{self as a, Role};
use crate::store::{UserRow, now_ms, now_s, sessions};

/// The session cookie.
pub const COOKIE: &str = "patronus_session";
/// The login form's own CSRF cookie (before there is a session).
const LOGIN_COOKIE: &str = "patronus_login";

/// What every page and asset is sent with.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
                       connect-src 'self'; form-action 'self'; frame-ancestors 'none'; \
                       base-uri 'none'";

/// A response body the API gives at most, read by a page (a page of 500 items is well under).
const MAX_API_BODY: usize = 8 << 20;

/// The dashboard's state: the controller's, and the API's router, which pages call as their
/// user. (The API's router does not hold this one: no cycle.)
#[derive(Clone)]
pub struct Ui {
    pub app: AppState,
    api: Router,
}

impl std::fmt::Debug for Ui {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ui").finish_non_exhaustive()
    }
}

/// The dashboard's routes, calling `api` (the API's router, without the layers around every
/// request: the page's request has been through them).
pub fn routes(app: AppState, api: Router) -> Router {
    let ui = Ui { app, api };
    Router::new()
        .route(
            "/ui",
            get(|| async { redirect("/ui/") }).post(|| async { redirect("/ui/") }),
        )
        .route("/ui/", get(pages::overview))
        .route("/ui/login", get(pages::login_page).post(login))
        .route("/ui/logout", post(logout))
        .route("/ui/topology", get(pages::topology))
        .route("/ui/sites/{id}", get(pages::site))
        .route("/ui/paths/{id}", get(pages::path))
        .route("/ui/events", get(pages::events))
        .route("/ui/config", get(pages::config))
        .route("/ui/do/{action}", post(pages::act))
        .route("/ui/stream", get(stream))
        .route("/ui/session", get(session))
        .route("/ui/assets/app.js", get(script))
        .route("/ui/assets/app.css", get(style))
        .route(
            "/ui/assets/icon.svg",
            get(|| async { asset("image/svg+xml", include_str!("assets/icon.svg")) }),
        )
        .route(
            "/ui/{*rest}",
            get(|| async {
                page_response(
                    StatusCode::NOT_FOUND,
                    pages::bare("Not found", maud::html! { p { "There is no such page." } }),
                )
            }),
        )
        .with_state(ui)
}

/// 303 to `to`.
pub fn redirect(to: &str) -> Response {
    let mut r = StatusCode::SEE_OTHER.into_response();
    if let Ok(v) = HeaderValue::from_str(to) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    secure_headers(r.headers_mut());
    r
}

/// The headers of everything the dashboard sends.
fn secure_headers(h: &mut HeaderMap) {
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
}

/// An HTML page.
pub fn page_response(status: StatusCode, html: maud::Markup) -> Response {
    let mut r = (status, html.into_string()).into_response();
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    secure_headers(h);
    r
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    let mut r = body.into_response();
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    secure_headers(h);
    r
}

async fn script() -> Response {
    asset(
        "text/javascript; charset=utf-8",
        include_str!("assets/app.js"),
    )
}

async fn style() -> Response {
    asset("text/css; charset=utf-8", include_str!("assets/app.css"))
}

// ----- sessions -----

/// A cookie's value from the request.
fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.trim())
}

/// Whether the browser reached the controller over TLS (its own, or a trusted proxy's).
fn over_tls(ui: &Ui, parts: &Parts) -> bool {
    if ui.app.tls.get().is_some() {
        return true;
    }
    let peer = parts
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip());
    let trusted =
        peer.is_some_and(|ip| ui.app.config.trusted_proxies.iter().any(|p| p.contains(ip)));
    trusted
        && parts
            .headers
            .get("x-forwarded-proto")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("https"))
}

/// A `Set-Cookie` value.
fn set_cookie(name: &str, value: &str, max_age_s: i64, secure: bool) -> HeaderValue {
    let secure = if secure { "; Secure" } else { "" };
    HeaderValue::from_str(&format!(
        "{name}={value}; Path=/ui; HttpOnly; SameSite=Strict; Max-Age={max_age_s}{secure}"
    ))
    .unwrap_or(HeaderValue::from_static("x=; Max-Age=0"))
}

/// Equal, in time that depends only on the lengths.
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
}

/// The person a page is for: their session, user and role, and what the page's calls to the
/// API carry (a token of theirs, their address, the request's id).
#[derive(Debug, Clone)]
pub struct Viewer {
    pub user: UserRow,
    pub role: Role,
    pub csrf: String,
    token: String,
    session_hash: [u8; 32],
    connect: Option<ConnectInfo<SocketAddr>>,
    forwarded: Option<HeaderValue>,
    request_id: Option<RequestId>,
    pub tls: bool,
}

/// No session, or one that has ended: pages go to the login, anything else is 401.
#[derive(Debug)]
pub struct NoSession {
    page: bool,
    /// Where to come back to after the login (the page asked for).
    next: String,
}

impl IntoResponse for NoSession {
    fn into_response(self) -> Response {
        if self.page {
            redirect(&format!("/ui/login?next={}", pages::url_encode(&self.next)))
        } else {
            let mut r = (StatusCode::UNAUTHORIZED, "log in again").into_response();
            secure_headers(r.headers_mut());
            r
        }
    }
}

impl FromRequestParts<Ui> for Viewer {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, ui: &Ui) -> Result<Self, Response> {
        let page = !matches!(parts.uri.path(), "/ui/stream" | "/ui/session");
        let next = if parts.method == Method::GET {
            parts
                .uri
                .path_and_query()
                .map_or("/ui/", |p| p.as_str())
                .to_owned()
        } else {
            "/ui/".to_owned()
        };
        let none = || NoSession {
            page,
            next: next.clone(),
        };
        let Some(secret) = cookie(&parts.headers, COOKIE) else {
            return Err(none().into_response());
        };
        let session_hash = a::sha256(secret.as_bytes());
        let found = async {
            let mut conn = ui.app.store.conn().await?;
            sessions::find(&mut conn, &session_hash, now_ms()).await
        }
        .await
        .map_err(|e| crate::error::ApiError::from(e).into_response())?;
        let Some(session) = found else {
            return Err(none().into_response());
        };
        let user = ui
            .app
            .store
            .user(session.user_id)
            .await
            .map_err(|e| crate::error::ApiError::from(e).into_response())?
            .filter(|u| !u.disabled);
        let Some(user) = user else {
            return Err(none().into_response());
        };
        let role = Role::parse(&user.role)
            .ok_or_else(|| crate::error::ApiError::internal("bad role in store").into_response())?;
        crate::server::follow_signing_key(&ui.app).await;
        let token = ui
            .app
            .tokens
            .access(user.id, role, now_s())
            .ok_or_else(|| crate::routes::auth::key_replaced().into_response())?;
        Ok(Self {
            user,
            role,
            csrf: session.csrf,
            token,
            session_hash,
            connect: parts.extensions.get::<ConnectInfo<SocketAddr>>().cloned(),
            forwarded: parts.headers.get("x-forwarded-for").cloned(),
            request_id: parts.extensions.get::<RequestId>().cloned(),
            tls: over_tls(ui, parts),
        })
    }
}

/// What the API answered a page's call: its status and body (JSON, or `Null`).
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub body: Value,
}

impl Answer {
    pub fn ok(&self) -> bool {
        self.status.is_success()
    }

    /// The API's error message and its field details, for people.
    pub fn error_lines(&self) -> Vec<String> {
        let e = &self.body["error"];
        let mut lines = vec![e["message"].as_str().map_or_else(
            || format!("the controller answered {}", self.status),
            str::to_owned,
        )];
        for d in e["details"].as_array().into_iter().flatten() {
            lines.push(format!(
                "{}: {}",
                d["field"].as_str().unwrap_or("?"),
                d["message"].as_str().unwrap_or("?")
            ));
        }
        lines
    }
}

impl Viewer {
    pub fn can_write(&self) -> bool {
        self.role >= Role::Operator
    }

    pub fn admin(&self) -> bool {
        self.role >= Role::Admin
    }

    fn request(&self, method: Method, uri: &str, body: Option<&Value>) -> axum::extract::Request {
        let mut b = axum::http::Request::builder()
            .method(method)
            .uri(uri)
            .header(header::AUTHORIZATION, format!("Bearer {}", self.token));
        if let Some(f) = &self.forwarded {
            b = b.header("x-forwarded-for", f.clone());
        }
        let body = match body {
            Some(v) => {
                b = b.header(header::CONTENT_TYPE, "application/json");
                Body::from(v.to_string())
            }
            None => Body::empty(),
        };
        let mut req = b
            .body(body)
            .unwrap_or_else(|_| axum::http::Request::new(Body::empty()));
        if let Some(c) = self.connect {
            req.extensions_mut().insert(c);
        }
        if let Some(id) = &self.request_id {
            req.extensions_mut().insert(id.clone());
        }
        req
    }

    /// Calls the API as this person.
    pub async fn call(
        &self,
        ui: &Ui,
        method: Method,
        uri: &str,
        body: Option<&Value>,
        if_match: Option<i64>,
    ) -> Answer {
        let mut req = self.request(method, uri, body);
        if let Some(v) = if_match {
            req.headers_mut()
                .insert(header::IF_MATCH, crate::routes::etag(v));
        }
        let resp = match tower::ServiceExt::oneshot(ui.api.clone(), req).await {
            Ok(r) => r,
            Err(e) => match e {},
        };
        let status = resp.status();
        let limited = http_body_util::Limited::new(resp.into_body(), MAX_API_BODY);
        let body = match limited.collect().await {
            Ok(b) => serde_json::from_slice(&b.to_bytes()).unwrap_or(Value::Null),
            Err(_) => Value::Null,
        };
        Answer { status, body }
    }

    /// GET, the body when it succeeded.
    pub async fn get(&self, ui: &Ui, uri: &str) -> Option<Value> {
        let a = self.call(ui, Method::GET, uri, None, None).await;
        a.ok().then_some(a.body)
    }
}

// ----- login, logout -----

#[derive(Debug, serde::Deserialize)]
struct LoginForm {
    email: String,
    password: String,
    csrf: String,
    next: Option<String>,
}

/// `next` if it is a page of the dashboard, the overview otherwise (never elsewhere: an open
/// redirect would make the login page a phishing tool).
fn after_login(next: Option<&str>) -> &str {
    match next {
        Some(n)
            if n.starts_with("/ui/")
                && !n.starts_with("/ui//")
                && !n.contains('\\')
                && n.len() <= 512 =>
        {
            n
        }
        _ => "/ui/",
    }
}

/// The API's per-client limit on logins, and the client's address, for the dashboard's login.
struct LoginGate(std::net::IpAddr);

impl FromRequestParts<Ui> for LoginGate {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, ui: &Ui) -> Result<Self, Response> {
        crate::routes::auth::AuthRateLimited::from_request_parts(parts, &ui.app)
            .await
            .map_err(|e| {
                let text = e.message.clone();
                let mut r =
                    pages::login_form(e.status, Some(&text), None, "", ui.app.tls.get().is_some());
                if let Some(s) = e.retry_after {
                    r.headers_mut()
                        .insert(header::RETRY_AFTER, HeaderValue::from(s));
                }
                r
            })?;
        Ok(Self(crate::app::client_ip(
            parts,
            &ui.app.config.trusted_proxies,
        )))
    }
}

async fn login(
    State(ui): State<Ui>,
    ip: LoginGate,
    headers: HeaderMap,
    axum::Form(f): axum::Form<LoginForm>,
) -> Response {
    let tls = ui.app.tls.get().is_some();
    if !cookie(&headers, LOGIN_COOKIE).is_some_and(|c| same(c, &f.csrf)) {
        return pages::login_form(
            StatusCode::FORBIDDEN,
            Some("The login form expired or did not come from this controller: try again."),
            f.next.as_deref(),
            &f.email,
            tls,
        );
    }
    if f.email.len() > 320 || f.password.len() > 1024 {
        return pages::login_form(
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("Wrong email or password."),
            f.next.as_deref(),
            "",
            tls,
        );
    }
    crate::server::follow_signing_key(&ui.app).await;
    let (user, _role) =
        match crate::routes::auth::authenticate(&ui.app, &f.email, f.password, ip.0).await {
            Ok(u) => u,
            Err(e) => {
                let status = e.status;
                let text = match status {
                    StatusCode::UNAUTHORIZED => "Wrong email or password.".to_owned(),
                    _ => e.message.clone(),
                };
                return pages::login_form(status, Some(&text), f.next.as_deref(), &f.email, tls);
            }
        };
    let secret = a::b64url(&a::random_bytes::<32>());
    let csrf = a::b64url(&a::random_bytes::<24>());
    let made = async {
        let mut tx = ui.app.store.begin().await?;
        sessions::create(
            &mut tx,
            &a::sha256(secret.as_bytes()),
            user.id,
            &csrf,
            now_ms(),
        )
        .await?;
        crate::store::Store::audit(
            &mut tx,
            &crate::store::Actor {
                id: Some(user.id),
                name: user.email.clone(),
                source: ip.0.to_string(),
            },
            "auth.login",
            &format!("user/{}", user.id),
            serde_json::json!({ "via": "dashboard" }),
        )
        .await?;
        tx.commit().await
    };
    if let Err(e) = made.await {
        return crate::error::ApiError::from(e).into_response();
    }
    let mut r = redirect(after_login(f.next.as_deref()));
    let h = r.headers_mut();
    h.append(
        header::SET_COOKIE,
        set_cookie(COOKIE, &secret, sessions::MAX_MS / 1000, tls),
    );
    h.append(header::SET_COOKIE, set_cookie(LOGIN_COOKIE, "", 0, tls));
    r
}

#[derive(Debug, serde::Deserialize)]
pub struct CsrfOnly {
    csrf: String,
}

async fn logout(State(ui): State<Ui>, v: Viewer, axum::Form(f): axum::Form<CsrfOnly>) -> Response {
    if !same(&f.csrf, &v.csrf) {
        return forged();
    }
    let ended = async {
        let mut conn = ui.app.store.conn().await?;
        sessions::end(&mut conn, &v.session_hash).await
    };
    if let Err(e) = ended.await {
        return crate::error::ApiError::from(e).into_response();
    }
    let audit = crate::store::Audit::new(
        crate::store::Actor {
            id: Some(v.user.id),
            name: v.user.email.clone(),
            source: v.connect.map_or_else(String::new, |c| c.0.ip().to_string()),
        },
        "auth.logout",
        &format!("user/{}", v.user.id),
        serde_json::json!({ "via": "dashboard" }),
    );
    if let Err(e) = ui.app.store.audit_event(audit).await {
        return crate::error::ApiError::from(e).into_response();
    }
    let mut r = redirect("/ui/login");
    r.headers_mut()
        .append(header::SET_COOKIE, set_cookie(COOKIE, "", 0, v.tls));
    r
}

/// 403 for a post without its session's CSRF token.
pub fn forged() -> Response {
    page_response(
        StatusCode::FORBIDDEN,
        pages::bare(
            "Refused",
            maud::html! {
                p { "This form did not come from your session of this dashboard: nothing was changed." }
                p { a href="/ui/" { "Back to the overview" } }
            },
        ),
    )
}

/// 204 while the session lasts, 401 after: what the script asks when its stream is refused.
async fn session(v: Viewer) -> Response {
    let _ = v;
    let mut r = StatusCode::NO_CONTENT.into_response();
    secure_headers(r.headers_mut());
    r
}

// ----- the live stream -----

#[derive(Debug, serde::Deserialize)]
struct StreamQuery {
    kind: Option<String>,
    site: Option<String>,
}

/// The API's event stream for the session's user: `EventSource` cannot send an
/// `Authorization` header, so the page's script opens this, with the session's cookie.
async fn stream(
    State(ui): State<Ui>,
    v: Viewer,
    headers: HeaderMap,
    axum::extract::Query(q): axum::extract::Query<StreamQuery>,
) -> Response {
    let mut uri = String::from("/api/v1/events/stream?");
    if let Some(k) = &q.kind {
        uri.push_str(&format!("kind={}&", pages::url_encode(k)));
    }
    if let Some(s) = &q.site {
        uri.push_str(&format!("site={}&", pages::url_encode(s)));
    }
    let mut req = v.request(Method::GET, &uri, None);
    if let Some(last) = headers.get("last-event-id") {
        req.headers_mut().insert("last-event-id", last.clone());
    }
    match tower::ServiceExt::oneshot(ui.api.clone(), req).await {
        Ok(mut r) => {
            secure_headers(r.headers_mut());
            r
        }
        Err(e) => match e {},
    }
}

/// `Path<i64>` for pages: a malformed id is a 404 page, not a JSON error.
#[derive(Debug)]
pub struct PageId(pub i64);

impl FromRequestParts<Ui> for PageId {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, ui: &Ui) -> Result<Self, Response> {
        match Path::<i64>::from_request_parts(parts, ui).await {
            Ok(Path(id)) => Ok(Self(id)),
            Err(_) => Err(page_response(
                StatusCode::NOT_FOUND,
                pages::bare("Not found", maud::html! { p { "There is no such page." } }),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_login_sends_back_only_to_dashboard_pages() {
        assert_eq!(after_login(Some("/ui/sites/3")), "/ui/sites/3");
        for bad in [
            "https://evil.example/",
            "//evil.example/ui/",
            "/ui//evil.example",
            "/api/v1/sites",
            "/ui/\\evil",
        ] {
            assert_eq!(after_login(Some(bad)), "/ui/", "{bad}");
        }
        assert_eq!(after_login(None), "/ui/");
    }

    #[test]
    fn cookies_are_found_by_name_among_others() {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; patronus_session=xyz; b=2"),
        );
        assert_eq!(cookie(&h, COOKIE), Some("xyz"));
        assert_eq!(cookie(&h, "patronus"), None);
        assert!(same("abc", "abc") && !same("abc", "abd") && !same("abc", "ab"));
    }
}
