//! `poller`: single-page apps that poll. Each client is one user who places
//! an order and then asks for it every `--every-ms` (`GET
//! /ordering/orders/{id}` with `If-None-Match`, as a browser revalidates)
//! until it is final, then places the next; no event stream, no long poll.
//! Reports orders/s, polls/s and the latency of the POST and of each GET.
//!
//!   poller --url http://127.0.0.1:8080/api/v1 --clients 20 --every-ms 20 --duration 20 --json
//!
//! Exits 1 when an order is not final in `--order-timeout` seconds or any
//! answer is unexpected (they are counted by kind in the report).

use anyhow::{Context, bail};
use clap::Parser;
use loadgen::stats::{ErrorCounts, Latencies, Summary};
use reqwest::StatusCode;
use serde::Serialize;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::task::JoinSet;

#[derive(Parser, Debug, Clone)]
#[command(name = "poller", about = "Clients that place an order and poll it until it is final")]
struct Args {
    /// The public API's base URL.
    #[arg(long, env = "LOADGEN_URL", default_value = "http://127.0.0.1:8080/api/v1")]
    url: String,
    /// Concurrent clients (one user each).
    #[arg(long, default_value_t = 20)]
    clients: usize,
    /// Milliseconds between a client's polls of its pending order.
    #[arg(long, default_value_t = 20)]
    every_ms: u64,
    /// Seconds of load (after the users are set up).
    #[arg(long, default_value_t = 20.0)]
    duration: f64,
    /// Seconds an order may stay pending before it counts as an error.
    #[arg(long, default_value_t = 30.0)]
    order_timeout: f64,
    /// A shell command run (and waited for) when the setup is done, just
    /// before the first order (e.g. a snapshot of CPU counters).
    #[arg(long)]
    after_setup: Option<String>,
    /// A shell command run (and waited for) when the load has ended.
    #[arg(long)]
    after_load: Option<String>,
    /// Print the report as JSON on stdout.
    #[arg(long)]
    json: bool,
}

#[derive(Default)]
struct Stats {
    post: Latencies,
    get: Latencies,
    /// From the 202 to the answer that showed the order final.
    completion: Latencies,
    orders: u64,
    polls: u64,
    not_modified: u64,
    errors: ErrorCounts,
}

#[derive(Serialize)]
struct Report {
    clients: usize,
    every_ms: u64,
    seconds: f64,
    orders_completed: u64,
    orders_per_sec: f64,
    polls: u64,
    polls_per_sec: f64,
    /// Share of the polls answered 304.
    not_modified_share: f64,
    post_202: Summary,
    get: Summary,
    completion: Summary,
    errors: std::collections::BTreeMap<String, u64>,
}

struct Client {
    http: reqwest::Client,
    token: String,
}

async fn setup(http: &reqwest::Client, url: &str, run: &str, n: usize) -> anyhow::Result<Client> {
    let email = format!("poller-{run}-{n}@example.com");
    let password = "poller password";
    let resp = http
        .post(format!("{url}/identity/register"))
        .json(&serde_json::json!({"email": email, "password": password, "firstName": "Poll"}))
        .send()
        .await?;
    if resp.status() != StatusCode::CREATED {
        bail!("register {email}: HTTP {} {}", resp.status(), resp.text().await.unwrap_or_default());
    }
    let resp = http
        .post(format!("{url}/identity/login"))
        .json(&serde_json::json!({"email": email, "password": password}))
        .send()
        .await?;
    if resp.status() != StatusCode::OK {
        bail!("login {email}: HTTP {}", resp.status());
    }
    let body: serde_json::Value = resp.json().await?;
    let token = body["accessToken"].as_str().context("login answer without accessToken")?.to_string();
    let resp = http
        .post(format!("{url}/billing/account/deposit"))
        .bearer_auth(&token)
        .json(&serde_json::json!({"amount": 1_000_000}))
        .send()
        .await?;
    if !resp.status().is_success() {
        bail!("deposit: HTTP {}", resp.status());
    }
    Ok(Client { http: http.clone(), token })
}

/// Places one order and polls it until it is final; false when it did not
/// get there (the error is counted).
async fn one_order(args: &Args, client: &Client, stats: &Mutex<Stats>) -> bool {
    let error = |kind: String| {
        stats.lock().expect("stats").errors.add(kind);
        false
    };
    let sent = Instant::now();
    let resp = client
        .http
        .post(format!("{}/ordering/orders", args.url))
        .bearer_auth(&client.token)
        .json(&serde_json::json!({"price": 1}))
        .timeout(Duration::from_secs(30))
        .send()
        .await;
    let resp = match resp {
        Ok(r) if r.status() == StatusCode::ACCEPTED => r,
        Ok(r) => return error(format!("post: HTTP {}", r.status().as_u16())),
        Err(_) => return error("post: transport".into()),
    };
    let mut etag = resp.headers().get("etag").and_then(|v| v.to_str().ok()).map(str::to_string);
    let body: serde_json::Value = match resp.json().await {
        Ok(b) => b,
        Err(_) => return error("post: body".into()),
    };
    let accepted = Instant::now();
    stats.lock().expect("stats").post.record(accepted - sent);
    let Some(id) = body["id"].as_str().map(str::to_string) else { return error("post: no id".into()) };
    let deadline = accepted + Duration::from_secs_f64(args.order_timeout);
    let mut tick = tokio::time::interval(Duration::from_millis(args.every_ms.max(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    while Instant::now() < deadline {
        tick.tick().await;
        let mut req = client
            .http
            .get(format!("{}/ordering/orders/{id}", args.url))
            .bearer_auth(&client.token)
            .timeout(Duration::from_secs(30));
        if let Some(tag) = &etag {
            req = req.header("if-none-match", tag);
        }
        let asked = Instant::now();
        let resp = match req.send().await {
            Ok(r) => r,
            Err(_) => return error("get: transport".into()),
        };
        let status = resp.status();
        if status == StatusCode::NOT_MODIFIED {
            let mut s = stats.lock().expect("stats");
            s.get.record(asked.elapsed());
            s.polls += 1;
            s.not_modified += 1;
            continue;
        }
        if status != StatusCode::OK {
            return error(format!("get: HTTP {}", status.as_u16()));
        }
        etag = resp.headers().get("etag").and_then(|v| v.to_str().ok()).map(str::to_string);
        let body: serde_json::Value = match resp.json().await {
            Ok(b) => b,
            Err(_) => return error("get: body".into()),
        };
        let done = Instant::now();
        let mut s = stats.lock().expect("stats");
        s.get.record(done - asked);
        s.polls += 1;
        if body["status"].as_str().is_some_and(|st| st != "pending") {
            s.completion.record(done - accepted);
            s.orders += 1;
            return true;
        }
    }
    error("order: not final in time".into())
}

async fn run_after(command: &Option<String>) -> anyhow::Result<()> {
    if let Some(cmd) = command {
        let status = tokio::process::Command::new("sh").arg("-c").arg(cmd).status().await?;
        anyhow::ensure!(status.success(), "{cmd:?} failed: {status}");
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let http = reqwest::Client::builder().pool_idle_timeout(Duration::from_secs(30)).build()?;
    let run = format!("{:x}", rand::random::<u32>());
    let mut setups = JoinSet::new();
    for n in 0..args.clients {
        let (http, url, run) = (http.clone(), args.url.clone(), run.clone());
        setups.spawn(async move { setup(&http, &url, &run, n).await });
    }
    let mut clients = Vec::new();
    while let Some(c) = setups.join_next().await {
        clients.push(Arc::new(c??));
    }
    run_after(&args.after_setup).await?;
    let stats = Arc::new(Mutex::new(Stats::default()));
    let started = Instant::now();
    let end = started + Duration::from_secs_f64(args.duration);
    let mut load = JoinSet::new();
    for client in clients {
        let (args, stats) = (args.clone(), stats.clone());
        load.spawn(async move {
            while Instant::now() < end {
                if !one_order(&args, &client, &stats).await {
                    // An error is counted; go on after a pause rather than spin.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        });
    }
    while load.join_next().await.is_some() {}
    let seconds = started.elapsed().as_secs_f64();
    run_after(&args.after_load).await?;
    let s = std::mem::take(&mut *stats.lock().expect("stats"));
    let report = Report {
        clients: args.clients,
        every_ms: args.every_ms,
        seconds,
        orders_completed: s.orders,
        orders_per_sec: s.orders as f64 / seconds,
        polls: s.polls,
        polls_per_sec: s.polls as f64 / seconds,
        not_modified_share: if s.polls == 0 { 0.0 } else { s.not_modified as f64 / s.polls as f64 },
        post_202: s.post.summary(),
        get: s.get.summary(),
        completion: s.completion.summary(),
        errors: s.errors.0,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "{} clients polling every {} ms, {:.1} s: {:.1} orders/s, {:.1} polls/s ({:.0} % 304), POST p50 {:.2} ms, \
             GET p50/p99 {:.2}/{:.2} ms, errors {:?}",
            report.clients,
            report.every_ms,
            report.seconds,
            report.orders_per_sec,
            report.polls_per_sec,
            report.not_modified_share * 100.0,
            report.post_202.p50_ms,
            report.get.p50_ms,
            report.get.p99_ms,
            report.errors
        );
    }
    if !report.errors.is_empty() {
        std::process::exit(1);
    }
    Ok(())
}
