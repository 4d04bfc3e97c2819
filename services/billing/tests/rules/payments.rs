//! Billing's payment rules, on a database of their own: a payment id has
//! one outcome, whether `CreatePayment` comes once, again (a re-drive) or
//! after a `VoidPayment`, and whichever of a charge and a void in flight
//! commits first.

use billing::payments::{on_create_payment, on_void_payment};
use contracts::Money;
use contracts::messages::{CreatePayment, NOT_ENOUGH_MONEY, PAYMENT_VOIDED, VoidPayment};
use runtime::Incoming;
use runtime::messaging::consumer::HandlerError;
use sqlx::PgPool;
use std::time::Duration;
use uuid::Uuid;

fn money(amount: i64) -> Money {
    Money::new(rust_decimal::Decimal::from(amount)).unwrap()
}

fn create(id: Uuid, user: Uuid, amount: i64) -> Incoming<CreatePayment> {
    Incoming { message_id: Uuid::now_v7(), payload: CreatePayment { id, user_id: user, amount: money(amount) } }
}

fn void(id: Uuid, user: Uuid, amount: i64) -> Incoming<VoidPayment> {
    Incoming { message_id: Uuid::now_v7(), payload: VoidPayment { id, user_id: user, amount: money(amount) } }
}

/// A user with `balance` on their account.
async fn account(db: &PgPool, balance: i64) -> Uuid {
    let user = Uuid::new_v4();
    sqlx::query("INSERT INTO accounts (user_id, balance) VALUES ($1, $2)")
        .bind(user)
        .bind(rust_decimal::Decimal::from(balance))
        .execute(db)
        .await
        .unwrap();
    user
}

async fn balance(db: &PgPool, user: Uuid) -> i64 {
    let b: rust_decimal::Decimal =
        sqlx::query_scalar("SELECT balance FROM accounts WHERE user_id = $1").bind(user).fetch_one(db).await.unwrap();
    b.try_into().unwrap()
}

/// The answers billing has written for payment `id`, oldest first:
/// `PaymentCreated` or `PaymentFailed: <reason>`.
async fn answers(db: &PgPool, id: Uuid) -> Vec<String> {
    let rows = test_support::outbox_messages(db, id).await;
    rows.into_iter()
        .map(|(kind, payload)| match payload["reason"].as_str() {
            Some(reason) => format!("{kind}: {reason}"),
            None => kind,
        })
        .collect()
}

async fn charges(db: &PgPool, id: Uuid) -> i64 {
    test_support::count(db, "SELECT count(*) FROM ledger_entries WHERE payment_id = $1", id).await
}

/// Waits until a transaction of this database waits for a lock (the signal
/// that a handler is blocked on another's uncommitted row).
async fn until_blocked(db: &test_support::ServiceDb) {
    for _ in 0..1000 {
        let waiting: i64 =
            sqlx::query_scalar("SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND wait_event_type = 'Lock'")
                .bind(&db.name)
                .fetch_one(&db.pool)
                .await
                .unwrap();
        if waiting > 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("no transaction ever waited for the lock");
}

#[tokio::test]
async fn a_payment_asked_again_gets_its_outcome_and_is_charged_once() {
    let db = crate::test_db().await;
    let user = account(&db.pool, 100).await;
    let id = Uuid::now_v7();
    for _ in 0..2 {
        let mut tx = db.pool.begin().await.unwrap();
        on_create_payment(&mut tx, create(id, user, 60)).await.unwrap();
        tx.commit().await.unwrap();
    }
    assert_eq!(balance(&db.pool, user).await, 40);
    assert_eq!(charges(&db.pool, id).await, 1);
    assert_eq!(answers(&db.pool, id).await, ["PaymentCreated", "PaymentCreated"]);

    // A refused one stays refused, with its reason, even once money arrived.
    let refused = Uuid::now_v7();
    let mut tx = db.pool.begin().await.unwrap();
    on_create_payment(&mut tx, create(refused, user, 50)).await.unwrap();
    tx.commit().await.unwrap();
    sqlx::query("UPDATE accounts SET balance = 1000 WHERE user_id = $1").bind(user).execute(&db.pool).await.unwrap();
    let mut tx = db.pool.begin().await.unwrap();
    on_create_payment(&mut tx, create(refused, user, 50)).await.unwrap();
    tx.commit().await.unwrap();
    let failed = format!("PaymentFailed: {NOT_ENOUGH_MONEY}");
    assert_eq!(answers(&db.pool, refused).await, [failed.clone(), failed]);
    assert_eq!(charges(&db.pool, refused).await, 0);
}

#[tokio::test]
async fn a_void_before_the_payment_refuses_it_when_it_comes() {
    let db = crate::test_db().await;
    let user = account(&db.pool, 100).await;
    let id = Uuid::now_v7();
    let mut tx = db.pool.begin().await.unwrap();
    on_void_payment(&mut tx, void(id, user, 60)).await.unwrap();
    tx.commit().await.unwrap();
    // The CreatePayment that was late (or re-driven) arrives after the void.
    let mut tx = db.pool.begin().await.unwrap();
    on_create_payment(&mut tx, create(id, user, 60)).await.unwrap();
    tx.commit().await.unwrap();

    assert_eq!(balance(&db.pool, user).await, 100, "a voided payment is never taken");
    assert_eq!(charges(&db.pool, id).await, 0);
    let voided = format!("PaymentFailed: {PAYMENT_VOIDED}");
    assert_eq!(answers(&db.pool, id).await, [voided.clone(), voided]);
}

#[tokio::test]
async fn a_void_after_the_charge_answers_that_it_was_charged() {
    let db = crate::test_db().await;
    let user = account(&db.pool, 100).await;
    let id = Uuid::now_v7();
    let mut tx = db.pool.begin().await.unwrap();
    on_create_payment(&mut tx, create(id, user, 60)).await.unwrap();
    tx.commit().await.unwrap();
    let mut tx = db.pool.begin().await.unwrap();
    on_void_payment(&mut tx, void(id, user, 60)).await.unwrap();
    tx.commit().await.unwrap();

    assert_eq!(balance(&db.pool, user).await, 40);
    assert_eq!(answers(&db.pool, id).await, ["PaymentCreated", "PaymentCreated"], "a charged payment is never voided");
}

#[tokio::test]
async fn a_void_racing_a_charge_in_flight_waits_and_answers_charged() {
    let db = crate::test_db().await;
    let user = account(&db.pool, 100).await;
    let id = Uuid::now_v7();
    // The charge has done everything but commit...
    let mut charge = db.pool.begin().await.unwrap();
    on_create_payment(&mut charge, create(id, user, 60)).await.unwrap();
    // ...when the void runs on another consumer.
    let pool = db.pool.clone();
    let voiding = tokio::spawn(async move {
        let mut tx = pool.begin().await.unwrap();
        let result = on_void_payment(&mut tx, void(id, user, 60)).await;
        tx.commit().await.unwrap();
        result
    });
    until_blocked(&db).await;
    charge.commit().await.unwrap();
    voiding.await.unwrap().unwrap();

    assert_eq!(balance(&db.pool, user).await, 40);
    assert_eq!(answers(&db.pool, id).await, ["PaymentCreated", "PaymentCreated"]);
}

#[tokio::test]
async fn a_charge_racing_a_void_in_flight_is_rolled_back_and_then_refused() {
    let db = crate::test_db().await;
    let user = account(&db.pool, 100).await;
    let id = Uuid::now_v7();
    let mut voiding = db.pool.begin().await.unwrap();
    on_void_payment(&mut voiding, void(id, user, 60)).await.unwrap();
    let pool = db.pool.clone();
    let charging = tokio::spawn(async move {
        let mut tx = pool.begin().await.unwrap();
        // The consumer rolls back a handler that failed (dropping `tx`).
        on_create_payment(&mut tx, create(id, user, 60)).await
    });
    until_blocked(&db).await;
    voiding.commit().await.unwrap();
    let refused = charging.await.unwrap();
    assert!(matches!(refused, Err(HandlerError::Retry(_))), "the charge must fail and be retried: {refused:?}");
    assert_eq!(balance(&db.pool, user).await, 100, "the charge's debit rolled back with it");

    // Its retry finds the void.
    let mut tx = db.pool.begin().await.unwrap();
    on_create_payment(&mut tx, create(id, user, 60)).await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(balance(&db.pool, user).await, 100);
    assert_eq!(charges(&db.pool, id).await, 0);
    let voided = format!("PaymentFailed: {PAYMENT_VOIDED}");
    assert_eq!(answers(&db.pool, id).await, [voided.clone(), voided]);
}
