//! The seed's own scenario, through the gateway over HTTP.

use crate::helpers::{TestApp, eventually};
use reqwest::StatusCode;
use serde_json::{Value, json};
use std::time::Duration;

#[tokio::test]
async fn register_deposit_order_succeed_then_fail() {
    let app = TestApp::spawn().await;
    let user = app.user().await;
    let mut events = app.subscribe(&user).await;

    assert_eq!(app.balance(&user).await, 0.0);
    app.deposit(&user, 1000).await;
    assert_eq!(app.balance(&user).await, 1000.0);

    // Order 600: accepted at once, pending, then succeeded.
    let r = app.post(&user, "/ordering/orders", json!({"price": 600})).await;
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let location = r.headers()["location"].to_str().unwrap().to_string();
    let order: Value = r.json().await.unwrap();
    assert_eq!(order["status"], "pending");
    assert_eq!(order["price"], 600);
    let id = order["id"].as_str().unwrap().to_string();
    assert_eq!(location, format!("/api/v1/ordering/orders/{id}"));
    let settled = app.settled_order(&user, &id).await;
    assert_eq!(settled["status"], "succeeded");
    assert_eq!(app.balance(&user).await, 400.0);

    let success = "Your order for 600.00$ has been successfully processed";
    eventually(Duration::from_secs(10), || async {
        let list: Vec<Value> = app.get(&user, "/notifications").await;
        list.iter().any(|n| n["message"] == success).then_some(())
    })
    .await;
    eventually(Duration::from_secs(10), || async {
        app.smtp
            .messages()
            .into_iter()
            .find(|m| m.contains(&user.email) && m.contains("600.00$") && m.contains("successfully processed"))
    })
    .await;

    // Order 500: not enough money left, so it fails and nothing is charged.
    let failed_id = app.place_order(&user, 500).await;
    let settled = app.settled_order(&user, &failed_id).await;
    assert_eq!(settled["status"], "failed");
    assert_eq!(settled["reason"], "not enough money");
    assert_eq!(app.balance(&user).await, 400.0);

    let failure = "Your order for 500.00$ was not fulfilled due to: not enough money";
    let notifications: Vec<Value> = eventually(Duration::from_secs(10), || async {
        let list: Vec<Value> = app.get(&user, "/notifications").await;
        list.iter().any(|n| n["message"] == failure).then_some(list)
    })
    .await;
    assert_eq!(notifications[0]["message"], failure, "newest first");
    eventually(Duration::from_secs(10), || async {
        app.smtp
            .messages()
            .into_iter()
            .find(|m| m.contains(&user.email) && m.contains("500.00$") && m.contains("not enough money"))
    })
    .await;

    // Orders, newest first.
    let orders: Vec<Value> = app.get(&user, "/ordering/orders").await;
    assert_eq!(orders.len(), 2);
    assert_eq!(orders[0]["id"], failed_id.as_str());
    assert_eq!(orders[1]["id"], id.as_str());

    // The SSE client saw both outcomes, each with an id and a type.
    let first = tokio::time::timeout(Duration::from_secs(10), events.recv()).await.unwrap().unwrap();
    let second = tokio::time::timeout(Duration::from_secs(10), events.recv()).await.unwrap().unwrap();
    assert_eq!(first.event, "OrderCreated");
    assert_eq!(second.event, "OrderFailed");
    assert!(!first.id().is_empty() && first.id != second.id);
    let data: Value = serde_json::from_str(&first.data).unwrap();
    assert_eq!(data["orderId"], id.as_str());
    assert_eq!(data["status"], "succeeded");
    assert_eq!(data["price"], 600);
    let data: Value = serde_json::from_str(&second.data).unwrap();
    assert_eq!(data["orderId"], failed_id.as_str());
    assert_eq!(data["reason"], "not enough money");

    // What happened shows in the metrics.
    let metrics = app.http.get(format!("{}/metrics", app.gateway)).send().await.unwrap().text().await.unwrap();
    for series in [
        r#"http_server_request_duration_seconds_bucket{service="ordering",method="POST",route="/api/v1/orders",status="202""#,
        r#"messages_consumed_total{queue="billing.payments",type="CreatePayment",outcome="handled"}"#,
        r#"messages_published_total{exchange="ordering",type="OrderCreated"}"#,
        "outbox_backlog_messages{",
        "outbox_oldest_unsent_age_seconds{",
        "emails_sent_total",
        "sse_connections_open ",
    ] {
        assert!(metrics.contains(series), "missing {series} in\n{metrics}");
    }

    app.stop().await;
}

#[tokio::test]
async fn an_orders_e_mail_goes_over_implicit_tls_when_the_smtp_url_is_smtps() {
    let app = TestApp::spawn_over_smtps().await;
    let user = app.user_with(100).await;
    app.place_order(&user, 42).await;
    // The sink speaks only TLS: a message in its Maildir came over TLS.
    eventually(Duration::from_secs(15), || async {
        app.smtp
            .messages()
            .into_iter()
            .find(|m| m.contains(&user.email) && m.contains("42.00$") && m.contains("successfully processed"))
    })
    .await;
}

#[tokio::test]
async fn an_event_stream_carries_only_its_own_users_events() {
    let app = TestApp::spawn().await;
    let alice = app.user().await;
    let bob = app.user().await;
    let mut alice_events = app.subscribe(&alice).await;
    let mut bob_events = app.subscribe(&bob).await;

    let bob_order = app.place_order(&bob, 5).await;
    let e = tokio::time::timeout(Duration::from_secs(10), bob_events.recv()).await.unwrap().unwrap();
    assert_eq!(e.event, "OrderFailed");
    assert!(e.data.contains(&bob_order));

    app.deposit(&alice, 10).await;
    let alice_order = app.place_order(&alice, 5).await;
    let e = tokio::time::timeout(Duration::from_secs(10), alice_events.recv()).await.unwrap().unwrap();
    assert_eq!(e.event, "OrderCreated");
    assert!(e.data.contains(&alice_order), "alice's first event is her own order, not bob's");
    assert!(bob_events.try_recv().is_err(), "bob saw nothing of alice's");

    // No token, no stream.
    let r = app.http.get(app.url("/push/orders")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    app.stop().await;
}

/// One order's trace runs from the gateway through ordering, the outbox and
/// the broker to billing, back to ordering, and on to notification and push.
#[tokio::test]
async fn an_orders_trace_follows_it_through_every_service() {
    let app = TestApp::spawn().await;
    let spans = runtime::telemetry::init_for_tests();
    let user = app.user_with(10).await;

    let trace_id = format!("{:032x}", uuid::Uuid::new_v4().as_u128());
    let traceparent = format!("00-{trace_id}-{:016x}-01", rand_span_id());
    let r = app
        .http
        .post(app.url("/ordering/orders"))
        .bearer_auth(&user.token)
        .header("traceparent", &traceparent)
        .json(&json!({"price": 5}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let id = r.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_string();
    app.settled_order(&user, &id).await;

    // The consumers' spans of this trace, by queue.
    let queues = |spans: &opentelemetry_sdk::trace::InMemorySpanExporter| -> Vec<String> {
        spans
            .get_finished_spans()
            .unwrap()
            .into_iter()
            .filter(|s| format!("{:032x}", s.span_context.trace_id()) == trace_id && s.name == "message")
            .filter_map(|s| s.attributes.iter().find(|kv| kv.key.as_str() == "queue").map(|kv| kv.value.to_string()))
            .collect()
    };
    let seen = eventually(Duration::from_secs(10), || async {
        let q = queues(spans);
        (q.iter().any(|q| q == "billing.payments") && q.iter().any(|q| q == "notification.ordering")).then_some(q)
    })
    .await;
    assert!(seen.iter().any(|q| q == "ordering.billing"), "{seen:?}");
    app.stop().await;
}

fn rand_span_id() -> u64 {
    (uuid::Uuid::new_v4().as_u128() as u64) | 1
}
