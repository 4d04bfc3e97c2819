//! The transactional outbox: `enqueue` writes a message in the caller's
//! transaction; the `Relay` publishes unsent rows with publisher confirms and
//! marks them sent only after the broker confirmed them. A crash anywhere
//! loses nothing; at worst a message goes out twice, which idempotent
//! consumers absorb.

use crate::Broker;
use crate::data::db::Wakeup;
use crate::messaging::broker::{PublishError, check_confirm, publish};
use contracts::Message;
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, LongString};
use sqlx::PgConnection;
use sqlx::postgres::PgPool;
use std::marker::PhantomData;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// A service that publishes: what it may write to its outbox, declared once
/// in its wiring with [`publishes!`](crate::publishes).
pub trait Publisher: Send + Sync + 'static {
    /// The publishing service; its exchange is named after it.
    const SERVICE: &'static str;
    /// The names of the messages it publishes.
    const MESSAGES: &'static [&'static str];
}

/// `Self` declared that it publishes `M`: the only way to enqueue an `M`.
pub trait Publishes<M: Message>: Publisher {}

/// A service's outbox: it takes only the messages its publisher declared (a
/// message not declared does not compile).
pub struct Outbox<P>(PhantomData<fn() -> P>);

impl<P: Publisher> Outbox<P> {
    #[allow(clippy::new_without_default)] // used in `const` items
    pub const fn new() -> Self {
        Outbox(PhantomData)
    }

    /// Writes `message` to the outbox inside the caller's transaction and
    /// returns its message id.
    pub async fn enqueue<M: Message>(&self, conn: &mut PgConnection, message: &M) -> sqlx::Result<Uuid>
    where
        P: Publishes<M>,
    {
        enqueue(conn, message).await
    }

    /// `message` as its outbox row, for a caller that inserts the row in a
    /// statement of its own (the row and the change it announces in one
    /// statement, without a transaction around them).
    pub fn row<M: Message>(&self, message: &M) -> sqlx::Result<Row>
    where
        P: Publishes<M>,
    {
        Row::of(message)
    }
}

/// An outbox row: what [`Outbox::enqueue`] inserts.
#[derive(Debug)]
pub struct Row {
    pub message_id: Uuid,
    pub exchange: &'static str,
    pub routing_key: &'static str,
    pub message_type: &'static str,
    pub correlation_id: String,
    pub payload: serde_json::Value,
    /// The trace goes on with the message: its consumer's span is our child.
    pub headers: serde_json::Value,
}

impl Row {
    fn of<M: Message>(message: &M) -> sqlx::Result<Row> {
        let headers = match crate::telemetry::traceparent(&tracing::Span::current()) {
            Some(tp) => serde_json::json!({ crate::telemetry::TRACEPARENT: tp }),
            None => serde_json::json!({}),
        };
        Ok(Row {
            message_id: Uuid::now_v7(),
            exchange: M::EXCHANGE,
            routing_key: M::NAME,
            message_type: M::NAME,
            correlation_id: message.correlation_id(),
            payload: serde_json::to_value(message).map_err(|e| sqlx::Error::Encode(Box::new(e)))?,
            headers,
        })
    }
}

/// Whether two strings are equal, in `const` context (the check of
/// [`publishes!`](crate::publishes) that a service publishes to its own exchange).
#[doc(hidden)]
pub const fn same(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

#[doc(hidden)]
pub use contracts::Message as __Message;

/// Declares what a service publishes, in its wiring:
///
/// ```ignore
/// runtime::publishes!(pub OUTBOX: Identity = "identity" => UserCreated, UserUpdated);
/// // ...
/// OUTBOX.enqueue(&mut tx, &UserCreated::new(&user, 1)).await?;
/// ```
///
/// defines the publisher type `Identity`, its [`Outbox`] `OUTBOX`, and checks
/// at compile time that each message goes to the service's own exchange. The
/// AsyncAPI test compares every service's declaration with the document.
#[macro_export]
macro_rules! publishes {
    ($vis:vis $outbox:ident : $publisher:ident = $service:literal => $($message:ty),+ $(,)?) => {
        /// The messages this service publishes (through its outbox only).
        #[derive(Clone, Copy, Debug)]
        $vis struct $publisher;
        impl $crate::messaging::outbox::Publisher for $publisher {
            const SERVICE: &'static str = $service;
            const MESSAGES: &'static [&'static str] = &[$(<$message as $crate::messaging::outbox::__Message>::NAME),+];
        }
        $(impl $crate::messaging::outbox::Publishes<$message> for $publisher {})+
        const _: () = {
            $(assert!(
                $crate::messaging::outbox::same(<$message as $crate::messaging::outbox::__Message>::EXCHANGE, $service),
                concat!(stringify!($message), " is not published to the exchange of ", $service)
            );)+
        };
        /// This service's outbox: it takes the messages declared here, no others.
        $vis const $outbox: $crate::messaging::outbox::Outbox<$publisher> = $crate::messaging::outbox::Outbox::new();
    };
}

/// Writes `message` to the outbox inside the caller's transaction and
/// returns its message id (reached through a declared [`Outbox`] only).
async fn enqueue<M: Message>(conn: &mut PgConnection, message: &M) -> sqlx::Result<Uuid> {
    let row = Row::of(message)?;
    sqlx::query!(
        "INSERT INTO outbox (message_id, exchange, routing_key, message_type, correlation_id, payload, headers)
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
        row.message_id,
        row.exchange,
        row.routing_key,
        row.message_type,
        row.correlation_id,
        row.payload,
        row.headers,
    )
    .execute(conn)
    .await?;
    Ok(row.message_id)
}

/// AMQP properties every message of the system carries.
pub fn properties(
    message_id: Uuid,
    message_type: &str,
    correlation_id: Option<&str>,
    created: chrono::DateTime<chrono::Utc>,
) -> BasicProperties {
    let mut p = BasicProperties::default()
        .with_message_id(message_id.to_string().into())
        .with_type(message_type.into())
        .with_content_type("application/json".into())
        .with_timestamp(created.timestamp().max(0) as u64);
    if let Some(c) = correlation_id {
        p = p.with_correlation_id(c.into());
    }
    p
}

/// Publishes the outbox of one database.
pub struct Relay {
    pool: PgPool,
    broker: Broker,
    poll: Duration,
    batch: i64,
    /// How long a batch waits for its publisher confirms.
    confirm_timeout: Duration,
    /// Refusals (returned or nacked) after which a row is parked.
    park_after: u32,
    /// The delay after a row's first refusal, and the longest.
    refused_base: Duration,
    refused_cap: Duration,
}

#[derive(sqlx::FromRow)]
/// An unsent message as the relay claims it.
struct OutboxMessage {
    id: i64,
    message_id: Uuid,
    exchange: String,
    routing_key: String,
    message_type: String,
    correlation_id: Option<String>,
    payload: serde_json::Value,
    headers: serde_json::Value,
    created_at: chrono::DateTime<chrono::Utc>,
    attempts: i32,
    refusals: i32,
}

/// Why one row was not confirmed.
enum Failure {
    /// The broker refused it (returned unroutable, or nacked): counts toward parking.
    Refused(String),
    /// The broker did not answer in time or the channel failed: not the row's fault.
    Broker(String),
}

/// First retry of a refused row after this, doubling up to [`REFUSED_CAP`]:
/// a parked row is tried again every 5 minutes at most, so that it goes out
/// by itself once its cause (a missing binding, a full queue) is gone.
pub const REFUSED_BASE: Duration = Duration::from_secs(1);
pub const REFUSED_CAP: Duration = Duration::from_secs(300);

impl Relay {
    pub fn new(pool: PgPool, broker: Broker, poll: Duration) -> Self {
        Relay {
            pool,
            broker,
            poll,
            batch: 200,
            confirm_timeout: Duration::from_secs(10),
            park_after: 5,
            refused_base: REFUSED_BASE,
            refused_cap: REFUSED_CAP,
        }
    }

    /// The delay after a row's first refusal, doubling with each attempt up
    /// to `cap` (parked rows too).
    pub fn refused_backoff(mut self, base: Duration, cap: Duration) -> Self {
        (self.refused_base, self.refused_cap) = (base, cap);
        self
    }

    /// How long a batch waits for its publisher confirms before the channel
    /// is given up (the rows are tried again on a new one).
    pub fn confirm_timeout(mut self, timeout: Duration) -> Self {
        self.confirm_timeout = timeout;
        self
    }

    /// After how many refusals (returned or nacked) a row is parked: reported
    /// (`outbox_parked_messages`, its reason kept) and out of the backlog
    /// that readiness watches, still tried again after the capped delay.
    pub fn park_after(mut self, refusals: u32) -> Self {
        self.park_after = refusals.max(1);
        self
    }

    /// Runs until `shutdown`: wakes on every commit that wrote to the outbox
    /// (LISTEN/NOTIFY) and on a slow poll as a safety net.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let mut wakeup = Wakeup::new(self.pool.clone(), "outbox", self.poll);
        'connection: while !shutdown.is_cancelled() {
            let Some(channel) = self.broker.wait_for_channel(true, &shutdown).await else {
                break;
            };
            loop {
                wakeup.listen().await;
                let drained = tokio::select! {
                    _ = shutdown.cancelled() => break 'connection,
                    r = self.drain(&channel) => r,
                };
                if let Err(e) = drained {
                    tracing::warn!(error = %format!("{e:#}"), "outbox relay failed; reconnecting");
                    crate::messaging::channel::close_channel(&channel, "relay reconnecting").await;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue 'connection;
                }
                if !wakeup.wait(&shutdown).await {
                    break 'connection;
                }
            }
        }
        Ok(())
    }

    /// Publishes batches until nothing is due.
    async fn drain(&self, channel: &lapin::Channel) -> anyhow::Result<()> {
        while self.publish_batch(channel).await? == self.batch as usize {}
        Ok(())
    }

    /// Publishes one batch of due rows, holding no transaction while it waits
    /// for the broker: the rows are first claimed (their `next_attempt_at`
    /// moved past the confirm timeout, in one short statement with `SKIP
    /// LOCKED`, so that replicas relaying the same outbox take different
    /// rows), then published and their confirms awaited (bounded by the
    /// confirm timeout), then marked sent or failed. A relay that dies
    /// meanwhile leaves its rows to be claimed again after the lease: at worst
    /// a message goes out twice, which idempotent consumers absorb.
    pub async fn publish_batch(&self, channel: &lapin::Channel) -> anyhow::Result<usize> {
        let lease = self.confirm_timeout * 2 + Duration::from_secs(5);
        let mut rows = sqlx::query_as!(
            OutboxMessage,
            "UPDATE outbox SET next_attempt_at = now() + make_interval(secs => $2)
             WHERE id IN (SELECT id FROM outbox
                          WHERE sent_at IS NULL AND next_attempt_at <= now()
                          ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED)
             RETURNING id, message_id, exchange, routing_key, message_type, correlation_id, payload, headers,
                       created_at, attempts, refusals",
            self.batch,
            lease.as_secs_f64(),
        )
        .fetch_all(&self.pool)
        .await?;
        if rows.is_empty() {
            return Ok(0);
        }
        rows.sort_by_key(|r| r.id);

        // Pipeline: send the whole batch, then collect the confirms, all
        // within the confirm timeout.
        let deadline = tokio::time::Instant::now() + self.confirm_timeout;
        let timed_out = || Failure::Broker(format!("no publisher confirm within {:?}", self.confirm_timeout));
        let mut pending = Vec::with_capacity(rows.len());
        for row in &rows {
            let body = serde_json::to_vec(&row.payload)?;
            let props = properties(row.message_id, &row.message_type, row.correlation_id.as_deref(), row.created_at)
                .with_headers(headers_table(&row.headers));
            let published =
                tokio::time::timeout_at(deadline, publish(channel, &row.exchange, &row.routing_key, &body, props));
            pending.push(match published.await {
                Ok(Ok(confirm)) => Ok(confirm),
                Ok(Err(e)) => Err(Failure::Broker(e.to_string())),
                Err(_) => Err(timed_out()),
            });
        }
        let mut outcomes = Vec::with_capacity(rows.len());
        for confirm in pending {
            outcomes.push(match confirm {
                Err(f) => Err(f),
                Ok(confirm) => match tokio::time::timeout_at(deadline, confirm).await {
                    Err(_) => Err(timed_out()),
                    Ok(Err(e)) => Err(Failure::Broker(e.to_string())),
                    Ok(Ok(c)) => match check_confirm(c) {
                        Ok(()) => Ok(()),
                        Err(e @ (PublishError::Returned(_) | PublishError::Nacked)) => {
                            Err(Failure::Refused(e.to_string()))
                        }
                        Err(e) => Err(Failure::Broker(e.to_string())),
                    },
                },
            });
        }

        let mut sent = Vec::new();
        let mut broker_failed = None;
        for (row, outcome) in rows.iter().zip(outcomes) {
            let labels = [("exchange", row.exchange.clone()), ("type", row.message_type.clone())];
            match outcome {
                Ok(()) => {
                    metrics::counter!("messages_published_total", &labels).increment(1);
                    tracing::debug!(message_id = %row.message_id, r#type = %row.message_type, correlation_id = ?row.correlation_id, "published");
                    sent.push(row.id);
                }
                Err(Failure::Broker(reason)) => {
                    // Not the row's fault: due again at once, on a new channel.
                    metrics::counter!("messages_publish_failed_total", &labels).increment(1);
                    sqlx::query!(
                        "UPDATE outbox SET last_error = $2, next_attempt_at = now() WHERE id = $1",
                        row.id,
                        reason
                    )
                    .execute(&self.pool)
                    .await?;
                    broker_failed.get_or_insert(reason);
                }
                Err(Failure::Refused(reason)) => {
                    metrics::counter!("messages_publish_failed_total", &labels).increment(1);
                    let refusals = u32::try_from(row.refusals).unwrap_or(0).saturating_add(1);
                    let park = refusals >= self.park_after;
                    let delay = crate::backoff::delay(
                        u32::try_from(row.attempts).unwrap_or(0),
                        self.refused_base,
                        self.refused_cap,
                    );
                    if park {
                        if refusals == self.park_after {
                            metrics::counter!("outbox_messages_parked_total", &labels).increment(1);
                        }
                        tracing::error!(message_id = %row.message_id, r#type = %row.message_type, %reason, refusals, retry_in = ?delay, "the broker keeps refusing the message; parked, tried again after the delay");
                    } else {
                        tracing::warn!(message_id = %row.message_id, r#type = %row.message_type, %reason, refusals, retry_in = ?delay, "publish refused; will retry");
                    }
                    sqlx::query!(
                        "UPDATE outbox SET attempts = attempts + 1, refusals = $3, last_error = $2,
                            next_attempt_at = now() + make_interval(secs => $4),
                            parked_at = CASE WHEN $5 THEN COALESCE(parked_at, now()) END,
                            parked_reason = CASE WHEN $5 THEN $2 END
                         WHERE id = $1",
                        row.id,
                        reason,
                        i32::try_from(refusals).unwrap_or(i32::MAX),
                        delay.as_secs_f64(),
                        park,
                    )
                    .execute(&self.pool)
                    .await?;
                }
            }
        }
        if !sent.is_empty() {
            // `sent_at IS NULL` lets the planner find the rows in the small
            // partial index of unsent rows (`outbox_unsent`) whatever its
            // statistics say, instead of scanning every row kept until pruning.
            sqlx::query!(
                "UPDATE outbox SET sent_at = now(), last_error = NULL WHERE id = ANY($1) AND sent_at IS NULL",
                &sent
            )
            .execute(&self.pool)
            .await?;
        }
        if let Some(reason) = broker_failed {
            anyhow::bail!("publishing to the broker failed: {reason}");
        }
        Ok(rows.len())
    }
}

fn headers_table(headers: &serde_json::Value) -> FieldTable {
    let mut t = FieldTable::default();
    if let Some(map) = headers.as_object() {
        for (k, v) in map {
            if let Some(s) = v.as_str() {
                t.insert(k.as_str().into(), AMQPValue::LongString(LongString::from(s.as_bytes().to_vec())));
            }
        }
    }
    t
}

/// Sets `outbox_backlog_messages` and `outbox_oldest_unsent_age_seconds`
/// from the database (refreshed by `Service` on its own schedule, not by the
/// relay, so the age keeps growing while the broker is away).
pub async fn report_backlog(pool: &PgPool) -> sqlx::Result<()> {
    let (count, oldest) = backlog(pool).await?;
    let database = crate::metrics::database_label(pool);
    metrics::gauge!("outbox_backlog_messages", "database" => database.clone()).set(count as f64);
    metrics::gauge!("outbox_oldest_unsent_age_seconds", "database" => database.clone()).set(oldest.unwrap_or(0.0));
    let parked =
        sqlx::query_scalar!(r#"SELECT count(*) AS "n!" FROM outbox WHERE parked_at IS NOT NULL AND sent_at IS NULL"#)
            .fetch_one(pool)
            .await?;
    metrics::gauge!("outbox_parked_messages", "database" => database).set(parked as f64);
    Ok(())
}

/// Unsent, unparked messages and the age of the oldest, for readiness and metrics.
pub async fn backlog(pool: &PgPool) -> sqlx::Result<(i64, Option<f64>)> {
    let row = sqlx::query!(
        r#"SELECT count(*) AS "n!", extract(epoch FROM now() - min(created_at))::float8 AS oldest
         FROM outbox WHERE sent_at IS NULL AND parked_at IS NULL"#,
    )
    .fetch_one(pool)
    .await?;
    Ok((row.n, row.oldest))
}

#[cfg(test)]
mod tests {
    use super::same;

    #[test]
    fn same_compares_whole_strings_in_const_context() {
        const { assert!(same("ordering", "ordering")) };
        assert!(!same("ordering", "orderinG"));
        assert!(!same("ordering", "order"));
        assert!(!same("", "a"));
        assert!(same("", ""));
    }
}
