//! `/api/v1/edge/key`: an edge's steps in rolling its key.

use axum::extract::State;
use axum::http::StatusCode;
use patronus_api::WgPublicKey;
use serde::Deserialize;
use serde_json::json;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::app::AppState;
use crate::error::{ApiError, extract};
use crate::routes::audit_config;
use crate::routes::edge::SiteCaller;
use crate::routes::sites::rotate_key::rolling_neighbour;
use crate::store::sites as store;
use crate::store::{Actor, now_s};

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(edge_key))
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
    responses((status = 204, description = "Recorded"), crate::error::Conflict)
)]
async fn edge_key(
    State(s): State<AppState>,
    site: SiteCaller,
    ip: crate::routes::auth::ClientIp,
    extract::Json(step): extract::Json<KeyStep>,
) -> Result<StatusCode, ApiError> {
    let _heard = s.heard_from(site.site_id);
    let now = now_s();
    let mut tx = s.store.begin().await?;
    let (current, next) = store::keys(&mut tx, site.site_id).await?;
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
            let taken = store::key_owner(&mut tx, site.site_id, &k).await?;
            if let Some(other) = taken {
                return Err(ApiError::field(
                    "next",
                    format!("is site {other}'s key: make a new one"),
                ));
            }
            if let Some(other) = rolling_neighbour(&mut tx, site.site_id)
                .await?
                .filter(|o| *o != site.site)
            {
                return Err(ApiError::new(
                    StatusCode::CONFLICT,
                    "peer_rolling",
                    format!("{other} is rolling its key: try again when it is done"),
                ));
            }
            store::set_next_key(&mut tx, site.site_id, &k, now).await?;
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
            store::commit_key(&mut tx, site.site_id, &k, now).await?;
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
    // The peers' configurations carry the key (or the next one).
    audit_config(
        &mut tx,
        &actor,
        action,
        &format!("site/{}", site.site_id),
        detail,
    )
    .await?;
    tx.commit().await?;
    Ok(StatusCode::NO_CONTENT)
}
