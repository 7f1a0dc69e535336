//! One error shape for every response that is not a success:
//! `{"error": {"code": "...", "message": "...", "details": ...}}`.

use axum::Json;
use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use patronus_api::FieldErrors;
use serde::Serialize;

/// An API error: a status, a stable machine-readable code, a message for people, and details
/// (the fields of a validation error).
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub details: Option<serde_json::Value>,
    /// Seconds, for 429.
    pub retry_after: Option<u64>,
    /// For 401: the RFC 6750 `error` of the `WWW-Authenticate` challenge (`invalid_token` when a
    /// credential was presented and refused; none when none was presented).
    pub challenge_error: Option<&'static str>,
}

#[derive(Serialize)]
struct Body<'a> {
    error: Inner<'a>,
}

#[derive(Serialize)]
struct Inner<'a> {
    code: &'a str,
    message: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    details: Option<&'a serde_json::Value>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            details: None,
            retry_after: None,
            challenge_error: None,
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    /// 401 for a request that presented no credential (or a login that failed).
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }

    /// 401 for a bearer credential that was presented and refused (invalid, expired, revoked):
    /// its challenge says `error="invalid_token"` (RFC 6750, section 3.1).
    pub fn invalid_token(message: impl Into<String>) -> Self {
        Self {
            challenge_error: Some("invalid_token"),
            ..Self::unauthorized(message)
        }
    }

    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", message)
    }

    pub fn not_found(what: impl std::fmt::Display) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("{what} not found"),
        )
    }

    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "conflict", message)
    }

    pub fn precondition_failed(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::PRECONDITION_FAILED,
            "precondition_failed",
            message,
        )
    }

    pub fn too_many(message: impl Into<String>, retry_after: u64) -> Self {
        Self {
            retry_after: Some(retry_after.max(1)),
            ..Self::new(StatusCode::TOO_MANY_REQUESTS, "rate_limited", message)
        }
    }

    /// 422 with every field's problem in `details`.
    pub fn validation(errors: FieldErrors) -> Self {
        Self {
            details: serde_json::to_value(&errors.0).ok(),
            ..Self::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "validation_failed",
                errors.to_string(),
            )
        }
    }

    /// 422 for one field.
    pub fn field(field: &str, problem: impl Into<String>) -> Self {
        let mut e = FieldErrors::default();
        e.push(field, problem);
        Self::validation(e)
    }

    /// 500; the cause goes to the log, not to the client.
    pub fn internal(cause: impl std::fmt::Display) -> Self {
        tracing::error!(%cause, "internal error");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error; the controller's log has the cause",
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Body {
            error: Inner {
                code: self.code,
                message: &self.message,
                details: self.details.as_ref(),
            },
        };
        let mut resp = (self.status, Json(body)).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            // RFC 7235: a 401 carries a challenge; RFC 6750 gives the bearer scheme's.
            let challenge = match self.challenge_error {
                Some(e) => format!("Bearer realm=\"patronus\", error=\"{e}\""),
                None => "Bearer realm=\"patronus\"".to_owned(),
            };
            if let Ok(v) = HeaderValue::from_str(&challenge) {
                resp.headers_mut().insert(header::WWW_AUTHENTICATE, v);
            }
        }
        if let Some(s) = self.retry_after {
            if let Ok(v) = HeaderValue::from_str(&s.to_string()) {
                resp.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        resp
    }
}

/// Requests that failed on a database error (`patronus_db_errors_total`): counted where such an
/// error becomes the API's answer, whichever handler met it.
pub static DB_ERRORS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        DB_ERRORS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        ApiError::internal(format!("database: {e}"))
    }
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> Self {
        match r {
            JsonRejection::JsonDataError(e) => {
                // serde's message names the field ("missing field `email`", "unknown field").
                let text = std::error::Error::source(&e)
                    .map(|s| s.to_string())
                    .unwrap_or_else(|| e.body_text());
                ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "validation_failed", text)
            }
            JsonRejection::JsonSyntaxError(e) => ApiError::bad_request(format!(
                "the body is not valid JSON: {}",
                std::error::Error::source(&e)
                    .map(|s| s.to_string())
                    .unwrap_or_default()
            )),
            JsonRejection::MissingJsonContentType(_) => ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "the body must be JSON, with Content-Type: application/json",
            ),
            JsonRejection::BytesRejection(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "payload_too_large",
                    "the request body is larger than the controller accepts",
                )
            }
            other => ApiError::bad_request(other.body_text()),
        }
    }
}

impl From<QueryRejection> for ApiError {
    fn from(r: QueryRejection) -> Self {
        let text = std::error::Error::source(&r)
            .map(|s| s.to_string())
            .unwrap_or_else(|| r.body_text());
        ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "validation_failed", text)
    }
}

impl From<PathRejection> for ApiError {
    fn from(r: PathRejection) -> Self {
        // `/users/abc`: no such resource, as far as the client can tell.
        ApiError::new(StatusCode::NOT_FOUND, "not_found", r.body_text())
    }
}

/// The error shape, for the OpenAPI document.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ErrorDetail {
    /// Stable, for programs: `validation_failed`, `conflict`, `rate_limited`, ...
    pub code: String,
    /// For people.
    pub message: String,
    /// For `validation_failed` (and some conflicts): every field and its problem.
    #[schema(nullable = false)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub details: Option<Vec<patronus_api::FieldError>>,
}

/// The error responses every operation documents are derived from its shape
/// ([`crate::docs::finish`]): 401 and 403 where it is secured, 404 where it has path parameters,
/// 400/413/415/422 where it takes a body, 422 where it takes query parameters, 412 on PATCH and
/// DELETE (If-Match), 500 and 503 everywhere. The others an operation can give are named in its
/// `responses(...)` with these.
macro_rules! error_responses {
    ($($(#[$doc:meta])* $name:ident => $status:literal, $description:literal;)*) => {$(
        $(#[$doc])*
        #[derive(Debug)]
        pub struct $name;

        impl utoipa::IntoResponses for $name {
            fn responses() -> std::collections::BTreeMap<
                String,
                utoipa::openapi::RefOr<utoipa::openapi::response::Response>,
            > {
                [($status.to_owned(), error_response($description).into())].into()
            }
        }
    )*};
}

/// A response in the error shape.
pub fn error_response(description: &str) -> utoipa::openapi::response::Response {
    use utoipa::openapi::response::ResponseBuilder;
    use utoipa::openapi::{ContentBuilder, Ref};
    ResponseBuilder::new()
        .description(description)
        .content(
            "application/json",
            ContentBuilder::new()
                .schema(Some(Ref::from_schema_name("ErrorBody")))
                .build(),
        )
        .build()
}

error_responses! {
    /// 400 beyond a malformed body.
    BadRequest => "400", "The request cannot be done as asked";
    /// 401 on an operation that takes no bearer credential (a login, a token in the body).
    Unauthorized => "401", "The credentials in the request are wrong, expired or spent";
    /// 403 on an operation that takes no bearer credential.
    Forbidden => "403", "The account may not do this";
    /// 404 beyond the path parameters.
    NotFound => "404", "What the request names does not exist";
    /// 409.
    Conflict => "409", "Conflicts with the stored state (duplicate name, overlap, in use)";
    /// 422 on an operation with neither body nor query parameters.
    Unprocessable => "422", "The request is not valid for this object; `details` says why";
    /// 429.
    RateLimited => "429", "Rate limited or account locked; see Retry-After";
}

/// Extractors whose rejections use the one error shape.
pub mod extract {
    use axum::extract::{FromRequest, FromRequestParts, Request};
    use axum::http::request::Parts;
    use serde::de::DeserializeOwned;

    use super::ApiError;

    /// A JSON body; malformed or ill-typed JSON is 400 or 422.
    #[derive(Debug, Clone, Copy, Default)]
    pub struct Json<T>(pub T);

    impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for Json<T> {
        type Rejection = ApiError;

        async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
            let axum::Json(v) = axum::Json::<T>::from_request(req, state).await?;
            Ok(Self(v))
        }
    }

    /// Query parameters; a bad one is 422 naming it.
    #[derive(Debug, Clone, Copy, Default)]
    pub struct Query<T>(pub T);

    impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for Query<T> {
        type Rejection = ApiError;

        async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
            let axum::extract::Query(v) =
                axum::extract::Query::<T>::from_request_parts(parts, state).await?;
            Ok(Self(v))
        }
    }

    /// Path parameters; one that does not parse is 404.
    #[derive(Debug, Clone, Copy, Default)]
    pub struct Path<T>(pub T);

    impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for Path<T> {
        type Rejection = ApiError;

        async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
            let axum::extract::Path(v) =
                axum::extract::Path::<T>::from_request_parts(parts, state).await?;
            Ok(Self(v))
        }
    }
}
