//! The order event stream: a durable RabbitMQ stream (`x-queue-type=stream`,
//! `x-max-age` = the retention window) bound to the `ordering` exchange for
//! `OrderCreated` and `OrderFailed`. RabbitMQ numbers its entries with
//! offsets that are the same for every reader, so the offset is the SSE event
//! id on every replica, and any replica can replay from any id.
//!
//! Each replica reads the stream live (from `next` at start, from its last
//! offset + 1 after a broker reconnect) into its hub; a resuming connection
//! opens a short-lived reader from the id it last saw.

use futures::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel};
use runtime::Broker;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::hub::{Entry, Hub, decode};

/// The stream's name and retention: the messaging configuration every
/// service shares (one declaration, in the runtime).
pub use runtime::messaging::push_stream::PushStream as StreamSpec;

/// The type of the marker a replica appends to learn its position at start.
const MARKER: &str = "PushMarker";

/// Declares the stream and its bindings (idempotent; the declaration every
/// service makes on connecting, made again before reading).
pub async fn declare(broker: &Broker) -> anyhow::Result<()> {
    broker.declare_push_stream().await?;
    Ok(())
}

/// Where a reader starts.
#[derive(Clone, Copy, Debug)]
pub enum Start {
    Offset(u64),
    /// The first chunk written at or after this instant (seconds since the epoch).
    Timestamp(u64),
}

/// Opens a reader of the stream on a new channel.
pub async fn open(
    broker: &Broker,
    spec: &StreamSpec,
    from: Start,
    prefetch: u16,
) -> lapin::Result<(Channel, lapin::Consumer)> {
    let channel = broker.channel().await?;
    channel.basic_qos(prefetch, BasicQosOptions::default()).await?;
    let mut args = FieldTable::default();
    let offset = match from {
        Start::Timestamp(t) => AMQPValue::Timestamp(t),
        Start::Offset(o) => AMQPValue::LongLongInt(i64::try_from(o).unwrap_or(i64::MAX)),
    };
    args.insert("x-stream-offset".into(), offset);
    let consumer =
        channel.basic_consume(spec.name.as_str().into(), "".into(), BasicConsumeOptions::default(), args).await?;
    Ok((channel, consumer))
}

/// The stream offset of a delivery (its `x-stream-offset` header).
pub fn offset_of(properties: &BasicProperties) -> Option<u64> {
    let headers = properties.headers().as_ref()?;
    let value = headers.inner().iter().find(|(k, _)| k.as_str() == "x-stream-offset")?.1;
    let n: i64 = match value {
        AMQPValue::LongLongInt(n) => *n,
        AMQPValue::LongInt(n) => (*n).into(),
        AMQPValue::LongUInt(n) => (*n).into(),
        AMQPValue::ShortInt(n) => (*n).into(),
        AMQPValue::ShortUInt(n) => (*n).into(),
        AMQPValue::Timestamp(n) => i64::try_from(*n).ok()?,
        _ => return None,
    };
    u64::try_from(n).ok()
}

/// Decodes a delivery into a stream entry, acknowledging it (a stream reader
/// must ack to get more credit; nothing is removed from the stream).
pub async fn entry_of(delivery: lapin::message::Delivery) -> anyhow::Result<Entry> {
    let entry = entry_in(&delivery)?;
    ack(delivery, false).await?;
    Ok(entry)
}

/// Decodes a delivery into a stream entry, without acknowledging it.
fn entry_in(delivery: &lapin::message::Delivery) -> anyhow::Result<Entry> {
    let offset = offset_of(&delivery.properties).ok_or_else(|| anyhow::anyhow!("delivery without x-stream-offset"))?;
    let kind = delivery.properties.kind().as_ref().map(|s| s.to_string()).unwrap_or_default();
    let message_id = delivery.properties.message_id().as_ref().and_then(|id| id.as_str().parse::<Uuid>().ok());
    Ok(decode(offset, &kind, message_id, &delivery.data).unwrap_or_else(|reason| {
        tracing::error!(offset, %reason, "unusable order event skipped");
        Entry::Other { offset, message_id }
    }))
}

/// Acknowledges a delivery (with `multiple`, every earlier one on its
/// channel too). Bounded, like every wait on the broker here: a reader must
/// never hang on a connection that went away (it reconnects instead).
async fn ack(delivery: lapin::message::Delivery, multiple: bool) -> anyhow::Result<()> {
    tokio::time::timeout(ACK_TIMEOUT, delivery.ack(BasicAckOptions { multiple }))
        .await
        .map_err(|_| anyhow::anyhow!("no ack sent within {ACK_TIMEOUT:?}"))??;
    Ok(())
}

/// How long acknowledging a delivery may take before the reader gives up
/// the connection.
const ACK_TIMEOUT: Duration = Duration::from_secs(5);
/// How often an idle live reader checks that its channel is alive.
const CHANNEL_CHECK: Duration = Duration::from_secs(1);

/// Appends a marker to the stream (so that a replica with no traffic learns
/// its position at once).
async fn append_marker(broker: &Broker, spec: &StreamSpec, id: Uuid) -> anyhow::Result<()> {
    let channel = broker.confirm_channel().await?;
    let props = BasicProperties::default()
        .with_message_id(id.to_string().into())
        .with_type(MARKER.into())
        .with_content_type("application/json".into());
    runtime::messaging::broker::publish_confirmed(&channel, "", &spec.name, b"{}", props).await?;
    runtime::messaging::channel::close_channel(&channel, "marker appended").await;
    Ok(())
}

/// Reads the stream live into `hub` until `shutdown`, reconnecting after
/// failures from the offset after the last one delivered.
///
/// At start the reader begins `lookback` before now and appends a marker:
/// what comes before the marker is history, which the hub does not deliver
/// but remembers (message ids, so that an event re-published later is not
/// delivered twice; the events, for resumes from memory); the marker is the
/// hub's first position.
pub async fn read_live(
    hub: Arc<Hub>,
    broker: Broker,
    spec: StreamSpec,
    prefetch: u16,
    lookback: Duration,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let mut pause = Duration::from_millis(100);
    while !shutdown.is_cancelled() {
        let session = async {
            declare(&broker).await?;
            let from = match hub.position() {
                Some(p) => Start::Offset(p + 1),
                None => {
                    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
                    Start::Timestamp(now.saturating_sub(lookback).as_secs())
                }
            };
            let (channel, consumer) = open(&broker, &spec, from, prefetch).await?;
            tracing::info!(stream = %spec.name, ?from, "reading order events live");
            let marker = Uuid::new_v4();
            if hub.position().is_none() {
                append_marker(&broker, &spec, marker).await?;
            }
            let mut deliveries = std::pin::pin!(consumer.take_until(shutdown.cancelled()));
            let mut first = true;
            let (mut unacked, ack_every) = (0u16, (prefetch / 4).max(1));
            // Whether the channel is still alive is checked while idle too: a
            // consumer on a dead connection may never yield again.
            let mut watchdog = tokio::time::interval(CHANNEL_CHECK);
            loop {
                let next = tokio::select! {
                    next = deliveries.next() => next,
                    _ = watchdog.tick() => {
                        anyhow::ensure!(channel.status().connected(), "the stream's channel is no longer connected");
                        continue;
                    }
                };
                let Some(delivery) = next else { break };
                let delivery = delivery?;
                let entry = entry_in(&delivery)?;
                // Acked in batches (the credit, `prefetch`, is larger than a
                // batch, so the broker never waits on them): each ack is a
                // round trip through the connection's I/O loop, and one per
                // entry made a starting replica read its history slowly on
                // a busy runtime, keeping it unready.
                unacked += 1;
                if unacked >= ack_every {
                    ack(delivery, true).await?;
                    unacked = 0;
                }
                if hub.position().is_none() && entry.message_id() != Some(marker) {
                    hub.remember(&entry); // history before the marker
                    continue;
                }
                if let Start::Offset(expected) = from
                    && entry.offset() < expected
                {
                    continue; // the rest of the chunk that holds `expected`
                }
                if first
                    && let Start::Offset(expected) = from
                    && entry.offset() > expected
                {
                    // The broker was away longer than the retention: what
                    // the open connections missed is gone. Close them, so
                    // each resumes from its id and is told to refetch.
                    tracing::warn!(expected, got = entry.offset(), "stream entries expired while disconnected");
                    hub.close_all();
                }
                first = false;
                hub.publish(entry);
            }
            if !shutdown.is_cancelled() {
                tracing::warn!(stream = %spec.name, "the broker ended the stream's consumer; reconnecting");
            }
            runtime::messaging::channel::close_channel(&channel, "reader stopped").await;
            anyhow::Ok(())
        };
        match session.await {
            Ok(()) => pause = Duration::from_millis(100),
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?pause, "order event stream reader failed; reconnecting");
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(pause) => {}
                }
                pause = (pause * 2).min(Duration::from_secs(5));
            }
        }
    }
    Ok(())
}
