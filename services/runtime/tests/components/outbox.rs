//! The outbox relay against the real RabbitMQ: refused rows are parked and
//! stay out of the way, confirms are bounded, and no transaction is open
//! while the broker is waited for.

use contracts::messages::exchange;
use lapin::options::QueueDeclareOptions;
use std::time::Duration;
use test_support::{Link, Sandbox, TcpProxy, eventually};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Publishes `body` as a message of `kind` to `exchange`, confirmed.
async fn publish(amqp_url: &str, exchange: &str, kind: &str, body: &[u8]) {
    let broker = runtime::Broker::new(amqp_url);
    let ch = broker.confirm_channel().await.unwrap();
    let props = runtime::messaging::outbox::properties(Uuid::new_v4(), kind, None, chrono::Utc::now());
    runtime::messaging::broker::publish_confirmed(&ch, exchange, kind, body, props).await.unwrap();
    broker.close().await;
}

async fn outbox_db(s: &Sandbox) -> sqlx::PgPool {
    runtime::data::db::connect(&s.database_url("outbox"), sqlx::migrate!("../../migrations/ordering")).await.unwrap()
}

/// A row as a service would write it, to `exchange`/`routing_key`.
async fn outbox_row(db: &sqlx::PgPool, exchange: &str, routing_key: &str, attempts: i32) -> i64 {
    sqlx::query_scalar(
        "INSERT INTO outbox (message_id, exchange, routing_key, message_type, payload, attempts)
         VALUES ($1, $2, $3, 'OrderCreated', '{}'::jsonb, $4) RETURNING id",
    )
    .bind(Uuid::now_v7())
    .bind(exchange)
    .bind(routing_key)
    .bind(attempts)
    .fetch_one(db)
    .await
    .unwrap()
}

#[derive(Debug, sqlx::FromRow)]
struct OutboxState {
    sent: bool,
    parked_reason: Option<String>,
    last_error: Option<String>,
    refusals: i32,
}

async fn outbox_state(db: &sqlx::PgPool, id: i64) -> OutboxState {
    sqlx::query_as("SELECT sent_at IS NOT NULL AS sent, parked_reason, last_error, refusals FROM outbox WHERE id = $1")
        .bind(id)
        .fetch_one(db)
        .await
        .unwrap()
}

fn start_relay(db: &sqlx::PgPool, amqp_url: &str, park_after: u32) -> CancellationToken {
    runtime::metrics::handle(); // the recorder, before anything is counted
    let shutdown = CancellationToken::new();
    let relay =
        runtime::messaging::outbox::Relay::new(db.clone(), runtime::Broker::new(amqp_url), Duration::from_millis(100))
            .confirm_timeout(Duration::from_secs(1))
            .refused_backoff(Duration::from_millis(500), Duration::from_secs(2))
            .park_after(park_after);
    tokio::spawn(relay.run(shutdown.clone()));
    shutdown
}

fn metric(name: &str) -> f64 {
    let text = runtime::metrics::handle().render();
    text.lines().filter(|l| l.starts_with(name)).filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).sum()
}

#[tokio::test]
async fn a_message_returned_unroutable_is_parked_with_its_reason_and_goes_out_by_itself_once_routable() {
    let s = Sandbox::new().await;
    let db = outbox_db(&s).await;
    let stop = start_relay(&db, &s.amqp_url, 2);
    // Nothing is bound to this key: the broker returns the mandatory publish.
    let unroutable = outbox_row(&db, exchange::ORDERING, "Nobody.Listens", 0).await;
    let routable = outbox_row(&db, exchange::ORDERING, "OrderCreated", 0).await;

    eventually(Duration::from_secs(10), || async { outbox_state(&db, routable).await.sent.then_some(()) }).await;
    let parked = eventually(Duration::from_secs(15), || async {
        let state = outbox_state(&db, unroutable).await;
        state.parked_reason.is_some().then_some(state)
    })
    .await;
    assert!(!parked.sent);
    assert!(parked.refusals >= 2, "{parked:?}");
    assert!(parked.parked_reason.unwrap().contains("returned"), "reason kept");
    assert!(metric("outbox_messages_parked_total") >= 1.0);
    // The cause fixed (a queue bound to the key), no SQL run: the relay tries
    // the parked row again after its capped delay, and it goes out.
    let broker = runtime::Broker::new(&s.amqp_url);
    let ch = broker.channel().await.unwrap();
    ch.queue_declare("test.listens".into(), QueueDeclareOptions::default(), Default::default()).await.unwrap();
    ch.queue_bind(
        "test.listens".into(),
        exchange::ORDERING.into(),
        "Nobody.Listens".into(),
        Default::default(),
        Default::default(),
    )
    .await
    .unwrap();
    eventually(Duration::from_secs(30), || async { outbox_state(&db, unroutable).await.sent.then_some(()) }).await;
    broker.close().await;
    stop.cancel();
    db.close().await;
}

#[tokio::test]
async fn a_message_nacked_by_a_full_queue_is_parked_even_after_many_attempts_and_does_not_jam_the_batch() {
    let s = Sandbox::new().await;
    let db = outbox_db(&s).await;
    // A queue that holds one message and refuses more (the broker nacks).
    let broker = runtime::Broker::new(&s.amqp_url);
    let ch = broker.confirm_channel().await.unwrap();
    let mut args = lapin::types::FieldTable::default();
    args.insert("x-max-length".into(), lapin::types::AMQPValue::LongLongInt(1));
    args.insert("x-overflow".into(), lapin::types::AMQPValue::LongString("reject-publish".into()));
    ch.queue_declare("test.full".into(), QueueDeclareOptions::default(), args).await.unwrap();
    ch.queue_bind("test.full".into(), exchange::ORDERING.into(), "Full".into(), Default::default(), Default::default())
        .await
        .unwrap();
    publish(&s.amqp_url, exchange::ORDERING, "Full", b"{}").await;

    // 50 attempts already: a delay computed in SQL as 1 s * 2^50 overflows.
    let nacked = outbox_row(&db, exchange::ORDERING, "Full", 50).await;
    let behind = outbox_row(&db, exchange::ORDERING, "OrderCreated", 0).await;
    let stop = start_relay(&db, &s.amqp_url, 1);
    eventually(Duration::from_secs(10), || async { outbox_state(&db, behind).await.sent.then_some(()) }).await;
    let state = eventually(Duration::from_secs(10), || async {
        let state = outbox_state(&db, nacked).await;
        state.parked_reason.is_some().then_some(state)
    })
    .await;
    assert!(!state.sent);
    assert!(state.parked_reason.unwrap().contains("nack"), "reason kept");
    stop.cancel();
    broker.close().await;
    db.close().await;
}

#[tokio::test]
async fn a_confirm_that_never_comes_times_out_without_a_transaction_held_and_the_message_goes_out_later() {
    let s = Sandbox::new().await;
    let db = outbox_db(&s).await;
    let amqp = TcpProxy::before(&s.amqp_url).await;
    let stop = start_relay(&db, &amqp.url(&s.amqp_url), 3);
    // Connected and idle.
    let first = outbox_row(&db, exchange::ORDERING, "OrderCreated", 0).await;
    eventually(Duration::from_secs(10), || async { outbox_state(&db, first).await.sent.then_some(()) }).await;

    amqp.set(Link::Stalled);
    let row = outbox_row(&db, exchange::ORDERING, "OrderCreated", 0).await;
    // Claimed (its lease set ahead): the relay publishes it and waits for the confirm.
    eventually(Duration::from_secs(10), || async {
        let claimed: bool = sqlx::query_scalar("SELECT next_attempt_at > now() FROM outbox WHERE id = $1")
            .bind(row)
            .fetch_one(&db)
            .await
            .unwrap();
        claimed.then_some(())
    })
    .await;
    let open = test_support::idle_in_transaction(&db).await;
    assert_eq!(open, 0, "no transaction open while the relay waits for the broker");
    let state = eventually(Duration::from_secs(10), || async {
        let state = outbox_state(&db, row).await;
        state.last_error.is_some().then_some(state)
    })
    .await;
    assert!(state.last_error.unwrap().contains("confirm"), "timed out waiting for the confirm");
    assert!(!state.sent);
    assert_eq!(state.refusals, 0, "a silent broker is not a refusal");

    amqp.set(Link::Open);
    eventually(Duration::from_secs(30), || async { outbox_state(&db, row).await.sent.then_some(()) }).await;
    stop.cancel();
    db.close().await;
}
