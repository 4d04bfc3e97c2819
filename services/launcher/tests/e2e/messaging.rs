//! The messaging guarantees through the whole system: idempotent consumers,
//! poison messages, a balance that never goes negative, profiles and mail
//! (the components alone are tested beside runtime).

use crate::helpers::{TestApp, eventually, eventually_counts};
use contracts::messages::{CreatePayment, Message, OrderCreated, exchange};
use lapin::options::BasicGetOptions;
use lapin::types::AMQPValue;
use reqwest::StatusCode;
use serde_json::json;
use std::time::Duration;
use uuid::Uuid;

fn create_payment(id: Uuid, user: Uuid, amount: &str) -> Vec<u8> {
    serde_json::to_vec(&CreatePayment { id, user_id: user, amount: amount.parse().unwrap() }).unwrap()
}

#[tokio::test]
async fn a_create_payment_delivered_twice_charges_once() {
    let app = TestApp::spawn().await;
    let user = app.user_with(100).await;

    let payment = Uuid::new_v4();
    let body = create_payment(payment, user.id, "30");
    let message_id = Uuid::new_v4().to_string();
    // The same message twice (a redelivery), then the same payment again
    // under another message id (a sender that retried).
    for id in [message_id.clone(), message_id, Uuid::new_v4().to_string()] {
        app.publish_raw(exchange::ORDERING, CreatePayment::NAME, Some(&id), CreatePayment::NAME, &body).await;
    }
    let billing = app.db("billing").await;
    eventually(Duration::from_secs(10), || async {
        let handled: i64 = sqlx::query_scalar("SELECT count(*) FROM inbox WHERE queue = 'billing.payments'")
            .fetch_one(&billing)
            .await
            .unwrap();
        (handled == 2 && app.queue_depth("billing.payments").await == 0).then_some(())
    })
    .await;
    assert_eq!(app.balance(&user).await, 70.0);
    let payments = test_support::count(&billing, "SELECT count(*) FROM payments WHERE id = $1", payment).await;
    assert_eq!(payments, 1);
    // Each request for the payment was answered (PaymentCreated twice, same id).
    let answers = test_support::count(
        &billing,
        "SELECT count(*) FROM outbox WHERE message_type = 'PaymentCreated' AND correlation_id = $1",
        payment.to_string(),
    )
    .await;
    assert_eq!(answers, 2);
    app.stop().await;
}

#[tokio::test]
async fn concurrent_payments_and_withdrawals_never_overdraw() {
    let app = TestApp::spawn().await;
    let user = app.user_with(100).await;

    let publishes = futures::future::join_all((0..15).map(|_| {
        let body = create_payment(Uuid::new_v4(), user.id, "10");
        let app = &app;
        async move {
            app.publish_raw(
                exchange::ORDERING,
                CreatePayment::NAME,
                Some(&Uuid::new_v4().to_string()),
                CreatePayment::NAME,
                &body,
            )
            .await
        }
    }));
    let withdrawals =
        futures::future::join_all((0..15).map(|_| app.post(&user, "/billing/account/withdraw", json!({"amount": 10}))));
    let (_, responses) = tokio::join!(publishes, withdrawals);
    let withdrawn = responses.iter().filter(|r| r.status() == StatusCode::NO_CONTENT).count() as i64;
    assert!(
        responses
            .iter()
            .all(|r| r.status() == StatusCode::NO_CONTENT || r.status() == StatusCode::UNPROCESSABLE_ENTITY)
    );

    let billing = app.db("billing").await;
    let charged: i64 = eventually(Duration::from_secs(20), || async {
        let (total, charged): (i64, i64) =
            sqlx::query_as("SELECT count(*), count(*) FILTER (WHERE succeeded) FROM payments")
                .fetch_one(&billing)
                .await
                .unwrap();
        (total == 15).then_some(charged)
    })
    .await;
    assert_eq!(charged + withdrawn, 10, "exactly the balance was spent");
    assert_eq!(app.balance(&user).await, 0.0);
    app.stop().await;
}

#[tokio::test]
async fn poison_messages_are_dead_lettered_and_the_queue_keeps_flowing() {
    let app = TestApp::spawn().await;
    let user = app.user_with(50).await;

    let id = || Some(Uuid::new_v4().to_string());
    app.publish_raw(exchange::ORDERING, CreatePayment::NAME, id().as_deref(), CreatePayment::NAME, b"{ not json").await;
    app.publish_raw(
        exchange::ORDERING,
        CreatePayment::NAME,
        None,
        CreatePayment::NAME,
        &create_payment(Uuid::new_v4(), user.id, "1"),
    )
    .await;
    app.publish_raw(exchange::ORDERING, CreatePayment::NAME, id().as_deref(), "Nonsense", b"{}").await;
    // A good message behind the bad ones is still handled.
    app.publish_raw(
        exchange::ORDERING,
        CreatePayment::NAME,
        id().as_deref(),
        CreatePayment::NAME,
        &create_payment(Uuid::new_v4(), user.id, "20"),
    )
    .await;

    eventually(Duration::from_secs(10), || async { (app.balance(&user).await == 30.0).then_some(()) }).await;
    eventually(Duration::from_secs(10), || async {
        (app.queue_depth("billing.payments.dead").await == 3).then_some(())
    })
    .await;

    let conn = lapin::Connection::connect(&app.vhost.amqp_url, Default::default()).await.unwrap();
    let channel = conn.create_channel().await.unwrap();
    let mut reasons = Vec::new();
    while let Some(m) =
        channel.basic_get("billing.payments.dead".into(), BasicGetOptions { no_ack: true }).await.unwrap()
    {
        let headers = m.delivery.properties.headers().clone().unwrap_or_default();
        match headers.inner().get("x-dead-letter-reason") {
            Some(AMQPValue::LongString(s)) => reasons.push(s.to_string()),
            other => panic!("no reason header: {other:?}"),
        }
    }
    reasons.sort();
    assert_eq!(reasons.len(), 3, "{reasons:?}");
    assert!(reasons[0].starts_with("invalid CreatePayment body"), "{reasons:?}");
    assert_eq!(reasons[1], "missing or invalid message_id");
    assert_eq!(reasons[2], "no handler for message type \"Nonsense\"");
    app.stop().await;
}

#[tokio::test]
async fn an_order_event_that_outruns_the_users_profile_is_mailed_once_the_profile_arrives() {
    let app = TestApp::spawn().await;
    let user = Uuid::new_v4();
    let email = format!("{}@example.com", Uuid::new_v4().simple());
    let event = OrderCreated {
        order_id: Uuid::new_v4(),
        user_id: user,
        price: "42.50".parse().unwrap(),
        occurred_at: chrono::Utc::now(),
    };
    let body = serde_json::to_vec(&event).unwrap();
    app.publish_raw(
        exchange::ORDERING,
        OrderCreated::NAME,
        Some(&Uuid::new_v4().to_string()),
        OrderCreated::NAME,
        &body,
    )
    .await;

    // The notification is stored at once; its e-mail waits for an address.
    let notification = app.db("notification").await;
    eventually_counts(
        Duration::from_secs(10),
        &notification,
        "SELECT count(*) FROM notifications WHERE user_id = $1",
        user,
        1,
    )
    .await;
    let pending = test_support::count(
        &notification,
        "SELECT count(*) FROM email_deliveries WHERE user_id = $1 AND sent_at IS NULL",
        user,
    )
    .await;
    assert_eq!(pending, 1);
    assert!(app.smtp.messages().iter().all(|m| !m.contains("42.50$")));

    let created = contracts::messages::UserCreated {
        id: user,
        email: email.clone(),
        first_name: None,
        last_name: None,
        phone: None,
        version: 1,
    };
    let body = serde_json::to_vec(&created).unwrap();
    app.publish_raw(exchange::IDENTITY, "UserCreated", Some(&Uuid::new_v4().to_string()), "UserCreated", &body).await;
    eventually(Duration::from_secs(10), || async {
        app.smtp
            .messages()
            .into_iter()
            .find(|m| m.contains(&email) && m.contains("Your order for 42.50$ has been successfully processed"))
    })
    .await;
    app.stop().await;
}

/// A user's profile events delivered out of order (a retry, a redelivery, a
/// relay that published late): notification's copy keeps the newest version,
/// and an older event arriving after a newer one changes nothing.
#[tokio::test]
async fn an_older_profile_event_delivered_late_does_not_overwrite_a_newer_copy() {
    let app = TestApp::spawn().await;
    let user = app.user().await;
    let notification = app.db("notification").await;
    let copy = || async {
        sqlx::query_as::<_, (i64, Option<String>)>("SELECT version, first_name FROM profiles WHERE user_id = $1")
            .bind(user.id)
            .fetch_optional(&notification)
            .await
            .unwrap()
    };
    // Identity numbers the versions: registration 1, then one per change.
    for name in ["Ann", "Bea"] {
        let r =
            app.call(Some(&user), reqwest::Method::PUT, "/identity/profile", Some(json!({"firstName": name}))).await;
        assert_eq!(r.status(), StatusCode::OK);
    }
    eventually(Duration::from_secs(20), || async { (copy().await? == (3, Some("Bea".into()))).then_some(()) }).await;

    // Version 2 delivered again, late, then a UserCreated (version 1): both
    // are consumed, and the copy stays at version 3.
    let late = |version: i64, first_name: &str| contracts::messages::UserUpdated {
        id: user.id,
        email: user.email.clone(),
        first_name: Some(first_name.into()),
        last_name: None,
        phone: None,
        version,
    };
    let (updated, created) = (Uuid::new_v4(), Uuid::new_v4());
    let body = serde_json::to_vec(&late(2, "Ann")).unwrap();
    app.publish_raw(exchange::IDENTITY, "UserUpdated", Some(&updated.to_string()), "UserUpdated", &body).await;
    let body = serde_json::to_vec(&late(1, "")).unwrap(); // the same fields as UserCreated
    app.publish_raw(exchange::IDENTITY, "UserCreated", Some(&created.to_string()), "UserCreated", &body).await;
    eventually_counts(
        Duration::from_secs(20),
        &notification,
        "SELECT count(*) FROM inbox WHERE message_id = ANY($1)",
        [updated, created],
        2,
    )
    .await;
    assert_eq!(copy().await, Some((3, Some("Bea".into()))), "the newer copy was overwritten");

    // A newer one applies.
    let body = serde_json::to_vec(&late(4, "Cy")).unwrap();
    app.publish_raw(exchange::IDENTITY, "UserUpdated", Some(&Uuid::new_v4().to_string()), "UserUpdated", &body).await;
    eventually(Duration::from_secs(20), || async { (copy().await? == (4, Some("Cy".into()))).then_some(()) }).await;
    notification.close().await;
    app.stop().await;
}
