//! Liveness, readiness and version: public, for load balancers and monitoring.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};

use crate::app::{AppState, Principal};
use crate::error::ApiError;
use crate::metrics::gauge;

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(health))
        .routes(routes!(ready))
        .routes(routes!(version))
        .routes(routes!(metrics))
        .routes(routes!(crate::docs::openapi_json))
        .routes(routes!(crate::docs::docs_page))
}

/// Prometheus text format. Needs a viewer's credentials: give Prometheus an API key
/// (`authorization: { credentials: pak_... }` in its scrape configuration).
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "system",
    summary = "Prometheus metrics (text format).",
    security(("bearer" = ["viewer"])),
    responses((status = 200, content_type = "text/plain", body = String))
)]
async fn metrics(State(s): State<AppState>, _p: Principal) -> Result<Response, ApiError> {
    let mut out = String::new();
    s.http.render(&mut out);
    s.stun.render(&mut out);
    let (open, idle) = s.store.connections();
    gauge(
        &mut out,
        "patronus_db_pool_connections",
        "Database connections, by state.",
        &[
            ("{state=\"idle\"}".into(), idle as f64),
            ("{state=\"busy\"}".into(), open.saturating_sub(idle) as f64),
        ],
    );
    gauge(
        &mut out,
        "patronus_edge_config_long_polls",
        "Edges' configuration long polls held by this controller now, waiting for a change.",
        &[(
            String::new(),
            s.long_polls.load(std::sync::atomic::Ordering::Relaxed) as f64,
        )],
    );
    gauge(
        &mut out,
        "patronus_event_streams",
        "Event streams (/api/v1/events/stream) this controller serves now.",
        &[(
            String::new(),
            s.event_streams.load(std::sync::atomic::Ordering::Relaxed) as f64,
        )],
    );
    let backups = s.backups.lock().unwrap_or_else(|e| e.into_inner()).clone();
    crate::metrics::counter(
        &mut out,
        "patronus_backups_total",
        "Scheduled backups this controller took, by outcome.",
        &[
            ("{outcome=\"ok\"}".into(), backups.successes as f64),
            ("{outcome=\"failed\"}".into(), backups.failures as f64),
        ],
    );
    // Absent until this controller has taken one: no made-up zero.
    if let Some((at_ms, took_ms, bytes)) = backups.last_success {
        gauge(
            &mut out,
            "patronus_backup_last_success_timestamp_seconds",
            "When this controller's last scheduled backup was taken.",
            &[(String::new(), at_ms as f64 / 1e3)],
        );
        gauge(
            &mut out,
            "patronus_backup_last_duration_seconds",
            "How long this controller's last scheduled backup took.",
            &[(String::new(), took_ms as f64 / 1e3)],
        );
        gauge(
            &mut out,
            "patronus_backup_last_size_bytes",
            "The size of this controller's last scheduled backup (encrypted).",
            &[(String::new(), bytes as f64)],
        );
    }
    let reported = s
        .sampler
        .reported
        .load(std::sync::atomic::Ordering::Relaxed);
    let written = s.sampler.written.load(std::sync::atomic::Ordering::Relaxed);
    crate::metrics::counter(
        &mut out,
        "patronus_path_measurements_total",
        "Path measurements edges reported to this controller, by whether the history kept them \
         (a change beyond a deadband, or a minute since the last kept one).",
        &[
            ("{kept=\"true\"}".into(), written as f64),
            (
                "{kept=\"false\"}".into(),
                reported.saturating_sub(written) as f64,
            ),
        ],
    );
    let load = |i: usize| s.compiles[i].load(std::sync::atomic::Ordering::Relaxed) as f64;
    crate::metrics::counter(
        &mut out,
        "patronus_config_compiles_total",
        "Compiles of every site's configuration (one per configuration generation an edge asked \
         for), by whether they read the sites again or kept the ones read before (only \
         policies, SLA classes or failover settings changed since).",
        &[
            ("{sites=\"read\"}".into(), load(0)),
            ("{sites=\"kept\"}".into(), load(1)),
        ],
    );
    let (announced, reread) = s.store.generations_followed();
    crate::metrics::counter(
        &mut out,
        "patronus_config_generations_followed_total",
        "Newer configuration generations learnt from other controllers (PostgreSQL) or processes \
         (SQLite: `patronus restore --site`), by how: \
         announced (NOTIFY) or reread (from the table, after a reconnect or on the periodic check).",
        &[
            ("{how=\"announced\"}".into(), announced as f64),
            ("{how=\"reread\"}".into(), reread as f64),
        ],
    );
    let counts: Vec<(String, f64)> =
        crate::store::Store::object_counts(&mut *s.store.conn().await?)
            .await?
            .into_iter()
            .map(|(kind, n)| (format!("{{kind=\"{kind}\"}}"), n as f64))
            .collect();
    gauge(
        &mut out,
        "patronus_objects",
        "Objects in the store, by kind.",
        &counts,
    );
    // What the edges last reported of each path (fresh reports only).
    let now = crate::store::now_s();
    let live = s.live_paths();
    let mut fresh: Vec<_> = live
        .into_iter()
        .filter(|(_, m)| now - m.at <= crate::app::LIVE_FOR_S)
        .collect();
    fresh.sort_by(|a, b| a.0.cmp(&b.0));
    let label = |id: &str| format!("{{path=\"{id}\"}}");
    let series = |f: &dyn Fn(&crate::app::LivePath) -> Option<f64>| -> Vec<(String, f64)> {
        fresh
            .iter()
            .filter_map(|(id, m)| Some((label(id), f(m)?)))
            .collect()
    };
    gauge(
        &mut out,
        "patronus_path_up",
        "1 if the path's edge reports it up, 0.5 degraded, 0 down.",
        &series(&|m| {
            Some(match m.state.as_str() {
                "up" => 1.0,
                "degraded" => 0.5,
                _ => 0.0,
            })
        }),
    );
    gauge(
        &mut out,
        "patronus_path_rtt_seconds",
        "Round-trip time the path's edge reports, seconds.",
        &series(&|m| m.rtt_ms.map(|v| v / 1e3)),
    );
    gauge(
        &mut out,
        "patronus_path_jitter_seconds",
        "RFC 3550 jitter the path's edge reports, seconds.",
        &series(&|m| Some(m.jitter_ms / 1e3)),
    );
    gauge(
        &mut out,
        "patronus_path_loss_ratio",
        "Share of probes lost that the path's edge reports, 0 to 1.",
        &series(&|m| Some(m.loss_pct / 100.0)),
    );
    let attempts = |i: usize| s.webhook_attempts[i].load(std::sync::atomic::Ordering::Relaxed);
    crate::metrics::counter(
        &mut out,
        "patronus_webhook_attempts_total",
        "Webhook delivery attempts by outcome: delivered, retry (failed, to be tried again), \
         failed (the last attempt failed: the delivery is given up).",
        &[
            ("{outcome=\"delivered\"}".into(), attempts(0) as f64),
            ("{outcome=\"retry\"}".into(), attempts(1) as f64),
            ("{outcome=\"failed\"}".into(), attempts(2) as f64),
        ],
    );
    crate::metrics::counter(
        &mut out,
        "patronus_db_errors_total",
        "Requests that failed on a database error.",
        &[(
            String::new(),
            crate::error::DB_ERRORS.load(std::sync::atomic::Ordering::Relaxed) as f64,
        )],
    );
    s.push_lag.render(
        &mut out,
        "patronus_config_push_seconds",
        "From this controller learning of a configuration change to its sending to an edge \
         that was waiting for it (the edge's long poll answered).",
    );
    if let Some(every) = s.config.backup_interval {
        gauge(
            &mut out,
            "patronus_backup_interval_seconds",
            "The configured interval of scheduled backups (their recovery point objective).",
            &[(String::new(), every.as_secs_f64())],
        );
    }
    if let Some(t) = s.tls.get().and_then(|t| t.not_after()) {
        gauge(
            &mut out,
            "patronus_tls_certificate_expiry_timestamp_seconds",
            "When the API's TLS certificate served now expires.",
            &[(String::new(), t as f64)],
        );
    }
    // Each active site with an enrolled edge (one series each: sites are made by operators).
    let (sites, seen) = {
        let mut conn = s.store.conn().await?;
        let sites = crate::store::presence::enrolled_active(&mut conn).await?;
        let ids: Vec<i64> = sites.iter().map(|(id, _)| *id).collect();
        let seen = s.presence_of(&mut conn, &ids).await?;
        (sites, seen)
    };
    let site_label = |name: &str| {
        format!(
            "{{site=\"{}\"}}",
            name.replace('\\', "\\\\").replace('"', "\\\"")
        )
    };
    gauge(
        &mut out,
        "patronus_site_online",
        "1 if the site's edge was in touch with a controller over this database lately, else 0 \
         (active sites with an enrolled edge).",
        &sites
            .iter()
            .map(|(id, name)| {
                let online = seen.get(id).is_some_and(|(o, _)| *o);
                (site_label(name), if online { 1.0 } else { 0.0 })
            })
            .collect::<Vec<_>>(),
    );
    // Whether the edges in touch with this controller hold their current configuration.
    let configs = s.configs().await?;
    let in_touch: std::collections::HashSet<i64> = {
        let now = crate::store::now_ms();
        let p = s.presence.lock().unwrap_or_else(|e| e.into_inner());
        p.iter()
            .filter(|(_, h)| {
                h.open > 0 || now - h.last_seen <= crate::store::presence::ONLINE_WITHIN_MS
            })
            .map(|(id, _)| *id)
            .collect()
    };
    let (mut current, mut versions) = (Vec::new(), Vec::new());
    {
        let held = s.held.lock().unwrap_or_else(|e| e.into_inner());
        for (id, name) in sites.iter().filter(|(id, _)| in_touch.contains(id)) {
            let Some(now) = configs.get(id).map(|c| c.etag()) else {
                continue;
            };
            let h = held.get(id);
            let same = h.is_some_and(|h| h.as_slice() == now.as_bytes());
            current.push((site_label(name), if same { 1.0 } else { 0.0 }));
            // The ETag the edge named (its `If-None-Match`, or the one it was sent): hex
            // digits only, at most 16, so an edge cannot put anything else in a label.
            if let Some(h) = h {
                let version: String = h
                    .iter()
                    .filter(|b| b.is_ascii_hexdigit())
                    .take(16)
                    .map(|b| char::from(*b))
                    .collect();
                if !version.is_empty() {
                    let label = site_label(name);
                    let label = label.trim_end_matches('}');
                    versions.push((format!("{label},version=\"{version}\"}}"), 1.0));
                }
            }
        }
    }
    gauge(
        &mut out,
        "patronus_site_config_current",
        "1 if the site's edge holds its current configuration, 0 if an older one (edges in touch \
         with this controller).",
        &current,
    );
    gauge(
        &mut out,
        "patronus_site_config_info",
        "Always 1; the label is the version of the configuration the site's edge holds, as the \
         edge's `patronus_edge_config_info` has it (edges in touch with this controller).",
        &versions,
    );
    crate::metrics::build_info(&mut out);
    crate::metrics::process(&mut out);
    let mut r = out.into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    Ok(r)
}

/// A liveness or readiness answer.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct Status {
    /// `ok` (live) or `ready`.
    pub status: &'static str,
}

/// What is running.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct VersionInfo {
    /// The controller's version.
    pub version: &'static str,
    /// The API's version (the path prefix).
    pub api: &'static str,
    /// The database's migration level.
    pub schema_version: i64,
}

/// The process answers.
#[utoipa::path(
    get,
    path = "/health",
    tag = "system",
    summary = "Liveness: the process answers.",
    responses((status = 200, body = Status))
)]
async fn health() -> Json<Status> {
    Json(Status { status: "ok" })
}

/// The database answers.
#[utoipa::path(
    get,
    path = "/ready",
    tag = "system",
    summary = "Readiness: the database answers.",
    responses((status = 200, body = Status))
)]
async fn ready(State(s): State<AppState>) -> Result<Json<Status>, ApiError> {
    match s.store.ping().await {
        Ok(()) => Ok(Json(Status { status: "ready" })),
        Err(e) => {
            tracing::warn!(error = %e, "not ready: database");
            Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "not_ready",
                "the database does not answer",
            ))
        }
    }
}

#[utoipa::path(
    get,
    path = "/api/v1/version",
    tag = "system",
    summary = "Versions of the controller, the API and the schema.",
    responses((status = 200, body = VersionInfo))
)]
async fn version(State(s): State<AppState>) -> Result<Json<VersionInfo>, ApiError> {
    Ok(Json(VersionInfo {
        version: env!("CARGO_PKG_VERSION"),
        api: "v1",
        schema_version: s.store.schema_version().await?,
    }))
}
