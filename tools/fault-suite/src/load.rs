//! The load: users registering, depositing, withdrawing and ordering through
//! the gateway in a closed loop, each with an event-stream subscriber that
//! resumes with `Last-Event-ID`. Everything a user was told is recorded so
//! that the outcome can be checked from outside afterwards.

use futures::StreamExt;
use rand::Rng;
use reqwest::StatusCode;
use rust_decimal::Decimal;
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Answers counted by status, and the 500s with their request.
#[derive(Default)]
pub struct Stats {
    pub by_status: Mutex<BTreeMap<String, u64>>,
    pub server_errors: Mutex<Vec<String>>,
    pub registrations: AtomicU64,
    pub deposits: AtomicU64,
    pub withdrawals: AtomicU64,
    pub withdrawals_refused: AtomicU64,
    pub orders: AtomicU64,
    pub orders_sent_twice: AtomicU64,
    pub order_retries: AtomicU64,
    pub money_sent_twice: AtomicU64,
    pub money_retries: AtomicU64,
    pub stream_connects: AtomicU64,
    pub violations: Mutex<Vec<String>>,
}

impl Stats {
    async fn count(&self, what: &str, outcome: &Result<reqwest::Response, reqwest::Error>, request: &str) {
        let key = match outcome {
            Ok(r) => r.status().as_u16().to_string(),
            Err(e) if e.is_timeout() => "timeout".into(),
            Err(_) => "connection error".into(),
        };
        *self.by_status.lock().await.entry(key).or_default() += 1;
        if let Ok(r) = outcome
            && r.status() == StatusCode::INTERNAL_SERVER_ERROR
        {
            self.server_errors.lock().await.push(format!("{what} (X-Request-Id {request})"));
        }
    }

    pub async fn violation(&self, v: String) {
        eprintln!("fault-suite: VIOLATION {v}");
        self.violations.lock().await.push(v);
    }
}

/// A money movement whose answer was lost or 5xx: applied or not, the
/// ledger says (its source is the request's X-Request-Id).
#[derive(Clone, Debug)]
pub struct Uncertain {
    /// The X-Request-Id of every attempt.
    pub request_ids: Vec<String>,
    /// Signed: + deposit, - withdrawal.
    pub amount: Decimal,
}

#[derive(Default)]
pub struct UserRecord {
    pub deposited: Decimal,
    pub withdrawn: Decimal,
    pub uncertain: Vec<Uncertain>,
    /// Every order accepted (202), with its price.
    pub orders: HashMap<Uuid, Decimal>,
    /// Order events received on the user's stream: order id -> their event ids.
    pub events: HashMap<Uuid, Vec<String>>,
    pub resets: u32,
    pub last_event_id: Option<String>,
}

pub struct User {
    pub id: Uuid,
    pub email: String,
    pub token: String,
    pub record: Mutex<UserRecord>,
}

pub struct Load {
    pub http: reqwest::Client,
    pub gateway: String,
    pub stats: Stats,
    pub users: Mutex<Vec<Arc<User>>>,
}

fn request_id() -> String {
    Uuid::new_v4().to_string()
}

impl Load {
    pub fn new(gateway: String) -> Arc<Load> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .pool_idle_timeout(Duration::from_secs(5))
            .build()
            .expect("HTTP client");
        Arc::new(Load { http, gateway, stats: Stats::default(), users: Mutex::new(vec![]) })
    }

    fn url(&self, path: &str) -> String {
        format!("{}/api/v1{path}", self.gateway)
    }

    async fn send(
        &self,
        what: &str,
        req: reqwest::RequestBuilder,
    ) -> (String, Result<reqwest::Response, reqwest::Error>) {
        let id = request_id();
        let outcome = req.header("x-request-id", &id).send().await;
        self.stats.count(what, &outcome, &id).await;
        (id, outcome)
    }

    /// Registers and logs in a new user, retrying what was not answered
    /// (the same e-mail again: 409 means the first attempt got through).
    pub async fn register(&self, stop: &CancellationToken) -> Option<Arc<User>> {
        let email = format!("{}@example.com", Uuid::new_v4().simple());
        let password = "correct horse battery";
        let body = json!({"email": email, "password": password, "firstName": "Fault", "lastName": "Suite"});
        let mut id = None;
        while !stop.is_cancelled() {
            let (_, r) =
                self.send("POST /identity/register", self.http.post(self.url("/identity/register")).json(&body)).await;
            match r {
                Ok(r) if r.status() == StatusCode::CREATED => {
                    id = r.json::<Value>().await.ok().and_then(|v| v["id"].as_str()?.parse::<Uuid>().ok());
                    break;
                }
                Ok(r) if r.status() == StatusCode::CONFLICT => break,
                Ok(r) if r.status().is_client_error() => {
                    self.stats.violation(format!("registration of {email} refused: {}", r.status())).await;
                    return None;
                }
                _ => tokio::time::sleep(Duration::from_millis(500)).await,
            }
        }
        let login = json!({"email": email, "password": password});
        while !stop.is_cancelled() {
            let (_, r) =
                self.send("POST /identity/login", self.http.post(self.url("/identity/login")).json(&login)).await;
            if let Ok(r) = r
                && r.status() == StatusCode::OK
                && let Ok(v) = r.json::<Value>().await
            {
                let token = v["accessToken"].as_str()?.to_string();
                let id = match id {
                    Some(id) => id,
                    // Registered by an attempt whose answer was lost: who am I?
                    None => self.whoami(&token).await?,
                };
                self.stats.registrations.fetch_add(1, Ordering::Relaxed);
                let user = Arc::new(User { id, email, token, record: Mutex::new(UserRecord::default()) });
                self.users.lock().await.push(user.clone());
                return Some(user);
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        None
    }

    async fn whoami(&self, token: &str) -> Option<Uuid> {
        let parts: Vec<&str> = token.split('.').collect();
        use base64::Engine;
        let claims = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(parts.get(1)?).ok()?;
        serde_json::from_slice::<Value>(&claims).ok()?["userId"].as_str()?.parse().ok()
    }

    /// One user's closed loop until `stop`.
    pub async fn drive(self: Arc<Self>, user: Arc<User>, stop: CancellationToken) {
        while !stop.is_cancelled() {
            let roll = rand::thread_rng().gen_range(0..100);
            if roll < 30 {
                self.money(&user, true, roll < 3, &stop).await;
            } else if roll < 42 {
                self.money(&user, false, roll >= 40, &stop).await;
            } else {
                self.order(&user, roll >= 90, &stop).await;
            }
            let pause = rand::thread_rng().gen_range(100..400);
            tokio::time::sleep(Duration::from_millis(pause)).await;
        }
    }

    /// A deposit or withdrawal under an Idempotency-Key (one in ten sent
    /// twice at once), sent again under the same key until one attempt is
    /// answered. Applied exactly once whatever the number of attempts.
    async fn money(&self, user: &User, deposit: bool, twice: bool, stop: &CancellationToken) {
        let units: u32 = rand::thread_rng().gen_range(if deposit { 20..120 } else { 5..40 });
        let amount = Decimal::from(units);
        let path = if deposit { "/billing/account/deposit" } else { "/billing/account/withdraw" };
        let what = format!("POST {path}");
        let key = Uuid::new_v4().to_string();
        let request_ids = Mutex::new(vec![]);
        let attempt = || async {
            let req = self
                .http
                .post(self.url(path))
                .bearer_auth(&user.token)
                .header("idempotency-key", &key)
                .json(&json!({ "amount": units }));
            let (request_id, r) = self.send(&what, req).await;
            request_ids.lock().await.push(request_id);
            match r.map(|r| r.status()) {
                Ok(s) if s.is_success() || s.is_client_error() => Some(s),
                // 5xx or no answer: not known whether it happened.
                _ => None,
            }
        };
        let mut answers = vec![];
        if twice {
            self.stats.money_sent_twice.fetch_add(1, Ordering::Relaxed);
            let (a, b) = tokio::join!(attempt(), attempt());
            answers.extend([a, b].into_iter().flatten());
        }
        while answers.is_empty() && !stop.is_cancelled() {
            match attempt().await {
                Some(s) => answers.push(s),
                None => {
                    self.stats.money_retries.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
        let request_ids = request_ids.into_inner();
        let mut rec = user.record.lock().await;
        if answers.contains(&StatusCode::NO_CONTENT) {
            if deposit {
                rec.deposited += amount;
                self.stats.deposits.fetch_add(1, Ordering::Relaxed);
            } else {
                rec.withdrawn += amount;
                self.stats.withdrawals.fetch_add(1, Ordering::Relaxed);
            }
            return;
        }
        match answers.first() {
            Some(&StatusCode::UNPROCESSABLE_ENTITY) if !deposit => {
                self.stats.withdrawals_refused.fetch_add(1, Ordering::Relaxed);
            }
            Some(s) => {
                drop(rec);
                self.stats.violation(format!("user {}: {what} answered {s}", user.id)).await;
            }
            // Never answered before the load stopped: the ledger tells.
            None => rec.uncertain.push(Uncertain { request_ids, amount: if deposit { amount } else { -amount } }),
        }
    }

    /// Places an order under an Idempotency-Key; `twice` sends the same
    /// request twice at once. Unanswered attempts are sent again under the
    /// same key until one is answered.
    async fn order(&self, user: &User, twice: bool, stop: &CancellationToken) {
        let units: u32 = rand::thread_rng().gen_range(5..60);
        let price = Decimal::from(units);
        let key = Uuid::new_v4().to_string();
        let attempt = || async {
            let req = self
                .http
                .post(self.url("/ordering/orders"))
                .bearer_auth(&user.token)
                .header("idempotency-key", &key)
                .json(&json!({ "price": units }));
            let (_, r) = self.send("POST /ordering/orders", req).await;
            match r {
                Ok(r) if r.status() == StatusCode::ACCEPTED => {
                    r.json::<Value>().await.ok().and_then(|v| v["id"].as_str()?.parse::<Uuid>().ok()).map(Ok)
                }
                Ok(r) if r.status().is_client_error() => Some(Err(r.status())),
                _ => None,
            }
        };
        let mut answers = vec![];
        if twice {
            self.stats.orders_sent_twice.fetch_add(1, Ordering::Relaxed);
            let (a, b) = tokio::join!(attempt(), attempt());
            answers.extend([a, b].into_iter().flatten());
        }
        // Until at least one attempt is answered (give up only at the very end).
        while answers.is_empty() && !stop.is_cancelled() {
            match attempt().await {
                Some(a) => answers.push(a),
                None => {
                    self.stats.order_retries.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
        let mut ids: Vec<Uuid> = vec![];
        for a in answers {
            match a {
                Ok(id) => ids.push(id),
                Err(s) => self.stats.violation(format!("user {}: order of {price} answered {s}", user.id)).await,
            }
        }
        ids.dedup();
        if ids.len() > 1 {
            self.stats.violation(format!("user {}: one Idempotency-Key placed orders {ids:?}", user.id)).await;
        }
        if let Some(id) = ids.first() {
            self.stats.orders.fetch_add(1, Ordering::Relaxed);
            user.record.lock().await.orders.insert(*id, price);
        }
    }

    /// The user's event stream, reconnecting with `Last-Event-ID` until
    /// `stop`. `connected` is notified once the first stream is open.
    pub async fn subscribe(
        self: Arc<Self>,
        user: Arc<User>,
        connected: tokio::sync::oneshot::Sender<()>,
        stop: CancellationToken,
    ) {
        let mut connected = Some(connected);
        let http = reqwest::Client::builder().pool_max_idle_per_host(0).build().expect("HTTP client");
        while !stop.is_cancelled() {
            let last = user.record.lock().await.last_event_id.clone();
            let mut req = http.get(self.url("/push/orders")).bearer_auth(&user.token);
            if let Some(id) = &last {
                req = req.header("last-event-id", id);
            }
            let resp = tokio::select! { r = req.send() => r, _ = stop.cancelled() => return };
            let resp = match resp {
                Ok(r) if r.status() == StatusCode::OK => r,
                _ => {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            };
            self.stats.stream_connects.fetch_add(1, Ordering::Relaxed);
            let mut body = resp.bytes_stream();
            let mut buf = String::new();
            loop {
                let chunk = tokio::select! { c = body.next() => c, _ = stop.cancelled() => return };
                let Some(Ok(chunk)) = chunk else { break };
                buf.push_str(&String::from_utf8_lossy(&chunk));
                while let Some(end) = buf.find("\n\n") {
                    let block: String = buf.drain(..end + 2).collect();
                    let (mut id, mut event, mut data) = (None, String::new(), String::new());
                    for line in block.lines() {
                        if line.starts_with(": connected")
                            && let Some(tx) = connected.take()
                        {
                            let _ = tx.send(());
                        }
                        if let Some((field, value)) = line.split_once(':') {
                            let value = value.strip_prefix(' ').unwrap_or(value);
                            match field {
                                "id" => id = Some(value.to_string()),
                                "event" => event = value.to_string(),
                                "data" => data.push_str(value),
                                _ => {}
                            }
                        }
                    }
                    let mut rec = user.record.lock().await;
                    match event.as_str() {
                        "OrderCreated" | "OrderFailed" => {
                            if let Some(order) = serde_json::from_str::<Value>(&data)
                                .ok()
                                .and_then(|v| v["orderId"].as_str()?.parse().ok())
                            {
                                rec.events.entry(order).or_default().push(id.clone().unwrap_or_default());
                            }
                        }
                        "reset" => rec.resets += 1,
                        _ => {}
                    }
                    if id.is_some() {
                        rec.last_event_id = id;
                    }
                }
            }
        }
    }
}
