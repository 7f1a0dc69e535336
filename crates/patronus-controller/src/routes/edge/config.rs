//! `/api/v1/edge/config`: an edge's configuration, whole or as a delta, with a long poll.

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::app::AppState;
use crate::error::{ApiError, extract};
use crate::routes::edge::SiteCaller;

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(edge_config))
        .routes(routes!(edge_config_delta))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ConfigQuery {
    /// With `If-None-Match`: hold the request up to this many seconds (at most 25) until the
    /// configuration changes, then answer at once (a long poll: a change reaches the edge
    /// without polling delay).
    #[param(minimum = 0, maximum = 25)]
    pub wait: Option<u64>,
}

/// The longest a long poll is held (below the request timeout).
pub const MAX_WAIT_S: u64 = 25;

#[utoipa::path(
    get,
    path = "/api/v1/edge/config",
    tag = "enrolment",
    summary = "The calling edge's configuration (site credential). ETag is its version; with \
               If-None-Match it answers 304 when nothing changed, after waiting up to `wait` s.",
    params(ConfigQuery),
    security(("site" = [])),
    responses(
        (status = 200, body = patronus_api::SiteConfig),
        (status = 304, description = "Unchanged since the version in If-None-Match"),
        crate::error::NotFound
    )
)]
async fn edge_config(
    State(s): State<AppState>,
    site: SiteCaller,
    headers: HeaderMap,
    extract::Query(q): extract::Query<ConfigQuery>,
) -> Result<Response, ApiError> {
    let _heard = s.heard_from(site.site_id);
    let seen = headers
        .get(header::IF_NONE_MATCH)
        .map(|v| v.as_bytes().to_vec());
    if let Some(seen) = &seen {
        s.holds(site.site_id, seen);
    }
    match next_config(&s, &site, seen.as_deref(), q.wait).await? {
        Next::Unchanged(tag) => not_modified(&s, tag),
        Next::Changed(c, tag) => {
            s.holds(site.site_id, tag.as_bytes());
            let mut r = ([(header::CONTENT_TYPE, "application/json")], c.to_json()).into_response();
            r.headers_mut().insert(header::ETAG, tag);
            Ok(with_stun_port(&s, r))
        }
    }
}

#[utoipa::path(
    get,
    path = "/api/v1/edge/config/delta",
    tag = "enrolment",
    summary = "What changed in the calling edge's configuration since the version in \
               If-None-Match (required), after waiting up to `wait` s: 304 when nothing did; \
               409 when the controller no longer has that version (fetch the whole \
               configuration then).",
    params(ConfigQuery),
    security(("site" = [])),
    responses(
        (status = 200, body = patronus_api::ConfigDelta),
        (status = 304, description = "Unchanged since the version in If-None-Match"),
        crate::error::NotFound,
        crate::error::Conflict
    )
)]
async fn edge_config_delta(
    State(s): State<AppState>,
    site: SiteCaller,
    headers: HeaderMap,
    extract::Query(q): extract::Query<ConfigQuery>,
) -> Result<Response, ApiError> {
    let _heard = s.heard_from(site.site_id);
    let seen = headers
        .get(header::IF_NONE_MATCH)
        .ok_or_else(|| {
            ApiError::field(
                "If-None-Match",
                "name the version the delta applies to (the ETag you hold)",
            )
        })?
        .as_bytes()
        .to_vec();
    s.holds(site.site_id, &seen);
    match next_config(&s, &site, Some(&seen), q.wait).await? {
        Next::Unchanged(tag) => not_modified(&s, tag),
        Next::Changed(c, tag) => {
            let base = s.previous_config(site.site_id, &seen).ok_or_else(|| {
                ApiError::new(
                    StatusCode::CONFLICT,
                    "base_unknown",
                    "the controller no longer has the version you hold: fetch \
                     /api/v1/edge/config",
                )
            })?;
            s.holds(site.site_id, tag.as_bytes());
            let mut r = (
                [(header::CONTENT_TYPE, "application/json")],
                c.delta_from(&base),
            )
                .into_response();
            r.headers_mut().insert(header::ETAG, tag);
            Ok(with_stun_port(&s, r))
        }
    }
}

/// `r` with the port this controller answers STUN on ([`crate::stun::PORT_HEADER`]), if it
/// does: the edge asks there, at the address it reached the API at.
fn with_stun_port(s: &AppState, mut r: Response) -> Response {
    if let Some(p) = s.stun_port.get() {
        r.headers_mut()
            .insert(crate::stun::PORT_HEADER, HeaderValue::from(*p));
    }
    r
}

/// What a (long) poll for a configuration found.
enum Next {
    /// Still the version the edge holds (its ETag).
    Unchanged(HeaderValue),
    /// Another one, and its ETag.
    Changed(crate::compile::Compiled, HeaderValue),
}

fn no_config(site: &SiteCaller) -> ApiError {
    ApiError::not_found(format!(
        "a configuration for site {} (is it active?)",
        site.site
    ))
}

fn not_modified(s: &AppState, tag: HeaderValue) -> Result<Response, ApiError> {
    let mut r = StatusCode::NOT_MODIFIED.into_response();
    r.headers_mut().insert(header::ETAG, tag);
    Ok(with_stun_port(s, r))
}

/// The site's configuration once it differs from `seen` (an ETag), waiting up to `wait`
/// seconds for a change.
async fn next_config(
    s: &AppState,
    site: &SiteCaller,
    seen: Option<&[u8]>,
    wait: Option<u64>,
) -> Result<Next, ApiError> {
    let wait = wait.unwrap_or(0);
    if wait > MAX_WAIT_S {
        return Err(ApiError::field(
            "wait",
            format!("must be at most {MAX_WAIT_S}"),
        ));
    }
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(wait);
    // Subscribed before the first look, so that a change between the look and the wait is
    // not missed.
    let mut changes = s.store.watch_generation();
    let mut stopping = s.stopping.subscribe();
    // When the last change this poll waited for arrived: a change it then sends is a push.
    let mut woke: Option<std::time::Instant> = None;
    loop {
        let configs = s.configs().await?;
        let c = configs.get(&site.site_id).ok_or_else(|| no_config(site))?;
        let etag = c.etag();
        let tag = HeaderValue::from_str(&etag).map_err(ApiError::internal)?;
        if seen != Some(etag.as_bytes()) {
            if let Some(at) = woke {
                s.push_lag.observe(at.elapsed());
            }
            return Ok(Next::Changed(c.clone(), tag));
        }
        if tokio::time::Instant::now() >= deadline || *stopping.borrow() {
            return Ok(Next::Unchanged(tag));
        }
        let _held = LongPoll::held(s);
        let timed_out = tokio::select! {
            r = changes.changed() => r.is_err(),
            _ = tokio::time::sleep_until(deadline) => true,
            // Shutting down: answered now, so that the edge asks another controller.
            _ = stopping.wait_for(|v| *v) => true,
        };
        if timed_out {
            return Ok(Next::Unchanged(tag));
        }
        woke = Some(std::time::Instant::now());
    }
}

/// Counts a long poll in [`crate::app::Inner::long_polls`] while it waits (however it ends).
struct LongPoll<'a>(&'a AppState);

impl<'a> LongPoll<'a> {
    fn held(s: &'a AppState) -> Self {
        s.long_polls
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Self(s)
    }
}

impl Drop for LongPoll<'_> {
    fn drop(&mut self) {
        self.0
            .long_polls
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}
