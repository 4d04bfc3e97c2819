//! A user's notifications on their event stream: the notification service
//! announces each one (`NotificationCreated`, from its outbox in the
//! notification's transaction) and the push service streams it to the pages
//! that asked (`?notifications=true`), exactly once, and again after a
//! resume from `Last-Event-ID` if it was missed.

use crate::helpers::{SseEvent, TestApp, User, sse_events};
use serde_json::Value;
use std::time::Duration;
use tokio::sync::mpsc::UnboundedReceiver;

const WAIT: Duration = Duration::from_secs(20);

async fn stream(
    app: &TestApp,
    user: &User,
    notifications: bool,
    last_event_id: Option<&str>,
) -> UnboundedReceiver<SseEvent> {
    let path = if notifications { "/push/orders?notifications=true" } else { "/push/orders" };
    let mut req = app.http.get(app.url(path)).bearer_auth(&user.token);
    if let Some(id) = last_event_id {
        req = req.header("last-event-id", id);
    }
    sse_events(req.send().await.unwrap())
}

/// Events until the `NotificationCreated` of `order_id` (inclusive).
async fn until_notified(rx: &mut UnboundedReceiver<SseEvent>, order_id: &str) -> Vec<SseEvent> {
    let mut seen = Vec::new();
    loop {
        let e = tokio::time::timeout(WAIT, rx.recv()).await.expect("an event in time").expect("stream open");
        let data: Value = serde_json::from_str(&e.data).unwrap();
        let done = e.event == "NotificationCreated" && data["orderId"] == order_id;
        seen.push(e);
        if done {
            return seen;
        }
    }
}

fn data(e: &SseEvent) -> Value {
    serde_json::from_str(&e.data).unwrap()
}

#[tokio::test]
async fn a_notification_reaches_the_stream_once_and_again_after_a_resume() {
    let app = TestApp::spawn().await;
    let user = app.user_with(100).await;
    let mut live = stream(&app, &user, true, None).await;
    let mut orders_only = stream(&app, &user, false, None).await;

    // The order's outcome, then its notification, with the list's id and words.
    let first = app.place_order(&user, 60).await;
    let events = until_notified(&mut live, &first).await;
    let kinds: Vec<&str> = events.iter().map(|e| e.event.as_str()).collect();
    assert_eq!(kinds, ["OrderCreated", "NotificationCreated"], "{events:?}");
    let notified = data(&events[1]);
    let listed: Vec<Value> = app.get(&user, "/notifications").await;
    assert_eq!(listed.len(), 1);
    assert_eq!(notified["id"], listed[0]["id"]);
    assert_eq!(notified["message"], listed[0]["message"]);
    assert_eq!(notified["message"], "Your order for 60.00$ has been successfully processed");
    let first_id: u64 = events[1].id().parse().expect("a numeric id");
    assert!(first_id > events[0].id().parse::<u64>().unwrap(), "ids increase");

    // A second order: by the time its notification arrives, the first one
    // has not come again.
    let second = app.place_order(&user, 100).await;
    let events = until_notified(&mut live, &second).await;
    let kinds: Vec<&str> = events.iter().map(|e| e.event.as_str()).collect();
    assert_eq!(kinds, ["OrderFailed", "NotificationCreated"], "each event once: {events:?}");
    assert_eq!(data(&events[1])["message"], "Your order for 100.00$ was not fulfilled due to: not enough money");
    let last_seen = events[1].id().to_string();

    // A stream that did not ask for notifications has only the outcomes.
    for expected in ["OrderCreated", "OrderFailed"] {
        let e = tokio::time::timeout(WAIT, orders_only.recv()).await.unwrap().unwrap();
        assert_eq!(e.event, expected, "{e:?}");
    }

    // Away while a third order settles: the resume brings exactly what was missed.
    drop(live);
    let third = app.place_order(&user, 30).await;
    let listed = crate::helpers::eventually(WAIT, || async {
        let list: Vec<Value> = app.get(&user, "/notifications").await;
        (list.len() == 3).then_some(list)
    })
    .await;
    let mut resumed = stream(&app, &user, true, Some(&last_seen)).await;
    let events = until_notified(&mut resumed, &third).await;
    let kinds: Vec<&str> = events.iter().map(|e| e.event.as_str()).collect();
    assert_eq!(kinds, ["OrderCreated", "NotificationCreated"], "only the missed ones: {events:?}");
    assert_eq!(data(&events[0])["orderId"], third.as_str());
    assert_eq!(data(&events[1])["id"], listed[0]["id"], "the newest listed");
    assert!(events[0].id().parse::<u64>().unwrap() > last_seen.parse::<u64>().unwrap());

    // Nothing more: the next event is a later order's, not a repeat.
    let fourth = app.place_order(&user, 5).await;
    let events = until_notified(&mut resumed, &fourth).await;
    let kinds: Vec<&str> = events.iter().map(|e| e.event.as_str()).collect();
    assert_eq!(kinds, ["OrderCreated", "NotificationCreated"], "{events:?}");
    assert_eq!(data(&events[0])["orderId"], fourth.as_str());
    app.stop().await;
}
