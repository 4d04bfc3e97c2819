//! Routing and forwarding: which service owns a public path, and the
//! streaming proxy itself.

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderName, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use contracts::api::TOKEN_COOKIE;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use runtime::ApiError;
use runtime::auth::{ASSERTION_HEADER, AssertionSigner, CurrentUser, INTERNAL_HEADERS};
use runtime::http::BODY_LIMIT;
use runtime::http::conditional::{ETag, FinalTags};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

use crate::Config;
use crate::h2c::H2cPool;
use runtime::auth::tokens::TokenVerifier;

pub type Client = hyper_util::client::legacy::Client<HttpConnector, Body>;

pub fn client() -> Client {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(Duration::from_secs(5)));
    hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(60))
        .build(connector)
}

/// A public path prefix and where it goes.
struct Route {
    public: &'static str,
    upstream: String,
    internal: &'static str,
    /// The service's name: the audience of the assertions sent to it.
    service: &'static str,
}

pub struct Gateway {
    routes: Vec<Route>,
    client: Client,
    /// The push service's hop over h2c (`GATEWAY_PUSH_H2C`); none: HTTP/1.1
    /// through `client`, like the other services.
    push_h2c: Option<H2cPool>,
    auth: Arc<TokenVerifier>,
    signer: AssertionSigner,
    timeout: Duration,
    /// Longest time to receive a request's body (`GATEWAY_BODY_READ_TIMEOUT_MS`).
    body_timeout: Duration,
    pub client_ip_header: Option<HeaderName>,
    shutdown: CancellationToken,
    /// Final tags the services marked (`conditional::FINAL`), by user and
    /// public path: a conditional GET naming one is answered 304 here, once
    /// the user's token is verified, without signing or forwarding anything.
    final_tags: FinalTags<(u128, String)>,
}

/// Final tags the gateway remembers at most (about 150 bytes each): the
/// oldest is forgotten first.
const FINAL_TAGS_CAPACITY: usize = 100_000;

/// On shutdown, the event streams passing through end at random moments
/// within this window (so that their browsers reconnect spread out) instead
/// of holding the shutdown open for as long as the push service keeps them.
const STREAM_DRAIN: Duration = Duration::from_secs(5);

/// What a client is told to wait when a service cannot be reached.
const UPSTREAM_RETRY_AFTER: Duration = Duration::from_secs(1);

/// Where the services behind read the client's address.
pub const FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

/// Calls that need no token: registering, logging in, and an e-mail's
/// unsubscribe link (its signed token is the authority, checked by the
/// notification service).
fn is_public(method: &Method, path: &str) -> bool {
    (method == Method::POST && matches!(path, "/api/v1/identity/register" | "/api/v1/identity/login"))
        || ((method == Method::GET || method == Method::POST) && path == "/api/v1/notifications/unsubscribe")
}

const HOP_BY_HOP: &[&str] =
    &["connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade", "host"];

impl Gateway {
    /// Fails, rather than panics, on a configuration it cannot use (a
    /// `GATEWAY_CLIENT_IP_HEADER` that is not a header name).
    pub fn new(
        config: &Config,
        client: Client,
        auth: Arc<TokenVerifier>,
        signer: AssertionSigner,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Self> {
        let route = |public, upstream: &String, internal, service| Route {
            public,
            upstream: upstream.trim_end_matches('/').to_string(),
            internal,
            service,
        };
        let client_ip_header = config
            .client_ip_header
            .as_deref()
            .filter(|h| !h.is_empty())
            .map(|h| {
                HeaderName::try_from(h).map_err(|e| {
                    anyhow::anyhow!(
                        "GATEWAY_CLIENT_IP_HEADER {h:?} is not an HTTP header name ({e}); e.g. X-Forwarded-For"
                    )
                })
            })
            .transpose()?;
        let push_h2c = if config.push_h2c {
            tracing::info!(
                upstream = %config.push_url,
                streams_per_connection = config.push_streams_per_connection,
                "event streams to the push service over h2c"
            );
            Some(H2cPool::new(config.push_url.trim_end_matches('/'), config.push_streams_per_connection)?)
        } else {
            tracing::info!(upstream = %config.push_url, "event streams to the push service over HTTP/1.1");
            None
        };
        Ok(Gateway {
            routes: vec![
                route("/api/v1/identity/", &config.identity_url, "/api/v1/", "identity"),
                route("/api/v1/billing/", &config.billing_url, "/api/v1/", "billing"),
                route("/api/v1/ordering/", &config.ordering_url, "/api/v1/", "ordering"),
                route("/api/v1/notifications", &config.notification_url, "/api/v1/notifications", "notification"),
                route("/api/v1/push/", &config.push_url, "/api/v1/", "push"),
            ],
            client,
            push_h2c,
            auth,
            signer,
            timeout: Duration::from_secs(config.upstream_timeout_secs),
            body_timeout: config.connections.body_read_timeout(),
            client_ip_header,
            shutdown,
            final_tags: FinalTags::new(FINAL_TAGS_CAPACITY),
        })
    }

    fn route(&self, path: &str) -> Option<(&Route, String)> {
        route_of(&self.routes, path)
    }
}

/// The route of a public path and the service's own path for it.
fn route_of<'a>(routes: &'a [Route], path: &str) -> Option<(&'a Route, String)> {
    routes.iter().find_map(|r| {
        let rest = path.strip_prefix(r.public)?;
        // `/api/v1/notifications` must not match `/api/v1/notificationsX`.
        if !(r.public.ends_with('/') || rest.is_empty() || rest.starts_with('/')) {
            return None;
        }
        Some((r, format!("{}{}", r.internal, rest)))
    })
}

/// Removes what a client must not send on: the header only the gateway sets
/// (who the user is) and hop-by-hop headers.
fn strip_client_headers(headers: &mut axum::http::HeaderMap) {
    for name in INTERNAL_HEADERS.iter().chain(HOP_BY_HOP) {
        headers.remove(*name);
    }
}

/// Removes the user's token (`Authorization`, the `accessToken` cookie;
/// other cookies stay): it is for the gateway only, and a service that
/// received it could act as the user anywhere.
fn strip_token(headers: &mut axum::http::HeaderMap) {
    headers.remove(header::AUTHORIZATION);
    let cookies: Vec<String> = headers
        .get_all(header::COOKIE)
        .iter()
        .flat_map(|v| {
            String::from_utf8_lossy(v.as_bytes()).split(';').map(|c| c.trim().to_string()).collect::<Vec<_>>()
        })
        .filter(|c| !c.is_empty() && c.split_once('=').is_none_or(|(name, _)| name.trim() != TOKEN_COOKIE))
        .collect();
    headers.remove(header::COOKIE);
    if !cookies.is_empty()
        && let Ok(v) = HeaderValue::from_str(&cookies.join("; "))
    {
        headers.insert(header::COOKIE, v);
    }
}

/// The request body, whole, if it arrives within `limit` and is at most
/// [`BODY_LIMIT`] bytes: else 408 or 413.
async fn read_body(body: Body, limit: Duration) -> Result<Body, ApiError> {
    let limited = http_body_util::Limited::new(body, BODY_LIMIT);
    match tokio::time::timeout(limit, http_body_util::BodyExt::collect(limited)).await {
        Ok(Ok(collected)) => Ok(Body::from(collected.to_bytes())),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
            Err(ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, format!("request body larger than {BODY_LIMIT} bytes")))
        }
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "the client's body broke off");
            Err(ApiError::bad_request("the request body could not be read"))
        }
        Err(_) => {
            metrics::counter!("gateway_body_read_timeouts_total").increment(1);
            tracing::warn!(?limit, "a request body did not arrive in time");
            Err(ApiError::new(StatusCode::REQUEST_TIMEOUT, "the request body did not arrive in time"))
        }
    }
}

/// A service's `Location` (its own path) as the public path, when it is one
/// of the route's.
fn public_location(route: &Route, location: &str) -> Option<String> {
    location.strip_prefix(route.internal).map(|rest| format!("{}{}", route.public, rest))
}

pub async fn forward(State(gw): State<Arc<Gateway>>, req: Request) -> Result<Response, ApiError> {
    let (mut parts, body) = req.into_parts();
    let path = parts.uri.path().to_string();
    let Some((route, internal_path)) = gw.route(&path) else {
        return Err(ApiError::not_found("no such resource"));
    };
    if parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok())
        .is_some_and(|n| n > BODY_LIMIT)
    {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body larger than {BODY_LIMIT} bytes"),
        ));
    }

    // The body is read whole here, within its time: a client that trickles
    // it holds its share of the permits for that long at most, and the
    // services behind never wait on a client.
    let body = read_body(body, gw.body_timeout).await?;

    // Only the gateway speaks for the user.
    // The services behind learn the client's address from this header only.
    let client = runtime::http::limits::client_ip(
        &parts.headers,
        runtime::http::limits::peer(&parts),
        gw.client_ip_header.as_ref(),
    );
    strip_client_headers(&mut parts.headers);
    parts.headers.remove(FORWARDED_FOR);
    if let Some(ip) = client {
        parts.headers.insert(FORWARDED_FOR, ip.to_string().parse::<HeaderValue>().expect("an IP is ASCII"));
    }
    let mut claims = None;
    // Where a final tag of this answer would be remembered: a GET's, by user and path.
    let mut final_key = None;
    if !is_public(&parts.method, &path) {
        let c = gw.auth.authenticate(&parts.headers).await.map_err(ApiError::from)?;
        if parts.method == Method::GET && parts.uri.query().is_none() {
            let key = (c.user_id.as_u128(), path.clone());
            // The user's copy of a representation that never changes is current.
            if let Some(resp) = gw.final_tags.not_modified(&key, &parts.headers) {
                metrics::counter!("gateway_final_tag_hits_total").increment(1);
                return Ok(resp);
            }
            final_key = Some(key);
        }
        // Who the user is, for this service only, for the next few seconds.
        let user = CurrentUser { id: c.user_id, email: c.email.clone(), token_id: c.jti, token_expires: c.exp };
        let assertion = gw.signer.sign(route.service, &parts.method, &internal_path, &user);
        let assertion = HeaderValue::from_str(&assertion).expect("a JWT is ASCII");
        parts.headers.insert(HeaderName::from_static(ASSERTION_HEADER), assertion);
        tracing::Span::current().record("user_id", tracing::field::display(c.user_id));
        claims = Some(c);
    }

    strip_token(&mut parts.headers);

    // The service's span is a child of this request's.
    if let Some(tp) = runtime::telemetry::traceparent(&tracing::Span::current())
        && let Ok(v) = HeaderValue::from_str(&tp)
    {
        parts.headers.insert(runtime::telemetry::TRACEPARENT, v);
    }
    let query = parts.uri.query().map(|q| format!("?{q}")).unwrap_or_default();
    parts.uri = format!("{}{}{}", route.upstream, internal_path, query)
        .parse()
        .map_err(|_| ApiError::bad_request("invalid request path"))?;
    // The hop to a service is HTTP/1.1 whatever the client spoke (h2 over
    // TLS, h2c), except to the push service with `GATEWAY_PUSH_H2C`: h2c.
    parts.version = axum::http::Version::HTTP_11;
    // A long poll (`Prefer: wait=N`, N capped at MAX_WAIT) answers only after
    // its wait: it gets that much more time before its answer must start.
    let timeout = gw.timeout + runtime::http::conditional::prefer_wait(&parts.headers).unwrap_or_default();
    // A replica that shuts down closes its idle keep-alive connections, and
    // one may be closed under a request sent on it (seen in a rolling
    // restart). A GET or HEAD changes nothing and has no body: it is sent
    // once more, on a fresh connection.
    let again = (matches!(parts.method, Method::GET | Method::HEAD) && route.service != "push").then(|| {
        let mut r = Request::new(Body::empty());
        *r.method_mut() = parts.method.clone();
        *r.uri_mut() = parts.uri.clone();
        *r.headers_mut() = parts.headers.clone();
        *r.version_mut() = parts.version;
        r
    });
    let upstream = Request::from_parts(parts, body);
    let sent = async {
        match &gw.push_h2c {
            Some(pool) if route.service == "push" => pool.request(upstream).await.map_err(|e| e.to_string()),
            _ => match gw.client.request(upstream).await {
                Err(e) if e.is_connect() || again.is_none() => Err(e.to_string()),
                Err(e) => {
                    tracing::info!(upstream = %route.upstream, error = %e, "upstream connection lost; sending once more");
                    let again = again.expect("checked");
                    gw.client.request(again).await.map(|r| r.map(Body::new)).map_err(|e| e.to_string())
                }
                Ok(r) => Ok(r.map(Body::new)),
            },
        }
    };
    let resp = match tokio::time::timeout(timeout, sent).await {
        Ok(Ok(resp)) => resp,
        Ok(Err(e)) => {
            // Unreachable for now (restarting, scaled to zero): the client may
            // try again, as after any 503.
            tracing::warn!(upstream = %route.upstream, error = %e, "upstream unreachable");
            return Err(ApiError::unavailable("the service is unavailable, try again", UPSTREAM_RETRY_AFTER));
        }
        Err(_) => {
            return Err(ApiError::new(StatusCode::GATEWAY_TIMEOUT, "the service did not answer in time"));
        }
    };

    if path == "/api/v1/identity/logout"
        && resp.status().is_success()
        && let Some(c) = &claims
    {
        gw.auth.revoke(c);
    }
    let (mut parts, body) = resp.into_parts();
    for name in HOP_BY_HOP {
        parts.headers.remove(*name);
    }
    // A service's word that the representation is final: remembered for
    // this user and path, never passed on.
    if parts.headers.remove(runtime::http::conditional::FINAL).is_some()
        && matches!(parts.status, StatusCode::OK | StatusCode::NOT_MODIFIED)
        && let Some(key) = final_key
        && let Some(tag) = ETag::of_response(&parts.headers)
    {
        gw.final_tags.insert(key, tag);
    }
    // A service names its resources by its own paths; clients see public ones.
    if let Some(loc) = parts.headers.get(header::LOCATION).and_then(|v| v.to_str().ok())
        && let Some(public) = public_location(route, loc)
        && let Ok(v) = HeaderValue::from_str(&public)
    {
        parts.headers.insert(header::LOCATION, v);
    }
    let is_event_stream =
        parts.headers.get(header::CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
    if is_event_stream {
        let shutdown = gw.shutdown.clone();
        let (auth, authority) = (gw.auth.clone(), claims.clone());
        let end = async move {
            let drained = async {
                shutdown.cancelled().await;
                tokio::time::sleep(STREAM_DRAIN.mul_f64(rand::random::<f64>())).await;
            };
            // A stream never outlives the token it was opened with: it ends
            // when the token expires or is revoked, and the client reconnects
            // with a fresh one from its last event id.
            let ended = async {
                match &authority {
                    Some(claims) => auth.until_ended(claims).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = drained => {}
                _ = ended => tracing::info!("event stream ended with its token"),
            }
        };
        // `gateway_streams_open`: event streams this replica carries now (its
        // autoscaler counts them, as the push service's counts `sse_connections_open`).
        let open = runtime::metrics::GaugeGuard::new(metrics::gauge!("gateway_streams_open"));
        let stream = futures::StreamExt::take_until(body.into_data_stream(), end);
        // The guard lives as long as the stream: dropped when the stream
        // ends, the upstream closes or the client goes away.
        let body = Body::from_stream(futures::StreamExt::inspect(stream, move |_| {
            let _ = &open;
        }));
        return Ok(Response::from_parts(parts, body).into_response());
    }
    Ok(Response::from_parts(parts, body).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn routes() -> Vec<Route> {
        let route =
            |public, upstream: &str, internal, service| Route { public, upstream: upstream.into(), internal, service };
        vec![
            route("/api/v1/identity/", "http://identity", "/api/v1/", "identity"),
            route("/api/v1/billing/", "http://billing", "/api/v1/", "billing"),
            route("/api/v1/ordering/", "http://ordering", "/api/v1/", "ordering"),
            route("/api/v1/notifications", "http://notification", "/api/v1/notifications", "notification"),
            route("/api/v1/push/", "http://push", "/api/v1/", "push"),
        ]
    }

    fn to(path: &str) -> Option<(String, String)> {
        let routes = routes();
        route_of(&routes, path).map(|(r, p)| (r.upstream.clone(), p))
    }

    #[tokio::test]
    async fn a_client_address_header_that_is_not_a_header_name_is_a_configuration_error() {
        use clap::Parser;
        let config = Config::try_parse_from(["gateway", "--client-ip-header", "X Forwarded:For"]).unwrap();
        let verifier = Arc::new(TokenVerifier::new(&config.identity_url, Default::default()));
        let signer = AssertionSigner::generate();
        let err =
            Gateway::new(&config, client(), verifier, signer.clone(), CancellationToken::new()).err().expect("refused");
        assert!(err.to_string().contains("GATEWAY_CLIENT_IP_HEADER"), "{err}");

        let config = Config::try_parse_from(["gateway", "--client-ip-header", "X-Forwarded-For"]).unwrap();
        let verifier = Arc::new(TokenVerifier::new(&config.identity_url, Default::default()));
        assert!(Gateway::new(&config, client(), verifier, signer, CancellationToken::new()).is_ok());
    }

    #[test]
    fn each_public_prefix_goes_to_its_service_with_the_services_path() {
        assert_eq!(to("/api/v1/identity/login"), Some(("http://identity".into(), "/api/v1/login".into())));
        assert_eq!(
            to("/api/v1/billing/account/deposit"),
            Some(("http://billing".into(), "/api/v1/account/deposit".into()))
        );
        assert_eq!(to("/api/v1/ordering/orders/42"), Some(("http://ordering".into(), "/api/v1/orders/42".into())));
        assert_eq!(to("/api/v1/push/orders"), Some(("http://push".into(), "/api/v1/orders".into())));
    }

    #[test]
    fn notifications_match_the_whole_segment_only() {
        assert_eq!(to("/api/v1/notifications"), Some(("http://notification".into(), "/api/v1/notifications".into())));
        assert_eq!(
            to("/api/v1/notifications/x"),
            Some(("http://notification".into(), "/api/v1/notifications/x".into()))
        );
        assert_eq!(to("/api/v1/notificationsX"), None);
    }

    #[test]
    fn unknown_paths_have_no_route() {
        for path in
            ["/", "/api/v1", "/api/v1/identity", "/api/v2/identity/login", "/api/v1/billingx/a", "/health/ready"]
        {
            assert_eq!(to(path), None, "{path}");
        }
    }

    #[test]
    fn only_register_login_and_unsubscribe_need_no_token() {
        assert!(is_public(&Method::POST, "/api/v1/identity/register"));
        assert!(is_public(&Method::POST, "/api/v1/identity/login"));
        assert!(!is_public(&Method::GET, "/api/v1/identity/login"));
        assert!(!is_public(&Method::POST, "/api/v1/identity/logout"));
        assert!(!is_public(&Method::POST, "/api/v1/identity/login/"));
        assert!(is_public(&Method::GET, "/api/v1/notifications/unsubscribe"));
        assert!(is_public(&Method::POST, "/api/v1/notifications/unsubscribe"));
        assert!(!is_public(&Method::DELETE, "/api/v1/notifications/unsubscribe"));
        assert!(!is_public(&Method::GET, "/api/v1/notifications"));
        assert!(!is_public(&Method::GET, "/api/v1/notifications/unsubscribe/x"));
    }

    #[test]
    fn a_clients_identity_and_hop_by_hop_headers_are_dropped() {
        let mut h = axum::http::HeaderMap::new();
        for name in ["X-User-Assertion", "connection", "upgrade", "te", "host"] {
            h.insert(HeaderName::from_bytes(name.as_bytes()).unwrap(), HeaderValue::from_static("forged"));
        }
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer t"));
        h.insert("x-request-id", HeaderValue::from_static("r1"));
        strip_client_headers(&mut h);
        let mut left: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        left.sort_unstable();
        assert_eq!(left, ["authorization", "x-request-id"]);
    }

    #[test]
    fn the_token_is_stripped_and_other_cookies_stay() {
        let mut h = axum::http::HeaderMap::new();
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer t"));
        h.append(header::COOKIE, HeaderValue::from_static("theme=dark; accessToken=t"));
        h.append(header::COOKIE, HeaderValue::from_static("accessToken=t2;lang=en"));
        h.insert("x-request-id", HeaderValue::from_static("r1"));
        strip_token(&mut h);
        assert!(!h.contains_key(header::AUTHORIZATION));
        assert_eq!(h.get_all(header::COOKIE).iter().collect::<Vec<_>>(), ["theme=dark; lang=en"]);
        assert_eq!(h["x-request-id"], "r1");

        let mut only_token = axum::http::HeaderMap::new();
        only_token.insert(header::COOKIE, HeaderValue::from_static("accessToken=t"));
        strip_token(&mut only_token);
        assert!(only_token.is_empty());
    }

    #[test]
    fn a_services_location_becomes_the_public_one() {
        let routes = routes();
        let ordering = &routes[2];
        assert_eq!(public_location(ordering, "/api/v1/orders/7").as_deref(), Some("/api/v1/ordering/orders/7"));
        assert_eq!(public_location(ordering, "https://elsewhere/x"), None);
    }
}
