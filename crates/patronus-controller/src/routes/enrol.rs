//! Enrolment: how an edge becomes a site's edge. An operator asks for a one-time, expiring token
//! for a site; the edge presents it once, with the public key it generated itself (the private
//! key never leaves the edge) and, optionally, its links' public endpoints; it receives a
//! credential of its own, which from then on authenticates it as that site and nothing else.
//!
//! Tokens and credentials are 32 random bytes, shown once, stored as SHA-256. A token is spent
//! by the same statement that checks it, so two edges racing with one token cannot both win;
//! enrolling again (a replaced machine) revokes the site's earlier credentials.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use patronus_api::WgPublicKey;
use serde::{Deserialize, Serialize};
use serde_json::json;
use sqlx::Row;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::app::{AppState, Operator, bearer};
use crate::auth::{self as a};
use crate::error::{ApiError, extract};
use crate::routes::auth::AuthRateLimited;
use crate::routes::sites::load_site;
use crate::store::{Actor, Store, now_s};

/// Prefix of an enrolment token.
pub const TOKEN_PREFIX: &str = "pet_";
/// Prefix of a site credential.
pub const CREDENTIAL_PREFIX: &str = "psc_";

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create_token))
        .routes(routes!(enroll))
        .routes(routes!(edge_config))
        .routes(routes!(edge_config_delta))
        .routes(routes!(telemetry))
        .routes(routes!(rotate_key))
        .routes(routes!(edge_key))
}

#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Rotation {
    pub site_id: i64,
    /// Rotations asked for this site so far; the edge rolls to a new key when it sees a number
    /// higher than the ones it has done.
    pub key_rotation: i64,
}

#[utoipa::path(
    post,
    path = "/api/v1/sites/{id}/rotate-key",
    tag = "enrolment",
    summary = "Ask the site's edge to roll to a new key pair (made on the edge); peers accept \
               both keys until it has.",
    params(("id" = i64, Path, description = "The site's id")),
    security(("bearer" = ["operator"])),
    responses((status = 202, body = Rotation), crate::error::ApiErrors)
)]
async fn rotate_key(
    State(s): State<AppState>,
    Operator(p): Operator,
    extract::Path(id): extract::Path<i64>,
) -> Result<Response, ApiError> {
    let site = load_site(&s.store, id).await?;
    if let Some(other) = rolling_neighbour(&s.store, id).await? {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "peer_rolling",
            format!("{other} is rolling its key: one roll at a time between connected sites"),
        ));
    }
    let mut tx = s.store.begin().await?;
    let r = sqlx::query(
        "UPDATE sites SET key_rotation = key_rotation + 1, version = version + 1, updated_at = ?
         WHERE id = ? AND public_key IS NOT NULL RETURNING key_rotation",
    )
    .bind(now_s())
    .bind(id)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(r) = r else {
        return Err(ApiError::conflict(format!(
            "site {} has no edge yet: enrol one first",
            site.name
        )));
    };
    let rotation: i64 = r.try_get("key_rotation")?;
    Store::audit(
        &mut tx,
        &p.actor(),
        "site.rotate_key",
        &format!("site/{id}"),
        json!({ "site": site.name, "key_rotation": rotation }),
    )
    .await?;
    tx.commit().await?;
    let body = Rotation {
        site_id: id,
        key_rotation: rotation,
    };
    Ok((StatusCode::ACCEPTED, axum::Json(body)).into_response())
}

/// An edge's step in rolling its key.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum KeyStep {
    /// The edge made this key pair and is about to use it: peers are told to accept it too.
    Next(WgPublicKey),
    /// The edge's sessions use this key now (it was `next`): it becomes the site's key, and
    /// peers stop accepting the old one.
    Commit(WgPublicKey),
}

#[utoipa::path(
    post,
    path = "/api/v1/edge/key",
    tag = "enrolment",
    summary = "The calling edge rolls to a new key (site credential): first `next`, then \
               `commit` once its sessions use it.",
    request_body = KeyStep,
    security(("site" = [])),
    responses((status = 204, description = "Recorded"), crate::error::ApiErrors)
)]
async fn edge_key(
    State(s): State<AppState>,
    site: SiteCaller,
    ip: crate::routes::auth::ClientIp,
    extract::Json(step): extract::Json<KeyStep>,
) -> Result<StatusCode, ApiError> {
    let _heard = s.heard_from(site.site_id, &site.site);
    let now = now_s();
    let mut tx = s.store.begin().await?;
    let (current, next): (Option<String>, Option<String>) =
        sqlx::query_as("SELECT public_key, next_public_key FROM sites WHERE id = ?")
            .bind(site.site_id)
            .fetch_one(&mut *tx)
            .await?;
    let (action, detail) = match &step {
        KeyStep::Next(k) => {
            let k = k.to_string();
            if current.as_deref() == Some(k.as_str()) {
                // Its own code: an edge finishing an interrupted roll learns from it that the
                // commit already happened.
                return Err(ApiError {
                    code: "key_is_current",
                    ..ApiError::field("next", "is the site's current key")
                });
            }
            let taken: Option<String> = sqlx::query_scalar(
                "SELECT name FROM sites WHERE id != ? AND (public_key = ? OR next_public_key = ?)",
            )
            .bind(site.site_id)
            .bind(&k)
            .bind(&k)
            .fetch_optional(&mut *tx)
            .await?;
            if let Some(other) = taken {
                return Err(ApiError::field(
                    "next",
                    format!("is site {other}'s key: make a new one"),
                ));
            }
            if let Some(other) = rolling_neighbour(&s.store, site.site_id)
                .await?
                .filter(|o| *o != site.site)
            {
                return Err(ApiError::new(
                    StatusCode::CONFLICT,
                    "peer_rolling",
                    format!("{other} is rolling its key: try again when it is done"),
                ));
            }
            sqlx::query(
                "UPDATE sites SET next_public_key = ?, version = version + 1, updated_at = ?
                 WHERE id = ?",
            )
            .bind(&k)
            .bind(now)
            .bind(site.site_id)
            .execute(&mut *tx)
            .await?;
            ("site.key_next", json!({ "next_public_key": k }))
        }
        KeyStep::Commit(k) => {
            let k = k.to_string();
            if current.as_deref() == Some(k.as_str()) && next.is_none() {
                // Done already (an answer lost on the way back).
                return Ok(StatusCode::NO_CONTENT);
            }
            if next.as_deref() != Some(k.as_str()) {
                return Err(ApiError::conflict(
                    "that key was not announced as next: announce it first",
                ));
            }
            sqlx::query(
                "UPDATE sites SET public_key = ?, next_public_key = NULL, version = version + 1,
                 updated_at = ? WHERE id = ?",
            )
            .bind(&k)
            .bind(now)
            .bind(site.site_id)
            .execute(&mut *tx)
            .await?;
            (
                "site.key_rotated",
                json!({ "public_key": k, "previous": current }),
            )
        }
    };
    let actor = Actor {
        id: None,
        name: format!("edge of {}", site.site),
        source: ip.0.to_string(),
    };
    Store::audit(
        &mut tx,
        &actor,
        action,
        &format!("site/{}", site.site_id),
        detail,
    )
    .await?;
    tx.commit().await?;
    // An edge's own reports wake no one; this changes its peers' configurations.
    s.changed();
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewToken {
    /// 1 to 10080 (a week); 60 when left out.
    #[serde(default)]
    pub expires_in_minutes: Option<u32>,
}

#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TokenView {
    pub site_id: i64,
    /// Shown once: give it to the edge (`patronus edge --controller URL --token T`).
    pub token: String,
    pub expires_at: i64,
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EnrollRequest {
    pub token: String,
    /// The edge's WireGuard public key (the edge generated the pair and keeps the private key).
    pub public_key: WgPublicKey,
    /// Public `ip:port` of some of the site's links, by link name (links behind NAT or with
    /// dynamic addresses are left out).
    #[serde(default)]
    #[schema(value_type = BTreeMap<String, String>)]
    pub endpoints: BTreeMap<String, SocketAddr>,
}

#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Enrolled {
    pub site_id: i64,
    pub site: String,
    /// The edge's credential from now on (`Authorization: Bearer psc_...`); shown once.
    pub credential: String,
    /// Key rotations asked for this site so far: a new edge starts with a new key, so it
    /// counts them as done.
    pub key_rotation: i64,
}

/// An enrolled edge, authenticated by its site credential: it may act as its own site only.
#[derive(Debug, Clone)]
pub struct SiteCaller {
    pub site_id: i64,
    pub site: String,
}

impl FromRequestParts<AppState> for SiteCaller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let token = bearer(parts)?;
        if !token.starts_with(CREDENTIAL_PREFIX) {
            return Err(ApiError::unauthorized(
                "this is for enrolled edges: authenticate with the site's credential",
            ));
        }
        let hash = a::sha256(token.as_bytes());
        let row = sqlx::query(
            "SELECT s.id, s.name FROM site_credentials c JOIN sites s ON s.id = c.site_id
             WHERE c.secret_hash = ? AND c.revoked = 0",
        )
        .bind(&hash[..])
        .fetch_optional(state.store.pool())
        .await?
        .ok_or_else(|| ApiError::unauthorized("the site credential is invalid or revoked"))?;
        Ok(Self {
            site_id: row.try_get("id")?,
            site: row.try_get("name")?,
        })
    }
}

#[utoipa::path(
    post,
    path = "/api/v1/sites/{id}/enrollment-tokens",
    tag = "enrolment",
    summary = "A one-time, expiring token that lets an edge enrol as this site.",
    params(("id" = i64, Path, description = "The site's id")),
    request_body = NewToken,
    security(("bearer" = ["operator"])),
    responses((status = 201, body = TokenView), crate::error::ApiErrors)
)]
async fn create_token(
    State(s): State<AppState>,
    Operator(p): Operator,
    extract::Path(id): extract::Path<i64>,
    extract::Json(req): extract::Json<NewToken>,
) -> Result<Response, ApiError> {
    let minutes = req.expires_in_minutes.unwrap_or(60);
    if !(1..=10_080).contains(&minutes) {
        return Err(ApiError::field(
            "expires_in_minutes",
            "must be between 1 and 10080",
        ));
    }
    let site = load_site(&s.store, id).await?;
    let token = format!("{TOKEN_PREFIX}{}", a::b64url(&a::random_bytes::<32>()));
    let now = now_s();
    let expires_at = now + i64::from(minutes) * 60;
    let mut tx = s.store.begin().await?;
    sqlx::query(
        "INSERT INTO enrollment_tokens (site_id, token_hash, expires_at, created_by, created_at)
         VALUES (?, ?, ?, ?, ?)",
    )
    .bind(id)
    .bind(&a::sha256(token.as_bytes())[..])
    .bind(expires_at)
    .bind(p.user_id())
    .bind(now)
    .execute(&mut *tx)
    .await?;
    Store::audit(
        &mut tx,
        &p.actor(),
        "site.enrollment_token",
        &format!("site/{id}"),
        json!({ "site": site.name, "expires_at": expires_at }),
    )
    .await?;
    tx.commit().await?;
    let body = TokenView {
        site_id: id,
        token,
        expires_at,
    };
    Ok((StatusCode::CREATED, axum::Json(body)).into_response())
}

#[utoipa::path(
    post,
    path = "/api/v1/enroll",
    tag = "enrolment",
    summary = "An edge enrols with a token and its public key, and gets its site credential.",
    request_body = EnrollRequest,
    responses((status = 200, body = Enrolled), crate::error::ApiErrors)
)]
async fn enroll(
    State(s): State<AppState>,
    _limit: AuthRateLimited,
    ip: crate::routes::auth::ClientIp,
    extract::Json(req): extract::Json<EnrollRequest>,
) -> Result<axum::Json<Enrolled>, ApiError> {
    let hash = a::sha256(req.token.as_bytes());
    let now = now_s();
    let mut tx = s.store.begin().await?;
    // Checked and spent in one statement.
    let site_id: Option<i64> = sqlx::query_scalar(
        "UPDATE enrollment_tokens SET used_at = ?
         WHERE token_hash = ? AND used_at IS NULL AND expires_at > ? RETURNING site_id",
    )
    .bind(now)
    .bind(&hash[..])
    .bind(now)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(site_id) = site_id else {
        let why =
            sqlx::query("SELECT used_at, expires_at FROM enrollment_tokens WHERE token_hash = ?")
                .bind(&hash[..])
                .fetch_optional(&mut *tx)
                .await?;
        let message = match why {
            Some(r) if r.try_get::<Option<i64>, _>("used_at")?.is_some() => {
                "this enrolment token was already used; ask for a new one"
            }
            Some(_) => "this enrolment token has expired; ask for a new one",
            None => "unknown enrolment token",
        };
        return Err(ApiError::unauthorized(message));
    };
    let site = load_site(&s.store, site_id).await?;
    // Endpoints for links the site has; anything else undoes the enrolment (the token stays).
    for (name, endpoint) in &req.endpoints {
        let Some(l) = site.links.iter().find(|l| l.link.name.as_str() == name) else {
            return Err(ApiError::field(
                &format!("endpoints.{name}"),
                format!("site {} has no link named {name}", site.name),
            ));
        };
        let mut link = l.link.clone();
        link.endpoint = Some(*endpoint);
        sqlx::query(
            "UPDATE links SET spec = ?, version = version + 1, updated_at = ? WHERE id = ?",
        )
        .bind(serde_json::to_string(&link).map_err(ApiError::internal)?)
        .bind(now)
        .bind(l.id)
        .execute(&mut *tx)
        .await?;
    }
    // A roll the replaced machine left unfinished ends here: its next key is not trusted.
    let key_rotation: i64 = sqlx::query_scalar(
        "UPDATE sites SET public_key = ?, next_public_key = NULL, version = version + 1,
         updated_at = ? WHERE id = ? RETURNING key_rotation",
    )
    .bind(req.public_key.to_string())
    .bind(now)
    .bind(site_id)
    .fetch_one(&mut *tx)
    .await?;
    // One edge per site: a new enrolment replaces the old machine's credential.
    sqlx::query("UPDATE site_credentials SET revoked = 1 WHERE site_id = ?")
        .bind(site_id)
        .execute(&mut *tx)
        .await?;
    let credential = format!("{CREDENTIAL_PREFIX}{}", a::b64url(&a::random_bytes::<32>()));
    sqlx::query("INSERT INTO site_credentials (site_id, secret_hash, created_at) VALUES (?, ?, ?)")
        .bind(site_id)
        .bind(&a::sha256(credential.as_bytes())[..])
        .bind(now)
        .execute(&mut *tx)
        .await?;
    let actor = Actor {
        id: None,
        name: format!("edge of {}", site.name),
        source: ip.0.to_string(),
    };
    Store::audit(
        &mut tx,
        &actor,
        "site.enroll",
        &format!("site/{site_id}"),
        json!({ "public_key": req.public_key.to_string(), "endpoints": req.endpoints }),
    )
    .await?;
    tx.commit().await?;
    Ok(axum::Json(Enrolled {
        site_id,
        site: site.name,
        credential,
        key_rotation,
    }))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ConfigQuery {
    /// With `If-None-Match`: hold the request up to this many seconds (at most 25) until the
    /// configuration changes, then answer at once (a long poll: a change reaches the edge
    /// without polling delay).
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
        crate::error::ApiErrors
    )
)]
async fn edge_config(
    State(s): State<AppState>,
    site: SiteCaller,
    headers: HeaderMap,
    extract::Query(q): extract::Query<ConfigQuery>,
) -> Result<Response, ApiError> {
    let _heard = s.heard_from(site.site_id, &site.site);
    let seen = headers
        .get(header::IF_NONE_MATCH)
        .map(|v| v.as_bytes().to_vec());
    match next_config(&s, &site, seen.as_deref(), q.wait).await? {
        Next::Unchanged(tag) => not_modified(tag),
        Next::Changed(c, tag) => {
            let mut r = ([(header::CONTENT_TYPE, "application/json")], c.to_json()).into_response();
            r.headers_mut().insert(header::ETAG, tag);
            Ok(r)
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
        crate::error::ApiErrors
    )
)]
async fn edge_config_delta(
    State(s): State<AppState>,
    site: SiteCaller,
    headers: HeaderMap,
    extract::Query(q): extract::Query<ConfigQuery>,
) -> Result<Response, ApiError> {
    let _heard = s.heard_from(site.site_id, &site.site);
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
    match next_config(&s, &site, Some(&seen), q.wait).await? {
        Next::Unchanged(tag) => not_modified(tag),
        Next::Changed(c, tag) => {
            let base = s.previous_config(site.site_id, &seen).ok_or_else(|| {
                ApiError::new(
                    StatusCode::CONFLICT,
                    "base_unknown",
                    "the controller no longer has the version you hold: fetch \
                     /api/v1/edge/config",
                )
            })?;
            let mut r = (
                [(header::CONTENT_TYPE, "application/json")],
                c.delta_from(&base),
            )
                .into_response();
            r.headers_mut().insert(header::ETAG, tag);
            Ok(r)
        }
    }
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

fn not_modified(tag: HeaderValue) -> Result<Response, ApiError> {
    let mut r = StatusCode::NOT_MODIFIED.into_response();
    r.headers_mut().insert(header::ETAG, tag);
    Ok(r)
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
    let mut changes = s.changes.subscribe();
    loop {
        let configs = s.configs().await?;
        let c = configs.get(&site.site_id).ok_or_else(|| no_config(site))?;
        let etag = c.etag();
        let tag = HeaderValue::from_str(&etag).map_err(ApiError::internal)?;
        if seen != Some(etag.as_bytes()) {
            return Ok(Next::Changed(c.clone(), tag));
        }
        let timed_out = tokio::select! {
            r = changes.changed() => r.is_err(),
            _ = tokio::time::sleep_until(deadline) => true,
        };
        if timed_out {
            return Ok(Next::Unchanged(tag));
        }
    }
}

/// How long reported samples are kept.
pub const SAMPLE_RETENTION_S: i64 = 7 * 24 * 3600;
/// How long failovers are kept: rare, and what an operator looks back on after an incident.
pub const FAILOVER_RETENTION_S: i64 = 90 * 24 * 3600;

#[utoipa::path(
    post,
    path = "/api/v1/edge/telemetry",
    tag = "enrolment",
    summary = "The calling edge reports its paths' measurements (site credential).",
    request_body = patronus_api::Telemetry,
    security(("site" = [])),
    responses((status = 204, description = "Recorded"), crate::error::ApiErrors)
)]
async fn telemetry(
    State(s): State<AppState>,
    site: SiteCaller,
    extract::Json(t): extract::Json<patronus_api::Telemetry>,
) -> Result<StatusCode, ApiError> {
    let _heard = s.heard_from(site.site_id, &site.site);
    if t.paths.len() > 4096 {
        return Err(ApiError::field("paths", "at most 4096 paths per report"));
    }
    if t.classes.len() > 256 {
        return Err(ApiError::field("classes", "at most 256 classes per report"));
    }
    if t.path_events.len() > 1024 {
        return Err(ApiError::field(
            "path_events",
            "at most 1024 events per report",
        ));
    }
    if t.failovers.len() > 1024 {
        return Err(ApiError::field(
            "failovers",
            "at most 1024 events per report",
        ));
    }
    // Link ids by (site name, link name), of the reporter and the peers it names only.
    let mut names: std::collections::BTreeSet<&str> =
        t.paths.iter().map(|p| p.peer.as_str()).collect();
    names.extend(t.failovers.iter().map(|e| e.peer.as_str()));
    names.extend(t.path_events.iter().map(|e| e.peer.as_str()));
    names.insert(site.site.as_str());
    let sql = format!(
        "SELECT l.id, l.name AS link, s.name AS site FROM links l JOIN sites s ON s.id = l.site_id
         WHERE s.name IN ({})",
        vec!["?"; names.len()].join(",")
    );
    let mut query = sqlx::query(&sql);
    for n in &names {
        query = query.bind(*n);
    }
    let rows = query.fetch_all(s.store.pool()).await?;
    let mut ids: std::collections::HashMap<(String, String), i64> = Default::default();
    for r in &rows {
        ids.insert((r.try_get("site")?, r.try_get("link")?), r.try_get("id")?);
    }
    // The id of the path between this site's `local` link and `peer`'s `remote` link, if the
    // controller knows both (a report may name a configuration it no longer has).
    let path_of = |local: &str, peer: &str, remote: &str| {
        Some(crate::routes::topology::path_id(
            *ids.get(&(site.site.clone(), local.to_owned()))?,
            *ids.get(&(peer.to_owned(), remote.to_owned()))?,
        ))
    };
    let now = now_s();
    let mut samples = Vec::new();
    for (i, p) in t.paths.iter().enumerate() {
        if !matches!(p.state.as_str(), "up" | "degraded" | "down") {
            return Err(ApiError::field(
                &format!("paths[{i}].state"),
                "must be up, degraded or down",
            ));
        }
        let finite = |v: f64| v.is_finite() && v >= 0.0;
        if !finite(p.jitter_ms) || !finite(p.loss_pct) || p.rtt_ms.is_some_and(|r| !finite(r)) {
            return Err(ApiError::field(
                &format!("paths[{i}]"),
                "measurements must be finite and >= 0",
            ));
        }
        // A path of a configuration the controller no longer has: not an error.
        if let Some(id) = path_of(&p.local_link, &p.peer, &p.remote_link) {
            samples.push((id, p));
        }
    }
    let mut events = Vec::new();
    {
        let mut live = s.live.lock().unwrap_or_else(|e| e.into_inner());
        for (id, p) in &samples {
            live.insert(
                id.clone(),
                crate::app::LivePath {
                    state: p.state.clone(),
                    rtt_ms: p.rtt_ms,
                    jitter_ms: p.jitter_ms,
                    loss_pct: p.loss_pct,
                    at: now,
                },
            );
        }
    }
    let mut tx = s.store.begin().await?;
    for (id, p) in &samples {
        sqlx::query(
            "INSERT INTO path_samples (path_id, site_id, at_s, state, rtt_ms, jitter_ms, loss_pct)
             VALUES (?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(id)
        .bind(site.site_id)
        .bind(now)
        .bind(&p.state)
        .bind(p.rtt_ms)
        .bind(p.jitter_ms)
        .bind(p.loss_pct)
        .execute(&mut *tx)
        .await?;
    }
    for e in &t.failovers {
        // A report delivered twice (an answer lost on the way back) is kept once.
        let (from, to) = (
            path_of(&e.from_local_link, &e.peer, &e.from_remote_link),
            path_of(&e.to_local_link, &e.peer, &e.to_remote_link),
        );
        let new = sqlx::query(
            "INSERT OR IGNORE INTO failover_events
             (site_id, seq, at_ms, peer, from_path, to_path, detail, reason, flows)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(site.site_id)
        .bind(e.seq as i64)
        .bind(e.at_ms)
        .bind(&e.peer)
        .bind(&from)
        .bind(&to)
        .bind(serde_json::to_string(e).map_err(ApiError::internal)?)
        .bind(&e.reason)
        .bind(i64::from(e.flows))
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        if new {
            events.push((
                crate::webhooks::EventKind::Failover,
                json!({
                    "site": site.site,
                    "peer": e.peer,
                    "at_ms": e.at_ms,
                    "reason": e.reason,
                    "flows": e.flows,
                    "from": format!("{}>{}", e.from_local_link, e.from_remote_link),
                    "to": format!("{}>{}", e.to_local_link, e.to_remote_link),
                    "from_path_id": from,
                    "to_path_id": to,
                }),
            ));
        }
    }
    // Each end's view of a path changing, at the moment it saw it: kept once (a report may
    // come twice), and told to webhooks (down, up again, breaking an SLA).
    for e in &t.path_events {
        let path = path_of(&e.local_link, &e.peer, &e.remote_link);
        let new = sqlx::query(
            "INSERT OR IGNORE INTO path_events
             (site_id, seq, at_ms, path_id, kind, class, detail, received_s)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(site.site_id)
        .bind(e.seq as i64)
        .bind(e.at_ms)
        .bind(&path)
        .bind(&e.kind)
        .bind(&e.class)
        .bind(serde_json::to_string(e).map_err(ApiError::internal)?)
        .bind(now)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        let kind = match e.kind.as_str() {
            "down" => crate::webhooks::EventKind::PathDown,
            "up" => crate::webhooks::EventKind::PathUp,
            "sla-violated" => crate::webhooks::EventKind::SlaViolated,
            _ => continue,
        };
        if new {
            events.push((
                kind,
                json!({
                    "path_id": path,
                    "reported_by": site.site,
                    "at_ms": e.at_ms,
                    "from": format!("{}/{}", site.site, e.local_link),
                    "to": format!("{}/{}", e.peer, e.remote_link),
                    "class": e.class,
                    "rtt_ms": e.rtt_ms,
                    "jitter_ms": e.jitter_ms,
                    "loss_pct": e.loss_pct,
                    "silent_ms": e.silent_ms,
                    "flows": e.flows,
                }),
            ));
        }
    }
    record_traffic(&mut tx, site.site_id, now, &t, &samples).await?;
    // Retention: what is older goes, a little at a time.
    for (table, column, before) in [
        ("path_samples", "at_s", now - SAMPLE_RETENTION_S),
        ("traffic_samples", "at_s", now - SAMPLE_RETENTION_S),
        ("path_events", "received_s", now - SAMPLE_RETENTION_S),
        (
            "failover_events",
            "at_ms",
            (now - FAILOVER_RETENTION_S) * 1000,
        ),
    ] {
        sqlx::query(&format!(
            "DELETE FROM {table} WHERE id IN
               (SELECT id FROM {table} WHERE {column} < ? ORDER BY id LIMIT 1000)"
        ))
        .bind(before)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    crate::webhooks::emit_soon(&s, events);
    Ok(StatusCode::NO_CONTENT)
}

/// Counters as an edge reports them: totals since its run started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Totals {
    tx_packets: u64,
    tx_bytes: u64,
    rx_packets: u64,
    rx_bytes: u64,
}

impl Totals {
    /// What `self` counts beyond `earlier`, unless some counter of `self` is behind it.
    fn checked_sub(&self, earlier: &Totals) -> Option<Totals> {
        Some(Totals {
            tx_packets: self.tx_packets.checked_sub(earlier.tx_packets)?,
            tx_bytes: self.tx_bytes.checked_sub(earlier.tx_bytes)?,
            rx_packets: self.rx_packets.checked_sub(earlier.rx_packets)?,
            rx_bytes: self.rx_bytes.checked_sub(earlier.rx_bytes)?,
        })
    }
}

/// Turns the report's running totals into what was sent since the previous report (kept per
/// site and key in `traffic_counters`, so that a report delivered twice adds nothing and a
/// restarted controller loses nothing), and keeps the differences that are not zero as
/// samples.
async fn record_traffic(
    tx: &mut sqlx::Transaction<'static, sqlx::Sqlite>,
    site_id: i64,
    now: i64,
    t: &patronus_api::Telemetry,
    samples: &[(String, &patronus_api::PathReport)],
) -> Result<(), ApiError> {
    let mut current: Vec<(String, Option<&str>, Option<&str>, Totals)> = Vec::new();
    for (id, p) in samples {
        current.push((
            format!("path:{id}"),
            Some(id.as_str()),
            None,
            Totals {
                tx_packets: p.tx_packets,
                tx_bytes: p.tx_bytes,
                rx_packets: p.rx_packets,
                rx_bytes: p.rx_bytes,
            },
        ));
    }
    for c in &t.classes {
        current.push((
            format!("class:{}", c.class),
            None,
            Some(c.class.as_str()),
            Totals {
                tx_packets: c.tx_packets,
                tx_bytes: c.tx_bytes,
                ..Totals::default()
            },
        ));
    }
    if current.is_empty() {
        return Ok(());
    }
    let rows = sqlx::query("SELECT * FROM traffic_counters WHERE site_id = ?")
        .bind(site_id)
        .fetch_all(&mut **tx)
        .await?;
    let mut before: std::collections::HashMap<String, (i64, Totals)> = Default::default();
    for r in &rows {
        let n = |k: &str| r.try_get::<i64, _>(k).map(|v| v as u64);
        before.insert(
            r.try_get("key")?,
            (
                r.try_get("started_ms")?,
                Totals {
                    tx_packets: n("tx_packets")?,
                    tx_bytes: n("tx_bytes")?,
                    rx_packets: n("rx_packets")?,
                    rx_bytes: n("rx_bytes")?,
                },
            ),
        );
    }
    let mut seen = std::collections::HashSet::new();
    for (key, path, class, cur) in current {
        // A key named twice in one report counts once.
        if !seen.insert(key.clone()) {
            continue;
        }
        // The totals counted so far in this same run of the edge, if any.
        let counted = before
            .get(&key)
            .filter(|(started, _)| *started == t.started_ms)
            .map(|(_, b)| b);
        let delta = match counted {
            // The same run: what it sent since; nothing, from a late report older than that.
            Some(b) => match cur.checked_sub(b) {
                Some(d) if d != Totals::default() => d,
                _ => continue,
            },
            // A new run of the edge (or the first report): all of it is new.
            None => cur,
        };
        let i = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        sqlx::query(
            "INSERT INTO traffic_counters
             (site_id, key, started_ms, tx_packets, tx_bytes, rx_packets, rx_bytes)
             VALUES (?, ?, ?, ?, ?, ?, ?)
             ON CONFLICT (site_id, key) DO UPDATE SET started_ms = excluded.started_ms,
               tx_packets = excluded.tx_packets, tx_bytes = excluded.tx_bytes,
               rx_packets = excluded.rx_packets, rx_bytes = excluded.rx_bytes",
        )
        .bind(site_id)
        .bind(&key)
        .bind(t.started_ms)
        .bind(i(cur.tx_packets))
        .bind(i(cur.tx_bytes))
        .bind(i(cur.rx_packets))
        .bind(i(cur.rx_bytes))
        .execute(&mut **tx)
        .await?;
        if delta == Totals::default() {
            continue;
        }
        sqlx::query(
            "INSERT INTO traffic_samples
             (site_id, at_s, path_id, class, tx_packets, tx_bytes, rx_packets, rx_bytes)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(site_id)
        .bind(now)
        .bind(path)
        .bind(class)
        .bind(i(delta.tx_packets))
        .bind(i(delta.tx_bytes))
        .bind(i(delta.rx_packets))
        .bind(i(delta.rx_bytes))
        .execute(&mut **tx)
        .await?;
    }
    Ok(())
}

/// The name of a site connected to site `id` by the topology (or `id` itself) whose edge is
/// rolling its key, if one is: two connected sites rolling at once could each accept the
/// other's next key with its own old one.
async fn rolling_neighbour(store: &Store, id: i64) -> Result<Option<String>, ApiError> {
    let rolling: Vec<(i64, String)> =
        sqlx::query_as("SELECT id, name FROM sites WHERE next_public_key IS NOT NULL")
            .fetch_all(store.pool())
            .await?;
    if rolling.is_empty() {
        return Ok(None);
    }
    if let Some((_, name)) = rolling.iter().find(|(r, _)| *r == id) {
        return Ok(Some(name.clone()));
    }
    let t = crate::routes::topology::load(store).await?;
    let sites = crate::routes::sites::load_sites(store).await?;
    let by_id = |id: i64| sites.iter().find(|s| s.id == id);
    let Some(me) = by_id(id) else {
        return Ok(None);
    };
    Ok(rolling
        .into_iter()
        .find(|(r, _)| by_id(*r).is_some_and(|o| crate::routes::topology::connected(&t, me, o)))
        .map(|(_, name)| name))
}
