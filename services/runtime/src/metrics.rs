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
use std::time::Instant;

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// The process's recorder, installed on first use.
pub fn handle() -> &'static PrometheusHandle {
    HANDLE.get_or_init(|| {
        let builder = PrometheusBuilder::new()
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
