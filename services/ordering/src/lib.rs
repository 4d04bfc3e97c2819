//! Ordering: orders and their life. `POST /orders` stores a pending order and
//! its `CreatePayment` in one transaction and answers 202 at once; billing's
//! answer moves the order to `succeeded` or `failed` and announces
//! `OrderCreated` or `OrderFailed`.

mod orders;

use axum::Router;
use axum::routing::get;
use contracts::messages::{PaymentCreated, PaymentFailed};
use contracts::topology;
use runtime::http::{Readiness, serve, service_router};
use runtime::openapi::InternalAuth;
use runtime::outbox::Relay;
use runtime::{Broker, Consumer, MessagingConfig, Tasks};
use sqlx::PgPool;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// The service's REST API, as served at `/openapi.json`.
#[derive(utoipa::OpenApi)]
#[openapi(
    info(title = "Ordering service", description = "Orders: placed at once (202), settled when billing answers."),
    paths(orders::create, orders::list, orders::get_one),
    modifiers(&InternalAuth),
    tags((name = "ordering")),
)]
pub struct ApiDoc;

#[derive(clap::Parser, Clone, Debug)]
#[command(name = "ordering", about = "Ordering service: orders")]
pub struct Config {
    #[arg(long, env = "ORDERING_DATABASE_URL", default_value = "postgres://postgres@127.0.0.1:5432/ordering")]
    pub database_url: String,

    #[command(flatten)]
    pub messaging: MessagingConfig,

    #[arg(long, env = "ORDERING_ADDR", default_value = "127.0.0.1:8083")]
    pub addr: String,
}

fn routes(db: PgPool) -> Router {
    Router::new()
        .route("/api/v1/orders", get(orders::list).post(orders::create))
        .route("/api/v1/orders/{id}", get(orders::get_one))
        .with_state(db)
        .merge(runtime::openapi::route(<ApiDoc as utoipa::OpenApi>::openapi()))
}

pub async fn run(config: Config, listener: TcpListener, shutdown: CancellationToken) -> anyhow::Result<()> {
    let db = runtime::db::connect(&config.database_url, sqlx::migrate!("../../migrations/ordering")).await?;
    let broker = Broker::new(&config.messaging.amqp_url);
    let app = service_router(
        "ordering",
        routes(db.clone()),
        Readiness {
            db: Some(db.clone()),
            broker: Some(broker.clone()),
            outbox_max_age: Some(config.messaging.outbox_max_age()),
            ..Default::default()
        },
    );
    let m = &config.messaging;

    let payments = Consumer::new(topology::ORDERING_PAYMENTS, db.clone(), ())
        .on::<PaymentCreated, _>(|_, tx, msg| Box::pin(orders::on_payment_created(tx, msg)))
        .on::<PaymentFailed, _>(|_, tx, msg| Box::pin(orders::on_payment_failed(tx, msg)));

    let mut tasks = Tasks::new(shutdown.clone());
    tasks.spawn("payments consumer", payments.run(broker.clone(), m.prefetch, m.retry_delays(), shutdown.clone()));
    tasks.spawn(
        "outbox relay",
        Relay::new(db.clone(), broker.clone(), Duration::from_millis(m.outbox_poll_ms)).run(shutdown.clone()),
    );
    tasks.spawn("http", serve(listener, app, shutdown.clone()));
    let result = tasks.join().await;
    broker.close().await;
    result
}
