//! Extractors whose rejections are [`ApiError`]s with the project's error
//! body, so a malformed request always gets a clear 4xx.

use axum::extract::{FromRequest, FromRequestParts};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use super::ApiError;

/// A JSON request body (always an object in this API) or response. Its
/// rejections are [`ApiError`]s that say what is wrong.
#[derive(Debug, Clone, Copy, Default)]
pub struct Json<T>(pub T);

impl<T, S> FromRequest<S> for Json<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, Self::Rejection> {
        let axum::Json(value) = axum::Json::<serde_json::Value>::from_request(req, state).await?;
        // serde would also read a struct from an array; a body is an object.
        if !value.is_object() {
            return Err(ApiError::unprocessable("invalid request body: expected a JSON object"));
        }
        serde_json::from_value(value)
            .map(Json)
            .map_err(|e| ApiError::unprocessable(format!("invalid request body: {e}")))
    }
}

impl<T: Serialize> IntoResponse for Json<T> {
    fn into_response(self) -> Response {
        axum::Json(self.0).into_response()
    }
}

/// `axum::extract::Path` whose rejection is an [`ApiError`].
#[derive(Debug, FromRequestParts)]
#[from_request(via(axum::extract::Path), rejection(ApiError))]
pub struct Path<T>(pub T);

/// `axum::extract::Query` whose rejection is an [`ApiError`].
#[derive(Debug, FromRequestParts)]
#[from_request(via(axum::extract::Query), rejection(ApiError))]
pub struct Query<T>(pub T);
