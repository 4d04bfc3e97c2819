//! Benchmark (not a test): N concurrent SSE subscribers on one push-service
//! process, its resident memory per connection, and the fan-out latency from
//! an order event leaving ordering (published to the `ordering` exchange, as
//! ordering's outbox relay does) to its arrival at the subscribed client.
//!
//!     cargo bench -p push-service --bench fanout -- --connections 10000 --events 2000
//!
//! Starts the release `push-service` binary as its own process on a RabbitMQ
//! vhost of its own (created and deleted through the management API), opens
//! one HTTP/1.1 event stream per user (as the gateway does, with an assertion
//! signed by a gateway key of the benchmark's own), publishes
//! `OrderCreated` events round-robin over the users at a steady rate, and
//! prints the figures.

#[path = "../../tools/bench/proc.rs"]
mod proc;
use clap::Parser;
use futures::StreamExt;
use lapin::options::BasicPublishOptions;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use proc::rss_kib;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{Semaphore, mpsc};
use uuid::Uuid;

#[derive(Parser, Debug)]
struct Args {
    /// Concurrent event streams (one user each).
    #[arg(long, default_value_t = 10_000)]
    connections: usize,
    /// Order events published after all streams are open.
    #[arg(long, default_value_t = 2_000)]
    events: usize,
    /// Events per second.
    #[arg(long, default_value_t = 500)]
    rate: u64,
    /// Multiplex the streams over HTTP/2 without TLS (h2c), this many per
    /// connection, instead of one HTTP/1.1 connection per stream.
    #[arg(long)]
    h2c_streams_per_connection: Option<usize>,
    /// Streams opened at once while connecting.
    #[arg(long, default_value_t = 256)]
    connect_concurrency: usize,
    #[arg(long, env = "TEST_AMQP_BASE", default_value = "amqp://guest:guest@127.0.0.1:5672")]
    amqp_base: String,
    #[arg(long, env = "TEST_RABBITMQ_API", default_value = "http://guest:guest@127.0.0.1:15672/api")]
    rabbitmq_api: String,
    /// Passed by `cargo bench`.
    #[arg(long, hide = true)]
    bench: bool,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

type Sent = Arc<Mutex<HashMap<Uuid, Instant>>>;

/// What the gateway sends the push service to say that `user` calls.
fn assertion(gateway: &runtime::auth::AssertionSigner, user: Uuid) -> String {
    let caller = runtime::auth::CurrentUser {
        id: user,
        email: String::new(),
        token_id: Uuid::new_v4(),
        token_expires: i64::MAX,
    };
    gateway.sign("push", &caller)
}

/// One subscriber: reads its stream, reports the latency of each event.
#[allow(clippy::too_many_arguments)]
async fn subscriber(
    http: reqwest::Client,
    url: String,
    gateway: Arc<runtime::auth::AssertionSigner>,
    user: Uuid,
    sent: Sent,
    latencies: mpsc::UnboundedSender<Duration>,
    connected: mpsc::UnboundedSender<bool>,
    permit: tokio::sync::OwnedSemaphorePermit,
) {
    let resp = match http.get(&url).header(runtime::auth::ASSERTION_HEADER, assertion(&gateway, user)).send().await {
        Ok(r) if r.status().is_success() => r,
        _ => {
            let _ = connected.send(false);
            return;
        }
    };
    let mut permit = Some(permit);
    let mut body = resp.bytes_stream();
    let mut buf = String::new();
    let mut announced = false;
    while let Some(Ok(chunk)) = body.next().await {
        buf.push_str(&String::from_utf8_lossy(&chunk));
        if !announced && buf.contains(": connected") {
            announced = true;
            permit.take();
            let _ = connected.send(true);
        }
        while let Some(end) = buf.find("\n\n") {
            let block: String = buf.drain(..end + 2).collect();
            let now = Instant::now();
            if let Some(data) = block.lines().find_map(|l| l.strip_prefix("data: "))
                && let Ok(v) = serde_json::from_str::<serde_json::Value>(data)
                && let Some(order) = v["orderId"].as_str().and_then(|s| s.parse::<Uuid>().ok())
                && let Some(at) = sent.lock().unwrap().remove(&order)
            {
                let _ = latencies.send(now - at);
            }
        }
    }
}

async fn management(client: &reqwest::Client, api: &str, method: reqwest::Method, path: &str, body: Option<&str>) {
    let url = reqwest::Url::parse(&format!("{api}{path}")).expect("management API URL");
    let (user, password) = (url.username().to_string(), url.password().unwrap_or_default().to_string());
    let mut clean = url.clone();
    let _ = clean.set_username("");
    let _ = clean.set_password(None);
    let mut req = client.request(method, clean).basic_auth(user, Some(password));
    if let Some(b) = body {
        req = req.header("content-type", "application/json").body(b.to_string());
    }
    let resp = req.send().await.expect("RabbitMQ management API");
    assert!(resp.status().is_success() || resp.status() == 404, "management API: {}", resp.status());
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let admin = reqwest::Client::new();
    let vhost = format!("bench-{}", &Uuid::new_v4().simple().to_string()[..8]);
    management(&admin, &args.rabbitmq_api, reqwest::Method::PUT, &format!("/vhosts/{vhost}"), None).await;
    let perms = r#"{"configure":".*","write":".*","read":".*"}"#;
    management(&admin, &args.rabbitmq_api, reqwest::Method::PUT, &format!("/permissions/{vhost}/guest"), Some(perms))
        .await;
    let amqp_url = format!("{}/{vhost}", args.amqp_base);

    let port = free_port();
    let gateway = Arc::new(runtime::auth::AssertionSigner::generate());
    let mut server = tokio::process::Command::new(env!("CARGO_BIN_EXE_push-service"))
        .env("AMQP_URL", &amqp_url)
        .env("INTERNAL_VERIFY_KEY", gateway.verify_keys().text())
        .env("PUSH_ADDR", format!("127.0.0.1:{port}"))
        .env("PUSH_TLS_ADDR", "")
        .env("RUST_LOG", "warn")
        .kill_on_drop(true)
        .spawn()?;
    let pid = server.id().expect("running");
    let url = format!("http://127.0.0.1:{port}/api/v1/orders");
    let http = reqwest::Client::builder().pool_max_idle_per_host(0).build()?;
    let probe = Uuid::new_v4();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let probe = http.get(&url).header(runtime::auth::ASSERTION_HEADER, assertion(&gateway, probe));
        let ok = probe.send().await.is_ok_and(|r| r.status().is_success());
        if ok {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "the push service did not become ready");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_before = rss_kib(pid);

    // Open the streams.
    let users: Vec<Uuid> = (0..args.connections).map(|_| Uuid::new_v4()).collect();
    let sent: Sent = Arc::new(Mutex::new(HashMap::new()));
    let (lat_tx, mut lat_rx) = mpsc::unbounded_channel();
    let (conn_tx, mut conn_rx) = mpsc::unbounded_channel();
    let gate = Arc::new(Semaphore::new(args.connect_concurrency));
    let started = Instant::now();
    let mut opened = 0usize;
    let mut refused = 0usize;
    let mut handles = Vec::with_capacity(users.len());
    let clients: Vec<reqwest::Client> = match args.h2c_streams_per_connection {
        Some(per) => (0..args.connections.div_ceil(per.max(1)))
            .map(|_| reqwest::Client::builder().http2_prior_knowledge().build())
            .collect::<Result<_, _>>()?,
        None => vec![http.clone()],
    };
    for (i, user) in users.iter().enumerate() {
        let permit = gate.clone().acquire_owned().await?;
        let http = clients[i % clients.len()].clone();
        let (url, sent, lat_tx, user) = (url.clone(), sent.clone(), lat_tx.clone(), *user);
        let gateway = gateway.clone();
        handles.push(tokio::spawn(subscriber(http, url, gateway, user, sent, lat_tx, conn_tx.clone(), permit)));
    }
    while opened + refused < users.len() {
        match tokio::time::timeout(Duration::from_secs(60), conn_rx.recv()).await {
            Ok(Some(true)) => opened += 1,
            Ok(Some(false)) => refused += 1,
            _ => break,
        }
    }
    let connect_time = started.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_open = rss_kib(pid);

    // Publish order events as ordering does, at a steady rate.
    let conn = Connection::connect(&amqp_url, ConnectionProperties::default()).await?;
    let channel = conn.create_channel().await?;
    channel.confirm_select(Default::default()).await?;
    let mut confirms = Vec::with_capacity(args.events);
    let every = Duration::from_secs_f64(1.0 / args.rate.max(1) as f64);
    let mut tick = tokio::time::interval(every);
    let publish_start = Instant::now();
    for i in 0..args.events {
        tick.tick().await;
        let order = Uuid::new_v4();
        let user = users[i % users.len()];
        let body = serde_json::json!({
            "orderId": order, "userId": user, "price": 10, "occurredAt": chrono::Utc::now(),
        });
        let props = BasicProperties::default()
            .with_message_id(Uuid::new_v4().to_string().into())
            .with_type("OrderCreated".into())
            .with_content_type("application/json".into())
            .with_delivery_mode(2);
        let body = serde_json::to_vec(&body)?;
        sent.lock().unwrap().insert(order, Instant::now());
        confirms.push(
            channel
                .basic_publish(
                    "ordering".into(),
                    "OrderCreated".into(),
                    BasicPublishOptions { mandatory: true, ..Default::default() },
                    &body,
                    props,
                )
                .await?,
        );
    }
    for c in confirms {
        c.await?;
    }
    let mut latencies = Vec::with_capacity(args.events);
    while latencies.len() < args.events {
        match tokio::time::timeout(Duration::from_secs(30), lat_rx.recv()).await {
            Ok(Some(l)) => latencies.push(l),
            _ => break,
        }
    }
    let publish_time = publish_start.elapsed();
    let rss_after = rss_kib(pid);
    latencies.sort();

    let per_conn = if opened > 0 { (rss_open.saturating_sub(rss_before)) as f64 / opened as f64 } else { 0.0 };
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!();
    println!("push-service fan-out benchmark ({} CPUs)", std::thread::available_parallelism().map_or(0, |n| n.get()));
    let transport = match args.h2c_streams_per_connection {
        Some(per) => format!("h2c, {per} per connection, {} connections", clients.len()),
        None => "HTTP/1.1, one connection each".to_string(),
    };
    println!(
        "  streams open              {opened} of {} ({refused} refused), in {:.1} s ({transport})",
        users.len(),
        connect_time.as_secs_f64()
    );
    println!(
        "  resident memory           {:.1} MiB idle, {:.1} MiB with the streams open, {:.1} MiB after the events",
        rss_before as f64 / 1024.0,
        rss_open as f64 / 1024.0,
        rss_after as f64 / 1024.0
    );
    println!("  memory per stream         {:.1} KiB", per_conn);
    println!(
        "  events delivered          {} of {} at {} /s ({:.1} s)",
        latencies.len(),
        args.events,
        args.rate,
        publish_time.as_secs_f64()
    );
    println!(
        "  fan-out latency           p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        ms(percentile(&latencies, 0.50)),
        ms(percentile(&latencies, 0.99)),
        ms(latencies.last().copied().unwrap_or_default())
    );

    let _ = conn.close(200, "done".into()).await;
    for h in handles {
        h.abort();
    }
    let _ = server.kill().await;
    management(&admin, &args.rabbitmq_api, reqwest::Method::DELETE, &format!("/vhosts/{vhost}"), None).await;
    anyhow::ensure!(latencies.len() == args.events, "{} events were not delivered", args.events - latencies.len());
    Ok(())
}
