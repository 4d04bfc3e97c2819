//! Ordering's order states at their own level, on a database of their own:
//! billing's answer moves a pending order to `succeeded` or `failed` once,
//! with its event in the same transaction; a repeated or late answer, or one
//! for no order of ours, changes nothing and announces nothing.

use contracts::messages::{PaymentCreated, PaymentFailed};
use ordering::orders::{on_payment_created, on_payment_failed};
use runtime::Incoming;
use sqlx::PgPool;
use uuid::Uuid;

/// Ordering's database, of the test's own, and what the tests do with it.
struct TestDb {
    pool: PgPool,
    _db: test_support::ServiceDb,
}

impl TestDb {
    async fn new() -> TestDb {
        let db = crate::test_db().await;
        TestDb { pool: db.pool.clone(), _db: db }
    }

    /// A pending order of 60 by `user`.
    async fn pending(&self, user: Uuid) -> Uuid {
        let id = Uuid::now_v7();
        sqlx::query("INSERT INTO orders (id, user_id, price, status) VALUES ($1, $2, 60, 'pending')")
            .bind(id)
            .bind(user)
            .execute(&self.pool)
            .await
            .unwrap();
        id
    }

    async fn paid(&self, id: Uuid) {
        let msg = Incoming { message_id: Uuid::now_v7(), payload: PaymentCreated { id } };
        let mut tx = self.pool.begin().await.unwrap();
        on_payment_created(&mut tx, msg).await.unwrap();
        tx.commit().await.unwrap();
    }

    async fn refused(&self, id: Uuid, reason: &str) {
        let msg = Incoming { message_id: Uuid::now_v7(), payload: PaymentFailed { id, reason: reason.into() } };
        let mut tx = self.pool.begin().await.unwrap();
        on_payment_failed(&mut tx, msg).await.unwrap();
        tx.commit().await.unwrap();
    }

    async fn status(&self, id: Uuid) -> (String, Option<String>) {
        sqlx::query_as("SELECT status::text, reason FROM orders WHERE id = $1")
            .bind(id)
            .fetch_one(&self.pool)
            .await
            .unwrap()
    }

    /// The events the outbox holds for order `id`, oldest first, with their payloads.
    async fn events(&self, id: Uuid) -> Vec<(String, serde_json::Value)> {
        test_support::outbox_messages(&self.pool, id).await
    }
}

#[tokio::test]
async fn a_paid_order_succeeds_and_announces_it_once() {
    let db = TestDb::new().await;
    let user = Uuid::new_v4();
    let id = db.pending(user).await;
    db.paid(id).await;
    assert_eq!(db.status(id).await, ("succeeded".into(), None));
    let events = db.events(id).await;
    assert_eq!(events.len(), 1, "{events:?}");
    let (kind, payload) = &events[0];
    assert_eq!(kind, "OrderCreated");
    assert_eq!(payload["orderId"], id.to_string());
    assert_eq!(payload["userId"], user.to_string());
    assert_eq!(payload["price"], 60);

    // Billing answers again (a re-drive): nothing changes, nothing more is said.
    db.paid(id).await;
    assert_eq!(db.status(id).await, ("succeeded".into(), None));
    assert_eq!(db.events(id).await.len(), 1);
}

#[tokio::test]
async fn a_refused_order_fails_with_the_reason_and_announces_it_once() {
    let db = TestDb::new().await;
    let id = db.pending(Uuid::new_v4()).await;
    db.refused(id, "not enough money").await;
    assert_eq!(db.status(id).await, ("failed".into(), Some("not enough money".into())));
    let events = db.events(id).await;
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0].0, "OrderFailed");
    assert_eq!(events[0].1["reason"], "not enough money");
    db.refused(id, "not enough money").await;
    assert_eq!(db.events(id).await.len(), 1);
}

#[tokio::test]
async fn a_settled_order_keeps_its_outcome_whatever_answer_comes_late() {
    let db = TestDb::new().await;
    let (paid, refused) = (db.pending(Uuid::new_v4()).await, db.pending(Uuid::new_v4()).await);
    db.paid(paid).await;
    db.refused(refused, "not enough money").await;
    db.refused(paid, "payment voided").await;
    db.paid(refused).await;
    assert_eq!(db.status(paid).await, ("succeeded".into(), None));
    assert_eq!(db.status(refused).await, ("failed".into(), Some("not enough money".into())));
    let kinds = |events: Vec<(String, serde_json::Value)>| events.into_iter().map(|e| e.0).collect::<Vec<_>>();
    assert_eq!(kinds(db.events(paid).await), ["OrderCreated"]);
    assert_eq!(kinds(db.events(refused).await), ["OrderFailed"]);
}

#[tokio::test]
async fn an_answer_for_no_order_of_ours_is_ignored() {
    let db = TestDb::new().await;
    let stranger = Uuid::now_v7();
    db.paid(stranger).await;
    db.refused(stranger, "not enough money").await;
    assert!(db.events(stranger).await.is_empty());
    let orders: i64 = sqlx::query_scalar("SELECT count(*) FROM orders").fetch_one(&db.pool).await.unwrap();
    assert_eq!(orders, 0);
}
