//! What a service bounds so that a flood of requests costs it a fixed amount:
//! requests handled at once (more are shed with 503 + `Retry-After` rather
//! than queued), how long one may take, and the database connections it
//! holds. Also where a request comes from: the client address, read from a
//! trusted forwarding header only when one is configured.

use axum::Router;
use axum::extract::{ConnectInfo, Request};
use axum::http::{HeaderMap, HeaderName, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;

use crate::ApiError;

/// The longest `Prefer: wait=N` a long poll may ask for, in seconds.
pub const MAX_LONG_POLL_SECS: u64 = 30;

/// How long a client is told to wait after being shed.
const RETRY_AFTER: Duration = Duration::from_secs(1);

#[derive(clap::Args, Clone, Debug)]
pub struct HttpLimits {
    /// Longest time to answer a request, in milliseconds. A long poll's own
    /// wait (`Prefer: wait=N`, N <= 30 s) comes on top; an event stream, once
    /// answered, is never cut. Past it: 503 with `Retry-After`.
    #[arg(long, env = "REQUEST_TIMEOUT_MS", default_value_t = 10_000)]
    pub request_timeout_ms: u64,

    /// Requests handled at once; more are answered 503 with `Retry-After` at
    /// once instead of waiting in a queue. Long polls waiting for a change
    /// and event streams, once answered, do not count.
    #[arg(long, env = "MAX_CONCURRENT_REQUESTS", default_value_t = 256)]
    pub max_concurrent_requests: usize,

    /// Long polls (a GET with `Prefer: wait=N`) waiting at once, beside
    /// MAX_CONCURRENT_REQUESTS; one more is answered at once, like a plain
    /// GET (the preference is only a hint).
    #[arg(long, env = "MAX_LONG_POLLS", default_value_t = 1024)]
    pub max_long_polls: usize,

    /// Connections of the service's database pool. Size it to what shares
    /// it: each consumer handles up to CONSUMER_PREFETCH messages at once,
    /// plus the handlers; a request that gets none within 5 s is 503.
    #[arg(long, env = "DATABASE_POOL_SIZE", default_value_t = 40)]
    pub database_pool_size: u32,
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            request_timeout_ms: 10_000,
            max_concurrent_requests: 256,
            max_long_polls: 1024,
            database_pool_size: 40,
        }
    }
}

impl HttpLimits {
    /// `routes` with the concurrency limits and the request timeout.
    pub fn apply(&self, routes: Router) -> Router {
        let timeout = Duration::from_millis(self.request_timeout_ms);
        // One semaphore for the whole router, taken without waiting: no
        // permit now is a 503 at once. A permit is held until the response
        // head, so an event stream stops counting once it is answered; a
        // long poll, which spends its time waiting before the head, counts
        // against its own bound instead.
        let requests = Arc::new(Semaphore::new(self.max_concurrent_requests));
        let long_polls = Arc::new(Semaphore::new(self.max_long_polls));
        routes
            .layer(axum::middleware::from_fn(move |req, next| time_limit(timeout, req, next)))
            .layer(axum::middleware::from_fn(move |req, next| admit(requests.clone(), long_polls.clone(), req, next)))
    }
}

/// Lets `req` in if it gets a permit now: a long poll from the long polls'
/// bound (or, when that is used up, as a plain request without its wait),
/// anything else from the requests' bound; else answers 503 + `Retry-After`.
async fn admit(requests: Arc<Semaphore>, long_polls: Arc<Semaphore>, mut req: Request, next: Next) -> Response {
    let is_long_poll = matches!(*req.method(), Method::GET | Method::HEAD) && !long_poll_wait(req.headers()).is_zero();
    if is_long_poll {
        if let Ok(_permit) = long_polls.try_acquire_owned() {
            return next.run(req).await;
        }
        tracing::warn!("too many long polls at once; answering this one without waiting");
        req.headers_mut().remove(crate::http::conditional::PREFER);
    }
    let Ok(_permit) = requests.try_acquire_owned() else {
        tracing::warn!("too many requests at once; shedding");
        return ApiError::unavailable("the service is busy, try again", RETRY_AFTER).into_response();
    };
    next.run(req).await
}

/// The wait a long poll asked for with `Prefer: wait=N` (RFC 7240), capped;
/// read as the handlers read it ([`crate::http::conditional::prefer_wait`]).
pub fn long_poll_wait(headers: &HeaderMap) -> Duration {
    crate::http::conditional::prefer_wait(headers).unwrap_or_default().min(Duration::from_secs(MAX_LONG_POLL_SECS))
}

/// Bounds the time to the response head: a stream's body, once started, is
/// not timed (tower-http's TimeoutLayer has one fixed limit, but a long poll
/// brings its own wait).
async fn time_limit(limit: Duration, req: Request, next: Next) -> Response {
    let limit = limit + long_poll_wait(req.headers());
    match tokio::time::timeout(limit, next.run(req)).await {
        Ok(resp) => resp,
        Err(_) => {
            tracing::warn!(?limit, "request timed out");
            ApiError::unavailable("the request took too long, try again", RETRY_AFTER).into_response()
        }
    }
}

/// The client's address: from `trusted_header` when it is configured and
/// present (the last entry of a list such as `X-Forwarded-For` is the one
/// the trusted proxy added), else the peer of the connection.
pub fn client_ip(headers: &HeaderMap, peer: Option<SocketAddr>, trusted_header: Option<&HeaderName>) -> Option<IpAddr> {
    let forwarded = trusted_header
        .and_then(|name| headers.get(name))
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.rsplit(',').next())
        .and_then(|ip| ip.trim().parse().ok());
    forwarded.or(peer.map(|p| p.ip()))
}

/// The peer address of a request's connection (see `http::serve`).
pub fn peer(req: &axum::http::request::Parts) -> Option<SocketAddr> {
    req.extensions.get::<ConnectInfo<SocketAddr>>().map(|c| c.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::StatusCode;
    use axum::routing::get;
    use std::sync::Arc;
    use tokio::sync::Notify;
    use tower::ServiceExt;

    fn limits(timeout_ms: u64, concurrent: usize) -> HttpLimits {
        HttpLimits { request_timeout_ms: timeout_ms, max_concurrent_requests: concurrent, ..Default::default() }
    }

    async fn error_of(resp: Response) -> (StatusCode, Option<String>, serde_json::Value) {
        let status = resp.status();
        let retry = resp.headers().get("retry-after").map(|v| v.to_str().unwrap().to_string());
        let body = axum::body::to_bytes(resp.into_body(), 1 << 16).await.unwrap();
        (status, retry, serde_json::from_slice(&body).unwrap_or_default())
    }

    #[tokio::test]
    async fn a_request_beyond_the_concurrency_limit_is_shed_with_503_and_retry_after() {
        let entered = Arc::new(Notify::new());
        let release = Arc::new(Notify::new());
        let (e, r) = (entered.clone(), release.clone());
        let routes = Router::new().route(
            "/slow",
            get(move || async move {
                e.notify_one();
                r.notified().await;
                "done"
            }),
        );
        let app = limits(60_000, 1).apply(routes.route("/fast", get(|| async { "fast" })));
        let first = tokio::spawn(app.clone().oneshot(Request::get("/slow").body(Body::empty()).unwrap()));
        entered.notified().await;

        let (status, retry, body) =
            error_of(app.clone().oneshot(Request::get("/fast").body(Body::empty()).unwrap()).await.unwrap()).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(retry.as_deref(), Some("1"));
        assert_eq!(body["code"], 503, "{body}");

        release.notify_one();
        assert_eq!(first.await.unwrap().unwrap().status(), StatusCode::OK);
        let again = app.oneshot(Request::get("/fast").body(Body::empty()).unwrap()).await.unwrap();
        assert_eq!(again.status(), StatusCode::OK, "the permit is back once the slow request ended");
    }

    /// A route that waits until released, telling when it has been entered,
    /// and answers whether it saw a `Prefer` header; `/slow` always waits.
    fn held(entered: Arc<Notify>, release: Arc<Notify>) -> Router {
        let (entered2, release2) = (entered.clone(), release.clone());
        Router::new()
            .route(
                "/held",
                get(move |headers: HeaderMap| async move {
                    entered.notify_one();
                    if headers.contains_key("prefer") {
                        release.notified().await;
                        "waited"
                    } else {
                        "answered at once"
                    }
                })
                .post(|| async { "posted" }),
            )
            .route(
                "/slow",
                get(move || async move {
                    entered2.notify_one();
                    release2.notified().await;
                    "slow"
                }),
            )
    }

    #[tokio::test]
    async fn a_waiting_long_poll_holds_no_slot_of_the_concurrency_limit() {
        let (entered, release) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
        let app =
            limits(60_000, 1).apply(held(entered.clone(), release.clone()).route("/fast", get(|| async { "fast" })));
        let poll = Request::get("/held").header("prefer", "wait=20").body(Body::empty()).unwrap();
        let first = tokio::spawn(app.clone().oneshot(poll));
        entered.notified().await;

        let fast = app.clone().oneshot(Request::get("/fast").body(Body::empty()).unwrap()).await.unwrap();
        assert_eq!(fast.status(), StatusCode::OK, "the one slot is free while the long poll waits");

        release.notify_one();
        let resp = first.await.unwrap().unwrap();
        let body = axum::body::to_bytes(resp.into_body(), 1 << 10).await.unwrap();
        assert_eq!(&body[..], b"waited");
    }

    #[tokio::test]
    async fn a_long_poll_beyond_its_own_bound_is_answered_at_once_and_a_post_is_never_a_long_poll() {
        let (entered, release) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
        let bounds = HttpLimits { max_long_polls: 1, ..limits(60_000, 1) };
        let app = bounds.apply(held(entered.clone(), release.clone()));
        let poll = || Request::get("/held").header("prefer", "wait=20").body(Body::empty()).unwrap();
        let first = tokio::spawn(app.clone().oneshot(poll()));
        entered.notified().await;

        let second = app.clone().oneshot(poll()).await.unwrap();
        assert_eq!(second.status(), StatusCode::OK);
        let body = axum::body::to_bytes(second.into_body(), 1 << 10).await.unwrap();
        assert_eq!(&body[..], b"answered at once", "without its wait, as a plain GET");

        release.notify_one();
        assert_eq!(first.await.unwrap().unwrap().status(), StatusCode::OK);
    }

    #[tokio::test]
    async fn a_prefer_wait_on_anything_but_a_get_does_not_escape_the_limit() {
        let (entered, release) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
        let app = limits(60_000, 1).apply(held(entered.clone(), release.clone()));
        // A plain request holds the one slot.
        let first = tokio::spawn(app.clone().oneshot(Request::get("/slow").body(Body::empty()).unwrap()));
        entered.notified().await;
        let post = Request::post("/held").header("prefer", "wait=5").body(Body::empty()).unwrap();
        let (status, retry, _) = error_of(app.clone().oneshot(post).await.unwrap()).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(retry.as_deref(), Some("1"));
        release.notify_one();
        assert_eq!(first.await.unwrap().unwrap().status(), StatusCode::OK);
    }

    #[tokio::test]
    async fn a_request_that_takes_too_long_is_answered_503_with_retry_after() {
        let routes = Router::new().route("/stuck", get(std::future::pending::<&'static str>));
        let resp = limits(50, 8).apply(routes).oneshot(Request::get("/stuck").body(Body::empty()).unwrap()).await;
        let (status, retry, body) = error_of(resp.unwrap()).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(retry.as_deref(), Some("1"));
        assert!(body["message"].as_str().unwrap().contains("too long"), "{body}");
    }

    #[tokio::test]
    async fn a_long_poll_gets_its_wait_on_top_of_the_timeout() {
        let routes = Router::new().route(
            "/poll",
            get(|| async {
                tokio::time::sleep(Duration::from_millis(300)).await;
                "settled"
            }),
        );
        let req = Request::get("/poll").header("prefer", "respond-async, wait=2").body(Body::empty()).unwrap();
        let resp = limits(50, 8).apply(routes).oneshot(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
    }

    #[test]
    fn a_long_poll_wait_is_capped() {
        let wait = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert("prefer", v.parse().unwrap());
            long_poll_wait(&h)
        };
        assert_eq!(wait("wait=12"), Duration::from_secs(12));
        assert_eq!(wait("respond-async, wait=3600"), Duration::from_secs(MAX_LONG_POLL_SECS));
        assert_eq!(wait("wait=soon"), Duration::ZERO);
        assert_eq!(long_poll_wait(&HeaderMap::new()), Duration::ZERO);
    }

    #[tokio::test]
    async fn an_event_stream_outlives_the_timeout() {
        use axum::response::sse::{Event, Sse};
        let routes = Router::new().route(
            "/events",
            get(|| async {
                let events = futures::stream::unfold(0, |n| async move {
                    (n < 3).then_some(())?;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    Some((Ok::<_, std::convert::Infallible>(Event::default().data(n.to_string())), n + 1))
                });
                Sse::new(events)
            }),
        );
        let resp = limits(50, 8).apply(routes).oneshot(Request::get("/events").body(Body::empty()).unwrap()).await;
        let body = axum::body::to_bytes(resp.unwrap().into_body(), 1 << 16).await.unwrap();
        assert_eq!(String::from_utf8_lossy(&body).matches("data:").count(), 3, "300 ms of events, 50 ms timeout");
    }

    #[tokio::test]
    async fn a_query_that_gets_no_pooled_connection_in_time_is_shed_with_503() {
        let server = std::env::var("TEST_POSTGRES_URL").unwrap_or("postgres://postgres@127.0.0.1:5432".into());
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_millis(100))
            .connect(&format!("{server}/postgres"))
            .await
            .unwrap();
        let _held = pool.acquire().await.unwrap();
        let err = ApiError::from(sqlx::query("SELECT 1").execute(&pool).await.unwrap_err());
        assert_eq!(err.status, StatusCode::SERVICE_UNAVAILABLE, "{}", err.message);
        assert!(err.retry_after.is_some());
    }

    #[test]
    fn the_client_address_comes_from_the_trusted_header_only() {
        let peer: SocketAddr = "10.0.0.9:4000".parse().unwrap();
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", "1.2.3.4, 192.0.2.7".parse().unwrap());
        let xff = HeaderName::from_static("x-forwarded-for");
        assert_eq!(client_ip(&h, Some(peer), Some(&xff)), Some("192.0.2.7".parse().unwrap()));
        assert_eq!(client_ip(&h, Some(peer), None), Some(peer.ip()), "not configured: the header is ignored");
        h.insert("x-forwarded-for", "not an address".parse().unwrap());
        assert_eq!(client_ip(&h, Some(peer), Some(&xff)), Some(peer.ip()));
    }
}
