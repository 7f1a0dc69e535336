//! `/api/v1/users`: accounts and roles. Admins manage them; everyone may read themselves and
//! change their own password.

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use patronus_api::FieldErrors;
use serde::Deserialize;
use serde_json::json;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::app::{Admin, AppState, UserOrAdmin};
use crate::auth::{self as a, Role};

use crate::error::{ApiError, extract};
use crate::routes::auth::{AuthRateLimited, check_lockout, wrong_password};
use crate::routes::{Page, Paging, check_if_match, created, with_etag, write_error};
use crate::store::{Actor, Store, UserQuery, UserRow, UserSort, now_s, users};

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_users, create_user))
        .routes(routes!(show_user, update_user, remove_user))
        .routes(routes!(set_password))
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewUser {
    /// One `@` between a name and a domain, no spaces, at most 254 characters; unique
    /// (without regard to case).
    #[schema(
        pattern = r"^[^@\s\x00-\x1f\x7f]+@[^@\s\x00-\x1f\x7f]+$",
        max_length = 254
    )]
    pub email: String,
    #[serde(default)]
    #[schema(max_length = 200)]
    pub name: String,
    pub role: Role,
    /// 12 to 1024 characters, mixing at least three of: lower case, upper case, digits, other
    /// characters; not containing the email's name.
    #[schema(min_length = 12, max_length = 1024)]
    pub password: String,
}

#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UserPatch {
    #[schema(
        pattern = r"^[^@\s\x00-\x1f\x7f]+@[^@\s\x00-\x1f\x7f]+$",
        max_length = 254
    )]
    pub email: Option<String>,
    #[schema(max_length = 200)]
    pub name: Option<String>,
    pub role: Option<Role>,
    pub disabled: Option<bool>,
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PasswordChange {
    /// Required when changing one's own password.
    pub current_password: Option<String>,
    /// The rules of [`NewUser::password`].
    #[schema(min_length = 12, max_length = 1024)]
    pub new_password: String,
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Items per page, 1 to 500; 50 when left out.
    #[param(minimum = 1, maximum = 500)]
    pub limit: Option<i64>,
    /// Items to skip; 0 when left out.
    #[param(minimum = 0, maximum = 9007199254740991.0)]
    pub offset: Option<i64>,
    pub role: Option<Role>,
    pub disabled: Option<bool>,
    /// Part of the email or name.
    pub q: Option<String>,
    /// `email`, `-email`, `name`, `role`, `created_at`, `id` (default).
    pub sort: Option<String>,
}

pub fn email_problem(email: &str) -> Option<&'static str> {
    let mut parts = email.split('@');
    let (local, domain) = (parts.next().unwrap_or(""), parts.next());
    if email.chars().count() > 254 {
        Some("must be at most 254 characters")
    } else if email.chars().any(|c| c.is_whitespace() || c.is_control()) {
        Some("must not contain spaces")
    } else if local.is_empty() || domain.is_none_or(str::is_empty) || parts.next().is_some() {
        Some("must be an email address (name@domain)")
    } else {
        None
    }
}

/// Creates a user; shared with the offline command and the first-admin bootstrap.
pub async fn add_user(store: &Store, actor: &Actor, new: NewUser) -> Result<UserRow, ApiError> {
    let email = new.email.trim().to_owned();
    let mut e = FieldErrors::default();
    if let Some(p) = email_problem(&email) {
        e.push("email", p);
    }
    if new.name.chars().count() > 200 {
        e.push("name", "must be at most 200 characters");
    }
    if let Some(p) = a::password_problem(&new.password, &email) {
        e.push("password", p);
    }
    e.into_result().map_err(ApiError::validation)?;
    let password = new.password;
    let hash = tokio::task::spawn_blocking(move || a::hash_password(&password))
        .await
        .map_err(ApiError::internal)?
        .map_err(ApiError::internal)?;
    let now = now_s();
    let mut tx = store.begin().await?;
    let id = users::insert(&mut tx, (&email, &new.name, new.role.as_str()), &hash, now)
        .await
        .map_err(|e| write_error(e, "user", || format!("a user with email {email} exists")))?;
    Store::audit(
        &mut tx,
        actor,
        "user.create",
        &format!("user/{id}"),
        json!({ "email": email, "role": new.role }),
    )
    .await?;
    tx.commit().await?;
    store
        .user(id)
        .await?
        .ok_or_else(|| ApiError::internal("the new user vanished"))
}

#[utoipa::path(
    get,
    path = "/api/v1/users",
    tag = "users",
    summary = "List users.",
    params(ListQuery),
    security(("bearer" = ["admin"])),
    responses((status = 200, body = Page<UserRow>))
)]
async fn list_users(
    State(s): State<AppState>,
    Admin(_p): Admin,
    extract::Query(q): extract::Query<ListQuery>,
) -> Result<Json<Page<UserRow>>, ApiError> {
    let paging = Paging::new(q.limit, q.offset)?;
    let sort = q.sort.as_deref().unwrap_or("id");
    let (descending, key) = match sort.strip_prefix('-') {
        Some(k) => (true, k),
        None => (false, sort),
    };
    let sort = match key {
        "id" => UserSort::Id,
        "email" => UserSort::Email,
        "name" => UserSort::Name,
        "role" => UserSort::Role,
        "created_at" => UserSort::CreatedAt,
        _ => {
            return Err(ApiError::field(
                "sort",
                "must be one of id, email, name, role, created_at (- in front for descending)",
            ));
        }
    };
    let (items, total) = s
        .store
        .users(&UserQuery {
            role: q.role.map(|r| r.as_str().to_owned()),
            disabled: q.disabled,
            search: q.q,
            sort,
            descending,
            limit: paging.limit,
            offset: paging.offset,
        })
        .await?;
    Ok(Json(Page::new(items, total, paging)))
}

#[utoipa::path(
    post,
    path = "/api/v1/users",
    tag = "users",
    summary = "Create a user.",
    request_body = NewUser,
    security(("bearer" = ["admin"])),
    responses((status = 201, body = UserRow), crate::error::Conflict)
)]
async fn create_user(
    State(s): State<AppState>,
    Admin(p): Admin,
    extract::Json(new): extract::Json<NewUser>,
) -> Result<Response, ApiError> {
    let u = add_user(&s.store, &p.actor(), new).await?;
    Ok(created(format!("/api/v1/users/{}", u.id), u.version, u))
}

#[utoipa::path(
    get,
    path = "/api/v1/users/{id}",
    tag = "users",
    summary = "Read a user.",
    params(("id" = i64, Path, description = "The object's id")),
    security(("bearer" = ["admin"]), ("bearer" = ["self"])),
    responses((status = 200, body = UserRow))
)]
async fn show_user(
    State(s): State<AppState>,
    UserOrAdmin { id, .. }: UserOrAdmin,
) -> Result<Response, ApiError> {
    let u = s
        .store
        .user(id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("user {id}")))?;
    Ok(with_etag(StatusCode::OK, u.version, u))
}

#[utoipa::path(
    patch,
    path = "/api/v1/users/{id}",
    tag = "users",
    summary = "Change a user (If-Match).",
    params(("id" = i64, Path, description = "The object's id")),
    request_body = UserPatch,
    security(("bearer" = ["admin"])),
    responses((status = 200, body = UserRow), crate::error::Conflict)
)]
async fn update_user(
    State(s): State<AppState>,
    Admin(p): Admin,
    extract::Path(id): extract::Path<i64>,
    headers: HeaderMap,
    extract::Json(patch): extract::Json<UserPatch>,
) -> Result<Response, ApiError> {
    // Read in the write transaction: two admins demoting each other at once cannot both see
    // the other as the admin who stays.
    let mut tx = s.store.begin().await?;
    let cur = crate::store::user(&mut tx, id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("user {id}")))?;
    check_if_match(&headers, cur.version)?;
    let mut e = FieldErrors::default();
    let email = patch
        .email
        .as_deref()
        .map(str::trim)
        .unwrap_or(&cur.email)
        .to_owned();
    if let Some(p) = email_problem(&email) {
        e.push("email", p);
    }
    let name = patch.name.clone().unwrap_or_else(|| cur.name.clone());
    if name.chars().count() > 200 {
        e.push("name", "must be at most 200 characters");
    }
    e.into_result().map_err(ApiError::validation)?;
    let role = patch.role.map(Role::as_str).unwrap_or(&cur.role).to_owned();
    let disabled = patch.disabled.unwrap_or(cur.disabled);
    let stays_admin = role == "admin" && !disabled;
    if cur.role == "admin"
        && !cur.disabled
        && !stays_admin
        && users::other_admins(&mut tx, id).await? == 0
    {
        return Err(ApiError::conflict(
            "this is the last enabled admin; make another admin first",
        ));
    }
    users::update(
        &mut tx,
        (id, cur.version),
        (&email, &name, &role, disabled),
        now_s(),
    )
    .await
    .map_err(|e| write_error(e, "user", || format!("a user with email {email} exists")))?;
    if disabled || role != cur.role {
        // Sessions end with the access they were granted under.
        Store::revoke_all_refresh(&mut tx, id).await?;
    }
    Store::audit(
        &mut tx,
        &p.actor(),
        "user.update",
        &format!("user/{id}"),
        json!({ "email": patch.email, "name": patch.name, "role": patch.role, "disabled": patch.disabled }),
    )
    .await?;
    let u = crate::store::user(&mut tx, id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("user {id}")))?;
    tx.commit().await?;
    Ok(with_etag(StatusCode::OK, u.version, u))
}

#[utoipa::path(
    delete,
    path = "/api/v1/users/{id}",
    tag = "users",
    summary = "Delete a user.",
    params(("id" = i64, Path, description = "The object's id")),
    security(("bearer" = ["admin"])),
    responses((status = 204, description = "Deleted"), crate::error::Conflict)
)]
async fn remove_user(
    State(s): State<AppState>,
    Admin(p): Admin,
    extract::Path(id): extract::Path<i64>,
    headers: HeaderMap,
) -> Result<StatusCode, ApiError> {
    if p.user_id() == Some(id) {
        return Err(ApiError::conflict("you cannot delete yourself"));
    }
    let mut tx = s.store.begin().await?;
    let cur = crate::store::user(&mut tx, id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("user {id}")))?;
    check_if_match(&headers, cur.version)?;
    if cur.role == "admin" && !cur.disabled && users::other_admins(&mut tx, id).await? == 0 {
        return Err(ApiError::conflict("this is the last enabled admin"));
    }
    users::delete(&mut tx, id).await?;
    Store::audit(
        &mut tx,
        &p.actor(),
        "user.delete",
        &format!("user/{id}"),
        json!({ "email": cur.email }),
    )
    .await?;
    tx.commit().await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(
    post,
    path = "/api/v1/users/{id}/password",
    tag = "users",
    summary = "Change a password (your own needs the current one).",
    params(("id" = i64, Path, description = "The object's id")),
    request_body = PasswordChange,
    security(("bearer" = ["admin"]), ("bearer" = ["self"])),
    responses((status = 204, description = "Changed"), crate::error::RateLimited)
)]
async fn set_password(
    State(s): State<AppState>,
    UserOrAdmin {
        principal: p,
        id,
        own,
    }: UserOrAdmin,
    _limit: AuthRateLimited,
    extract::Json(req): extract::Json<PasswordChange>,
) -> Result<StatusCode, ApiError> {
    let target = s
        .store
        .user(id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("user {id}")))?;
    if own {
        // A stolen access token must not be a way around the login's lockout: a wrong current
        // password counts as a failed login, and a locked account cannot try.
        check_lockout(&s, &target.email).await?;
        let Some(current) = req.current_password else {
            return Err(ApiError::field(
                "current_password",
                "is required to change your own password",
            ));
        };
        let hash = target.password_hash.clone();
        let ok = tokio::task::spawn_blocking(move || a::verify_password(&current, &hash))
            .await
            .map_err(ApiError::internal)?;
        if !ok {
            wrong_password(
                &s,
                &target.email,
                &format!("user/{id}"),
                "user.password_failed",
                p.ip,
            )
            .await?;
            return Err(ApiError::field("current_password", "is wrong"));
        }
        s.lockout.succeeded(&s.store, &target.email).await?;
    }
    if let Some(problem) = a::password_problem(&req.new_password, &target.email) {
        return Err(ApiError::field("new_password", problem));
    }
    let new = req.new_password;
    let hash = tokio::task::spawn_blocking(move || a::hash_password(&new))
        .await
        .map_err(ApiError::internal)?
        .map_err(ApiError::internal)?;
    let mut tx = s.store.begin().await?;
    users::set_password(&mut tx, id, &hash, now_s()).await?;
    Store::revoke_all_refresh(&mut tx, id).await?;
    Store::audit(
        &mut tx,
        &p.actor(),
        "user.password",
        &format!("user/{id}"),
        json!({}),
    )
    .await?;
    tx.commit().await?;
    Ok(StatusCode::NO_CONTENT)
}
