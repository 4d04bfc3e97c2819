//! Push service: streams each user's order outcomes (`OrderCreated`,
//! `OrderFailed`) to their browsers as server-sent events.
//!
//! Every replica binds its own queue to the ordering exchange, so each sees
//! every order event and can serve any user; the hub hands each event to the
//! streams of the user it belongs to.

mod hub;
mod sse;

use axum::Router;
use axum::routing::get;
use runtime::http::{Readiness, serve, service_router};
use runtime::{Broker, MessagingConfig, Tasks};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use hub::{Hub, PushEvent};

#[derive(clap::Parser, Clone, Debug)]
#[command(name = "push-service", about = "Push service: order events to browsers over SSE")]
pub struct Config {
    #[command(flatten)]
    pub messaging: MessagingConfig,

    /// Seconds between heartbeat comments on an idle stream.
    #[arg(long, env = "SSE_HEARTBEAT_SECS", default_value_t = 15)]
    pub heartbeat_secs: u64,

    #[arg(long, env = "PUSH_ADDR", default_value = "127.0.0.1:8085")]
    pub addr: String,
}

#[derive(Clone)]
pub(crate) struct AppState {
    hub: Arc<Hub>,
    heartbeat: Duration,
    shutdown: CancellationToken,
}

pub async fn run(config: Config, listener: TcpListener, shutdown: CancellationToken) -> anyhow::Result<()> {
    let broker = Broker::new(&config.messaging.amqp_url);
    let hub = Arc::new(Hub::default());
    let state = AppState {
        hub: hub.clone(),
        heartbeat: Duration::from_secs(config.heartbeat_secs),
        shutdown: shutdown.clone(),
    };
    let routes = Router::new().route("/api/v1/orders", get(sse::order_events)).with_state(state);
    let app = service_router(routes, Readiness { db: None, broker: Some(broker.clone()) });

    let mut tasks = Tasks::new(shutdown.clone());
    tasks
        .spawn("order events consumer", hub::consume(hub, broker.clone(), config.messaging.prefetch, shutdown.clone()));
    tasks.spawn("http", serve(listener, app, shutdown.clone()));
    let result = tasks.join().await;
    broker.close().await;
    result
}
