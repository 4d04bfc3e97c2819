//! The hub: order events read live from the event stream, fanned out to the
//! open connections of the user each event belongs to.
//!
//! The hub also knows its *position*: the offset of the last stream entry the
//! live reader delivered. Every entry after it is still to come through the
//! live reader, so a connection that subscribes at position `P` gets every
//! event after `P` live and must replay only up to `P` (see `sse`).

use contracts::api::OrderStatus;
use contracts::messages::{Message, OrderCreated, OrderFailed};
use serde::Serialize;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::sync::{broadcast, watch};
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

/// One event on a user's stream: `id:` is its stream offset (the same on
/// every replica), `event:` its type.
#[derive(Clone, Debug)]
pub struct PushEvent {
    pub offset: u64,
    pub event: &'static str,
    pub user_id: Uuid,
    pub data: OrderEventData,
}

/// An entry of the event stream: an order event, or anything else (a marker,
/// an unusable message) that only moves the position.
#[derive(Debug)]
pub enum Entry {
    Event(PushEvent),
    Other { offset: u64 },
}

impl Entry {
    pub fn offset(&self) -> u64 {
        match self {
            Entry::Event(e) => e.offset,
            Entry::Other { offset } => *offset,
        }
    }
}

/// Decodes a stream entry from its AMQP type and body.
pub fn decode(offset: u64, kind: &str, body: &[u8]) -> Result<Entry, String> {
    let bad = |e: serde_json::Error| format!("invalid {kind} body: {e}");
    let (event, user_id, data) = match kind {
        OrderCreated::NAME => {
            let m: OrderCreated = serde_json::from_slice(body).map_err(bad)?;
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
            let m: OrderFailed = serde_json::from_slice(body).map_err(bad)?;
            let data = OrderEventData {
                order_id: m.order_id,
                status: OrderStatus::Failed,
                price: m.price,
                reason: Some(m.reason),
                occurred_at: m.occurred_at,
            };
            (OrderFailed::NAME, m.user_id, data)
        }
        _ => return Ok(Entry::Other { offset }),
    };
    Ok(Entry::Event(PushEvent { offset, event, user_id, data }))
}

struct State {
    streams: HashMap<Uuid, broadcast::Sender<Arc<PushEvent>>>,
    position: Option<u64>,
}

pub struct Hub {
    state: Mutex<State>,
    buffer: usize,
    ready: watch::Sender<Option<u64>>,
}

impl Hub {
    /// `buffer`: events a connection may fall behind by before it is closed
    /// (the browser then resumes from its last id; nothing is skipped).
    pub fn new(buffer: usize) -> Self {
        Hub {
            state: Mutex::new(State { streams: HashMap::new(), position: None }),
            buffer: buffer.max(1),
            ready: watch::channel(None).0,
        }
    }

    /// Subscribes `user` to live events, with the position at that instant:
    /// every event after it arrives on the subscription. `None` until the
    /// live reader has delivered its first entry.
    pub fn subscribe(self: &Arc<Self>, user: Uuid) -> (Subscription, Option<u64>) {
        let mut state = self.state.lock().expect("hub lock");
        let position = state.position;
        let rx = state.streams.entry(user).or_insert_with(|| broadcast::channel(self.buffer).0).subscribe();
        (Subscription { rx: Some(rx), hub: self.clone(), user }, position)
    }

    /// Waits until the hub has a position (the live reader is attached).
    pub async fn ready(&self) -> u64 {
        let mut rx = self.ready.subscribe();
        let position = rx.wait_for(Option::is_some).await.expect("hub alive");
        position.expect("checked")
    }

    pub fn position(&self) -> Option<u64> {
        self.state.lock().expect("hub lock").position
    }

    pub fn open_streams(&self) -> usize {
        self.state.lock().expect("hub lock").streams.values().map(|s| s.receiver_count()).sum()
    }

    pub fn users(&self) -> usize {
        self.state.lock().expect("hub lock").streams.len()
    }

    /// Takes an entry from the live reader: moves the position and hands an
    /// event to its user's connections.
    pub fn publish(&self, entry: Entry) {
        let offset = entry.offset();
        {
            let mut state = self.state.lock().expect("hub lock");
            if state.position.is_some_and(|p| offset <= p) {
                return; // re-read after a reconnect
            }
            state.position = Some(offset);
            if let Entry::Event(event) = entry
                && let Some(tx) = state.streams.get(&event.user_id)
            {
                let _ = tx.send(Arc::new(event));
            }
        }
        self.ready.send_if_modified(|p| {
            let first = p.is_none();
            *p = Some(offset);
            first
        });
    }

    /// Closes every connection (they resume from their ids elsewhere or here).
    pub fn close_all(&self) {
        self.state.lock().expect("hub lock").streams.clear();
    }

    fn release(&self, user: Uuid) {
        let mut state = self.state.lock().expect("hub lock");
        if state.streams.get(&user).is_some_and(|s| s.receiver_count() == 0) {
            state.streams.remove(&user);
        }
    }
}

/// A connection's receiver; dropping it frees the user's channel at once when
/// it was the last one.
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
