//! `/api/v1/edge/...`: what an enrolled edge asks and tells about its own site, authenticated by
//! its site credential.

pub mod config;
pub mod key;
pub mod telemetry;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use utoipa_axum::router::OpenApiRouter;

use crate::app::{AppState, bearer};
use crate::auth::{self as a};
use crate::error::ApiError;

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .merge(config::routes())
        .merge(key::routes())
        .merge(telemetry::routes())
}

/// Prefix of a site credential.
pub const CREDENTIAL_PREFIX: &str = "psc_";

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
            return Err(ApiError::invalid_token(
                "this is for enrolled edges: authenticate with the site's credential",
            ));
        }
        let hash = a::sha256(token.as_bytes());
        let (site_id, site) = crate::store::enrollment::site_of_credential(
            &mut *state.store.conn().await?,
            &hash[..],
        )
        .await?
        .ok_or_else(|| ApiError::invalid_token("the site credential is invalid or revoked"))?;
        Ok(Self { site_id, site })
    }
}
