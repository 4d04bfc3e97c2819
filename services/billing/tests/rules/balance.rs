//! Billing's balance rule at its own level, on a database of its own: a
//! payment is charged only when the balance covers it, with its ledger entry
//! in the same statement, so payments handled at the same time never
//! overdraw and a balance never moves without its entry.

use billing::payments::on_create_payment;
use contracts::Money;
use contracts::messages::{CreatePayment, NOT_ENOUGH_MONEY};
use runtime::Incoming;
use rust_decimal::Decimal;
use sqlx::PgPool;
use uuid::Uuid;

/// Handles `CreatePayment` for `amount` in a transaction of its own, as
/// billing's consumer does; whether it was charged.
async fn pay(db: &PgPool, user: Uuid, amount: i64) -> (Uuid, bool) {
    let id = Uuid::now_v7();
    let amount = Money::new(Decimal::from(amount)).unwrap();
    let msg = Incoming { message_id: Uuid::now_v7(), payload: CreatePayment { id, user_id: user, amount } };
    let mut tx = db.begin().await.unwrap();
    on_create_payment(&mut tx, msg).await.unwrap();
    tx.commit().await.unwrap();
    let kind: String = sqlx::query_scalar("SELECT message_type FROM outbox WHERE correlation_id = $1")
        .bind(id.to_string())
        .fetch_one(db)
        .await
        .unwrap();
    (id, kind == "PaymentCreated")
}

#[tokio::test]
async fn payments_handled_at_the_same_time_never_overdraw() {
    let test_db = crate::test_db().await;
    let db = test_db.pool.clone();
    let user = Uuid::new_v4();
    sqlx::query("INSERT INTO accounts (user_id, balance) VALUES ($1, 100)").bind(user).execute(&db).await.unwrap();

    let mut payments = tokio::task::JoinSet::new();
    for _ in 0..10 {
        let db = db.clone();
        payments.spawn(async move { pay(&db, user, 30).await });
    }
    let outcomes = payments.join_all().await;
    let mut charged: Vec<Uuid> = outcomes.iter().filter(|(_, ok)| *ok).map(|(id, _)| *id).collect();
    assert_eq!(charged.len(), 3, "three payments of 30 fit into 100: {outcomes:?}");

    let balance: Decimal =
        sqlx::query_scalar("SELECT balance FROM accounts WHERE user_id = $1").bind(user).fetch_one(&db).await.unwrap();
    assert_eq!(balance, Decimal::from(10));
    let ledger: Vec<(Uuid, Decimal)> =
        sqlx::query_as("SELECT payment_id, balance_after FROM ledger_entries WHERE user_id = $1 ORDER BY id")
            .bind(user)
            .fetch_all(&db)
            .await
            .unwrap();
    let after: Vec<Decimal> = ledger.iter().map(|e| e.1).collect();
    assert_eq!(after, [Decimal::from(70), Decimal::from(40), Decimal::from(10)], "one entry per charge, in order");
    let mut entered: Vec<Uuid> = ledger.iter().map(|e| e.0).collect();
    entered.sort();
    charged.sort();
    assert_eq!(entered, charged);
    let reasons: Vec<String> = sqlx::query_scalar(
        "SELECT payload->>'reason' FROM outbox WHERE message_type = 'PaymentFailed' AND payload->>'reason' IS NOT NULL",
    )
    .fetch_all(&db)
    .await
    .unwrap();
    assert_eq!(reasons.len(), 7);
    assert!(reasons.iter().all(|r| r == NOT_ENOUGH_MONEY), "{reasons:?}");
}
