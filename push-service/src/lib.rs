//! Push service: streams each user's order outcomes (`OrderCreated`,
//! `OrderFailed`) and notifications (`NotificationCreated`) to their
//! browsers as server-sent events, over HTTP/2 (TLS
//! with ALPN `h2`, or cleartext h2c and HTTP/1.1 behind a proxy).
//!
//! The events come from a durable RabbitMQ stream (see `stream`): each event's
//! SSE id is its stream offset, the same on every replica, so a browser can
//! resume from its last id on any replica, after a restart too, within the
//! stream's retention. The hub fans live events out to the connections of the
//! user each belongs to; a resuming connection replays what it missed from
//! the stream and then joins the live fan-out (see `sse`).

mod hub;
mod replays;
mod sse;
mod stream;

use axum::Router;
use axum::routing::get;

use runtime::auth::tls::TlsConfig;
use runtime::auth::tokens::TokenVerifier;
use runtime::http::openapi::InternalAuth;
use runtime::messaging::push_stream::{max_age, parse_max_age};
use runtime::{Broker, MessagingConfig, Service};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use hub::{EventData, Hub, NotificationEventData, OrderEventData, PushEvent};
pub use sse::RESET;

/// The push service's REST API, as served at `/openapi.json`.
#[derive(utoipa::OpenApi)]
#[openapi(
    info(title = "Push service", description = "Order events to browsers as server-sent events."),
    paths(sse::order_events),
    modifiers(&InternalAuth),
    tags((name = "push")),
)]
pub struct ApiDoc;

#[derive(clap::Parser, Clone, Debug)]
#[command(name = "push-service", about = "Push service: order events to browsers over HTTP/2 server-sent events")]
pub struct Config {
    /// The broker, the HTTP limits and the keys that check callers.
    #[command(flatten)]
    pub common: runtime::ServiceConfig,

    /// Seconds between heartbeat comments on an idle stream.
    #[arg(long, env = "SSE_HEARTBEAT_SECS", default_value_t = 15)]
    pub heartbeat_secs: u64,

    /// The `retry:` hint: milliseconds a browser waits before reconnecting
    /// (each stream is told a delay drawn from half to twice this).
    #[arg(long, env = "SSE_RETRY_MS", default_value_t = 3000)]
    pub retry_ms: u64,

    /// Events a connection may fall behind by before it is closed (the
    /// browser then resumes from its last id).
    #[arg(long, env = "PUSH_CONNECTION_BUFFER", default_value_t = 64)]
    pub buffer: usize,

    /// On shutdown, open streams are closed at random moments within this
    /// many seconds, so that their reconnections are spread out.
    #[arg(long, env = "PUSH_DRAIN_SECS", default_value_t = 10)]
    pub drain_secs: u64,

    /// Recent events kept in memory (within the retention) so that a browser
    /// reconnecting to the same replica, or to one just started (which keeps
    /// the history it reads at start), resumes without reading the stream;
    /// 0 turns this off.
    #[arg(long, env = "PUSH_RECENT_EVENTS", default_value_t = 10_000)]
    pub recent_events: usize,

    /// Message ids of the last events remembered, so that an event the
    /// outbox publishes again (at-least-once) is not delivered twice.
    #[arg(long, env = "PUSH_DEDUP_EVENTS", default_value_t = 200_000)]
    pub dedup_events: usize,

    /// How far back a starting replica reads the stream to learn the message
    /// ids of events delivered before it started (same units as the retention).
    #[arg(long, env = "PUSH_DEDUP_LOOKBACK", default_value = "1h", value_parser = parse_max_age)]
    pub dedup_lookback: String,

    /// Replays (resumes from an older id) read from the stream at once.
    #[arg(long, env = "PUSH_MAX_REPLAYS", default_value_t = 64)]
    pub max_replays: usize,

    /// Replays from the stream one user may run at once.
    #[arg(long, env = "PUSH_MAX_REPLAYS_PER_USER", default_value_t = 2)]
    pub max_replays_per_user: usize,

    /// How long a resume waits for a replay slot before it is answered 503.
    #[arg(long, env = "PUSH_REPLAY_WAIT_MS", default_value_t = 2000)]
    pub replay_wait_ms: u64,

    /// Most stream entries a resume may replay; one from further back gets
    /// a `reset` event (refetch) and continues live.
    #[arg(long, env = "PUSH_MAX_REPLAY_ENTRIES", default_value_t = 100_000)]
    pub max_replay_entries: u64,

    /// Streams one user may hold open on a replica at once; past it, 429.
    #[arg(long, env = "PUSH_MAX_STREAMS_PER_USER", default_value_t = 8)]
    pub max_streams_per_user: usize,

    /// Identity's URL: streams opened on the HTTPS port (which faces
    /// browsers) need a valid access token (bearer header or `accessToken`
    /// cookie) checked here against identity's keys. Required with
    /// PUSH_TLS_ADDR: that port is refused at start without it. The
    /// cleartext port checks the gateway's assertion, like every service.
    #[arg(long, env = "PUSH_IDENTITY_URL")]
    pub identity_url: Option<String>,

    /// How the token checks (with `PUSH_IDENTITY_URL`) keep current.
    #[command(flatten)]
    pub verifier: runtime::auth::tokens::VerifierConfig,

    /// Cleartext address: HTTP/1.1 and prior-knowledge HTTP/2 (h2c).
    #[arg(long, env = "PUSH_ADDR", default_value = "127.0.0.1:8085")]
    pub addr: String,

    /// HTTPS address (ALPN h2 and http/1.1); empty turns HTTPS off.
    #[arg(long, env = "PUSH_TLS_ADDR", default_value = "127.0.0.1:8086")]
    pub tls_addr: String,

    #[command(flatten)]
    pub tls: TlsConfig,
}

impl Config {
    /// The defaults, on `messaging`, with HTTPS off, behind a gateway whose
    /// assertions `callers` verifies.
    pub fn local(messaging: MessagingConfig, callers: runtime::auth::VerifyKeys) -> Self {
        Config {
            common: runtime::ServiceConfig {
                messaging,
                limits: runtime::HttpLimits::default(),
                callers: runtime::auth::CallerKeys { verify_keys: callers },
            },
            heartbeat_secs: 15,
            retry_ms: 3000,
            buffer: 64,
            drain_secs: 10,
            max_replays: 64,
            max_replays_per_user: 2,
            replay_wait_ms: 2000,
            max_replay_entries: 100_000,
            max_streams_per_user: 8,
            recent_events: 10_000,
            dedup_events: 200_000,
            dedup_lookback: "1h".into(),
            identity_url: None,
            verifier: Default::default(),
            addr: String::new(),
            tls_addr: String::new(),
            tls: TlsConfig::default(),
        }
    }
}

#[derive(Clone)]
pub(crate) struct AppState {
    hub: Arc<Hub>,
    broker: Broker,
    spec: stream::StreamSpec,
    prefetch: u16,
    replays: Arc<replays::ReplaySlots>,
    max_replay_entries: u64,
    max_streams_per_user: usize,
    verifier: Option<Arc<TokenVerifier>>,
    heartbeat: Duration,
    retry: Duration,
    drain: Duration,
    shutdown: CancellationToken,
}

/// What this replica holds: open streams, users with one, and the offset of
/// the last stream entry read (not routed by the gateway).
async fn streams(axum::extract::State(state): axum::extract::State<AppState>) -> axum::Json<serde_json::Value> {
    axum::Json(serde_json::json!({
        "openStreams": state.hub.open_streams(),
        "users": state.hub.users(),
        "position": state.hub.position(),
        "replaysFromMemory": state.hub.replays_from_memory.load(std::sync::atomic::Ordering::Relaxed),
        "replaysFromStream": state.hub.replays_from_stream.load(std::sync::atomic::Ordering::Relaxed),
    }))
}

/// Runs the service on `listener` (and on `tls_addr` when set) until `shutdown`.
pub async fn run(config: Config, listener: TcpListener, shutdown: CancellationToken) -> anyhow::Result<()> {
    let tls = runtime::auth::tls::bind(&config.tls_addr)?;
    run_with_tls(config, listener, tls, shutdown).await
}

/// [`run`], with the HTTPS listener given (or none).
pub async fn run_with_tls(
    config: Config,
    listener: TcpListener,
    tls_listener: Option<std::net::TcpListener>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    if tls_listener.is_some() && config.identity_url.is_none() {
        anyhow::bail!(
            "PUSH_TLS_ADDR opens a port facing browsers, which needs PUSH_IDENTITY_URL to check their tokens \
             (or set PUSH_TLS_ADDR empty: behind the gateway, the cleartext port checks its assertions)"
        );
    }
    let mut service = Service::start("push", &config.common, shutdown.clone())?;
    // The stream (name, retention) is the one every service declares.
    let broker = service.with_broker()?;
    let spec = config.common.messaging.push_stream.clone();
    let recent = hub::Recent { events: config.recent_events, max_age: spec.retention().map_err(anyhow::Error::msg)? };
    let hub = Arc::new(Hub::new(config.buffer, recent, config.dedup_events));
    let lookback = max_age(&config.dedup_lookback).map_err(anyhow::Error::msg)?;
    // A stream reader needs credit for whole chunks to keep up.
    let prefetch = config.common.messaging.prefetch.max(256);
    let drain = Duration::from_secs(config.drain_secs);
    let verifier = config.identity_url.as_deref().map(|url| Arc::new(TokenVerifier::new(url, config.verifier.clone())));
    let state = AppState {
        hub: hub.clone(),
        broker: broker.clone(),
        spec: spec.clone(),
        prefetch,
        replays: replays::ReplaySlots::new(
            config.max_replays,
            config.max_replays_per_user,
            Duration::from_millis(config.replay_wait_ms),
        ),
        max_replay_entries: config.max_replay_entries,
        max_streams_per_user: config.max_streams_per_user.max(1),
        verifier: verifier.clone(),
        heartbeat: Duration::from_secs(config.heartbeat_secs.max(1)),
        retry: Duration::from_millis(config.retry_ms),
        drain,
        shutdown: shutdown.clone(),
    };
    let routes = Router::new()
        .route("/api/v1/orders", get(sse::order_events))
        .route("/internal/v1/streams", get(streams))
        .with_state(state)
        .merge(runtime::http::openapi::route(<ApiDoc as utoipa::OpenApi>::openapi()));
    // Ready once its event stream is attached (the reader has reached the
    // live end: a stream opened before that would miss events), and, with
    // a port facing browsers, only while it can judge tokens.
    let (attached, judge) = (hub.clone(), verifier.clone());
    service.ready_when(move || match attached.position() {
        None => Some("order event stream not attached yet"),
        Some(_) => judge.as_ref().and_then(|j| j.not_ready()),
    });
    if let Some(verifier) = verifier {
        service.spawn("token keys", verifier.keep_fresh(service.shutdown()));
    }
    service.spawn("order event stream", stream::read_live(hub, broker, spec, prefetch, lookback, service.shutdown()));
    if let Some(tls_listener) = tls_listener {
        let browsers = |app: Router| app.layer(axum::Extension(sse::BrowserFacing));
        service.https(tls_listener, &config.tls, drain + Duration::from_secs(5), browsers).await?;
    }
    service.serve(listener, routes).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Config {
        let keys = runtime::auth::AssertionSigner::generate().verify_keys();
        // Nothing listens there: the check comes before any connection.
        Config::local(MessagingConfig::local("amqp://guest:guest@127.0.0.1:1/%2f"), keys)
    }

    #[tokio::test]
    async fn a_port_facing_browsers_is_refused_at_start_without_token_verification() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let tls = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let started = run_with_tls(config(), listener, Some(tls), CancellationToken::new());
        let err = tokio::time::timeout(Duration::from_secs(5), started).await.expect("refused at once").unwrap_err();
        assert!(err.to_string().contains("PUSH_IDENTITY_URL"), "{err}");

        // The binary's way: PUSH_TLS_ADDR names the port.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let config = Config { tls_addr: "127.0.0.1:0".into(), ..config() };
        let started = run(config, listener, CancellationToken::new());
        let err = tokio::time::timeout(Duration::from_secs(5), started).await.expect("refused at once").unwrap_err();
        assert!(err.to_string().contains("PUSH_IDENTITY_URL"), "{err}");
    }

    #[tokio::test]
    async fn behind_the_gateway_only_it_needs_no_token_verification() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(run_with_tls(config(), listener, None, shutdown.clone()));
        // Up (alive), though the broker is not there.
        let mut alive = false;
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                alive = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(alive && !task.is_finished());
        shutdown.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
    }

    /// GET /health/ready of the service at `addr`: status and body.
    async fn readiness(addr: std::net::SocketAddr) -> Option<(u16, serde_json::Value)> {
        let r = reqwest::get(format!("http://{addr}/health/ready")).await.ok()?;
        Some((r.status().as_u16(), r.json().await.ok()?))
    }

    /// A vhost of this machine's broker for one test, deleted on drop.
    struct Vhost(String);

    impl Vhost {
        fn api() -> String {
            std::env::var("TEST_RABBITMQ_API").unwrap_or_else(|_| "http://guest:guest@127.0.0.1:15672/api".into())
        }

        async fn create(name: &str) -> Vhost {
            let http = reqwest::Client::new();
            let put = http.put(format!("{}/vhosts/{name}", Self::api())).send().await.expect("management API");
            assert!(put.status().is_success(), "{}", put.status());
            let perms = serde_json::json!({"configure": ".*", "write": ".*", "read": ".*"});
            let put = http.put(format!("{}/permissions/{name}/guest", Self::api())).json(&perms).send().await.unwrap();
            assert!(put.status().is_success(), "{}", put.status());
            Vhost(name.into())
        }
    }

    impl Drop for Vhost {
        fn drop(&mut self) {
            let url = format!("{}/vhosts/{}", Self::api(), self.0);
            // Drop may run inside the runtime: delete from a thread of its own.
            let _ = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
                rt.block_on(async { reqwest::Client::new().delete(url).send().await.map(|_| ()) })
            })
            .join();
        }
    }

    /// Behind the gateway (no HTTPS port, so no token check), a new replica
    /// must not take streams before its event stream is attached: a stream
    /// opened then would miss events, or be answered 503.
    #[tokio::test]
    async fn a_replica_is_ready_only_once_its_event_stream_is_attached() {
        // The broker is not there: alive, but not ready, and saying why.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(run_with_tls(config(), listener, None, shutdown.clone()));
        let mut answer = None;
        for _ in 0..200 {
            answer = readiness(addr).await;
            if answer.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let (status, body) = answer.expect("the service answers");
        assert_eq!(status, 503, "{body}");
        assert!(body["message"].as_str().unwrap_or_default().contains("event stream not attached"), "{body}");
        shutdown.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(10), task).await;

        // A broker: ready once the stream is read live.
        let vhost = Vhost::create(&format!("push_ready_{}", uuid::Uuid::new_v4().simple())).await;
        let base = std::env::var("TEST_AMQP_BASE").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672".into());
        let keys = runtime::auth::AssertionSigner::generate().verify_keys();
        let config = Config::local(MessagingConfig::local(format!("{base}/{}", vhost.0)), keys);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(run_with_tls(config, listener, None, shutdown.clone()));
        let mut ready = false;
        for _ in 0..600 {
            if let Some((200, _)) = readiness(addr).await {
                ready = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(ready, "not ready within 30 s with the broker there");
        shutdown.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
    }
}
