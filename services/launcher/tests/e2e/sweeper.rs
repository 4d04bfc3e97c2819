//! No order stays pending for want of a message: ordering's sweeper
//! re-drives an order's payment after a deadline and, past a timeout, asks
//! billing to void it. The whole system, with deadlines short enough for a
//! test; a message lost after it was acked is made by removing what its
//! consumer's commit wrote (as a database failover can), and time passing
//! by moving an order's placement back.

use crate::helpers::{TestApp, User, eventually, eventually_counts};
use contracts::messages::{CreatePayment, Message, PAYMENT_VOIDED, exchange};
use ordering::sweeper::SweeperConfig;
use serde_json::Value;
use sqlx::PgPool;
use std::time::Duration;
use uuid::Uuid;

/// Re-drive after 300 ms; give up after an hour (tests move a placement
/// further back for that).
async fn app() -> TestApp {
    let sweeper = SweeperConfig {
        redrive_after_ms: 300,
        pending_timeout_ms: 3_600_000,
        sweep_interval_ms: 100,
        sweep_batch: 100,
    };
    TestApp::spawn_with(|c| c.sweeper = sweeper).await
}

const WAIT: Duration = Duration::from_secs(30);

/// Places an order of `price` and waits until it is settled: its id.
async fn settled(app: &TestApp, user: &User, price: u32, status: &str) -> Uuid {
    let id = app.place_order(user, price).await;
    assert_eq!(app.settled_order(user, &id).await["status"], status);
    id.parse().unwrap()
}

/// Ordering loses the commit of the order's settlement after its consumer
/// acked billing's answer: the order is pending again and the inbox no longer
/// knows the answer; the message will never come back. With `placed_secs_ago`,
/// the order was placed that long ago.
async fn lose_settlement(ordering: &PgPool, order: Uuid, placed_secs_ago: Option<f64>) {
    let mut tx = ordering.begin().await.unwrap();
    sqlx::query("UPDATE orders SET status = 'pending', reason = NULL WHERE id = $1")
        .bind(order)
        .execute(&mut *tx)
        .await
        .unwrap();
    if let Some(secs) = placed_secs_ago {
        sqlx::query("UPDATE orders SET created_at = now() - make_interval(secs => $2) WHERE id = $1")
            .bind(order)
            .bind(secs)
            .execute(&mut *tx)
            .await
            .unwrap();
    }
    sqlx::query("DELETE FROM inbox WHERE queue = 'ordering.billing'").execute(&mut *tx).await.unwrap();
    tx.commit().await.unwrap();
}

/// How often billing charged payment `id` (its ledger entries).
async fn charges(billing: &PgPool, id: Uuid) -> i64 {
    test_support::count(billing, "SELECT count(*) FROM ledger_entries WHERE payment_id = $1", id).await
}

/// The order as its user reads it, once it is no longer pending.
async fn settled_again(app: &TestApp, user: &User, id: Uuid) -> Value {
    eventually(WAIT, || async {
        let order: Value = app.get(user, &format!("/ordering/orders/{id}")).await;
        (order["status"] != "pending").then_some(order)
    })
    .await
}

#[tokio::test]
async fn a_settlement_lost_after_its_ack_is_healed_by_a_redrive_that_charges_once() {
    let app = app().await;
    let user = app.user_with(100).await;
    let id = settled(&app, &user, 60, "succeeded").await;
    let (ordering, billing) = (app.db("ordering").await, app.db("billing").await);

    lose_settlement(&ordering, id, None).await;
    assert_eq!(app.get::<Value>(&user, &format!("/ordering/orders/{id}")).await["status"], "pending");

    // The sweeper sends the payment again; billing answers with the outcome it had.
    assert_eq!(settled_again(&app, &user, id).await["status"], "succeeded");
    assert_eq!(app.balance(&user).await, 40.0, "charged once");
    assert_eq!(charges(&billing, id).await, 1);
    let redrives: i32 = sqlx::query_scalar("SELECT redrives FROM order_sweeps WHERE order_id = $1")
        .bind(id)
        .fetch_one(&ordering)
        .await
        .unwrap();
    assert!(redrives >= 1);
    app.stop().await;
}

#[tokio::test]
async fn an_order_whose_payment_command_was_lost_is_paid_by_the_redrive() {
    let app = app().await;
    let user = app.user_with(100).await;
    let ordering = app.db("ordering").await;
    // The order committed, its CreatePayment went out and was then lost (a
    // broker that deleted it past a delivery limit): billing never saw it.
    let id = Uuid::now_v7();
    sqlx::query("INSERT INTO orders (id, user_id, price) VALUES ($1, $2, 60)")
        .bind(id)
        .bind(user.id)
        .execute(&ordering)
        .await
        .unwrap();

    assert_eq!(settled_again(&app, &user, id).await["status"], "succeeded");
    assert_eq!(app.balance(&user).await, 40.0);
    assert_eq!(charges(&app.db("billing").await, id).await, 1);
    app.stop().await;
}

#[tokio::test]
async fn an_unpaid_order_times_out_failed_and_a_late_payment_is_refused() {
    let app = app().await;
    let user = app.user_with(100).await;
    let mut events = app.subscribe(&user).await;
    let (ordering, billing) = (app.db("ordering").await, app.db("billing").await);
    // Billing never saw this order's payment, and the order is past the
    // timeout: the sweeper asks billing to void it.
    let id = Uuid::now_v7();
    sqlx::query("INSERT INTO orders (id, user_id, price, created_at) VALUES ($1, $2, 60, now() - interval '2 hours')")
        .bind(id)
        .bind(user.id)
        .execute(&ordering)
        .await
        .unwrap();

    let order = settled_again(&app, &user, id).await;
    assert_eq!(order["status"], "failed");
    assert_eq!(order["reason"], PAYMENT_VOIDED);
    let event = tokio::time::timeout(WAIT, events.recv()).await.expect("an event in time").expect("stream open");
    assert_eq!(event.event, "OrderFailed");
    assert_eq!(serde_json::from_str::<Value>(&event.data).unwrap()["orderId"], id.to_string());

    // The order's CreatePayment turns up after all: refused, nothing taken.
    let late = CreatePayment { id, user_id: user.id, amount: contracts::Money::new(60.into()).unwrap() };
    let message_id = Uuid::now_v7().to_string();
    let body = serde_json::to_vec(&late).unwrap();
    app.publish_raw(exchange::ORDERING, CreatePayment::NAME, Some(&message_id), CreatePayment::NAME, &body).await;
    let answered = "SELECT count(*) FROM outbox WHERE correlation_id = $1 AND message_type = 'PaymentFailed'";
    eventually_counts(WAIT, &billing, answered, id.to_string(), 2).await;
    assert_eq!(charges(&billing, id).await, 0);
    assert_eq!(app.balance(&user).await, 100.0, "a voided payment is never taken");
    let order: Value = app.get(&user, &format!("/ordering/orders/{id}")).await;
    assert_eq!(order["status"], "failed");
    app.stop().await;
}

#[tokio::test]
async fn a_charged_order_is_never_failed_by_the_timeout() {
    let app = app().await;
    let user = app.user_with(100).await;
    let id = settled(&app, &user, 60, "succeeded").await;
    let ordering = app.db("ordering").await;
    // The settlement is lost and the order is past the timeout: billing is
    // asked to void a payment it has taken.
    lose_settlement(&ordering, id, Some(7200.0)).await;

    assert_eq!(settled_again(&app, &user, id).await["status"], "succeeded");
    assert_eq!(app.balance(&user).await, 40.0);
    let voids: i32 = sqlx::query_scalar("SELECT voids FROM order_sweeps WHERE order_id = $1")
        .bind(id)
        .fetch_one(&ordering)
        .await
        .unwrap();
    assert!(voids >= 1, "the order was settled by billing's answer to the void");
    app.stop().await;
}
