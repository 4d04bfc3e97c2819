//! No herd after a restart: a push-service replica holding many streams of
//! many users is stopped (its streams all end at the same instant), order
//! events are published while it is away, and a new replica starts on the
//! same address. Clients behave as the page does: reconnect after the
//! `retry:` the server told them (as `EventSource` does after a dropped
//! stream or a refused connection), resume with `Last-Event-ID`, and on a
//! refusal (429, 503) wait its `Retry-After` plus jitter. Every stream comes
//! back and gets exactly the events it missed. The time it took and the
//! refusals are printed, not asserted: they are figures (see the README).
//! `HERD_STREAMS` sets the size (default 200 streams of 50 users; the
//! README's figures are from larger runs).

use crate::helpers::{ASSERTION, TestApp, User, as_current, eventually};
use futures::StreamExt;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use runtime::MessagingConfig;
use serde_json::json;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use test_support::sse::Parser;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Streams per user: under the push service's per-user cap (8).
const STREAMS_PER_USER: usize = 4;

/// What the clients saw, together.
#[derive(Default)]
struct Herd {
    /// Streams open now.
    open: AtomicUsize,
    /// Answers other than 200 (the push service's 429 and 503).
    refused: AtomicUsize,
    /// Connections that failed (the replica away).
    unreachable: AtomicUsize,
    /// Order ids received, per stream.
    seen: Mutex<HashMap<usize, Vec<String>>>,
}

impl Herd {
    fn streams_with(&self, order: &str) -> usize {
        self.seen.lock().unwrap().values().filter(|orders| orders.iter().any(|o| o == order)).count()
    }
}

/// A push replica, behind no gateway, as the gateway would reach it: its
/// streams URL. It ends its streams at once when stopped (no drain window:
/// the worst case, a killed process).
async fn replica(app: &TestApp) -> (String, CancellationToken, tokio::task::JoinHandle<()>) {
    // Production's heartbeat: the herd is load enough.
    let config = push_service::Config { heartbeat_secs: 15, ..app.config.push(&app.wiring) };
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/api/v1/orders", listener.local_addr().unwrap());
    let shutdown = CancellationToken::new();
    let task = tokio::spawn({
        let shutdown = shutdown.clone();
        async move {
            push_service::run(config, listener, shutdown).await.unwrap();
        }
    });
    (url, shutdown, task)
}

/// Where the streams are served now: a restart's new replica has a new
/// address, which clients reach as they would through a Service or the
/// gateway's balancer.
type Url = Arc<std::sync::RwLock<String>>;

/// The gateway's key and the user a stream is opened for.
type Caller = (runtime::auth::AssertionSigner, runtime::auth::CurrentUser);

/// One stream, as a page keeps it open: connects, reads events, and
/// reconnects from its last id after the delay it was told.
async fn client(n: usize, http: reqwest::Client, url: Url, caller: Caller, herd: Arc<Herd>) {
    let mut last_id: Option<String> = None;
    // Until the server says otherwise (EventSource's default is about 3 s).
    let mut retry = Duration::from_secs(3);
    loop {
        // A fresh assertion each time, as the gateway signs one per request.
        let current = url.read().unwrap().clone();
        let mut req = http
            .get(current)
            .header(ASSERTION, caller.0.sign("push", &reqwest::Method::GET, "/api/v1/orders", &caller.1));
        if let Some(id) = &last_id {
            req = req.header("last-event-id", id);
        }
        let resp = match req.send().await {
            Ok(resp) => resp,
            Err(_) => {
                herd.unreachable.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(retry).await;
                continue;
            }
        };
        if !resp.status().is_success() {
            herd.refused.fetch_add(1, Ordering::Relaxed);
            let asked = resp.headers().get("retry-after").and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
            let wait = asked.map_or(retry, Duration::from_secs);
            // The page's jitter on top of what the server asked.
            tokio::time::sleep(wait.mul_f64(1.0 + rand::random::<f64>() / 2.0)).await;
            continue;
        }
        herd.open.fetch_add(1, Ordering::Relaxed);
        let mut body = resp.bytes_stream();
        let mut parser = Parser::default();
        while let Some(Ok(chunk)) = body.next().await {
            for event in parser.push(&chunk) {
                if let Ok(order) = serde_json::from_str::<serde_json::Value>(&event.data) {
                    let order = order["orderId"].as_str().unwrap_or_default().to_string();
                    herd.seen.lock().unwrap().entry(n).or_default().push(order);
                }
            }
            last_id = parser.last_event_id().map(str::to_string).or(last_id);
            retry = parser.retry().unwrap_or(retry);
        }
        herd.open.fetch_sub(1, Ordering::Relaxed);
        tokio::time::sleep(retry).await;
    }
}

/// Publishes one `OrderCreated` per user, as ordering would: the order ids.
async fn one_event_each(app: &TestApp, users: &[Uuid]) -> Vec<String> {
    let conn = Connection::connect(&app.vhost.amqp_url, ConnectionProperties::default()).await.unwrap();
    let channel = conn.create_channel().await.unwrap();
    channel.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    let mut orders = Vec::new();
    let mut confirms = Vec::new();
    for user in users {
        let order = Uuid::now_v7();
        let body = json!({ "orderId": order, "userId": user, "price": 1, "occurredAt": chrono::Utc::now() });
        let props = BasicProperties::default()
            .with_type("OrderCreated".into())
            .with_message_id(Uuid::now_v7().to_string().into())
            .with_content_type("application/json".into());
        let body = serde_json::to_vec(&body).unwrap();
        let opts = BasicPublishOptions { mandatory: true, ..Default::default() };
        confirms
            .push(channel.basic_publish("ordering".into(), "OrderCreated".into(), opts, &body, props).await.unwrap());
        orders.push(order.to_string());
    }
    for confirm in confirms {
        assert!(matches!(confirm.await.unwrap(), lapin::Confirmation::Ack(None)), "published and routed");
    }
    let _ = conn.close(200, "done".into()).await;
    orders
}

#[tokio::test]
async fn a_restarted_push_replica_gets_every_stream_back_and_none_misses_an_event() {
    let streams: usize = std::env::var("HERD_STREAMS").ok().and_then(|n| n.parse().ok()).unwrap_or(200);
    let app = TestApp::spawn().await;
    let (first, stop, task) = replica(&app).await;
    let url: Url = Arc::new(std::sync::RwLock::new(first));
    let users: Vec<Uuid> = (0..streams.div_ceil(STREAMS_PER_USER)).map(|_| Uuid::new_v4()).collect();
    let herd = Arc::new(Herd::default());
    // HTTP/2 without TLS, as the gateway reaches the push service: one
    // connection per 100 streams.
    let clients: Vec<reqwest::Client> = (0..streams.div_ceil(100))
        .map(|_| reqwest::Client::builder().http2_prior_knowledge().build().unwrap())
        .collect();
    let mut tasks = Vec::new();
    for n in 0..streams {
        let user = User { id: users[n / STREAMS_PER_USER], email: String::new(), token: String::new() };
        let caller = (app.signer().clone(), as_current(&user));
        let client = client(n, clients[n / 100].clone(), url.clone(), caller, herd.clone());
        tasks.push(tokio::spawn(client));
    }
    // Progress, for whoever watches a large run.
    let progress = tokio::spawn({
        let herd = herd.clone();
        async move {
            let started = Instant::now();
            loop {
                tokio::time::sleep(Duration::from_secs(5)).await;
                println!(
                    "herd: {:>4.0} s: {} streams open, {} refusals, {} connections refused",
                    started.elapsed().as_secs_f64(),
                    herd.open.load(Ordering::Relaxed),
                    herd.refused.load(Ordering::Relaxed),
                    herd.unreachable.load(Ordering::Relaxed)
                );
            }
        }
    });
    let limit = Duration::from_secs(180);
    eventually(limit, || async { (herd.open.load(Ordering::Relaxed) == streams).then_some(()) }).await;
    let before = one_event_each(&app, &users).await;
    for order in &before {
        eventually(limit, || async { (herd.streams_with(order) == STREAMS_PER_USER).then_some(()) }).await;
    }

    // The replica goes away: every stream ends at once. Its replacement
    // starts at once; events are published meanwhile.
    stop.cancel();
    let stopped = Instant::now();
    let (next, stop, new_task) = replica(&app).await;
    *url.write().unwrap() = next;
    let missed = one_event_each(&app, &users).await;
    task.await.unwrap();
    let task = new_task;

    let all_back = eventually(limit, || async {
        let back = herd.open.load(Ordering::Relaxed) == streams
            && missed.iter().all(|order| herd.streams_with(order) == STREAMS_PER_USER);
        back.then(|| stopped.elapsed())
    })
    .await;
    println!(
        "herd: {streams} streams of {} users back, each with the event it missed, {:.1} s after the replica \
         stopped; {} refusals (429/503), {} connections refused while it was away",
        users.len(),
        all_back.as_secs_f64(),
        herd.refused.load(Ordering::Relaxed),
        herd.unreachable.load(Ordering::Relaxed),
    );
    // Nothing missed, nothing twice.
    for (n, orders) in herd.seen.lock().unwrap().iter() {
        assert_eq!(orders.len(), 2, "stream {n} got {orders:?}");
        let user = n / STREAMS_PER_USER;
        assert_eq!(orders, &[before[user].clone(), missed[user].clone()], "stream {n}");
    }
    assert_eq!(herd.seen.lock().unwrap().len(), streams);
    progress.abort();
    for t in tasks {
        t.abort();
    }
    stop.cancel();
    let _ = task.await;
    app.stop().await;
}

#[tokio::test]
async fn a_replica_not_attached_to_the_stream_yet_says_when_to_come_back() {
    let app = TestApp::spawn().await;
    // Its broker is unreachable: it never attaches to the stream.
    let mut config = app.config.push(&app.wiring);
    config.common.messaging = MessagingConfig::local("amqp://127.0.0.1:1/%2f");
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/api/v1/orders", listener.local_addr().unwrap());
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(push_service::run(config, listener, shutdown.clone()));
    let user = User { id: Uuid::new_v4(), email: String::new(), token: String::new() };
    let r = app
        .http
        .get(&url)
        .header(ASSERTION, app.signer().sign("push", &reqwest::Method::GET, "/api/v1/orders", &as_current(&user)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), reqwest::StatusCode::SERVICE_UNAVAILABLE);
    let retry_after: u64 = r.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    // Drawn from half to twice the 3 s retry, at least 1 s.
    assert!((1..=6).contains(&retry_after), "Retry-After: {retry_after}");
    shutdown.cancel();
    let _ = task.await;
    app.stop().await;
}
