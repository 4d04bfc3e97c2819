//! The hop to the push service over HTTP/2 without TLS (h2c, prior
//! knowledge): the browsers' event streams multiplexed on a few connections
//! instead of one TCP connection each.
//!
//! hyper-util's pooled client keeps one HTTP/2 connection per upstream and
//! queues every request past the server's `SETTINGS_MAX_CONCURRENT_STREAMS`
//! (hyper's servers allow 200) until a stream ends, which an event stream
//! does not do for hours. This pool counts the streams it has open on each
//! connection and opens another connection when all are at
//! `streams_per_connection`.

use axum::body::Body;
use axum::http::{Request, Response, Uri};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

/// Flow-control window of one stream: what the push service may send ahead
/// of the gateway reading it. An event is a few hundred bytes and the push
/// service keeps its own per-stream buffer; a stream whose browser stops
/// reading fills this, then the push service's buffer, and is closed there
/// (the browser resumes from its last id). hyper's default is 2 MiB.
pub const STREAM_WINDOW: u32 = 64 * 1024;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

pub struct H2cPool {
    upstream: Uri,
    streams_per_connection: usize,
    connections: Mutex<Vec<Arc<Connection>>>,
    /// One connection is set up at a time: a burst of streams waits for it
    /// rather than opening one connection each.
    connecting: tokio::sync::Mutex<()>,
    next_id: AtomicU64,
}

struct Connection {
    id: u64,
    sender: SendRequest<Body>,
    open: AtomicUsize,
}

/// A stream's place on a connection, given back when dropped (the request
/// failed, or its response body ended or was dropped).
struct Slot(Arc<Connection>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Connection {
    fn try_take(self: &Arc<Self>, limit: usize) -> Option<Slot> {
        if self.sender.is_closed() {
            return None;
        }
        self.open.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < limit).then_some(n + 1)).ok()?;
        Some(Slot(self.clone()))
    }
}

#[derive(Debug)]
pub struct Error(String);

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl H2cPool {
    /// `upstream`: the push service's base URL (`http://host:port`).
    pub fn new(upstream: &str, streams_per_connection: usize) -> anyhow::Result<Self> {
        let upstream: Uri = upstream.parse().map_err(|e| anyhow::anyhow!("PUSH_URL {upstream:?}: {e}"))?;
        anyhow::ensure!(
            upstream.scheme_str() == Some("http") && upstream.authority().is_some(),
            "PUSH_URL {upstream} is not an http:// URL: h2c (GATEWAY_PUSH_H2C) is HTTP/2 without TLS"
        );
        Ok(H2cPool {
            upstream,
            streams_per_connection: streams_per_connection.max(1),
            connections: Mutex::new(Vec::new()),
            connecting: tokio::sync::Mutex::new(()),
            next_id: AtomicU64::new(1),
        })
    }

    fn take_slot(&self) -> Option<Slot> {
        let mut conns = self.connections.lock().unwrap();
        conns.retain(|c| !c.sender.is_closed());
        conns.iter().find_map(|c| c.try_take(self.streams_per_connection))
    }

    async fn slot(&self) -> Result<Slot, Error> {
        if let Some(slot) = self.take_slot() {
            return Ok(slot);
        }
        let _one_at_a_time = self.connecting.lock().await;
        // Another request may have opened one while this one waited.
        if let Some(slot) = self.take_slot() {
            return Ok(slot);
        }
        let conn = self.connect().await?;
        let slot = conn.try_take(self.streams_per_connection).ok_or_else(|| Error("connection closed".into()))?;
        self.connections.lock().unwrap().push(conn);
        Ok(slot)
    }

    async fn connect(&self) -> Result<Arc<Connection>, Error> {
        let authority = self.upstream.authority().expect("checked in new");
        let port = authority.port_u16().unwrap_or(80);
        let tcp = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect((authority.host(), port)))
            .await
            .map_err(|_| Error(format!("connecting to {authority} timed out")))?
            .map_err(|e| Error(format!("connecting to {authority}: {e}")))?;
        let _ = tcp.set_nodelay(true);
        let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .initial_stream_window_size(STREAM_WINDOW)
            // Enough for every stream's window at once: a few streams whose
            // browsers stopped reading do not stall the others.
            .initial_connection_window_size(STREAM_WINDOW.saturating_mul(self.streams_per_connection as u32))
            // A connection that died without a FIN (a node gone) is noticed
            // and its streams end: their browsers reconnect.
            .keep_alive_interval(Duration::from_secs(20))
            .keep_alive_timeout(Duration::from_secs(10))
            .keep_alive_while_idle(true)
            .handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| Error(format!("HTTP/2 handshake with {authority}: {e}")))?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        tracing::info!(upstream = %authority, connection = id, "h2c connection to the push service opened");
        let upstream = authority.to_string();
        tokio::spawn(async move {
            match conn.await {
                Ok(()) => tracing::info!(%upstream, connection = id, "h2c connection to the push service closed"),
                Err(e) => {
                    tracing::warn!(%upstream, connection = id, error = %e, "h2c connection to the push service failed")
                }
            }
        });
        Ok(Arc::new(Connection { id, sender, open: AtomicUsize::new(0) }))
    }

    /// Sends `req` (an absolute `http://` URI) on a stream of a pooled
    /// connection. A request that never left (the connection had just
    /// closed, e.g. the push service restarted) is sent once more on another.
    pub async fn request(&self, mut req: Request<Body>) -> Result<Response<Body>, Error> {
        *req.version_mut() = axum::http::Version::HTTP_2;
        let mut retried = false;
        loop {
            let slot = self.slot().await?;
            let mut sender = slot.0.sender.clone();
            match sender.try_send_request(req).await {
                Ok(resp) => return Ok(resp.map(|body| release_with(body, slot))),
                Err(mut e) => {
                    let error = e.error().to_string();
                    match e.take_message() {
                        Some(unsent) if !retried => {
                            tracing::debug!(connection = slot.0.id, %error, "request not sent; another connection");
                            retried = true;
                            req = unsent;
                        }
                        _ => return Err(Error(error)),
                    }
                }
            }
        }
    }
}

/// The response body, holding the stream's slot until it ends or is dropped.
fn release_with(body: Incoming, slot: Slot) -> Body {
    Body::new(body.map_frame(move |frame| {
        let _ = &slot;
        frame
    }))
}
