//! HTTP plumbing shared by the services: the error type that becomes the
//! seed's `Error {code, message}` body, JSON and path extractors whose
//! rejections use that body too, health endpoints, and `serve`.

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Router, extract::DefaultBodyLimit};
use contracts::api::ErrorBody;
use serde::Serialize;
use sqlx::PgPool;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::trace::TraceLayer;

use crate::Broker;

/// Largest request body any service accepts.
pub const BODY_LIMIT: usize = 64 * 1024;

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
        if crate::db::is_unavailable_anyhow(&cause) {
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

/// A page of a newest-first list: at most `limit` items, older than the item
/// `before` (the last one of the previous page).
#[derive(Debug, Default, serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct Page {
    /// How many items, 1 to 500 (100 by default).
    #[param(minimum = 1, maximum = 500)]
    pub limit: Option<u32>,
    /// The id of the last item of the previous page.
    pub before: Option<uuid::Uuid>,
}

impl Page {
    /// The query of one page of the user's rows of `table`, newest first:
    /// bind the user id, [`Page::before`] and [`Page::limit`], in that order.
    /// `table` needs `user_id`, `created_at` and `id` columns.
    pub fn sql(table: &str, columns: &str) -> String {
        format!(
            "SELECT {columns} FROM {table} WHERE user_id = $1
               AND ($2::uuid IS NULL OR (created_at, id) < (SELECT created_at, id FROM {table} WHERE id = $2 AND user_id = $1))
             ORDER BY created_at DESC, id DESC LIMIT $3"
        )
    }

    pub fn limit(&self) -> Result<i64, ApiError> {
        match self.limit {
            None => Ok(100),
            Some(n @ 1..=500) => Ok(i64::from(n)),
            Some(_) => Err(ApiError::bad_request("limit must be between 1 and 500")),
        }
    }
}

/// What the health endpoints look at. Readiness means "can answer HTTP":
/// only the database (and a service's own `check`) decide it. The broker and
/// the outbox are reported in the readiness body's `checks` and in metrics,
/// never in the status: a service whose broker is away keeps serving (its
/// outbox holds what it publishes), so a broker restart does not take every
/// replica out of rotation.
#[derive(Clone, Default)]
pub struct Readiness {
    pub db: Option<PgPool>,
    pub broker: Option<Broker>,
    /// Reported as `checks.outbox.relayed: false` when the oldest unsent
    /// message is older than this.
    pub outbox_max_age: Option<Duration>,
    /// A service's own condition: `Some(problem)` while it is not ready.
    pub check: Option<std::sync::Arc<dyn Fn() -> Option<&'static str> + Send + Sync>>,
}

async fn live() -> impl IntoResponse {
    axum::Json(serde_json::json!({"status": "ok"}))
}

async fn ready(axum::extract::State(r): axum::extract::State<Readiness>) -> Response {
    let mut problems = Vec::new();
    let mut checks = serde_json::Map::new();
    if let Some(db) = &r.db {
        let ping = tokio::time::timeout(Duration::from_secs(2), sqlx::query("SELECT 1").execute(db));
        let up = matches!(ping.await, Ok(Ok(_)));
        checks.insert("database".into(), if up { "up" } else { "unreachable" }.into());
        if !up {
            problems.push("database unreachable");
        }
        if let Some(max) = r.outbox_max_age
            && let Ok(Ok((unsent, oldest))) =
                tokio::time::timeout(Duration::from_secs(2), crate::outbox::backlog(db)).await
        {
            let oldest = oldest.unwrap_or(0.0);
            checks.insert(
                "outbox".into(),
                serde_json::json!({
                    "unsent": unsent,
                    "oldestUnsentSeconds": oldest,
                    "relayed": oldest <= max.as_secs_f64(),
                }),
            );
        }
    }
    if let Some(problem) = r.check.as_ref().and_then(|check| check()) {
        problems.push(problem);
    }
    if let Some(broker) = &r.broker {
        let connected = broker.is_connected();
        checks.insert("broker".into(), if connected { "connected" } else { "disconnected" }.into());
    }
    if problems.is_empty() {
        axum::Json(serde_json::json!({"status": "ready", "checks": checks})).into_response()
    } else {
        let status = StatusCode::SERVICE_UNAVAILABLE;
        let body = serde_json::json!({"code": status.as_u16(), "message": problems.join(", "), "checks": checks});
        (status, axum::Json(body)).into_response()
    }
}

/// `/health/live` (the process answers) and `/health/ready` (its dependencies do).
pub fn health_routes(readiness: Readiness) -> Router {
    Router::new().route("/health/live", get(live)).route("/health/ready", get(ready)).with_state(readiness)
}

pub async fn not_found() -> ApiError {
    ApiError::not_found("no such resource")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method not allowed on this resource")
}

fn panic_response(_: Box<dyn std::any::Any + Send + 'static>) -> Response {
    tracing::error!("handler panicked");
    error_response(StatusCode::INTERNAL_SERVER_ERROR, "internal server error")
}

/// Wraps a service's routes with what every service answers the same way:
/// health, JSON 404/405, a body limit, panic safety and request tracing.
pub fn service_router(service: &'static str, routes: Router, readiness: Readiness) -> Router {
    let router = routes
        .merge(health_routes(readiness))
        .merge(crate::metrics::routes())
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(BODY_LIMIT));
    with_common_layers(service, router)
}

/// Request metrics, panic safety (a JSON 500), a request span with the user
/// and request ids, and an `X-Request-Id` on every request and response (kept
/// when the client or the gateway sent one, so one id follows a call through).
pub fn with_common_layers(service: &'static str, router: Router) -> Router {
    use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
    router
        .layer(axum::middleware::from_fn(move |req, next| crate::metrics::track_http(service, req, next)))
        .layer(CatchPanicLayer::custom(panic_response))
        .layer(TraceLayer::new_for_http().make_span_with(make_span))
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
}

fn make_span(req: &axum::http::Request<axum::body::Body>) -> tracing::Span {
    let user_id = req.headers().get(crate::auth::USER_ID_HEADER).and_then(|v| v.to_str().ok());
    let request_id = req.headers().get("x-request-id").and_then(|v| v.to_str().ok());
    let span = tracing::info_span!(
        "http",
        method = %req.method(),
        path = %req.uri().path(),
        user_id = user_id.unwrap_or(""),
        request_id = request_id.unwrap_or(""),
    );
    if let Some(parent) = req.headers().get(crate::telemetry::TRACEPARENT).and_then(|v| v.to_str().ok()) {
        crate::telemetry::set_parent(&span, parent);
    }
    span
}

/// Serves `router` until `shutdown`, then lets in-flight requests finish.
pub async fn serve(listener: TcpListener, router: Router, shutdown: CancellationToken) -> anyhow::Result<()> {
    let addr = listener.local_addr()?;
    tracing::info!(%addr, "listening");
    axum::serve(listener, router).with_graceful_shutdown(async move { shutdown.cancelled().await }).await?;
    Ok(())
}
