//! Prometheus metrics: one recorder per process (the launcher runs every
//! service in one), rendered at `/metrics` by each service. Every series
//! carries the `service` label where it is not obvious from the others.

use axum::Router;
use axum::extract::{MatchedPath, Request};
use axum::middleware::Next;
use axum::response::Response;
use axum::routing::get;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::sync::OnceLock;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// The process's recorder, installed on first use.
pub fn handle() -> &'static PrometheusHandle {
    HANDLE.get_or_init(|| {
        let builder = PrometheusBuilder::new()
            // Placement to settlement includes the consumers' retry delays
            // (RETRY_DELAYS_MS, up to a minute each) and a broker outage.
            .set_buckets_for_metric(
                Matcher::Full("order_settlement_duration_seconds".into()),
                &[0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0],
            )
            .expect("valid buckets")
            .set_buckets_for_metric(
                Matcher::Suffix("_seconds".into()),
                &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0],
            )
            .expect("valid buckets");
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        // Another recorder may be installed already (a test harness): keep ours for rendering anyway.
        let _ = metrics::set_global_recorder(recorder);
        handle
    })
}

/// `GET /metrics` in the Prometheus text format.
pub fn routes() -> Router {
    handle();
    Router::new().route("/metrics", get(|| async { handle().render() }))
}

/// Records `http_server_request_duration_seconds{service, method, route, status}`.
pub async fn track_http(service: &'static str, req: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = req.method().to_string();
    let route =
        req.extensions().get::<MatchedPath>().map(|p| p.as_str().to_string()).unwrap_or_else(|| "unmatched".into());
    let response = next.run(req).await;
    let status = response.status().as_u16().to_string();
    metrics::histogram!("http_server_request_duration_seconds",
        "service" => service, "method" => method, "route" => route, "status" => status)
    .record(started.elapsed().as_secs_f64());
    response
}

/// The `database` label of gauges read from a database: its name, which is
/// unique per service (and per test, which runs several systems in one process).
pub fn database_label(pool: &sqlx::PgPool) -> String {
    pool.connect_options().get_database().unwrap_or("").to_string()
}

/// Runs `read` now and then every `every` until `shutdown`. A failed read
/// (database away) is logged and leaves the gauges at their last values;
/// the next tick tries again.
pub async fn refresh_gauges<F, Fut>(
    what: &'static str,
    every: Duration,
    shutdown: CancellationToken,
    mut read: F,
) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = sqlx::Result<()>>,
{
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tick.tick() => {}
        }
        // Bounded: a database that hangs must not stall the next refresh forever.
        match tokio::time::timeout(every.max(Duration::from_secs(2)), read()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(gauges = what, error = %e, "refreshing gauges failed"),
            Err(_) => tracing::warn!(gauges = what, "refreshing gauges timed out"),
        }
    }
}

/// Counts one in `gauge` while it lives: incremented when made, decremented
/// when dropped (a request answered, a stream ended, a client gone away).
/// What is open or waiting now, for operators and autoscalers.
pub struct GaugeGuard(metrics::Gauge);

impl GaugeGuard {
    pub fn new(gauge: metrics::Gauge) -> Self {
        gauge.increment(1.0);
        GaugeGuard(gauge)
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}
