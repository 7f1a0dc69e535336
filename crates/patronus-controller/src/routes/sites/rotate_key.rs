//! `/api/v1/sites/{id}/rotate-key`: asking a site's edge to roll its key.

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
use crate::store::now_s;

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(rotate_key))
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
    responses((status = 202, body = Rotation), crate::error::Conflict)
)]
async fn rotate_key(
    State(s): State<AppState>,
    Operator(p): Operator,
    extract::Path(id): extract::Path<i64>,
) -> Result<Response, ApiError> {
    let mut tx = s.store.begin().await?;
    let site = load_site(&mut tx, id).await?;
    if let Some(other) = rolling_neighbour(&mut tx, id).await? {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "peer_rolling",
            format!("{other} is rolling its key: one roll at a time between connected sites"),
        ));
    }
    let Some(rotation) = crate::store::sites::ask_rotation(&mut tx, id, now_s()).await? else {
        return Err(ApiError::conflict(format!(
            "site {} has no edge yet: enrol one first",
            site.name
        )));
    };
    audit_config(
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

/// The name of a site connected to site `id` by the topology (or `id` itself) whose edge is
/// rolling its key, if one is: two connected sites rolling at once could each accept the
/// other's next key with its own old one.
pub(crate) async fn rolling_neighbour(
    conn: &mut crate::store::Conn,
    id: i64,
) -> Result<Option<String>, ApiError> {
    let rolling = crate::store::sites::rolling(&mut *conn).await?;
    if rolling.is_empty() {
        return Ok(None);
    }
    if let Some((_, name)) = rolling.iter().find(|(r, _)| *r == id) {
        return Ok(Some(name.clone()));
    }
    let t = crate::routes::topology::load(&mut *conn).await?;
    let sites = crate::routes::sites::load_sites(&mut *conn).await?;
    let by_id = |id: i64| sites.iter().find(|s| s.id == id);
    let Some(me) = by_id(id) else {
        return Ok(None);
    };
    Ok(rolling
        .into_iter()
        .find(|(r, _)| by_id(*r).is_some_and(|o| crate::routes::topology::connected(&t, me, o)))
        .map(|(_, name)| name))
}
