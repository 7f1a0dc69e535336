//! `/api/v1/auth`: login, refresh (rotating), logout, and who am I.

use std::time::Instant;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use axum::Json;
use axum::extract::{FromRequestParts, State};
use axum::http::StatusCode;
use axum::http::request::Parts;
use serde::{Deserialize, Serialize};

use crate::app::{AppState, Principal, Subject, client_ip};
use crate::auth::{self as a, Role, Tokens};
use crate::error::{ApiError, extract};
use crate::store::{Actor, RefreshOutcome, Store, UserRow, now_s};

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(login))
        .routes(routes!(refresh))
        .routes(routes!(logout))
        .routes(routes!(me))
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LoginRequest {
    pub email: String,
    pub password: String,
}

#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TokenResponse {
    pub access_token: String,
    pub refresh_token: String,
    /// Always `Bearer`.
    pub token_type: String,
    /// Seconds the access token is valid for.
    pub expires_in: u64,
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RefreshRequest {
    pub refresh_token: String,
}

/// Admits the request under the per-client limit on login and token requests (429 with
/// `Retry-After` beyond it).
#[derive(Debug)]
pub struct AuthRateLimited;

impl FromRequestParts<AppState> for AuthRateLimited {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        state
            .auth_limiter
            .check(client_ip(parts), Instant::now())
            .map_err(|wait| {
                ApiError::too_many("too many login or token requests from this address", wait)
            })?;
        Ok(Self)
    }
}

/// Issues a token pair in a new refresh family.
async fn issue(
    store: &Store,
    tokens: &Tokens,
    user: &UserRow,
    role: Role,
    actor: &Actor,
) -> Result<TokenResponse, ApiError> {
    let now = now_s();
    let (refresh, hash) = Tokens::refresh();
    let family = a::b64url(&a::random_bytes::<16>());
    let mut tx = store.begin().await?;
    Store::insert_refresh(
        &mut tx,
        user.id,
        &family,
        &hash,
        now + tokens.refresh_ttl.as_secs() as i64,
    )
    .await?;
    Store::audit(
        &mut tx,
        actor,
        "auth.login",
        &format!("user/{}", user.id),
        serde_json::json!({}),
    )
    .await?;
    tx.commit().await?;
    Ok(TokenResponse {
        access_token: tokens.access(user.id, role, now),
        refresh_token: refresh,
        token_type: "Bearer".into(),
        expires_in: tokens.access_ttl.as_secs(),
    })
}

#[utoipa::path(
    post,
    path = "/api/v1/auth/login",
    tag = "auth",
    summary = "Log in with email and password.",
    request_body = LoginRequest,
    responses((status = 200, body = TokenResponse), crate::error::ApiErrors)
)]
async fn login(
    State(s): State<AppState>,
    _limit: AuthRateLimited,
    parts: ClientIp,
    extract::Json(req): extract::Json<LoginRequest>,
) -> Result<Json<TokenResponse>, ApiError> {
    let now = Instant::now();
    let email = req.email.trim().to_owned();
    s.lockout.check(&email, now).map_err(|wait| {
        ApiError::too_many(
            "too many failed logins for this account; it is locked for a while",
            wait,
        )
    })?;
    let user = s.store.user_by_email(&email).await?;
    let hash = user
        .as_ref()
        .map(|u| u.password_hash.clone())
        .unwrap_or_else(|| a::dummy_hash().to_owned());
    let password = req.password;
    // argon2 takes tens of milliseconds of CPU: off the async workers.
    let ok = tokio::task::spawn_blocking(move || a::verify_password(&password, &hash))
        .await
        .map_err(ApiError::internal)?;
    let user = match user {
        Some(u) if ok => u,
        _ => {
            s.lockout.failed(&email, now);
            return Err(ApiError::unauthorized("wrong email or password"));
        }
    };
    s.lockout.succeeded(&email);
    if user.disabled {
        return Err(ApiError::forbidden("this account is disabled"));
    }
    let role = Role::parse(&user.role).ok_or_else(|| ApiError::internal("bad role in store"))?;
    let actor = Actor {
        id: Some(user.id),
        name: user.email.clone(),
        source: parts.0.to_string(),
    };
    Ok(Json(issue(&s.store, &s.tokens, &user, role, &actor).await?))
}

/// The client's address, as an extractor.
#[derive(Debug)]
pub struct ClientIp(pub std::net::IpAddr);

impl<S: Send + Sync> FromRequestParts<S> for ClientIp {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        Ok(Self(client_ip(parts)))
    }
}

#[utoipa::path(
    post,
    path = "/api/v1/auth/refresh",
    tag = "auth",
    summary = "Rotate a refresh token for a new token pair.",
    request_body = RefreshRequest,
    responses((status = 200, body = TokenResponse), crate::error::ApiErrors)
)]
async fn refresh(
    State(s): State<AppState>,
    _limit: AuthRateLimited,
    extract::Json(req): extract::Json<RefreshRequest>,
) -> Result<Json<TokenResponse>, ApiError> {
    let old = a::sha256(req.refresh_token.as_bytes());
    let (token, new) = Tokens::refresh();
    let expires = now_s() + s.tokens.refresh_ttl.as_secs() as i64;
    let user_id = match s.store.rotate_refresh(&old, &new, expires).await? {
        RefreshOutcome::Rotated { user_id } => user_id,
        RefreshOutcome::Invalid => {
            return Err(ApiError::unauthorized(
                "the refresh token is invalid or expired",
            ));
        }
        RefreshOutcome::Reused => {
            tracing::warn!("a rotated refresh token was used again; its session is revoked");
            return Err(ApiError::unauthorized(
                "this refresh token was already used; the session is revoked, log in again",
            ));
        }
    };
    let user = s
        .store
        .user(user_id)
        .await?
        .filter(|u| !u.disabled)
        .ok_or_else(|| ApiError::unauthorized("the refresh token is invalid or expired"))?;
    let role = Role::parse(&user.role).ok_or_else(|| ApiError::internal("bad role in store"))?;
    Ok(Json(TokenResponse {
        access_token: s.tokens.access(user.id, role, now_s()),
        refresh_token: token,
        token_type: "Bearer".into(),
        expires_in: s.tokens.access_ttl.as_secs(),
    }))
}

/// Ends the session the refresh token belongs to (the access token lapses on its own within
/// its short lifetime).
#[utoipa::path(
    post,
    path = "/api/v1/auth/logout",
    tag = "auth",
    summary = "End the session a refresh token belongs to.",
    request_body = RefreshRequest,
    security(("bearer" = ["viewer"])),
    responses((status = 204, description = "Logged out"), crate::error::ApiErrors)
)]
async fn logout(
    State(s): State<AppState>,
    p: Principal,
    extract::Json(req): extract::Json<RefreshRequest>,
) -> Result<StatusCode, ApiError> {
    let hash = a::sha256(req.refresh_token.as_bytes());
    let Some(user) = p.user_id() else {
        return Err(ApiError::bad_request(
            "an API key has no session to log out of",
        ));
    };
    if !s.store.revoke_refresh(&hash, user).await? {
        return Err(ApiError::not_found("that refresh token of yours"));
    }
    Ok(StatusCode::NO_CONTENT)
}

/// Who is calling: a user, or an API key with its role.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum Me {
    User(UserRow),
    ApiKey { api_key: KeyRef, role: Role },
}

/// An API key, by id and name (never its secret).
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct KeyRef {
    pub id: i64,
    pub name: String,
}

/// The calling user, or for an API key its id, name and role.
#[utoipa::path(
    get,
    path = "/api/v1/auth/me",
    tag = "auth",
    summary = "The calling user (or API key).",
    security(("bearer" = ["viewer"])),
    responses((status = 200, body = Me), crate::error::ApiErrors)
)]
async fn me(p: Principal) -> Json<Me> {
    Json(match p.subject {
        Subject::User(u) => Me::User(u),
        Subject::ApiKey { id, name } => Me::ApiKey {
            api_key: KeyRef { id, name },
            role: p.role,
        },
    })
}
