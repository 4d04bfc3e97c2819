//! Ordering: orders and their life. `POST /orders` stores a pending order and
//! its `CreatePayment` in one transaction and answers 202 at once; billing's
//! answer moves the order to `succeeded` or `failed` and announces
//! `OrderCreated` or `OrderFailed`. Pollers get tags, 304s and long polls
//! woken by the settlement (PostgreSQL NOTIFY from the `order_changed` trigger).
//! An order left pending is re-driven and, past a timeout, voided (`sweeper`).

pub mod orders;
pub mod sweeper;

use axum::Router;
use axum::routing::get;
use contracts::messages::{CreatePayment, OrderCreated, OrderFailed, PaymentCreated, PaymentFailed, VoidPayment};
use contracts::topology;
use runtime::data::watch::Watch;
use runtime::http::idempotency::{self, IdempotencyConfig};
use runtime::http::openapi::InternalAuth;
use runtime::{Consumer, Service};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

// What ordering publishes; its outbox refuses any other message.
runtime::publishes!(pub OUTBOX: Ordering = "ordering" => CreatePayment, VoidPayment, OrderCreated, OrderFailed);

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

    /// The broker, the HTTP limits and the keys that check callers.
    #[command(flatten)]
    pub common: runtime::ServiceConfig,

    #[command(flatten)]
    pub idempotency: IdempotencyConfig,

    /// Serve the API only (its long polls included), without consumers or an
    /// outbox relay: a replica that scales the HTTP side apart from the
    /// replicas that settle orders and publish.
    #[arg(long, env = "ORDERING_API_ONLY", default_value_t = false)]
    pub api_only: bool,

    #[command(flatten)]
    pub sweeper: sweeper::SweeperConfig,

    /// Orders per user a minute (`ORDERS_PER_USER_PER_MINUTE`).
    #[command(flatten)]
    pub per_user: runtime::http::PerUserLimits,

    #[arg(long, env = "ORDERING_ADDR", default_value = "127.0.0.1:8083")]
    pub addr: String,
}

fn routes(app: orders::App) -> Router {
    Router::new()
        .route("/api/v1/orders", get(orders::list).post(orders::create))
        .route("/api/v1/orders/{id}", get(orders::get_one))
        .with_state(app)
        .merge(runtime::http::openapi::route(<ApiDoc as utoipa::OpenApi>::openapi()))
}

pub async fn run(config: Config, listener: TcpListener, shutdown: CancellationToken) -> anyhow::Result<()> {
    let mut service = Service::start("ordering", &config.common, shutdown)?
        .with_database(&config.database_url, sqlx::migrate!("../../migrations/ordering"), &listener)
        .await?;
    let db = service.db.clone();
    if !config.api_only {
        service.consume(
            "payments consumer",
            Consumer::new(topology::ORDERING_PAYMENTS, db.clone(), ())
                .on::<PaymentCreated, _>(|_, tx, msg| Box::pin(orders::on_payment_created(tx, msg)))
                .on::<PaymentFailed, _>(|_, tx, msg| Box::pin(orders::on_payment_failed(tx, msg))),
        );
        service.relay_outbox();
        // Orders left pending for want of a message: re-driven, then voided.
        service.spawn("pending orders sweeper", sweeper::run(db.clone(), config.sweeper.clone(), service.shutdown()));
    }
    // Long polls: one LISTEN connection wakes this replica's waiters when an
    // order changes, whichever replica changed it.
    let watch = Watch::new(service.shutdown());
    service.spawn("order changes listener", watch.clone().listen(db.clone(), orders::ORDER_CHANGED));
    service.prune(vec![idempotency::prune(&config.idempotency)], config.idempotency.prune_interval());
    let pool = db.clone();
    service.gauges("pending orders gauges", move || {
        let pool = pool.clone();
        async move { orders::report_pending(&pool).await }
    });
    let orders_rate = runtime::http::PerUserRate::per_minute("orders", config.per_user.orders_per_user_per_minute);
    service.spawn("order rate pruning", orders_rate.clone().prune(service.shutdown()));
    let final_tags = std::sync::Arc::new(runtime::http::conditional::FinalTags::new(orders::FINAL_TAGS_CAPACITY));
    let app = orders::App { db, watch, idempotency_ttl: config.idempotency.ttl(), orders_rate, final_tags };
    service.serve(listener, routes(app)).await
}
