//! What a server facing the internet bounds per connection and per client,
//! so that slow or idle clients cannot hold what everyone else needs: time
//! to send a request's headers, idle keep-alive connections, connections
//! open (in all and per client address), requests in progress per client
//! address (its share of the service's permits), and HTTP/2's streams,
//! header lists and reset floods. hyper and hyper-util enforce the timeouts
//! and the HTTP/2 limits; this module adds what they leave out: the counts
//! per client and the idle timeout of a connection (HTTP/1.1 and HTTP/2).
//!
//! The gateway serves with these ([`crate::Service::limit_connections`]);
//! the services behind it see only the gateway.

use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, Request};
use axum::http::HeaderName;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http_body_util::BodyExt;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::ApiError;

/// How long a client that sent too many requests at once is told to wait.
const RETRY_AFTER: Duration = Duration::from_secs(1);

#[derive(clap::Args, Clone, Debug)]
pub struct ConnectionLimits {
    /// Time a client has to send a request's headers, in milliseconds, from
    /// the connection's opening (TLS handshake included) or, on an HTTP/1.1
    /// keep-alive connection, from the previous response. Past it the
    /// connection is closed.
    #[arg(long, env = "GATEWAY_HEADER_READ_TIMEOUT_MS", default_value_t = 10_000)]
    pub header_read_timeout_ms: u64,

    /// Time a client has to send a request's whole body once its headers
    /// are in, in milliseconds; past it: 408. (Bodies are at most 64 KiB.)
    #[arg(long, env = "GATEWAY_BODY_READ_TIMEOUT_MS", default_value_t = 10_000)]
    pub body_read_timeout_ms: u64,

    /// A connection with no request in progress (HTTP/1.1 keep-alive, or
    /// HTTP/2 with no open stream) is closed after this many seconds.
    #[arg(long, env = "GATEWAY_IDLE_TIMEOUT_SECS", default_value_t = 60)]
    pub idle_timeout_secs: u64,

    /// Connections open at once; past it, new ones wait in the listen
    /// backlog until one closes.
    #[arg(long, env = "GATEWAY_MAX_CONNECTIONS", default_value_t = 10_000)]
    pub max_connections: usize,

    /// Connections open at once from one client address; one more is
    /// closed at once. Counted by the connection's peer, so not applied
    /// when `GATEWAY_CLIENT_IP_HEADER` names a proxy in front (every
    /// connection then comes from the proxy). 0 turns it off.
    #[arg(long, env = "GATEWAY_MAX_CONNECTIONS_PER_CLIENT", default_value_t = 64)]
    pub max_connections_per_client: usize,

    /// Requests in progress at once from one client address (its share of
    /// MAX_CONCURRENT_REQUESTS); one more is answered 429 with
    /// `Retry-After`. Event streams, once answered, do not count. The
    /// address is `GATEWAY_CLIENT_IP_HEADER`'s where set, else the peer's.
    /// 0 turns it off.
    #[arg(long, env = "GATEWAY_MAX_REQUESTS_PER_CLIENT", default_value_t = 32)]
    pub max_requests_per_client: usize,

    /// HTTP/2: streams (requests, event streams) open at once on one connection.
    #[arg(long, env = "GATEWAY_H2_MAX_CONCURRENT_STREAMS", default_value_t = 100)]
    pub h2_max_concurrent_streams: u32,

    /// HTTP/2: largest header list of a request, in bytes (decoded).
    #[arg(long, env = "GATEWAY_H2_MAX_HEADER_LIST_SIZE", default_value_t = 16 * 1024)]
    pub h2_max_header_list_size: u32,

    /// HTTP/2: streams a client opened and reset before they were handled
    /// (the "rapid reset" attack); past it the connection is closed.
    #[arg(long, env = "GATEWAY_H2_MAX_PENDING_RESETS", default_value_t = 20)]
    pub h2_max_pending_resets: usize,

    /// HTTP/2: streams the server had to reset because of the client's
    /// errors on one connection; past it the connection is closed.
    #[arg(long, env = "GATEWAY_H2_MAX_ERROR_RESETS", default_value_t = 256)]
    pub h2_max_error_resets: usize,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            header_read_timeout_ms: 10_000,
            body_read_timeout_ms: 10_000,
            idle_timeout_secs: 60,
            max_connections: 10_000,
            max_connections_per_client: 64,
            max_requests_per_client: 32,
            h2_max_concurrent_streams: 100,
            h2_max_header_list_size: 16 * 1024,
            h2_max_pending_resets: 20,
            h2_max_error_resets: 256,
        }
    }
}

impl ConnectionLimits {
    pub fn header_read_timeout(&self) -> Duration {
        Duration::from_millis(self.header_read_timeout_ms.max(1))
    }

    pub fn body_read_timeout(&self) -> Duration {
        Duration::from_millis(self.body_read_timeout_ms.max(1))
    }

    fn idle_timeout(&self) -> Duration {
        Duration::from_secs(self.idle_timeout_secs.max(1))
    }

    /// hyper's connection settings: HTTP/1.1 and HTTP/2 (h2c by prior
    /// knowledge, or h2 by ALPN over TLS).
    fn builder(&self) -> auto::Builder<TokioExecutor> {
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder.http1().timer(TokioTimer::new()).header_read_timeout(self.header_read_timeout());
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_concurrent_streams(self.h2_max_concurrent_streams)
            .max_header_list_size(self.h2_max_header_list_size)
            .max_pending_accept_reset_streams(self.h2_max_pending_resets)
            .max_local_error_reset_streams(self.h2_max_error_resets)
            // A peer gone without a FIN is noticed and its streams end.
            .keep_alive_interval(Duration::from_secs(20))
            .keep_alive_timeout(Duration::from_secs(10));
        builder
    }

    /// `routes` with each client address's share of the requests in
    /// progress; the client's address is `client_ip_header`'s where set.
    pub fn apply(&self, routes: Router, client_ip_header: Option<HeaderName>) -> Router {
        let shares = PerClient::new(self.max_requests_per_client);
        routes.layer(axum::middleware::from_fn(move |req, next| {
            share_of_requests(shares.clone(), client_ip_header.clone(), req, next)
        }))
    }
}

/// Counts of something held per client address, each at most `limit`.
/// An address is in the map only while it holds something.
struct PerClient {
    limit: usize,
    held: Mutex<HashMap<IpAddr, usize>>,
}

/// One unit held by `ip`, given back when dropped.
struct Share {
    owner: Arc<PerClient>,
    ip: IpAddr,
}

impl PerClient {
    /// At most `limit` units per address; 0: no limit (as every throttle reads 0).
    fn new(limit: usize) -> Arc<Self> {
        let limit = if limit == 0 { usize::MAX } else { limit };
        Arc::new(PerClient { limit, held: Mutex::new(HashMap::new()) })
    }

    fn try_take(self: &Arc<Self>, ip: IpAddr) -> Option<Share> {
        let mut held = self.held.lock().expect("per-client lock");
        let n = held.entry(ip).or_insert(0);
        if *n >= self.limit {
            return None;
        }
        *n += 1;
        Some(Share { owner: self.clone(), ip })
    }
}

impl Drop for Share {
    fn drop(&mut self) {
        let mut held = self.owner.held.lock().expect("per-client lock");
        if let Some(n) = held.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                held.remove(&self.ip);
            }
        }
    }
}

async fn share_of_requests(
    shares: Arc<PerClient>,
    client_ip_header: Option<HeaderName>,
    req: Request,
    next: Next,
) -> Response {
    let peer = req.extensions().get::<ConnectInfo<SocketAddr>>().map(|c| c.0);
    let Some(ip) = crate::http::limits::client_ip(req.headers(), peer, client_ip_header.as_ref()) else {
        return next.run(req).await;
    };
    let Some(_share) = shares.try_take(ip) else {
        metrics::counter!("gateway_client_limit_refused_total", "what" => "requests").increment(1);
        tracing::warn!(client = %ip, "too many requests at once from one address; refused");
        return ApiError::too_many_requests("too many requests at once from your address, try again", RETRY_AFTER)
            .into_response();
    };
    // `gateway_client_requests_in_progress`: requests holding their client's
    // share now (until their response head).
    let _counted = crate::metrics::GaugeGuard::new(metrics::gauge!("gateway_client_requests_in_progress"));
    next.run(req).await
}

/// Whether a connection has a request in progress, and since when it has
/// had none.
#[derive(Clone, Copy)]
struct Activity {
    requests: usize,
    since: Instant,
    /// Whether a request has begun at all (before, the header read timeout
    /// applies to the wait, not the idle timeout).
    begun: bool,
}

/// A request in progress on a connection, until its response body is done.
struct Busy(watch::Sender<Activity>);

impl Busy {
    fn begin(activity: &watch::Sender<Activity>) -> Busy {
        activity.send_modify(|a| {
            a.requests += 1;
            a.begun = true;
        });
        Busy(activity.clone())
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.send_modify(|a| {
            a.requests -= 1;
            a.since = Instant::now();
        });
    }
}

/// Resolves once the connection has had no request in progress for its
/// allowance: `first` before its first request, `idle` after.
async fn idle(mut activity: watch::Receiver<Activity>, first: Duration, idle: Duration) {
    loop {
        let a = *activity.borrow_and_update();
        if a.requests == 0 {
            let deadline = a.since + if a.begun { idle } else { first };
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => return,
                changed = activity.changed() => if changed.is_err() { return },
            }
        } else if activity.changed().await.is_err() {
            return;
        }
    }
}

/// Serves `router` on `listener` (over TLS with `tls`) within `limits`
/// until `shutdown`; then open connections finish their requests, for at
/// most `grace`. `per_client_connections`: whether connections are counted
/// per peer address (not behind a proxy).
pub async fn serve(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    router: Router,
    limits: ConnectionLimits,
    per_client_connections: bool,
    shutdown: CancellationToken,
    grace: Duration,
) -> anyhow::Result<()> {
    let addr = listener.local_addr()?;
    tracing::info!(%addr, tls = tls.is_some(), "listening");
    let builder = Arc::new(limits.builder());
    let open = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let per_peer = PerClient::new(if per_client_connections { limits.max_connections_per_client } else { usize::MAX });
    let connections = TaskTracker::new();
    loop {
        let permit = tokio::select! {
            _ = shutdown.cancelled() => break,
            p = open.clone().acquire_owned() => p.expect("never closed"),
        };
        let (tcp, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: a pause, not a busy loop.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Some(share) = per_peer.try_take(peer.ip()) else {
            metrics::counter!("gateway_client_limit_refused_total", "what" => "connections").increment(1);
            tracing::debug!(client = %peer.ip(), "too many connections from one address; closed");
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let (builder, router, tls, shutdown) = (builder.clone(), router.clone(), tls.clone(), shutdown.clone());
        let limits = limits.clone();
        connections.spawn(async move {
            let _held = (permit, share);
            let handshake = async {
                match tls {
                    None => Ok(Io::Plain(tcp)),
                    Some(tls) => tls.accept(tcp).await.map(|s| Io::Tls(Box::new(s))),
                }
            };
            let io = tokio::select! {
                _ = shutdown.cancelled() => return,
                io = tokio::time::timeout(limits.header_read_timeout(), handshake) => match io {
                    Ok(Ok(io)) => io,
                    Ok(Err(e)) => return tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                    Err(_) => return tracing::debug!(%peer, "TLS handshake timed out"),
                },
            };
            serve_connection(io, peer, router, &builder, &limits, shutdown).await;
        });
    }
    connections.close();
    if tokio::time::timeout(grace, connections.wait()).await.is_err() {
        tracing::warn!(%addr, ?grace, "connections still open after the grace period; abandoned");
    }
    Ok(())
}

async fn serve_connection<I>(
    io: I,
    peer: SocketAddr,
    router: Router,
    builder: &auto::Builder<TokioExecutor>,
    limits: &ConnectionLimits,
    shutdown: CancellationToken,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let activity = watch::channel(Activity { requests: 0, since: Instant::now(), begun: false }).0;
    let service = {
        let activity = activity.clone();
        hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
            let busy = Busy::begin(&activity);
            req.extensions_mut().insert(ConnectInfo(peer));
            let router = router.clone();
            async move {
                let resp = tower::ServiceExt::oneshot(router, req.map(Body::new)).await?;
                // The request is in progress until its response body is
                // done (an event stream: until it ends).
                Ok::<_, std::convert::Infallible>(resp.map(|body| {
                    Body::new(body.map_frame(move |frame| {
                        let _ = &busy;
                        frame
                    }))
                }))
            }
        })
    };
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    let mut conn = std::pin::pin!(conn);
    let idle = idle(activity.subscribe(), limits.header_read_timeout(), limits.idle_timeout());
    let closing = async {
        tokio::select! {
            _ = idle => tracing::debug!(%peer, "idle connection closed"),
            _ = shutdown.cancelled() => {}
        }
    };
    tokio::select! {
        result = conn.as_mut() => return log_end(peer, result),
        _ = closing => {}
    }
    // Requests in progress finish; no new one is read.
    conn.as_mut().graceful_shutdown();
    log_end(peer, conn.await);
}

fn log_end(peer: SocketAddr, result: Result<(), Box<dyn std::error::Error + Send + Sync>>) {
    if let Err(e) = result {
        tracing::debug!(%peer, error = %e, "connection ended with an error");
    }
}

/// A connection, plain or TLS.
enum Io {
    Plain(tokio::net::TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>),
}

impl tokio::io::AsyncRead for Io {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => std::pin::Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl tokio::io::AsyncWrite for Io {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(s) => std::pin::Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => std::pin::Pin::new(s).poll_flush(cx),
            Io::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => std::pin::Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(s) => std::pin::Pin::new(s).poll_write_vectored(cx, bufs),
            Io::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Io::Plain(s) => s.is_write_vectored(),
            Io::Tls(s) => s.is_write_vectored(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_holds_at_most_its_share_and_gets_it_back() {
        let shares = PerClient::new(2);
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let first = shares.try_take(a).unwrap();
        let _second = shares.try_take(a).unwrap();
        assert!(shares.try_take(a).is_none(), "a third from the same address");
        assert!(shares.try_take(b).is_some(), "another address has its own share");
        drop(first);
        assert!(shares.try_take(a).is_some(), "given back when dropped");
    }

    #[test]
    fn a_limit_of_zero_is_no_limit() {
        let shares = PerClient::new(0);
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let held: Vec<Share> = (0..1000).map(|_| shares.try_take(ip).expect("no limit")).collect();
        assert_eq!(shares.held.lock().unwrap()[&ip], held.len());
    }

    #[test]
    fn an_address_holding_nothing_leaves_no_entry() {
        let shares = PerClient::new(1);
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        drop(shares.try_take(ip));
        assert!(shares.held.lock().unwrap().is_empty());
        let _held = shares.try_take(ip).unwrap();
        assert!(shares.try_take(ip).is_none());
        assert_eq!(shares.held.lock().unwrap().len(), 1);
    }
}
