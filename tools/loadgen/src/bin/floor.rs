//! `floor`: what one order costs on this machine's PostgreSQL and RabbitMQ
//! with no service logic at all: per order, the same PostgreSQL commits and
//! RabbitMQ publish-with-confirm → consume → ack round trips as the real
//! flow, in the same order and batched the same way, on the same servers
//! (its own database and vhost, removed at the end), with a fixed number of
//! concurrent clients.
//!
//! Per order, as the real flow does it (services/*/src, runtime's outbox
//! relay and consumer, notification's mailer):
//!
//! | step (real flow)                                    | commits      | publish+confirm | consume+ack |
//! |-----------------------------------------------------|--------------|-----------------|-------------|
//! | POST /orders: order + outbox row (ordering)         | 1            |                 |             |
//! | relay: claim a batch, publish it, mark it sent      | 2 per batch  | 1               |             |
//! | billing: inbox + payment + debit + outbox           | 1            |                 | 1           |
//! | relay: claim a batch, publish it, mark it sent      | 2 per batch  | 1               |             |
//! | ordering: inbox + settle + outbox                   | 1            |                 | 1           |
//! | relay: claim a batch, publish it, mark it sent      | 2 per batch  | 1               |             |
//! | notification: inbox + notification + e-mail row     | 1            |                 | 1           |
//! | mailer: claim a batch of e-mails, mark them sent    | 2 per batch  |                 |             |
//! | push: read the event from the stream                |              |                 | 1 (stream)  |
//! | total                                               | 4 + 8 per batch | 3            | 4           |
//!
//! Each relay (and the mailer) is one task that, once woken, takes every row
//! committed since its last batch (as `runtime::data::db::Wakeup` takes every
//! notification already received), claims them in one statement, publishes
//! them all before awaiting their confirms, and marks them sent in one
//! statement. One order at a time that is 12 commits; with many clients a
//! batch serves several orders, as in the real flow. The report counts the
//! commits it made per order.
//!
//! Completion is timed from the first commit (the moment a 202 would be
//! sent) to the event's delivery from the stream.
//!
//!   floor --clients 20 --duration 20 [--json]

use anyhow::Context;
use clap::Parser;
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
    ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use loadgen::stats::{Latencies, Summary, per_second};
use serde::Serialize;
use sqlx::postgres::{PgPool, PgPoolOptions};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

#[derive(Parser, Debug)]
#[command(name = "floor", about = "The PostgreSQL + RabbitMQ round trips of one order, with no service logic")]
struct Args {
    #[arg(long, env = "POSTGRES_URL", default_value = "postgres://postgres@127.0.0.1:5432")]
    postgres_url: String,
    /// The broker, without a vhost (the program makes its own).
    #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672")]
    amqp_url: String,
    /// RabbitMQ's management API, to create and remove the vhost.
    #[arg(long, default_value = "http://guest:guest@127.0.0.1:15672/api")]
    rabbitmq_api: String,
    /// Concurrent clients (closed loop).
    #[arg(long, default_value_t = 20)]
    clients: usize,
    /// Seconds of load.
    #[arg(long, default_value_t = 20.0)]
    duration: f64,
    /// Database connections (the services have 40 each by default).
    #[arg(long, default_value_t = 40)]
    pool: u32,
    /// Deliveries each consumer handles at once (the services' CONSUMER_PREFETCH).
    #[arg(long, default_value_t = 16)]
    prefetch: u16,
    #[arg(long)]
    json: bool,
}

const PUBLISHES: u32 = 3;
const CONSUMES: u32 = 4;

#[derive(Serialize)]
struct Report {
    clients: usize,
    seconds: f64,
    commits_per_order: f64,
    relay_batches_per_order: f64,
    publishes_per_order: u32,
    consumes_per_order: u32,
    completed: u64,
    completed_per_sec: f64,
    completion: Summary,
    errors: u64,
}

struct Floor {
    db: PgPool,
    /// The relay of each publishing step: outbox rows committed, to publish.
    relays: [mpsc::UnboundedSender<(i64, Uuid)>; 3],
    /// E-mail rows committed, to send.
    mailer: mpsc::UnboundedSender<i64>,
    done: Mutex<HashMap<Uuid, oneshot::Sender<Instant>>>,
    commits: AtomicU64,
    relay_batches: AtomicU64,
    errors: Arc<Mutex<u64>>,
}

/// Rows one relay batch takes at most (the services' relay: 200).
const BATCH: usize = 200;

/// Everything already waiting after the first, up to a batch.
async fn next_batch<T>(rx: &mut mpsc::UnboundedReceiver<T>) -> Option<Vec<T>> {
    let mut batch = vec![rx.recv().await?];
    while batch.len() < BATCH
        && let Ok(more) = rx.try_recv()
    {
        batch.push(more);
    }
    Some(batch)
}

const QUEUES: [&str; 3] = ["floor.payments", "floor.billing", "floor.notification"];
const EVENTS: &str = "floor.events";
const STREAM: &str = "floor.stream";

fn text(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()))
}

fn table(pairs: &[(&str, AMQPValue)]) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in pairs {
        t.insert((*k).into(), v.clone());
    }
    t
}

impl Floor {
    fn failed(&self, what: &str, e: anyhow::Error) {
        eprintln!("floor: {what}: {e:#}");
        *self.errors.lock().expect("errors") += 1;
    }

    /// One relay: a claim, the batch's publishes pipelined, then its
    /// confirms, and one mark-sent.
    async fn relay(self: Arc<Self>, step: usize, channel: Channel, mut rx: mpsc::UnboundedReceiver<(i64, Uuid)>) {
        while let Some(batch) = next_batch(&mut rx).await {
            if let Err(e) = self.relay_batch(step, &channel, &batch).await {
                self.failed(&format!("relay {step}"), e);
            }
        }
    }

    async fn relay_batch(&self, step: usize, channel: &Channel, batch: &[(i64, Uuid)]) -> anyhow::Result<()> {
        let ids: Vec<i64> = batch.iter().map(|(id, _)| *id).collect();
        sqlx::query("UPDATE outbox SET next_attempt_at = now() + interval '25 seconds' WHERE id = ANY($1)")
            .bind(&ids)
            .execute(&self.db)
            .await?;
        let (exchange, key) = if step == 2 { (EVENTS, "OrderCreated") } else { ("", QUEUES[step]) };
        let mut confirms = Vec::with_capacity(batch.len());
        for (_, order) in batch {
            let body = serde_json::to_vec(&serde_json::json!({ "id": order }))?;
            let props = BasicProperties::default()
                .with_message_id(Uuid::now_v7().to_string().into())
                .with_content_type("application/json".into())
                .with_delivery_mode(2);
            confirms.push(
                channel
                    .basic_publish(
                        exchange.into(),
                        key.into(),
                        BasicPublishOptions { mandatory: true, ..Default::default() },
                        &body,
                        props,
                    )
                    .await?,
            );
        }
        for confirm in confirms {
            let confirm = confirm.await?;
            anyhow::ensure!(matches!(confirm, lapin::Confirmation::Ack(None)), "publish not confirmed: {confirm:?}");
        }
        sqlx::query("UPDATE outbox SET sent_at = now() WHERE id = ANY($1) AND sent_at IS NULL")
            .bind(&ids)
            .execute(&self.db)
            .await?;
        self.commits.fetch_add(2, Ordering::Relaxed);
        self.relay_batches.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// The mailer: claims a batch of e-mails, "sends" them, marks them sent.
    async fn mail(self: Arc<Self>, mut rx: mpsc::UnboundedReceiver<i64>) {
        while let Some(ids) = next_batch(&mut rx).await {
            let r = async {
                sqlx::query("UPDATE mail SET next_attempt_at = now() + interval '10 minutes' WHERE id = ANY($1)")
                    .bind(&ids)
                    .execute(&self.db)
                    .await?;
                sqlx::query("UPDATE mail SET sent_at = now() WHERE id = ANY($1)").bind(&ids).execute(&self.db).await?;
                self.commits.fetch_add(2, Ordering::Relaxed);
                anyhow::Ok(())
            }
            .await;
            if let Err(e) = r {
                self.failed("mailer", e);
            }
        }
    }

    /// Places one order: its commit, then the relay's publish.
    async fn place(&self, order: Uuid) -> anyhow::Result<Instant> {
        let mut tx = self.db.begin().await?;
        sqlx::query("INSERT INTO orders (id, price) VALUES ($1, 1)").bind(order).execute(&mut *tx).await?;
        let outbox: i64 = sqlx::query_scalar("INSERT INTO outbox (payload) VALUES ($1) RETURNING id")
            .bind(serde_json::json!({ "id": order }))
            .fetch_one(&mut *tx)
            .await?;
        tx.commit().await?;
        self.commits.fetch_add(1, Ordering::Relaxed);
        let accepted = Instant::now();
        self.relays[0].send((outbox, order))?;
        Ok(accepted)
    }

    /// A consumer's transaction (inbox + effect [+ outbox]), then the ack,
    /// then what follows it (the relay's publish, or the mailer's).
    async fn handle(&self, queue: usize, delivery: lapin::message::Delivery) -> anyhow::Result<()> {
        let body: serde_json::Value = serde_json::from_slice(&delivery.data)?;
        let order = Uuid::parse_str(body["id"].as_str().context("no id")?)?;
        let message_id = Uuid::parse_str(delivery.properties.message_id().as_ref().context("no message id")?.as_str())?;
        let mut tx = self.db.begin().await?;
        sqlx::query("INSERT INTO inbox (queue, message_id) VALUES ($1, $2) ON CONFLICT DO NOTHING")
            .bind(QUEUES[queue])
            .bind(message_id)
            .execute(&mut *tx)
            .await?;
        let outbox = if queue < 2 {
            sqlx::query("UPDATE orders SET status = $2, updated_at = now() WHERE id = $1")
                .bind(order)
                .bind(queue as i32 + 1)
                .execute(&mut *tx)
                .await?;
            let id: i64 = sqlx::query_scalar("INSERT INTO outbox (payload) VALUES ($1) RETURNING id")
                .bind(&body)
                .fetch_one(&mut *tx)
                .await?;
            Some(id)
        } else {
            let id: i64 = sqlx::query_scalar("INSERT INTO mail (order_id) VALUES ($1) RETURNING id")
                .bind(order)
                .fetch_one(&mut *tx)
                .await?;
            Some(id)
        };
        tx.commit().await?;
        self.commits.fetch_add(1, Ordering::Relaxed);
        delivery.ack(BasicAckOptions::default()).await?;
        match outbox {
            Some(id) if queue < 2 => self.relays[queue + 1].send((id, order))?,
            Some(mail) => self.mailer.send(mail)?,
            None => {}
        }
        Ok(())
    }
}

async fn consume(floor: Arc<Floor>, channel: Channel, queue: usize, prefetch: u16) {
    let Ok(deliveries) = channel
        .basic_consume(QUEUES[queue].into(), "".into(), BasicConsumeOptions::default(), FieldTable::default())
        .await
    else {
        return;
    };
    deliveries
        .for_each_concurrent(usize::from(prefetch), |d| {
            let floor = floor.clone();
            async move {
                let r = match d {
                    Ok(d) => floor.handle(queue, d).await,
                    Err(e) => Err(e.into()),
                };
                if let Err(e) = r {
                    floor.failed(QUEUES[queue], e);
                }
            }
        })
        .await;
}

async fn read_stream(floor: Arc<Floor>, channel: Channel) {
    let Ok(mut deliveries) = channel
        .basic_consume(
            STREAM.into(),
            "".into(),
            BasicConsumeOptions::default(),
            table(&[("x-stream-offset", text("next"))]),
        )
        .await
    else {
        return;
    };
    while let Some(Ok(d)) = deliveries.next().await {
        let at = Instant::now();
        let order = serde_json::from_slice::<serde_json::Value>(&d.data)
            .ok()
            .and_then(|b| b["id"].as_str().and_then(|s| Uuid::parse_str(s).ok()));
        let _ = d.ack(BasicAckOptions::default()).await;
        if let Some(order) = order
            && let Some(tx) = floor.done.lock().expect("done").remove(&order)
        {
            let _ = tx.send(at);
        }
    }
}

async fn run(args: &Args, database: &str, vhost: &str) -> anyhow::Result<Report> {
    let db =
        PgPoolOptions::new().max_connections(args.pool).connect(&format!("{}/{database}", args.postgres_url)).await?;
    sqlx::raw_sql(
        "CREATE TABLE orders (id uuid PRIMARY KEY, price bigint NOT NULL, status int NOT NULL DEFAULT 0,
                              created_at timestamptz NOT NULL DEFAULT now(), updated_at timestamptz NOT NULL DEFAULT now());
         CREATE TABLE outbox (id bigserial PRIMARY KEY, payload jsonb NOT NULL, created_at timestamptz NOT NULL DEFAULT now(),
                              next_attempt_at timestamptz NOT NULL DEFAULT now(), sent_at timestamptz);
         CREATE TABLE inbox (queue text NOT NULL, message_id uuid NOT NULL, PRIMARY KEY (queue, message_id));
         CREATE TABLE mail (id bigserial PRIMARY KEY, order_id uuid NOT NULL, next_attempt_at timestamptz NOT NULL DEFAULT now(),
                            sent_at timestamptz);",
    )
    .execute(&db)
    .await?;

    let conn = Connection::connect(&format!("{}/{vhost}", args.amqp_url), ConnectionProperties::default()).await?;
    let setup = conn.create_channel().await?;
    let quorum = table(&[("x-queue-type", text("quorum"))]);
    for q in QUEUES {
        setup
            .queue_declare(q.into(), QueueDeclareOptions { durable: true, ..Default::default() }, quorum.clone())
            .await?;
    }
    setup
        .queue_declare(
            STREAM.into(),
            QueueDeclareOptions { durable: true, ..Default::default() },
            table(&[("x-queue-type", text("stream"))]),
        )
        .await?;
    setup
        .exchange_declare(
            EVENTS.into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions { durable: true, ..Default::default() },
            FieldTable::default(),
        )
        .await?;
    for q in [QUEUES[2], STREAM] {
        setup
            .queue_bind(q.into(), EVENTS.into(), "#".into(), QueueBindOptions::default(), FieldTable::default())
            .await?;
    }
    let errors = Arc::new(Mutex::new(0u64));
    let (relays, relay_rx): (Vec<_>, Vec<_>) = (0..3).map(|_| mpsc::unbounded_channel()).unzip();
    let relays: [_; 3] = relays.try_into().map_err(|_| anyhow::anyhow!("three relays"))?;
    let (mailer, mail_rx) = mpsc::unbounded_channel();
    let floor = Arc::new(Floor {
        db: db.clone(),
        relays,
        mailer,
        done: Mutex::default(),
        commits: AtomicU64::new(0),
        relay_batches: AtomicU64::new(0),
        errors: errors.clone(),
    });
    let mut tasks = Vec::new();
    // One confirm channel per relay.
    for (step, rx) in relay_rx.into_iter().enumerate() {
        let c = conn.create_channel().await?;
        c.confirm_select(ConfirmSelectOptions::default()).await?;
        tasks.push(tokio::spawn(floor.clone().relay(step, c, rx)));
    }
    tasks.push(tokio::spawn(floor.clone().mail(mail_rx)));
    for q in 0..3 {
        let c = conn.create_channel().await?;
        c.basic_qos(args.prefetch, BasicQosOptions::default()).await?;
        tasks.push(tokio::spawn(consume(floor.clone(), c, q, args.prefetch)));
    }
    let sc = conn.create_channel().await?;
    sc.basic_qos(args.prefetch.max(100), BasicQosOptions::default()).await?;
    tasks.push(tokio::spawn(read_stream(floor.clone(), sc)));
    tokio::time::sleep(Duration::from_millis(500)).await;

    let latencies = Arc::new(Mutex::new(Latencies::default()));
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(args.duration);
    let mut clients = Vec::new();
    for _ in 0..args.clients {
        let (floor, latencies, errors) = (floor.clone(), latencies.clone(), errors.clone());
        clients.push(tokio::spawn(async move {
            while Instant::now() < end {
                let order = Uuid::new_v4();
                let (tx, rx) = oneshot::channel();
                floor.done.lock().expect("done").insert(order, tx);
                let placed = floor.place(order).await;
                let outcome = match placed {
                    Ok(accepted) => match tokio::time::timeout(Duration::from_secs(30), rx).await {
                        Ok(Ok(at)) => Ok(at.saturating_duration_since(accepted)),
                        _ => Err(anyhow::anyhow!("no event within 30 s")),
                    },
                    Err(e) => Err(e),
                };
                match outcome {
                    Ok(latency) => latencies.lock().expect("latencies").record(latency),
                    Err(e) => {
                        floor.done.lock().expect("done").remove(&order);
                        eprintln!("floor: order {order}: {e:#}");
                        *errors.lock().expect("errors") += 1;
                    }
                }
            }
        }));
    }
    for c in clients {
        c.await?;
    }
    let elapsed = start.elapsed();
    for t in &tasks {
        t.abort();
    }
    let _ = conn.close(200, "floor done".into()).await;
    db.close().await;
    let latencies = latencies.lock().expect("latencies").clone();
    let errors = *errors.lock().expect("errors");
    let per_order = |n: &AtomicU64| n.load(Ordering::Relaxed) as f64 / latencies.count().max(1) as f64;
    Ok(Report {
        clients: args.clients,
        seconds: elapsed.as_secs_f64(),
        commits_per_order: per_order(&floor.commits),
        relay_batches_per_order: per_order(&floor.relay_batches),
        publishes_per_order: PUBLISHES,
        consumes_per_order: CONSUMES,
        completed: latencies.count(),
        completed_per_sec: per_second(latencies.count(), elapsed),
        completion: latencies.summary(),
        errors,
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let name = format!("floor_{}_{:06x}", std::process::id(), rand::random::<u32>() & 0xffffff);
    let admin = PgPoolOptions::new().max_connections(1).connect(&format!("{}/postgres", args.postgres_url)).await?;
    sqlx::raw_sql(&format!("CREATE DATABASE \"{name}\"")).execute(&admin).await?;
    let http = reqwest::Client::new();
    let vhost_url = format!("{}/vhosts/{name}", args.rabbitmq_api);
    let created = async {
        http.put(&vhost_url).send().await?.error_for_status()?;
        http.put(format!("{}/permissions/{name}/guest", args.rabbitmq_api))
            .json(&serde_json::json!({"configure": ".*", "write": ".*", "read": ".*"}))
            .send()
            .await?
            .error_for_status()?;
        anyhow::Ok(())
    }
    .await;
    let result = match created {
        Ok(()) => tokio::select! {
            r = run(&args, &name, &name) => r,
            _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
        },
        Err(e) => Err(e.context("creating the vhost")),
    };
    // Cleaned up whatever happened.
    let _ = http.delete(&vhost_url).send().await;
    let _ = sqlx::raw_sql(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)")).execute(&admin).await;
    let report = result?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "floor ({} clients; per order {:.2} commits ({:.2} relay batches), {} publishes with confirm, {} consumes+acks)",
            report.clients,
            report.commits_per_order,
            report.relay_batches_per_order,
            report.publishes_per_order,
            report.consumes_per_order
        );
        println!("  completed orders/s     {:.1} over {:.1} s", report.completed_per_sec, report.seconds);
        println!("  completion             {}", report.completion);
        println!("  errors                 {}", report.errors);
    }
    Ok(())
}
