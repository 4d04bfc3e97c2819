//! The skeleton every service with a database shares: its database (created
//! and migrated) and broker connection, its consumers and outbox relay, and
//! its HTTP routes with health and metrics, started together and stopped
//! together. A service's `run` then reads as its wiring.

use crate::http::{Readiness, serve, service_router};
use crate::outbox::Relay;
use crate::{Broker, Consumer, HttpLimits, MessagingConfig, Tasks};
use axum::Router;
use sqlx::PgPool;
use sqlx::migrate::Migrator;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub struct Service {
    name: &'static str,
    pub db: PgPool,
    pub broker: Broker,
    messaging: MessagingConfig,
    limits: HttpLimits,
    tasks: Tasks,
    relays_outbox: bool,
    /// Whether a task of this service uses the broker (readiness details then show it).
    uses_broker: bool,
}

impl Service {
    /// Connects to (and migrates) the service's database; the broker is
    /// connected lazily by the tasks that need it.
    ///
    /// A database that is away at start is waited for (see
    /// [`crate::db::connect_when_available`]); meanwhile `listener` answers
    /// as a service that is alive but not ready: `/health/live` 200,
    /// `/health/ready` and every other route 503 with `Retry-After`.
    pub async fn start(
        name: &'static str,
        database_url: &str,
        migrations: Migrator,
        messaging: &MessagingConfig,
        limits: &HttpLimits,
        listener: &TcpListener,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Self> {
        // A configuration error shows at once, before any wait.
        let amqp_ca = messaging.amqp_ca()?;
        let starting = Starting::serve(name, listener, &shutdown)?;
        let connected =
            crate::db::connect_when_available(database_url, limits.database_pool_size, migrations, &shutdown).await;
        starting.stop().await;
        let db = connected?.ok_or_else(|| anyhow::anyhow!("shut down while waiting for the database"))?;
        let mut service = Service {
            name,
            db,
            broker: Broker::from_config(name, messaging).with_ca(amqp_ca),
            messaging: messaging.clone(),
            limits: limits.clone(),
            tasks: Tasks::new(shutdown),
            relays_outbox: false,
            uses_broker: false,
        };
        // Every service's consumers record processed messages.
        let keep = messaging.processed_retention();
        service.prune(vec![crate::prune::inbox(keep)], messaging.prune_interval());
        Ok(service)
    }

    pub fn shutdown(&self) -> CancellationToken {
        self.tasks.shutdown()
    }

    /// Runs `consumer` on its queue.
    pub fn consume<S: Clone + Send + Sync + 'static>(&mut self, task: &'static str, consumer: Consumer<S>) {
        let m = &self.messaging;
        let run = consumer.run(self.broker.clone(), m.prefetch, m.retry_delays(), self.shutdown());
        self.tasks.spawn(task, run);
        self.uses_broker = true;
    }

    /// Publishes what the service writes to its outbox.
    pub fn relay_outbox(&mut self) {
        let m = &self.messaging;
        let relay = Relay::new(self.db.clone(), self.broker.clone(), Duration::from_millis(m.outbox_poll_ms))
            .confirm_timeout(Duration::from_millis(m.outbox_confirm_timeout_ms))
            .park_after(m.outbox_park_after);
        self.tasks.spawn("outbox relay", relay.run(self.shutdown()));
        let db = self.db.clone();
        self.gauges("outbox backlog gauges", move || {
            let db = db.clone();
            async move { crate::outbox::report_backlog(&db).await }
        });
        self.relays_outbox = true;
        self.uses_broker = true;
        let sent = crate::prune::sent_outbox(self.messaging.processed_retention());
        self.prune(vec![sent], self.messaging.prune_interval());
    }

    /// Prunes `jobs` at start and then every `every` (see [`crate::prune`]).
    pub fn prune(&mut self, jobs: Vec<crate::prune::Prune>, every: Duration) {
        self.tasks.spawn("pruning", crate::prune::run(self.db.clone(), jobs, every, self.shutdown()));
    }

    /// Gauges read from the database every `METRICS_REFRESH_MS` (see
    /// `metrics::refresh_gauges`).
    pub fn gauges<F, Fut>(&mut self, task: &'static str, read: F)
    where
        F: FnMut() -> Fut + Send + 'static,
        Fut: Future<Output = sqlx::Result<()>> + Send + 'static,
    {
        let run = crate::metrics::refresh_gauges(task, self.messaging.metrics_refresh(), self.shutdown(), read);
        self.tasks.spawn(task, run);
    }

    /// Any other long-running task of the service.
    pub fn spawn<F>(&mut self, task: &'static str, future: F)
    where
        F: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        self.tasks.spawn(task, future);
    }

    /// Serves `routes` (within the service's limits, with health, metrics and
    /// the common layers) and runs
    /// every task until shutdown or the first failure.
    pub async fn serve(mut self, listener: TcpListener, routes: Router) -> anyhow::Result<()> {
        let readiness = Readiness {
            db: Some(self.db.clone()),
            broker: self.uses_broker.then(|| self.broker.clone()),
            outbox_max_age: self.relays_outbox.then(|| self.messaging.outbox_max_age()),
            ..Default::default()
        };
        let app = service_router(self.name, self.limits.apply(routes), readiness);
        let shutdown = self.shutdown();
        self.tasks.spawn("http", serve(listener, app, shutdown));
        let result = self.tasks.join().await;
        self.broker.close().await;
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
