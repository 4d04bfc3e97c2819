//! The hub: order events read live from the event stream, fanned out to the
//! open connections of the user each event belongs to.
//!
//! The hub also knows its *position*: the offset of the last stream entry the
//! live reader delivered. Every entry after it is still to come through the
//! live reader, so a connection that subscribes at position `P` gets every
//! event after `P` live and must replay only up to `P` (see `sse`).
//!
//! The last events it read (a bounded number, none older than the retention)
//! stay in memory, so that a browser that reconnects to the same replica
//! (a network blip, a stream closed for falling behind) resumes without
//! reading the stream. A starting replica fills it with the history it reads
//! before its marker, so that the streams a restart cut resume from memory
//! too. That window is a cache: the stream is the history.
//!
//! It also keeps an index of where each user's events are in the stream
//! (their offsets only, as many as the message ids it remembers). A resume
//! from further back than the memory window then reads the stream only from
//! the user's first event after its id, and not at all when the user has
//! none: one resume reads at most what its own user could have missed.

use contracts::api::OrderStatus;
use contracts::messages::{Message, NotificationCreated, OrderCreated, OrderFailed};
use serde::Serialize;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{broadcast, watch};
use uuid::Uuid;

/// What a page needs to update an order without another call.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct OrderEventData {
    #[schema(format = Uuid)]
    pub order_id: Uuid,
    pub status: OrderStatus,
    pub price: contracts::Money,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub occurred_at: chrono::DateTime<chrono::Utc>,
}

/// What a page needs to show a new notification without another call.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct NotificationEventData {
    /// The notification's id, as `GET /notifications` lists it.
    #[schema(format = Uuid)]
    pub id: Uuid,
    /// The order it is about, if any.
    #[schema(format = Uuid)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub order_id: Option<Uuid>,
    pub message: String,
    pub created_at: chrono::DateTime<chrono::Utc>,
}

/// The `data:` of an event: an order's outcome (`OrderCreated`,
/// `OrderFailed`) or a notification (`NotificationCreated`).
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum EventData {
    Order(OrderEventData),
    Notification(NotificationEventData),
}

impl EventData {
    /// When it happened: the order settled, the notification was stored.
    pub fn occurred_at(&self) -> chrono::DateTime<chrono::Utc> {
        match self {
            EventData::Order(o) => o.occurred_at,
            EventData::Notification(n) => n.created_at,
        }
    }

    /// The order or notification it is about (for the logs).
    pub fn subject(&self) -> Uuid {
        match self {
            EventData::Order(o) => o.order_id,
            EventData::Notification(n) => n.id,
        }
    }
}

/// One event on a user's stream: `id:` is its stream offset (the same on
/// every replica), `event:` its type.
#[derive(Clone, Debug)]
pub struct PushEvent {
    pub offset: u64,
    /// The AMQP `message_id` it was published with: the same when the outbox
    /// publishes it again (at-least-once), under a new offset.
    pub message_id: Option<Uuid>,
    pub event: &'static str,
    pub user_id: Uuid,
    pub data: EventData,
}

/// An entry of the event stream: an order event, or anything else (a marker,
/// an unusable message) that only moves the position.
#[derive(Debug)]
pub enum Entry {
    Event(PushEvent),
    Other { offset: u64, message_id: Option<Uuid> },
}

impl Entry {
    pub fn offset(&self) -> u64 {
        match self {
            Entry::Event(e) => e.offset,
            Entry::Other { offset, .. } => *offset,
        }
    }

    pub fn message_id(&self) -> Option<Uuid> {
        match self {
            Entry::Event(e) => e.message_id,
            Entry::Other { message_id, .. } => *message_id,
        }
    }
}

/// Decodes a stream entry from its AMQP type, message id and body.
pub fn decode(offset: u64, kind: &str, message_id: Option<Uuid>, body: &[u8]) -> Result<Entry, String> {
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
            (OrderCreated::NAME, m.user_id, EventData::Order(data))
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
            (OrderFailed::NAME, m.user_id, EventData::Order(data))
        }
        NotificationCreated::NAME => {
            let m: NotificationCreated = serde_json::from_slice(body).map_err(bad)?;
            let data =
                NotificationEventData { id: m.id, order_id: m.order_id, message: m.message, created_at: m.created_at };
            (NotificationCreated::NAME, m.user_id, EventData::Notification(data))
        }
        _ => return Ok(Entry::Other { offset, message_id }),
    };
    Ok(Entry::Event(PushEvent { offset, message_id, event, user_id, data }))
}

/// The message ids of the last events read, each with the offset it was first
/// read at, bounded in number (the oldest forgotten first). An event whose id
/// is here under an earlier offset is a re-publication of one already
/// delivered: it is neither stored nor sent again, live or on replay.
struct Seen {
    first: HashMap<Uuid, u64>,
    order: VecDeque<Uuid>,
    capacity: usize,
}

impl Seen {
    fn new(capacity: usize) -> Self {
        Seen { first: HashMap::new(), order: VecDeque::new(), capacity }
    }

    /// Records `id` read at `offset`; the earlier offset it was first read
    /// at when this is a duplicate.
    fn record(&mut self, id: Uuid, offset: u64) -> Option<u64> {
        if self.capacity == 0 {
            return None;
        }
        match self.first.entry(id) {
            std::collections::hash_map::Entry::Occupied(e) => Some(*e.get()).filter(|&first| first < offset),
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(offset);
                self.order.push_back(id);
                if self.order.len() > self.capacity
                    && let Some(old) = self.order.pop_front()
                {
                    self.first.remove(&old);
                }
                None
            }
        }
    }

    fn duplicate(&self, id: Uuid, offset: u64) -> bool {
        self.first.get(&id).is_some_and(|&first| first < offset)
    }
}

/// The offsets of each user's events, from `from` on without a gap, the
/// oldest forgotten first past `capacity`.
struct UserIndex {
    offsets: HashMap<Uuid, VecDeque<u64>>,
    order: VecDeque<(u64, Uuid)>,
    capacity: usize,
    /// Every event at or after this offset (up to `last`) is indexed.
    from: Option<u64>,
    last: Option<u64>,
}

impl UserIndex {
    fn new(capacity: usize) -> Self {
        UserIndex { offsets: HashMap::new(), order: VecDeque::new(), capacity, from: None, last: None }
    }

    /// Takes the entry at `offset` (an event of `user`, or any other entry).
    /// A gap in the offsets (entries never seen) starts the index over.
    fn add(&mut self, offset: u64, user: Option<Uuid>) {
        if self.capacity == 0 {
            return;
        }
        if self.last.is_some_and(|last| offset <= last) {
            return; // read again
        }
        if self.last.is_none_or(|last| offset != last + 1) {
            self.offsets.clear();
            self.order.clear();
            self.from = Some(offset);
        }
        self.last = Some(offset);
        let Some(user) = user else { return };
        self.offsets.entry(user).or_default().push_back(offset);
        self.order.push_back((offset, user));
        if self.order.len() > self.capacity
            && let Some((old, owner)) = self.order.pop_front()
        {
            if let Some(offsets) = self.offsets.get_mut(&owner) {
                offsets.pop_front();
                if offsets.is_empty() {
                    self.offsets.remove(&owner);
                }
            }
            self.from = Some(old + 1);
        }
    }

    /// `Some(first)`: the offset of `user`'s first event after `after` up to
    /// `position`, or `Some(None)` when there is none; `None` when the index
    /// does not reach back to `after`.
    fn first_after(&self, user: Uuid, after: u64, position: u64) -> Option<Option<u64>> {
        if self.from.is_none_or(|from| from > after + 1) || self.last.is_none_or(|last| last < position) {
            return None;
        }
        let offsets = self.offsets.get(&user);
        Some(offsets.and_then(|o| o.iter().copied().find(|&offset| offset > after)).filter(|&o| o <= position))
    }
}

struct State {
    streams: HashMap<Uuid, broadcast::Sender<Arc<PushEvent>>>,
    position: Option<u64>,
    /// The last events read, oldest first, with when they were read.
    recent: VecDeque<(Instant, Arc<PushEvent>)>,
    /// Every event at or after this offset (up to the position) is in `recent`.
    recent_from: Option<u64>,
    /// The last entry of the history read before the position existed.
    history_last: Option<u64>,
    seen: Seen,
    index: UserIndex,
}

impl State {
    fn forget_older_than(&mut self, max_age: Duration) {
        while let Some((at, e)) = self.recent.front() {
            if at.elapsed() <= max_age {
                break;
            }
            self.recent_from = Some(e.offset + 1);
            self.recent.pop_front();
        }
    }
}

/// How many recent events a hub keeps in memory, and for how long.
#[derive(Clone, Copy, Debug)]
pub struct Recent {
    pub events: usize,
    pub max_age: Duration,
}

pub struct Hub {
    state: Mutex<State>,
    buffer: usize,
    recent: Recent,
    ready: watch::Sender<Option<u64>>,
    /// Resumes served from memory and from the stream.
    pub replays_from_memory: AtomicU64,
    pub replays_from_stream: AtomicU64,
}

/// The user already has as many streams open as allowed.
#[derive(Debug)]
pub struct TooManyStreams;

/// Where a resuming connection finds what it missed.
pub enum Missed {
    /// Nothing to replay (a fresh connection, or an id at or after the position).
    Nothing,
    /// The user's events after the id, from memory.
    InMemory(Vec<Arc<PushEvent>>),
    /// Beyond the memory window: replay from the stream after `after` (the
    /// id asked for, or just before the user's first event after it) up to
    /// the position.
    InStream { after: u64 },
}

impl Hub {
    /// `buffer`: events a connection may fall behind by before it is closed
    /// (the browser then resumes from its last id; nothing is skipped).
    /// `dedup`: message ids remembered to recognise a re-published event,
    /// and user events indexed by offset.
    pub fn new(buffer: usize, recent: Recent, dedup: usize) -> Self {
        Hub {
            state: Mutex::new(State {
                streams: HashMap::new(),
                position: None,
                recent: VecDeque::new(),
                recent_from: None,
                history_last: None,
                seen: Seen::new(dedup),
                index: UserIndex::new(dedup),
            }),
            buffer: buffer.max(1),
            recent,
            ready: watch::channel(None).0,
            replays_from_memory: AtomicU64::new(0),
            replays_from_stream: AtomicU64::new(0),
        }
    }

    /// Subscribes `user` to live events, with the position at that instant:
    /// every event after it arrives on the subscription. `None` until the
    /// live reader has delivered its first entry.
    pub fn subscribe(self: &Arc<Self>, user: Uuid) -> (Subscription, Option<u64>) {
        let (subscription, position, _) = self.subscribe_after(user, None, usize::MAX).expect("no cap");
        (subscription, position)
    }

    /// [`subscribe`](Self::subscribe), and where to find the user's events
    /// after `after` up to the position, taken in the same instant; refused
    /// when the user already has `max_streams` open here.
    pub fn subscribe_after(
        self: &Arc<Self>,
        user: Uuid,
        after: Option<u64>,
        max_streams: usize,
    ) -> Result<(Subscription, Option<u64>, Missed), TooManyStreams> {
        let mut state = self.state.lock().expect("hub lock");
        let position = state.position;
        if state.streams.get(&user).is_some_and(|s| s.receiver_count() >= max_streams) {
            return Err(TooManyStreams);
        }
        let rx = state.streams.entry(user).or_insert_with(|| broadcast::channel(self.buffer).0).subscribe();
        state.forget_older_than(self.recent.max_age);
        let missed = match (after, position) {
            (Some(n), Some(p)) if n < p => {
                if state.recent_from.is_some_and(|from| from <= n + 1) {
                    let events = state
                        .recent
                        .iter()
                        .filter(|(_, e)| e.user_id == user && e.offset > n && e.offset <= p)
                        .map(|(_, e)| e.clone())
                        .collect();
                    self.replays_from_memory.fetch_add(1, Ordering::Relaxed);
                    Missed::InMemory(events)
                } else {
                    match state.index.first_after(user, n, p) {
                        // Nothing of this user's since: nothing to read.
                        Some(None) => {
                            self.replays_from_memory.fetch_add(1, Ordering::Relaxed);
                            Missed::InMemory(Vec::new())
                        }
                        Some(Some(first)) => {
                            self.replays_from_stream.fetch_add(1, Ordering::Relaxed);
                            Missed::InStream { after: first - 1 }
                        }
                        None => {
                            self.replays_from_stream.fetch_add(1, Ordering::Relaxed);
                            Missed::InStream { after: n }
                        }
                    }
                }
            }
            _ => Missed::Nothing,
        };
        metrics::gauge!("sse_connections_open").increment(1.0);
        Ok((Subscription { rx: Some(rx), hub: self.clone(), user }, position, missed))
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

    /// Takes an entry read before the position existed (the history a
    /// starting replica reads up to its marker): it is not delivered, but
    /// its message id is remembered (so that a later re-publication of it is
    /// recognised), and the event kept with the recent ones (within their
    /// cap and age), so that the streams a restart cut resume from memory
    /// rather than each reading the stream.
    pub fn remember(&self, entry: &Entry) {
        let mut state = self.state.lock().expect("hub lock");
        if state.position.is_some() {
            return; // history only comes before the position
        }
        let offset = entry.offset();
        if state.history_last.is_some_and(|last| offset <= last) {
            return; // read again after a reconnect before the marker
        }
        let duplicate = match entry {
            Entry::Event(PushEvent { message_id: Some(id), offset, .. }) => state.seen.record(*id, *offset).is_some(),
            _ => false,
        };
        let user = match entry {
            Entry::Event(e) if !duplicate => Some(e.user_id),
            _ => None,
        };
        state.index.add(offset, user);
        if self.recent.events > 0 {
            if state.history_last.is_none_or(|last| offset != last + 1) {
                // The first entry read, or a gap (entries never seen): the
                // window starts over here.
                state.recent.clear();
                state.recent_from = Some(offset);
            }
            if let Entry::Event(event) = entry
                && !duplicate
            {
                self.keep_history(&mut state, event);
            }
        }
        state.history_last = Some(offset);
    }

    /// Keeps an event of the history with the recent ones. When it was read
    /// is unknown: its age is taken from when the order happened (earlier
    /// than its publication, so it is forgotten no later than a live one).
    fn keep_history(&self, state: &mut State, event: &PushEvent) {
        let age = (chrono::Utc::now() - event.data.occurred_at()).to_std().unwrap_or_default();
        let now = Instant::now();
        let read = match now.checked_sub(age) {
            Some(at) if age <= self.recent.max_age => at,
            _ => {
                // Older than the window: it and all before it are forgotten.
                state.recent.clear();
                state.recent_from = Some(event.offset + 1);
                return;
            }
        };
        // Kept in order of time, as `forget_older_than` expects.
        let read = state.recent.back().map_or(read, |(last, _)| read.max(*last));
        state.recent.push_back((read, Arc::new(event.clone())));
        if state.recent.len() > self.recent.events
            && let Some((_, old)) = state.recent.pop_front()
        {
            state.recent_from = Some(old.offset + 1);
        }
    }

    /// Whether `event` re-publishes one read at an earlier offset (for a
    /// replay from the stream, whose entries the live reader has all read).
    pub fn is_duplicate(&self, event: &PushEvent) -> bool {
        let Some(id) = event.message_id else { return false };
        self.state.lock().expect("hub lock").seen.duplicate(id, event.offset)
    }

    /// Takes an entry from the live reader: moves the position and hands an
    /// event to its user's connections, unless it re-publishes one already
    /// read (then it only moves the position).
    pub fn publish(&self, entry: Entry) {
        let offset = entry.offset();
        {
            let mut state = self.state.lock().expect("hub lock");
            if state.position.is_some_and(|p| offset <= p) {
                return; // re-read after a reconnect
            }
            if state.position.is_none() && state.history_last.is_some_and(|last| offset != last + 1) {
                // Entries between the history and the first position were
                // never read: the history kept is not the whole window.
                state.recent.clear();
                state.recent_from = None;
            }
            state.position = Some(offset);
            if self.recent.events > 0 && state.recent_from.is_none() {
                state.recent_from = Some(offset);
            }
            if let Entry::Event(event) = &entry
                && let Some(id) = event.message_id
                && let Some(first) = state.seen.record(id, offset)
            {
                tracing::info!(message_id = %id, subject = %event.data.subject(), offset, first,
                    "event published again; not sent twice");
                metrics::counter!("push_duplicate_events_total").increment(1);
                state.index.add(offset, None);
                drop(state);
                self.moved(offset);
                return;
            }
            let user = match &entry {
                Entry::Event(e) => Some(e.user_id),
                Entry::Other { .. } => None,
            };
            state.index.add(offset, user);
            if let Entry::Event(event) = entry {
                let event = Arc::new(event);
                if let Some(tx) = state.streams.get(&event.user_id) {
                    let _ = tx.send(event.clone());
                }
                if self.recent.events > 0 {
                    state.recent.push_back((Instant::now(), event));
                    if state.recent.len() > self.recent.events
                        && let Some((_, old)) = state.recent.pop_front()
                    {
                        state.recent_from = Some(old.offset + 1);
                    }
                }
            }
        }
        self.moved(offset);
    }

    fn moved(&self, offset: u64) {
        self.ready.send_if_modified(|p| {
            let first = p.is_none();
            *p = Some(offset);
            first
        });
    }

    /// Closes every connection (they resume from their ids elsewhere or here).
    pub fn close_all(&self) {
        let mut state = self.state.lock().expect("hub lock");
        state.streams.clear();
        state.recent.clear();
        state.recent_from = None;
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
        metrics::gauge!("sse_connections_open").decrement(1.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(offset: u64, user: Uuid) -> Entry {
        published(offset, user, Uuid::new_v4())
    }

    /// An event published with the message id `id`.
    fn published(offset: u64, user: Uuid, id: Uuid) -> Entry {
        Entry::Event(PushEvent {
            offset,
            message_id: Some(id),
            event: "OrderCreated",
            user_id: user,
            data: EventData::Order(OrderEventData {
                order_id: Uuid::new_v4(),
                status: OrderStatus::Succeeded,
                price: serde_json::from_str("1").unwrap(),
                reason: None,
                occurred_at: chrono::Utc::now(),
            }),
        })
    }

    fn offsets(missed: Missed) -> Option<Vec<u64>> {
        match missed {
            Missed::InMemory(events) => Some(events.iter().map(|e| e.offset).collect()),
            _ => None,
        }
    }

    #[test]
    fn resumes_from_memory_within_the_window_and_from_the_stream_beyond_it() {
        let hub = Arc::new(Hub::new(4, Recent { events: 3, max_age: Duration::from_secs(60) }, 100));
        let (alice, bob) = (Uuid::new_v4(), Uuid::new_v4());
        hub.publish(Entry::Other { offset: 10, message_id: None }); // the marker
        for (offset, user) in [(11, alice), (12, bob), (13, alice), (14, alice)] {
            hub.publish(event(offset, user));
        }
        // Three events kept: 12, 13, 14; offset 11 was forgotten.
        let (_s, position, missed) = hub.subscribe_after(alice, Some(11), 9).unwrap();
        assert_eq!(position, Some(14));
        assert_eq!(offsets(missed), Some(vec![13, 14]));
        let (_s, _, missed) = hub.subscribe_after(alice, Some(10), 9).unwrap();
        assert!(matches!(missed, Missed::InStream { after: 10 }), "11 is no longer in memory");
        let (_s, _, missed) = hub.subscribe_after(alice, Some(14), 9).unwrap();
        assert!(matches!(missed, Missed::Nothing));
        assert_eq!(hub.replays_from_memory.load(Ordering::Relaxed), 1);
        assert_eq!(hub.replays_from_stream.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn a_resume_reads_the_stream_only_from_its_users_first_missed_event() {
        let hub = Arc::new(Hub::new(4, Recent { events: 2, max_age: Duration::from_secs(60) }, 100));
        let (alice, bob, carol) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        hub.publish(Entry::Other { offset: 100, message_id: None }); // the marker
        // Bob is busy; alice ordered once, at 150; carol never.
        for offset in 101..=200 {
            hub.publish(event(offset, if offset == 150 { alice } else { bob }));
        }
        let (_s, _, missed) = hub.subscribe_after(alice, Some(100), 9).unwrap();
        assert!(matches!(missed, Missed::InStream { after: 149 }), "not from 101");
        let (_s, _, missed) = hub.subscribe_after(alice, Some(150), 9).unwrap();
        assert_eq!(offsets(missed), Some(vec![]), "nothing of hers since: nothing read");
        let (_s, _, missed) = hub.subscribe_after(carol, Some(100), 9).unwrap();
        assert_eq!(offsets(missed), Some(vec![]));
        // Before the index begins (this replica's start), the id is all it knows.
        let (_s, _, missed) = hub.subscribe_after(carol, Some(50), 9).unwrap();
        assert!(matches!(missed, Missed::InStream { after: 50 }));
    }

    #[test]
    fn the_index_is_bounded_and_starts_over_after_a_gap() {
        let mut index = UserIndex::new(2);
        let (alice, bob) = (Uuid::new_v4(), Uuid::new_v4());
        index.add(1, None);
        index.add(2, Some(alice));
        index.add(3, Some(bob));
        assert_eq!(index.first_after(alice, 0, 3), Some(Some(2)));
        index.add(4, Some(bob)); // forgets alice's 2
        assert_eq!(index.first_after(alice, 0, 4), None, "no longer known from 1");
        assert_eq!(index.first_after(alice, 2, 4), Some(None));
        assert_eq!(index.offsets.values().map(VecDeque::len).sum::<usize>(), 2);
        index.add(9, Some(alice)); // 5..8 never seen
        assert_eq!(index.first_after(alice, 4, 9), None, "the gap is not known");
        assert_eq!(index.first_after(alice, 8, 9), Some(Some(9)));
        assert_eq!(index.first_after(bob, 8, 10), None, "not read up to the position yet");
    }

    #[test]
    fn a_users_channel_is_freed_with_its_last_subscription() {
        let hub = Arc::new(Hub::new(4, Recent { events: 0, max_age: Duration::ZERO }, 100));
        let user = Uuid::new_v4();
        let (a, _) = hub.subscribe(user);
        let (b, _) = hub.subscribe(user);
        assert_eq!((hub.users(), hub.open_streams()), (1, 2));
        drop(a);
        assert_eq!((hub.users(), hub.open_streams()), (1, 1));
        drop(b);
        assert_eq!((hub.users(), hub.open_streams()), (0, 0));
    }

    #[test]
    fn a_user_opens_at_most_max_streams() {
        let hub = Arc::new(Hub::new(4, Recent { events: 0, max_age: Duration::ZERO }, 100));
        let (alice, bob) = (Uuid::new_v4(), Uuid::new_v4());
        let a = hub.subscribe_after(alice, None, 2).unwrap();
        let _b = hub.subscribe_after(alice, None, 2).unwrap();
        assert!(hub.subscribe_after(alice, None, 2).is_err());
        assert!(hub.subscribe_after(bob, None, 2).is_ok());
        drop(a);
        assert!(hub.subscribe_after(alice, None, 2).is_ok());
    }

    #[tokio::test]
    async fn a_subscriber_that_falls_behind_learns_it() {
        let hub = Arc::new(Hub::new(2, Recent { events: 0, max_age: Duration::ZERO }, 100));
        let user = Uuid::new_v4();
        let (mut sub, _) = hub.subscribe(user);
        for offset in 1..=3 {
            hub.publish(event(offset, user));
        }
        assert!(matches!(sub.recv().await, Err(broadcast::error::RecvError::Lagged(1))));
    }

    #[tokio::test]
    async fn an_event_published_again_is_neither_sent_nor_kept_twice() {
        let hub = Arc::new(Hub::new(8, Recent { events: 10, max_age: Duration::from_secs(60) }, 100));
        let (alice, id) = (Uuid::new_v4(), Uuid::new_v4());
        hub.publish(Entry::Other { offset: 1, message_id: None });
        let (mut live, _) = hub.subscribe(alice);
        hub.publish(published(2, alice, id));
        hub.publish(event(3, alice));
        hub.publish(published(4, alice, id)); // the outbox's second publish
        hub.publish(event(5, alice));
        let mut got = Vec::new();
        for _ in 0..3 {
            got.push(live.recv().await.unwrap().offset);
        }
        assert_eq!(got, [2, 3, 5]);
        assert!(live.rx.as_mut().unwrap().try_recv().is_err(), "nothing more");
        assert_eq!(hub.position(), Some(5), "the duplicate still moves the position");
        // A resume from memory does not see it either.
        let (_s, _, missed) = hub.subscribe_after(alice, Some(1), 9).unwrap();
        assert_eq!(offsets(missed), Some(vec![2, 3, 5]));
        // A replay from the stream asks the hub.
        let entry = |e: Entry| match e {
            Entry::Event(e) => e,
            Entry::Other { .. } => unreachable!(),
        };
        assert!(hub.is_duplicate(&entry(published(4, alice, id))));
        assert!(!hub.is_duplicate(&entry(published(2, alice, id))), "the first is not");
    }

    #[test]
    fn history_read_before_the_marker_is_remembered_but_not_delivered() {
        let hub = Arc::new(Hub::new(8, Recent { events: 10, max_age: Duration::from_secs(60) }, 100));
        let (alice, id) = (Uuid::new_v4(), Uuid::new_v4());
        hub.remember(&published(7, alice, id));
        assert_eq!(hub.position(), None);
        hub.publish(Entry::Other { offset: 9, message_id: None }); // the marker
        let (_s, _, _) = hub.subscribe_after(alice, None, 9).unwrap();
        hub.publish(published(10, alice, id));
        let (_s, _, missed) = hub.subscribe_after(alice, Some(9), 9).unwrap();
        assert_eq!(offsets(missed), Some(vec![]), "offset 10 re-publishes offset 7");
    }

    #[test]
    fn a_restarted_replica_resumes_from_the_history_it_read_at_start() {
        let hub = Arc::new(Hub::new(8, Recent { events: 10, max_age: Duration::from_secs(60) }, 100));
        let (alice, bob) = (Uuid::new_v4(), Uuid::new_v4());
        hub.remember(&Entry::Other { offset: 5, message_id: None });
        hub.remember(&event(6, alice));
        hub.remember(&event(7, bob));
        // A reconnect before the marker reads some of it again.
        hub.remember(&event(6, alice));
        hub.remember(&event(7, bob));
        hub.remember(&event(8, alice));
        hub.publish(Entry::Other { offset: 9, message_id: None }); // the marker
        hub.publish(event(10, alice));
        let (_s, position, missed) = hub.subscribe_after(alice, Some(5), 9).unwrap();
        assert_eq!(position, Some(10));
        assert_eq!(offsets(missed), Some(vec![6, 8, 10]), "each once, and only hers");
        let (_s, _, missed) = hub.subscribe_after(bob, Some(4), 9).unwrap();
        assert_eq!(offsets(missed), Some(vec![7]), "every entry after 4 was read");
        let (_s, _, missed) = hub.subscribe_after(bob, Some(3), 9).unwrap();
        assert!(matches!(missed, Missed::InStream { after: 3 }), "offset 4 was never read");
        assert_eq!(hub.replays_from_memory.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn the_history_kept_is_bounded_and_never_has_a_hole() {
        // Past the cap, the oldest go (and are read from the stream).
        let hub = Arc::new(Hub::new(8, Recent { events: 2, max_age: Duration::from_secs(60) }, 100));
        let alice = Uuid::new_v4();
        for offset in 5..=8 {
            hub.remember(&event(offset, alice));
        }
        hub.publish(Entry::Other { offset: 9, message_id: None });
        let (_s, _, missed) = hub.subscribe_after(alice, Some(6), 9).unwrap();
        assert_eq!(offsets(missed), Some(vec![7, 8]));
        let (_s, _, missed) = hub.subscribe_after(alice, Some(5), 9).unwrap();
        assert!(matches!(missed, Missed::InStream { after: 5 }), "6 was forgotten");

        // Entries between the history and the marker not read: not from memory.
        let hub = Arc::new(Hub::new(8, Recent { events: 10, max_age: Duration::from_secs(60) }, 100));
        hub.remember(&event(5, alice));
        hub.remember(&event(6, alice));
        hub.publish(Entry::Other { offset: 9, message_id: None });
        let (_s, _, missed) = hub.subscribe_after(alice, Some(5), 9).unwrap();
        assert!(matches!(missed, Missed::InStream { .. }), "7 and 8 were never read");

        // An event older than the window is not kept, nor any before it.
        let hub = Arc::new(Hub::new(8, Recent { events: 10, max_age: Duration::from_secs(60) }, 100));
        let mut old = event(6, alice);
        if let Entry::Event(PushEvent { data: EventData::Order(o), .. }) = &mut old {
            o.occurred_at = chrono::Utc::now() - chrono::Duration::minutes(5);
        }
        hub.remember(&event(5, alice));
        hub.remember(&old);
        hub.remember(&event(7, alice));
        hub.publish(Entry::Other { offset: 8, message_id: None });
        let (_s, _, missed) = hub.subscribe_after(alice, Some(6), 9).unwrap();
        assert_eq!(offsets(missed), Some(vec![7]));
        let (_s, _, missed) = hub.subscribe_after(alice, Some(5), 9).unwrap();
        assert!(matches!(missed, Missed::InStream { after: 5 }), "6 is too old to keep");
    }

    #[test]
    fn the_ids_remembered_are_bounded() {
        let mut seen = Seen::new(2);
        let (a, b, c) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        assert_eq!(seen.record(a, 1), None);
        assert_eq!(seen.record(b, 2), None);
        assert_eq!(seen.record(a, 3), Some(1));
        assert_eq!(seen.record(c, 4), None); // forgets a
        assert!(!seen.duplicate(a, 5));
        assert!(seen.duplicate(b, 5));
        assert_eq!(seen.record(b, 2), None, "the same offset read again is not a duplicate");
    }
}
