//! A dependency that goes away is not a message failing, and not a 500:
//! services on a proxied PostgreSQL or RabbitMQ that the test cuts or stalls.

use crate::helpers::eventually;
use crate::outage::{Link, Sandbox, TcpProxy};
use contracts::messages::{CreatePayment, Message, exchange};
use lapin::options::QueueDeclareOptions;
use reqwest::StatusCode;
use runtime::MessagingConfig;
use serde_json::Value;
use std::time::Duration;
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

pub fn messaging(amqp_url: &str) -> MessagingConfig {
    MessagingConfig { retry_delays_ms: vec![50, 150], ..MessagingConfig::local(amqp_url) }
}

/// Billing on `database_url` and `amqp_url`, once it answers readiness.
pub async fn start_billing(database_url: String, amqp_url: &str) -> Running {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let shutdown = CancellationToken::new();
    let config = billing::Config { database_url, messaging: messaging(amqp_url), addr: String::new() };
    let task = tokio::spawn(billing::run(config, listener, shutdown.clone()));
    let running = Running { url, shutdown, task: Some(task) };
    let http = reqwest::Client::new();
    eventually(Duration::from_secs(20), || async {
        let r = http.get(format!("{}/health/ready", running.url)).send().await.ok()?;
        r.status().is_success().then_some(())
    })
    .await;
    running
}

async fn account(http: &reqwest::Client, billing: &str, user: Uuid) -> reqwest::Response {
    http.get(format!("{billing}/api/v1/account")).header("x-user-id", user.to_string()).send().await.unwrap()
}

#[tokio::test]
async fn while_the_database_is_away_requests_get_503_with_retry_after_and_service_resumes() {
    let s = Sandbox::new().await;
    let pg = TcpProxy::start("127.0.0.1:5432").await;
    let billing = start_billing(s.proxied_database_url("billing", &pg), &s.amqp_url).await;
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
        .header("x-user-id", user.to_string())
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
    let props = runtime::outbox::properties(Uuid::new_v4(), kind, None, chrono::Utc::now());
    runtime::broker::publish_confirmed(&ch, exchange, kind, body, props).await.unwrap();
    broker.close().await;
}

#[tokio::test]
async fn messages_consumed_while_the_database_is_away_wait_for_it_instead_of_being_dead_lettered() {
    let s = Sandbox::new().await;
    let pg = TcpProxy::start("127.0.0.1:5432").await;
    let billing = start_billing(s.proxied_database_url("billing", &pg), &s.amqp_url).await;

    pg.set(Link::Cut);
    let payments: Vec<Uuid> = (0..5).map(|_| Uuid::new_v4()).collect();
    for id in &payments {
        let body =
            serde_json::to_vec(&CreatePayment { id: *id, user_id: Uuid::new_v4(), amount: "3".parse().unwrap() })
                .unwrap();
        publish(&s.amqp_url, exchange::ORDERING, CreatePayment::NAME, &body).await;
    }
    // Many times the whole retry schedule (50 ms + 150 ms).
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(depth(&s.amqp_url, "billing.payments.dead").await, 0, "nothing dead-lettered for an absent database");

    pg.set(Link::Open);
    let db = sqlx::PgPool::connect(&s.database_url("billing")).await.unwrap();
    eventually(Duration::from_secs(30), || async {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM payments WHERE id = ANY($1)")
            .bind(&payments)
            .fetch_one(&db)
            .await
            .unwrap();
        (n == 5).then_some(())
    })
    .await;
    assert_eq!(depth(&s.amqp_url, "billing.payments.dead").await, 0);
    db.close().await;
    billing.stop().await.unwrap();
}

#[tokio::test]
async fn a_service_whose_broker_is_away_stays_ready_and_says_so_in_the_details() {
    let s = Sandbox::new().await;
    let amqp = TcpProxy::start("127.0.0.1:5672").await;
    let amqp_url = amqp.url(&s.amqp_url, 5672);
    let billing = start_billing(s.database_url("billing"), &amqp_url).await;
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
