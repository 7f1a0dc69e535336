//! `/api/v1/sites/{id}/replace-edge`: a site's edge machine is lost (dead, stolen, or being
//! swapped); a new machine takes its place by enrolling with a new token, with a key of its
//! own (an edge's private key never leaves the machine that made it, so nothing is restored
//! onto the new one).

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::app::{AppState, Operator};
use crate::error::{ApiError, extract};
use crate::routes::audit_config;
use crate::routes::sites::load_site;
use crate::store::{enrollment, now_s};

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(replace_edge))
}

#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReplaceEdge {
    /// 1 to 10080 (a week); 60 when left out.
    #[serde(default)]
    #[schema(minimum = 1, maximum = 10080)]
    pub expires_in_minutes: Option<u32>,
    /// Leave the current machine working until the new one enrols (a planned swap). By
    /// default the lost machine is cut off now: its credential is revoked, its key forgotten
    /// (its peers drop it at once), and the site's unused enrolment tokens expire.
    #[serde(default)]
    pub keep_current: bool,
}

#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Replacement {
    pub site_id: i64,
    /// Shown once: the new machine enrols with it (`patronus edge run --local edge.toml
    /// --token T`).
    pub token: String,
    pub expires_at: i64,
    /// Whether the old machine was cut off (its credential revoked, its key forgotten).
    pub cut_off: bool,
}

#[utoipa::path(
    post,
    path = "/api/v1/sites/{id}/replace-edge",
    tag = "enrolment",
    summary = "Replace a site's edge machine: cut the old one off (unless keep_current) and get \
               a one-time token for the new one.",
    params(("id" = i64, Path, description = "The site's id")),
    request_body = ReplaceEdge,
    security(("bearer" = ["operator"])),
    responses((status = 201, body = Replacement))
)]
async fn replace_edge(
    State(s): State<AppState>,
    Operator(p): Operator,
    extract::Path(id): extract::Path<i64>,
    extract::Json(req): extract::Json<ReplaceEdge>,
) -> Result<Response, ApiError> {
    let minutes = super::enrollment_tokens::valid_minutes(req.expires_in_minutes)?;
    let mut tx = s.store.begin().await?;
    let site = load_site(&mut tx, id).await?;
    let (mut revoked, mut forgot) = (0, false);
    if !req.keep_current {
        revoked = enrollment::revoke_credentials(&mut tx, Some(id)).await?;
        forgot = enrollment::forget_edge(&mut tx, id, now_s()).await?;
        // Tokens handed out before (perhaps with the lost machine) enrol nothing.
        enrollment::expire_tokens(&mut tx, Some(id), now_s()).await?;
    }
    let (token, expires_at) =
        super::enrollment_tokens::mint(&mut tx, id, minutes, p.user_id()).await?;
    audit_config(
        &mut tx,
        &p.actor(),
        "site.replace_edge",
        &format!("site/{id}"),
        json!({
            "site": site.name,
            "keep_current": req.keep_current,
            "credentials_revoked": revoked,
            "key_forgotten": forgot,
            "expires_at": expires_at,
        }),
    )
    .await?;
    tx.commit().await?;
    let body = Replacement {
        site_id: id,
        token,
        expires_at,
        cut_off: !req.keep_current,
    };
    Ok((StatusCode::CREATED, axum::Json(body)).into_response())
}
