//! The idempotent consumer loop, one per queue.
//!
//! For each delivery: read its `message_id` and `type`; in one transaction,
//! record the id in the inbox (a duplicate stops here) and run the handler for
//! that type; commit, then ack. A handler error is retried through delay
//! queues with growing TTLs; after the last delay, or at once for a message
//! that can never succeed (no id, unknown type, unparsable body), the message
//! goes to the queue's dead-letter queue with the reason in its headers. A
//! delivery is acked only after its effect committed or after it was safely
//! re-published to a retry or dead-letter queue, so nothing is lost and a
//! poison message never blocks the queue.
//!
//! A database that cannot be reached (or a pool that times out) is not a
//! failure of the message: the delivery is held, unacked, until the database
//! answers again, then handled again. Held deliveries fill the prefetch, so
//! the consumer takes no more meanwhile, and none goes back to the queue: a
//! return would count toward the queue's delivery limit, past which the
//! broker dead-letters the message. Only the message's own failures (its
//! handler's error, a panic, an invalid payload) count toward the retries
//! and the dead letter.

use crate::Broker;
use crate::broker::{close_channel, dead_letter_queue, declare_retry_queues, publish_confirmed, retry_queue, text};
use contracts::Message;
use contracts::topology::QueueSpec;
use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable};
use sqlx::{PgConnection, PgPool};
use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;

/// A message handed to a handler.
#[derive(Debug, Clone)]
pub struct Incoming<M> {
    pub message_id: Uuid,
    pub payload: M,
}

/// Why a handler did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum HandlerError {
    /// Might succeed later: retried through the delay queues, then dead-lettered.
    #[error("{0:#}")]
    Retry(anyhow::Error),
    /// Can never succeed: dead-lettered at once.
    #[error("{0}")]
    Reject(String),
    /// A dependency is away (the database cannot be reached): the delivery is
    /// held unacked until the database answers, then handled again.
    #[error("dependency unavailable: {0:#}")]
    Unavailable(anyhow::Error),
}

impl From<sqlx::Error> for HandlerError {
    fn from(e: sqlx::Error) -> Self {
        if crate::db::is_unavailable(&e) { HandlerError::Unavailable(e.into()) } else { HandlerError::Retry(e.into()) }
    }
}

pub type HandlerResult = Result<(), HandlerError>;

type Handler<S> =
    Box<dyn for<'a> Fn(S, &'a mut PgConnection, Uuid, &'a [u8]) -> BoxFuture<'a, HandlerResult> + Send + Sync>;

/// A queue, its handlers by message type, and the state they share.
pub struct Consumer<S> {
    queue: QueueSpec,
    db: PgPool,
    state: S,
    handlers: HashMap<&'static str, Handler<S>>,
    /// Deliveries held while the database is away.
    held: AtomicUsize,
    /// Taken by the one held delivery that polls the database.
    paused: tokio::sync::Mutex<()>,
    replay: Replay,
}

/// How the dead letters of transient causes are replayed: every `every`, at
/// most `max_replays` times each.
#[derive(Clone, Copy, Debug)]
pub struct Replay {
    pub every: Duration,
    pub max_replays: u32,
}

impl Default for Replay {
    fn default() -> Self {
        Replay { every: REPLAY_EVERY, max_replays: MAX_REPLAYS }
    }
}

/// How often a consumer looks for dead letters of transient causes to
/// replay, and how many times one is replayed before it is left for a person.
pub const REPLAY_EVERY: Duration = Duration::from_secs(300);
pub const MAX_REPLAYS: u32 = 3;

enum Outcome {
    Done,
    Duplicate,
    Retry(String),
    DeadLetter(String),
    /// Not the message's fault: held until the database answers.
    Unavailable(String),
}

const RETRY_COUNT_HEADER: &str = "x-retry-count";

/// The pause before a consumer's first reconnection, and the longest.
pub const RECONNECT_BASE: Duration = Duration::from_millis(500);
pub const RECONNECT_CAP: Duration = Duration::from_secs(30);
/// A session that consumed this long was not a refusal: the next
/// reconnection starts again from [`RECONNECT_BASE`].
const HEALTHY_SESSION: Duration = Duration::from_secs(10);

impl<S: Clone + Send + Sync + 'static> Consumer<S> {
    pub fn new(queue: QueueSpec, db: PgPool, state: S) -> Self {
        Consumer {
            queue,
            db,
            state,
            handlers: HashMap::new(),
            held: AtomicUsize::new(0),
            paused: Default::default(),
            replay: Replay::default(),
        }
    }

    /// Replays the dead letters of transient causes every `every`, at most
    /// `max_replays` times each (by default every 5 minutes, 3 times).
    pub fn replay_dead_letters(mut self, every: Duration, max_replays: u32) -> Self {
        self.replay = Replay { every, max_replays };
        self
    }

    /// Handles messages of type `M` with `handler`, inside the inbox transaction.
    pub fn on<M, F>(mut self, handler: F) -> Self
    where
        M: Message,
        F: for<'a> Fn(S, &'a mut PgConnection, Incoming<M>) -> BoxFuture<'a, HandlerResult> + Send + Sync + 'static,
    {
        let boxed: Handler<S> =
            Box::new(move |state, conn, message_id, body| match serde_json::from_slice::<M>(body) {
                Ok(payload) => handler(state, conn, Incoming { message_id, payload }),
                Err(e) => Box::pin(async move { Err(HandlerError::Reject(format!("invalid {} body: {e}", M::NAME))) }),
            });
        self.handlers.insert(M::NAME, boxed);
        self
    }

    /// Consumes until `shutdown`, reconnecting after broker failures.
    pub async fn run(
        self,
        broker: Broker,
        prefetch: u16,
        retry_delays: Vec<Duration>,
        shutdown: CancellationToken,
    ) -> anyhow::Result<()> {
        let this = Arc::new(self);
        let queue = this.queue.name;
        let replayer = tokio::spawn(replay_loop(broker.clone(), queue, this.replay, shutdown.clone()));
        // Sessions in a row that ended without consuming for long.
        let mut failures: u32 = 0;
        while !shutdown.is_cancelled() {
            let Some(channel) = broker.wait_for_channel(false, &shutdown).await else {
                break;
            };
            let mut republish = None;
            let mut consuming_since = None;
            let session = async {
                let confirms = republish.insert(broker.confirm_channel().await?).clone();
                declare_retry_queues(&confirms, &this.queue, &retry_delays).await?;
                channel.basic_qos(prefetch, BasicQosOptions::default()).await?;
                let deliveries = channel
                    .basic_consume(queue.into(), "".into(), BasicConsumeOptions::default(), FieldTable::default())
                    .await?;
                tracing::info!(queue, "consuming");
                consuming_since = Some(Instant::now());
                // At most `prefetch` deliveries are held at once: while the
                // database is away, every handler holds its delivery and the
                // broker sends no more (its prefetch limit), so the consumer
                // stops taking deliveries without returning any.
                deliveries
                    .take_until(shutdown.cancelled())
                    .for_each_concurrent(usize::from(prefetch.max(1)), |delivery| {
                        let this = this.clone();
                        let confirms = confirms.clone();
                        let (retry_delays, shutdown) = (&retry_delays, &shutdown);
                        async move {
                            match delivery {
                                Ok(d) => this.handle(d, &confirms, retry_delays, shutdown).await,
                                Err(e) => {
                                    tracing::warn!(queue, error = %e, "consumer stream error")
                                }
                            }
                        }
                    })
                    .await;
                anyhow::Ok(())
            };
            if let Err(e) = session.await {
                tracing::warn!(queue, error = %e, "consumer session failed");
            }
            // Closing the channel returns the deliveries it still holds to
            // the queue (each counts one delivery toward the queue's limit):
            // only on shutdown or when the broker connection failed.
            close_channel(&channel, "consumer stopped").await;
            if let Some(confirms) = republish {
                close_channel(&confirms, "consumer stopped").await;
            }
            if shutdown.is_cancelled() {
                break;
            }
            // A broker that refuses (a queue missing, access refused, a
            // channel closed at once) is asked again after a capped
            // backoff, not twice a second for ever; a session that
            // consumed for a while starts the backoff afresh.
            if consuming_since.is_some_and(|t: Instant| t.elapsed() >= HEALTHY_SESSION) {
                failures = 0;
            }
            let retry_in = crate::backoff::delay(failures, RECONNECT_BASE, RECONNECT_CAP);
            failures = failures.saturating_add(1);
            metrics::counter!("consumer_reconnects_total", "queue" => queue).increment(1);
            tracing::warn!(queue, failures, ?retry_in, "consumer disconnected; reconnecting");
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(retry_in) => {}
            }
        }
        let _ = replayer.await;
        Ok(())
    }

    /// Holds a delivery whose handler found the database away: waits until
    /// the database answers (one waiter polls it, the others queue behind
    /// it), the delivery unacked meanwhile. `false` on shutdown.
    async fn hold_until_available(&self, shutdown: &CancellationToken) -> bool {
        let queue = self.queue.name;
        if self.held.fetch_add(1, Ordering::SeqCst) == 0 {
            metrics::gauge!("consumer_paused", "queue" => queue).set(1.0);
            tracing::warn!(queue, "database unavailable; consumer paused, holding its deliveries until it answers");
        }
        let back = {
            let _one_poller = self.paused.lock().await;
            crate::db::wait_until_available(&self.db, shutdown).await
        };
        if self.held.fetch_sub(1, Ordering::SeqCst) == 1 {
            metrics::gauge!("consumer_paused", "queue" => queue).set(0.0);
            if back {
                tracing::info!(queue, "database available again; consumer resumed");
            }
        }
        back
    }

    async fn handle(
        &self,
        delivery: Delivery,
        republish: &lapin::Channel,
        delays: &[Duration],
        shutdown: &CancellationToken,
    ) {
        let props = &delivery.properties;
        let message_id = props.message_id().as_ref().map(|s| s.to_string()).unwrap_or_default();
        let kind = props.kind().as_ref().map(|s| s.to_string()).unwrap_or_default();
        let correlation_id = props.correlation_id().as_ref().map(|s| s.to_string()).unwrap_or_default();
        let span = tracing::info_span!(
            "message",
            queue = self.queue.name,
            message_id = %message_id,
            r#type = %kind,
            correlation_id = %correlation_id,
        );
        if let Some(AMQPValue::LongString(tp)) =
            props.headers().as_ref().and_then(|h| h.inner().get(crate::telemetry::TRACEPARENT))
        {
            crate::telemetry::set_parent(&span, &tp.to_string());
        }
        async {
            loop {
                match self.process(&message_id, &kind, &delivery.data).await {
                    Outcome::Unavailable(reason) => {
                        // Not the message's fault, and not returned to the
                        // queue (a return counts toward the queue's delivery
                        // limit): held until the database answers, then
                        // handled again.
                        metrics::counter!("messages_consumed_total", "queue" => self.queue.name,
                            "type" => kind.clone(), "outcome" => "held")
                        .increment(1);
                        tracing::warn!(%reason, "database unavailable; delivery held until it answers");
                        if !self.hold_until_available(shutdown).await {
                            // Shutdown: closing the channel returns it.
                            return;
                        }
                    }
                    outcome => return self.settle(&delivery, outcome, republish, delays).await,
                }
            }
        }
        .instrument(span)
        .await
    }

    async fn process(&self, message_id: &str, kind: &str, body: &[u8]) -> Outcome {
        let Ok(message_id) = Uuid::parse_str(message_id) else {
            return Outcome::DeadLetter("missing or invalid message_id".into());
        };
        let Some(handler) = self.handlers.get(kind) else {
            return Outcome::DeadLetter(format!("no handler for message type {kind:?}"));
        };
        let result = AssertUnwindSafe(async {
            let mut tx = self.db.begin().await?;
            let inserted = sqlx::query!(
                "INSERT INTO inbox (queue, message_id) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                self.queue.name,
                message_id,
            )
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if inserted == 0 {
                return Ok(false);
            }
            handler(self.state.clone(), &mut tx, message_id, body).await?;
            tx.commit().await?;
            Ok::<_, HandlerError>(true)
        })
        .catch_unwind()
        .await;
        match result {
            Ok(Ok(true)) => Outcome::Done,
            Ok(Ok(false)) => Outcome::Duplicate,
            Ok(Err(HandlerError::Reject(reason))) => Outcome::DeadLetter(reason),
            Ok(Err(HandlerError::Unavailable(e))) => Outcome::Unavailable(format!("{e:#}")),
            Ok(Err(HandlerError::Retry(e))) if crate::db::is_unavailable_anyhow(&e) => {
                Outcome::Unavailable(format!("{e:#}"))
            }
            Ok(Err(HandlerError::Retry(e))) => Outcome::Retry(format!("{e:#}")),
            Err(_) => Outcome::Retry("handler panicked".into()),
        }
    }

    async fn settle(&self, delivery: &Delivery, outcome: Outcome, republish: &lapin::Channel, delays: &[Duration]) {
        let queue = self.queue.name;
        let attempt = retry_count(delivery);
        let kind = delivery.properties.kind().as_ref().map(|k| k.to_string()).unwrap_or_default();
        let label = match &outcome {
            Outcome::Done => "handled",
            Outcome::Duplicate => "duplicate",
            Outcome::Retry(_) if (attempt as usize) < delays.len() => "retried",
            Outcome::Retry(_) | Outcome::DeadLetter(_) => "dead_lettered",
            Outcome::Unavailable(_) => "held",
        };
        metrics::counter!("messages_consumed_total", "queue" => queue, "type" => kind, "outcome" => label).increment(1);
        let forwarded = match outcome {
            Outcome::Done => {
                tracing::info!("handled");
                Ok(())
            }
            Outcome::Duplicate => {
                tracing::info!("duplicate delivery ignored");
                Ok(())
            }
            Outcome::Retry(reason) if (attempt as usize) < delays.len() => {
                let delay = delays[attempt as usize];
                tracing::warn!(attempt = attempt + 1, ?delay, %reason, "handler failed; retrying later");
                let target = retry_queue(queue, delay);
                forward(
                    republish,
                    delivery,
                    &target,
                    &[
                        (RETRY_COUNT_HEADER, AMQPValue::LongLongInt(i64::from(attempt + 1))),
                        ("x-last-error", text(&reason)),
                    ],
                )
                .await
            }
            Outcome::Retry(reason) => {
                let reason = format!("gave up after {} attempts: {reason}", attempt + 1);
                dead_letter(republish, delivery, queue, &reason, Cause::Transient).await
            }
            Outcome::DeadLetter(reason) => dead_letter(republish, delivery, queue, &reason, Cause::Poison).await,
            Outcome::Unavailable(_) => unreachable!("held by `handle`, never settled"),
        };
        let settled = match forwarded {
            Ok(()) => delivery.ack(BasicAckOptions::default()).await,
            Err(e) => {
                // Not safely stored elsewhere: give it back to the queue.
                tracing::error!(error = %e, "could not forward the message; requeueing");
                tokio::time::sleep(Duration::from_millis(200)).await;
                delivery.nack(BasicNackOptions { requeue: true, ..Default::default() }).await
            }
        };
        if let Err(e) = settled {
            tracing::warn!(error = %e, "could not settle the delivery; the broker will redeliver it");
        }
    }
}

fn retry_count(delivery: &Delivery) -> u32 {
    retry_count_in(&delivery.properties)
}

/// How many times a message was retried already: its `x-retry-count` header,
/// 0 when absent or not a count.
fn retry_count_in(properties: &lapin::BasicProperties) -> u32 {
    let headers = properties.headers().as_ref();
    match headers.and_then(|h| h.inner().get(RETRY_COUNT_HEADER)) {
        Some(AMQPValue::LongLongInt(n)) => u32::try_from(*n).unwrap_or(0),
        Some(AMQPValue::LongInt(n)) => u32::try_from(*n).unwrap_or(0),
        _ => 0,
    }
}

async fn dead_letter(
    channel: &lapin::Channel,
    delivery: &Delivery,
    queue: &str,
    reason: &str,
    cause: Cause,
) -> Result<(), crate::broker::PublishError> {
    tracing::error!(%reason, cause = cause.as_str(), "message dead-lettered");
    let headers = [
        ("x-dead-letter-reason", text(reason)),
        (CAUSE_HEADER, text(cause.as_str())),
        ("x-original-queue", text(queue)),
        ("x-original-exchange", text(delivery.exchange.as_str())),
        ("x-original-routing-key", text(delivery.routing_key.as_str())),
        ("x-dead-lettered-at", text(&chrono::Utc::now().to_rfc3339())),
    ];
    forward(channel, delivery, &dead_letter_queue(queue), &headers).await
}

/// Re-publishes `delivery` unchanged but for `extra` headers to `queue`
/// through the default exchange, and waits for the broker's confirm.
async fn forward(
    channel: &lapin::Channel,
    delivery: &Delivery,
    queue: &str,
    extra: &[(&str, AMQPValue)],
) -> Result<(), crate::broker::PublishError> {
    let mut headers = delivery.properties.headers().clone().unwrap_or_default();
    for (k, v) in extra {
        headers.insert((*k).into(), v.clone());
    }
    let props = delivery.properties.clone().with_headers(headers);
    publish_confirmed(channel, "", queue, &delivery.data, props).await
}

/// Header of a dead letter: `transient` (its handler kept failing through
/// the retry schedule: it may pass later) or `poison` (it can never pass).
const CAUSE_HEADER: &str = "x-dead-letter-cause";
/// Header counting a dead letter's automatic replays.
const REPLAYS_HEADER: &str = "x-replays";

/// Why a message is in a dead-letter queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cause {
    /// It may pass later: its handler failed through the whole retry
    /// schedule, or the broker gave up on it after its delivery limit.
    Transient,
    /// It can never pass: no id, unknown type, invalid body, refused.
    Poison,
}

impl Cause {
    pub fn as_str(self) -> &'static str {
        match self {
            Cause::Transient => "transient",
            Cause::Poison => "poison",
        }
    }

    /// The cause of a dead letter of `queue`, from its headers: ours (the
    /// consumer's), or the broker's `x-death` record of a delivery limit.
    fn of(headers: &FieldTable, queue: &str) -> Cause {
        let get = |key: &str| match headers.inner().get(key) {
            Some(AMQPValue::LongString(v)) => Some(v.to_string()),
            _ => None,
        };
        match (get(CAUSE_HEADER).as_deref(), get("x-dead-letter-reason")) {
            (Some("transient"), _) => Cause::Transient,
            (Some(_), _) => Cause::Poison,
            // Dead-lettered by a version that did not say why.
            (None, Some(reason)) if reason.starts_with("gave up after") => Cause::Transient,
            (None, Some(_)) => Cause::Poison,
            (None, None) if gave_up_by_broker(headers, queue) => Cause::Transient,
            (None, None) => Cause::Poison,
        }
    }
}

/// Whether the broker dead-lettered the message from `queue` after its
/// delivery limit (its `x-death` record says so).
fn gave_up_by_broker(headers: &FieldTable, queue: &str) -> bool {
    let Some(AMQPValue::FieldArray(deaths)) = headers.inner().get("x-death") else { return false };
    deaths.as_slice().iter().any(|death| {
        let AMQPValue::FieldTable(death) = death else { return false };
        let is = |key: &str, value: &str| {
            matches!(death.inner().get(key), Some(AMQPValue::LongString(v)) if v.to_string() == value)
        };
        is("queue", queue) && is("reason", "delivery_limit")
    })
}

/// A dead letter's headers without what its deaths and retries added (and
/// its replay count with `forget_replays`), for sending it to its queue again.
fn replay_headers(old: Option<&FieldTable>, forget_replays: bool) -> FieldTable {
    let mut headers = FieldTable::default();
    for (k, v) in old.map(|h| h.inner().iter()).into_iter().flatten() {
        let key = k.as_str();
        let added = key == RETRY_COUNT_HEADER
            || key == "x-last-error"
            || key == "x-death"
            || key == "x-delivery-count"
            || key.starts_with("x-dead-letter")
            || key.starts_with("x-first-death")
            || key.starts_with("x-original-")
            || (forget_replays && key == REPLAYS_HEADER);
        if !added {
            headers.insert(k.clone(), v.clone());
        }
    }
    headers
}

fn count_header(headers: &FieldTable, key: &str) -> u32 {
    match headers.inner().get(key) {
        Some(AMQPValue::LongLongInt(n)) => u32::try_from(*n).unwrap_or(0),
        Some(AMQPValue::LongInt(n)) => u32::try_from(*n).unwrap_or(0),
        _ => 0,
    }
}

/// What one look at a dead-letter queue did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Replayed {
    /// Sent back to their queue.
    pub replayed: u32,
    /// Left where they are: poison, or replayed `max_replays` times already.
    pub kept: u32,
    /// Of those kept, the poison ones.
    pub poison: u32,
}

/// How many messages `queue`'s dead-letter queue holds.
async fn dead_letter_depth(channel: &lapin::Channel, queue: &str) -> lapin::Result<u32> {
    let declared = channel
        .queue_declare(
            dead_letter_queue(queue).as_str().into(),
            lapin::options::QueueDeclareOptions { passive: true, ..Default::default() },
            FieldTable::default(),
        )
        .await?;
    Ok(declared.message_count())
}

/// Where [`walk_dead_letters`] puts a dead letter it took, with which properties.
enum Put {
    /// Back to its queue.
    Back(lapin::BasicProperties),
    /// At the dead-letter queue's tail.
    Keep(lapin::BasicProperties),
}

/// Takes, one at a time, each message that `queue`'s dead-letter queue holds
/// when it starts, publishes it (confirmed) where `put` says, then acks it;
/// returns how many it took. The one walk of the dead letters that
/// replaying, keeping and inspecting share.
async fn walk_dead_letters(
    broker: &Broker,
    queue: &str,
    what: &'static str,
    mut put: impl FnMut(&Delivery) -> Put,
) -> anyhow::Result<u32> {
    let channel = broker.confirm_channel().await?;
    let dead = dead_letter_queue(queue);
    let result = async {
        let present = dead_letter_depth(&channel, queue).await?;
        let mut taken = 0;
        while taken < present {
            let Some(message) =
                channel.basic_get(dead.as_str().into(), lapin::options::BasicGetOptions::default()).await?
            else {
                break;
            };
            let delivery = message.delivery;
            let (to, props) = match put(&delivery) {
                Put::Back(props) => (queue, props),
                Put::Keep(props) => (dead.as_str(), props),
            };
            publish_confirmed(&channel, "", to, &delivery.data, props).await?;
            delivery.ack(BasicAckOptions::default()).await?;
            taken += 1;
        }
        anyhow::Ok(taken)
    }
    .await;
    close_channel(&channel, what).await;
    result
}

/// Sends the dead letters of `queue` whose cause is transient back to
/// `queue`, each at most `max_replays` times (counted in `x-replays`), and
/// leaves the others where they are (taken and put back at the tail, with
/// their reason). Looks at most at the messages present when it starts.
pub async fn replay_transient_dead_letters(broker: &Broker, queue: &str, max_replays: u32) -> anyhow::Result<Replayed> {
    let mut done = Replayed::default();
    walk_dead_letters(broker, queue, "dead letters looked at", |delivery| {
        let headers = delivery.properties.headers().clone().unwrap_or_default();
        let cause = Cause::of(&headers, queue);
        let replays = count_header(&headers, REPLAYS_HEADER);
        if cause == Cause::Transient && replays < max_replays {
            let mut fresh = replay_headers(Some(&headers), false);
            fresh.insert(REPLAYS_HEADER.into(), AMQPValue::LongLongInt(i64::from(replays + 1)));
            done.replayed += 1;
            tracing::info!(queue, replays = replays + 1, "dead letter of a transient cause replayed");
            Put::Back(delivery.properties.clone().with_headers(fresh))
        } else {
            let mut kept = headers.clone();
            if !kept.inner().contains_key("x-dead-letter-reason") {
                kept.insert(
                    "x-dead-letter-reason".into(),
                    text("the broker gave up on it after its delivery limit (x-death)"),
                );
            }
            kept.insert(CAUSE_HEADER.into(), text(cause.as_str()));
            done.kept += 1;
            done.poison += u32::from(cause == Cause::Poison);
            Put::Keep(delivery.properties.clone().with_headers(kept))
        }
    })
    .await?;
    Ok(done)
}

/// A message in a dead-letter queue, as [`inspect_dead_letters`] saw it.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub message_id: String,
    pub kind: String,
    pub cause: Cause,
    pub reason: String,
    pub replays: u32,
}

/// What is in `queue`'s dead-letter queue: each message present when it
/// starts is taken and put back at the tail unchanged (not returned: a
/// return would count toward the queue's delivery limit).
pub async fn inspect_dead_letters(broker: &Broker, queue: &str) -> anyhow::Result<Vec<DeadLetter>> {
    let mut seen = vec![];
    walk_dead_letters(broker, queue, "dead letters inspected", |delivery| {
        let headers = delivery.properties.headers().clone().unwrap_or_default();
        let reason = match headers.inner().get("x-dead-letter-reason") {
            Some(AMQPValue::LongString(r)) => r.to_string(),
            _ if gave_up_by_broker(&headers, queue) => "the broker gave up on it after its delivery limit".into(),
            _ => "no reason recorded".into(),
        };
        let props = &delivery.properties;
        seen.push(DeadLetter {
            message_id: props.message_id().as_ref().map(|s| s.to_string()).unwrap_or_default(),
            kind: props.kind().as_ref().map(|s| s.to_string()).unwrap_or_default(),
            cause: Cause::of(&headers, queue),
            reason,
            replays: count_header(&headers, REPLAYS_HEADER),
        });
        Put::Keep(delivery.properties.clone())
    })
    .await?;
    Ok(seen)
}

/// Replays the dead letters of transient causes every `replay.every`
/// (`dead_letters_replayed_total{queue}`; `dead_letters_kept{queue,cause}`
/// counts what stays). A queue is looked at again only when it holds more
/// than was kept at the last look.
async fn replay_loop(broker: Broker, queue: &'static str, replay: Replay, shutdown: CancellationToken) {
    let mut kept = 0;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(replay.every) => {}
        }
        let depth = async {
            let channel = broker.channel().await?;
            let n = dead_letter_depth(&channel, queue).await;
            close_channel(&channel, "dead letters counted").await;
            n
        };
        let depth = tokio::select! {
            _ = shutdown.cancelled() => return,
            d = depth => d,
        };
        match depth {
            Ok(n) if n <= kept => {
                kept = n;
                continue;
            }
            Ok(_) => {}
            Err(e) => {
                tracing::debug!(queue, error = %e, "dead-letter queue not counted; trying again later");
                continue;
            }
        }
        let scan = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = replay_transient_dead_letters(&broker, queue, replay.max_replays) => r,
        };
        match scan {
            Ok(done) => {
                kept = done.kept;
                metrics::counter!("dead_letters_replayed_total", "queue" => queue).increment(u64::from(done.replayed));
                metrics::gauge!("dead_letters_kept", "queue" => queue, "cause" => "poison").set(f64::from(done.poison));
                metrics::gauge!("dead_letters_kept", "queue" => queue, "cause" => "transient")
                    .set(f64::from(done.kept - done.poison));
                if done.kept > 0 {
                    tracing::warn!(
                        queue,
                        kept = done.kept,
                        poison = done.poison,
                        "dead letters kept for a person (see order-system audit)"
                    );
                }
            }
            Err(e) => {
                tracing::warn!(queue, error = format!("{e:#}"), "could not replay dead letters; trying again later")
            }
        }
    }
}

/// Moves what is in `queue`'s dead-letter queue back to `queue`, with its
/// retry count, replay count and dead-letter headers removed, once the cause
/// is fixed. Moves at most the messages present when it starts; returns how many.
pub async fn replay_dead_letters(broker: &Broker, queue: &str) -> anyhow::Result<u32> {
    walk_dead_letters(broker, queue, "replayed", |delivery| {
        let headers = replay_headers(delivery.properties.headers().as_ref(), true);
        Put::Back(delivery.properties.clone().with_headers(headers))
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::FieldTable;

    fn with_count(value: Option<AMQPValue>) -> lapin::BasicProperties {
        let mut headers = FieldTable::default();
        if let Some(v) = value {
            headers.insert(RETRY_COUNT_HEADER.into(), v);
        }
        lapin::BasicProperties::default().with_headers(headers)
    }

    #[test]
    fn a_first_delivery_has_no_retries() {
        assert_eq!(retry_count_in(&lapin::BasicProperties::default()), 0);
        assert_eq!(retry_count_in(&with_count(None)), 0);
    }

    #[test]
    fn the_count_is_read_from_the_header_in_either_integer_width() {
        assert_eq!(retry_count_in(&with_count(Some(AMQPValue::LongLongInt(3)))), 3);
        assert_eq!(retry_count_in(&with_count(Some(AMQPValue::LongInt(2)))), 2);
    }

    #[test]
    fn a_count_that_is_not_one_counts_as_none() {
        assert_eq!(retry_count_in(&with_count(Some(AMQPValue::LongLongInt(-1)))), 0);
        assert_eq!(retry_count_in(&with_count(Some(AMQPValue::LongLongInt(i64::MAX)))), 0);
        assert_eq!(retry_count_in(&with_count(Some(text("3")))), 0);
    }
}
