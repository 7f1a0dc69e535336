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

use axum::extract::State;
use patronus_api::WgPublicKey;
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::app::AppState;
use crate::auth::{self as a};
use crate::error::{ApiError, extract};
use crate::routes::audit_config;
use crate::routes::auth::AuthRateLimited;
use crate::routes::edge::CREDENTIAL_PREFIX;
use crate::routes::sites::load_site;
use crate::store::enrollment::{self, Refused};
use crate::store::{Actor, now_s};

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(enroll))
}

/// Prefix of an enrolment token.
pub const TOKEN_PREFIX: &str = "pet_";

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

#[utoipa::path(
    post,
    path = "/api/v1/enroll",
    tag = "enrolment",
    summary = "An edge enrols with a token and its public key, and gets its site credential.",
    request_body = EnrollRequest,
    responses((status = 200, body = Enrolled), crate::error::Unauthorized, crate::error::RateLimited, crate::error::Conflict)
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
    let site_id = match enrollment::spend_token(&mut tx, &hash[..], now).await? {
        Ok(id) => id,
        Err(why) => {
            return Err(ApiError::unauthorized(match why {
                Refused::Used => "this enrolment token was already used; ask for a new one",
                Refused::Expired => "this enrolment token has expired; ask for a new one",
                Refused::Unknown => "unknown enrolment token",
            }));
        }
    };
    // Read in the transaction: a second connection taken while this one holds the write lock
    // waits on a pool that other writers, queued behind that lock, may have emptied.
    let site = load_site(&mut tx, site_id).await?;
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
        enrollment::set_link(&mut tx, l.id, &link, now).await?;
    }
    // A roll the replaced machine left unfinished ends here: its next key is not trusted.
    // One edge per site: a new enrolment replaces the old machine's credential.
    let credential = format!("{CREDENTIAL_PREFIX}{}", a::b64url(&a::random_bytes::<32>()));
    let key_rotation = enrollment::enrol(
        &mut tx,
        site_id,
        &req.public_key.to_string(),
        &a::sha256(credential.as_bytes())[..],
        now,
    )
    .await?;
    let actor = Actor {
        id: None,
        name: format!("edge of {}", site.name),
        source: ip.0.to_string(),
    };
    audit_config(
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
