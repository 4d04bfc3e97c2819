//! The push service: resumable event streams (Last-Event-ID, `lastEventId`),
//! on another replica and after a restart, the `reset` event for an expired
//! id, tokens never from the URL, and HTTP/2 (TLS with ALPN h2, and h2c).

use crate::helpers::{
    ASSERTION, SseEvent, TestApp, User, as_current, broker_connections, close_broker_connections, eventually,
    sse_events,
};
use futures::StreamExt;
use reqwest::{StatusCode, Version};
use serde_json::{Value, json};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(20);

/// A push-service replica of its own (beside the one behind the gateway).
pub(crate) struct Replica {
    pub url: String,
    pub https: String,
    pub shutdown: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
    /// The gateway's key, which this replica verifies assertions with.
    signer: runtime::auth::AssertionSigner,
}

impl Replica {
    pub async fn start(app: &TestApp, tweak: impl FnOnce(&mut push_service::Config)) -> Replica {
        let mut config = push_service::Config {
            // Its HTTPS port faces browsers: it checks their tokens with identity.
            identity_url: Some(app.identity.clone()),
            ..app.config.push(&app.wiring)
        };
        tweak(&mut config);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let tls = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let https = format!("https://{}", tls.local_addr().unwrap());
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(push_service::run_with_tls(config, listener, Some(tls), shutdown.clone()));
        Replica { url, https, shutdown, task, signer: app.signer().clone() }
    }

    /// What the gateway would send this replica to say that `user` calls.
    pub fn assertion(&self, user: &User) -> String {
        self.signer.sign("push", &reqwest::Method::GET, "/api/v1/orders", &as_current(user))
    }

    /// The user's stream on this replica, as the gateway would ask for it.
    pub async fn subscribe(&self, user: &User, last_event_id: Option<&str>) -> mpsc::UnboundedReceiver<SseEvent> {
        let mut req =
            reqwest::Client::new().get(format!("{}/api/v1/orders", self.url)).header(ASSERTION, self.assertion(user));
        if let Some(id) = last_event_id {
            req = req.header("last-event-id", id);
        }
        sse_events(req.send().await.unwrap())
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(10), self.task).await;
    }
}

pub(crate) async fn next(rx: &mut mpsc::UnboundedReceiver<SseEvent>) -> SseEvent {
    tokio::time::timeout(WAIT, rx.recv()).await.expect("an event in time").expect("stream open")
}

pub(crate) fn order_of(e: &SseEvent) -> String {
    let data: Value = serde_json::from_str(&e.data).unwrap();
    data["orderId"].as_str().unwrap().to_string()
}

/// Places an order and waits until it is settled; returns its id.
pub(crate) async fn settled_order(app: &TestApp, user: &User, price: u32) -> String {
    let id = app.place_order(user, price).await;
    app.settled_order(user, &id).await;
    id
}

pub(crate) async fn gateway_stream(
    app: &TestApp,
    user: &User,
    last_event_id: Option<&str>,
) -> mpsc::UnboundedReceiver<SseEvent> {
    let mut req = app.http.get(app.url("/push/orders")).bearer_auth(&user.token);
    if let Some(id) = last_event_id {
        req = req.header("last-event-id", id);
    }
    sse_events(req.send().await.unwrap())
}

/// Asserts that the next events are exactly those of `orders`, in order,
/// with increasing ids; returns the last id.
pub(crate) async fn expect_orders(rx: &mut mpsc::UnboundedReceiver<SseEvent>, orders: &[&str], after: &str) -> String {
    let mut last: u64 = after.parse().unwrap();
    for order in orders {
        let e = next(rx).await;
        assert_eq!(order_of(&e), *order, "{e:?}");
        let id: u64 = e.id().parse().expect("numeric id");
        assert!(id > last, "ids increase: {id} after {last}");
        last = id;
    }
    last.to_string()
}

/// A stream through the gateway that has seen one event: that of an order
/// of `price`, placed and settled after the stream opened.
pub(crate) async fn stream_with_one_event(
    app: &TestApp,
    user: &User,
    price: u32,
) -> (mpsc::UnboundedReceiver<SseEvent>, SseEvent, String) {
    let mut stream = gateway_stream(app, user, None).await;
    let order = settled_order(app, user, price).await;
    let e = next(&mut stream).await;
    assert_eq!(order_of(&e), order, "{e:?}");
    (stream, e, order)
}

#[tokio::test]
async fn a_reconnect_with_last_event_id_gets_exactly_the_missed_events() {
    let app = TestApp::spawn().await;
    let user = app.user_with(100).await;

    let (stream, e, _) = stream_with_one_event(&app, &user, 10).await;
    assert_eq!(e.event, "OrderCreated");
    drop(stream);

    // Missed while away: one that fails, one that succeeds.
    let missed_fail = settled_order(&app, &user, 1000).await;
    let missed_ok = settled_order(&app, &user, 20).await;

    let mut stream = gateway_stream(&app, &user, Some(e.id())).await;
    let last = expect_orders(&mut stream, &[&missed_fail, &missed_ok], e.id()).await;
    // Then live, with nothing replayed twice.
    let live = settled_order(&app, &user, 30).await;
    expect_orders(&mut stream, &[&live], &last).await;
    app.stop().await;
}

#[tokio::test]
async fn a_first_connection_resumes_from_the_last_event_id_query_parameter() {
    let app = TestApp::spawn().await;
    let user = app.user().await;
    let (stream, e, _) = stream_with_one_event(&app, &user, 10).await; // fails: no money
    assert_eq!(e.event, "OrderFailed");
    drop(stream);
    let missed = settled_order(&app, &user, 11).await;

    let resp = app.http.get(app.url(&format!("/push/orders?lastEventId={}", e.id()))).bearer_auth(&user.token);
    let mut stream = sse_events(resp.send().await.unwrap());
    expect_orders(&mut stream, &[&missed], e.id()).await;
    app.stop().await;
}

/// A stream that drops before its first event still has a resume point: its
/// first frame carries the position as an `id:` (a frame with an id and no
/// data sets a browser's last event id without firing an event), so the
/// events that happen while it is away are replayed on the reconnect.
#[tokio::test]
async fn a_stream_dropped_before_its_first_event_misses_nothing() {
    let app = TestApp::spawn().await;
    let user = app.user().await;
    let resp = app.http.get(app.url("/push/orders")).bearer_auth(&user.token).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.bytes_stream();
    let mut parser = test_support::sse::Parser::default();
    let id = loop {
        let chunk = tokio::time::timeout(WAIT, body.next()).await.expect("data in time").unwrap().unwrap();
        assert_eq!(parser.push(&chunk), vec![], "no event yet");
        if let Some(id) = parser.last_event_id() {
            break id.to_string();
        }
    };
    drop(body);

    let missed = settled_order(&app, &user, 10).await; // fails: no money
    let mut stream = gateway_stream(&app, &user, Some(&id)).await;
    expect_orders(&mut stream, &[&missed], &id).await;
    app.stop().await;
}

/// The broker closing the push service's connection (a restart, a failover,
/// an operator) does not leave the replica deaf: its reader reconnects from
/// the offset after the last one it delivered, and open streams go on.
#[tokio::test]
async fn streams_go_on_after_the_broker_closes_the_push_services_connection() {
    let app = TestApp::spawn().await;
    let user = app.user().await;
    let (mut stream, e, _) = stream_with_one_event(&app, &user, 10).await; // fails: no money

    // Closed while the reader is busy: a burst of another user's events has
    // begun to reach that user's stream.
    let push = broker_connections(&app.vhost.name, "push").await;
    let bob = app.user().await;
    let mut bobs = gateway_stream(&app, &bob, None).await;
    let burst = publish_orders(&app, bob.id, 3000);
    let close = async {
        next(&mut bobs).await;
        close_broker_connections(&push).await;
    };
    tokio::join!(burst, close);
    let after = settled_order(&app, &user, 11).await;
    expect_orders(&mut stream, &[&after], e.id()).await;
    app.stop().await;
}

#[tokio::test]
async fn any_replica_resumes_any_id_and_a_restarted_one_too() {
    let app = TestApp::spawn().await;
    let alice = app.user().await;
    let bob = app.user().await;
    app.deposit(&alice, 100).await;

    // Alice's first event arrives through the gateway's replica.
    let (stream, e, _) = stream_with_one_event(&app, &alice, 10).await;
    drop(stream);

    // A second replica, started after the events it is asked for, keeping
    // none in memory: it reads them from the stream.
    let missed = settled_order(&app, &alice, 20).await;
    settled_order(&app, &bob, 5).await; // bob's: never on alice's stream
    let replica = Replica::start(&app, |c| c.recent_events = 0).await;
    let mut stream = replica.subscribe(&alice, Some(e.id())).await;
    let last = expect_orders(&mut stream, &[&missed], e.id()).await;
    assert_eq!(replica.stats().await["replaysFromStream"], 1);
    let live = settled_order(&app, &alice, 30).await;
    let last = expect_orders(&mut stream, &[&live], &last).await;
    drop(stream);

    // The replica stops; an order settles while it is down; it starts again
    // (with the default memory) and serves the resume from the history it
    // read at start, without reading the stream.
    replica.stop().await;
    let while_down = settled_order(&app, &alice, 1000).await;
    let replica = Replica::start(&app, |_| {}).await;
    let mut stream = replica.subscribe(&alice, Some(&last)).await;
    let last = expect_orders(&mut stream, &[&while_down], &last).await;
    let stats = replica.stats().await;
    assert_eq!((stats["replaysFromMemory"].as_u64(), stats["replaysFromStream"].as_u64()), (Some(1), Some(0)));
    settled_order(&app, &bob, 6).await;
    let after = settled_order(&app, &alice, 40).await;
    expect_orders(&mut stream, &[&after], &last).await;
    replica.stop().await;
    app.stop().await;
}

#[tokio::test]
async fn an_expired_or_unknown_id_gets_a_reset_event() {
    let app = TestApp::spawn().await;
    let user = app.user().await;
    let other = app.user().await;
    // A replica on its own stream that keeps one second, in tiny segments
    // (retention drops whole segments).
    let replica = Replica::start(&app, |c| {
        c.common.messaging.push_stream = runtime::messaging::push_stream::PushStream {
            name: "push.short".into(),
            max_age: "1s".into(),
            segment_bytes: Some(2000),
        };
        // The loop below opens a stream a round faster than the replica
        // notices the dropped ones (at its next heartbeat): not the cap's test.
        c.max_streams_per_user = 1000;
    })
    .await;
    let mut stream = replica.subscribe(&user, None).await;
    let old = settled_order(&app, &user, 10).await;
    let e = next(&mut stream).await;
    assert_eq!(order_of(&e), old);
    drop(stream);
    let before: u64 = e.id().parse::<u64>().unwrap() - 1;

    // Other users' orders fill new segments until the old ones are dropped;
    // then resuming from before the old event says the history is gone.
    let reset = eventually(Duration::from_secs(60), || async {
        settled_order(&app, &other, 1).await;
        let mut stream = replica.subscribe(&user, Some(&before.to_string())).await;
        let e = next(&mut stream).await;
        (e.event == "reset").then_some(e)
    })
    .await;
    let id: u64 = reset.id().parse().unwrap();
    assert!(id > before, "the reset moves the id past the gap");
    let data: Value = serde_json::from_str(&reset.data).unwrap();
    assert_eq!(data["lastEventId"], before);

    // An id this service never issued: reset too.
    let mut stream = replica.subscribe(&user, Some("not-an-offset")).await;
    assert_eq!(next(&mut stream).await.event, "reset");
    replica.stop().await;
    app.stop().await;
}

#[tokio::test]
async fn the_token_comes_from_a_header_or_the_cookie_never_from_the_url() {
    let app = TestApp::spawn().await;
    let user = app.user().await;
    for query in ["accessToken", "access_token", "token"] {
        let r = app.http.get(app.url(&format!("/push/orders?{query}={}", user.token))).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "?{query}=");
    }
    let r = app.http.get(app.url("/push/orders")).bearer_auth("not.a.token").send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let r = app
        .http
        .get(app.url("/push/orders"))
        .header("cookie", format!("accessToken={}", user.token))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    app.stop().await;
}

/// A client of HTTPS ports with the test certificate (HTTP/2 by ALPN).
pub(crate) fn h2_client() -> reqwest::Client {
    reqwest::Client::builder().use_rustls_tls().danger_accept_invalid_certs(true).build().unwrap()
}

#[tokio::test]
async fn http2_over_tls_and_h2c_carry_the_stream() {
    let app = TestApp::spawn().await;
    let user = app.user().await;
    let tls = h2_client();

    // The gateway over TLS: ALPN h2, the page and the stream on one connection.
    let page = tls.get(format!("{}/", app.gateway_https)).send().await.unwrap();
    assert_eq!(page.version(), Version::HTTP_2);
    assert!(page.text().await.unwrap().contains("<title>Orders</title>"));
    let resp =
        tls.get(format!("{}/api/v1/push/orders", app.gateway_https)).bearer_auth(&user.token).send().await.unwrap();
    assert_eq!(resp.version(), Version::HTTP_2);
    let mut stream = sse_events(resp);
    let order = tls
        .post(format!("{}/api/v1/ordering/orders", app.gateway_https))
        .bearer_auth(&user.token)
        .json(&json!({"price": 3}))
        .send()
        .await
        .unwrap();
    assert_eq!((order.version(), order.status()), (Version::HTTP_2, StatusCode::ACCEPTED));
    let id = order.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_string();
    assert_eq!(order_of(&next(&mut stream).await), id);

    // The push service itself: TLS with h2, and h2c (prior knowledge) in clear.
    let replica = Replica::start(&app, |_| {}).await;
    // (Its HTTPS port checks the token itself, once it has identity's keys.)
    let resp = eventually(WAIT, || async {
        let r = tls.get(format!("{}/api/v1/orders", replica.https)).bearer_auth(&user.token).send().await.ok()?;
        (r.status() != StatusCode::SERVICE_UNAVAILABLE).then_some(r)
    })
    .await;
    assert_eq!((resp.version(), resp.status()), (Version::HTTP_2, StatusCode::OK));
    let h2c = reqwest::Client::builder().http2_prior_knowledge().build().unwrap();
    let resp = h2c.get(format!("{}/api/v1/orders", replica.url)).header(ASSERTION, replica.assertion(&user));
    let resp = resp.send().await.unwrap();
    assert_eq!((resp.version(), resp.status()), (Version::HTTP_2, StatusCode::OK));
    let plain = reqwest::get(format!("{}/health/live", replica.url)).await.unwrap();
    assert_eq!(plain.version(), Version::HTTP_11);
    let h2c_gateway = h2c.get(format!("{}/health/live", app.gateway)).send().await.unwrap();
    assert_eq!(h2c_gateway.version(), Version::HTTP_2);
    replica.stop().await;
    app.stop().await;
}

/// Established TCP connections on this machine whose far end is 127.0.0.1:`port`
/// (a client's connections to that listener), from the kernel's table.
fn connections_to(port: u16) -> i64 {
    let table = std::fs::read_to_string("/proc/net/tcp").expect("/proc/net/tcp");
    table
        .lines()
        .skip(1)
        .filter(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // `rem_address` is `0100007F:1F95` (127.0.0.1:8085); state 01 is ESTABLISHED.
            let remote = fields.get(2).and_then(|r| r.split_once(':'));
            fields.get(3) == Some(&"01")
                && remote.is_some_and(|(ip, p)| ip == "0100007F" && u16::from_str_radix(p, 16) == Ok(port))
        })
        .count() as i64
}

/// Opens `n` event streams through `gateway`, spread over `users` (each
/// below the per-user cap), and keeps them open.
async fn open_streams(
    app: &TestApp,
    gateway: &str,
    users: &[User],
    n: usize,
) -> Vec<mpsc::UnboundedReceiver<SseEvent>> {
    let mut streams = Vec::with_capacity(n);
    for i in 0..n {
        let user = &users[i % users.len()];
        let resp = app.http.get(format!("{gateway}/api/v1/push/orders")).bearer_auth(&user.token).send().await.unwrap();
        streams.push(sse_events(resp));
    }
    streams
}

#[tokio::test]
async fn the_gateway_multiplexes_event_streams_to_the_push_service_over_h2c() {
    let mut app = TestApp::spawn().await;
    let push_port: u16 = app.service_url("push").rsplit_once(':').unwrap().1.parse().unwrap();
    let mut users = Vec::new();
    // 2 streams each per gateway: 6 per user in all, below the per-user cap of 8.
    for _ in 0..6 {
        users.push(app.user().await);
    }
    let user = &users[0];
    // Whatever else holds a connection to the push port (a readiness probe).
    let before = connections_to(push_port);

    // The gateway's default: h2c, 12 streams (browsers on HTTP/1.1 each) on one connection.
    let h2c = open_streams(&app, &app.gateway, &users, 12).await;
    assert_eq!(connections_to(push_port) - before, 1, "12 event streams on one h2c connection");
    // Events still reach every stream.
    let id = app.place_order(user, 1).await;
    for mut stream in h2c.into_iter().step_by(users.len()) {
        assert_eq!(order_of(&next(&mut stream).await), id);
    }
    let before = connections_to(push_port);

    // At most 5 streams per connection: 12 streams on 3 connections.
    let small = app.gateway_with(|c| c.push_streams_per_connection = 5).await;
    let _small = open_streams(&app, &small, &users, 12).await;
    assert_eq!(connections_to(push_port) - before, 3, "5 streams per h2c connection");
    let before = connections_to(push_port);

    // GATEWAY_PUSH_H2C=false: HTTP/1.1, a connection per stream (what the
    // check above tells apart).
    let http1 = app.gateway_with(|c| c.push_h2c = false).await;
    let _http1 = open_streams(&app, &http1, &users, 12).await;
    assert_eq!(connections_to(push_port) - before, 12, "HTTP/1.1: a connection per stream");
    app.stop().await;
}

impl Replica {
    pub async fn stats(&self) -> Value {
        reqwest::get(format!("{}/internal/v1/streams", self.url)).await.unwrap().json().await.unwrap()
    }
}

/// Publishes `count` `OrderCreated` for `user` as ordering's relay does
/// (pipelined, confirmed); returns the order ids in order.
pub(crate) async fn publish_orders(app: &TestApp, user: uuid::Uuid, count: usize) -> Vec<String> {
    let conn = lapin::Connection::connect(&app.vhost.amqp_url, Default::default()).await.unwrap();
    let channel = conn.create_channel().await.unwrap();
    channel.confirm_select(Default::default()).await.unwrap();
    let mut orders = Vec::with_capacity(count);
    let mut confirms = Vec::with_capacity(count);
    for _ in 0..count {
        let order = uuid::Uuid::new_v4();
        let body = json!({"orderId": order, "userId": user, "price": 1, "occurredAt": chrono::Utc::now()});
        let props = lapin::BasicProperties::default()
            .with_message_id(uuid::Uuid::new_v4().to_string().into())
            .with_type("OrderCreated".into())
            .with_content_type("application/json".into());
        let opts = lapin::options::BasicPublishOptions { mandatory: true, ..Default::default() };
        let body = serde_json::to_vec(&body).unwrap();
        confirms
            .push(channel.basic_publish("ordering".into(), "OrderCreated".into(), opts, &body, props).await.unwrap());
        orders.push(order.to_string());
    }
    for c in confirms {
        assert!(matches!(c.await.unwrap(), lapin::Confirmation::Ack(None)));
    }
    let _ = conn.close(200, "done".into()).await;
    orders
}

#[tokio::test]
async fn a_closed_stream_is_freed_at_once() {
    let app = TestApp::spawn().await;
    let user = app.user().await;
    // No heartbeat for an hour and no events: only the disconnect itself
    // can free the stream.
    let replica = Replica::start(&app, |c| c.heartbeat_secs = 3600).await;
    let h2c = reqwest::Client::builder().http2_prior_knowledge().build().unwrap();
    for client in [reqwest::Client::new(), h2c] {
        let resp = client
            .get(format!("{}/api/v1/orders", replica.url))
            .header(ASSERTION, replica.assertion(&user))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        eventually(WAIT, || async { (replica.stats().await["openStreams"] == 1).then_some(()) }).await;
        drop(resp);
        drop(client);
        eventually(WAIT, || async {
            let s = replica.stats().await;
            (s["openStreams"] == 0 && s["users"] == 0).then_some(())
        })
        .await;
    }
    replica.stop().await;
    app.stop().await;
}

#[tokio::test]
async fn a_client_that_falls_behind_is_closed_and_resumes_without_a_gap() {
    let app = TestApp::spawn().await;
    // Resumed from the replica's memory, then (memory off) from the stream.
    for recent_events in [10_000, 0] {
        falls_behind_and_resumes(&app, recent_events).await;
    }
    app.stop().await;
}

async fn falls_behind_and_resumes(app: &TestApp, recent_events: usize) {
    // A user only the push service knows of (no e-mails for notification to send).
    let user = User { id: uuid::Uuid::new_v4(), email: String::new(), token: String::new() };
    let replica = Replica::start(app, |c| {
        c.buffer = 1;
        c.recent_events = recent_events;
    })
    .await;
    // HTTP/2 with a small window: the client stops reading, the server
    // cannot send, the connection's buffer overflows.
    let client = reqwest::Client::builder()
        .http2_prior_knowledge()
        .http2_adaptive_window(false)
        .http2_initial_stream_window_size(16 * 1024)
        .http2_initial_connection_window_size(16 * 1024)
        .build()
        .unwrap();
    let resp = client
        .get(format!("{}/api/v1/orders", replica.url))
        .header(ASSERTION, replica.assertion(&user))
        .send()
        .await
        .unwrap();
    let start = replica.stats().await["position"].as_u64().unwrap();
    let total = 500;
    let orders = publish_orders(app, user.id, total).await;
    eventually(WAIT, || async {
        (replica.stats().await["position"].as_u64().unwrap() >= start + total as u64).then_some(())
    })
    .await;

    // Reading now: some events, then the server closes the stream.
    let mut stream = sse_events(resp);
    let mut seen = Vec::new();
    // Before any event, the id is the position the stream opened at (its
    // first frame's): the replica may read the whole burst before the
    // connection sends one, and close it at once.
    let mut last_id = start.to_string();
    while let Some(e) = tokio::time::timeout(WAIT, stream.recv()).await.expect("the stream ends") {
        seen.push(order_of(&e));
        last_id = e.id().to_string();
    }
    assert!(seen.len() < total, "closed after {} of {total}", seen.len());
    assert_eq!(seen[..], orders[..seen.len()]);

    // Resuming from its last id gets the rest, in order, nothing skipped.
    let mut stream = replica.subscribe(&user, Some(&last_id)).await;
    for expected in &orders[seen.len()..] {
        assert_eq!(&order_of(&next(&mut stream).await), expected);
    }
    let stats = replica.stats().await;
    let (memory, stream) = if recent_events > 0 { (1, 0) } else { (0, 1) };
    assert_eq!(
        (stats["replaysFromMemory"].as_u64(), stats["replaysFromStream"].as_u64()),
        (Some(memory), Some(stream))
    );
    drop(client);
    replica.stop().await;
}

#[tokio::test]
async fn streams_start_with_a_retry_hint_get_heartbeats_and_close_on_shutdown() {
    let app = TestApp::spawn().await;
    let user = app.user().await;
    let replica = Replica::start(&app, |c| {
        c.retry_ms = 1500;
        c.drain_secs = 2;
    })
    .await;
    let url = format!("{}/api/v1/orders", replica.url);
    let resp = reqwest::Client::new().get(&url).header(ASSERTION, replica.assertion(&user)).send().await.unwrap();
    let mut body = resp.bytes_stream();
    let mut text = String::new();
    // The hint first, then a heartbeat comment (`:` alone) on the idle stream.
    while !text.split_once("\n\n").is_some_and(|(_, rest)| rest.contains(":\n\n")) {
        let chunk = tokio::time::timeout(WAIT, body.next()).await.expect("data in time").unwrap().unwrap();
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    // Each stream is told its own delay, drawn from half to twice the configured one.
    let retry: u64 =
        text.strip_prefix("retry: ").and_then(|t| t.split_once('\n')?.0.parse().ok()).expect("retry first");
    assert!((750..=3000).contains(&retry), "{text:?}");

    // Shutdown: every open stream ends (each at its own moment within the
    // drain window), and the replica stops.
    let mut streams = Vec::new();
    for _ in 0..5 {
        streams.push(replica.subscribe(&user, None).await);
    }
    replica.shutdown.cancel();
    for mut s in streams {
        assert!(tokio::time::timeout(WAIT, s.recv()).await.expect("closed in time").is_none());
    }
    let stopped = tokio::time::timeout(WAIT, replica.task).await.expect("stops in time").unwrap();
    assert!(stopped.is_ok(), "{stopped:?}");
    app.stop().await;
}

#[tokio::test]
async fn a_replica_facing_browsers_checks_the_token_itself() {
    let app = TestApp::spawn().await;
    let alice = app.user().await;
    let bob = app.user().await;
    let replica = Replica::start(&app, |_| {}).await;
    let tls = h2_client();
    let url = format!("{}/api/v1/orders", replica.https);
    let status = |r: reqwest::Response| r.status();

    // A user id, or even the gateway's assertion, is not enough on the
    // port facing browsers, nor a token in the URL.
    let r = tls.get(&url).header("x-user-id", alice.id.to_string()).send().await.unwrap();
    assert_eq!(status(r), StatusCode::UNAUTHORIZED);
    let r = tls.get(&url).header(ASSERTION, replica.assertion(&alice)).send().await.unwrap();
    assert_eq!(status(r), StatusCode::UNAUTHORIZED);
    let r = tls.get(format!("{url}?accessToken={}", alice.token)).send().await.unwrap();
    assert_eq!(status(r), StatusCode::UNAUTHORIZED);
    let r = tls.get(&url).bearer_auth("not.a.token").send().await.unwrap();
    assert_eq!(status(r), StatusCode::UNAUTHORIZED);
    let r = tls.get(&url).header("cookie", format!("accessToken={}", bob.token)).send().await.unwrap();
    assert_eq!((r.version(), status(r)), (Version::HTTP_2, StatusCode::OK));

    // The token decides whose stream it is, whatever an assertion says.
    let resp = tls.get(&url).bearer_auth(&alice.token).header(ASSERTION, replica.assertion(&bob)).send().await.unwrap();
    assert_eq!(resp.version(), Version::HTTP_2);
    let mut stream = sse_events(resp);
    settled_order(&app, &bob, 7).await;
    let alices = settled_order(&app, &alice, 8).await;
    assert_eq!(order_of(&next(&mut stream).await), alices);

    // A logged-out token stops opening streams.
    let r = app.post(&alice, "/identity/logout", json!({})).await;
    assert!(r.status().is_success());
    eventually(WAIT, || async {
        let r = tls.get(&url).bearer_auth(&alice.token).send().await.unwrap();
        (r.status() == StatusCode::UNAUTHORIZED).then_some(())
    })
    .await;
    replica.stop().await;
    app.stop().await;
}

#[tokio::test]
async fn a_gateway_shutting_down_ends_the_streams_it_carries() {
    let app = TestApp::spawn().await;
    let user = app.user().await;
    let replica = Replica::start(&app, |_| {}).await;
    // A gateway of its own in front of the replica, which keeps running.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let gateway = format!("http://{}", listener.local_addr().unwrap());
    let config = gateway::Config { push_url: replica.url.clone(), ..app.config.gateway(&app.wiring) };
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(gateway::run_with_tls(config, listener, None, shutdown.clone()));
    let url = format!("{gateway}/api/v1/push/orders");
    let resp = eventually(WAIT, || async {
        let r = reqwest::Client::new().get(&url).bearer_auth(&user.token).send().await.ok()?;
        (r.status() == StatusCode::OK).then_some(r)
    })
    .await;
    let mut stream = sse_events(resp);
    shutdown.cancel();
    assert!(tokio::time::timeout(WAIT, stream.recv()).await.expect("the stream ends").is_none());
    let stopped = tokio::time::timeout(WAIT, task).await.expect("the gateway stops").unwrap();
    assert!(stopped.is_ok(), "{stopped:?}");
    // The replica's side of the stream is freed with it.
    eventually(WAIT, || async { (replica.stats().await["openStreams"] == 0).then_some(()) }).await;
    replica.stop().await;
    app.stop().await;
}

/// Publishes an `OrderCreated` for `user` under the message id `message_id`,
/// as ordering's outbox relay does (again, when its "sent" mark was lost).
async fn publish_order_event(app: &TestApp, user: uuid::Uuid, order: uuid::Uuid, message_id: uuid::Uuid) {
    let body = json!({"orderId": order, "userId": user, "price": 5, "occurredAt": chrono::Utc::now()});
    let body = serde_json::to_vec(&body).unwrap();
    app.publish_raw("ordering", "OrderCreated", Some(&message_id.to_string()), "OrderCreated", &body).await;
}

/// The outbox publishes at least once: an order event published again (the
/// same message id under a new stream offset) reaches the user's stream once
/// — live, on a resume from memory, on a resume from the stream, and on a
/// replica started after both copies were written.
#[tokio::test]
async fn an_order_event_published_twice_reaches_the_stream_once() {
    let app = TestApp::spawn().await;
    let user = app.user().await;
    let replica = Replica::start(&app, |_| {}).await;
    let mut live = replica.subscribe(&user, None).await;
    let (order, again) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
    let message = uuid::Uuid::new_v4();
    publish_order_event(&app, user.id, order, message).await;
    publish_order_event(&app, user.id, order, message).await; // the re-publication
    publish_order_event(&app, user.id, again, uuid::Uuid::new_v4()).await;
    let (order, again) = (order.to_string(), again.to_string());
    let first = next(&mut live).await;
    assert_eq!(order_of(&first), order);
    let before: u64 = first.id().parse::<u64>().unwrap() - 1;
    expect_orders(&mut live, &[&again], first.id()).await;

    // A later order is the next event everywhere: nothing in between.
    let mut later = publish_orders(&app, user.id, 1).await;
    expect_orders(&mut live, &[&later[0]], first.id()).await;
    drop(live);

    // Resumes on the same replica (from memory), on one that keeps nothing
    // in memory (from the stream), and on one started afterwards.
    let from_stream = Replica::start(&app, |c| c.recent_events = 0).await;
    for (name, r) in [("memory", &replica), ("stream", &from_stream)] {
        let mut resumed = r.subscribe(&user, Some(&before.to_string())).await;
        let expected: Vec<&str> = [&order, &again].into_iter().chain(&later).map(String::as_str).collect();
        let last = expect_orders(&mut resumed, &expected, &before.to_string()).await;
        let after = publish_orders(&app, user.id, 1).await;
        expect_orders(&mut resumed, &[&after[0]], &last).await;
        later.extend(after);
        let e = tokio::time::timeout(Duration::from_millis(500), resumed.recv()).await;
        assert!(e.is_err(), "resume from {name}: nothing more, got {e:?}");
        // Resuming just after the first copy: the second is not sent either.
        let mut resumed = r.subscribe(&user, Some(first.id())).await;
        expect_orders(&mut resumed, &[&again], first.id()).await;
    }
    assert_eq!(replica.stats().await["replaysFromMemory"], 2);
    assert_eq!(from_stream.stats().await["replaysFromStream"], 2);
    replica.stop().await;
    from_stream.stop().await;
    app.stop().await;
}
