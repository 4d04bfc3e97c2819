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
/// when the client or the gateway sent a [safe one](is_safe_request_id), so
/// one id follows a call through; replaced by a new UUID otherwise).
pub fn with_common_layers(service: &'static str, router: Router) -> Router {
    use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
    router
        .layer(axum::middleware::from_fn(move |req, next| crate::metrics::track_http(service, req, next)))
        .layer(CatchPanicLayer::custom(panic_response))
        .layer(TraceLayer::new_for_http().make_span_with(make_span))
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
        .layer(axum::middleware::map_request(drop_unsafe_request_id))
}

/// Longest `X-Request-Id` kept as it came (a UUID has 36 characters).
pub const MAX_REQUEST_ID_LEN: usize = 64;

/// Whether a request id may be kept: 1 to [`MAX_REQUEST_ID_LEN`] letters,
/// digits, `-`, `_`, `.` or `:`. It reaches logs, responses and billing's
/// append-only ledger, so a client's own text is never kept beyond that.
pub fn is_safe_request_id(value: &[u8]) -> bool {
    (1..=MAX_REQUEST_ID_LEN).contains(&value.len())
        && value.iter().all(|c| c.is_ascii_alphanumeric() || b"-_.:".contains(c))
}

/// Removes an `X-Request-Id` that is not [safe](is_safe_request_id), or that
/// came more than once, so that the request-id layer gives the request a new one.
async fn drop_unsafe_request_id(mut req: axum::extract::Request) -> axum::extract::Request {
    let ids = req.headers().get_all("x-request-id");
    let mut values = ids.iter();
    let keep = match (values.next(), values.next()) {
        (None, _) => true,
        (Some(id), None) => is_safe_request_id(id.as_bytes()),
        (Some(_), Some(_)) => false,
    };
    if !keep {
        tracing::debug!("unsafe X-Request-Id replaced");
        req.headers_mut().remove("x-request-id");
    }
    req
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

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::{HeaderValue, Request};
    use tower::ServiceExt;

    /// The id the handler saw and the one the response carries.
    async fn ids(sent: &[&[u8]]) -> (String, String) {
        let router = with_common_layers(
            "test",
            Router::new().route(
                "/",
                axum::routing::get(|headers: axum::http::HeaderMap| async move {
                    headers["x-request-id"].to_str().unwrap().to_string()
                }),
            ),
        );
        let mut req = Request::get("/").body(axum::body::Body::empty()).unwrap();
        for id in sent {
            req.headers_mut().append("x-request-id", HeaderValue::from_bytes(id).unwrap());
        }
        let resp = router.oneshot(req).await.unwrap();
        let answered = resp.headers()["x-request-id"].to_str().unwrap().to_string();
        let body = axum::body::to_bytes(resp.into_body(), 1024).await.unwrap();
        (String::from_utf8(body.to_vec()).unwrap(), answered)
    }

    #[tokio::test]
    async fn a_safe_request_id_is_kept() {
        for id in ["r1", "0f8fad5b-d9cb-469f-a165-70867728950e", "trace:abc.def_1", &"a".repeat(MAX_REQUEST_ID_LEN)] {
            assert_eq!(ids(&[id.as_bytes()]).await, (id.to_string(), id.to_string()));
        }
    }

    #[tokio::test]
    async fn an_unsafe_request_id_is_replaced_by_a_uuid() {
        let long = "a".repeat(MAX_REQUEST_ID_LEN + 1);
        for id in [long.as_bytes(), b"a b", b"<script>", b"x;DROP", b"caf\xc3\xa9", b"a\tb", b"a/b"] {
            let (seen, answered) = ids(&[id]).await;
            assert_eq!(seen, answered);
            assert!(uuid::Uuid::parse_str(&seen).is_ok(), "{:?} became {seen}", String::from_utf8_lossy(id));
        }
        let (seen, _) = ids(&[]).await;
        assert!(uuid::Uuid::parse_str(&seen).is_ok());
    }

    #[tokio::test]
    async fn two_request_ids_are_replaced_by_one() {
        let (seen, _) = ids(&[b"first", b"second"]).await;
        assert!(uuid::Uuid::parse_str(&seen).is_ok(), "{seen}");
    }
}
