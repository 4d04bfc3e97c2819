//! The error a handler answers: a status and a short message, sent as the
//! seed's `Error {code, message}` body. Extractor rejections become one too.

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use contracts::api::ErrorBody;
use std::time::Duration;

/// An error answered to a client. Server-side causes are logged with their
/// chain and never shown; the client sees a short, stable message.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// Sent as `Retry-After` (seconds): when it is worth asking again.
    pub retry_after: Option<Duration>,
}

/// What a client is told to wait when the database is away.
pub const DATABASE_RETRY_AFTER: Duration = Duration::from_secs(5);

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError { status, message: message.into(), retry_after: None }
    }
    /// 503 with `Retry-After`: the service cannot answer now (a dependency is
    /// away, or it sheds load) and the client should try again after `retry_after`.
    pub fn unavailable(message: impl Into<String>, retry_after: Duration) -> Self {
        ApiError { retry_after: Some(retry_after), ..Self::new(StatusCode::SERVICE_UNAVAILABLE, message) }
    }
    /// 429 with `Retry-After`: this caller asked too often.
    pub fn too_many_requests(message: impl Into<String>, retry_after: Duration) -> Self {
        ApiError { retry_after: Some(retry_after), ..Self::new(StatusCode::TOO_MANY_REQUESTS, message) }
    }
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, message)
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, message)
    }
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, message)
    }
    pub fn unprocessable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, message)
    }
    /// Logs `cause` and answers an opaque 500, or a 503 with `Retry-After`
    /// when the cause is the database being unreachable.
    pub fn internal(cause: impl Into<anyhow::Error>) -> Self {
        let cause = cause.into();
        if crate::data::db::is_unavailable_anyhow(&cause) {
            tracing::warn!(error = %format!("{cause:#}"), "database unavailable");
            return Self::unavailable("the database is unavailable, try again later", DATABASE_RETRY_AFTER);
        }
        tracing::error!(error = ?cause, "request failed");
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal server error")
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = error_response(self.status, self.message);
        if let Some(after) = self.retry_after {
            let seconds = after.as_secs_f64().ceil().max(1.0) as u64;
            response.headers_mut().insert(axum::http::header::RETRY_AFTER, seconds.into());
        }
        response
    }
}

pub fn error_response(status: StatusCode, message: impl Into<String>) -> Response {
    let body = ErrorBody { code: status.as_u16(), message: message.into() };
    (status, axum::Json(body)).into_response()
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        ApiError::internal(e)
    }
}

impl From<anyhow::Error> for ApiError {
    fn from(e: anyhow::Error) -> Self {
        ApiError::internal(e)
    }
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> Self {
        let message = match &r {
            JsonRejection::JsonDataError(e) => format!("invalid request body: {}", source_text(e)),
            JsonRejection::JsonSyntaxError(e) => format!("malformed JSON: {}", source_text(e)),
            JsonRejection::MissingJsonContentType(_) => {
                "expected a request body with Content-Type: application/json".to_string()
            }
            other => other.body_text(),
        };
        // axum says 422 for a well-formed body of the wrong shape; so do we.
        ApiError::new(r.status(), message)
    }
}

/// serde's own words ("missing field `price` at line 1 column 2"), without
/// axum's generic prefix.
fn source_text(e: &dyn std::error::Error) -> String {
    let mut inner: &dyn std::error::Error = e;
    while let Some(s) = inner.source() {
        inner = s;
    }
    inner.to_string()
}

impl From<PathRejection> for ApiError {
    fn from(r: PathRejection) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, format!("invalid path: {}", r.body_text()))
    }
}

impl From<QueryRejection> for ApiError {
    fn from(r: QueryRejection) -> Self {
        ApiError::bad_request(format!("invalid query: {}", r.body_text()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    async fn body(r: Response) -> serde_json::Value {
        serde_json::from_slice(&r.into_body().collect().await.unwrap().to_bytes()).unwrap()
    }

    #[tokio::test]
    async fn an_error_is_the_seeds_body_with_its_status() {
        let r = ApiError::unprocessable("price must be positive").into_response();
        assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
        assert!(r.headers().get(axum::http::header::RETRY_AFTER).is_none());
        assert_eq!(body(r).await, serde_json::json!({"code": 422, "message": "price must be positive"}));
    }

    #[tokio::test]
    async fn unavailable_says_when_to_come_back_in_whole_seconds() {
        let r = ApiError::unavailable("busy", Duration::from_millis(1500)).into_response();
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.headers()[axum::http::header::RETRY_AFTER], "2");
        let r = ApiError::unavailable("busy", Duration::ZERO).into_response();
        assert_eq!(r.headers()[axum::http::header::RETRY_AFTER], "1");
    }

    #[tokio::test]
    async fn a_server_side_cause_is_never_shown() {
        let r = ApiError::internal(anyhow::anyhow!("password=hunter2 in the connection string")).into_response();
        assert_eq!(r.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(body(r).await["message"], "internal server error");
    }

    #[test]
    fn a_database_away_is_a_503_not_a_500() {
        let e = ApiError::from(sqlx::Error::PoolTimedOut);
        assert_eq!(e.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(e.retry_after, Some(DATABASE_RETRY_AFTER));
        assert_eq!(ApiError::from(sqlx::Error::RowNotFound).status, StatusCode::INTERNAL_SERVER_ERROR);
    }
}
