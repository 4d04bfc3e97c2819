//! The transactional outbox: `enqueue` writes a message in the caller's
//! transaction; the `Relay` publishes unsent rows with publisher confirms and
//! marks them sent only after the broker confirmed them. A crash anywhere
//! loses nothing; at worst a message goes out twice, which idempotent
//! consumers absorb.

use crate::Broker;
use crate::broker::{check_confirm, publish};
use crate::db::Wakeup;
use contracts::Message;
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, LongString};
use sqlx::postgres::PgPool;
use sqlx::{PgConnection, Row};
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Writes `message` to the outbox inside the caller's transaction and
/// returns its message id.
pub async fn enqueue<M: Message>(conn: &mut PgConnection, message: &M) -> sqlx::Result<Uuid> {
    let id = Uuid::now_v7();
    let payload = serde_json::to_value(message).map_err(|e| sqlx::Error::Encode(Box::new(e)))?;
    // The trace goes on with the message: its consumer's span is our child.
    let headers = match crate::telemetry::traceparent(&tracing::Span::current()) {
        Some(tp) => serde_json::json!({ crate::telemetry::TRACEPARENT: tp }),
        None => serde_json::json!({}),
    };
    sqlx::query(
        "INSERT INTO outbox (message_id, exchange, routing_key, message_type, correlation_id, payload, headers)
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(id)
    .bind(M::EXCHANGE)
    .bind(M::NAME)
    .bind(M::NAME)
    .bind(message.correlation_id())
    .bind(payload)
    .bind(headers)
    .execute(conn)
    .await?;
    Ok(id)
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
    /// Sent rows are kept this long (for inspection), then deleted; inbox rows too.
    retention: Duration,
}

struct Row_ {
    id: i64,
    message_id: Uuid,
    exchange: String,
    routing_key: String,
    message_type: String,
    correlation_id: Option<String>,
    payload: serde_json::Value,
    headers: serde_json::Value,
    created_at: chrono::DateTime<chrono::Utc>,
}

impl Relay {
    pub fn new(pool: PgPool, broker: Broker, poll: Duration) -> Self {
        Relay { pool, broker, poll, batch: 200, retention: Duration::from_secs(7 * 24 * 3600) }
    }

    /// Runs until `shutdown`: wakes on every commit that wrote to the outbox
    /// (LISTEN/NOTIFY) and on a slow poll as a safety net.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let mut wakeup = Wakeup::new(self.pool.clone(), "outbox", self.poll);
        let mut last_cleanup = tokio::time::Instant::now();
        'connection: while !shutdown.is_cancelled() {
            let Some(channel) = self.broker.wait_for_channel(true, &shutdown).await else {
                break;
            };
            loop {
                if let Err(e) = self.drain(&channel).await {
                    tracing::warn!(error = %e, "outbox relay failed; reconnecting");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue 'connection;
                }
                if last_cleanup.elapsed() > Duration::from_secs(600) {
                    last_cleanup = tokio::time::Instant::now();
                    if let Err(e) = self.cleanup().await {
                        tracing::warn!(error = %e, "outbox cleanup failed");
                    }
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

    /// Publishes one batch of due rows. Rows are locked (`SKIP LOCKED`) so that
    /// several replicas can relay the same outbox without sending a row twice.
    pub async fn publish_batch(&self, channel: &lapin::Channel) -> anyhow::Result<usize> {
        let mut tx = self.pool.begin().await?;
        let rows: Vec<Row_> = sqlx::query(
            "SELECT id, message_id, exchange, routing_key, message_type, correlation_id, payload, headers, created_at
             FROM outbox WHERE sent_at IS NULL AND next_attempt_at <= now()
             ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED",
        )
        .bind(self.batch)
        .try_map(|r: sqlx::postgres::PgRow| {
            Ok(Row_ {
                id: r.try_get("id")?,
                message_id: r.try_get("message_id")?,
                exchange: r.try_get("exchange")?,
                routing_key: r.try_get("routing_key")?,
                message_type: r.try_get("message_type")?,
                correlation_id: r.try_get("correlation_id")?,
                payload: r.try_get("payload")?,
                headers: r.try_get("headers")?,
                created_at: r.try_get("created_at")?,
            })
        })
        .fetch_all(&mut *tx)
        .await?;
        if rows.is_empty() {
            return Ok(0);
        }

        // Pipeline: send the whole batch, then collect the confirms.
        let mut pending = Vec::with_capacity(rows.len());
        for row in &rows {
            let body = serde_json::to_vec(&row.payload)?;
            let props = properties(row.message_id, &row.message_type, row.correlation_id.as_deref(), row.created_at)
                .with_headers(headers_table(&row.headers));
            let confirm = publish(channel, &row.exchange, &row.routing_key, &body, props).await?;
            pending.push(confirm);
        }
        let mut sent = Vec::new();
        for (row, confirm) in rows.iter().zip(pending) {
            match confirm.await.map_err(Into::into).and_then(check_confirm) {
                Ok(()) => {
                    metrics::counter!("messages_published_total", "exchange" => row.exchange.clone(), "type" => row.message_type.clone()).increment(1);
                    tracing::debug!(message_id = %row.message_id, r#type = %row.message_type, correlation_id = ?row.correlation_id, "published");
                    sent.push(row.id)
                }
                Err(e) => {
                    metrics::counter!("messages_publish_failed_total", "exchange" => row.exchange.clone(), "type" => row.message_type.clone()).increment(1);
                    tracing::error!(message_id = %row.message_id, r#type = %row.message_type, error = %e, "publish failed; will retry");
                    sqlx::query(
                        "UPDATE outbox SET attempts = attempts + 1, last_error = $2,
                            next_attempt_at = now() + least(interval '1 second' * power(2, attempts), interval '5 minutes')
                         WHERE id = $1",
                    )
                    .bind(row.id)
                    .bind(e.to_string())
                    .execute(&mut *tx)
                    .await?;
                }
            }
        }
        sqlx::query("UPDATE outbox SET sent_at = now() WHERE id = ANY($1)").bind(&sent).execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(rows.len())
    }

    async fn cleanup(&self) -> sqlx::Result<()> {
        let keep = self.retention.as_secs_f64();
        sqlx::query("DELETE FROM outbox WHERE sent_at < now() - make_interval(secs => $1)")
            .bind(keep)
            .execute(&self.pool)
            .await?;
        sqlx::query("DELETE FROM inbox WHERE received_at < now() - make_interval(secs => $1)")
            .bind(keep)
            .execute(&self.pool)
            .await?;
        Ok(())
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

/// Counts of the outbox, for readiness and metrics.
/// Sets `outbox_backlog_messages` and `outbox_oldest_unsent_age_seconds`
/// from the database (refreshed by `Service` on its own schedule, not by the
/// relay, so the age keeps growing while the broker is away).
pub async fn report_backlog(pool: &PgPool) -> sqlx::Result<()> {
    let (count, oldest) = backlog(pool).await?;
    let database = crate::metrics::database_label(pool);
    metrics::gauge!("outbox_backlog_messages", "database" => database.clone()).set(count as f64);
    metrics::gauge!("outbox_oldest_unsent_age_seconds", "database" => database).set(oldest.unwrap_or(0.0));
    Ok(())
}

pub async fn backlog(pool: &PgPool) -> sqlx::Result<(i64, Option<f64>)> {
    let row = sqlx::query(
        "SELECT count(*) AS n, extract(epoch FROM now() - min(created_at))::float8 AS oldest
         FROM outbox WHERE sent_at IS NULL",
    )
    .fetch_one(pool)
    .await?;
    Ok((row.try_get("n")?, row.try_get("oldest")?))
}
