//! `loadgen`: drives the order system through its gateway the way its users
//! do (register, log in, open the event stream, deposit, place orders and
//! follow each to its outcome), with a fixed number of concurrent clients
//! (closed loop) or at a fixed arrival rate (open loop), and reports POST→202
//! and completion latency, throughput and errors. It verifies as it goes and
//! at the end: every order final, every balance right, no stream event
//! missed or doubled; it exits 1 when anything does not add up.
//!
//!   loadgen --clients 20 --duration 30
//!   loadgen --rate 100 --users 50 --duration 30 --poll-share 0.2 --json
//!   loadgen --find-max --max-p99-ms 250

use anyhow::{Context, bail};
use clap::Parser;
use loadgen::ledger::{Ledger, Outcome, Problem, Seen, cents};
use loadgen::sse;
use loadgen::stats::{ErrorCounts, Latencies, Summary, per_second, short};
use rand::Rng;
use reqwest::StatusCode;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{Semaphore, oneshot};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

#[derive(Parser, Debug, Clone)]
#[command(name = "loadgen", about = "Load generator for the order system, through its gateway")]
struct Args {
    /// The public API's base URL.
    #[arg(long, env = "LOADGEN_URL", default_value = "http://127.0.0.1:8080/api/v1")]
    url: String,
    /// Closed loop: this many clients (one user each), each placing its next
    /// order when the last one's outcome arrived.
    #[arg(long, conflicts_with_all = ["rate", "find_max"])]
    clients: Option<usize>,
    /// Open loop: orders per second, spread over `--users` users, whatever
    /// the answers.
    #[arg(long)]
    rate: Option<f64>,
    /// Users of the open loop (and of --find-max).
    #[arg(long, default_value_t = 50)]
    users: usize,
    /// Seconds of load (each step's for --find-max: --step-secs).
    #[arg(long, default_value_t = 30.0)]
    duration: f64,
    /// Share of users (0..1) that also long-poll each order
    /// (`GET /ordering/orders/{id}`, `Prefer: wait`), besides the stream.
    #[arg(long, default_value_t = 0.2)]
    poll_share: f64,
    /// Share of orders priced above the balance, so that they fail.
    #[arg(long, default_value_t = 0.05)]
    fail_share: f64,
    /// Each user's deposit.
    #[arg(long, default_value_t = 1_000_000)]
    deposit: u64,
    /// How long an order may take to reach its outcome before it counts as
    /// an error (it is still verified at the end).
    #[arg(long, default_value_t = 30.0)]
    order_timeout: f64,
    /// Registrations and logins at a time while setting up.
    #[arg(long, default_value_t = 4)]
    setup_concurrency: usize,
    /// Steps the open-loop rate up until the bounds break; reports the
    /// highest rate that held them.
    #[arg(long)]
    find_max: bool,
    /// --find-max: the first rate.
    #[arg(long, default_value_t = 20.0)]
    start_rate: f64,
    /// --find-max: each next rate is this times the last.
    #[arg(long, default_value_t = 1.25)]
    step_factor: f64,
    /// --find-max: seconds per step.
    #[arg(long, default_value_t = 10.0)]
    step_secs: f64,
    /// --find-max: the bound on the completion p99 (202 → outcome on the stream).
    #[arg(long, default_value_t = 250.0)]
    max_p99_ms: f64,
    /// --find-max: the bound on errors per order sent.
    #[arg(long, default_value_t = 0.001)]
    max_error_rate: f64,
    /// --find-max: stop at this rate.
    #[arg(long, default_value_t = 5000.0)]
    max_rate: f64,
    /// Closed loop: stop after this many orders (sent), even before --duration.
    #[arg(long, requires = "clients")]
    orders: Option<u64>,
    /// A shell command run (and waited for) when the setup is done, just
    /// before the first order: e.g. a snapshot of the database's counters
    /// (`scripts/bench-dbwork`). Fails the run if it fails.
    #[arg(long)]
    after_setup: Option<String>,
    /// A shell command run (and waited for) when the last order is final,
    /// before the checks at the end read anything.
    #[arg(long)]
    after_load: Option<String>,
    /// Stand in for a reverse proxy in front of the gateway: user N's
    /// requests carry `X-Forwarded-For` with the Nth address of this IPv4
    /// network (e.g. 198.18.0.0/16), as an ingress sets it, so that each
    /// user is its own client address (run the gateway with
    /// GATEWAY_CLIENT_IP_HEADER=X-Forwarded-For).
    #[arg(long, value_name = "CIDR")]
    forwarded_for: Option<String>,
    /// Print the report as JSON on stdout (the progress line still goes to stderr).
    #[arg(long)]
    json: bool,
    /// No progress line.
    #[arg(long)]
    quiet: bool,
}

/// Measurements of one phase (a run, or a step of --find-max).
#[derive(Default)]
struct Stats {
    post: Latencies,
    stream: Latencies,
    poll: Latencies,
    errors: ErrorCounts,
    succeeded: u64,
    failed: u64,
}

#[derive(Default)]
struct Counters {
    sent: AtomicU64,
    accepted: AtomicU64,
    completed: AtomicU64,
    errors: AtomicU64,
    in_flight: AtomicU64,
}

struct Shared {
    args: Args,
    http: reqwest::Client,
    stats: Mutex<Stats>,
    counters: Counters,
}

impl Shared {
    /// The client of user `n`: with `--forwarded-for`, one that sends the
    /// user's own address in `X-Forwarded-For`.
    fn client_of(&self, n: usize) -> anyhow::Result<reqwest::Client> {
        let Some(cidr) = &self.args.forwarded_for else { return Ok(self.http.clone()) };
        let (net, bits) = cidr.split_once('/').context("--forwarded-for: NETWORK/BITS")?;
        let net: std::net::Ipv4Addr = net.parse().context("--forwarded-for: an IPv4 network")?;
        let bits: u32 = bits.parse().context("--forwarded-for: NETWORK/BITS")?;
        anyhow::ensure!((8..=30).contains(&bits), "--forwarded-for: a prefix of 8 to 30 bits");
        let hosts = (1u64 << (32 - bits)) - 2;
        let addr = std::net::Ipv4Addr::from(u32::from(net) + 1 + (n as u64 % hosts) as u32);
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert("x-forwarded-for", addr.to_string().parse()?);
        Ok(reqwest::Client::builder().pool_idle_timeout(Duration::from_secs(30)).default_headers(headers).build()?)
    }

    fn error(&self, kind: impl Into<String>) {
        self.counters.errors.fetch_add(1, Ordering::Relaxed);
        self.stats.lock().expect("stats").errors.add(kind);
    }

    fn take_stats(&self) -> Stats {
        std::mem::take(&mut *self.stats.lock().expect("stats"))
    }
}

struct User {
    /// The user's client: `Shared::http`, or one of its own that sends its
    /// address (`--forwarded-for`).
    http: reqwest::Client,
    token: String,
    polls: bool,
    state: Mutex<UserState>,
    /// Set once the stream is open (its first bytes arrived).
    ready: tokio::sync::Notify,
}

#[derive(Default)]
struct UserState {
    ledger: Ledger,
    /// When each order's 202 arrived, until its outcome comes on the stream.
    accepted_at: HashMap<Uuid, Instant>,
    waiters: HashMap<Uuid, oneshot::Sender<()>>,
    /// POSTs whose outcome is unknown (no answer): the balance cannot be checked.
    uncertain: u32,
    stream_open: bool,
}

/// An unexpected answer as an error kind: `HTTP <status>`; a 503 without
/// `Retry-After` (not a deliberate shed) is told apart.
fn status_kind(resp: &reqwest::Response) -> String {
    let status = resp.status().as_u16();
    if status == 503 && !resp.headers().contains_key("retry-after") {
        return "HTTP 503 without Retry-After".into();
    }
    format!("HTTP {status}")
}

fn kind_of(e: &reqwest::Error) -> &'static str {
    if e.is_timeout() {
        "timeout"
    } else if e.is_connect() {
        "connect"
    } else if e.is_body() || e.is_decode() {
        "body"
    } else {
        "request"
    }
}

// ------------------------------------------------------------------ setup

/// Retries a setup call answered 429/503 (throttles, the password-hash
/// bound) after its Retry-After, for up to a minute.
async fn send_retrying(
    shared: &Shared,
    build: impl Fn() -> reqwest::RequestBuilder,
) -> anyhow::Result<reqwest::Response> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let resp = build().timeout(Duration::from_secs(30)).send().await?;
        let status = resp.status();
        if (status == StatusCode::TOO_MANY_REQUESTS || status == StatusCode::SERVICE_UNAVAILABLE)
            && Instant::now() < deadline
        {
            let wait = resp
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(1)
                .clamp(1, 10);
            shared.error(format!("setup: {} (retried)", status_kind(&resp)));
            tokio::time::sleep(Duration::from_secs(wait)).await;
            continue;
        }
        return Ok(resp);
    }
}

async fn create_user(shared: Arc<Shared>, run: &str, n: usize, polls: bool) -> anyhow::Result<Arc<User>> {
    let base = &shared.args.url;
    let email = format!("loadgen-{run}-{n}@example.com");
    let password = "loadgen password";
    let http = shared.client_of(n)?;
    let resp = send_retrying(&shared, || {
        http.post(format!("{base}/identity/register")).json(&serde_json::json!({
            "email": email, "password": password, "firstName": "Load"
        }))
    })
    .await
    .context("register")?;
    if resp.status() != StatusCode::CREATED {
        bail!("register {email}: HTTP {} {}", resp.status(), resp.text().await.unwrap_or_default());
    }
    let resp = send_retrying(&shared, || {
        http.post(format!("{base}/identity/login")).json(&serde_json::json!({"email": email, "password": password}))
    })
    .await
    .context("login")?;
    if resp.status() != StatusCode::OK {
        bail!("login {email}: HTTP {}", resp.status());
    }
    let body: serde_json::Value = resp.json().await?;
    let token = body["accessToken"].as_str().context("login answer without accessToken")?.to_string();
    Ok(Arc::new(User { http, token, polls, state: Mutex::default(), ready: tokio::sync::Notify::new() }))
}

async fn deposit(shared: &Shared, user: &User) -> anyhow::Result<()> {
    let resp = send_retrying(shared, || {
        user.http
            .post(format!("{}/billing/account/deposit", shared.args.url))
            .bearer_auth(&user.token)
            .json(&serde_json::json!({"amount": shared.args.deposit}))
    })
    .await?;
    if !resp.status().is_success() {
        bail!("deposit: HTTP {}", resp.status());
    }
    user.state.lock().expect("user").ledger.deposited(i64::try_from(shared.args.deposit)? * 100);
    Ok(())
}

// ------------------------------------------------------------------ the event stream

/// Follows the user's event stream until `stop`, resuming from the last id
/// after a disconnect.
async fn follow_stream(shared: Arc<Shared>, user: Arc<User>, stop: CancellationToken) {
    loop {
        let last = user.state.lock().expect("user").ledger.last_event_id();
        let mut req = user.http.get(format!("{}/push/orders", shared.args.url)).bearer_auth(&user.token);
        if let Some(id) = last {
            req = req.header("last-event-id", id.to_string());
        }
        let opened = tokio::select! {
            _ = stop.cancelled() => return,
            r = req.send() => r,
        };
        match opened {
            Ok(resp) if resp.status() == StatusCode::OK => {
                let mut resp = resp;
                let mut parser = sse::Parser::default();
                loop {
                    let chunk = tokio::select! {
                        _ = stop.cancelled() => return,
                        c = resp.chunk() => c,
                    };
                    match chunk {
                        Ok(Some(bytes)) => {
                            let now = Instant::now();
                            {
                                let mut st = user.state.lock().expect("user");
                                if !st.stream_open {
                                    st.stream_open = true;
                                    user.ready.notify_one();
                                }
                            }
                            for event in parser.push(&bytes) {
                                on_event(&shared, &user, event, now);
                            }
                        }
                        Ok(None) => {
                            shared.error("stream: ended by the server");
                            break;
                        }
                        Err(e) => {
                            shared.error(format!("stream: {}", kind_of(&e)));
                            break;
                        }
                    }
                }
            }
            Ok(resp) => shared.error(format!("stream: {}", status_kind(&resp))),
            Err(e) => shared.error(format!("stream: {}", kind_of(&e))),
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
    }
}

fn on_event(shared: &Shared, user: &User, event: sse::Event, at: Instant) {
    if event.event == "reset" {
        user.state.lock().expect("user").ledger.reset();
        shared.error("stream: reset");
        return;
    }
    if event.event != "OrderCreated" && event.event != "OrderFailed" {
        return;
    }
    let data: serde_json::Value = match serde_json::from_str(&event.data) {
        Ok(d) => d,
        Err(_) => return shared.error("stream: unparsable event"),
    };
    let (Some(order), Some(outcome)) = (
        data["orderId"].as_str().and_then(|s| Uuid::parse_str(s).ok()),
        data["status"].as_str().and_then(Outcome::parse),
    ) else {
        return shared.error("stream: event without order id or final status");
    };
    let id = event.id.as_deref().and_then(|s| s.parse().ok());
    let mut st = user.state.lock().expect("user");
    if st.ledger.stream_event(id, order, outcome) == Seen::First {
        if let Some(t) = st.accepted_at.remove(&order) {
            complete(shared, outcome, at.saturating_duration_since(t));
        }
        if let Some(w) = st.waiters.remove(&order) {
            let _ = w.send(());
        }
    }
}

fn complete(shared: &Shared, outcome: Outcome, latency: Duration) {
    shared.counters.completed.fetch_add(1, Ordering::Relaxed);
    let mut s = shared.stats.lock().expect("stats");
    s.stream.record(latency);
    match outcome {
        Outcome::Succeeded => s.succeeded += 1,
        Outcome::Failed => s.failed += 1,
    }
}

// ------------------------------------------------------------------ one order

async fn place_and_follow(shared: Arc<Shared>, user: Arc<User>) {
    shared.counters.in_flight.fetch_add(1, Ordering::Relaxed);
    place(&shared, &user).await;
    shared.counters.in_flight.fetch_sub(1, Ordering::Relaxed);
}

async fn place(shared: &Shared, user: &User) {
    let args = &shared.args;
    let price: u64 = {
        let mut rng = rand::thread_rng();
        if rng.gen_bool(args.fail_share.clamp(0.0, 1.0)) { args.deposit * 10 } else { rng.gen_range(1..=100) }
    };
    shared.counters.sent.fetch_add(1, Ordering::Relaxed);
    let sent = Instant::now();
    let resp = user
        .http
        .post(format!("{}/ordering/orders", args.url))
        .bearer_auth(&user.token)
        .json(&serde_json::json!({ "price": price }))
        .timeout(Duration::from_secs(30))
        .send()
        .await;
    let resp = match resp {
        Ok(r) => r,
        Err(e) => {
            // Sent, maybe placed: this user's balance cannot be checked.
            user.state.lock().expect("user").uncertain += 1;
            return shared.error(format!("post: {}", kind_of(&e)));
        }
    };
    if resp.status() != StatusCode::ACCEPTED {
        return shared.error(format!("post: {}", status_kind(&resp)));
    }
    let body: serde_json::Value = match resp.json().await {
        Ok(b) => b,
        Err(_) => {
            user.state.lock().expect("user").uncertain += 1;
            return shared.error("post: unreadable 202 body");
        }
    };
    let accepted = Instant::now();
    let Some(id) = body["id"].as_str().and_then(|s| Uuid::parse_str(s).ok()) else {
        user.state.lock().expect("user").uncertain += 1;
        return shared.error("post: 202 without an order id");
    };
    shared.counters.accepted.fetch_add(1, Ordering::Relaxed);
    shared.stats.lock().expect("stats").post.record(accepted - sent);

    let (tx, rx) = oneshot::channel();
    {
        let mut st = user.state.lock().expect("user");
        match st.ledger.accepted(id, i64::try_from(price).unwrap_or(i64::MAX) * 100) {
            // Its event came before the 202 was read.
            Some(outcome) => complete(shared, outcome, Duration::ZERO),
            None => {
                st.accepted_at.insert(id, accepted);
                st.waiters.insert(id, tx);
            }
        }
    }
    let timeout = Duration::from_secs_f64(args.order_timeout);
    let stream = async {
        if tokio::time::timeout(timeout, rx).await.is_err() {
            let mut st = user.state.lock().expect("user");
            st.waiters.remove(&id);
            if !st.ledger.on_stream(id) {
                drop(st);
                shared.error("outcome: not on the stream in time");
            }
        }
    };
    if user.polls {
        tokio::join!(stream, poll(shared, user, id, accepted, timeout));
    } else {
        stream.await;
    }
}

/// Long-polls the order until it is final.
async fn poll(shared: &Shared, user: &User, id: Uuid, accepted: Instant, timeout: Duration) {
    let deadline = accepted + timeout;
    let mut etag: Option<String> = None;
    while Instant::now() < deadline {
        let mut req = user
            .http
            .get(format!("{}/ordering/orders/{id}", shared.args.url))
            .bearer_auth(&user.token)
            .header("prefer", "wait=10")
            .timeout(Duration::from_secs(20));
        if let Some(tag) = &etag {
            req = req.header("if-none-match", tag);
        }
        match req.send().await {
            Ok(resp) if resp.status() == StatusCode::NOT_MODIFIED => continue,
            Ok(resp) if resp.status() == StatusCode::OK => {
                etag = resp.headers().get("etag").and_then(|v| v.to_str().ok()).map(str::to_string);
                let body: serde_json::Value = match resp.json().await {
                    Ok(b) => b,
                    Err(e) => {
                        shared.error(format!("poll: {}", kind_of(&e)));
                        continue;
                    }
                };
                if let Some(outcome) = body["status"].as_str().and_then(Outcome::parse) {
                    let at = Instant::now();
                    shared.stats.lock().expect("stats").poll.record(at - accepted);
                    user.state.lock().expect("user").ledger.polled(id, outcome);
                    return;
                }
            }
            Ok(resp) => {
                shared.error(format!("poll: {}", status_kind(&resp)));
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => {
                shared.error(format!("poll: {}", kind_of(&e)));
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    shared.error("outcome: not final by polling in time");
}

// ------------------------------------------------------------------ load

async fn closed_loop(shared: Arc<Shared>, users: &[Arc<User>], duration: Duration, orders: Option<u64>) {
    let end = Instant::now() + duration;
    // Orders still to place, when the run is bounded by a count.
    let left = Arc::new(std::sync::atomic::AtomicU64::new(orders.unwrap_or(u64::MAX)));
    let take = move || left.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1)).is_ok();
    let mut clients = JoinSet::new();
    for user in users {
        let (shared, user, take) = (shared.clone(), user.clone(), take.clone());
        clients.spawn(async move {
            while Instant::now() < end && take() {
                place_and_follow(shared.clone(), user.clone()).await;
            }
        });
    }
    while clients.join_next().await.is_some() {}
}

/// Sends at `rate` for `duration`; then waits (up to the order timeout and
/// a bit) for the orders in flight.
async fn open_loop(shared: Arc<Shared>, users: &[Arc<User>], rate: f64, duration: Duration) {
    let start = tokio::time::Instant::now();
    let interval = Duration::from_secs_f64(1.0 / rate.max(0.001));
    let mut orders = JoinSet::new();
    let mut n: u64 = 0;
    loop {
        let at = start + interval.mul_f64(n as f64);
        if at >= start + duration {
            break;
        }
        tokio::time::sleep_until(at).await;
        let user = users[(n as usize) % users.len()].clone();
        orders.spawn(place_and_follow(shared.clone(), user));
        n += 1;
        while orders.try_join_next().is_some() {}
    }
    while orders.join_next().await.is_some() {}
}

// ------------------------------------------------------------------ report

#[derive(Serialize)]
struct Orders {
    sent: u64,
    accepted: u64,
    completed: u64,
    succeeded: u64,
    failed: u64,
}

#[derive(Serialize)]
struct Phase {
    #[serde(skip_serializing_if = "Option::is_none")]
    rate: Option<f64>,
    seconds: f64,
    orders: Orders,
    completed_per_sec: f64,
    post_202: Summary,
    completion_stream: Summary,
    completion_poll: Summary,
    errors: BTreeMap<String, u64>,
}

impl Phase {
    fn of(stats: Stats, sent: u64, rate: Option<f64>, elapsed: Duration) -> Phase {
        let completed = stats.stream.count();
        Phase {
            rate,
            seconds: elapsed.as_secs_f64(),
            orders: Orders {
                sent,
                accepted: stats.post.count(),
                completed,
                succeeded: stats.succeeded,
                failed: stats.failed,
            },
            completed_per_sec: per_second(completed, elapsed),
            post_202: stats.post.summary(),
            completion_stream: stats.stream.summary(),
            completion_poll: stats.poll.summary(),
            errors: stats.errors.0,
        }
    }

    fn error_rate(&self) -> f64 {
        let errors: u64 = self.errors.iter().filter(|(k, _)| !k.starts_with("setup")).map(|(_, n)| n).sum();
        errors as f64 / self.orders.sent.max(1) as f64
    }
}

#[derive(Serialize)]
struct Verification {
    ok: bool,
    users: usize,
    orders: usize,
    final_orders: usize,
    /// Users with a POST of unknown outcome, whose balance was not checked.
    balances_unchecked: usize,
    problems: usize,
    first_problems: Vec<String>,
}

#[derive(Serialize)]
struct FindMax {
    bound_p99_ms: f64,
    bound_error_rate: f64,
    steps: Vec<Phase>,
    max_sustainable_rate: Option<f64>,
}

#[derive(Serialize)]
struct Report {
    gateway: String,
    mode: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    clients: Option<usize>,
    users: usize,
    poll_share: f64,
    result: Phase,
    #[serde(skip_serializing_if = "Option::is_none")]
    find_max: Option<FindMax>,
    verification: Verification,
}

fn print_phase(p: &Phase) {
    println!(
        "  orders                 {} sent, {} accepted, {} completed ({} succeeded, {} failed)",
        p.orders.sent, p.orders.accepted, p.orders.completed, p.orders.succeeded, p.orders.failed
    );
    println!("  completed orders/s     {:.1} over {:.1} s", p.completed_per_sec, p.seconds);
    println!("  POST -> 202            {}", p.post_202);
    println!("  202 -> stream outcome  {}", p.completion_stream);
    println!("  202 -> poll outcome    {}", p.completion_poll);
    if p.errors.is_empty() {
        println!("  errors                 none");
    } else {
        println!("  errors                 {}", p.errors.values().sum::<u64>());
        for (k, n) in &p.errors {
            println!("    {n:>8}  {k}");
        }
    }
}

fn progress(shared: Arc<Shared>, stop: CancellationToken) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let tty = std::io::stderr().is_terminal();
        let start = Instant::now();
        let mut last = (start, 0u64);
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut n = 0u64;
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tick.tick() => {}
            }
            n += 1;
            let c = &shared.counters;
            let completed = c.completed.load(Ordering::Relaxed);
            let now = Instant::now();
            let rate = per_second(completed - last.1, now - last.0);
            last = (now, completed);
            let line = format!(
                "[{:>4.0}s] sent {} accepted {} completed {} in flight {} errors {} | {:.0} completed/s",
                (now - start).as_secs_f64(),
                c.sent.load(Ordering::Relaxed),
                c.accepted.load(Ordering::Relaxed),
                completed,
                c.in_flight.load(Ordering::Relaxed),
                c.errors.load(Ordering::Relaxed),
                rate
            );
            if tty {
                eprint!("\r{line}\x1b[K");
            } else if n.is_multiple_of(5) {
                eprintln!("{line}");
            }
        }
        if tty {
            eprintln!();
        }
        let _ = std::io::stderr().flush();
    })
}

async fn verify(shared: &Shared, users: &[Arc<User>]) -> Verification {
    let mut problems: Vec<Problem> = Vec::new();
    let (mut orders, mut final_orders, mut unchecked) = (0, 0, 0);
    let mut balance_errors = 0;
    for user in users {
        let uncertain = user.state.lock().expect("user").uncertain > 0;
        let balance = if uncertain {
            unchecked += 1;
            None
        } else {
            let resp = user
                .http
                .get(format!("{}/billing/account", shared.args.url))
                .bearer_auth(&user.token)
                .timeout(Duration::from_secs(30))
                .send()
                .await;
            match resp {
                Ok(r) if r.status() == StatusCode::OK => {
                    r.json::<serde_json::Value>().await.ok().and_then(|b| cents(&b["amount"]))
                }
                _ => None,
            }
        };
        if balance.is_none() && !uncertain {
            balance_errors += 1;
        }
        let st = user.state.lock().expect("user");
        let (o, f) = st.ledger.counts();
        orders += o;
        final_orders += f;
        // A POST without an answer may have placed an order this user never
        // heard of: its event is then no problem, and the balance unchecked.
        problems.extend(
            st.ledger.verify(balance).into_iter().filter(|p| !(uncertain && matches!(p, Problem::Unexpected(_)))),
        );
    }
    let mut first: Vec<String> = problems.iter().take(20).map(|p| p.to_string()).collect();
    if balance_errors > 0 {
        first.insert(0, format!("the balance of {balance_errors} users could not be read"));
    }
    Verification {
        ok: problems.is_empty() && balance_errors == 0,
        users: users.len(),
        orders,
        final_orders,
        balances_unchecked: unchecked,
        problems: problems.len() + balance_errors,
        first_problems: first,
    }
}

// ------------------------------------------------------------------ main

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.clients.is_none() && args.rate.is_none() && !args.find_max {
        bail!("give --clients N (closed loop), --rate R (open loop) or --find-max");
    }
    let n_users = args.clients.unwrap_or(args.users).max(1);
    let http = reqwest::Client::builder().pool_idle_timeout(Duration::from_secs(30)).build()?;
    let shared = Arc::new(Shared { args: args.clone(), http, stats: Mutex::default(), counters: Counters::default() });

    // Setup: users, their streams (open before the first order), deposits.
    let run = format!("{:08x}", rand::random::<u32>());
    if !args.quiet {
        eprintln!("loadgen: setting up {n_users} users at {} ...", args.url);
    }
    let setup_started = Instant::now();
    let gate = Arc::new(Semaphore::new(args.setup_concurrency.max(1)));
    let mut creating = JoinSet::new();
    let pollers = (args.poll_share.clamp(0.0, 1.0) * n_users as f64).round() as usize;
    for n in 0..n_users {
        let (shared, gate, run) = (shared.clone(), gate.clone(), run.clone());
        creating.spawn(async move {
            let _permit = gate.acquire().await?;
            let user = create_user(shared, &run, n, n < pollers).await?;
            anyhow::Ok((n, user))
        });
    }
    let mut users: Vec<(usize, Arc<User>)> = Vec::with_capacity(n_users);
    while let Some(r) = creating.join_next().await {
        users.push(r??);
    }
    users.sort_by_key(|(n, _)| *n);
    let users: Vec<Arc<User>> = users.into_iter().map(|(_, u)| u).collect();

    let streams_stop = CancellationToken::new();
    let mut streams = JoinSet::new();
    for user in &users {
        streams.spawn(follow_stream(shared.clone(), user.clone(), streams_stop.clone()));
    }
    for user in &users {
        let opened = tokio::time::timeout(Duration::from_secs(30), async {
            if !user.state.lock().expect("user").stream_open {
                user.ready.notified().await;
            }
        });
        // Notified before we wait: the flag says so.
        if opened.await.is_err() && !user.state.lock().expect("user").stream_open {
            bail!("an event stream did not open within 30 s");
        }
        deposit(&shared, user).await?;
    }
    let setup_errors = shared.take_stats().errors;
    if !args.quiet {
        eprintln!("loadgen: {n_users} users ready in {:.1} s", setup_started.elapsed().as_secs_f64());
    }
    if let Some(command) = &args.after_setup {
        run_hook("--after-setup", command).await?;
    }
    let progress_stop = CancellationToken::new();
    let progress = if args.quiet { None } else { Some(progress(shared.clone(), progress_stop.clone())) };

    let mut find_max = None;
    let started = Instant::now();
    let (mode, result) = if args.clients.is_some() {
        closed_loop(shared.clone(), &users, Duration::from_secs_f64(args.duration), args.orders).await;
        let elapsed = started.elapsed();
        let sent = shared.counters.sent.load(Ordering::Relaxed);
        ("closed", Phase::of(shared.take_stats(), sent, None, elapsed))
    } else if let Some(rate) = args.rate {
        open_loop(shared.clone(), &users, rate, Duration::from_secs_f64(args.duration)).await;
        let elapsed = Duration::from_secs_f64(args.duration).max(Duration::from_millis(1));
        let sent = shared.counters.sent.load(Ordering::Relaxed);
        ("open", Phase::of(shared.take_stats(), sent, Some(rate), elapsed))
    } else {
        let mut steps: Vec<Phase> = Vec::new();
        let mut best = None;
        let mut rate = args.start_rate.max(0.1);
        let mut total = Stats::default();
        let mut total_sent = 0;
        while rate <= args.max_rate {
            let before = shared.counters.sent.load(Ordering::Relaxed);
            open_loop(shared.clone(), &users, rate, Duration::from_secs_f64(args.step_secs)).await;
            let sent = shared.counters.sent.load(Ordering::Relaxed) - before;
            let stats = shared.take_stats();
            total.post.add(&stats.post);
            total.stream.add(&stats.stream);
            total.poll.add(&stats.poll);
            total.errors.merge(&stats.errors);
            total.succeeded += stats.succeeded;
            total.failed += stats.failed;
            total_sent += sent;
            let phase = Phase::of(stats, sent, Some(rate), Duration::from_secs_f64(args.step_secs));
            let held = phase.completion_stream.p99_ms <= args.max_p99_ms
                && phase.error_rate() <= args.max_error_rate
                && phase.orders.completed + 1 >= phase.orders.sent;
            if !args.quiet {
                eprintln!(
                    "\nloadgen: step {:.0}/s: completed {:.1}/s, 202->stream p99 {} ms, POST p99 {} ms, error rate {:.4}: {}",
                    rate,
                    phase.completed_per_sec,
                    short(phase.completion_stream.p99_ms),
                    short(phase.post_202.p99_ms),
                    phase.error_rate(),
                    if held { "held" } else { "broke the bound" }
                );
            }
            steps.push(phase);
            if !held {
                break;
            }
            best = Some(rate);
            rate *= args.step_factor.max(1.01);
        }
        find_max = Some(FindMax {
            bound_p99_ms: args.max_p99_ms,
            bound_error_rate: args.max_error_rate,
            steps,
            max_sustainable_rate: best,
        });
        ("find-max", Phase::of(total, total_sent, None, started.elapsed()))
    };
    progress_stop.cancel();
    if let Some(p) = progress {
        let _ = p.await;
    }

    if let Some(command) = &args.after_load {
        run_hook("--after-load", command).await?;
    }
    // A moment for late or doubled events, then the checks.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let verification = verify(&shared, &users).await;
    streams_stop.cancel();
    while streams.join_next().await.is_some() {}

    let mut result = result;
    for (k, n) in setup_errors.0 {
        *result.errors.entry(k).or_default() += n;
    }
    let report = Report {
        gateway: args.url.clone(),
        mode,
        clients: args.clients,
        users: users.len(),
        poll_share: pollers as f64 / users.len() as f64,
        result,
        find_max,
        verification,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&report);
    }
    if !report.verification.ok {
        std::process::exit(1);
    }
    Ok(())
}

/// Runs `command` with `sh -c` and waits for it; an error if it fails.
async fn run_hook(what: &str, command: &str) -> anyhow::Result<()> {
    let status = tokio::process::Command::new("sh").arg("-c").arg(command).status().await?;
    if !status.success() {
        bail!("{what} command failed ({status}): {command}");
    }
    Ok(())
}

fn print_report(r: &Report) {
    let how = match (r.mode, r.clients, r.result.rate) {
        ("closed", Some(c), _) => format!("closed loop, {c} clients"),
        ("open", _, Some(rate)) => format!("open loop, {rate} orders/s over {} users", r.users),
        _ => format!("find-max over {} users", r.users),
    };
    println!("loadgen against {} ({how}, {:.0} % of users also poll)", r.gateway, r.poll_share * 100.0);
    print_phase(&r.result);
    if let Some(f) = &r.find_max {
        println!("  find-max (bounds: 202->stream p99 <= {} ms, errors <= {})", f.bound_p99_ms, f.bound_error_rate);
        for s in &f.steps {
            println!(
                "    {:>7.1}/s offered: {:>7.1}/s completed, POST p99 {} ms, 202->stream p50 {} / p99 {} ms, error rate {:.4}",
                s.rate.unwrap_or(0.0),
                s.completed_per_sec,
                short(s.post_202.p99_ms),
                short(s.completion_stream.p50_ms),
                short(s.completion_stream.p99_ms),
                s.error_rate()
            );
        }
        match f.max_sustainable_rate {
            Some(rate) => println!("  highest sustainable rate  {rate:.1} orders/s"),
            None => println!("  highest sustainable rate  none: the first step broke the bounds"),
        }
    }
    let v = &r.verification;
    if v.ok {
        println!(
            "  verified               {} orders of {} users all final, every balance right{}, no stream event missed or doubled",
            v.orders,
            v.users,
            if v.balances_unchecked > 0 {
                format!(" ({} balances unchecked: a POST of unknown outcome)", v.balances_unchecked)
            } else {
                String::new()
            }
        );
    } else {
        println!("  VERIFICATION FAILED    {} problems ({} of {} orders final):", v.problems, v.final_orders, v.orders);
        for p in &v.first_problems {
            println!("    {p}");
        }
    }
}
