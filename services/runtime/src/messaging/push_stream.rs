//! The push service's stream of order events: a durable RabbitMQ stream
//! (`x-queue-type=stream`) bound to the `ordering` exchange for the order
//! outcomes and to the `notification` exchange for the users' notifications. Its one declaration is here, and its name and retention are part
//! of every service's messaging configuration (`PUSH_STREAM`,
//! `PUSH_RETENTION`, `PUSH_STREAM_SEGMENT_BYTES`, one shared setting): every
//! service declares it on connecting, so that it keeps the events published
//! before any push replica ever ran, and the push service reads the very
//! stream the others declared (no orphan stream under another name).

use crate::messaging::channel::text;
use contracts::topology::{PUSH_BINDINGS, PUSH_STREAM, PUSH_STREAM_DEFAULT_MAX_AGE};
use lapin::Connection;
use lapin::options::{QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use std::time::Duration;

/// The stream's name and retention.
#[derive(clap::Args, Clone, Debug, PartialEq, Eq)]
pub struct PushStream {
    /// The RabbitMQ stream of order events (the same for every service).
    #[arg(id = "push_stream", long = "push-stream", env = "PUSH_STREAM", default_value = PUSH_STREAM)]
    pub name: String,
    /// How long events can be resumed (RabbitMQ `x-max-age`: 24h, 7D, 90m, ...).
    /// It applies when the stream is first declared; change an existing
    /// stream's with a RabbitMQ policy.
    #[arg(long = "push-retention", env = "PUSH_RETENTION", default_value = PUSH_STREAM_DEFAULT_MAX_AGE, value_parser = parse_max_age)]
    pub max_age: String,
    /// Largest segment file of the stream, in bytes (RabbitMQ's default when
    /// unset); retention drops whole segments.
    #[arg(long = "push-stream-segment-bytes", env = "PUSH_STREAM_SEGMENT_BYTES")]
    pub segment_bytes: Option<u64>,
}

impl Default for PushStream {
    fn default() -> Self {
        PushStream { name: PUSH_STREAM.into(), max_age: PUSH_STREAM_DEFAULT_MAX_AGE.into(), segment_bytes: None }
    }
}

impl PushStream {
    /// The retention as a duration.
    pub fn retention(&self) -> Result<Duration, String> {
        max_age(&self.max_age)
    }
}

/// Declares the stream and its bindings on `conn` (idempotent). A stream
/// declared earlier with other arguments is used as it is.
pub async fn declare(conn: &Connection, spec: &PushStream) -> lapin::Result<()> {
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), text("stream"));
    args.insert("x-max-age".into(), text(&spec.max_age));
    if let Some(bytes) = spec.segment_bytes {
        args.insert(
            "x-stream-max-segment-size-bytes".into(),
            AMQPValue::LongLongInt(bytes.min(i64::MAX as u64) as i64),
        );
    }
    let durable = QueueDeclareOptions { durable: true, ..Default::default() };
    let mut channel = conn.create_channel().await?;
    if let Err(e) = channel.queue_declare(spec.name.as_str().into(), durable, args).await {
        if !e.to_string().contains("PRECONDITION_FAILED") {
            return Err(e);
        }
        // The failed declaration closed the channel; the stream must exist.
        tracing::debug!(stream = %spec.name, error = %e, "stream exists with other arguments; using it as it is");
        channel = conn.create_channel().await?;
        let passive = QueueDeclareOptions { passive: true, ..Default::default() };
        channel.queue_declare(spec.name.as_str().into(), passive, FieldTable::default()).await?;
    }
    for (exchange, keys) in PUSH_BINDINGS {
        for key in *keys {
            channel
                .queue_bind(
                    spec.name.as_str().into(),
                    (*exchange).into(),
                    (*key).into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await?;
        }
    }
    crate::messaging::channel::close_channel(&channel, "push stream declared").await;
    Ok(())
}

/// A clap parser of `x-max-age` values.
pub fn parse_max_age(s: &str) -> Result<String, String> {
    max_age(s).map(|_| s.to_string())
}

/// The duration of an `x-max-age` value.
pub fn max_age(s: &str) -> Result<Duration, String> {
    let (n, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let secs = match unit {
        "Y" => 365 * 86_400,
        "M" => 30 * 86_400,
        "D" => 86_400,
        "h" => 3_600,
        "m" => 60,
        "s" => 1,
        _ => 0,
    };
    match n.parse::<u64>() {
        Ok(n) if n > 0 && secs > 0 => Ok(Duration::from_secs(n.saturating_mul(secs))),
        _ => Err("expected a number and a unit of Y, M, D, h, m or s (e.g. 24h)".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retention_takes_rabbitmqs_units() {
        assert_eq!(max_age("24h"), Ok(Duration::from_secs(86_400)));
        assert_eq!(max_age("7D"), Ok(Duration::from_secs(7 * 86_400)));
        assert_eq!(max_age("90m"), Ok(Duration::from_secs(5_400)));
        assert_eq!(max_age("1s"), Ok(Duration::from_secs(1)));
        for bad in ["", "24", "h", "0h", "24x", "-1h", "1.5h"] {
            assert!(max_age(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn every_service_reads_the_same_defaults() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            stream: PushStream,
        }
        let cli = Cli::try_parse_from(["x"]).unwrap();
        assert_eq!(cli.stream, PushStream::default());
        assert!(Cli::try_parse_from(["x", "--push-retention", "soon"]).is_err());
    }
}
