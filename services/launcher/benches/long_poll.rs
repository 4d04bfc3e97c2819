//! Benchmark (not a test): N concurrent long polls (`Prefer: wait=30`) held
//! open through the gateway, the resident memory and CPU they cost while they
//! wait, and the time from each order's settlement to its long poll's answer.
//!
//!     cargo bench -p order-system --bench long_poll -- --waiters 2000
//!
//! Starts the `order-system` binary as a throwaway system of its own process
//! (`run --throwaway`: every service on free ports, with its own databases
//! and RabbitMQ vhost, removed at the end; throttles off), registers a user, and holds the user's account row locked in
//! billing's database so that the user's payments wait. It places N orders
//! (pending while the lock is held), opens one long poll per order (one
//! HTTP/1.1 connection each, as a browser would), measures the process's
//! resident memory and CPU time while they wait, then releases the lock: billing
//! answers the payments, ordering settles the orders (its `updated_at` is the
//! settlement time), and each long poll's answer is timed against it.

#[path = "../../../tools/bench/proc.rs"]
mod proc;
#[path = "../../../tools/bench/throwaway.rs"]
mod throwaway;
use clap::Parser;
use proc::{cpu_ms, rss_kib};
use std::sync::Arc;
use std::time::{Duration, Instant};
use throwaway::Throwaway;
use tokio::sync::Semaphore;
use uuid::Uuid;

#[derive(Parser, Debug)]
struct Args {
    /// Concurrent long polls (one pending order each).
    #[arg(long, default_value_t = 2000)]
    waiters: usize,
    /// Seconds of idle waiting over which CPU time is measured.
    #[arg(long, default_value_t = 5)]
    idle_secs: u64,
    /// Seconds given to open the long polls before measuring.
    #[arg(long, default_value_t = 10)]
    open_secs: u64,
    #[arg(long, env = "TEST_POSTGRES_URL", default_value = "postgres://postgres@127.0.0.1:5432")]
    postgres_url: String,
    #[arg(long, env = "TEST_AMQP_BASE", default_value = "amqp://guest:guest@127.0.0.1:5672")]
    amqp_base: String,
    #[arg(long, env = "TEST_RABBITMQ_API", default_value = "http://127.0.0.1:15672/api")]
    rabbitmq_api: String,
    /// Passed by `cargo bench`.
    #[arg(long, hide = true)]
    bench: bool,
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[(((sorted.len() - 1) as f64) * p).round() as usize]
}

/// Long-polls one order until it is no longer pending; the answer's arrival
/// and the order.
async fn follow(
    http: reqwest::Client,
    url: String,
    token: String,
) -> anyhow::Result<(chrono::DateTime<chrono::Utc>, serde_json::Value)> {
    loop {
        let resp = http.get(&url).bearer_auth(&token).header("Prefer", "wait=30").send().await?;
        let at = chrono::Utc::now();
        anyhow::ensure!(resp.status().is_success(), "long poll answered {}", resp.status());
        let order: serde_json::Value = resp.json().await?;
        if order["status"] != "pending" {
            return Ok((at, order));
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let run = format!("lp{}", &Uuid::new_v4().simple().to_string()[..8]);
    let system = Throwaway::start(
        std::path::Path::new(env!("CARGO_BIN_EXE_order-system")),
        &run,
        &[
            ("POSTGRES_URL", args.postgres_url.clone()),
            ("AMQP_URL", format!("{}/%2f", args.amqp_base)),
            ("RABBITMQ_API_URL", args.rabbitmq_api.clone()),
            ("RUST_LOG", "error".into()),
        ],
    )
    .await?;
    let result = match system.wait_ready(Duration::from_secs(120)).await {
        Ok(()) => measure(&args, &system).await,
        Err(e) => Err(e),
    };
    system.stop().await;
    result
}

async fn measure(args: &Args, system: &Throwaway) -> anyhow::Result<()> {
    let api = format!("{}/api/v1", system.var("GATEWAY_URL"));
    let pid = system.pid();
    let http = reqwest::Client::builder().pool_max_idle_per_host(0).build()?;
    let run = system.var("AMQP_VHOST");
    let email = format!("{run}@example.com");
    let body = serde_json::json!({"email": email, "password": "correct horse", "firstName": "Bench"});
    let user: serde_json::Value =
        http.post(format!("{api}/identity/register")).json(&body).send().await?.json().await?;
    let user_id: Uuid = user["id"].as_str().expect("id").parse()?;
    let login = serde_json::json!({"email": email, "password": "correct horse"});
    let token: serde_json::Value = http.post(format!("{api}/identity/login")).json(&login).send().await?.json().await?;
    let token = token["accessToken"].as_str().expect("token").to_string();
    let r = http
        .post(format!("{api}/billing/account/deposit"))
        .bearer_auth(&token)
        .json(&serde_json::json!({"amount": args.waiters}))
        .send()
        .await?;
    anyhow::ensure!(r.status().is_success(), "deposit: {}", r.status());

    // The user's payments wait for this lock: the orders stay pending. (Checked
    // at run time: it reaches into billing's database, whose queries are
    // prepared in billing's crate, not this one.)
    let billing =
        sqlx::PgPool::connect(&format!("{}/{}billing", args.postgres_url, system.var("DATABASE_PREFIX"))).await?;
    let mut lock = billing.begin().await?;
    sqlx::query("SELECT balance FROM accounts WHERE user_id = $1 FOR UPDATE")
        .bind(user_id)
        .fetch_one(&mut *lock)
        .await?;

    let gate = Arc::new(Semaphore::new(32));
    let mut placing = Vec::with_capacity(args.waiters);
    for _ in 0..args.waiters {
        let (http, api, token, permit) =
            (http.clone(), api.clone(), token.clone(), gate.clone().acquire_owned().await?);
        placing.push(tokio::spawn(async move {
            let r = http
                .post(format!("{api}/ordering/orders"))
                .bearer_auth(&token)
                .json(&serde_json::json!({"price": 1}))
                .send()
                .await?;
            drop(permit);
            anyhow::ensure!(r.status().as_u16() == 202, "order: {}", r.status());
            Ok::<_, anyhow::Error>(r.json::<serde_json::Value>().await?["id"].as_str().unwrap_or_default().to_string())
        }));
    }
    let mut ids = Vec::with_capacity(args.waiters);
    for p in placing {
        ids.push(p.await??);
    }
    eprintln!("{} orders pending", ids.len());
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_before = rss_kib(pid);
    // The process's own background work (relays, consumers, gauges), for comparison.
    let cpu_start = cpu_ms(pid);
    tokio::time::sleep(Duration::from_secs(args.idle_secs)).await;
    let cpu_base = cpu_ms(pid) - cpu_start;

    let started = Instant::now();
    let polls: Vec<_> = ids
        .iter()
        .map(|id| tokio::spawn(follow(http.clone(), format!("{api}/ordering/orders/{id}"), token.clone())))
        .collect();
    // Every long poll reaches ordering and waits (none is answered early).
    tokio::time::sleep(Duration::from_secs(args.open_secs)).await;
    let open_time = started.elapsed();
    let answered_early = polls.iter().filter(|p| p.is_finished()).count();
    let rss_open = rss_kib(pid);
    let cpu_start = cpu_ms(pid);
    tokio::time::sleep(Duration::from_secs(args.idle_secs)).await;
    let cpu_idle = cpu_ms(pid) - cpu_start;
    let rss_waiting = rss_kib(pid);

    let released = Instant::now();
    lock.commit().await?;
    eprintln!("{} long polls waiting; payments let go", ids.len());
    let mut latencies = Vec::with_capacity(ids.len());
    let mut failed = 0;
    for p in polls {
        match p.await? {
            Ok((at, order)) => {
                let settled: chrono::DateTime<chrono::Utc> = order["updatedAt"].as_str().unwrap_or_default().parse()?;
                latencies.push((at - settled).to_std().unwrap_or_default());
            }
            Err(e) => {
                failed += 1;
                eprintln!("long poll failed: {e}");
            }
        }
    }
    let all_settled = released.elapsed();
    latencies.sort();

    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let mib = |k: u64| k as f64 / 1024.0;
    let per_waiter = rss_open.saturating_sub(rss_before) as f64 / args.waiters as f64;
    println!();
    println!(
        "long-poll benchmark ({} CPUs, order-system {} build)",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        if cfg!(debug_assertions) { "debug" } else { "release" }
    );
    println!(
        "  long polls held           {} (one HTTP/1.1 connection each, through the gateway), {answered_early} answered early",
        args.waiters
    );
    println!(
        "  resident memory           {:.1} MiB before, {:.1} MiB with them waiting, {:.1} MiB after {} s more",
        mib(rss_before),
        mib(rss_open),
        mib(rss_waiting),
        args.idle_secs
    );
    println!(
        "  memory per waiting poll   {per_waiter:.1} KiB (gateway + ordering, one process; opened in {:.1} s)",
        open_time.as_secs_f64()
    );
    println!(
        "  CPU while they wait       {} ms over {} s ({} ms over {} s before they were opened)",
        cpu_idle, args.idle_secs, cpu_base, args.idle_secs
    );
    println!(
        "  settlement -> answer      p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms ({} answered, {failed} failed; all {} settled and answered {:.1} s after billing was let go)",
        ms(percentile(&latencies, 0.50)),
        ms(percentile(&latencies, 0.99)),
        ms(latencies.last().copied().unwrap_or_default()),
        latencies.len(),
        args.waiters,
        all_settled.as_secs_f64()
    );
    anyhow::ensure!(failed == 0, "{failed} long polls failed");
    Ok(())
}
