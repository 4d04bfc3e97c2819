//! Ordering's rules for orders left pending, on a database of their own:
//! the sweeper re-drives an order's payment after a deadline (the same
//! payment id, spaced, not behind one still waiting in the outbox), asks
//! billing to void it past the timeout without failing the order itself,
//! and sweeps on one replica at a time; billing's answer to the void
//! settles the order, as charged or as failed with its reason.

use contracts::messages::{PAYMENT_VOIDED, PaymentCreated, PaymentFailed};
use ordering::orders::{on_payment_created, on_payment_failed};
use ordering::sweeper::{SWEEP_LOCK, SweeperConfig, Swept, sweep};
use runtime::Incoming;
use sqlx::PgPool;
use uuid::Uuid;

/// Re-drive after a minute, give up after fifteen.
fn config() -> SweeperConfig {
    SweeperConfig { redrive_after_ms: 60_000, pending_timeout_ms: 900_000, ..Default::default() }
}

/// An order placed `age_secs` ago (its own `CreatePayment` long sent), with `status`.
async fn order(db: &PgPool, age_secs: i64, status: &str) -> Uuid {
    let id = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO orders (id, user_id, price, status, created_at, updated_at)
         VALUES ($1, $2, 60, $3, now() - make_interval(secs => $4), now() - make_interval(secs => $4))",
    )
    .bind(id)
    .bind(Uuid::new_v4())
    .bind(status)
    .bind(age_secs as f64)
    .execute(db)
    .await
    .unwrap();
    id
}

/// The messages the outbox holds for order `id`, oldest first.
async fn commands(db: &PgPool, id: Uuid) -> Vec<String> {
    let rows = test_support::outbox_messages(db, id).await;
    for (_, payload) in rows.iter().filter(|(kind, _)| kind.ends_with("Payment")) {
        assert_eq!(payload["id"], id.to_string(), "the command names the order's own payment id");
        assert_eq!(payload["amount"], 60);
    }
    rows.into_iter().map(|(kind, _)| kind).collect()
}

async fn status(db: &PgPool, id: Uuid) -> (String, Option<String>) {
    sqlx::query_as("SELECT status, reason FROM orders WHERE id = $1").bind(id).fetch_one(db).await.unwrap()
}

/// Makes the sweeper's last command for `id` look `secs` older.
async fn age_last_command(db: &PgPool, id: Uuid, secs: i64) {
    sqlx::query("UPDATE order_sweeps SET last_sent_at = last_sent_at - make_interval(secs => $2) WHERE order_id = $1")
        .bind(id)
        .bind(secs as f64)
        .execute(db)
        .await
        .unwrap();
}

#[tokio::test]
async fn an_order_pending_past_the_deadline_is_redriven_with_its_payment_id_and_spaced() {
    let db = crate::test_db().await;
    let stuck = order(&db.pool, 120, "pending").await;
    let fresh = order(&db.pool, 1, "pending").await;
    let settled = order(&db.pool, 120, "succeeded").await;

    assert_eq!(sweep(&db.pool, &config()).await.unwrap(), Swept { redriven: 1, voided: 0 });
    assert_eq!(commands(&db.pool, stuck).await, ["CreatePayment"]);
    assert!(commands(&db.pool, fresh).await.is_empty(), "an order within its deadline is left alone");
    assert!(commands(&db.pool, settled).await.is_empty(), "a settled order is never re-driven");

    // Not again before another deadline has passed, then again.
    sqlx::query("UPDATE outbox SET sent_at = now()").execute(&db.pool).await.unwrap();
    assert_eq!(sweep(&db.pool, &config()).await.unwrap(), Swept::default());
    age_last_command(&db.pool, stuck, 61).await;
    assert_eq!(sweep(&db.pool, &config()).await.unwrap(), Swept { redriven: 1, voided: 0 });
    assert_eq!(commands(&db.pool, stuck).await, ["CreatePayment", "CreatePayment"]);
    assert_eq!(status(&db.pool, stuck).await, ("pending".into(), None), "a re-drive changes nothing of the order");
}

#[tokio::test]
async fn a_payment_still_waiting_in_the_outbox_is_not_sent_twice_unless_parked() {
    let db = crate::test_db().await;
    let stuck = order(&db.pool, 120, "pending").await;
    assert_eq!(sweep(&db.pool, &config()).await.unwrap().redriven, 1);
    age_last_command(&db.pool, stuck, 61).await;
    // The broker is away: the re-drive has not gone out yet.
    assert_eq!(sweep(&db.pool, &config()).await.unwrap(), Swept::default());
    // The outbox gave up on it (parked): the sweeper sends another.
    sqlx::query("UPDATE outbox SET parked_at = now(), parked_reason = 'refused'").execute(&db.pool).await.unwrap();
    assert_eq!(sweep(&db.pool, &config()).await.unwrap().redriven, 1);
    assert_eq!(commands(&db.pool, stuck).await, ["CreatePayment", "CreatePayment"]);
}

#[tokio::test]
async fn past_the_timeout_the_payment_is_voided_and_the_order_waits_for_billings_answer() {
    let db = crate::test_db().await;
    let unpaid = order(&db.pool, 1000, "pending").await;
    let charged = order(&db.pool, 1000, "pending").await;
    assert_eq!(sweep(&db.pool, &config()).await.unwrap(), Swept { redriven: 0, voided: 2 });
    assert_eq!(commands(&db.pool, unpaid).await, ["VoidPayment"]);
    // Asking is not knowing: the order stays pending until billing answers.
    assert_eq!(status(&db.pool, unpaid).await, ("pending".into(), None));

    // Billing voided it: nothing was taken, and nothing will be.
    let mut tx = db.pool.begin().await.unwrap();
    let failed = PaymentFailed { id: unpaid, reason: PAYMENT_VOIDED.into() };
    on_payment_failed(&mut tx, Incoming { message_id: Uuid::now_v7(), payload: failed }).await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(status(&db.pool, unpaid).await, ("failed".into(), Some(PAYMENT_VOIDED.into())));
    assert_eq!(commands(&db.pool, unpaid).await, ["VoidPayment", "OrderFailed"]);

    // Billing had charged the other one before the void came: it succeeds.
    let mut tx = db.pool.begin().await.unwrap();
    let created = PaymentCreated { id: charged };
    on_payment_created(&mut tx, Incoming { message_id: Uuid::now_v7(), payload: created }).await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(status(&db.pool, charged).await, ("succeeded".into(), None));

    // Settled orders are swept no more.
    age_last_command(&db.pool, unpaid, 61).await;
    age_last_command(&db.pool, charged, 61).await;
    assert_eq!(sweep(&db.pool, &config()).await.unwrap(), Swept::default());
}

#[tokio::test]
async fn one_replica_sweeps_at_a_time() {
    let db = crate::test_db().await;
    let stuck = order(&db.pool, 120, "pending").await;
    // Another replica is sweeping (it holds the lock in its transaction).
    let mut other = db.pool.begin().await.unwrap();
    sqlx::query("SELECT pg_advisory_xact_lock($1)").bind(SWEEP_LOCK).execute(&mut *other).await.unwrap();
    assert_eq!(sweep(&db.pool, &config()).await.unwrap(), Swept::default());
    assert!(commands(&db.pool, stuck).await.is_empty());
    other.commit().await.unwrap();
    assert_eq!(sweep(&db.pool, &config()).await.unwrap().redriven, 1);
}
