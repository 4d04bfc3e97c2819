//! `/health/live` (the process answers) and `/health/ready` (what it needs
//! answers too).

use axum::Router;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use sqlx::PgPool;
use std::time::Duration;

use crate::Broker;

/// What the health endpoints look at. Readiness means "can answer HTTP":
/// only the database (and a service's own `check`) decide it. The broker and
/// the outbox are reported in the readiness body's `checks` and in metrics,
/// never in the status: a service whose broker is away keeps serving (its
/// outbox holds what it publishes), so a broker restart does not take every
/// replica out of rotation.
#[derive(Clone, Default)]
pub struct Readiness {
    pub db: Option<PgPool>,
    pub broker: Option<Broker>,
    /// Reported as `checks.outbox.relayed: false` when the oldest unsent
    /// message is older than this.
    pub outbox_max_age: Option<Duration>,
    /// A service's own condition: `Some(problem)` while it is not ready.
    pub check: Option<std::sync::Arc<dyn Fn() -> Option<&'static str> + Send + Sync>>,
}

async fn live() -> impl IntoResponse {
    axum::Json(serde_json::json!({"status": "ok"}))
}

async fn ready(axum::extract::State(r): axum::extract::State<Readiness>) -> Response {
    let mut problems = Vec::new();
    let mut checks = serde_json::Map::new();
    if let Some(db) = &r.db {
        let ping = tokio::time::timeout(Duration::from_secs(2), sqlx::query!("SELECT 1 AS one").fetch_one(db));
        let up = matches!(ping.await, Ok(Ok(_)));
        checks.insert("database".into(), if up { "up" } else { "unreachable" }.into());
        if !up {
            problems.push("database unreachable");
        }
        if let Some(max) = r.outbox_max_age
            && let Ok(Ok((unsent, oldest))) =
                tokio::time::timeout(Duration::from_secs(2), crate::messaging::outbox::backlog(db)).await
        {
            let oldest = oldest.unwrap_or(0.0);
            checks.insert(
                "outbox".into(),
                serde_json::json!({
                    "unsent": unsent,
                    "oldestUnsentSeconds": oldest,
                    "relayed": oldest <= max.as_secs_f64(),
                }),
            );
        }
    }
    if let Some(problem) = r.check.as_ref().and_then(|check| check()) {
        problems.push(problem);
    }
    if let Some(broker) = &r.broker {
        let connected = broker.is_connected();
        checks.insert("broker".into(), if connected { "connected" } else { "disconnected" }.into());
    }
    if problems.is_empty() {
        axum::Json(serde_json::json!({"status": "ready", "checks": checks})).into_response()
    } else {
        let status = StatusCode::SERVICE_UNAVAILABLE;
        let body = serde_json::json!({"code": status.as_u16(), "message": problems.join(", "), "checks": checks});
        (status, axum::Json(body)).into_response()
    }
}

/// `/health/live` (the process answers) and `/health/ready` (its dependencies do).
pub fn health_routes(readiness: Readiness) -> Router {
    Router::new().route("/health/live", get(live)).route("/health/ready", get(ready)).with_state(readiness)
}
