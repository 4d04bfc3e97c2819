//! The operations commands of `order-system`: everything but running the
//! system. Each reads the same `SystemConfig` as `run` (the databases, the
//! broker), so it acts on the system that configuration describes.

use crate::system::{Service, SystemConfig};
use std::path::Path;

/// `audit`'s own settings.
#[derive(clap::Args, Debug)]
pub struct AuditArgs {
    /// RabbitMQ management API (credentials in the URL).
    #[arg(long, env = "RABBITMQ_API_URL", default_value = "http://guest:guest@127.0.0.1:15672/api")]
    pub rabbitmq_api: String,
    /// An order pending longer than this is a violation.
    #[arg(long, env = "AUDIT_PENDING_THRESHOLD_SECS", default_value_t = 300)]
    pub pending_threshold_secs: u64,
    /// Orders settled less than this ago are not yet checked for their
    /// notification (it may be on its way).
    #[arg(long, env = "AUDIT_NOTIFICATION_GRACE_SECS", default_value_t = 60)]
    pub notification_grace_secs: u64,
}

/// Writes the OpenAPI documents generated from the code to `dir`.
pub fn openapi(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    for (name, json) in crate::openapi::all_documents() {
        std::fs::write(dir.join(&name), json)?;
        println!("wrote {}", dir.join(&name).display());
    }
    Ok(())
}

/// Moves the messages of `queue`'s dead-letter queue back to `queue`.
pub async fn replay_dead_letters(config: &SystemConfig, queue: &str) -> anyhow::Result<()> {
    let broker = runtime::Broker::new(&config.messaging.amqp_url).with_ca(config.messaging.amqp_ca()?);
    let moved = runtime::messaging::consumer::replay_dead_letters(&broker, queue).await?;
    broker.close().await;
    println!("moved {moved} message(s) from {queue}.dead back to {queue}");
    Ok(())
}

/// Prints a new key pair for the gateway's assertions, as environment lines.
/// A reader that stops early (`| head -2`) is not an error.
pub fn internal_keys() -> anyhow::Result<()> {
    use std::io::Write;
    let signer = runtime::auth::AssertionSigner::generate();
    let text = format!(
        "# The gateway's private key: keep it secret (a Kubernetes Secret, a Docker secret).\n\
         INTERNAL_SIGNING_KEY={}\n\
         # Its public half, for every service behind the gateway (and the launcher's EXTERNAL_PUSH_URL one).\n\
         INTERNAL_VERIFY_KEY={}\n",
        signer.private_key_text(),
        signer.verify_keys().text()
    );
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => Ok(other?),
    }
}

/// Rotates the token signing key kept in the identity database.
pub async fn rotate_key(config: &SystemConfig) -> anyhow::Result<()> {
    let kid = identity::rotate_signing_key(&config.database_url(Service::Identity)).await?;
    println!("new token signing key {kid}; identity replicas sign with it within SIGNING_KEY_RELOAD_SECS");
    Ok(())
}

/// The audit of the system `config` describes.
pub fn audit_config(config: &SystemConfig, args: &AuditArgs) -> crate::audit::AuditConfig {
    crate::audit::AuditConfig {
        billing_db: config.database_url(Service::Billing),
        ordering_db: config.database_url(Service::Ordering),
        notification_db: config.database_url(Service::Notification),
        rabbitmq_api: args.rabbitmq_api.clone(),
        vhost: crate::audit::vhost_of(&config.messaging.amqp_url),
        amqp_url: Some(config.messaging.amqp_url.clone()),
        pending_threshold: std::time::Duration::from_secs(args.pending_threshold_secs),
        notification_grace: std::time::Duration::from_secs(args.notification_grace_secs),
    }
}

/// Runs the audit and prints its report; `true` when it found no violation.
pub async fn audit(config: &SystemConfig, args: &AuditArgs) -> anyhow::Result<bool> {
    let report = crate::audit::run(&audit_config(config, args)).await?;
    print!("{report}");
    Ok(report.is_clean())
}
