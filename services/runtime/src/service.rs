//! The skeleton every service shares: its HTTP routes with health, metrics
//! and the common layers (and, where configured, an HTTPS port), its tasks,
//! started together and stopped together. Its optional parts: a database
//! (created and migrated; `Service<PgPool>`, the default) with consumers,
//! outbox relay, pruning and gauges; a broker connection; a readiness
//! condition of its own. A service's `run` then reads as its wiring:
//! `Service::start(..)` from its [`ServiceConfig`] (`Service::new` for the
//! gateway, which has no broker), then `.with_database(..)` for the services
//! that keep state (`Service<PgPool>`), `with_broker`, `https`, `ready_when`;
//! the gateway and the push service are `Service<()>`, without a database.

use crate::auth::{CallerVerifier, VerifyKeys};
use crate::http::{Readiness, serve, service_router};
use crate::messaging::outbox::Relay;
use crate::{Broker, Consumer, HttpLimits, MessagingConfig, Tasks};
use anyhow::Context as _;
use axum::Router;
use sqlx::PgPool;
use sqlx::migrate::Migrator;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// What a service keeps its state in: its PostgreSQL pool, or nothing (`()`).
pub trait Storage: Send + Sync + 'static {
    /// The pool readiness pings, if any.
    fn pool(&self) -> Option<PgPool>;
}

impl Storage for PgPool {
    fn pool(&self) -> Option<PgPool> {
        Some(self.clone())
    }
}

impl Storage for () {
    fn pool(&self) -> Option<PgPool> {
        None
    }
}

/// The HTTPS port of a service: its listener, certificate and how long its
/// connections get to finish at shutdown.
struct Https {
    listener: std::net::TcpListener,
    tls: axum_server::tls_rustls::RustlsConfig,
    grace: Duration,
    layer: fn(Router) -> Router,
}

pub struct Service<Db: Storage = PgPool> {
    name: &'static str,
    pub db: Db,
    limits: HttpLimits,
    tasks: Tasks,
    /// The messaging settings and broker of a service that uses one.
    messaging: Option<(MessagingConfig, Broker)>,
    relays_outbox: bool,
    /// Whether a task of this service uses the broker (readiness details then show it).
    uses_broker: bool,
    check: Option<Arc<dyn Fn() -> Option<&'static str> + Send + Sync>>,
    https: Option<Https>,
    /// How requests' callers are checked (see [`crate::auth`]).
    callers: CallerVerifier,
    /// Limits per connection and per client (a server facing the internet),
    /// and the header naming the client's address behind a proxy.
    connections: Option<(crate::http::connections::ConnectionLimits, Option<axum::http::HeaderName>)>,
}

/// What every service behind the gateway is configured with, flattened
/// into its own `Config`: its broker, its HTTP limits and the keys that
/// check its callers (the gateway's assertions).
#[derive(clap::Args, Clone, Debug)]
pub struct ServiceConfig {
    #[command(flatten)]
    pub messaging: MessagingConfig,

    #[command(flatten)]
    pub limits: HttpLimits,

    #[command(flatten)]
    pub callers: crate::auth::CallerKeys,
}

impl Service<()> {
    /// A service with only its HTTP port so far: the gateway and the push
    /// service stay so; the others add their database
    /// ([`Service::with_database`]).
    ///
    /// Every request that names its user (`CurrentUser`) carries the
    /// gateway's assertion (see [`crate::auth`]), checked with `callers`; it
    /// must be meant for this service (its name). Every service has callers
    /// to check, so it is given them at its start.
    pub fn new(name: &'static str, limits: &HttpLimits, callers: &VerifyKeys, shutdown: CancellationToken) -> Self {
        Service {
            name,
            db: (),
            limits: limits.clone(),
            tasks: Tasks::new(shutdown),
            messaging: None,
            relays_outbox: false,
            uses_broker: false,
            check: None,
            https: None,
            callers: CallerVerifier::new(callers.clone(), name),
            connections: None,
        }
    }

    /// A service of `common`'s settings: its limits, its callers' keys and
    /// its broker (connected lazily by the tasks that need it). The services
    /// that keep state add their database ([`Service::with_database`]).
    pub fn start(name: &'static str, common: &ServiceConfig, shutdown: CancellationToken) -> anyhow::Result<Self> {
        let mut service = Service::new(name, &common.limits, &common.callers.verify_keys, shutdown);
        // A configuration error shows at once, before any wait.
        service.messaging = Some((common.messaging.clone(), Broker::from_config(name, &common.messaging)?));
        Ok(service)
    }

    /// Uses the service's broker (its state shows in the readiness details;
    /// it is closed at the end) and returns it.
    pub fn with_broker(&mut self) -> anyhow::Result<Broker> {
        let (_, broker) = self.messaging.as_ref().context("a broker needs the messaging settings of Service::start")?;
        self.uses_broker = true;
        Ok(broker.clone())
    }

    /// Connects to (and migrates) the service's database, with the broker of
    /// `messaging` for its consumers and outbox (connected lazily by the
    /// tasks that need it).
    ///
    /// A database that is away at start is waited for (see
    /// [`crate::data::db::connect_when_available`]); meanwhile `listener` answers
    /// as a service that is alive but not ready: `/health/live` 200,
    /// `/health/ready` and every other route 503 with `Retry-After`.
    pub async fn with_database(
        self,
        database_url: &str,
        migrations: Migrator,
        listener: &TcpListener,
    ) -> anyhow::Result<Service<PgPool>> {
        let (messaging, broker) =
            self.messaging.clone().context("a database service needs the messaging settings of Service::start")?;
        let shutdown = self.shutdown();
        let starting = Starting::serve(self.name, listener, &shutdown)?;
        let pool_size = self.limits.database_pool_size;
        let connected = crate::data::db::connect_when_available(database_url, pool_size, migrations, &shutdown).await;
        starting.stop().await;
        let db = connected?.ok_or_else(|| anyhow::anyhow!("shut down while waiting for the database"))?;
        let Service { name, limits, tasks, uses_broker, check, https, callers, connections, .. } = self;
        let mut service = Service {
            name,
            db,
            limits,
            tasks,
            messaging: Some((messaging.clone(), broker)),
            relays_outbox: false,
            uses_broker,
            check,
            https,
            callers,
            connections,
        };
        // Every service's consumers record processed messages.
        let keep = messaging.processed_retention();
        service.prune(vec![crate::data::prune::inbox(keep)], messaging.prune_interval());
        Ok(service)
    }
}

impl Service<PgPool> {
    /// The messaging settings and broker (every service with a database has them).
    fn messaging(&self) -> (&MessagingConfig, &Broker) {
        let (m, b) = self.messaging.as_ref().expect("with_database sets the messaging");
        (m, b)
    }

    /// Runs `consumer` on its queue.
    pub fn consume<S: Clone + Send + Sync + 'static>(&mut self, task: &'static str, consumer: Consumer<S>) {
        let (m, broker) = self.messaging();
        let run = consumer.run(broker.clone(), m.prefetch, m.retry_delays(), self.shutdown());
        self.tasks.spawn(task, run);
        self.uses_broker = true;
    }

    /// Publishes what the service writes to its outbox.
    pub fn relay_outbox(&mut self) {
        let (m, broker) = self.messaging();
        let relay = Relay::new(self.db.clone(), broker.clone(), Duration::from_millis(m.outbox_poll_ms))
            .confirm_timeout(Duration::from_millis(m.outbox_confirm_timeout_ms))
            .park_after(m.outbox_park_after);
        let (keep, every) = (m.processed_retention(), m.prune_interval());
        self.tasks.spawn("outbox relay", relay.run(self.shutdown()));
        let db = self.db.clone();
        self.gauges("outbox backlog gauges", move || {
            let db = db.clone();
            async move { crate::messaging::outbox::report_backlog(&db).await }
        });
        self.relays_outbox = true;
        self.uses_broker = true;
        self.prune(vec![crate::data::prune::sent_outbox(keep)], every);
    }

    /// Prunes `jobs` at start and then every `every` (see [`crate::data::prune`]).
    pub fn prune(&mut self, jobs: Vec<crate::data::prune::Prune>, every: Duration) {
        self.tasks.spawn("pruning", crate::data::prune::run(self.db.clone(), jobs, every, self.shutdown()));
    }

    /// Gauges read from the database every `METRICS_REFRESH_MS` (see
    /// `metrics::refresh_gauges`).
    pub fn gauges<F, Fut>(&mut self, task: &'static str, read: F)
    where
        F: FnMut() -> Fut + Send + 'static,
        Fut: Future<Output = sqlx::Result<()>> + Send + 'static,
    {
        let refresh = self.messaging().0.metrics_refresh();
        let run = crate::metrics::refresh_gauges(task, refresh, self.shutdown(), read);
        self.tasks.spawn(task, run);
    }
}

impl<Db: Storage> Service<Db> {
    pub fn shutdown(&self) -> CancellationToken {
        self.tasks.shutdown()
    }

    /// Any other long-running task of the service.
    pub fn spawn<F>(&mut self, task: &'static str, future: F)
    where
        F: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        self.tasks.spawn(task, future);
    }

    /// Serves within `limits` per connection and per client address (see
    /// [`crate::http::connections`]); the address is `client_ip_header`'s where
    /// set (a proxy in front), else the connection's peer.
    pub fn limit_connections(
        &mut self,
        limits: &crate::http::connections::ConnectionLimits,
        client_ip_header: Option<axum::http::HeaderName>,
    ) {
        self.connections = Some((limits.clone(), client_ip_header));
    }

    /// A condition of the service's own for readiness: `Some(problem)` while
    /// it is not ready.
    pub fn ready_when(&mut self, problem: impl Fn() -> Option<&'static str> + Send + Sync + 'static) {
        self.check = Some(Arc::new(problem));
    }

    /// Serves the routes on `listener` over TLS too (HTTP/2 by ALPN and
    /// HTTP/1.1), with `layer` applied to that port's router only; its
    /// connections get `grace` to finish at shutdown.
    pub async fn https(
        &mut self,
        listener: std::net::TcpListener,
        tls: &crate::auth::tls::TlsConfig,
        grace: Duration,
        layer: fn(Router) -> Router,
    ) -> anyhow::Result<()> {
        let tls = crate::auth::tls::server_config(tls).await?;
        self.https = Some(Https { listener, tls, grace, layer });
        Ok(())
    }

    /// Serves `routes` (within the service's limits, with health, metrics and
    /// the common layers) and runs every task until shutdown or the first
    /// failure.
    pub async fn serve(mut self, listener: TcpListener, routes: Router) -> anyhow::Result<()> {
        let routes = routes.layer(axum::Extension(self.callers.clone()));
        let broker = self.messaging.as_ref().map(|(_, b)| b.clone());
        let readiness = Readiness {
            db: self.db.pool(),
            broker: broker.clone().filter(|_| self.uses_broker),
            outbox_max_age: self.messaging.as_ref().filter(|_| self.relays_outbox).map(|(m, _)| m.outbox_max_age()),
            check: self.check.clone(),
        };
        let mut routes = self.limits.apply(routes);
        if let Some((limits, client_ip_header)) = &self.connections {
            routes = limits.apply(routes, client_ip_header.clone());
        }
        let app = service_router(self.name, routes, readiness);
        let shutdown = self.shutdown();
        if let Some((limits, client_ip_header)) = self.connections.take() {
            // Counted per peer only where the peer is the client.
            let per_peer = client_ip_header.is_none();
            use crate::http::connections::serve as limited;
            if let Some(https) = self.https.take() {
                let app = (https.layer)(app.clone());
                https.listener.set_nonblocking(true)?;
                let tls = tokio_rustls::TlsAcceptor::from(https.tls.get_inner());
                let (listener, grace) = (TcpListener::from_std(https.listener)?, https.grace);
                let serve = limited(listener, Some(tls), app, limits.clone(), per_peer, shutdown.clone(), grace);
                self.tasks.spawn("https", serve);
            }
            let serve = limited(listener, None, app, limits, per_peer, shutdown, Duration::from_secs(30));
            self.tasks.spawn("http", serve);
            return self.join().await;
        }
        if let Some(https) = self.https.take() {
            let app = (https.layer)(app.clone());
            let serve = crate::auth::tls::serve_tls(https.listener, app, https.tls, shutdown.clone(), https.grace);
            self.tasks.spawn("https", serve);
        }
        self.tasks.spawn("http", serve(listener, app, shutdown));
        self.join().await
    }

    async fn join(self) -> anyhow::Result<()> {
        let broker = self.messaging.as_ref().map(|(_, b)| b.clone());
        let result = self.tasks.join().await;
        if let Some(broker) = broker {
            broker.close().await;
        }
        result
    }
}

/// The body of every service binary: telemetry, configuration from flags and
/// environment, the listener, signals, and a final flush of the traces.
pub async fn main<C, F, Fut>(name: &'static str, addr: fn(&C) -> &str, run: F) -> anyhow::Result<()>
where
    C: clap::Parser,
    F: FnOnce(C, TcpListener, CancellationToken) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    crate::telemetry::init(name);
    let config = C::parse();
    let listener = TcpListener::bind(addr(&config)).await?;
    let shutdown = CancellationToken::new();
    crate::shutdown::on_signal(shutdown.clone());
    let result = run(config, listener, shutdown).await;
    crate::telemetry::flush();
    result
}

/// What a service answers while it waits for its database at start, on a
/// second handle of its listening socket (the service's own server takes the
/// socket over when this one stops: no connection attempt is refused).
struct Starting {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Starting {
    fn serve(name: &'static str, listener: &TcpListener, shutdown: &CancellationToken) -> anyhow::Result<Self> {
        use axum::response::IntoResponse;
        use std::os::fd::AsFd;
        let fd = listener.as_fd().try_clone_to_owned()?;
        let listener = std::net::TcpListener::from(fd);
        listener.set_nonblocking(true)?;
        let listener = TcpListener::from_std(listener)?;
        let unavailable = || async {
            crate::ApiError::unavailable(
                "the service is starting: its database is not reachable yet",
                crate::http::DATABASE_RETRY_AFTER,
            )
            .into_response()
        };
        let ready = || async {
            let status = axum::http::StatusCode::SERVICE_UNAVAILABLE;
            let body = serde_json::json!({
                "code": status.as_u16(),
                "message": "starting: database unreachable",
                "checks": {"database": "unreachable"},
            });
            (status, axum::Json(body)).into_response()
        };
        let router = Router::new()
            .route("/health/live", axum::routing::get(|| async { axum::Json(serde_json::json!({"status": "ok"})) }))
            .route("/health/ready", axum::routing::get(ready))
            .merge(crate::metrics::routes())
            .fallback(unavailable);
        let router = crate::http::with_common_layers(name, router);
        let stop = shutdown.child_token();
        let task = tokio::spawn({
            let stop = stop.clone();
            async move {
                if let Err(e) = axum::serve(listener, router).with_graceful_shutdown(stop.cancelled_owned()).await {
                    tracing::warn!(error = %e, "the server of a starting service failed");
                }
            }
        });
        Ok(Starting { stop, task })
    }

    async fn stop(self) {
        self.stop.cancel();
        if tokio::time::timeout(Duration::from_secs(5), self.task).await.is_err() {
            tracing::warn!("the server of a starting service did not stop in 5 s; abandoned");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only `Service::start` gives a service its broker; the gateway's
    /// `Service::new` has none, and asking it for a database or a broker is
    /// refused with the reason rather than started half-configured.
    #[tokio::test]
    async fn a_service_without_messaging_settings_gets_no_database_or_broker() {
        let keys = crate::auth::AssertionSigner::generate().verify_keys();
        let mut service = Service::new("svc", &HttpLimits::default(), &keys, CancellationToken::new());
        let err = service.with_broker().err().unwrap();
        assert!(err.to_string().contains("messaging settings of Service::start"), "{err}");
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let migrations = Migrator::DEFAULT;
        let err = service.with_database("postgres://nowhere", migrations, &listener).await.err().unwrap();
        assert!(err.to_string().contains("messaging settings of Service::start"), "{err}");
    }
}
