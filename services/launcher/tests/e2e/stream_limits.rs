//! Per-user caps on the push service: open streams (429 past the cap), and
//! resumes that would replay more history than allowed (a `reset`, then live).

use crate::helpers::*;
use crate::push::{Replica, next, order_of, publish_orders};
use reqwest::StatusCode;
use serde_json::Value;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(20);

#[tokio::test]
async fn a_user_holds_at_most_the_cap_of_open_streams() {
    let app = TestApp::spawn().await;
    let (alice, bob) = (app.user().await, app.user().await);
    let replica = Replica::start(&app, |c| c.max_streams_per_user = 2).await;
    let http = reqwest::Client::new();
    let open = |user: &User| {
        http.get(format!("{}/api/v1/orders", replica.url)).header(ASSERTION, replica.assertion(user)).send()
    };
    // (A response, not its events: dropping it closes the connection.)
    let first = open(&alice).await.unwrap();
    assert_eq!(first.status(), StatusCode::OK);
    let _second = replica.subscribe(&alice, None).await;

    let r = open(&alice).await.unwrap();
    let retry: u64 = r.headers()["retry-after"].to_str().unwrap().parse().expect("Retry-After in seconds");
    assert!(retry >= 1);
    assert_error(r, StatusCode::TOO_MANY_REQUESTS, "too many open event streams").await;
    // Another user is not affected.
    let _bob = replica.subscribe(&bob, None).await;

    // Closing one frees its place.
    drop(first);
    eventually(WAIT, || async { (open(&alice).await.ok()?.status() == StatusCode::OK).then_some(()) }).await;
    replica.stop().await;
    app.stop().await;
}

#[tokio::test]
async fn a_resume_from_further_back_than_the_replay_bound_gets_a_reset_and_continues_live() {
    let app = TestApp::spawn().await;
    let (alice, bob) = (app.user().await, app.user().await);
    let replica = Replica::start(&app, |c| c.max_replay_entries = 5).await;
    let mut stream = replica.subscribe(&alice, None).await;
    let first = publish_orders(&app, alice.id, 1).await;
    let seen = next(&mut stream).await;
    assert_eq!(order_of(&seen), first[0]);
    drop(stream);

    // Ten entries later, alice's one missed event is beyond the bound.
    publish_orders(&app, bob.id, 10).await;
    let missed = publish_orders(&app, alice.id, 1).await;
    eventually(WAIT, || async {
        let position = replica.stats().await["position"].as_u64()?;
        (position >= seen.id().parse::<u64>().unwrap() + 11).then_some(())
    })
    .await;
    let mut stream = replica.subscribe(&alice, Some(seen.id())).await;
    let reset = next(&mut stream).await;
    assert_eq!(reset.event, push_service::RESET, "{reset:?}");
    let data: Value = serde_json::from_str(&reset.data).unwrap();
    assert!(data["reason"].as_str().unwrap().contains("too far back"), "{data}");
    assert_eq!(data["lastEventId"].as_u64(), seen.id().parse().ok());
    assert!(reset.id().parse::<u64>().unwrap() > seen.id().parse::<u64>().unwrap());
    // Then live.
    let live = publish_orders(&app, alice.id, 1).await;
    let e = next(&mut stream).await;
    assert_eq!(order_of(&e), live[0], "not the missed {}", missed[0]);

    // Within the bound, the missed events are replayed as before.
    let mut stream = replica.subscribe(&alice, Some(&(e.id().parse::<u64>().unwrap() - 1).to_string())).await;
    assert_eq!(order_of(&next(&mut stream).await), live[0]);
    replica.stop().await;
    app.stop().await;
}
