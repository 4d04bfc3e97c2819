//! `order-system audit`: checks the invariants that hold across the services'
//! databases and the broker, and reports every violation.
//!
//! - every account's balance equals the sum of its ledger entries, and each
//!   entry's `balance_after` is the running sum up to it;
//! - every successful payment has exactly one ledger entry of its amount, and
//!   a failed one none;
//! - every final order has exactly one payment, of the same amount and
//!   outcome, and exactly one notification;
//! - no order has been pending longer than a threshold;
//! - every dead-letter queue (`*.dead`) is empty.
//!
//! It reads the databases directly (read-only) and the RabbitMQ management API.
//! Its queries are checked at run time, not with `sqlx::query!`: one crate
//! reading three services' databases has no single schema to prepare against
//! (the audit's tests run every query against real databases).

use anyhow::Context;
use rust_decimal::Decimal;
use sqlx::PgPool;
use std::collections::HashMap;
use std::fmt;
use std::time::Duration;
use uuid::Uuid;

/// Where the audit looks.
#[derive(Clone, Debug)]
pub struct AuditConfig {
    pub billing_db: String,
    pub ordering_db: String,
    pub notification_db: String,
    /// RabbitMQ management API, e.g. `http://guest:guest@127.0.0.1:15672/api`.
    pub rabbitmq_api: String,
    /// The vhost whose dead-letter queues are checked.
    pub vhost: String,
    /// The broker (AMQP URL of that vhost): when given, each dead letter's
    /// cause and reason are read and shown (taken and put back at the tail).
    pub amqp_url: Option<String>,
    /// Orders pending longer than this are violations.
    pub pending_threshold: Duration,
    /// An order settled less than this ago may still be on its way to
    /// notification: its notification is not checked yet.
    pub notification_grace: Duration,
}

/// One broken invariant: which check, about what (an order, a user, a queue), and how.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    pub check: &'static str,
    pub subject: String,
    pub detail: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{}] {}: {}", self.check, self.subject, self.detail)
    }
}

/// What was checked (a line per check, with counts) and what was found.
#[derive(Debug, Default)]
pub struct Report {
    pub checked: Vec<String>,
    pub violations: Vec<Violation>,
    pub totals: Totals,
}

/// What the audit counted, for a caller to compare with its own counts.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Totals {
    pub orders: usize,
    pub final_orders: usize,
    pub notifications: i64,
}

impl Report {
    pub fn is_clean(&self) -> bool {
        self.violations.is_empty()
    }

    /// The violations of one check.
    pub fn of(&self, check: &str) -> Vec<&Violation> {
        self.violations.iter().filter(|v| v.check == check).collect()
    }

    fn violation(&mut self, check: &'static str, subject: impl Into<String>, detail: impl Into<String>) {
        self.violations.push(Violation { check, subject: subject.into(), detail: detail.into() });
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "order-system audit")?;
        for line in &self.checked {
            writeln!(f, "  {line}")?;
        }
        if self.violations.is_empty() {
            writeln!(f, "no violations")
        } else {
            writeln!(f, "{} violation(s):", self.violations.len())?;
            for v in &self.violations {
                writeln!(f, "  {v}")?;
            }
            Ok(())
        }
    }
}

pub const BALANCE: &str = "balance";
pub const LEDGER: &str = "ledger";
pub const PAYMENT: &str = "payment";
pub const NOTIFICATION: &str = "notification";
pub const PENDING: &str = "pending";
pub const DEAD_LETTERS: &str = "dead-letters";

/// The version of the notification migration that added `order_id`: orders
/// settled before it have notifications that name no order.
const NOTIFICATION_ORDER_MIGRATION: i64 = 20261130000001;

async fn connect(url: &str) -> anyhow::Result<PgPool> {
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .acquire_timeout(Duration::from_secs(10))
        .connect(url)
        .await
        .with_context(|| format!("connecting to {}", runtime::db::redact(url)))
}

/// Runs every check. An error means a check could not run (a database or the
/// management API unreachable), not that it found something.
pub async fn run(config: &AuditConfig) -> anyhow::Result<Report> {
    let billing = connect(&config.billing_db).await?;
    let ordering = connect(&config.ordering_db).await?;
    let notification = connect(&config.notification_db).await?;
    let mut report = Report::default();
    balances(&billing, &mut report).await?;
    let snapshot = Orders::read(&ordering).await?;
    report.totals.orders = snapshot.finals.len() + snapshot.pending.len();
    report.totals.final_orders = snapshot.finals.len();
    report.totals.notifications =
        sqlx::query_scalar("SELECT count(*) FROM notifications").fetch_one(&notification).await?;
    orders(&billing, &notification, &snapshot, config.notification_grace, &mut report).await?;
    pending(&snapshot, config.pending_threshold, &mut report);
    dead_letters(config, &mut report).await?;
    billing.close().await;
    ordering.close().await;
    notification.close().await;
    Ok(report)
}

async fn balances(billing: &PgPool, report: &mut Report) -> anyhow::Result<()> {
    let accounts: i64 = sqlx::query_scalar("SELECT count(*) FROM accounts").fetch_one(billing).await?;
    let mismatched: Vec<(Uuid, Decimal, Decimal)> = sqlx::query_as(
        "SELECT a.user_id, a.balance, COALESCE(sum(l.amount), 0)
         FROM accounts a LEFT JOIN ledger_entries l ON l.user_id = a.user_id
         GROUP BY a.user_id, a.balance
         HAVING a.balance <> COALESCE(sum(l.amount), 0)
         ORDER BY a.user_id",
    )
    .fetch_all(billing)
    .await?;
    for (user, balance, sum) in mismatched {
        report.violation(
            BALANCE,
            format!("user {user}"),
            format!("balance {balance} but its ledger entries sum to {sum}"),
        );
    }
    let entries: i64 = sqlx::query_scalar("SELECT count(*) FROM ledger_entries").fetch_one(billing).await?;
    let broken: Vec<(i64, Uuid, Decimal, Decimal)> = sqlx::query_as(
        "SELECT id, user_id, balance_after, running FROM (
             SELECT id, user_id, balance_after,
                    sum(amount) OVER (PARTITION BY user_id ORDER BY id) AS running
             FROM ledger_entries) e
         WHERE balance_after <> running ORDER BY id",
    )
    .fetch_all(billing)
    .await?;
    for (id, user, after, running) in broken {
        report.violation(
            LEDGER,
            format!("user {user}"),
            format!("entry {id} says balance {after} after it, the entries up to it sum to {running}"),
        );
    }
    let payments: Vec<(Uuid, Uuid, Decimal, bool, i64, Option<Decimal>)> = sqlx::query_as(
        "SELECT p.id, p.user_id, p.amount, p.succeeded, count(l.id), sum(l.amount)
         FROM payments p LEFT JOIN ledger_entries l ON l.payment_id = p.id
         GROUP BY p.id
         HAVING count(l.id) <> (CASE WHEN p.succeeded THEN 1 ELSE 0 END)
             OR (p.succeeded AND sum(l.amount) <> -p.amount)
         ORDER BY p.id",
    )
    .fetch_all(billing)
    .await?;
    for (id, user, amount, succeeded, n, sum) in payments {
        let detail = match (succeeded, n) {
            (true, 0) => format!("succeeded for {amount} but no ledger entry charges it"),
            (false, _) => format!("failed but {n} ledger entr(ies) charge it"),
            _ => format!("succeeded for {amount} but its ledger entries charge {}", -sum.unwrap_or_default()),
        };
        report.violation(LEDGER, format!("payment {id} (user {user})"), detail);
    }
    let orphans: Vec<(i64, Uuid)> = sqlx::query_as(
        "SELECT l.id, l.payment_id FROM ledger_entries l
         WHERE l.payment_id IS NOT NULL AND NOT EXISTS (SELECT 1 FROM payments p WHERE p.id = l.payment_id)",
    )
    .fetch_all(billing)
    .await?;
    for (id, payment) in orphans {
        report.violation(
            LEDGER,
            format!("payment {payment}"),
            format!("ledger entry {id} charges a payment that does not exist"),
        );
    }
    report.checked.push(format!("accounts: {accounts}, ledger entries: {entries} (balance = sum of entries, running balances, one entry per successful payment)"));
    Ok(())
}

type Timestamp = chrono::DateTime<chrono::Utc>;
/// id, user, price, status, created at, settled (or last updated) at
type Order = (Uuid, Uuid, Decimal, String, Timestamp, Timestamp);

/// Every order as of one moment: one statement, so an order that settles
/// while the audit runs is either final or pending in it, never neither.
struct Orders {
    finals: Vec<Order>,
    pending: Vec<Order>,
    /// The database's clock at that moment.
    now: Timestamp,
}

impl Orders {
    async fn read(ordering: &PgPool) -> anyhow::Result<Orders> {
        let rows: Vec<(Uuid, Uuid, Decimal, String, Timestamp, Timestamp, Timestamp)> = sqlx::query_as(
            "SELECT id, user_id, price, status, created_at, updated_at, now() FROM orders ORDER BY created_at, id",
        )
        .fetch_all(ordering)
        .await?;
        let now = match rows.first() {
            Some(row) => row.6,
            None => sqlx::query_scalar("SELECT now()").fetch_one(ordering).await?,
        };
        let (pending, finals) = rows
            .into_iter()
            .map(|(id, user, price, status, created, updated, _)| (id, user, price, status, created, updated))
            .partition(|o| o.3 == "pending");
        Ok(Orders { finals, pending, now })
    }
}

struct Payment {
    amount: Decimal,
    succeeded: bool,
}

/// Payments and notifications are read after the orders, so every final
/// order's payment (made before it settled) and notification (made after)
/// can already be in them.
async fn orders(
    billing: &PgPool,
    notification: &PgPool,
    snapshot: &Orders,
    grace: Duration,
    report: &mut Report,
) -> anyhow::Result<()> {
    let finals = &snapshot.finals;
    let recent_since = snapshot.now - chrono::Duration::from_std(grace).unwrap_or_default();
    let payments: HashMap<Uuid, Payment> =
        sqlx::query_as::<_, (Uuid, Decimal, bool)>("SELECT id, amount, succeeded FROM payments")
            .fetch_all(billing)
            .await?
            .into_iter()
            .map(|(id, amount, succeeded)| (id, Payment { amount, succeeded }))
            .collect();
    let notifications: HashMap<Uuid, i64> = sqlx::query_as::<_, (Uuid, i64)>(
        "SELECT order_id, count(*) FROM notifications WHERE order_id IS NOT NULL GROUP BY order_id",
    )
    .fetch_all(notification)
    .await?
    .into_iter()
    .collect();
    // Notifications name their order only since this migration.
    let since: Option<Timestamp> = sqlx::query_scalar("SELECT installed_on FROM _sqlx_migrations WHERE version = $1")
        .bind(NOTIFICATION_ORDER_MIGRATION)
        .fetch_optional(notification)
        .await?;
    let (mut notified_checked, mut too_recent) = (0, 0);
    for (id, user, price, status, _, settled_at) in finals {
        let subject = format!("order {id} (user {user})");
        let succeeded = status == "succeeded";
        match payments.get(id) {
            None => report.violation(PAYMENT, &subject, format!("{status} but billing has no payment for it")),
            Some(p) if p.amount != *price => {
                report.violation(PAYMENT, &subject, format!("price {price} but its payment is for {}", p.amount))
            }
            Some(p) if p.succeeded != succeeded => report.violation(
                PAYMENT,
                &subject,
                format!("{status} but its payment {}", if p.succeeded { "succeeded" } else { "failed" }),
            ),
            Some(_) => {}
        }
        if since.is_some_and(|since| *settled_at < since) {
            continue;
        }
        if *settled_at > recent_since {
            too_recent += 1;
            continue;
        }
        notified_checked += 1;
        match notifications.get(id).copied().unwrap_or(0) {
            1 => {}
            0 => report.violation(NOTIFICATION, &subject, format!("{status} but no notification names it")),
            n => report.violation(NOTIFICATION, &subject, format!("{status} and {n} notifications name it")),
        }
    }
    report.checked.push(format!(
        "final orders: {} (one payment of the same amount and outcome each; one notification each: \
         {notified_checked} checked, {too_recent} settled within the last {} s not yet)",
        finals.len(),
        grace.as_secs()
    ));
    Ok(())
}

fn pending(snapshot: &Orders, threshold: Duration, report: &mut Report) {
    let since = snapshot.now - chrono::Duration::from_std(threshold).unwrap_or_default();
    let mut old = 0;
    for (id, user, _, _, created_at, _) in snapshot.pending.iter().filter(|o| o.4 < since) {
        old += 1;
        let age = (snapshot.now - *created_at).as_seconds_f64();
        report.violation(
            PENDING,
            format!("order {id} (user {user})"),
            format!("pending for {age:.0} s (threshold {} s)", threshold.as_secs()),
        );
    }
    report.checked.push(format!(
        "pending orders: {}, {old} older than {} s",
        snapshot.pending.len(),
        threshold.as_secs()
    ));
}

#[derive(serde::Deserialize)]
struct Queue {
    name: String,
    #[serde(default)]
    messages: Option<i64>,
}

/// The management API's credentials travel in the URL (`http://user:pass@host:port/api`).
pub(crate) fn management_request(
    http: &reqwest::Client,
    method: reqwest::Method,
    api: &str,
    path: &str,
) -> anyhow::Result<reqwest::RequestBuilder> {
    let mut url = reqwest::Url::parse(&format!("{}/{path}", api.trim_end_matches('/')))
        .with_context(|| format!("management API URL {api}"))?;
    let (user, pass) = (url.username().to_string(), url.password().map(str::to_string));
    url.set_username("").ok();
    url.set_password(None).ok();
    let user = if user.is_empty() { "guest".to_string() } else { user };
    Ok(http.request(method, url).basic_auth(user, Some(pass.unwrap_or_else(|| "guest".into()))))
}

async fn dead_letters(config: &AuditConfig, report: &mut Report) -> anyhow::Result<()> {
    let http = reqwest::Client::builder().timeout(Duration::from_secs(10)).build()?;
    let vhost = percent_encode(&config.vhost);
    let queues: Vec<Queue> =
        management_request(&http, reqwest::Method::GET, &config.rabbitmq_api, &format!("queues/{vhost}"))?
            .send()
            .await
            .context("RabbitMQ management API")?
            .error_for_status()
            .context("RabbitMQ management API")?
            .json()
            .await?;
    let dead: Vec<&Queue> = queues.iter().filter(|q| q.name.ends_with(".dead")).collect();
    let broker = config.amqp_url.as_deref().map(runtime::Broker::new);
    for q in &dead {
        let n = q.messages.unwrap_or(0);
        if n > 0 {
            let queue = q.name.trim_end_matches(".dead");
            let causes = match &broker {
                Some(broker) => describe(&runtime::consumer::inspect_dead_letters(broker, queue).await?),
                None => String::new(),
            };
            report.violation(
                DEAD_LETTERS,
                format!("queue {}", q.name),
                format!(
                    "{n} dead-lettered message(s){causes} (transient ones are replayed automatically; for the \
                     others: inspect, fix, then `order-system replay-dead-letters {queue}`)"
                ),
            );
        }
    }
    if let Some(broker) = broker {
        broker.close().await;
    }
    report.checked.push(format!("dead-letter queues: {} in vhost {:?}", dead.len(), config.vhost));
    Ok(())
}

/// Dead letters by cause, and the first few with their reason.
fn describe(letters: &[runtime::consumer::DeadLetter]) -> String {
    use runtime::consumer::Cause;
    let poison = letters.iter().filter(|l| l.cause == Cause::Poison).count();
    let mut text = format!(": {poison} poison, {} transient", letters.len() - poison);
    for l in letters.iter().take(10) {
        text.push_str(&format!(
            "; {} {} ({}, replayed {} times): {}",
            l.kind,
            l.message_id,
            l.cause.as_str(),
            l.replays,
            l.reason
        ));
    }
    if letters.len() > 10 {
        text.push_str(&format!("; and {} more", letters.len() - 10));
    }
    text
}

/// The vhost as one path segment of the management API (`/` is `%2F`).
pub(crate) fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The vhost an AMQP URL names (its path, percent-decoded; `/` when absent).
pub fn vhost_of(amqp_url: &str) -> String {
    let path = amqp_url.split_once("://").map(|(_, rest)| rest).unwrap_or(amqp_url);
    let path = path.split_once('/').map(|(_, p)| p).unwrap_or("");
    let path = path.split(['?', '#']).next().unwrap_or("");
    if path.is_empty() {
        return "/".into();
    }
    let bytes = path.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let Ok(b) = u8::from_str_radix(&path[i + 1..i + 3], 16)
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_vhost_comes_from_the_amqp_url() {
        assert_eq!(vhost_of("amqp://guest:guest@127.0.0.1:5672/%2f"), "/");
        assert_eq!(vhost_of("amqp://guest:guest@127.0.0.1:5672"), "/");
        assert_eq!(vhost_of("amqp://guest:guest@127.0.0.1:5672/t1234"), "t1234");
        assert_eq!(vhost_of("amqp://h:1/a%2Fb?heartbeat=10"), "a/b");
        assert_eq!(percent_encode("/"), "%2F");
    }
}
