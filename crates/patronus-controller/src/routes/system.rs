//! Liveness, readiness and version: public, for load balancers and monitoring.

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{Value, json};

use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};

use crate::app::{AppState, Principal};
use crate::error::ApiError;
use crate::metrics::gauge;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/api/v1/version", get(version))
        .route("/metrics", get(metrics))
}

/// Prometheus text format. Needs a viewer's credentials: give Prometheus an API key
/// (`authorization: { credentials: pak_... }` in its scrape configuration).
async fn metrics(State(s): State<AppState>, _p: Principal) -> Result<Response, ApiError> {
    let mut out = String::new();
    s.http.render(&mut out);
    let pool = s.store.pool();
    gauge(
        &mut out,
        "patronus_db_pool_connections",
        "Database connections, by state.",
        &[
            ("{state=\"idle\"}".into(), pool.num_idle() as f64),
            (
                "{state=\"busy\"}".into(),
                (pool.size() as usize).saturating_sub(pool.num_idle()) as f64,
            ),
        ],
    );
    let mut counts = Vec::new();
    for (kind, sql) in [
        ("users", "SELECT COUNT(*) FROM users"),
        ("sites", "SELECT COUNT(*) FROM sites"),
        ("links", "SELECT COUNT(*) FROM links"),
        ("sla_classes", "SELECT COUNT(*) FROM sla_classes"),
        ("policies", "SELECT COUNT(*) FROM policies"),
        (
            "api_keys",
            "SELECT COUNT(*) FROM api_keys WHERE revoked = 0",
        ),
    ] {
        let n: i64 = sqlx::query_scalar(sql).fetch_one(pool).await?;
        counts.push((format!("{{kind=\"{kind}\"}}"), n as f64));
    }
    gauge(
        &mut out,
        "patronus_objects",
        "Objects in the store, by kind.",
        &counts,
    );
    let mut r = out.into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    Ok(r)
}

/// The process answers.
async fn health() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

/// The database answers.
async fn ready(State(s): State<AppState>) -> Result<Json<Value>, ApiError> {
    match s.store.ping().await {
        Ok(()) => Ok(Json(json!({ "status": "ready" }))),
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

async fn version(State(s): State<AppState>) -> Result<Json<Value>, ApiError> {
    Ok(Json(json!({
        "version": env!("CARGO_PKG_VERSION"),
        "api": "v1",
        "schema_version": s.store.schema_version().await?,
    })))
}
