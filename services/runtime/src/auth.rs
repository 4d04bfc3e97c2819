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
        let id = user_id_of(&parts.headers)?;
        let email = parts.headers.get(USER_EMAIL_HEADER).and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
        tracing::Span::current().record("user_id", tracing::field::display(id));
        Ok(CurrentUser { id, email })
    }
}

/// The user id the gateway forwarded (`X-User-Id`): the one parser of it.
pub fn user_id_of(headers: &axum::http::HeaderMap) -> Result<Uuid, ApiError> {
    headers
        .get(USER_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| Uuid::parse_str(v).ok())
        .ok_or_else(|| ApiError::unauthorized("authentication required"))
}

/// Set by the gateway on the logout call only: the token being ended.
pub const TOKEN_ID_HEADER: &str = "x-token-id";
pub const TOKEN_EXPIRES_HEADER: &str = "x-token-expires";

/// Headers that only the gateway may set; it drops any a client sent.
pub const INTERNAL_HEADERS: &[&str] = &[USER_ID_HEADER, USER_EMAIL_HEADER, TOKEN_ID_HEADER, TOKEN_EXPIRES_HEADER];

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::{HeaderMap, HeaderValue, StatusCode};

    #[test]
    fn the_forwarded_user_id_is_read_and_anything_else_is_a_401() {
        let mut h = HeaderMap::new();
        assert_eq!(user_id_of(&h).unwrap_err().status, StatusCode::UNAUTHORIZED);
        h.insert(USER_ID_HEADER, HeaderValue::from_static("not-a-uuid"));
        assert_eq!(user_id_of(&h).unwrap_err().message, "authentication required");
        h.insert(USER_ID_HEADER, HeaderValue::from_static("0193a6a0-0000-7000-8000-000000000001"));
        assert_eq!(user_id_of(&h).unwrap().to_string(), "0193a6a0-0000-7000-8000-000000000001");
    }

    #[test]
    fn token_problems_have_one_answer_each() {
        use crate::tokens::TokenError;
        assert_eq!(ApiError::from(TokenError::Missing).status, StatusCode::UNAUTHORIZED);
        assert!(ApiError::from(TokenError::Invalid).message.contains("invalid, expired or revoked"));
        assert_eq!(ApiError::from(TokenError::Unavailable).status, StatusCode::SERVICE_UNAVAILABLE);
        let stale = ApiError::from(TokenError::RevocationsStale);
        assert_eq!((stale.status, stale.retry_after.is_some()), (StatusCode::SERVICE_UNAVAILABLE, true));
        assert!(stale.message.contains("revoked tokens"));
        let unknown = ApiError::from(TokenError::UnknownKeyYet);
        assert_eq!((unknown.status, unknown.retry_after.is_some()), (StatusCode::SERVICE_UNAVAILABLE, true));
    }
}
