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
//!
//!     cargo build --release -p order-system
//!     cargo bench -p push-service --bench fanout -- --through-gateway --connections 2000
//!     cargo bench -p push-service --bench fanout -- --through-gateway --connections 2000 --users 1 --events 200 --rate 20
//!
//! `--through-gateway` opens the streams through the gateway instead: the
//! release `order-system` binary (every service but push, in one process: a
//! throwaway system, `run --throwaway`, on databases and a vhost of its own
//! that it removes when it stops) in front of the `push-service` process
//! (`EXTERNAL_PUSH_URL`), with the tokens of users registered through it; the
//! memory is then that of both processes together. `--users 1` puts every
//! stream on one user (the per-user stream cap is raised to fit), so each
//! event fans out to all of them: the latency is then from the publish to the
//! last of the streams receiving it.

#[path = "../../tools/bench/proc.rs"]
mod proc;
#[path = "../../tools/bench/throwaway.rs"]
mod throwaway;
use clap::Parser;
use futures::StreamExt;
use lapin::options::BasicPublishOptions;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use proc::{cpu_ms, rss_kib};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use throwaway::Throwaway;
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
    /// Open the streams through the gateway (the `order-system` binary in
    /// front of the push-service process) with users' tokens.
    #[arg(long)]
    through_gateway: bool,
    /// With --through-gateway: the gateway's hop to the push service over
    /// h2c (`GATEWAY_PUSH_H2C`); false: HTTP/1.1, a connection per stream.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    gateway_h2c: bool,
    /// Users the streams are spread over, round-robin (the push service's
    /// per-user stream cap is raised to fit). Default: one per stream
    /// straight to the push service; 200 through the gateway, where each
    /// registers and logs in (two password hashes).
    #[arg(long)]
    users: Option<usize>,
    /// The `order-system` binary for --through-gateway (default: the one
    /// beside the push-service binary: `cargo build --release -p order-system`).
    #[arg(long)]
    launcher: Option<PathBuf>,
    #[arg(long, env = "TEST_POSTGRES_URL", default_value = "postgres://postgres@127.0.0.1:5432")]
    postgres_url: String,
    #[arg(long, env = "TEST_AMQP_BASE", default_value = "amqp://guest:guest@127.0.0.1:5672")]
    amqp_base: String,
    #[arg(long, env = "TEST_RABBITMQ_API", default_value = "http://guest:guest@127.0.0.1:15672/api")]
    rabbitmq_api: String,
    /// Seconds the streams stay idle (open, no event) while the server
    /// processes' CPU time is measured, before the events.
    #[arg(long, default_value_t = 5)]
    idle_secs: u64,
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

/// An order event's arrival on one stream.
type Arrival = (Uuid, Instant);

/// What the gateway sends the push service to say that `user` calls.
fn assertion(gateway: &runtime::auth::AssertionSigner, user: Uuid) -> String {
    let caller = runtime::auth::CurrentUser {
        id: user,
        email: String::new(),
        token_id: Uuid::new_v4(),
        token_expires: i64::MAX,
    };
    gateway.sign("push", &axum::http::Method::GET, "/api/v1/orders", &caller)
}

/// One subscriber: reads its stream (opened with `auth`, the gateway's
/// assertion or a bearer token), reports each order event's arrival.
async fn subscriber(
    http: reqwest::Client,
    url: String,
    auth: (&'static str, String),
    arrivals: mpsc::UnboundedSender<Arrival>,
    connected: mpsc::UnboundedSender<bool>,
    permit: tokio::sync::OwnedSemaphorePermit,
) {
    let resp = match http.get(&url).header(auth.0, auth.1).send().await {
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
            {
                let _ = arrivals.send((order, now));
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

/// The kernel's memory for TCP buffers, machine-wide, in KiB (`/proc/net/sockstat`, pages).
fn kernel_tcp_kib() -> u64 {
    let stat = std::fs::read_to_string("/proc/net/sockstat").unwrap_or_default();
    let pages = stat
        .lines()
        .find_map(|l| l.strip_prefix("TCP:"))
        .and_then(|l| l.split_whitespace().skip_while(|w| *w != "mem").nth(1)?.parse::<u64>().ok())
        .unwrap_or(0);
    pages * 4
}

async fn wait_ok(
    http: &reqwest::Client,
    what: &str,
    request: impl Fn() -> reqwest::RequestBuilder,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if request().send().await.is_ok_and(|r| r.status().is_success()) {
            return Ok(());
        }
        anyhow::ensure!(Instant::now() < deadline, "{what} did not become ready");
        let _ = http;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// What the benchmark started, stopped and removed by [`Setup::clean_up`].
struct Setup {
    push: tokio::process::Child,
    /// The throwaway `order-system` (gateway, identity, ...), with --through-gateway.
    system: Option<Throwaway>,
    /// The push service's vhost.
    vhost: String,
}

impl Setup {
    fn pids(&self) -> Vec<(&'static str, u32)> {
        let mut pids = vec![("push-service", self.push.id().unwrap_or(0))];
        if let Some(system) = &self.system {
            pids.push(("order-system (gateway)", system.pid()));
        }
        pids
    }

    async fn clean_up(mut self, args: &Args, admin: &reqwest::Client) {
        let _ = self.push.kill().await;
        if let Some(system) = self.system.take() {
            // It removes its own databases and vhost.
            system.stop().await;
        }
        management(admin, &args.rabbitmq_api, reqwest::Method::DELETE, &format!("/vhosts/{}", self.vhost), None).await;
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let admin = reqwest::Client::new();
    let run = format!("bench{}", &Uuid::new_v4().simple().to_string()[..8]);
    // The push service's vhost, where the events are published; the rest of
    // the system (a throwaway one) gets one of its own, so that no other
    // service sees them.
    management(&admin, &args.rabbitmq_api, reqwest::Method::PUT, &format!("/vhosts/{run}"), None).await;
    let perms = r#"{"configure":".*","write":".*","read":".*"}"#;
    management(&admin, &args.rabbitmq_api, reqwest::Method::PUT, &format!("/permissions/{run}/guest"), Some(perms))
        .await;
    let amqp_url = format!("{}/{run}", args.amqp_base);
    let users = args
        .users
        .unwrap_or(if args.through_gateway { 200 } else { args.connections })
        .clamp(1, args.connections.max(1));

    let port = free_port();
    let gateway = runtime::auth::AssertionSigner::generate();
    let push = tokio::process::Command::new(env!("CARGO_BIN_EXE_push-service"))
        .env("AMQP_URL", &amqp_url)
        .env("INTERNAL_VERIFY_KEY", gateway.verify_keys().text())
        .env("PUSH_ADDR", format!("127.0.0.1:{port}"))
        .env("PUSH_TLS_ADDR", "")
        .env("PUSH_MAX_STREAMS_PER_USER", args.connections.div_ceil(users).max(8).to_string())
        .env("RUST_LOG", "warn")
        .kill_on_drop(true)
        .spawn()?;
    let mut setup = Setup { push, system: None, vhost: run.clone() };
    if args.through_gateway {
        let launcher = args
            .launcher
            .clone()
            .unwrap_or_else(|| std::path::Path::new(env!("CARGO_BIN_EXE_push-service")).with_file_name("order-system"));
        if !launcher.exists() {
            setup.clean_up(&args, &admin).await;
            anyhow::bail!("{} is missing: cargo build --release -p order-system", launcher.display());
        }
        // Throttles off (the throwaway profile): every subscriber of this
        // benchmark comes from one address.
        let env = [
            ("POSTGRES_URL", args.postgres_url.clone()),
            ("AMQP_URL", format!("{}/%2f", args.amqp_base)),
            ("RABBITMQ_API_URL", args.rabbitmq_api.clone()),
            ("EXTERNAL_PUSH_URL", format!("http://127.0.0.1:{port}")),
            ("INTERNAL_SIGNING_KEY", gateway.private_key_text()),
            ("GATEWAY_PUSH_H2C", args.gateway_h2c.to_string()),
            ("RUST_LOG", "warn".into()),
        ];
        let system = match Throwaway::start(&launcher, &format!("{run}_system"), &env).await {
            Ok(system) => system,
            Err(e) => {
                setup.clean_up(&args, &admin).await;
                return Err(e);
            }
        };
        let ready = system.wait_ready(Duration::from_secs(120)).await;
        setup.system = Some(system);
        if let Err(e) = ready {
            setup.clean_up(&args, &admin).await;
            return Err(e);
        }
        let gateway_url = setup.system.as_ref().map(|s| s.var("GATEWAY_URL").to_owned());
        let result = measure(&args, &setup, port, gateway_url, users, &amqp_url, &gateway).await;
        setup.clean_up(&args, &admin).await;
        return result;
    }
    let result = measure(&args, &setup, port, None, users, &amqp_url, &gateway).await;
    setup.clean_up(&args, &admin).await;
    result
}

/// Registers and logs in `n` users through the gateway: their ids and tokens.
async fn register(api: &str, n: usize) -> anyhow::Result<Vec<(Uuid, String)>> {
    let http = reqwest::Client::new();
    let gate = Arc::new(Semaphore::new(8));
    let mut tasks = Vec::with_capacity(n);
    for _ in 0..n {
        let (http, api, permit) = (http.clone(), api.to_string(), gate.clone().acquire_owned().await?);
        tasks.push(tokio::spawn(async move {
            let email = format!("{}@example.com", Uuid::new_v4().simple());
            let body = serde_json::json!({"email": email, "password": "correct horse", "firstName": "Bench"});
            let r = http.post(format!("{api}/identity/register")).json(&body).send().await?;
            anyhow::ensure!(r.status().is_success(), "register: {}", r.status());
            let user: serde_json::Value = r.json().await?;
            let id: Uuid = user["id"].as_str().unwrap_or_default().parse()?;
            let login = serde_json::json!({"email": email, "password": "correct horse"});
            let r = http.post(format!("{api}/identity/login")).json(&login).send().await?;
            anyhow::ensure!(r.status().is_success(), "login: {}", r.status());
            let token: serde_json::Value = r.json().await?;
            drop(permit);
            Ok((id, token["accessToken"].as_str().unwrap_or_default().to_string()))
        }));
    }
    let mut tokens = Vec::with_capacity(n);
    for t in tasks {
        tokens.push(t.await??);
    }
    Ok(tokens)
}

async fn measure(
    args: &Args,
    setup: &Setup,
    port: u16,
    gateway_url: Option<String>,
    users: usize,
    amqp_url: &str,
    gateway: &runtime::auth::AssertionSigner,
) -> anyhow::Result<()> {
    let http = reqwest::Client::builder().pool_max_idle_per_host(0).build()?;
    let push_url = format!("http://127.0.0.1:{port}/api/v1/orders");
    let probe = Uuid::new_v4();
    wait_ok(&http, "the push service", || {
        http.get(&push_url).header(runtime::auth::ASSERTION_HEADER, assertion(gateway, probe))
    })
    .await?;
    // How each user's stream is opened: straight to the push service with the
    // gateway's assertion, or through the gateway with the user's token.
    let (url, user_ids, auths): (String, Vec<Uuid>, Vec<(&'static str, String)>) = match &gateway_url {
        Some(base) => {
            let ready = format!("{base}/health/ready");
            wait_ok(&http, "the gateway", || http.get(&ready)).await?;
            let api = format!("{base}/api/v1");
            let started = Instant::now();
            let registered = register(&api, users).await?;
            println!(
                "  ({users} users registered and logged in through the gateway in {:.1} s)",
                started.elapsed().as_secs_f64()
            );
            let auths = registered.iter().map(|(_, t)| ("authorization", format!("Bearer {t}"))).collect();
            (format!("{api}/push/orders"), registered.into_iter().map(|(id, _)| id).collect(), auths)
        }
        None => {
            let ids: Vec<Uuid> = (0..users).map(|_| Uuid::new_v4()).collect();
            (push_url.clone(), ids, Vec::new())
        }
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss = |pids: &[(&str, u32)]| pids.iter().map(|(_, pid)| rss_kib(*pid)).collect::<Vec<u64>>();
    let pids = setup.pids();
    let rss_before = rss(&pids);
    let client_before = rss_kib(std::process::id());
    let tcp_before = kernel_tcp_kib();

    // Open the streams, round-robin over the users.
    let (arr_tx, mut arr_rx) = mpsc::unbounded_channel();
    let (conn_tx, mut conn_rx) = mpsc::unbounded_channel();
    let gate = Arc::new(Semaphore::new(args.connect_concurrency));
    let started = Instant::now();
    let mut opened = 0usize;
    let mut refused = 0usize;
    let mut handles = Vec::with_capacity(args.connections);
    let clients: Vec<reqwest::Client> = match args.h2c_streams_per_connection {
        Some(per) => (0..args.connections.div_ceil(per.max(1)))
            .map(|_| reqwest::Client::builder().http2_prior_knowledge().build())
            .collect::<Result<_, _>>()?,
        None => vec![http.clone()],
    };
    for i in 0..args.connections {
        let permit = gate.clone().acquire_owned().await?;
        let http = clients[i % clients.len()].clone();
        // An assertion is good for one request, signed as it is sent (a
        // token, through the gateway, for any number).
        let auth = match &gateway_url {
            Some(_) => auths[i % users].clone(),
            None => (runtime::auth::ASSERTION_HEADER, assertion(gateway, user_ids[i % users])),
        };
        handles.push(tokio::spawn(subscriber(http, url.clone(), auth, arr_tx.clone(), conn_tx.clone(), permit)));
    }
    while opened + refused < args.connections {
        match tokio::time::timeout(Duration::from_secs(60), conn_rx.recv()).await {
            Ok(Some(true)) => opened += 1,
            Ok(Some(false)) => refused += 1,
            _ => break,
        }
    }
    let connect_time = started.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_open = rss(&pids);
    let client_open = rss_kib(std::process::id());
    let tcp_open = kernel_tcp_kib();
    // What open streams cost while nothing happens: timers, keep-alives.
    // Each server process's CPU time in ms, and how much it grew since `start`.
    let cpu = || pids.iter().map(|(_, pid)| cpu_ms(*pid)).collect::<Vec<u64>>();
    let cpu_since = |start: &[u64]| cpu().iter().zip(start).map(|(end, start)| end - start).collect::<Vec<u64>>();
    let cpu_idle_start = cpu();
    tokio::time::sleep(Duration::from_secs(args.idle_secs)).await;
    let cpu_idle = cpu_since(&cpu_idle_start);
    // Each user's streams (all opened when none was refused).
    let streams_of = |u: usize| (0..args.connections).filter(|i| i % users == u).count();

    // Publish order events as ordering does, at a steady rate.
    let conn = Connection::connect(amqp_url, ConnectionProperties::default()).await?;
    let channel = conn.create_channel().await?;
    channel.confirm_select(Default::default()).await?;
    let mut confirms = Vec::with_capacity(args.events);
    // Per order: when it was published and on how many streams it is due.
    let mut sent: HashMap<Uuid, (Instant, usize)> = HashMap::with_capacity(args.events);
    let every = Duration::from_secs_f64(1.0 / args.rate.max(1) as f64);
    let mut tick = tokio::time::interval(every);
    let publish_start = Instant::now();
    let (cpu_events_start, client_cpu_events_start) = (cpu(), cpu_ms(std::process::id()));
    for i in 0..args.events {
        tick.tick().await;
        let order = Uuid::new_v4();
        let user = user_ids[i % users];
        let body = serde_json::json!({
            "orderId": order, "userId": user, "price": 10, "occurredAt": chrono::Utc::now(),
        });
        let props = BasicProperties::default()
            .with_message_id(Uuid::new_v4().to_string().into())
            .with_type("OrderCreated".into())
            .with_content_type("application/json".into())
            .with_delivery_mode(2);
        let body = serde_json::to_vec(&body)?;
        sent.insert(order, (Instant::now(), streams_of(i % users)));
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
    // Each delivery's latency, and each event's fan-out: to the last of its user's streams.
    let due: usize = sent.values().map(|(_, n)| n).sum();
    let mut deliveries = Vec::with_capacity(due);
    let mut last: HashMap<Uuid, (Instant, usize)> = HashMap::with_capacity(args.events);
    while deliveries.len() < due {
        match tokio::time::timeout(Duration::from_secs(30), arr_rx.recv()).await {
            Ok(Some((order, at))) => {
                let Some((published, _)) = sent.get(&order) else { continue };
                deliveries.push(at - *published);
                let entry = last.entry(order).or_insert((at, 0));
                entry.0 = entry.0.max(at);
                entry.1 += 1;
            }
            _ => break,
        }
    }
    let publish_time = publish_start.elapsed();
    let cpu_events = cpu_since(&cpu_events_start);
    let client_cpu_events = cpu_ms(std::process::id()) - client_cpu_events_start;
    let rss_after = rss(&pids);
    deliveries.sort();
    let mut fanouts: Vec<Duration> = last
        .iter()
        .filter(|(order, (_, n))| sent.get(*order).is_some_and(|(_, due)| n == due))
        .map(|(order, (at, _))| *at - sent[order].0)
        .collect();
    fanouts.sort();

    let sum = |v: &[u64]| v.iter().sum::<u64>();
    let per_stream = |before: u64, open: u64| {
        if opened > 0 { open.saturating_sub(before) as f64 / opened as f64 } else { 0.0 }
    };
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let mib = |k: u64| k as f64 / 1024.0;
    println!();
    let what = if gateway_url.is_some() { "through the gateway" } else { "straight to the push service" };
    println!(
        "push-service fan-out benchmark, {what} ({} CPUs)",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let transport = match args.h2c_streams_per_connection {
        Some(per) => format!("h2c, {per} per connection, {} connections", clients.len()),
        None => "HTTP/1.1, one connection each".to_string(),
    };
    println!(
        "  streams open              {opened} of {} ({refused} refused) of {users} users, in {:.1} s ({transport})",
        args.connections,
        connect_time.as_secs_f64()
    );
    if gateway_url.is_some() {
        let hop = if args.gateway_h2c { "h2c (GATEWAY_PUSH_H2C=true)" } else { "HTTP/1.1 (GATEWAY_PUSH_H2C=false)" };
        println!("  gateway → push service    {hop}");
    }
    for (i, (name, _)) in pids.iter().enumerate() {
        println!(
            "  resident memory           {:.1} MiB idle, {:.1} MiB with the streams open, {:.1} MiB after the events: {name}",
            mib(rss_before[i]),
            mib(rss_open[i]),
            mib(rss_after[i])
        );
    }
    for (i, (name, _)) in pids.iter().enumerate() {
        println!("  memory per stream         {:.1} KiB: {name}", per_stream(rss_before[i], rss_open[i]));
    }
    if pids.len() > 1 {
        println!(
            "  memory per stream         {:.1} KiB: all server processes together",
            per_stream(sum(&rss_before), sum(&rss_open))
        );
    }
    for (i, (name, _)) in pids.iter().enumerate() {
        println!("  CPU with the streams idle {} ms over {} s: {name}", cpu_idle[i], args.idle_secs);
    }
    println!(
        "  (not counted above)       {:.1} KiB per stream in the benchmark's client, {:.1} KiB in the kernel's TCP buffers (machine-wide)",
        per_stream(client_before, client_open),
        per_stream(tcp_before, tcp_open)
    );
    println!(
        "  events delivered          {} of {} deliveries ({} events) at {} /s ({:.1} s)",
        deliveries.len(),
        due,
        args.events,
        args.rate,
        publish_time.as_secs_f64()
    );
    // CPU per event (fanned out to all of its user's streams): what one
    // fan-out costs the two cores, whatever the latency.
    let per_event = |ms: u64| ms as f64 / args.events.max(1) as f64;
    for (i, (name, _)) in pids.iter().enumerate() {
        println!(
            "  CPU per event             {:.2} ms: {name} ({} ms in all)",
            per_event(cpu_events[i]),
            cpu_events[i]
        );
    }
    println!(
        "  CPU per event             {:.2} ms: the benchmark's client (reads and parses every delivery)",
        per_event(client_cpu_events)
    );
    println!(
        "  delivery latency          p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms (publish → one stream)",
        ms(percentile(&deliveries, 0.50)),
        ms(percentile(&deliveries, 0.99)),
        ms(deliveries.last().copied().unwrap_or_default())
    );
    println!(
        "  fan-out latency           p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms (publish → the last of the user's {} streams)",
        ms(percentile(&fanouts, 0.50)),
        ms(percentile(&fanouts, 0.99)),
        ms(fanouts.last().copied().unwrap_or_default()),
        if users == 1 { opened.to_string() } else { format!("~{}", opened / users) }
    );

    let _ = conn.close(200, "done".into()).await;
    for h in handles {
        h.abort();
    }
    anyhow::ensure!(deliveries.len() == due, "{} deliveries were missing", due - deliveries.len());
    Ok(())
}
