//! The caller's identity inside the system. The gateway verifies the token,
//! removes any `X-User-*` header a client sent, and forwards the user's id and
//! e-mail in these headers; services behind it trust only them.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use uuid::Uuid;

use crate::ApiError;

pub const USER_ID_HEADER: &str = "x-user-id";
pub const USER_EMAIL_HEADER: &str = "x-user-email";

/// The authenticated user of a request.
#[derive(Clone, Debug)]
pub struct CurrentUser {
    pub id: Uuid,
    pub email: String,
}

impl<S: Send + Sync> FromRequestParts<S> for CurrentUser {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let header = |name| parts.headers.get(name).and_then(|v| v.to_str().ok());
        let id = header(USER_ID_HEADER)
            .and_then(|v| Uuid::parse_str(v).ok())
            .ok_or_else(|| ApiError::unauthorized("authentication required"))?;
        let email = header(USER_EMAIL_HEADER).unwrap_or_default().to_string();
        tracing::Span::current().record("user_id", tracing::field::display(id));
        Ok(CurrentUser { id, email })
    }
}

/// Set by the gateway on the logout call only: the token being ended.
pub const TOKEN_ID_HEADER: &str = "x-token-id";
pub const TOKEN_EXPIRES_HEADER: &str = "x-token-expires";

/// Headers that only the gateway may set; it drops any a client sent.
pub const INTERNAL_HEADERS: &[&str] = &[USER_ID_HEADER, USER_EMAIL_HEADER, TOKEN_ID_HEADER, TOKEN_EXPIRES_HEADER];
