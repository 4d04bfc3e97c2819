//! Cases for orders that no message will ever settle, and for a herd of
//! reconnecting streams.
//!
//! - **Lost messages** (the sweeper): orders are written straight into
//!   ordering's database, pending, with their `CreatePayment` already gone —
//!   what a consumer's inbox write lost after its ack leaves (billing took the
//!   command, acked it, and its commit was lost), and what a broker that
//!   deletes a message past its delivery limit leaves. Only ordering's
//!   sweeper can settle them: each must end succeeded and charged once.
//! - **The timeout**: one such order is placed far enough back to be past
//!   the pending timeout: the sweeper voids its payment, and it must end
//!   failed with billing's reason, nothing charged.
//! - **The herd**: both push-service replicas are SIGKILLed at once, so every
//!   open stream ends at the same instant and reconnects; the checker's
//!   "each event on its user's stream exactly once" covers what they missed.
//!
//! The users of these cases are registered apart from the load's (the
//! checker's balances follow the load's own requests); the audit covers
//! their orders like every other (one payment and one notification each).

use anyhow::Context;
use contracts::messages::PAYMENT_VOIDED;
use serde_json::{Value, json};
use sqlx::PgPool;
use std::sync::Arc;
use std::time::Duration;
use uuid::Uuid;

use crate::infra::Replica;

/// The sweeper's settings for the ordering replicas: re-drive after 5 s,
/// give up after 10 min (the timed-out order is placed 1 h back).
pub const SWEEPER_ENV: [(&str, &str); 3] = [
    ("ORDERING_REDRIVE_AFTER_MS", "5000"),
    ("ORDERING_PENDING_TIMEOUT_MS", "600000"),
    ("ORDERING_SWEEP_INTERVAL_MS", "1000"),
];

/// Each user's deposit and each order's price.
const DEPOSIT: i64 = 100;
const PRICE: i64 = 10;

/// A user of these cases and their order that lost its messages.
pub struct StuckOrder {
    token: String,
    order: Uuid,
    /// Placed past the timeout: must fail (voided), not succeed.
    timed_out: bool,
}

/// What the cases wrote, to check once the system has settled.
pub struct StuckOrders {
    orders: Vec<StuckOrder>,
}

async fn register(http: &reqwest::Client, api: &str) -> anyhow::Result<(Uuid, String)> {
    let email = format!("stuck-{}@example.com", Uuid::new_v4().simple());
    let body = json!({ "email": email, "password": "correct horse battery" });
    let r = http.post(format!("{api}/identity/register")).json(&body).send().await?;
    anyhow::ensure!(r.status() == reqwest::StatusCode::CREATED, "registration answered {}", r.status());
    let id: Uuid = r.json::<Value>().await?["id"].as_str().context("user id")?.parse()?;
    let r = http.post(format!("{api}/identity/login")).json(&body).send().await?;
    let token = r.json::<Value>().await?["accessToken"].as_str().context("token")?.to_string();
    let r = http
        .post(format!("{api}/billing/account/deposit"))
        .bearer_auth(&token)
        .json(&json!({ "amount": DEPOSIT }))
        .send()
        .await?;
    anyhow::ensure!(r.status() == reqwest::StatusCode::NO_CONTENT, "deposit answered {}", r.status());
    Ok((id, token))
}

impl StuckOrders {
    /// Registers `n` users (one more for the timeout) through `gateway` and
    /// writes each an order whose messages are lost into `ordering_db`.
    pub async fn inject(gateway: &str, ordering_db: &str, n: usize) -> anyhow::Result<StuckOrders> {
        let http = reqwest::Client::builder().timeout(Duration::from_secs(30)).build()?;
        let api = format!("{gateway}/api/v1");
        let db = PgPool::connect(ordering_db).await?;
        let mut orders = Vec::new();
        for i in 0..=n {
            let (user, token) = register(&http, &api).await?;
            let timed_out = i == n;
            let order = Uuid::now_v7();
            // No outbox row: the CreatePayment went out and was lost after it.
            sqlx::query(
                "INSERT INTO orders (id, user_id, price, created_at)
                 VALUES ($1, $2, $3, now() - CASE WHEN $4 THEN interval '1 hour' ELSE interval '0' END)",
            )
            .bind(order)
            .bind(user)
            .bind(rust_decimal::Decimal::from(PRICE))
            .bind(timed_out)
            .execute(&db)
            .await?;
            orders.push(StuckOrder { token, order, timed_out });
        }
        db.close().await;
        Ok(StuckOrders { orders })
    }

    pub fn describe(&self) -> String {
        format!(
            "{} orders pending with their CreatePayment lost (a lost inbox write; only the sweeper can settle them), \
             1 of them past the pending timeout",
            self.orders.len()
        )
    }

    /// What these users' own lists hold: (orders, final orders,
    /// notifications), for the comparison with the audit's totals; `None`
    /// when a list could not be read.
    pub async fn listed(&self, gateway: &str) -> Option<(usize, usize, usize)> {
        let http = reqwest::Client::new();
        let (mut orders, mut finals, mut notes) = (0, 0, 0);
        for o in &self.orders {
            let list = |path: &str| {
                let req = http.get(format!("{gateway}/api/v1{path}?limit=500")).bearer_auth(&o.token);
                async move { req.send().await.ok()?.json::<Vec<Value>>().await.ok() }
            };
            let placed = list("/ordering/orders").await?;
            orders += placed.len();
            finals += placed.iter().filter(|o| o["status"] == "succeeded" || o["status"] == "failed").count();
            notes += list("/notifications").await?.len();
        }
        Some((orders, finals, notes))
    }

    /// Each order settled as it must be, and its user charged accordingly:
    /// the violations found.
    pub async fn check(&self, gateway: &str) -> Vec<String> {
        let http = reqwest::Client::new();
        let api = format!("{gateway}/api/v1");
        let mut violations = Vec::new();
        for o in &self.orders {
            let get = |path: String| http.get(format!("{api}{path}")).bearer_auth(&o.token).send();
            let order = match get(format!("/ordering/orders/{}", o.order)).await {
                Ok(r) => r.json::<Value>().await.unwrap_or_default(),
                Err(e) => {
                    violations.push(format!("stuck order {}: could not be read: {e}", o.order));
                    continue;
                }
            };
            let balance = match get("/billing/account".into()).await {
                Ok(r) => r.json::<Value>().await.unwrap_or_default()["amount"].as_f64(),
                Err(_) => None,
            };
            let (status, reason) = (order["status"].as_str().unwrap_or("?"), order["reason"].as_str());
            let (want_status, want_reason, want_balance) = if o.timed_out {
                ("failed", Some(PAYMENT_VOIDED), DEPOSIT as f64)
            } else {
                ("succeeded", None, (DEPOSIT - PRICE) as f64)
            };
            if status != want_status || reason != want_reason {
                violations.push(format!(
                    "stuck order {}: {status} ({reason:?}), expected {want_status} ({want_reason:?})",
                    o.order
                ));
            }
            if balance != Some(want_balance) {
                violations
                    .push(format!("stuck order {}: its user's balance {balance:?}, expected {want_balance}", o.order));
            }
        }
        violations
    }
}

/// The herd: every push-service replica SIGKILLed at the same instant (each
/// is started again by its supervisor after 1-5 s).
pub fn kill_every_push_replica(replicas: &[Arc<Replica>]) -> Vec<String> {
    let push: Vec<&Arc<Replica>> = replicas.iter().filter(|r| r.service == "push").collect();
    for r in &push {
        r.kill();
    }
    push.iter().map(|r| r.label.clone()).collect()
}
