//! `/api/v1/auth`: login, refresh (rotating), logout, and who am I.

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
use crate::store::{Actor, Audit, RefreshOutcome, Store, UserRow, now_ms, now_s};

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
        let ip = client_ip(parts, &state.config.trusted_proxies);
        state
            .auth_limiter
            .check(&state.store, ip, now_ms())
            .await?
            .map_err(|wait| {
                ApiError::too_many("too many login or token requests from this address", wait)
            })?;
        Ok(Self)
    }
}

/// Issues a token pair in a new refresh family.
/// 503 while this controller's signing key is not the one every controller uses (it was
/// replaced, and this one has not read the new key yet): it signs nothing.
pub(crate) fn signing(tokens: &Tokens) -> Result<(), ApiError> {
    if tokens.trusted() {
        Ok(())
    } else {
        Err(key_replaced())
    }
}

pub(crate) fn key_replaced() -> ApiError {
    ApiError::new(
        axum::http::StatusCode::SERVICE_UNAVAILABLE,
        "signing_key_replaced",
        "this controller's signing key was replaced and it has not read the new jwt_key_file \
         yet: it signs no tokens; try another controller",
    )
}

/// Inside a transaction that has written a session: the signing key recorded is still this
/// controller's. Write transactions take turns (SQLite's lock, PostgreSQL's advisory lock), so
/// a rotation either committed before this read, and the session is not made (the transaction
/// is dropped, so rolled back), or commits after this one, and revokes it with the others.
async fn still_the_key(tx: &mut crate::store::Tx, tokens: &Tokens) -> Result<(), ApiError> {
    let recorded = crate::store::settings::signing_key(tx).await?;
    if recorded.is_some_and(|r| r != tokens.fingerprint()) {
        return Err(key_replaced());
    }
    Ok(())
}

async fn issue(
    store: &Store,
    tokens: &Tokens,
    user: &UserRow,
    role: Role,
    actor: &Actor,
) -> Result<TokenResponse, ApiError> {
    signing(tokens)?;
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
    still_the_key(&mut tx, tokens).await?;
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
        access_token: tokens.access(user.id, role, now).ok_or_else(key_replaced)?,
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
    responses((status = 200, body = TokenResponse), crate::error::Unauthorized, crate::error::Forbidden, crate::error::RateLimited)
)]
async fn login(
    State(s): State<AppState>,
    _limit: AuthRateLimited,
    parts: ClientIp,
    extract::Json(req): extract::Json<LoginRequest>,
) -> Result<Json<TokenResponse>, ApiError> {
    crate::server::follow_signing_key(&s).await;
    signing(&s.tokens)?;
    let (user, role) = authenticate(&s, &req.email, req.password, parts.0).await?;
    let actor = Actor {
        id: Some(user.id),
        name: user.email.clone(),
        source: parts.0.to_string(),
    };
    Ok(Json(issue(&s.store, &s.tokens, &user, role, &actor).await?))
}

/// Checks an email and password as a login does, the API's or the dashboard's: the account's
/// lockout, the password (as long for an unknown email as for a wrong password), the failure
/// counted and audited, a disabled account refused. The user and their role.
pub async fn authenticate(
    s: &AppState,
    email: &str,
    password: String,
    ip: std::net::IpAddr,
) -> Result<(UserRow, Role), ApiError> {
    let email = email.trim().to_owned();
    check_lockout(s, &email).await?;
    let user = s.store.user_by_email(&email).await?;
    let hash = user
        .as_ref()
        .map(|u| u.password_hash.clone())
        .unwrap_or_else(|| a::dummy_hash().to_owned());
    // argon2 takes tens of milliseconds of CPU: off the async workers.
    let ok = tokio::task::spawn_blocking(move || a::verify_password(&password, &hash))
        .await
        .map_err(ApiError::internal)?;
    let user = match user {
        Some(u) if ok => u,
        other => {
            let target = other.map_or_else(|| "auth".to_owned(), |u| format!("user/{}", u.id));
            wrong_password(s, &email, &target, "auth.login_failed", ip).await?;
            return Err(ApiError::unauthorized("wrong email or password"));
        }
    };
    s.lockout.succeeded(&s.store, &email).await?;
    if user.disabled {
        let audit = Audit::new(
            Actor::anonymous(&email, ip),
            "auth.login_refused",
            &format!("user/{}", user.id),
            serde_json::json!({ "email": email, "why": "the account is disabled" }),
        );
        s.store.audit_event(audit).await?;
        return Err(ApiError::forbidden("this account is disabled"));
    }
    let role = Role::parse(&user.role).ok_or_else(|| ApiError::internal("bad role in store"))?;
    Ok((user, role))
}

/// 429 while `email`'s account is locked by failed password checks (a login's or a password
/// change's).
pub async fn check_lockout(s: &AppState, email: &str) -> Result<(), ApiError> {
    s.lockout
        .check(&s.store, email, now_ms())
        .await?
        .map_err(|wait| {
            ApiError::too_many(
                "too many failed password checks for this account; it is locked for a while",
                wait,
            )
        })
}

/// A wrong password given for `email` (at login, `auth.login_failed`, or to change one's own,
/// `user.password_failed`): counted towards the account's lockout, and audited with the lockout
/// it starts, if it starts one.
pub async fn wrong_password(
    s: &AppState,
    email: &str,
    target: &str,
    action: &'static str,
    source: std::net::IpAddr,
) -> Result<(), ApiError> {
    let lock = s.lockout.failed(&s.store, email, now_ms()).await?;
    let actor = Actor::anonymous(email, source);
    let details = serde_json::json!({ "email": email });
    s.store
        .audit_event(Audit::new(actor.clone(), action, target, details))
        .await?;
    if let Some(lock) = lock {
        tracing::warn!(%email, %source, seconds = lock.as_secs(), "account locked after failed password checks");
        let details = serde_json::json!({ "email": email, "seconds": lock.as_secs() });
        s.store
            .audit_event(Audit::new(actor, "auth.locked", target, details))
            .await?;
    }
    Ok(())
}

/// The client's address, as an extractor.
#[derive(Debug)]
pub struct ClientIp(pub std::net::IpAddr);

impl FromRequestParts<AppState> for ClientIp {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        Ok(Self(client_ip(parts, &state.config.trusted_proxies)))
    }
}

#[utoipa::path(
    post,
    path = "/api/v1/auth/refresh",
    tag = "auth",
    summary = "Rotate a refresh token for a new token pair.",
    request_body = RefreshRequest,
    responses((status = 200, body = TokenResponse), crate::error::Unauthorized, crate::error::RateLimited)
)]
async fn refresh(
    State(s): State<AppState>,
    _limit: AuthRateLimited,
    ClientIp(ip): ClientIp,
    extract::Json(req): extract::Json<RefreshRequest>,
) -> Result<Json<TokenResponse>, ApiError> {
    crate::server::follow_signing_key(&s).await;
    signing(&s.tokens)?;
    let old = a::sha256(req.refresh_token.as_bytes());
    let (token, new) = Tokens::refresh();
    let expires = now_s() + s.tokens.refresh_ttl.as_secs() as i64;
    let user_id = match s
        .store
        .rotate_refresh(&old, &new, expires, &s.tokens.fingerprint())
        .await?
    {
        RefreshOutcome::Rotated { user_id } => user_id,
        RefreshOutcome::KeyReplaced => {
            crate::server::follow_signing_key(&s).await;
            return Err(key_replaced());
        }
        RefreshOutcome::Invalid => {
            return Err(ApiError::invalid_token(
                "the refresh token is invalid or expired",
            ));
        }
        RefreshOutcome::Revoked => {
            return Err(ApiError::invalid_token(
                "the session was ended (a logout, a password or role change, a replayed token, or the \
                 controller's secrets rotated); log in again",
            ));
        }
        RefreshOutcome::Reused { user_id } => {
            tracing::warn!(
                user_id,
                %ip,
                "a rotated refresh token was used again; its session is revoked"
            );
            let audit = Audit::new(
                Actor {
                    id: Some(user_id),
                    name: format!("user/{user_id}"),
                    source: ip.to_string(),
                },
                "auth.session_revoked",
                &format!("user/{user_id}"),
                serde_json::json!({ "why": "a refresh token was used twice" }),
            );
            s.store.audit_event(audit).await?;
            return Err(ApiError::invalid_token(
                "this refresh token was already used; the session is revoked, log in again",
            ));
        }
    };
    let user = s
        .store
        .user(user_id)
        .await?
        .filter(|u| !u.disabled)
        .ok_or_else(|| ApiError::invalid_token("the refresh token is invalid or expired"))?;
    let role = Role::parse(&user.role).ok_or_else(|| ApiError::internal("bad role in store"))?;
    Ok(Json(TokenResponse {
        access_token: s
            .tokens
            .access(user.id, role, now_s())
            .ok_or_else(key_replaced)?,
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
    responses((status = 204, description = "Logged out"), crate::error::BadRequest, crate::error::NotFound)
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
    let audit = Audit::new(
        p.actor(),
        "auth.logout",
        &format!("user/{user}"),
        serde_json::json!({}),
    );
    s.store.audit_event(audit).await?;
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
    responses((status = 200, body = Me))
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
