//! Configuration shared by every service that talks to the broker.

use anyhow::Context;
use std::path::PathBuf;
use std::time::Duration;

/// How a service reaches RabbitMQ and how its consumers retry.
#[derive(clap::Args, Clone, Debug)]
pub struct MessagingConfig {
    /// AMQP URL of the broker (the vhost is part of it): `amqp://` plain,
    /// `amqps://` TLS (port 5671 by default; the broker's certificate is
    /// checked against the public web roots and AMQP_CA_FILE).
    #[arg(long, env = "AMQP_URL", default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    pub amqp_url: String,

    /// PEM file of CA certificates the broker's certificate may chain to
    /// (a private CA), for `amqps://`.
    #[arg(long, env = "AMQP_CA_FILE")]
    pub amqp_ca_file: Option<PathBuf>,

    /// Delays before each retry of a failed message, in milliseconds; after
    /// the last one the message goes to the queue's dead-letter queue.
    #[arg(long, env = "RETRY_DELAYS_MS", value_delimiter = ',', default_value = "1000,10000,60000")]
    pub retry_delays_ms: Vec<u64>,

    /// Unacknowledged deliveries a consumer holds (and handles concurrently).
    #[arg(long, env = "CONSUMER_PREFETCH", default_value_t = 16)]
    pub prefetch: u16,

    /// Safety-net poll of the outbox when no NOTIFY arrives, in milliseconds.
    #[arg(long, env = "OUTBOX_POLL_MS", default_value_t = 1000)]
    pub outbox_poll_ms: u64,

    /// Readiness fails when the oldest unsent outbox message is older than
    /// this, in seconds (the relay is stuck or the broker refuses it).
    #[arg(long, env = "OUTBOX_READY_MAX_AGE_SECS", default_value_t = 300)]
    pub outbox_ready_max_age_secs: u64,

    /// How often gauges read from the database (outbox backlog, pending
    /// orders) are refreshed, in milliseconds. They are read on their own
    /// schedule, so they stay current while the broker is away.
    #[arg(long, env = "METRICS_REFRESH_MS", default_value_t = 5000)]
    pub metrics_refresh_ms: u64,

    /// How long the outbox relay waits for the broker's publisher confirms
    /// of a batch, in milliseconds, before it tries them on a new channel.
    #[arg(long, env = "OUTBOX_CONFIRM_TIMEOUT_MS", default_value_t = 10_000)]
    pub outbox_confirm_timeout_ms: u64,

    /// Refusals by the broker (returned unroutable or nacked) after which an
    /// outbox message is parked (kept with its reason and reported, tried
    /// again after a delay capped at 5 minutes).
    #[arg(long, env = "OUTBOX_PARK_AFTER", default_value_t = 5)]
    pub outbox_park_after: u32,

    /// How often bounded tables are pruned (processed messages, sent outbox
    /// rows, expired revoked tokens, ...), in seconds.
    #[arg(long, env = "PRUNE_INTERVAL_SECS", default_value_t = 600)]
    pub prune_interval_secs: u64,

    /// How long processed-message records and sent outbox rows are kept, in
    /// hours (a redelivery older than this would be handled again).
    #[arg(long, env = "PROCESSED_RETENTION_HOURS", default_value_t = 168)]
    pub processed_retention_hours: u64,

    /// The push service's stream of order events, which every service
    /// declares: one setting for all of them.
    #[command(flatten)]
    pub push_stream: crate::messaging::push_stream::PushStream,
}

impl MessagingConfig {
    pub fn local(amqp_url: impl Into<String>) -> Self {
        MessagingConfig {
            amqp_url: amqp_url.into(),
            amqp_ca_file: None,
            retry_delays_ms: vec![1000, 10_000, 60_000],
            prefetch: 16,
            outbox_poll_ms: 1000,
            outbox_ready_max_age_secs: 300,
            metrics_refresh_ms: 5000,
            outbox_confirm_timeout_ms: 10_000,
            outbox_park_after: 5,
            prune_interval_secs: 600,
            processed_retention_hours: 168,
            push_stream: Default::default(),
        }
    }

    /// The CA certificates of AMQP_CA_FILE (PEM), for [`crate::Broker::with_ca`].
    pub fn amqp_ca(&self) -> anyhow::Result<Option<String>> {
        let Some(file) = &self.amqp_ca_file else { return Ok(None) };
        let pem = std::fs::read_to_string(file).with_context(|| format!("AMQP_CA_FILE {}", file.display()))?;
        anyhow::ensure!(
            pem.contains("-----BEGIN CERTIFICATE-----"),
            "AMQP_CA_FILE {}: no PEM certificate",
            file.display()
        );
        Ok(Some(pem))
    }

    pub fn outbox_max_age(&self) -> Duration {
        Duration::from_secs(self.outbox_ready_max_age_secs)
    }

    pub fn metrics_refresh(&self) -> Duration {
        Duration::from_millis(self.metrics_refresh_ms.max(1))
    }

    pub fn prune_interval(&self) -> Duration {
        Duration::from_secs(self.prune_interval_secs.max(1))
    }

    pub fn processed_retention(&self) -> Duration {
        Duration::from_secs(self.processed_retention_hours.saturating_mul(3600))
    }

    pub fn retry_delays(&self) -> Vec<Duration> {
        self.retry_delays_ms.iter().map(|ms| Duration::from_millis(*ms)).collect()
    }
}
