//! What every service's HTTP server does the same way: JSON 404/405, a body
//! limit, panic safety, request ids and spans, metrics, graceful shutdown.

use axum::http::StatusCode;
use axum::response::Response;
use axum::{Router, extract::DefaultBodyLimit};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::trace::TraceLayer;

use super::{ApiError, Readiness, error_response, health_routes};

/// Largest request body any service accepts.
pub const BODY_LIMIT: usize = 64 * 1024;

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
    let request_id = req.headers().get("x-request-id").and_then(|v| v.to_str().ok());
    let span = tracing::info_span!(
        "http",
        method = %req.method(),
        path = %req.uri().path(),
        // Recorded by `CurrentUser` once the caller's assertion is verified.
        user_id = tracing::field::Empty,
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
    // The peer address is what a throttle keys on when no trusted proxy is configured.
    let app = router.into_make_service_with_connect_info::<std::net::SocketAddr>();
    axum::serve(listener, app).with_graceful_shutdown(async move { shutdown.cancelled().await }).await?;
    Ok(())
}
