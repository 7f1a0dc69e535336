//! The HTTP application: state, the router, and what wraps every request (request id, log line,
//! timeout, body limit, the JSON 404/405).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::extract::connect_info::MockConnectInfo;
use axum::extract::{ConnectInfo, DefaultBodyLimit, FromRequestParts, MatchedPath, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};

use crate::auth::{Lockout, RateLimiter, Role, Tokens};
use crate::config::Config;
use crate::error::ApiError;
use crate::store::{Actor, Store, UserRow};

/// Everything a handler may need.
#[derive(Debug, Clone)]
pub struct AppState(Arc<Inner>);

#[derive(Debug)]
pub struct Inner {
    pub config: Config,
    pub store: Store,
    pub tokens: Tokens,
    pub auth_limiter: RateLimiter,
    pub lockout: Lockout,
    pub http: crate::metrics::HttpMetrics,
    /// Every site's configuration, compiled once per configuration generation (the store's).
    pub compiled: tokio::sync::Mutex<Option<CompiledAt>>,
    /// Compiles that read the sites, and compiles that kept the ones read before (only
    /// settings changed): `patronus_config_compiles_total`.
    pub compiles: [std::sync::atomic::AtomicU64; 2],
    /// The generations compiled before that one, newest first (at most
    /// [`KEPT_GENERATIONS`]): what edges a few changes behind hold, for deltas. They share
    /// every fragment that did not change with the newer ones.
    pub previous: std::sync::Mutex<std::collections::VecDeque<Compiled>>,
    /// What this controller has heard of each site's edge (see [`crate::presence`]).
    pub presence: std::sync::Mutex<std::collections::HashMap<i64, crate::presence::Heard>>,
    /// Wakes the presence writer: an edge was newly heard from.
    pub presence_wake: tokio::sync::Notify,
    /// The database's clock less this machine's (ms), as last read: presence is written and
    /// compared in the database's time.
    pub clock_offset_ms: std::sync::atomic::AtomicI64,
    /// The latest measurement of each path (by path id), as an edge at one of its ends
    /// reported it.
    pub live: std::sync::Mutex<std::collections::HashMap<String, LivePath>>,
    /// Which of those measurements the history keeps (see [`crate::sampling`]).
    pub sampler: crate::sampling::Sampler,
    /// What this controller's scheduled backups did (for `/metrics`).
    pub backups: std::sync::Mutex<crate::backup::Status>,
    /// Configuration long polls held now, waiting for a change.
    pub long_polls: std::sync::atomic::AtomicUsize,
    /// Event streams served now (`/api/v1/events/stream`).
    pub event_streams: std::sync::atomic::AtomicUsize,
    /// Every new event, read from the store once and prepared for every stream
    /// ([`crate::routes::events`]); its reader starts with the first stream.
    pub event_tail: tokio::sync::broadcast::Sender<Arc<crate::routes::events::Tail>>,
    pub event_tail_started: std::sync::Once,
    /// True once the controller is shutting down: held long polls answer at once (their
    /// edges go to another controller instead of waiting on one that is leaving).
    pub stopping: tokio::sync::watch::Sender<bool>,
    /// The TLS client of `https://` webhooks.
    pub webhook_tls: Arc<rustls::ClientConfig>,
    /// What the STUN responder did (see [`crate::stun`]).
    pub stun: crate::stun::StunMetrics,
    /// The UDP port the STUN responder answers on, once it does: told to edges with their
    /// configuration ([`crate::stun::PORT_HEADER`]).
    pub stun_port: std::sync::OnceLock<u16>,
    /// Webhook delivery attempts by outcome: delivered, to be retried, given up (`failed`).
    pub webhook_attempts: [std::sync::atomic::AtomicU64; 3],
    /// From this controller learning of a configuration change to its sending to an edge that
    /// was waiting for it (`patronus_config_push_seconds`).
    pub push_lag: crate::metrics::Timing,
    /// The configuration version each site's edge holds, as it last said (the ETag of its
    /// last request for its configuration) or was last sent: `patronus_site_config_current`.
    pub held: std::sync::Mutex<std::collections::HashMap<i64, Vec<u8>>>,
    /// The API's TLS (its certificate), set by [`crate::server::prepare`] unless `plain_http`.
    pub tls: std::sync::OnceLock<Arc<crate::https::ServerTls>>,
}

/// A path's latest reported measurement.
#[derive(Debug, Clone)]
pub struct LivePath {
    pub state: patronus_api::PathState,
    pub rtt_ms: Option<f64>,
    pub jitter_ms: f64,
    pub loss_pct: f64,
    /// Whether the reporting edge sends through the relay.
    pub relayed: bool,
    /// Unix seconds.
    pub at: i64,
}

/// Compiled generations kept for deltas besides the newest. An edge holds a version it was
/// sent, and asks again as soon as it applied it; during a mass enrolment several generations
/// are compiled meanwhile. One that fell further behind fetches its configuration whole (409).
/// Each costs its tables (about 0.3 KB a site), not the peers it shares with the newest.
pub const KEPT_GENERATIONS: usize = 16;

/// A report older than this says nothing about the path now: its fields read `null`.
pub const LIVE_FOR_S: i64 = 30;

/// Every site's compiled configuration, by site id.
pub type Compiled = Arc<std::collections::HashMap<i64, crate::compile::Compiled>>;

/// The newest compile: its generation, and the sites it read (at `sites_read_at`, a generation
/// no newer than when they were read), which the next compile keeps while no change since
/// touched them.
#[derive(Debug)]
pub struct CompiledAt {
    pub generation: i64,
    pub configs: Compiled,
    sites: Arc<Vec<crate::routes::sites::SiteView>>,
    sites_read_at: i64,
}

impl std::ops::Deref for AppState {
    type Target = Inner;

    fn deref(&self) -> &Inner {
        &self.0
    }
}

impl AppState {
    /// Every site's configuration as of now: compiled at most once per change, however many
    /// edges ask.
    ///
    /// Any compilation that began after this call did is recent enough for it: under a burst
    /// of changes (a mass enrolment: every new site and every new key is a generation) the
    /// callers waiting on the lock share the one compiled meanwhile, instead of each compiling
    /// the generation of its own moment in turn.
    pub async fn configs(&self) -> Result<Compiled, ApiError> {
        let wanted = self.store.generation();
        let mut cache = self.compiled.lock().await;
        if let Some(c) = &*cache {
            if c.generation >= wanted {
                return Ok(c.configs.clone());
            }
        }
        // Read before the snapshot: what is compiled is at least this generation. Then what
        // touched the sites, read after it: a change of the sites marks itself before it
        // commits (`crate::store::Touches`), so one in this generation is seen.
        let generation = self.store.generation();
        let touched = self.store.sites_touched();
        let kept = cache
            .as_ref()
            .filter(|c| c.sites_read_at >= touched)
            .map(|c| (c.sites.clone(), c.sites_read_at));
        let (net, sites_read_at) = match kept {
            Some((sites, at)) => (
                crate::compile::Network::load_reusing(&self.store, Some(sites)).await?,
                at,
            ),
            None => (
                crate::compile::Network::load(&self.store).await?,
                generation,
            ),
        };
        self.compiles[usize::from(sites_read_at != generation)]
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let all: Compiled = Arc::new(
            crate::compile::compile_reusing(&net, cache.as_ref().map(|c| &*c.configs))?
                .into_iter()
                .map(|c| (c.site_id, c))
                .collect(),
        );
        let next = CompiledAt {
            generation,
            configs: all.clone(),
            sites: net.sites,
            sites_read_at,
        };
        if let Some(old) = cache.replace(next) {
            let mut prev = self.previous.lock().unwrap_or_else(|e| e.into_inner());
            prev.push_front(old.configs);
            prev.truncate(KEPT_GENERATIONS);
        }
        Ok(all)
    }

    /// Site `id`'s edge holds configuration version `etag` (as it says, or as it was sent).
    pub fn holds(&self, id: i64, etag: &[u8]) {
        let mut h = self.held.lock().unwrap_or_else(|e| e.into_inner());
        match h.get_mut(&id) {
            Some(v) if v.as_slice() == etag => {}
            Some(v) => {
                v.clear();
                v.extend_from_slice(etag);
            }
            None => {
                h.insert(id, etag.to_vec());
            }
        }
    }

    /// Site `id`'s configuration of a generation compiled before the newest, if its ETag is
    /// `etag`.
    pub fn previous_config(&self, id: i64, etag: &[u8]) -> Option<crate::compile::Compiled> {
        let prev = self.previous.lock().unwrap_or_else(|e| e.into_inner());
        prev.iter()
            .filter_map(|g| g.get(&id))
            .find(|c| c.etag().as_bytes() == etag)
            .cloned()
    }

    /// The latest report of every path. A panic elsewhere while the map was locked cannot have
    /// left it half-written (each report is one insert), so a poisoned lock still gives what the
    /// edges reported, never an empty map in its place.
    pub fn live_paths(&self) -> std::collections::HashMap<String, LivePath> {
        self.live.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn new(
        config: Config,
        store: Store,
        key: &[u8],
        webhook_tls: Arc<rustls::ClientConfig>,
    ) -> Self {
        Self(Arc::new(Inner {
            tokens: Tokens::new(key, config.access_token_ttl, config.refresh_token_ttl),
            auth_limiter: RateLimiter::new(config.auth_rate_per_minute),
            lockout: Lockout::new(config.lockout_after_failures),
            http: crate::metrics::HttpMetrics::default(),
            compiled: tokio::sync::Mutex::new(None),
            compiles: Default::default(),
            previous: std::sync::Mutex::new(std::collections::VecDeque::new()),
            presence: std::sync::Mutex::new(std::collections::HashMap::new()),
            presence_wake: tokio::sync::Notify::new(),
            clock_offset_ms: std::sync::atomic::AtomicI64::new(0),
            live: std::sync::Mutex::new(std::collections::HashMap::new()),
            sampler: crate::sampling::Sampler::default(),
            long_polls: std::sync::atomic::AtomicUsize::new(0),
            event_streams: std::sync::atomic::AtomicUsize::new(0),
            event_tail: tokio::sync::broadcast::channel(crate::routes::events::TAIL_CAPACITY).0,
            event_tail_started: std::sync::Once::new(),
            stopping: tokio::sync::watch::Sender::new(false),
            backups: std::sync::Mutex::new(crate::backup::Status::default()),
            webhook_tls,
            tls: std::sync::OnceLock::new(),
            webhook_attempts: Default::default(),
            push_lag: Default::default(),
            held: Default::default(),
            stun: crate::stun::StunMetrics::default(),
            stun_port: std::sync::OnceLock::new(),
            config,
            store,
        }))
    }
}

/// The request's id: the client's `X-Request-Id` if it is a sane one, else a new one. It is in
/// the response's `X-Request-Id` and in the log line.
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

/// The calling client's address: the TCP peer's, or, when the peer is one of the
/// `trusted_proxies`, the address the proxies say they forwarded for (`Forwarded`, RFC 7239,
/// else `X-Forwarded-For`): the nearest hop that is not itself a trusted proxy. What an
/// untrusted peer writes in those headers is ignored, so nobody can choose their own rate-limit
/// bucket or audit address.
pub fn client_ip(parts: &Parts, trusted_proxies: &[patronus_api::Prefix]) -> IpAddr {
    let ext = &parts.extensions;
    let peer = ext
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip())
        .or_else(|| ext.get::<MockConnectInfo<SocketAddr>>().map(|c| c.0.ip()))
        .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
    let trusted = |ip: IpAddr| trusted_proxies.iter().any(|p| p.contains(ip));
    if !trusted(peer) {
        return peer;
    }
    let forwarded = forwarded_for(&parts.headers);
    // From the nearest hop outwards: each trusted proxy vouches for the one before it.
    let mut client = peer;
    for hop in forwarded.iter().rev() {
        match hop {
            Some(ip) => {
                client = *ip;
                if !trusted(*ip) {
                    break;
                }
            }
            // `unknown` or an obfuscated name: the proxy knows no more than itself.
            None => break,
        }
    }
    client
}

/// The hops a request was forwarded for, oldest first: from `Forwarded` (RFC 7239) if present,
/// else `X-Forwarded-For`. A hop that is not an address (`unknown`, `_hidden`) is `None`.
fn forwarded_for(headers: &axum::http::HeaderMap) -> Vec<Option<IpAddr>> {
    let values = |name: &str| -> Vec<String> {
        headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
            .take(64)
            .collect()
    };
    let node = |raw: &str| -> Option<IpAddr> {
        let raw = raw.trim().trim_matches('"');
        if let Some(rest) = raw.strip_prefix('[') {
            return rest.split(']').next()?.parse().ok();
        }
        raw.parse()
            .ok()
            .or_else(|| raw.rsplit_once(':').and_then(|(ip, _)| ip.parse().ok()))
    };
    let forwarded = values("forwarded");
    if !forwarded.is_empty() {
        return forwarded
            .iter()
            .map(|element| {
                element.split(';').find_map(|pair| {
                    let (k, v) = pair.split_once('=')?;
                    k.trim().eq_ignore_ascii_case("for").then(|| node(v))?
                })
            })
            .collect();
    }
    values("x-forwarded-for").iter().map(|v| node(v)).collect()
}

/// Who is calling: a user (with an access token) or an API key.
#[derive(Debug, Clone)]
pub enum Subject {
    User(UserRow),
    ApiKey { id: i64, name: String },
}

/// An authenticated caller: a valid access token of an enabled user, or a valid API key. The
/// role is the user's current one (read with every request) or the key's.
#[derive(Debug, Clone)]
pub struct Principal {
    pub subject: Subject,
    pub role: Role,
    pub ip: IpAddr,
}

impl Principal {
    /// 403 unless the caller has at least `role`.
    pub fn require(&self, role: Role) -> Result<(), ApiError> {
        if self.role >= role {
            Ok(())
        } else {
            Err(ApiError::forbidden(format!(
                "this needs the {} role; you are {}",
                role.as_str(),
                self.role.as_str()
            )))
        }
    }

    /// The calling user's id (none for an API key).
    pub fn user_id(&self) -> Option<i64> {
        match &self.subject {
            Subject::User(u) => Some(u.id),
            Subject::ApiKey { .. } => None,
        }
    }

    pub fn actor(&self) -> Actor {
        let (id, name) = match &self.subject {
            Subject::User(u) => (Some(u.id), u.email.clone()),
            Subject::ApiKey { id, name } => (None, format!("api-key/{id} ({name})")),
        };
        Actor {
            id,
            name,
            source: self.ip.to_string(),
        }
    }
}

/// The bearer token of a request, or 401.
pub fn bearer(parts: &Parts) -> Result<&str, ApiError> {
    parts
        .headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| {
            ApiError::unauthorized("authentication required: Authorization: Bearer <token>")
        })
}

impl FromRequestParts<AppState> for Principal {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let ip = client_ip(parts, &state.config.trusted_proxies);
        let token = bearer(parts)?;
        if token.starts_with(crate::routes::edge::CREDENTIAL_PREFIX) {
            return Err(ApiError::forbidden(
                "a site's credential is for its edge's own configuration (/api/v1/edge/...)",
            ));
        }
        if token.starts_with(crate::routes::api_keys::PREFIX) {
            let (id, name, role) = crate::routes::api_keys::check(&state.store, token)
                .await?
                .ok_or_else(|| {
                    ApiError::invalid_token("the API key is invalid, revoked or expired")
                })?;
            return Ok(Self {
                subject: Subject::ApiKey { id, name },
                role,
                ip,
            });
        }
        // The key recorded in the database is read on every request with a user's token, so
        // that no token signed with a key replaced by `rotate-secrets` is taken, not even in
        // the seconds before this controller's next look (one small read; API keys and site
        // credentials are looked up in the database anyway).
        let recorded = crate::store::settings::signing_key(&mut *state.store.conn().await?).await?;
        if recorded.is_some_and(|r| r != state.tokens.fingerprint()) {
            crate::server::follow_signing_key(state).await;
        }
        let id = state
            .tokens
            .check_access(token)
            .ok_or_else(|| ApiError::invalid_token("the access token is invalid or expired"))?;
        let user = state
            .store
            .user(id)
            .await?
            .filter(|u| !u.disabled)
            .ok_or_else(|| ApiError::invalid_token("the access token is invalid or expired"))?;
        let role = Role::parse(&user.role).ok_or_else(|| {
            ApiError::internal(format!("user {} has role {}", user.id, user.role))
        })?;
        Ok(Self {
            subject: Subject::User(user),
            role,
            ip,
        })
    }
}

/// A caller with at least the operator role, or 403 before anything else of the request is
/// read: a caller without the role learns nothing from the body's validation. Its operation
/// documents the role as its security requirement's scope (OpenAPI 3.1 lets a non-OAuth scheme
/// list role names there), and a test checks every operation against it.
#[derive(Debug, Clone)]
pub struct Operator(pub Principal);

/// A caller with the admin role, or 403 before anything else of the request is read.
#[derive(Debug, Clone)]
pub struct Admin(pub Principal);

impl FromRequestParts<AppState> for Operator {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let p = Principal::from_request_parts(parts, state).await?;
        p.require(Role::Operator)?;
        Ok(Self(p))
    }
}

impl FromRequestParts<AppState> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let p = Principal::from_request_parts(parts, state).await?;
        p.require(Role::Admin)?;
        Ok(Self(p))
    }
}

/// A caller acting on the user its path names (`/users/{id}...`): that user, or an admin; 403
/// before the body is read. Its operations document `admin`, the role that may act on anyone.
#[derive(Debug, Clone)]
pub struct UserOrAdmin {
    pub principal: Principal,
    /// The user the path names.
    pub id: i64,
    /// The caller is that user.
    pub own: bool,
}

impl FromRequestParts<AppState> for UserOrAdmin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let principal = Principal::from_request_parts(parts, state).await?;
        let crate::error::extract::Path(id) =
            crate::error::extract::Path::<i64>::from_request_parts(parts, state).await?;
        let own = principal.user_id() == Some(id);
        if !own {
            principal.require(Role::Admin)?;
        }
        Ok(Self { principal, id, own })
    }
}

/// The routes and the OpenAPI document, from the same registrations: a handler is served only
/// if it is documented (`#[utoipa::path]` + `routes!`), so the two cannot drift.
pub fn routes_and_document() -> (Router<AppState>, utoipa::openapi::OpenApi) {
    use utoipa::OpenApi as _;
    let (routes, doc) =
        utoipa_axum::router::OpenApiRouter::with_openapi(crate::docs::ApiDoc::openapi())
            .merge(crate::routes::system::routes())
            .merge(crate::routes::auth::routes())
            .merge(crate::routes::users::routes())
            .merge(crate::routes::sites::routes())
            .merge(crate::routes::topology::routes())
            .merge(crate::routes::paths::routes())
            .merge(crate::routes::sla_classes::routes())
            .merge(crate::routes::policies::routes())
            .merge(crate::routes::failover::routes())
            .merge(crate::routes::api_keys::routes())
            .merge(crate::routes::audit::routes())
            .merge(crate::routes::events::routes())
            .merge(crate::routes::enroll::routes())
            .merge(crate::routes::edge::routes())
            .merge(crate::routes::webhooks::routes())
            .merge(crate::routes::traffic::routes())
            .split_for_parts();
    (routes, doc)
}

/// The OpenAPI document, as served.
pub fn document() -> serde_json::Value {
    crate::docs::finish(routes_and_document().1)
}

/// The whole API, and the dashboard (`/ui`, [`crate::ui`]), which calls the API's routes as
/// its users.
pub fn router(state: AppState) -> Router {
    let limit = state.config.max_body_bytes;
    let (routes, _) = routes_and_document();
    let api = routes
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "this route does not take that method",
            )
        })
        .with_state(state.clone());
    crate::ui::routes(state.clone(), api.clone())
        .merge(api)
        .layer(DefaultBodyLimit::max(limit))
        .layer(middleware::from_fn_with_state(state.clone(), around))
}

tokio::task_local! {
    /// The id of the request this task answers: audit records carry it.
    static REQUEST_ID: String;
}

/// The id of the request the current task answers, if it answers one.
pub fn current_request_id() -> Option<String> {
    REQUEST_ID.try_with(Clone::clone).ok()
}

/// A request taking longer than this is logged at WARN (the long poll excepted: it waits on
/// purpose).
pub const SLOW_REQUEST: std::time::Duration = std::time::Duration::from_secs(2);

/// Request id, timeout, metrics and the log line, around every request.
///
/// A write (any method but GET, HEAD and OPTIONS) runs to its end in a task of its own: a client
/// that hangs up cannot cut a write between its commit and its log line, nor roll back a change
/// half-way through the handler's work.
async fn around(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    let started = Instant::now();
    let id = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| {
            !v.is_empty()
                && v.len() <= 64
                && v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        })
        .map(str::to_owned)
        .unwrap_or_else(|| crate::auth::b64url(&crate::auth::random_bytes::<12>()));
    req.extensions_mut().insert(RequestId(id.clone()));
    let method = req.method().clone();
    let write = !matches!(
        method,
        axum::http::Method::GET | axum::http::Method::HEAD | axum::http::Method::OPTIONS
    );
    // The route's pattern (`/api/v1/users/{id}`), never the raw path or query.
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".into());
    let timeout = state.config.request_timeout;
    let work = REQUEST_ID.scope(id.clone(), async move {
        match tokio::time::timeout(timeout, next.run(req)).await {
            Ok(r) => r,
            Err(_) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "timeout",
                "the request took longer than the controller allows",
            )
            .into_response(),
        }
    });
    let done = move |resp: Response| finish(&state, &id, &method, &route, started, resp);
    if write {
        match tokio::spawn(async move { done(work.await) }).await {
            Ok(r) => r,
            Err(e) => ApiError::internal(format!("the request's task failed: {e}")).into_response(),
        }
    } else {
        done(work.await)
    }
}

/// Counts an answered request and logs it: at DEBUG as a rule; a write that succeeded at INFO
/// (it changed something); a slow request and a server error at WARN.
fn finish(
    state: &AppState,
    id: &str,
    method: &axum::http::Method,
    route: &str,
    started: Instant,
    mut resp: Response,
) -> Response {
    if let Ok(v) = HeaderValue::from_str(id) {
        resp.headers_mut().insert("x-request-id", v);
    }
    let took = started.elapsed();
    let status = resp.status().as_u16();
    state.http.record(route, method.as_str(), status, took);
    let ms = took.as_secs_f64() * 1e3;
    let method = crate::metrics::method_label(method.as_str());
    let write = !matches!(method, "GET" | "HEAD" | "OPTIONS");
    let waits = route == "/api/v1/edge/config";
    if status >= 500 {
        tracing::warn!(request_id = %id, method, route, status, ms, "request failed");
    } else if took > SLOW_REQUEST && !waits {
        tracing::warn!(request_id = %id, method, route, status, ms, "slow request");
    } else if write && resp.status().is_success() {
        tracing::info!(request_id = %id, method, route, status, ms, "request");
    } else {
        tracing::debug!(request_id = %id, method, route, status, ms, "request");
    }
    resp
}
