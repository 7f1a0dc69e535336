//! `/api/v1/sites/{id}/enrollment-tokens`: one-time tokens an edge enrols with.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::app::{AppState, Operator};
use crate::auth::{self as a};
use crate::error::{ApiError, extract};
use crate::routes::enroll::TOKEN_PREFIX;
use crate::routes::sites::load_site;
use crate::store::{Store, now_s};

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(create_enrollment_token))
}

#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewToken {
    /// 1 to 10080 (a week); 60 when left out.
    #[serde(default)]
    #[schema(minimum = 1, maximum = 10080)]
    pub expires_in_minutes: Option<u32>,
}

#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TokenView {
    pub site_id: i64,
    /// Shown once: give it to the edge (`patronus edge --controller URL --token T`).
    pub token: String,
    pub expires_at: i64,
}

#[utoipa::path(
    post,
    path = "/api/v1/sites/{id}/enrollment-tokens",
    tag = "enrolment",
    summary = "A one-time, expiring token that lets an edge enrol as this site.",
    params(("id" = i64, Path, description = "The site's id")),
    request_body = NewToken,
    security(("bearer" = ["operator"])),
    responses((status = 201, body = TokenView))
)]
async fn create_enrollment_token(
    State(s): State<AppState>,
    Operator(p): Operator,
    extract::Path(id): extract::Path<i64>,
    extract::Json(req): extract::Json<NewToken>,
) -> Result<Response, ApiError> {
    let minutes = valid_minutes(req.expires_in_minutes)?;
    let site = load_site(&mut *s.store.conn().await?, id).await?;
    let mut tx = s.store.begin().await?;
    let (token, expires_at) = mint(&mut tx, id, minutes, p.user_id()).await?;
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

/// `expires_in_minutes` as asked (60 when left out), or the field's error.
pub(crate) fn valid_minutes(asked: Option<u32>) -> Result<u32, ApiError> {
    let minutes = asked.unwrap_or(60);
    if !(1..=10_080).contains(&minutes) {
        return Err(ApiError::field(
            "expires_in_minutes",
            "must be between 1 and 10080",
        ));
    }
    Ok(minutes)
}

/// A new one-time enrolment token for site `id`, valid `minutes`, stored (its hash) in `tx`:
/// the token (shown once) and when it expires.
pub(crate) async fn mint(
    tx: &mut crate::store::Tx,
    id: i64,
    minutes: u32,
    created_by: Option<i64>,
) -> Result<(String, i64), ApiError> {
    let token = format!("{TOKEN_PREFIX}{}", a::b64url(&a::random_bytes::<32>()));
    let now = now_s();
    let expires_at = now + i64::from(minutes) * 60;
    crate::store::enrollment::create_token(
        tx,
        id,
        &a::sha256(token.as_bytes())[..],
        expires_at,
        created_by,
        now,
    )
    .await?;
    Ok((token, expires_at))
}
