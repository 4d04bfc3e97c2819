//! Gauges read from the databases: stuck orders and an outbox the relay has
//! not sent show in `/metrics` with their count and age, the series the
//! alert rules (k8s/monitoring) are written against.

use crate::helpers::{TestApp, eventually};
use std::time::Duration;
use uuid::Uuid;

/// The value of `name{database="..."}` in a Prometheus text exposition.
fn gauge(text: &str, name: &str, database: &str) -> Option<f64> {
    let series = format!("{name}{{database=\"{database}\"}} ");
    text.lines().find_map(|l| l.strip_prefix(&series)).and_then(|v| v.trim().parse().ok())
}

async fn scrape(app: &TestApp) -> String {
    app.http.get(format!("{}/metrics", app.gateway)).send().await.unwrap().text().await.unwrap()
}

#[tokio::test]
async fn a_stuck_pending_order_shows_in_the_pending_gauges_until_it_settles() {
    // Ordering's sweeper would settle the orders left pending below.
    let app = TestApp::spawn_with(crate::helpers::sweeper_off).await;
    let database = format!("{}_ordering", app.prefix);
    let db = app.db("ordering").await;

    // Nothing pending: count 0, age 0.
    eventually(Duration::from_secs(10), || async {
        let text = scrape(&app).await;
        (gauge(&text, "orders_pending", &database)? == 0.0
            && gauge(&text, "orders_pending_oldest_age_seconds", &database)? == 0.0)
            .then_some(())
    })
    .await;

    // Two orders whose payment never came back, the older placed 90 s ago.
    let user = Uuid::new_v4();
    let (old, new) = (Uuid::new_v4(), Uuid::new_v4());
    for (id, age) in [(old, 90), (new, 5)] {
        sqlx::query(
            "INSERT INTO orders (id, user_id, price, created_at, updated_at)
             VALUES ($1, $2, 10, now() - make_interval(secs => $3), now())",
        )
        .bind(id)
        .bind(user)
        .bind(f64::from(age))
        .execute(&db)
        .await
        .unwrap();
    }
    let age = eventually(Duration::from_secs(10), || async {
        let text = scrape(&app).await;
        (gauge(&text, "orders_pending", &database)? == 2.0)
            .then(|| gauge(&text, "orders_pending_oldest_age_seconds", &database))
            .flatten()
    })
    .await;
    assert!((90.0..150.0).contains(&age), "oldest pending age {age}");

    // The older one settles: the age is the younger one's.
    sqlx::query("UPDATE orders SET status = 'failed', reason = 'test' WHERE id = $1")
        .bind(old)
        .execute(&db)
        .await
        .unwrap();
    let age = eventually(Duration::from_secs(10), || async {
        let text = scrape(&app).await;
        (gauge(&text, "orders_pending", &database)? == 1.0)
            .then(|| gauge(&text, "orders_pending_oldest_age_seconds", &database))
            .flatten()
    })
    .await;
    assert!((5.0..60.0).contains(&age), "oldest pending age {age}");

    db.close().await;
    app.stop().await;
}

#[tokio::test]
async fn an_unsent_outbox_message_shows_its_age_while_the_relay_cannot_send_it() {
    let app = TestApp::spawn().await;
    let database = format!("{}_billing", app.prefix);
    let db = app.db("billing").await;

    // A message written 60 s ago that the relay may not send yet (as after
    // failed publishes): the relay has nothing to do, the gauges still count it.
    sqlx::query(
        "INSERT INTO outbox (message_id, exchange, routing_key, message_type, payload, created_at, next_attempt_at)
         VALUES ($1, 'billing', 'PaymentCreated', 'PaymentCreated', '{}', now() - interval '60 seconds',
                 now() + interval '1 hour')",
    )
    .bind(Uuid::new_v4())
    .execute(&db)
    .await
    .unwrap();
    let age = eventually(Duration::from_secs(10), || async {
        let text = scrape(&app).await;
        (gauge(&text, "outbox_backlog_messages", &database)? == 1.0)
            .then(|| gauge(&text, "outbox_oldest_unsent_age_seconds", &database))
            .flatten()
    })
    .await;
    assert!((60.0..120.0).contains(&age), "oldest unsent age {age}");

    // The age grows with time, not with the relay's activity.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let later = eventually(Duration::from_secs(10), || async {
        let text = scrape(&app).await;
        gauge(&text, "outbox_oldest_unsent_age_seconds", &database).filter(|a| *a > age)
    })
    .await;
    assert!(later > age);

    sqlx::query("DELETE FROM outbox WHERE sent_at IS NULL").execute(&db).await.unwrap();
    db.close().await;
    app.stop().await;
}

/// A gauge without labels.
fn plain_gauge(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(&format!("{name} "))).and_then(|v| v.trim().parse().ok())
}

#[tokio::test]
async fn the_gateway_counts_the_event_streams_it_carries() {
    let app = TestApp::spawn().await;
    let user = app.user().await;
    let open = || async { plain_gauge(&scrape(&app).await, "gateway_streams_open").unwrap_or(0.0) };
    let before = open().await;

    let streams = [
        app.http.get(app.url("/push/orders")).bearer_auth(&user.token).send().await.unwrap(),
        app.http.get(app.url("/push/orders")).bearer_auth(&user.token).send().await.unwrap(),
    ];
    assert!(streams.iter().all(|s| s.status().is_success()));
    let during = eventually(Duration::from_secs(10), || async {
        let now = open().await;
        (now >= before + 2.0).then_some(now)
    })
    .await;

    // The client goes away: the gateway no longer counts those streams.
    drop(streams);
    eventually(Duration::from_secs(10), || async { (open().await <= during - 2.0).then_some(()) }).await;

    app.stop().await;
}

#[tokio::test]
async fn settled_orders_record_how_long_they_waited() {
    let app = TestApp::spawn().await;
    let user = app.user().await;
    let r = app.post(&user, "/ordering/orders", serde_json::json!({"price": 5})).await;
    let order: serde_json::Value = r.json().await.unwrap();
    let settled = app.settled_order(&user, order["id"].as_str().unwrap()).await;
    assert_eq!(settled["status"], "failed"); // no money
    eventually(Duration::from_secs(10), || async {
        let text = scrape(&app).await;
        text.lines()
            .any(|l| {
                l.starts_with(r#"order_settlement_duration_seconds_count{status="failed"} "#) && !l.ends_with(" 0")
            })
            .then_some(())
    })
    .await;
    // Buckets reach the retry delays, not only request latencies.
    assert!(scrape(&app).await.contains(r#"order_settlement_duration_seconds_bucket{status="failed",le="300"}"#));
    app.stop().await;
}
