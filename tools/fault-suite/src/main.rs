//! The fault-injection suite (`scripts/fault-suite [--short|--long]`).
//!
//! Starts private PostgreSQL and RabbitMQ servers (own data directories and
//! 24xxx ports, below the ephemeral range so that no client connection holds
//! one; in the long form RabbitMQ is a three-node cluster), every
//! service as its own process, two replicas each behind a TCP balancer, and
//! drives a steady load through the gateway while it SIGKILLs random
//! replicas, stops PostgreSQL for longer than the whole retry schedule and
//! restarts RabbitMQ (long form: kills one cluster node and brings it back).
//! Then it lets the system settle, runs the audit, checks the outcome from
//! outside, prints what it injected and checked, and exits 1 naming the order
//! or user of any violation. Everything it started is stopped and removed on
//! exit, also on failure.

mod infra;
mod load;
mod stuck_orders;

use anyhow::Context;
use clap::Parser;
use infra::{AMQP_BALANCER, Balancer, RMQ_PORTS, Replica, Servers};
use load::{Load, User};
use order_system::system::{Service, SystemConfig, Wiring};
use rand::seq::SliceRandom;
use rust_decimal::Decimal;
use serde_json::Value;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

#[derive(Parser, Debug)]
#[command(name = "fault-suite", about = "Fault injection against every service run as its own processes")]
struct Cli {
    /// The long form: a three-node RabbitMQ cluster, more users, longer load
    /// and outages (the default is the short form, about 5 minutes).
    #[arg(long)]
    long: bool,
    /// Directory of the service binaries.
    #[arg(long, default_value = "target/debug")]
    bin_dir: PathBuf,
    /// The private-servers script.
    #[arg(long, default_value = "scripts/private-servers")]
    servers_script: PathBuf,
    /// Working directory (server data, logs); removed at the end unless --keep.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Keep the working directory (service logs) after the run.
    #[arg(long)]
    keep: bool,
}

struct Plan {
    nodes: usize,
    users: usize,
    late_users: usize,
    load: Duration,
    retry_delays_ms: &'static str,
    pg_outage_at: Duration,
    pg_outage: Duration,
    rmq_restart_at: Duration,
    rmq_kill_at: Option<Duration>,
    kill_every: Duration,
    settle: Duration,
    /// The services' queues get this delivery limit by operator policy,
    /// far below RabbitMQ 4's default of 20: a consumer that returned its
    /// deliveries in a database outage would see messages dead-lettered.
    delivery_limit: u32,
}

impl Plan {
    fn of(long: bool) -> Plan {
        if long {
            Plan {
                nodes: 3,
                users: 16,
                late_users: 8,
                load: Duration::from_secs(420),
                retry_delays_ms: "1000,10000,60000",
                pg_outage_at: Duration::from_secs(60),
                pg_outage: Duration::from_secs(100),
                rmq_restart_at: Duration::from_secs(330),
                rmq_kill_at: Some(Duration::from_secs(220)),
                kill_every: Duration::from_secs(15),
                settle: Duration::from_secs(300),
                delivery_limit: 3,
            }
        } else {
            Plan {
                nodes: 1,
                users: 8,
                late_users: 4,
                load: Duration::from_secs(130),
                retry_delays_ms: "500,2000,5000",
                pg_outage_at: Duration::from_secs(25),
                pg_outage: Duration::from_secs(25),
                rmq_restart_at: Duration::from_secs(85),
                rmq_kill_at: None,
                kill_every: Duration::from_secs(12),
                settle: Duration::from_secs(120),
                delivery_limit: 3,
            }
        }
    }
}

const SERVICES: [(Service, &str, u16); 6] = [
    (Service::Identity, "identity", 24510),
    (Service::Billing, "billing", 24520),
    (Service::Ordering, "ordering", 24530),
    (Service::Notification, "notification", 24540),
    (Service::Push, "push-service", 24550),
    (Service::Gateway, "gateway", 24500),
];

fn balancer_port(service: Service) -> u16 {
    match service {
        Service::Gateway => 24480,
        Service::Identity => 24481,
        Service::Billing => 24482,
        Service::Ordering => 24483,
        Service::Notification => 24484,
        Service::Push => 24485,
    }
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// What was injected, for the report.
#[derive(Default)]
struct Injected {
    lines: Vec<String>,
}

fn main() {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    let outcome = runtime.block_on(async {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! {
            r = run(cli) => r,
            _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
            _ = term.recv() => Err(anyhow::anyhow!("terminated")),
        }
    });
    // Dropping the runtime drops every task: the service processes are
    // killed (kill_on_drop) and the servers removed (their guard) before exit.
    runtime.shutdown_timeout(Duration::from_secs(5));
    let code = match outcome {
        Ok(true) => 0,
        Ok(false) => 1,
        Err(e) => {
            eprintln!("fault-suite: could not run: {e:#}");
            2
        }
    };
    std::process::exit(code);
}

async fn run(cli: Cli) -> anyhow::Result<bool> {
    let plan = Plan::of(cli.long);
    let started = Instant::now();
    let dir = cli
        .dir
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join(format!("order-system-faults-{}", std::process::id())));
    std::fs::create_dir_all(dir.join("logs"))?;
    let dir = dir.canonicalize()?;
    // The servers run as the postgres and rabbitmq users.
    std::os::unix::fs::PermissionsExt::set_mode(&mut std::fs::metadata(&dir)?.permissions(), 0o755);
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    let workdir = WorkDir { path: dir.clone(), keep: cli.keep };
    println!(
        "fault-suite ({} form): working directory {}, service logs in {}/logs",
        if cli.long { "long" } else { "short" },
        dir.display(),
        dir.display()
    );

    // Servers of its own.
    let servers = Servers {
        script: cli.servers_script.canonicalize().context("scripts/private-servers")?,
        dir: dir.clone(),
        nodes: plan.nodes,
    };
    servers.start_postgres().await?;
    for i in 0..plan.nodes {
        servers.start_node(i).await?;
        if i > 0 {
            servers.join(i).await?;
        }
    }
    println!(
        "  private PostgreSQL on 127.0.0.1:{}, RabbitMQ {} node(s) on {:?}",
        infra::PG_PORT,
        plan.nodes,
        &RMQ_PORTS[..plan.nodes]
    );
    lower_delivery_limit(plan.delivery_limit).await?;
    println!("  the services' queues limited to {} deliveries (operator policy)", plan.delivery_limit);
    let stop_all = CancellationToken::new();
    let _stop_guard = stop_all.clone().drop_guard();
    Balancer::start(addr(AMQP_BALANCER), RMQ_PORTS[..plan.nodes].iter().map(|p| addr(*p)).collect(), stop_all.clone())
        .await?;

    // Every service, two replicas each, behind balancers.
    let amqp = format!("amqp://guest:guest@127.0.0.1:{AMQP_BALANCER}/%2f");
    let pg = servers.postgres_url();
    let lb_url = |service: Service| format!("http://127.0.0.1:{}", balancer_port(service));
    // The gateway signs who the caller is; every other service verifies it.
    let signer = runtime::auth::AssertionSigner::generate();
    // One description of the system, rendered as each replica's environment.
    let mut system = SystemConfig::from_env();
    system.postgres_url = pg.clone();
    system.database_prefix.clear();
    system.messaging.amqp_url = amqp.clone();
    system.messaging.retry_delays_ms = plan.retry_delays_ms.split(',').map(str::parse).collect::<Result<_, _>>()?;
    system.gateway_https_addr.clear();
    system.push_tls_addr.clear();
    system.mail.mail_dir = dir.join("mail");
    // Every user of the load registers and logs in from this one address;
    // the throttles have tests of their own.
    system.abuse.register_per_address_per_minute = 0;
    system.abuse.login_per_address_per_minute = 0;
    // The load is a dozen busy users: the per-user limits (tested on their
    // own) are off, so every refusal the suite sees is a fault's.
    system.per_user.orders_per_user_per_minute = 0;
    system.per_user.deposits_per_user_per_minute = 0;
    system.per_user.withdrawals_per_user_per_minute = 0;
    let mut wiring = Wiring::new(&system, signer);
    for (service, _, _) in SERVICES {
        wiring.reach(service, lb_url(service));
    }
    let mut replicas: Vec<Arc<Replica>> = vec![];
    for (service, binary, base) in SERVICES {
        let mut backends = vec![];
        for i in 0..2u16 {
            let port = base + i;
            let a = addr(port);
            backends.push(a);
            let mut wiring = wiring.clone();
            wiring.listen_at(service, a);
            let mut env = system.process_env(service, &wiring);
            env.push(("RUST_LOG".into(), "info".into()));
            env.push(("LOG_FORMAT".into(), "json".into()));
            match service {
                Service::Push => env.push(("PUSH_DRAIN_SECS".into(), "2".into())),
                Service::Ordering => {
                    env.extend(stuck_orders::SWEEPER_ENV.iter().map(|(k, v)| (k.to_string(), v.to_string())))
                }
                _ => {}
            }
            let label = format!("{}-{}", service.name(), ["a", "b"][i as usize]);
            replicas.push(Replica::new(
                label.clone(),
                service.name(),
                a,
                cli.bin_dir.join(binary),
                env,
                dir.join("logs").join(format!("{label}.log")),
            ));
        }
        Balancer::start(addr(balancer_port(service)), backends, stop_all.clone()).await?;
    }
    let gateway = lb_url(Service::Gateway);
    let http = reqwest::Client::new();
    let supervisors = CancellationToken::new();
    let mut handles = vec![];
    // The a replicas first (they create and migrate the databases), then the b ones.
    for wave in ["-a", "-b"] {
        for r in replicas.iter().filter(|r| r.label.ends_with(wave)) {
            handles.push(tokio::spawn(r.clone().supervise(supervisors.clone(), Duration::from_secs(20))));
            if r.service != "gateway" {
                infra::wait_ready(&http, &format!("http://{}/health/ready", r.addr), Duration::from_secs(120))
                    .await
                    .with_context(|| format!("{} did not become ready (see its log)", r.label))?;
            }
        }
    }
    infra::wait_ready(&http, &format!("{gateway}/health/ready"), Duration::from_secs(60)).await?;
    println!(
        "  12 service processes (2 x identity, billing, ordering, notification, push, gateway) ready after {:.0} s",
        started.elapsed().as_secs_f64()
    );

    // Load.
    let load = Load::new(gateway.clone());
    let load_stop = CancellationToken::new();
    let streams_stop = CancellationToken::new();
    let mut drivers = vec![];
    let add_user = |load: Arc<Load>, load_stop: CancellationToken, streams_stop: CancellationToken| async move {
        let user = load.register(&load_stop).await?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        let sub = tokio::spawn(load.clone().subscribe(user.clone(), tx, streams_stop));
        // Orders only once the stream is open, so every event is due on it.
        tokio::select! {
            _ = rx => {}
            _ = load_stop.cancelled() => return None,
        }
        let driver = tokio::spawn(load.clone().drive(user, load_stop));
        Some((sub, driver))
    };
    for _ in 0..plan.users {
        if let Some(h) = add_user(load.clone(), load_stop.clone(), streams_stop.clone()).await {
            drivers.push(h);
        }
    }
    println!("  load: {} users registered, each in a closed loop with its event stream", plan.users);
    let stuck = stuck_orders::StuckOrders::inject(&gateway, &format!("{pg}/ordering"), 4).await?;
    println!("  {}", stuck.describe());

    // Faults, on a schedule relative to the start of the load.
    let injected = Arc::new(Mutex::new(Injected::default()));
    let t0 = Instant::now();
    let chaos = {
        let replicas = replicas.clone();
        let injected = injected.clone();
        let load_stop = load_stop.clone();
        let every = plan.kill_every;
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(every) => {}
                    _ = load_stop.cancelled() => return,
                }
                let victim = replicas.choose(&mut rand::thread_rng()).expect("replicas").clone();
                let line =
                    format!("{:>5.1} s  SIGKILL {} (restarted after 1-5 s)", t0.elapsed().as_secs_f64(), victim.label);
                println!("  {line}");
                injected.lock().await.lines.push(line);
                victim.kill();
            }
        })
    };
    let late = {
        let load = load.clone();
        let (load_stop, streams_stop) = (load_stop.clone(), streams_stop.clone());
        let (n, span) = (plan.late_users, plan.load);
        tokio::spawn(async move {
            let mut handles = vec![];
            for _ in 0..n {
                tokio::select! {
                    _ = tokio::time::sleep(span / (n as u32 + 1)) => {}
                    _ = load_stop.cancelled() => break,
                }
                if let Some(h) = add_user(load.clone(), load_stop.clone(), streams_stop.clone()).await {
                    handles.push(h);
                }
            }
            handles
        })
    };
    let mut schedule: Vec<(Duration, &str)> =
        vec![(plan.pg_outage_at, "postgres"), (plan.rmq_restart_at, "rabbitmq restart")];
    if let Some(at) = plan.rmq_kill_at {
        schedule.push((at, "rabbitmq kill"));
    }
    schedule.push((plan.load * 3 / 5, "push herd"));
    schedule.sort();
    for (at, what) in schedule {
        tokio::time::sleep(at.saturating_sub(t0.elapsed())).await;
        let line = match what {
            "postgres" => {
                let t = Instant::now();
                servers.stop_postgres().await?;
                tokio::time::sleep(plan.pg_outage).await;
                servers.start_postgres().await?;
                format!(
                    "{:>5.1} s  PostgreSQL stopped for {:.0} s (retry schedule {} ms)",
                    at.as_secs_f64(),
                    t.elapsed().as_secs_f64(),
                    plan.retry_delays_ms
                )
            }
            "rabbitmq restart" => {
                let node = plan.nodes - 1;
                let t = Instant::now();
                servers.stop_node(node).await?;
                servers.start_node(node).await?;
                format!(
                    "{:>5.1} s  RabbitMQ node {} stopped and started again ({:.0} s)",
                    at.as_secs_f64(),
                    Servers::node_name(node),
                    t.elapsed().as_secs_f64()
                )
            }
            "push herd" => {
                let killed = stuck_orders::kill_every_push_replica(&replicas);
                format!(
                    "{:>5.1} s  SIGKILL {} at once: every event stream reconnects",
                    at.as_secs_f64(),
                    killed.join(", ")
                )
            }
            _ => {
                let node = 1;
                let t = Instant::now();
                servers.kill_node(node).await?;
                tokio::time::sleep(Duration::from_secs(20)).await;
                servers.start_node(node).await?;
                format!(
                    "{:>5.1} s  RabbitMQ node {} SIGKILLed, started again after {:.0} s",
                    at.as_secs_f64(),
                    Servers::node_name(node),
                    t.elapsed().as_secs_f64()
                )
            }
        };
        println!("  {line}");
        injected.lock().await.lines.push(line);
    }
    tokio::time::sleep(plan.load.saturating_sub(t0.elapsed())).await;
    load_stop.cancel();
    let _ = chaos.await;
    let late = late.await.unwrap_or_default();
    for (_, driver) in drivers.into_iter().chain(late) {
        let _ = tokio::time::timeout(Duration::from_secs(60), driver).await;
    }
    let load_secs = t0.elapsed().as_secs_f64();
    println!("  load stopped after {load_secs:.0} s; settling (up to {} s)", plan.settle.as_secs());

    // Settle: every accepted order final and notified, the audit clean (or the time is up).
    let audit_config = order_system::audit::AuditConfig {
        billing_db: format!("{pg}/billing"),
        ordering_db: format!("{pg}/ordering"),
        notification_db: format!("{pg}/notification"),
        rabbitmq_api: servers.management_api(),
        vhost: "/".into(),
        amqp_url: Some(amqp.clone()),
        pending_threshold: plan.settle,
        notification_grace: Duration::ZERO,
    };
    let users: Vec<Arc<User>> = load.users.lock().await.clone();
    let settle_start = Instant::now();
    loop {
        let pending = pending_orders(&load, &users).await;
        let audit = order_system::audit::run(&audit_config).await.ok();
        let clean = audit.as_ref().is_some_and(|a| a.is_clean());
        if (pending == 0 && clean) || settle_start.elapsed() > plan.settle {
            break;
        }
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    // Streams get a moment for the last events.
    tokio::time::sleep(Duration::from_secs(3)).await;
    println!("  settled after {:.0} s", settle_start.elapsed().as_secs_f64());
    streams_stop.cancel();

    // The stuck orders' users are not the load's: their lists count too.
    let stuck_listed = stuck.listed(&gateway).await;
    let ok = check(&load, &users, stuck_listed, &audit_config, &injected, &replicas).await?;
    let stuck_violations = stuck.check(&gateway).await;
    println!("  {}: {} violation(s)", stuck.describe(), stuck_violations.len());
    for v in &stuck_violations {
        println!("VIOLATION {v}");
    }
    let ok = ok && stuck_violations.is_empty();

    // Stop every replica with SIGTERM (the bound is part of the check).
    supervisors.cancel();
    for h in handles {
        let _ = h.await;
    }
    let mut slow = vec![];
    for r in &replicas {
        match *r.shutdown.lock().await {
            Some(Some(_)) => {}
            _ => slow.push(r.label.clone()),
        }
    }
    if !slow.is_empty() {
        println!("VIOLATION replicas that did not end within 20 s of SIGTERM: {}", slow.join(", "));
    }
    stop_all.cancel();
    drop(servers);
    drop(workdir);
    println!(
        "fault-suite: {} in {:.0} s",
        if ok && slow.is_empty() { "PASSED" } else { "FAILED" },
        started.elapsed().as_secs_f64()
    );
    Ok(ok && slow.is_empty())
}

/// Sets an operator policy that lowers the delivery limit of the services'
/// queues (not their dead-letter or delay queues) on the private broker.
async fn lower_delivery_limit(limit: u32) -> anyhow::Result<()> {
    let url = format!("http://127.0.0.1:{}/api/operator-policies/%2f/delivery-limit", infra::MGMT_PORT);
    let policy = serde_json::json!({
        "pattern": r"^(billing|ordering|notification)\.[a-z]+$",
        "definition": {"delivery-limit": limit},
        "apply-to": "queues",
    });
    let r = reqwest::Client::new().put(url).basic_auth("guest", Some("guest")).json(&policy).send().await?;
    anyhow::ensure!(r.status().is_success(), "setting the delivery-limit policy: {}", r.status());
    Ok(())
}

/// Removes the working directory on exit unless asked to keep it.
struct WorkDir {
    path: PathBuf,
    keep: bool,
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

async fn get_json(load: &Load, user: &User, path: &str) -> Option<Value> {
    let r = load.http.get(format!("{}/api/v1{path}", load.gateway)).bearer_auth(&user.token).send().await.ok()?;
    if !r.status().is_success() {
        return None;
    }
    r.json().await.ok()
}

/// Every item of a user's newest-first list at `path`, page after page
/// (`?limit=500&before=<the last id>`) until a page is short; `None` if a
/// page could not be read.
async fn get_all(load: &Load, user: &User, path: &str) -> Option<Vec<Value>> {
    const PAGE: usize = 500;
    let mut items: Vec<Value> = vec![];
    loop {
        let before = match items.last() {
            Some(last) => format!("&before={}", last["id"].as_str()?),
            None => String::new(),
        };
        let page = get_json(load, user, &format!("{path}?limit={PAGE}{before}")).await?.as_array()?.clone();
        let short = page.len() < PAGE;
        items.extend(page);
        if short {
            return Some(items);
        }
    }
}

async fn pending_orders(load: &Load, users: &[Arc<User>]) -> usize {
    let mut pending = 0;
    for u in users {
        let ids: Vec<Uuid> = u.record.lock().await.orders.keys().copied().collect();
        let list = get_all(load, u, "/ordering/orders").await;
        let statuses: HashMap<String, String> = list
            .unwrap_or_default()
            .iter()
            .filter_map(|o| Some((o["id"].as_str()?.to_string(), o["status"].as_str()?.to_string())))
            .collect();
        pending += ids
            .iter()
            .filter(|id| {
                statuses.get(&id.to_string()).map(String::as_str) != Some("succeeded")
                    && statuses.get(&id.to_string()).map(String::as_str) != Some("failed")
            })
            .count();
    }
    pending
}

/// Its few queries read the billing and notification databases of the run
/// (one tool, several schemas: checked at run time, not with `sqlx::query!`).
async fn check(
    load: &Load,
    users: &[Arc<User>],
    others_listed: Option<(usize, usize, usize)>,
    audit_config: &order_system::audit::AuditConfig,
    injected: &Mutex<Injected>,
    replicas: &[Arc<Replica>],
) -> anyhow::Result<bool> {
    let mut violations: Vec<String> = load.stats.violations.lock().await.clone();
    let billing = sqlx::PgPool::connect(&audit_config.billing_db).await?;
    let notification = sqlx::PgPool::connect(&audit_config.notification_db).await?;
    let (mut orders, mut finals, mut succeeded_n, mut events_ok, mut uncertain_applied, mut uncertain_not) =
        (0, 0, 0, 0, 0, 0);
    let mut notifications_total = 0;
    // Every order and notification in the users' lists (the load's and the
    // stuck orders' users are the only ones): the audit's totals must be
    // the same.
    let (mut listed_orders, mut listed_finals) = (0, 0);
    for u in users {
        let rec = u.record.lock().await;
        let who = format!("user {} ({})", u.id, u.email);
        // Every accepted order final, from the API.
        let Some(list) = get_all(load, u, "/ordering/orders").await else {
            violations.push(format!("{who}: the order list could not be read"));
            continue;
        };
        listed_orders += list.len();
        listed_finals += list.iter().filter(|o| o["status"] == "succeeded" || o["status"] == "failed").count();
        let by_id: HashMap<Uuid, (String, Decimal)> = list
            .iter()
            .filter_map(|o| {
                let id = o["id"].as_str()?.parse().ok()?;
                let price: Decimal = o["price"].to_string().parse().ok()?;
                Some((id, (o["status"].as_str()?.to_string(), price)))
            })
            .collect();
        let mut succeeded = Decimal::ZERO;
        let mut user_finals = 0;
        for (id, price) in &rec.orders {
            orders += 1;
            match by_id.get(id) {
                Some((status, p)) if status == "succeeded" || status == "failed" => {
                    finals += 1;
                    user_finals += 1;
                    if p != price {
                        violations.push(format!("order {id} of {who}: placed for {price}, shows {p}"));
                    }
                    if status == "succeeded" {
                        succeeded += *price;
                        succeeded_n += 1;
                    }
                    // Its event on the user's stream exactly once.
                    match rec.events.get(id).map(Vec::as_slice).unwrap_or_default() {
                        [_] => events_ok += 1,
                        ids => violations.push(format!(
                            "order {id} of {who}: {status}, its event reached the stream {} times (event ids {ids:?})",
                            ids.len()
                        )),
                    }
                    // Charged at most once, and only when it succeeded (the ledger by payment id).
                    let charged: i64 = sqlx::query_scalar("SELECT count(*) FROM ledger_entries WHERE payment_id = $1")
                        .bind(id)
                        .fetch_one(&billing)
                        .await?;
                    let expected = i64::from(status == "succeeded");
                    if charged != expected {
                        violations.push(format!("order {id} of {who}: {status}, charged {charged} times"));
                    }
                    let notified: i64 = sqlx::query_scalar("SELECT count(*) FROM notifications WHERE order_id = $1")
                        .bind(id)
                        .fetch_one(&notification)
                        .await?;
                    if notified != 1 {
                        violations.push(format!("order {id} of {who}: {status}, {notified} notifications"));
                    }
                }
                Some((status, _)) => violations.push(format!("order {id} of {who}: still {status} after settling")),
                None => violations.push(format!("order {id} of {who}: accepted (202) but not in the user's orders")),
            }
        }
        // Events for orders the user never placed (or of another user).
        for (id, ids) in &rec.events {
            if !rec.orders.contains_key(id) {
                violations.push(format!("{who}: {} event(s) for order {id} it did not place", ids.len()));
            }
        }
        if rec.resets > 0 {
            violations.push(format!("{who}: the stream answered `reset` {} time(s) (history lost)", rec.resets));
        }
        // Notifications, from the API: one per final order.
        let Some(notes) = get_all(load, u, "/notifications").await.map(|n| n.len()) else {
            violations.push(format!("{who}: the notification list could not be read"));
            continue;
        };
        notifications_total += notes;
        if notes != user_finals {
            violations.push(format!("{who}: {notes} notifications for {user_finals} final orders"));
        }
        // Balance = deposits - withdrawals - succeeded orders (unanswered requests resolved by the ledger).
        let mut expected = rec.deposited - rec.withdrawn - succeeded;
        for x in &rec.uncertain {
            let sources: Vec<String> = x.request_ids.iter().map(|id| format!("request:{id}")).collect();
            let applied: i64 = sqlx::query_scalar("SELECT count(*) FROM ledger_entries WHERE source = ANY($1)")
                .bind(&sources)
                .fetch_one(&billing)
                .await?;
            if applied > 0 {
                uncertain_applied += 1;
                expected += x.amount;
            } else {
                uncertain_not += 1;
            }
        }
        match get_json(load, u, "/billing/account").await.and_then(|v| v["amount"].to_string().parse::<Decimal>().ok()) {
            Some(balance) if balance == expected => {}
            Some(balance) => violations.push(format!("{who}: balance {balance}, expected {expected} (deposits {} - withdrawals {} - succeeded orders {succeeded})", rec.deposited, rec.withdrawn)),
            None => violations.push(format!("{who}: balance could not be read")),
        }
    }
    billing.close().await;
    notification.close().await;
    let server_errors = load.stats.server_errors.lock().await.clone();
    for e in &server_errors {
        violations.push(format!("500 answered to {e}"));
    }
    let audit = order_system::audit::run(audit_config).await?;
    for v in &audit.violations {
        violations.push(format!("audit: {v}"));
    }
    match others_listed {
        Some((orders, finals, notes)) => {
            listed_orders += orders;
            listed_finals += finals;
            notifications_total += notes;
        }
        None => violations.push("the lists of the stuck orders' users could not be read".to_string()),
    }
    let totals = audit.totals;
    if (listed_orders, listed_finals, notifications_total as i64)
        != (totals.orders, totals.final_orders, totals.notifications)
    {
        violations.push(format!(
            "the users' lists and the audit disagree: orders {listed_orders} listed, {} audited; final {listed_finals} \
             listed, {} audited; notifications {notifications_total} listed, {} audited",
            totals.orders, totals.final_orders, totals.notifications
        ));
    }

    let s = &load.stats;
    println!("\ninjected:");
    let inj = injected.lock().await;
    let mut kills: HashMap<&str, u32> = HashMap::new();
    for r in replicas {
        *kills.entry(r.service).or_default() += r.kills.load(Ordering::Relaxed);
    }
    println!("  replicas SIGKILLed: {} ({})", kills.values().sum::<u32>(), {
        let mut k: Vec<String> = kills.iter().map(|(s, n)| format!("{s} {n}")).collect();
        k.sort();
        k.join(", ")
    });
    let crashes: u32 = replicas.iter().map(|r| r.crashes.load(Ordering::Relaxed)).sum();
    println!("  replicas that exited by themselves (restarted by the suite, as a cluster would): {crashes}");
    for r in replicas.iter().filter(|r| r.crashes.load(Ordering::Relaxed) > 0) {
        let log = std::fs::read_to_string(r.log_path()).unwrap_or_default();
        let mut reasons: Vec<&str> = log.lines().filter(|l| l.starts_with("Error: ")).collect();
        reasons.dedup();
        println!("    {} x{}: {}", r.label, r.crashes.load(Ordering::Relaxed), reasons.join(" | "));
    }
    for line in inj.lines.iter().filter(|l| !l.contains("SIGKILL ")) {
        println!("  {line}");
    }
    println!("load:");
    println!(
        "  users {}, deposits {}, withdrawals {} (+{} refused: not enough money); {} money requests sent twice at once, {} re-sent after no answer",
        s.registrations.load(Ordering::Relaxed),
        s.deposits.load(Ordering::Relaxed),
        s.withdrawals.load(Ordering::Relaxed),
        s.withdrawals_refused.load(Ordering::Relaxed),
        s.money_sent_twice.load(Ordering::Relaxed),
        s.money_retries.load(Ordering::Relaxed),
    );
    println!(
        "  orders accepted {} ({} sent twice at once, {} re-sent after no answer); every request under an Idempotency-Key",
        s.orders.load(Ordering::Relaxed),
        s.orders_sent_twice.load(Ordering::Relaxed),
        s.order_retries.load(Ordering::Relaxed)
    );
    println!(
        "  answers: {}",
        s.by_status.lock().await.iter().map(|(k, v)| format!("{k}: {v}")).collect::<Vec<_>>().join(", ")
    );
    println!(
        "  event streams opened {} (resumed with Last-Event-ID after each drop)",
        s.stream_connects.load(Ordering::Relaxed)
    );
    println!("checked:");
    println!(
        "  orders accepted {orders}, final {finals} ({succeeded_n} succeeded), each event on its user's stream exactly once: {events_ok}"
    );
    println!(
        "  balances of {} users = deposits - withdrawals - succeeded orders ({uncertain_applied} unanswered money requests found applied in the ledger, {uncertain_not} not)",
        users.len()
    );
    println!(
        "  in the users' lists (every page): orders {listed_orders}, final {listed_finals}, notifications {notifications_total} \
         (the audit's totals: {}, {}, {})",
        totals.orders, totals.final_orders, totals.notifications
    );
    println!(
        "  notifications {notifications_total}; payments charged once per succeeded order (ledger by payment id); 500 answers {}",
        server_errors.len()
    );
    print!("{audit}");
    if violations.is_empty() {
        println!("no violations");
    } else {
        println!("{} violation(s):", violations.len());
        for v in &violations {
            println!("  {v}");
        }
    }
    Ok(violations.is_empty())
}
