//! The messaging components without the services: the outbox written
//! while no relay runs, the consumer's retries, dead letters and their
//! replays, and the push stream declared by any first connection.

use contracts::messages::{Message, OrderCreated, exchange};
use contracts::topology::QueueSpec;
use lapin::BasicProperties;
use lapin::options::{BasicGetOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use runtime::messaging::consumer::HandlerError;
use runtime::messaging::outbox::{self, Relay};
use runtime::{Broker, Consumer};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;
use test_support::{Sandbox, eventually, eventually_counts};
use uuid::Uuid;

// An outbox as ordering declares its own (its database's migrations have the table).
runtime::publishes!(OUTBOX: OrderingLike = "ordering" => OrderCreated);

/// A database and a vhost for the runtime-level tests below.
struct Scratch {
    pool: sqlx::PgPool,
    broker: Broker,
    /// Declared last: removed after the pool and the broker are dropped.
    sandbox: Sandbox,
}

impl Scratch {
    async fn new() -> Scratch {
        let sandbox = Sandbox::new().await;
        let pool = sandbox.database("scratch", sqlx::migrate!("../../migrations/ordering")).await;
        Scratch { broker: Broker::new(&sandbox.amqp_url), pool, sandbox }
    }

    async fn channel(&self) -> lapin::Channel {
        self.broker.channel().await.unwrap()
    }

    /// A queue bound to `exchange`/`key`, as a consumer of the system would have.
    async fn queue(&self, name: &str, exchange: &str, key: &str) {
        let args = {
            let mut t = FieldTable::default();
            t.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
            t
        };
        let ch = self.channel().await;
        ch.queue_declare(name.into(), QueueDeclareOptions { durable: true, ..Default::default() }, args.clone())
            .await
            .unwrap();
        ch.queue_declare(
            format!("{name}.dead").into(),
            QueueDeclareOptions { durable: true, ..Default::default() },
            args,
        )
        .await
        .unwrap();
        ch.queue_bind(name.into(), exchange.into(), key.into(), QueueBindOptions::default(), FieldTable::default())
            .await
            .unwrap();
    }

    async fn depth(&self, queue: &str) -> u32 {
        self.sandbox.queue_depth(queue).await
    }

    async fn stop(self) {
        self.broker.close().await;
        self.pool.close().await;
    }
}

fn order_created() -> OrderCreated {
    OrderCreated {
        order_id: Uuid::new_v4(),
        user_id: Uuid::new_v4(),
        price: "12.34".parse().unwrap(),
        occurred_at: chrono::Utc::now(),
    }
}

#[tokio::test]
async fn a_message_written_while_the_relay_is_stopped_is_published_when_it_starts() {
    let s = Scratch::new().await;
    s.queue("test.orders", exchange::ORDERING, OrderCreated::NAME).await;
    let event = order_created();
    let mut tx = s.pool.begin().await.unwrap();
    let message_id = OUTBOX.enqueue(&mut tx, &event).await.unwrap();
    tx.commit().await.unwrap();

    // The write publishes nothing by itself. A control message sent after
    // the commit, routed as the event would be, arrives: it is the only one
    // in the queue, and the event waits in the outbox, unsent.
    let ch = s.channel().await;
    let control = BasicProperties::default().with_message_id("control".into());
    ch.basic_publish(exchange::ORDERING.into(), OrderCreated::NAME.into(), Default::default(), b"{}", control)
        .await
        .unwrap();
    eventually(Duration::from_secs(10), || async { (s.depth("test.orders").await >= 1).then_some(()) }).await;
    let mut arrived = Vec::new();
    while let Some(m) = ch.basic_get("test.orders".into(), BasicGetOptions { no_ack: true }).await.unwrap() {
        arrived.push(m.delivery.properties.message_id().as_ref().map(|id| id.to_string()));
    }
    assert_eq!(arrived, [Some("control".to_string())], "nothing is published without the relay");
    let unsent: bool = sqlx::query_scalar("SELECT sent_at IS NULL FROM outbox WHERE message_id = $1")
        .bind(message_id)
        .fetch_one(&s.pool)
        .await
        .unwrap();
    assert!(unsent, "the event waits in the outbox");

    let shutdown = tokio_util::sync::CancellationToken::new();
    let relay =
        tokio::spawn(Relay::new(s.pool.clone(), s.broker.clone(), Duration::from_secs(60)).run(shutdown.clone()));
    let got = eventually(Duration::from_secs(10), || async {
        ch.basic_get("test.orders".into(), BasicGetOptions { no_ack: true }).await.unwrap()
    })
    .await;
    let props = &got.delivery.properties;
    assert_eq!(props.message_id().as_ref().unwrap().as_str(), message_id.to_string());
    assert_eq!(props.kind().as_ref().unwrap().as_str(), "OrderCreated");
    assert_eq!(props.correlation_id().as_ref().unwrap().as_str(), event.order_id.to_string());
    assert_eq!(serde_json::from_slice::<OrderCreated>(&got.delivery.data).unwrap(), event);
    let sent: bool = sqlx::query_scalar("SELECT sent_at IS NOT NULL FROM outbox WHERE message_id = $1")
        .bind(message_id)
        .fetch_one(&s.pool)
        .await
        .unwrap();
    assert!(sent, "marked sent after the confirm");

    // Once running, it wakes on the commit itself (the poll is a minute).
    let mut tx = s.pool.begin().await.unwrap();
    OUTBOX.enqueue(&mut tx, &order_created()).await.unwrap();
    tx.commit().await.unwrap();
    eventually(Duration::from_secs(5), || async {
        ch.basic_get("test.orders".into(), BasicGetOptions { no_ack: true }).await.unwrap()
    })
    .await;

    shutdown.cancel();
    relay.await.unwrap().unwrap();
    s.stop().await;
}

const RETRY_QUEUE: QueueSpec =
    QueueSpec { name: "test.retries", exchange: exchange::ORDERING, routing_keys: &[OrderCreated::NAME] };

/// Runs a consumer whose handler fails its first `failures` calls.
async fn consume_with_failures(s: &Scratch, failures: u32) -> (Arc<AtomicU32>, tokio_util::sync::CancellationToken) {
    consume_with_failures_replaying(s, failures, runtime::messaging::consumer::Replay::default()).await
}

/// [`consume_with_failures`] with its dead letters replayed as `replay` says.
async fn consume_with_failures_replaying(
    s: &Scratch,
    failures: u32,
    replay: runtime::messaging::consumer::Replay,
) -> (Arc<AtomicU32>, tokio_util::sync::CancellationToken) {
    s.queue(RETRY_QUEUE.name, exchange::ORDERING, OrderCreated::NAME).await;
    let calls = Arc::new(AtomicU32::new(0));
    let consumer = Consumer::new(RETRY_QUEUE, s.pool.clone(), (calls.clone(), failures))
        .on::<OrderCreated, _>(|(calls, failures), tx, msg| {
            Box::pin(async move {
                if calls.fetch_add(1, Ordering::SeqCst) < failures {
                    return Err(HandlerError::Retry(anyhow::anyhow!("database is having a bad day")));
                }
                sqlx::query("INSERT INTO orders (id, user_id, price) VALUES ($1, $2, 1)")
                    .bind(msg.payload.order_id)
                    .bind(msg.payload.user_id)
                    .execute(tx)
                    .await?;
                Ok(())
            })
        })
        .replay_dead_letters(replay.every, replay.max_replays);
    let shutdown = tokio_util::sync::CancellationToken::new();
    let delays = vec![Duration::from_millis(50), Duration::from_millis(150)];
    tokio::spawn(consumer.run(s.broker.clone(), 4, delays, shutdown.clone()));
    (calls, shutdown)
}

async fn publish(s: &Scratch, event: &OrderCreated) {
    let ch = s.broker.confirm_channel().await.unwrap();
    let props = outbox::properties(Uuid::new_v4(), OrderCreated::NAME, None, chrono::Utc::now());
    runtime::messaging::broker::publish_confirmed(
        &ch,
        exchange::ORDERING,
        OrderCreated::NAME,
        &serde_json::to_vec(event).unwrap(),
        props,
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn a_failing_handler_is_retried_with_delays_and_its_effect_lands_once() {
    let s = Scratch::new().await;
    let (calls, shutdown) = consume_with_failures(&s, 2).await;
    let event = order_created();
    publish(&s, &event).await;
    eventually_counts(Duration::from_secs(10), &s.pool, "SELECT count(*) FROM orders WHERE id = $1", event.order_id, 1)
        .await;
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    assert_eq!(s.depth("test.retries.dead").await, 0);
    shutdown.cancel();
    s.stop().await;
}

#[tokio::test]
async fn a_handler_that_keeps_failing_ends_in_the_dead_letter_queue_and_can_be_replayed() {
    let s = Scratch::new().await;
    // Fails three times: the first try and both retries.
    let (calls, shutdown) = consume_with_failures(&s, 3).await;
    let event = order_created();
    publish(&s, &event).await;
    eventually(Duration::from_secs(10), || async { (s.depth("test.retries.dead").await == 1).then_some(()) }).await;
    assert_eq!(calls.load(Ordering::SeqCst), 3, "first try and two retries");
    let ch = s.channel().await;
    let m = ch.basic_get("test.retries.dead".into(), BasicGetOptions { no_ack: true }).await.unwrap().unwrap();
    let headers = m.delivery.properties.headers().clone().unwrap();
    let reason = match headers.inner().get("x-dead-letter-reason") {
        Some(AMQPValue::LongString(s)) => s.to_string(),
        other => panic!("{other:?}"),
    };
    assert!(reason.starts_with("gave up after 3 attempts: database is having a bad day"), "{reason}");
    shutdown.cancel();
    s.stop().await;
}

/// A `dead_letters_kept{queue,cause}` gauge of this process.
fn kept(cause: &str) -> f64 {
    let label = format!("cause=\"{cause}\"");
    let text = runtime::metrics::handle().render();
    text.lines()
        .filter(|l| l.starts_with("dead_letters_kept{") && l.contains(&label) && l.contains("test.retries"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A message whose handler failed through the whole retry schedule (three
/// calls) is dead-lettered as transient and replayed automatically: here
/// once, after which it passes (six calls in all), nothing left dead.
#[tokio::test]
async fn a_dead_letter_of_a_transient_cause_is_replayed_automatically() {
    let s = Scratch::new().await;
    let replay = runtime::messaging::consumer::Replay { every: Duration::from_millis(300), max_replays: 3 };
    let (calls, shutdown) = consume_with_failures_replaying(&s, 5, replay).await;
    let event = order_created();
    publish(&s, &event).await;
    eventually_counts(Duration::from_secs(20), &s.pool, "SELECT count(*) FROM orders WHERE id = $1", event.order_id, 1)
        .await;
    assert_eq!(calls.load(Ordering::SeqCst), 6, "three calls, replayed, three more");
    assert_eq!(s.depth("test.retries.dead").await, 0);
    shutdown.cancel();
    s.stop().await;
}

/// The replays are bounded: a message that keeps failing is replayed twice
/// (three rounds of three calls) and then stays, as does a poison message
/// (never replayed), each with its reason, counted by cause.
#[tokio::test]
async fn replays_are_bounded_and_poison_stays_with_its_reason() {
    runtime::metrics::handle(); // the recorder, before anything is counted
    let s = Scratch::new().await;
    let replay = runtime::messaging::consumer::Replay { every: Duration::from_millis(300), max_replays: 2 };
    let (calls, shutdown) = consume_with_failures_replaying(&s, u32::MAX, replay).await;
    publish(&s, &order_created()).await;
    // Poison: a body that is not an OrderCreated.
    let ch = s.broker.confirm_channel().await.unwrap();
    let props = outbox::properties(Uuid::new_v4(), OrderCreated::NAME, None, chrono::Utc::now());
    runtime::messaging::broker::publish_confirmed(&ch, exchange::ORDERING, OrderCreated::NAME, b"{\"not\": 1}", props)
        .await
        .unwrap();
    eventually(Duration::from_secs(30), || async { (kept("transient") == 1.0 && kept("poison") == 1.0).then_some(()) })
        .await;
    assert_eq!(calls.load(Ordering::SeqCst), 9, "three rounds of three calls");
    shutdown.cancel();
    let ch = s.channel().await;
    let mut reasons = vec![];
    while let Some(m) = ch.basic_get("test.retries.dead".into(), BasicGetOptions { no_ack: true }).await.unwrap() {
        let headers = m.delivery.properties.headers().clone().unwrap();
        let get = |k: &str| match headers.inner().get(k) {
            Some(AMQPValue::LongString(v)) => v.to_string(),
            Some(AMQPValue::LongLongInt(n)) => n.to_string(),
            other => format!("{other:?}"),
        };
        reasons.push((get("x-dead-letter-cause"), get("x-replays"), get("x-dead-letter-reason")));
    }
    reasons.sort();
    assert_eq!(reasons.len(), 2, "{reasons:?}");
    assert_eq!(reasons[0].0, "poison", "{reasons:?}");
    assert!(reasons[0].2.starts_with("invalid OrderCreated body"), "{reasons:?}");
    assert_eq!((reasons[1].0.as_str(), reasons[1].1.as_str()), ("transient", "2"), "{reasons:?}");
    assert!(reasons[1].2.starts_with("gave up after 3 attempts"), "{reasons:?}");
    s.stop().await;
}

#[tokio::test]
async fn order_events_are_kept_for_the_push_service_before_any_replica_ever_ran() {
    // No push service here: any service's first connection declares its stream.
    let s = Scratch::new().await;
    publish(&s, &order_created()).await;
    eventually(Duration::from_secs(10), || async {
        (s.depth(contracts::topology::PUSH_STREAM).await == 1).then_some(())
    })
    .await;
    s.stop().await;
}
