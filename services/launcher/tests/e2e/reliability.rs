//! A dependency that goes away is not a message failing, and not a 500:
//! services on a proxied PostgreSQL or RabbitMQ that the test cuts or stalls.

use crate::helpers::{eventually, eventually_counts};
use contracts::messages::{CreatePayment, Message, exchange};
use lapin::options::QueueDeclareOptions;
use order_system::system::{SystemConfig, Wiring};
use reqwest::StatusCode;
use serde_json::Value;
use std::time::Duration;
use test_support::{Link, Sandbox, TcpProxy};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// One service of the system running in the test, stopped on drop.
pub struct Running {
    pub url: String,
    shutdown: CancellationToken,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl Running {
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        let task = self.task.take().unwrap();
        tokio::time::timeout(Duration::from_secs(20), task).await.expect("service stopped in time").unwrap()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// The gateway's key, as far as the services these tests start on their own
/// know it (they verify assertions with its public half).
fn gateway_key() -> &'static runtime::auth::AssertionSigner {
    static KEY: std::sync::OnceLock<runtime::auth::AssertionSigner> = std::sync::OnceLock::new();
    KEY.get_or_init(runtime::auth::AssertionSigner::generate)
}

/// What the gateway sends billing to say that `user` calls `method` `path`.
fn as_user(user: Uuid, method: reqwest::Method, path: &str) -> String {
    let user = crate::helpers::User { id: user, email: String::new(), token: String::new() };
    gateway_key().sign("billing", &method, path, &crate::helpers::as_current(&user))
}

/// The system whose services these tests start one at a time: on the
/// sandbox's databases and vhost, messages retried within 200 ms, and where
/// they are, with the gateway's key as far as they know it.
fn system(s: &Sandbox) -> (SystemConfig, Wiring) {
    let mut config = crate::helpers::sandboxed(s);
    config.messaging.retry_delays_ms = vec![50, 150];
    let wiring = Wiring::new(&config, gateway_key().clone());
    (config, wiring)
}

/// Billing of the sandbox's system, as `System` configures it.
fn billing_config(s: &Sandbox) -> billing::Config {
    let (config, wiring) = system(s);
    config.billing(&wiring)
}

/// Billing of the sandbox's system, its database reached through `pg`.
fn billing_behind(s: &Sandbox, pg: &TcpProxy) -> billing::Config {
    let billing = billing_config(s);
    billing::Config { database_url: pg.url(&billing.database_url), ..billing }
}

/// Billing, once it answers readiness.
async fn start_billing(config: billing::Config) -> Running {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(billing::run(config, listener, shutdown.clone()));
    let running = Running { url, shutdown, task: Some(task) };
    crate::client::ready(&reqwest::Client::new(), &running.url).await;
    running
}

async fn account(http: &reqwest::Client, billing: &str, user: Uuid) -> reqwest::Response {
    http.get(format!("{billing}/api/v1/account"))
        .header(crate::helpers::ASSERTION, as_user(user, reqwest::Method::GET, "/api/v1/account"))
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn while_the_database_is_away_requests_get_503_with_retry_after_and_service_resumes() {
    let s = Sandbox::new().await;
    let pg = TcpProxy::before(&crate::helpers::postgres_url()).await;
    let billing = start_billing(billing_behind(&s, &pg)).await;
    let http = reqwest::Client::new();
    let user = Uuid::new_v4();
    assert_eq!(account(&http, &billing.url, user).await.status(), StatusCode::OK);

    pg.set(Link::Cut);
    let r = account(&http, &billing.url, user).await;
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    let retry_after: u64 = r.headers()["retry-after"].to_str().unwrap().parse().expect("Retry-After in seconds");
    assert!((1..=60).contains(&retry_after), "{retry_after}");
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["code"], 503, "{body}");
    assert!(body["message"].as_str().unwrap().contains("unavailable"), "{body}");
    // A write too.
    let r = http
        .post(format!("{}/api/v1/account/deposit", billing.url))
        .header(crate::helpers::ASSERTION, as_user(user, reqwest::Method::POST, "/api/v1/account/deposit"))
        .json(&serde_json::json!({"amount": 5}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(r.headers().contains_key("retry-after"));
    // Readiness says why.
    let r = http.get(format!("{}/health/ready", billing.url)).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);

    pg.set(Link::Open);
    eventually(Duration::from_secs(20), || async {
        (account(&http, &billing.url, user).await.status() == StatusCode::OK).then_some(())
    })
    .await;
    billing.stop().await.unwrap();
}

async fn depth(amqp_url: &str, queue: &str) -> u32 {
    let conn = lapin::Connection::connect(amqp_url, Default::default()).await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    let n = ch
        .queue_declare(queue.into(), QueueDeclareOptions { passive: true, ..Default::default() }, Default::default())
        .await
        .unwrap()
        .message_count();
    let _ = conn.close(200, "done".into()).await;
    n
}

pub async fn publish(amqp_url: &str, exchange: &str, kind: &str, body: &[u8]) {
    let broker = runtime::Broker::new(amqp_url);
    let ch = broker.confirm_channel().await.unwrap();
    let props = runtime::messaging::outbox::properties(Uuid::new_v4(), kind, None, chrono::Utc::now());
    runtime::messaging::broker::publish_confirmed(&ch, exchange, kind, body, props).await.unwrap();
    broker.close().await;
}

#[tokio::test]
async fn messages_consumed_while_the_database_is_away_wait_for_it_instead_of_being_dead_lettered() {
    let s = Sandbox::new().await;
    let pg = TcpProxy::before(&crate::helpers::postgres_url()).await;
    let billing = start_billing(billing_behind(&s, &pg)).await;

    pg.set(Link::Cut);
    let payments: Vec<Uuid> = (0..5).map(|_| Uuid::new_v4()).collect();
    for id in &payments {
        let body =
            serde_json::to_vec(&CreatePayment { id: *id, user_id: Uuid::new_v4(), amount: "3".parse().unwrap() })
                .unwrap();
        publish(&s.amqp_url, exchange::ORDERING, CreatePayment::NAME, &body).await;
    }
    // Paused, and for longer than the whole retry schedule (50 ms + 150 ms):
    // the consumer's polls of the database are refused from 100 ms apart, doubling.
    let http = reqwest::Client::new();
    eventually(Duration::from_secs(30), || async {
        let paused = service_metric(&http, &billing.url, "consumer_paused", "queue=\"billing.payments\"").await;
        (paused == 1.0 && pg.refused() >= 4).then_some(())
    })
    .await;
    assert_eq!(depth(&s.amqp_url, "billing.payments.dead").await, 0, "nothing dead-lettered for an absent database");

    pg.set(Link::Open);
    let db = sqlx::PgPool::connect(&s.database_url("billing")).await.unwrap();
    eventually_counts(
        Duration::from_secs(30),
        &db,
        "SELECT count(*) FROM payments WHERE id = ANY($1)",
        payments.clone(),
        5,
    )
    .await;
    assert_eq!(depth(&s.amqp_url, "billing.payments.dead").await, 0);
    db.close().await;
    billing.stop().await.unwrap();
}

/// A gauge or counter of a service's `/metrics`, summed over the series
/// whose labels contain `label`.
async fn service_metric(http: &reqwest::Client, service: &str, name: &str, label: &str) -> f64 {
    let text = http.get(format!("{service}/metrics")).send().await.unwrap().text().await.unwrap();
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// RabbitMQ 4 gives every quorum queue a delivery limit (20 by default),
/// past which a message returned to the queue is dead-lettered, or dropped
/// where the queue has no dead-letter target. Here the limit is 0 (the first
/// return passes it): a consumer that returned its deliveries while the
/// database is away would lose them. It holds them instead, through an
/// outage longer than the whole retry schedule, and handles them when the
/// database is back: every payment made, nothing dead-lettered, nothing left.
#[tokio::test]
async fn a_database_outage_spends_no_delivery_of_a_queue_with_a_low_delivery_limit() {
    let s = Sandbox::new().await;
    let pg = TcpProxy::before(&crate::helpers::postgres_url()).await;
    let billing = start_billing(billing_behind(&s, &pg)).await;
    s.lower_delivery_limit("^billing\\.payments$", 0, "billing.payments").await;
    let http = reqwest::Client::new();
    let queue = "queue=\"billing.payments\"";

    pg.set(Link::Cut);
    let payments: Vec<Uuid> = (0..5).map(|_| Uuid::new_v4()).collect();
    for id in &payments {
        let body =
            serde_json::to_vec(&CreatePayment { id: *id, user_id: Uuid::new_v4(), amount: "3".parse().unwrap() })
                .unwrap();
        publish(&s.amqp_url, exchange::ORDERING, CreatePayment::NAME, &body).await;
    }
    // Paused, and for longer than the retry schedule (50 ms + 150 ms): the
    // consumer's polls of the database are refused from 100 ms apart, doubling.
    eventually(Duration::from_secs(30), || async {
        (service_metric(&http, &billing.url, "consumer_paused", queue).await == 1.0 && pg.refused() >= 4).then_some(())
    })
    .await;
    assert_eq!(depth(&s.amqp_url, "billing.payments.dead").await, 0, "nothing dead-lettered for an absent database");

    pg.set(Link::Open);
    let db = sqlx::PgPool::connect(&s.database_url("billing")).await.unwrap();
    eventually_counts(
        Duration::from_secs(30),
        &db,
        "SELECT count(*) FROM payments WHERE id = ANY($1)",
        payments.clone(),
        5,
    )
    .await;
    assert_eq!(depth(&s.amqp_url, "billing.payments.dead").await, 0);
    assert_eq!(depth(&s.amqp_url, "billing.payments").await, 0);
    eventually(Duration::from_secs(10), || async {
        (service_metric(&http, &billing.url, "consumer_paused", queue).await == 0.0).then_some(())
    })
    .await;
    db.close().await;
    billing.stop().await.unwrap();
}

/// The queues the services consume from dead-letter, at least once, what the
/// broker gives up on, after an explicit delivery limit: here a message
/// returned past a limit lowered to 0 lands in the dead-letter queue instead
/// of being dropped. A queue an older version declared without those
/// arguments (the broker refuses to change them) is used as it is and
/// reported.
#[tokio::test]
async fn a_message_past_the_delivery_limit_is_dead_lettered_and_an_older_queue_is_used_and_reported() {
    let s = Sandbox::new().await;
    let conn = lapin::Connection::connect(&s.amqp_url, Default::default()).await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    let mut quorum = lapin::types::FieldTable::default();
    quorum.insert("x-queue-type".into(), lapin::types::AMQPValue::LongString("quorum".into()));
    let durable = QueueDeclareOptions { durable: true, ..Default::default() };
    ch.queue_declare("billing.identity".into(), durable, quorum).await.unwrap();
    let _ = conn.close(200, "declared".into()).await;

    let billing = start_billing(billing_config(&s)).await;
    let http = reqwest::Client::new();
    let api = crate::helpers::rabbitmq_api();
    // The management API lists a new queue after a moment.
    let q: Value = eventually(Duration::from_secs(10), || async {
        let q: Value =
            http.get(format!("{api}/queues/{}/billing.payments", s.prefix)).send().await.ok()?.json().await.ok()?;
        q["arguments"].is_object().then_some(q)
    })
    .await;
    let args = &q["arguments"];
    assert_eq!(args["x-dead-letter-exchange"], "", "{q}");
    assert_eq!(args["x-dead-letter-routing-key"], "billing.payments.dead", "{q}");
    assert_eq!(args["x-dead-letter-strategy"], "at-least-once", "{q}");
    assert_eq!(args["x-overflow"], "reject-publish", "{q}");
    assert_eq!(args["x-delivery-limit"], runtime::messaging::broker::DELIVERY_LIMIT, "{q}");
    let target = |queue: &'static str| {
        let http = http.clone();
        let url = billing.url.clone();
        async move { service_metric(&http, &url, "queue_dead_letter_target", &format!("queue=\"{queue}\"")).await }
    };
    assert_eq!(target("billing.payments").await, 1.0);
    assert_eq!(target("billing.identity").await, 0.0, "the older queue is reported");
    billing.stop().await.unwrap();

    s.lower_delivery_limit("^billing\\.payments$", 0, "billing.payments").await;
    let id = Uuid::new_v4();
    let body =
        serde_json::to_vec(&CreatePayment { id, user_id: Uuid::new_v4(), amount: "3".parse().unwrap() }).unwrap();
    publish(&s.amqp_url, exchange::ORDERING, CreatePayment::NAME, &body).await;
    // Delivered and returned once (rejected with requeue), past the limit.
    let got: Value = http
        .post(format!("{api}/queues/{}/billing.payments/get", s.prefix))
        .json(&serde_json::json!({"count": 1, "ackmode": "reject_requeue_true", "encoding": "auto"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(got.as_array().map(Vec::len), Some(1), "{got}");
    eventually(Duration::from_secs(10), || async {
        (depth(&s.amqp_url, "billing.payments.dead").await == 1).then_some(())
    })
    .await;
    assert_eq!(depth(&s.amqp_url, "billing.payments").await, 0);
    // The broker's give-up is a transient cause: replayed to its queue.
    let broker = runtime::Broker::new(&s.amqp_url);
    let done =
        runtime::messaging::consumer::replay_transient_dead_letters(&broker, "billing.payments", 3).await.unwrap();
    assert_eq!((done.replayed, done.kept), (1, 0), "{done:?}");
    assert_eq!(depth(&s.amqp_url, "billing.payments").await, 1);
    broker.close().await;
}

#[tokio::test]
async fn a_service_whose_broker_is_away_stays_ready_and_says_so_in_the_details() {
    let s = Sandbox::new().await;
    let amqp = TcpProxy::before(&s.amqp_url).await;
    let mut config = billing_config(&s);
    config.common.messaging.amqp_url = amqp.url(&s.amqp_url);
    let billing = start_billing(config).await;
    let http = reqwest::Client::new();
    let details = || async {
        let r = http.get(format!("{}/health/ready", billing.url)).send().await.unwrap();
        (r.status(), r.json::<Value>().await.unwrap())
    };
    eventually(Duration::from_secs(10), || async {
        let (status, body) = details().await;
        (status == StatusCode::OK && body["checks"]["broker"] == "connected").then_some(())
    })
    .await;

    amqp.set(Link::Cut);
    eventually(Duration::from_secs(10), || async {
        let (status, body) = details().await;
        assert_eq!(status, StatusCode::OK, "still ready: {body}");
        (body["checks"]["broker"] == "disconnected").then_some(())
    })
    .await;
    // It still answers requests.
    assert_eq!(account(&http, &billing.url, Uuid::new_v4()).await.status(), StatusCode::OK);
    let metrics = http.get(format!("{}/metrics", billing.url)).send().await.unwrap().text().await.unwrap();
    assert!(metrics.lines().any(|l| l.starts_with("broker_connected") && l.ends_with(" 0")), "{metrics}");

    amqp.set(Link::Open);
    eventually(Duration::from_secs(20), || async {
        let (_, body) = details().await;
        (body["checks"]["broker"] == "connected").then_some(())
    })
    .await;
    billing.stop().await.unwrap();
}

#[tokio::test]
async fn delay_queues_dead_letter_back_at_least_once_beside_an_old_declaration() {
    let s = Sandbox::new().await;
    // A delay queue of an existing deployment, declared with the old arguments
    // (and, like it, still holding a message on its way back).
    let broker = runtime::Broker::new(&s.amqp_url);
    let ch = broker.confirm_channel().await.unwrap();
    let mut old = lapin::types::FieldTable::default();
    old.insert("x-queue-type".into(), lapin::types::AMQPValue::LongString("quorum".into()));
    old.insert("x-message-ttl".into(), lapin::types::AMQPValue::LongLongInt(2000));
    old.insert("x-dead-letter-exchange".into(), lapin::types::AMQPValue::LongString("".into()));
    old.insert("x-dead-letter-routing-key".into(), lapin::types::AMQPValue::LongString("billing.payments".into()));
    let q = "billing.payments.retry.2000ms";
    ch.queue_declare(q.into(), QueueDeclareOptions { durable: true, ..Default::default() }, old).await.unwrap();
    let payment = Uuid::new_v4();
    let body =
        serde_json::to_vec(&CreatePayment { id: payment, user_id: Uuid::new_v4(), amount: "3".parse().unwrap() })
            .unwrap();
    let props = runtime::messaging::outbox::properties(Uuid::new_v4(), CreatePayment::NAME, None, chrono::Utc::now());
    runtime::messaging::broker::publish_confirmed(&ch, "", q, &body, props).await.unwrap();
    broker.close().await;

    let billing = start_billing(billing_config(&s)).await;
    let http = reqwest::Client::new();
    for queue in ["billing.payments.delay.50ms", "billing.payments.delay.150ms", "billing.identity.delay.50ms"] {
        let url = format!("{}/queues/{}/{queue}", crate::helpers::rabbitmq_api(), s.prefix);
        eventually(Duration::from_secs(15), || async {
            let q: Value = http.get(&url).send().await.ok()?.json().await.ok()?;
            let args = &q["arguments"];
            (args["x-dead-letter-strategy"] == "at-least-once" && args["x-overflow"] == "reject-publish").then_some(())
        })
        .await;
    }
    // The old queue drains by itself into the consumer's queue.
    let db = sqlx::PgPool::connect(&s.database_url("billing")).await.unwrap();
    eventually_counts(Duration::from_secs(15), &db, "SELECT count(*) FROM payments WHERE id = $1", payment, 1).await;
    db.close().await;
    billing.stop().await.unwrap();
}

/// Loopback ports `base..=base+5` free at the time of asking (the launcher's
/// gateway port and the five after it).
fn free_port_block() -> u16 {
    loop {
        let base = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        if base < 60000 && (1..=5).all(|n| std::net::TcpListener::bind(("127.0.0.1", base + n)).is_ok()) {
            return base;
        }
    }
}

#[tokio::test]
async fn sigterm_ends_the_whole_process_in_bounded_time_while_its_database_and_broker_hang() {
    let s = Sandbox::without_broker();
    for name in crate::helpers::SERVICES_WITH_DB {
        s.database_url(name); // dropped with the sandbox
    }
    let pg = TcpProxy::before(&crate::helpers::postgres_url()).await;
    // A broker that accepts connections and never answers.
    let broker = test_support::SilentListener::start().await;
    let base = free_port_block();
    let mail = std::env::temp_dir().join(format!("order-system-{}", s.prefix));
    let mut process = tokio::process::Command::new(env!("CARGO_BIN_EXE_order-system"))
        .env("POSTGRES_URL", format!("postgres://postgres@127.0.0.1:{}", pg.port))
        .env("AMQP_URL", format!("amqp://guest:guest@127.0.0.1:{}/%2f", broker.port))
        .env("DATABASE_PREFIX", format!("{}_", s.prefix))
        .env("GATEWAY_ADDR", format!("127.0.0.1:{base}"))
        .env("GATEWAY_HTTPS_ADDR", "")
        .env("PUSH_TLS_ADDR", "")
        .env("INTERNAL_SIGNING_KEY", gateway_key().private_key_text())
        .env("MAIL_DIR", &mail)
        .env_remove("SMTP_URL")
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let http = reqwest::Client::new();
    eventually(Duration::from_secs(60), || async {
        let ordering = http.get(format!("http://127.0.0.1:{}/health/ready", base + 3)).send().await.ok()?;
        let gateway = http.get(format!("http://127.0.0.1:{base}/health/ready")).send().await.ok()?;
        (ordering.status().is_success() && gateway.status().is_success()).then_some(())
    })
    .await;
    assert!(broker.accepted() > 0, "the services are trying the broker");

    // The database hangs too: connections open, nothing answered.
    pg.set(Link::Stalled);
    // A request in flight on the hung database.
    let stuck = tokio::spawn({
        let url = format!("http://127.0.0.1:{}/api/v1/account", base + 2);
        let assertion = as_user(Uuid::new_v4(), reqwest::Method::GET, "/api/v1/account");
        async move { reqwest::Client::new().get(url).header(crate::helpers::ASSERTION, assertion).send().await }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let started = std::time::Instant::now();
    let pid = process.id().unwrap().to_string();
    assert!(std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    // The grace is 15 s; a few seconds more for the rest.
    let exit = tokio::time::timeout(Duration::from_secs(25), process.wait()).await;
    let took = started.elapsed();
    stuck.abort();
    let _ = std::fs::remove_dir_all(&mail);
    assert!(exit.is_ok(), "still running {took:?} after SIGTERM");
    eprintln!("ended {took:?} after SIGTERM");
}

// Tables that stay bounded.

#[tokio::test]
async fn spent_email_and_push_budgets_are_pruned_and_current_ones_stay() {
    let app = crate::helpers::TestApp::spawn().await;
    let db = app.db("notification").await;
    for (table, key, current, spent) in [
        ("email_budgets", "recipient", "'now@example.com'", "'then@example.com'"),
        ("push_budgets", "user_id", "gen_random_uuid()", "gen_random_uuid()"),
    ] {
        sqlx::query(&format!(
            "INSERT INTO {table} ({key}, window_start, used) VALUES
                 ({current}, now() - interval '10 minutes', 3), ({spent}, now() - interval '2 hours', 20)"
        ))
        .execute(&db)
        .await
        .unwrap();
    }
    assert_eq!(notification::spent_email_budgets().once(&db).await.unwrap(), 1);
    assert_eq!(notification::webpush::pusher::spent_budgets().once(&db).await.unwrap(), 1);
    for table in ["email_budgets", "push_budgets"] {
        let left: Vec<i32> = sqlx::query_scalar(&format!("SELECT used FROM {table}")).fetch_all(&db).await.unwrap();
        assert_eq!(left, [3], "{table}: the budget of the current hour stays");
    }
    app.stop().await;
}

#[tokio::test]
async fn processed_messages_sent_outbox_rows_and_expired_revoked_tokens_are_pruned_on_a_schedule() {
    let s = Sandbox::without_broker();
    let shutdown = CancellationToken::new();
    let (mut system, wiring) = system(&s);
    system.messaging.prune_interval_secs = 1;
    system.messaging.processed_retention_hours = 1;
    // Notification prunes its inbox like every service.
    let mail = std::env::temp_dir().join(format!("order-system-{}", s.prefix));
    system.mail.mail_dir = mail.clone();
    system.mail.emails_per_recipient_per_hour = 0;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let notification_task = tokio::spawn(notification::run(system.notification(&wiring), listener, shutdown.clone()));
    let identity = system.identity(&wiring);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let identity_task = tokio::spawn(identity::run(identity, listener, shutdown.clone()));

    let connect = |name: &str| {
        let url = s.database_url(name);
        async move {
            eventually(Duration::from_secs(20), || async {
                let db = sqlx::PgPool::connect(&url).await.ok()?;
                // Migrated: the runtime's and the service's tables are there.
                sqlx::query("SELECT 1 FROM inbox, outbox, revoked_tokens LIMIT 1").execute(&db).await.ok();
                sqlx::query("SELECT 1 FROM inbox LIMIT 1").execute(&db).await.ok().map(|_| db)
            })
            .await
        }
    };
    let notification_db = connect("notification").await;
    let identity_db = connect("identity").await;
    for db in [&notification_db, &identity_db] {
        sqlx::query(
            "INSERT INTO inbox (queue, message_id, received_at)
             SELECT 'q', gen_random_uuid(), now() - interval '2 hours' FROM generate_series(1, 2500)",
        )
        .execute(db)
        .await
        .unwrap();
        sqlx::query("INSERT INTO inbox (queue, message_id) VALUES ('q', gen_random_uuid())").execute(db).await.unwrap();
    }
    eventually(Duration::from_secs(20), || async {
        let table = |db: &sqlx::PgPool| {
            let db = db.clone();
            async move {
                sqlx::query_as::<_, (i64, i64)>(
                    "SELECT count(*) FILTER (WHERE received_at < now() - interval '1 hour'), count(*) FROM inbox",
                )
                .fetch_one(&db)
                .await
                .unwrap()
            }
        };
        ((table(&notification_db).await, table(&identity_db).await) == ((0, 1), (0, 1))).then_some(())
    })
    .await;

    // Identity: sent outbox rows past the retention, and expired revoked tokens.
    let row = |sent: &str| {
        format!(
            "INSERT INTO outbox (message_id, exchange, routing_key, message_type, payload, created_at, sent_at,
                                 next_attempt_at)
             VALUES (gen_random_uuid(), 'nowhere', 'x', 'X', '{{}}', now() - interval '3 hours', {sent},
                     now() + interval '1 day')"
        )
    };
    sqlx::query(&row("now() - interval '2 hours'")).execute(&identity_db).await.unwrap();
    sqlx::query(&row("now()")).execute(&identity_db).await.unwrap();
    sqlx::query(&row("NULL")).execute(&identity_db).await.unwrap();
    sqlx::query(
        "INSERT INTO revoked_tokens (jti, expires_at) VALUES
            (gen_random_uuid(), now() - interval '1 minute'),
            (gen_random_uuid(), now() + interval '1 hour')",
    )
    .execute(&identity_db)
    .await
    .unwrap();
    eventually(Duration::from_secs(20), || async {
        let (sent_old, sent_new, unsent): (i64, i64, i64) = sqlx::query_as(
            "SELECT count(*) FILTER (WHERE sent_at < now() - interval '1 hour'),
                    count(*) FILTER (WHERE sent_at >= now() - interval '1 hour'),
                    count(*) FILTER (WHERE sent_at IS NULL)
             FROM outbox WHERE exchange = 'nowhere'",
        )
        .fetch_one(&identity_db)
        .await
        .unwrap();
        let (expired, live): (i64, i64) = sqlx::query_as(
            "SELECT count(*) FILTER (WHERE expires_at < now()), count(*) FILTER (WHERE expires_at >= now())
             FROM revoked_tokens",
        )
        .fetch_one(&identity_db)
        .await
        .unwrap();
        ((sent_old, sent_new, unsent, expired, live) == (0, 1, 1, 0, 1)).then_some(())
    })
    .await;
    let indexed: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_indexes WHERE tablename = 'revoked_tokens' AND indexdef LIKE '%(expires_at)%')",
    )
    .fetch_one(&identity_db)
    .await
    .unwrap();
    assert!(indexed, "revoked tokens are indexed by expiry");

    shutdown.cancel();
    for task in [notification_task, identity_task] {
        tokio::time::timeout(Duration::from_secs(20), task).await.unwrap().unwrap().unwrap();
    }
    notification_db.close().await;
    identity_db.close().await;
    let _ = std::fs::remove_dir_all(&mail);
}

// The mailer: permanent failures end, temporary ones are retried, no
// transaction is held across SMTP.

/// The SMTP sink's answers by the recipient's local part: `refused…` 550,
/// `later…` 451 twice then accepted, `temp…` always 451, `slow…` held until
/// the test releases it; others accepted.
fn picky(recipient: &str, attempt: u32) -> test_support::Rcpt {
    use test_support::Rcpt;
    let later = || Rcpt::Reply("451 4.3.0 try again later".into());
    match recipient.split('@').next().unwrap_or_default() {
        l if l.starts_with("refused") => Rcpt::Reply("550 5.1.1 no such mailbox".into()),
        l if l.starts_with("temp") => later(),
        l if l.starts_with("later") && attempt <= 2 => later(),
        l if l.starts_with("slow") => Rcpt::Hold,
        _ => Rcpt::Accept,
    }
}

#[tokio::test]
async fn the_mailer_fails_permanent_refusals_retries_temporary_ones_and_holds_no_transaction_across_smtp() {
    let s = Sandbox::without_broker();
    let out = s.dir("mail");
    let smtp = test_support::SmtpSink::with_rule(picky).await;

    let shutdown = CancellationToken::new();
    let (mut system, wiring) = system(&s);
    system.mail.smtp_url = Some(smtp.url());
    system.mail.mail_dir = out.join("unused");
    system.mail.emails_per_recipient_per_hour = 0;
    let config = system.notification(&wiring);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let task = tokio::spawn(notification::run(config, listener, shutdown.clone()));
    let url = s.database_url("notification");
    let db = eventually(Duration::from_secs(20), || async {
        let db = sqlx::PgPool::connect(&url).await.ok()?;
        sqlx::query("SELECT failed_at FROM email_deliveries LIMIT 1").execute(&db).await.ok().map(|_| db)
    })
    .await;

    // One e-mail per address, in one batch; `temp` has failed 50 times already
    // (a delay computed in SQL as 2 s * 2^50 overflows and rolls the batch back).
    let tag = Uuid::new_v4().simple().to_string();
    let mut ids = std::collections::HashMap::new();
    for (local, attempts) in [("refused", 0), ("a..b", 0), ("later", 0), ("temp", 50), ("slow", 0), ("fine", 0)] {
        let (user, notification) = (Uuid::new_v4(), Uuid::new_v4());
        let email = format!("{local}{tag}@example.com");
        let email = if local == "a..b" { "a..b@example.com".to_string() } else { email };
        sqlx::query("INSERT INTO profiles (user_id, email) VALUES ($1, $2)")
            .bind(user)
            .bind(&email)
            .execute(&db)
            .await
            .unwrap();
        sqlx::query("INSERT INTO notifications (id, user_id, message) VALUES ($1, $2, 'hello')")
            .bind(notification)
            .bind(user)
            .execute(&db)
            .await
            .unwrap();
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO email_deliveries (notification_id, user_id, subject, body, attempts)
             VALUES ($1, $2, 'Hello', 'hello', $3) RETURNING id",
        )
        .bind(notification)
        .bind(user)
        .bind(attempts)
        .fetch_one(&db)
        .await
        .unwrap();
        ids.insert(local, (id, email));
    }

    // While the slow server holds a send, no transaction is open.
    smtp.holding(1).await;
    assert_eq!(test_support::idle_in_transaction(&db).await, 0, "no transaction held across an SMTP send");
    smtp.release();

    #[derive(Debug, sqlx::FromRow)]
    struct Delivery {
        sent: bool,
        failed_reason: Option<String>,
        last_error: Option<String>,
        attempts: i32,
        retry_in: f64,
    }
    let delivery = |local: &'static str| {
        let (db, id) = (db.clone(), ids[local].0);
        async move {
            sqlx::query_as::<_, Delivery>(
                "SELECT sent_at IS NOT NULL AS sent, failed_reason, last_error, attempts,
                        extract(epoch FROM next_attempt_at - now())::float8 AS retry_in
                 FROM email_deliveries WHERE id = $1",
            )
            .bind(id)
            .fetch_one(&db)
            .await
            .unwrap()
        }
    };
    eventually(Duration::from_secs(30), || async {
        let done = delivery("later").await.sent && delivery("fine").await.sent && delivery("slow").await.sent;
        done.then_some(())
    })
    .await;
    let later = delivery("later").await;
    assert_eq!(later.attempts, 3, "two 451s, then sent: {later:?}");
    for local in ["later", "fine", "slow"] {
        assert!(smtp.delivered_to(&ids[local].1), "{local} delivered");
    }
    let refused = delivery("refused").await;
    assert!(!refused.sent);
    assert!(refused.failed_reason.as_deref().unwrap_or_default().contains("550"), "{refused:?}");
    let invalid = delivery("a..b").await;
    assert!(invalid.failed_reason.as_deref().unwrap_or_default().contains("address"), "{invalid:?}");
    let temp = delivery("temp").await;
    assert!(!temp.sent && temp.failed_reason.is_none(), "{temp:?}");
    assert!(temp.last_error.as_deref().unwrap_or_default().contains("451"), "{temp:?}");
    assert!((3000.0..=3601.0).contains(&temp.retry_in), "capped at an hour: {temp:?}");
    // Permanent failures are not tried again: `later` was retried twice
    // (each after a backoff) since they failed.
    assert_eq!(smtp.attempts(&ids["later"].1), 3);
    assert_eq!(smtp.attempts(&ids["refused"].1), 1);
    assert_eq!(delivery("refused").await.attempts, 1);
    assert_eq!(delivery("a..b").await.attempts, 1);

    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(20), task).await.unwrap().unwrap().unwrap();
    db.close().await;
}

/// A service whose database is away when it starts does not exit: it waits
/// for it (capped backoff), alive and not ready, answering 503 with
/// `Retry-After`; when the database comes, it serves. Stopped while waiting,
/// it ends at once.
#[tokio::test]
async fn a_service_started_while_its_database_is_away_waits_for_it_alive_and_not_ready() {
    let s = Sandbox::new().await;
    let pg = TcpProxy::before(&crate::helpers::postgres_url()).await;
    pg.set(Link::Cut);
    let start = || async {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let shutdown = CancellationToken::new();
        let config = billing_behind(&s, &pg);
        (url, shutdown.clone(), tokio::spawn(billing::run(config, listener, shutdown)))
    };
    let http = reqwest::Client::new();
    let (url, shutdown, task) = start().await;
    // Several attempts refused (0.25 + 0.5 + 1 s apart).
    eventually(Duration::from_secs(20), || async { (pg.refused() >= 4).then_some(()) }).await;
    assert!(!task.is_finished(), "the service exited: {:?}", task.await);
    let live = http.get(format!("{url}/health/live")).send().await.unwrap();
    assert_eq!(live.status(), StatusCode::OK);
    let ready = http.get(format!("{url}/health/ready")).send().await.unwrap();
    assert_eq!(ready.status(), StatusCode::SERVICE_UNAVAILABLE);
    let user = Uuid::new_v4();
    let r = account(&http, &url, user).await;
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(r.headers().contains_key("retry-after"), "{:?}", r.headers());
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["code"], 503, "the error body: {body}");

    pg.set(Link::Open);
    eventually(Duration::from_secs(30), || async {
        let r = http.get(format!("{url}/health/ready")).send().await.ok()?;
        r.status().is_success().then_some(())
    })
    .await;
    assert_eq!(account(&http, &url, user).await.status(), StatusCode::OK);
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(20), task).await.expect("stopped in time").unwrap().unwrap();

    // Stopped while it still waits: it ends at once.
    pg.set(Link::Cut);
    let refused = pg.refused();
    let (_, shutdown, task) = start().await;
    eventually(Duration::from_secs(20), || async { (pg.refused() > refused).then_some(()) }).await;
    assert!(!task.is_finished());
    shutdown.cancel();
    let ended = tokio::time::timeout(Duration::from_secs(5), task).await.expect("ended at once").unwrap();
    assert!(ended.is_err_and(|e| e.to_string().contains("waiting for the database")));
}

/// `consumer_reconnects_total{queue}` in a service's `/metrics`.
async fn reconnects(http: &reqwest::Client, service: &str, queue: &str) -> f64 {
    let text = http.get(format!("{service}/metrics")).send().await.unwrap().text().await.unwrap();
    let label = format!("queue=\"{queue}\"");
    text.lines()
        .filter(|l| l.starts_with("consumer_reconnects_total{") && l.contains(&label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A consumer the broker refuses (here its queue is gone: every consume
/// fails with NOT_FOUND) asks again after a capped, growing pause, not twice
/// a second for ever; once the queue is back it consumes again.
#[tokio::test]
async fn a_consumer_the_broker_refuses_reconnects_with_backoff() {
    let s = Sandbox::new().await;
    let billing = start_billing(billing_config(&s)).await;
    let http = reqwest::Client::new();
    let queue = "billing.payments";
    // Deleted once billing's consumer has declared it and consumes.
    eventually(Duration::from_secs(20), || async {
        let url = format!("{}/queues/{}/{queue}", crate::helpers::rabbitmq_api(), s.prefix);
        let q: Value = http.get(&url).send().await.ok()?.json().await.ok()?;
        (q["consumers"].as_u64()? >= 1).then_some(())?;
        http.delete(&url).send().await.ok()?.status().is_success().then_some(())
    })
    .await;
    eventually(Duration::from_secs(10), || async {
        (reconnects(&http, &billing.url, queue).await >= 1.0).then_some(())
    })
    .await;
    let before = reconnects(&http, &billing.url, queue).await;
    let started = std::time::Instant::now();
    // It keeps trying: three more reconnections. Backoff from 0.5 s doubling
    // puts at least 1 + 2 s between them (two whole pauses after the first);
    // a fixed 0.5 s pause would take 1 s.
    eventually(Duration::from_secs(30), || async {
        (reconnects(&http, &billing.url, queue).await >= before + 3.0).then_some(())
    })
    .await;
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(2500), "three reconnections in {took:?}: no backoff");

    // The queue declared again (any new connection declares the topology),
    // a payment request published: billing consumes it.
    let id = Uuid::new_v4();
    let body =
        serde_json::to_vec(&CreatePayment { id, user_id: Uuid::new_v4(), amount: "3".parse().unwrap() }).unwrap();
    publish(&s.amqp_url, exchange::ORDERING, CreatePayment::NAME, &body).await;
    let db = sqlx::PgPool::connect(&s.database_url("billing")).await.unwrap();
    eventually(Duration::from_secs(45), || async {
        let n = test_support::count(&db, "SELECT count(*) FROM payments WHERE id = $1", id).await;
        (n == 1).then_some(())
    })
    .await;
    db.close().await;
    billing.stop().await.unwrap();
}
