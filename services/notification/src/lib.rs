//! Notification: keeps a copy of each user's contact details (from
//! `UserCreated`/`UserUpdated`), turns `OrderCreated`/`OrderFailed` into a
//! stored notification and an e-mail, and lists a user's notifications.
//!
//! The e-mail is written to `email_deliveries` in the same transaction as the
//! notification, and the mailer sends it once the address is known. An order
//! event that arrives before the user's profile is therefore never dropped:
//! its e-mail simply waits for the profile. `NotificationCreated` goes to the
//! outbox in that transaction too; the push service streams it to the user's
//! open pages.

mod delivery;
mod mailer;
mod notifications;
pub mod unsubscribe;
pub mod webpush;

use axum::Router;
use axum::routing::get;
use contracts::messages::{NotificationCreated, OrderCreated, OrderFailed, UserCreated, UserUpdated};
use contracts::topology;
use runtime::http::openapi::InternalAuth;
use runtime::{Consumer, Service};
use std::path::PathBuf;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use mailer::{DkimSettings, Mailer, spent_budgets as spent_email_budgets};
pub use webpush::WebPushConfig;

runtime::publishes!(pub OUTBOX: Notification = "notification" => NotificationCreated);
pub use unsubscribe::UnsubscribeConfig;

/// The service's REST API, as served at `/openapi.json`.
#[derive(utoipa::OpenApi)]
#[openapi(
    info(title = "Notification service", description = "The notifications sent to a user."),
    paths(notifications::list, unsubscribe::page, unsubscribe::unsubscribe, webpush::subscriptions::public_key,
        webpush::subscriptions::subscribe, webpush::subscriptions::unsubscribe),
    modifiers(&InternalAuth),
    tags((name = "notifications")),
)]
pub struct ApiDoc;

#[derive(clap::Parser, Clone, Debug)]
#[command(name = "notification", about = "Notification service: notifications and e-mail")]
pub struct Config {
    #[arg(long, env = "NOTIFICATION_DATABASE_URL", default_value = "postgres://postgres@127.0.0.1:5432/notification")]
    pub database_url: String,

    /// The broker, the HTTP limits and the keys that check callers.
    #[command(flatten)]
    pub common: runtime::ServiceConfig,

    #[command(flatten)]
    pub mail: MailConfig,

    #[command(flatten)]
    pub web_push: WebPushConfig,

    #[arg(long, env = "NOTIFICATION_ADDR", default_value = "127.0.0.1:8084")]
    pub addr: String,
}

#[derive(clap::Args, Clone, Debug)]
pub struct MailConfig {
    /// SMTP server: `smtp://host[:port]` plain SMTP (port 25),
    /// `smtp://host[:port]?tls=required` STARTTLS required (587),
    /// `?tls=opportunistic` STARTTLS when offered, `smtps://host[:port]`
    /// implicit TLS (465). Credentials as userinfo (`smtps://user:password@host`,
    /// percent-encoded) or SMTP_USERNAME/SMTP_PASSWORD. Without it, e-mails
    /// are written as files to `--mail-dir`.
    #[arg(long, env = "SMTP_URL")]
    pub smtp_url: Option<String>,

    /// User the mailer logs in to the SMTP server as (with SMTP_PASSWORD).
    #[arg(long, env = "SMTP_USERNAME")]
    pub smtp_username: Option<String>,

    /// Password of SMTP_USERNAME.
    #[arg(long, env = "SMTP_PASSWORD", hide_env_values = true)]
    pub smtp_password: Option<String>,

    /// PEM file of CA certificates the SMTP server's certificate may chain
    /// to, besides the public web roots (a private CA).
    #[arg(long, env = "SMTP_CA_FILE")]
    pub smtp_ca_file: Option<PathBuf>,

    /// Seconds one e-mail's SMTP exchange may take, from the connection to
    /// the server's answer to the message; a server slower than that (or
    /// one that accepts and never answers) gets the e-mail again later.
    #[arg(long, env = "SMTP_TIMEOUT_SECS", default_value_t = 30)]
    pub smtp_timeout_secs: u64,

    /// Where e-mails go when no SMTP server is configured.
    #[arg(long, env = "MAIL_DIR", default_value = "var/mail")]
    pub mail_dir: PathBuf,

    #[arg(long, env = "MAIL_FROM", default_value = "Order System <orders@localhost>")]
    pub mail_from: String,

    /// E-mails one address may be sent an hour; the notifications beyond it
    /// are still stored and listed, but not mailed. 0: no budget.
    #[arg(long, env = "EMAILS_PER_RECIPIENT_PER_HOUR", default_value_t = 20)]
    pub emails_per_recipient_per_hour: u32,

    #[command(flatten)]
    pub dkim: DkimSettings,

    #[command(flatten)]
    pub unsubscribe: UnsubscribeConfig,
}

pub async fn run(config: Config, listener: TcpListener, shutdown: CancellationToken) -> anyhow::Result<()> {
    let mut service = Service::start("notification", &config.common, shutdown)?
        .with_database(&config.database_url, sqlx::migrate!("../../migrations/notification"), &listener)
        .await?;
    let db = service.db.clone();
    service.consume(
        "users consumer",
        Consumer::new(topology::NOTIFICATION_USERS, db.clone(), ())
            .on::<UserCreated, _>(|_, tx, msg| Box::pin(notifications::on_user_created(tx, msg)))
            .on::<UserUpdated, _>(|_, tx, msg| Box::pin(notifications::on_user_updated(tx, msg))),
    );
    service.consume(
        "orders consumer",
        Consumer::new(topology::NOTIFICATION_ORDERS, db.clone(), ())
            .on::<OrderCreated, _>(|_, tx, msg| Box::pin(notifications::on_order_created(tx, msg)))
            .on::<OrderFailed, _>(|_, tx, msg| Box::pin(notifications::on_order_failed(tx, msg))),
    );
    // NotificationCreated, written with each notification, for the push service.
    service.relay_outbox();
    let links = unsubscribe::Links::from_config(&config.mail.unsubscribe)?.map(std::sync::Arc::new);
    let mailer = Mailer::new(&config.mail, db.clone(), links.clone())?;
    service.prune(vec![mailer::spent_budgets()], config.common.messaging.prune_interval());
    let poll = Duration::from_millis(config.common.messaging.outbox_poll_ms);
    let shutdown = service.shutdown();
    service.spawn("mailer", mailer.run(poll, shutdown.clone()));
    let vapid = config.web_push.vapid()?;
    if let Some(vapid) = &vapid {
        let pusher = webpush::Pusher::new(&config.web_push, vapid.clone(), db.clone())?;
        service.prune(vec![webpush::pusher::spent_budgets()], config.common.messaging.prune_interval());
        service.spawn("web push", pusher.run(poll, shutdown));
    }
    let web_push = webpush::subscriptions::WebPush::new(db.clone(), vapid, config.web_push.clone());
    let routes = Router::new()
        .route("/api/v1/notifications", get(notifications::list))
        .with_state(db.clone())
        .route(unsubscribe::PATH, get(unsubscribe::page).post(unsubscribe::unsubscribe))
        .with_state(unsubscribe::Unsubscribe { db, links })
        .merge(webpush::subscriptions::routes(web_push))
        .merge(runtime::http::openapi::route(<ApiDoc as utoipa::OpenApi>::openapi()));
    service.serve(listener, routes).await
}
