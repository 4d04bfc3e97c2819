//! The hub: order events from this replica's queue, fanned out to the open
//! streams of the user each event belongs to.

use contracts::api::OrderStatus;
use contracts::messages::{Message, OrderCreated, OrderFailed, exchange};
use contracts::topology::PUSH_ORDER_EVENTS;
use futures::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use runtime::Broker;
use serde::Serialize;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// What a page needs to update an order without another call.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OrderEventData {
    pub order_id: Uuid,
    pub status: OrderStatus,
    pub price: contracts::Money,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub occurred_at: chrono::DateTime<chrono::Utc>,
}

/// One event on a user's stream: `id:` is the message id, `event:` its type.
#[derive(Clone, Debug)]
pub struct PushEvent {
    pub id: String,
    pub event: &'static str,
    pub user_id: Uuid,
    pub data: OrderEventData,
}

/// Events a slow stream may fall behind by before it is closed (the browser
/// then reconnects); nothing is skipped silently.
const STREAM_BUFFER: usize = 256;
/// Message ids remembered to drop a redelivered event.
const RECENT_IDS: usize = 10_000;

#[derive(Default)]
pub struct Hub {
    streams: Mutex<HashMap<Uuid, broadcast::Sender<Arc<PushEvent>>>>,
    recent: Mutex<(HashSet<String>, VecDeque<String>)>,
}

impl Hub {
    pub fn subscribe(self: &Arc<Self>, user: Uuid) -> Subscription {
        let mut streams = self.streams.lock().expect("hub lock");
        let rx = streams.entry(user).or_insert_with(|| broadcast::channel(STREAM_BUFFER).0).subscribe();
        Subscription { rx: Some(rx), hub: self.clone(), user }
    }

    pub fn open_streams(&self) -> usize {
        self.streams.lock().expect("hub lock").values().map(|s| s.receiver_count()).sum()
    }

    /// Hands `event` to its user's streams; `false` if it was seen before.
    pub fn publish(&self, event: PushEvent) -> bool {
        {
            let mut recent = self.recent.lock().expect("hub lock");
            if !recent.0.insert(event.id.clone()) {
                return false;
            }
            recent.1.push_back(event.id.clone());
            if recent.1.len() > RECENT_IDS {
                let old = recent.1.pop_front().expect("non-empty");
                recent.0.remove(&old);
            }
        }
        let streams = self.streams.lock().expect("hub lock");
        if let Some(tx) = streams.get(&event.user_id) {
            let _ = tx.send(Arc::new(event));
        }
        true
    }

    fn release(&self, user: Uuid) {
        let mut streams = self.streams.lock().expect("hub lock");
        if streams.get(&user).is_some_and(|s| s.receiver_count() == 0) {
            streams.remove(&user);
        }
    }
}

/// A stream's receiver; dropping it frees the user's channel at once when it
/// was the last one.
pub struct Subscription {
    rx: Option<broadcast::Receiver<Arc<PushEvent>>>,
    hub: Arc<Hub>,
    user: Uuid,
}

impl Subscription {
    pub async fn recv(&mut self) -> Result<Arc<PushEvent>, broadcast::error::RecvError> {
        self.rx.as_mut().expect("receiver present until drop").recv().await
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.rx.take();
        self.hub.release(self.user);
    }
}

fn decode(delivery: &Delivery) -> Result<PushEvent, String> {
    let props = &delivery.properties;
    let id = props.message_id().as_ref().map(|s| s.to_string()).ok_or("missing message_id")?;
    let kind = props.kind().as_ref().map(|s| s.to_string()).unwrap_or_default();
    let bad = |e: serde_json::Error| format!("invalid {kind} body: {e}");
    let (event, user_id, data) = match kind.as_str() {
        OrderCreated::NAME => {
            let m: OrderCreated = serde_json::from_slice(&delivery.data).map_err(bad)?;
            let data = OrderEventData {
                order_id: m.order_id,
                status: OrderStatus::Succeeded,
                price: m.price,
                reason: None,
                occurred_at: m.occurred_at,
            };
            (OrderCreated::NAME, m.user_id, data)
        }
        OrderFailed::NAME => {
            let m: OrderFailed = serde_json::from_slice(&delivery.data).map_err(bad)?;
            let data = OrderEventData {
                order_id: m.order_id,
                status: OrderStatus::Failed,
                price: m.price,
                reason: Some(m.reason),
                occurred_at: m.occurred_at,
            };
            (OrderFailed::NAME, m.user_id, data)
        }
        other => return Err(format!("unexpected message type {other:?}")),
    };
    Ok(PushEvent { id, event, user_id, data })
}

/// Consumes this replica's own queue (exclusive, deleted with the
/// connection) until `shutdown`, reconnecting after failures.
pub async fn consume(hub: Arc<Hub>, broker: Broker, prefetch: u16, shutdown: CancellationToken) -> anyhow::Result<()> {
    let queue = format!("push.{}", Uuid::new_v4().simple());
    while !shutdown.is_cancelled() {
        let Some(channel) = broker.wait_for_channel(false, &shutdown).await else {
            break;
        };
        let session = async {
            channel
                .queue_declare(
                    queue.as_str().into(),
                    QueueDeclareOptions { exclusive: true, auto_delete: true, ..Default::default() },
                    FieldTable::default(),
                )
                .await?;
            for key in PUSH_ORDER_EVENTS {
                channel
                    .queue_bind(
                        queue.as_str().into(),
                        exchange::ORDERING.into(),
                        (*key).into(),
                        QueueBindOptions::default(),
                        FieldTable::default(),
                    )
                    .await?;
            }
            channel.basic_qos(prefetch, BasicQosOptions::default()).await?;
            let deliveries = channel
                .basic_consume(queue.as_str().into(), "".into(), BasicConsumeOptions::default(), FieldTable::default())
                .await?
                .take_until(shutdown.cancelled());
            let mut deliveries = std::pin::pin!(deliveries);
            tracing::info!(queue = %queue, "consuming order events");
            while let Some(delivery) = deliveries.next().await {
                let delivery = delivery?;
                match decode(&delivery) {
                    Ok(event) => {
                        let span = tracing::info_span!("push", message_id = %event.id, order_id = %event.data.order_id, user_id = %event.user_id);
                        let _enter = span.enter();
                        if hub.publish(event) {
                            tracing::debug!("event pushed");
                        }
                    }
                    // Nothing durable depends on this replica's copy: the
                    // message is logged and dropped from this queue only.
                    Err(reason) => tracing::error!(%reason, "unusable order event skipped"),
                }
                delivery.ack(BasicAckOptions::default()).await?;
            }
            anyhow::Ok(())
        };
        if let Err(e) = session.await {
            tracing::warn!(error = %e, "order event consumer failed; reconnecting");
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    Ok(())
}
