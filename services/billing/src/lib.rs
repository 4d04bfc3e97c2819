//! Billing: one account per user and the payments charged to it.
//!
//! Deposits and withdrawals are synchronous REST calls (204), safe to retry
//! with an `Idempotency-Key`; payments arrive
//! as `CreatePayment` commands and are answered with `PaymentCreated` or
//! `PaymentFailed` through the outbox; a `VoidPayment` settles a payment
//! for good (its outcome if it was taken, else a void that refuses it later). An account is created on first touch
//! (UserCreated, a deposit, a read or a payment), so no ordering between
//! those streams is assumed.

mod accounts;
pub mod payments;

use axum::Router;
use axum::routing::{get, post};
use contracts::messages::{CreatePayment, PaymentCreated, PaymentFailed, UserCreated, VoidPayment};
use contracts::topology;
use runtime::http::idempotency::{self, IdempotencyConfig};
use runtime::http::openapi::InternalAuth;
use runtime::{Consumer, Service};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

// What billing publishes; its outbox refuses any other message.
runtime::publishes!(pub OUTBOX: Billing = "billing" => PaymentCreated, PaymentFailed);

/// The service's REST API, as served at `/openapi.json`.
#[derive(utoipa::OpenApi)]
#[openapi(
    info(title = "Billing service", description = "Accounts, deposits, withdrawals."),
    paths(accounts::get_account, accounts::deposit, accounts::withdraw),
    modifiers(&InternalAuth),
    tags((name = "billing")),
)]
pub struct ApiDoc;

#[derive(clap::Parser, Clone, Debug)]
#[command(name = "billing", about = "Billing service: accounts and payments")]
pub struct Config {
    #[arg(long, env = "BILLING_DATABASE_URL", default_value = "postgres://postgres@127.0.0.1:5432/billing")]
    pub database_url: String,

    /// The broker, the HTTP limits and the keys that check callers.
    #[command(flatten)]
    pub common: runtime::ServiceConfig,

    #[command(flatten)]
    pub idempotency: IdempotencyConfig,

    /// Deposits and withdrawals per user a minute.
    #[command(flatten)]
    pub per_user: runtime::http::PerUserLimits,

    #[arg(long, env = "BILLING_ADDR", default_value = "127.0.0.1:8082")]
    pub addr: String,
}

fn routes(app: accounts::App) -> Router {
    Router::new()
        .route("/api/v1/account", get(accounts::get_account))
        .route("/api/v1/account/deposit", post(accounts::deposit))
        .route("/api/v1/account/withdraw", post(accounts::withdraw))
        .with_state(app)
        .merge(runtime::http::openapi::route(<ApiDoc as utoipa::OpenApi>::openapi()))
}

pub async fn run(config: Config, listener: TcpListener, shutdown: CancellationToken) -> anyhow::Result<()> {
    let mut service = Service::start("billing", &config.common, shutdown)?
        .with_database(&config.database_url, sqlx::migrate!("../../migrations/billing"), &listener)
        .await?;
    let db = service.db.clone();
    service.consume(
        "users consumer",
        Consumer::new(topology::BILLING_USERS, db.clone(), ())
            .on::<UserCreated, _>(|_, tx, msg| Box::pin(accounts::on_user_created(tx, msg))),
    );
    service.consume(
        "payments consumer",
        Consumer::new(topology::BILLING_PAYMENTS, db.clone(), ())
            .on::<CreatePayment, _>(|_, tx, msg| Box::pin(payments::on_create_payment(tx, msg)))
            .on::<VoidPayment, _>(|_, tx, msg| Box::pin(payments::on_void_payment(tx, msg))),
    );
    service.relay_outbox();
    service.prune(vec![idempotency::prune(&config.idempotency)], config.idempotency.prune_interval());
    let deposits = runtime::http::PerUserRate::per_minute("deposits", config.per_user.deposits_per_user_per_minute);
    let withdrawals =
        runtime::http::PerUserRate::per_minute("withdrawals", config.per_user.withdrawals_per_user_per_minute);
    service.spawn("deposit rate pruning", deposits.clone().prune(service.shutdown()));
    service.spawn("withdrawal rate pruning", withdrawals.clone().prune(service.shutdown()));
    let app = accounts::App { db, idempotency_ttl: config.idempotency.ttl(), deposits, withdrawals };
    service.serve(listener, routes(app)).await
}
