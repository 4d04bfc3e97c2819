//! The RabbitMQ connection of a service: one connection shared by its tasks,
//! re-opened on demand after a failure, and the topology declared on every
//! new connection (declarations are idempotent).

use crate::push_stream::PushStream;
use contracts::topology::{self, QueueSpec};
use lapin::Confirmation;
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::tcp::OwnedTLSConfig;
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use std::sync::{Arc, RwLock};
use std::time::Duration;

#[derive(Clone)]
pub struct Broker {
    inner: Arc<Inner>,
}

struct Inner {
    /// The `service` label of the broker metrics.
    service: &'static str,
    url: String,
    /// PEM CA certificates trusted for an `amqps://` broker besides the
    /// public web roots.
    ca_pem: Option<String>,
    /// Longest wait for the broker to answer a connection or channel opening.
    timeout: Duration,
    current: RwLock<Option<Arc<Connection>>>,
    connecting: tokio::sync::Mutex<()>,
    /// The push service's stream, declared on every new connection.
    push_stream: PushStream,
}

impl Broker {
    pub fn new(url: impl Into<String>) -> Self {
        Self::for_service("", url)
    }

    /// The broker of `messaging` (its URL, CA and push stream), with metrics
    /// labelled `service`.
    /// An `amqps://` URL is checked against `AMQP_CA_FILE` where it is set.
    pub fn from_config(service: &'static str, messaging: &crate::MessagingConfig) -> anyhow::Result<Self> {
        let broker = Self::build(service, &messaging.amqp_url, DEFAULT_TIMEOUT, messaging.push_stream.clone());
        Ok(broker.with_ca(messaging.amqp_ca()?))
    }

    /// A broker connection whose metrics carry `service`.
    pub fn for_service(service: &'static str, url: impl Into<String>) -> Self {
        Self::with_timeout(service, url, DEFAULT_TIMEOUT)
    }

    /// [`Broker::for_service`] that gives up on a broker that does not answer
    /// a connection or channel opening within `timeout` (and tries again).
    pub fn with_timeout(service: &'static str, url: impl Into<String>, timeout: Duration) -> Self {
        Self::build(service, url, timeout, PushStream::default())
    }

    fn build(service: &'static str, url: impl Into<String>, timeout: Duration, push_stream: PushStream) -> Self {
        Broker {
            inner: Arc::new(Inner {
                service,
                timeout,
                url: url.into(),
                ca_pem: None,
                current: RwLock::new(None),
                connecting: tokio::sync::Mutex::new(()),
                push_stream,
            }),
        }
    }

    /// Trusts the CA certificates of `pem` (PEM) for an `amqps://` broker,
    /// besides the public web roots. Call before the first connection.
    pub fn with_ca(mut self, pem: Option<String>) -> Self {
        Arc::get_mut(&mut self.inner).expect("with_ca on a broker not yet shared").ca_pem = pem;
        self
    }

    /// Whether the connection is up; also kept in the `broker_connected` gauge.
    pub fn is_connected(&self) -> bool {
        let connected = {
            let current = self.inner.current.read().expect("broker lock");
            current.as_ref().is_some_and(|c| c.status().connected())
        };
        self.report(connected);
        connected
    }

    fn report(&self, connected: bool) {
        metrics::gauge!("broker_connected", "service" => self.inner.service).set(if connected { 1.0 } else { 0.0 });
    }

    fn live_connection(&self) -> Option<Arc<Connection>> {
        let current = self.inner.current.read().expect("broker lock");
        current.as_ref().filter(|c| c.status().connected()).cloned()
    }

    async fn connection(&self) -> lapin::Result<Arc<Connection>> {
        if let Some(c) = self.live_connection() {
            return Ok(c);
        }
        let _guard = self.inner.connecting.lock().await;
        if let Some(c) = self.live_connection() {
            return Ok(c);
        }
        // A broker that accepts TCP but never answers must not hang us.
        let conn = self
            .bounded("connecting", async {
                // `amqps://` is TLS (rustls); `amqp://` ignores the TLS settings.
                let tls = OwnedTLSConfig { identity: None, cert_chain: self.inner.ca_pem.clone() };
                let runtime = lapin::runtime::default_runtime()?;
                // Named after the service, in the broker's connection list too.
                let properties = ConnectionProperties::default().with_connection_name(self.inner.service.into());
                let conn = Connection::connect_with_config(&self.inner.url, properties, tls, runtime);
                let conn = Arc::new(conn.await?);
                declare_topology(&conn, self.inner.service).await?;
                crate::push_stream::declare(&conn, &self.inner.push_stream).await?;
                Ok(conn)
            })
            .await?;
        tracing::info!("connected to the broker");
        self.report(true);
        *self.inner.current.write().expect("broker lock") = Some(conn.clone());
        Ok(conn)
    }

    /// The push stream this broker declares on connecting.
    pub fn push_stream(&self) -> &PushStream {
        &self.inner.push_stream
    }

    /// Declares the push stream again (as every new connection does), e.g.
    /// before reading it.
    pub async fn declare_push_stream(&self) -> lapin::Result<()> {
        let conn = self.connection().await?;
        self.bounded("declaring the push stream", crate::push_stream::declare(&conn, &self.inner.push_stream)).await
    }

    /// `work`, or a timeout error if the broker does not answer within the timeout.
    async fn bounded<T>(&self, what: &str, work: impl Future<Output = lapin::Result<T>>) -> lapin::Result<T> {
        match tokio::time::timeout(self.inner.timeout, work).await {
            Ok(result) => result,
            Err(_) => {
                let message = format!("{what}: the broker did not answer within {:?}", self.inner.timeout);
                Err(std::io::Error::new(std::io::ErrorKind::TimedOut, message).into())
            }
        }
    }

    /// A new channel on the shared connection, connecting first if needed. A
    /// connection that does not answer is dropped, so the next call reconnects.
    pub async fn channel(&self) -> lapin::Result<Channel> {
        let conn = self.connection().await?;
        let opened = self.bounded("opening a channel", conn.create_channel()).await;
        if opened.is_err() {
            let mut current = self.inner.current.write().expect("broker lock");
            if current.as_ref().is_some_and(|c| Arc::ptr_eq(c, &conn)) {
                *current = None;
                // Closed, not leaked: the broker has few file handles.
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(CLOSE_TIMEOUT, conn.close(200, "not answering".into())).await;
                });
            }
        }
        opened
    }

    /// A new channel in publisher-confirm mode.
    pub async fn confirm_channel(&self) -> lapin::Result<Channel> {
        let channel = self.channel().await?;
        self.bounded("selecting confirms", channel.confirm_select(ConfirmSelectOptions::default())).await?;
        Ok(channel)
    }

    /// Waits until the broker answers, with a growing pause between tries.
    pub async fn wait_for_channel(
        &self,
        confirm: bool,
        shutdown: &tokio_util::sync::CancellationToken,
    ) -> Option<Channel> {
        let mut pause = Duration::from_millis(100);
        loop {
            let attempt = async { if confirm { self.confirm_channel().await } else { self.channel().await } };
            let attempt = tokio::select! {
                _ = shutdown.cancelled() => return None,
                attempt = attempt => attempt,
            };
            match attempt {
                Ok(c) => return Some(c),
                Err(e) => {
                    self.report(false);
                    tracing::warn!(error = %e, retry_in = ?pause, "broker unavailable")
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return None,
                _ = tokio::time::sleep(pause) => {}
            }
            pause = (pause * 2).min(Duration::from_secs(5));
        }
    }

    pub async fn close(&self) {
        let conn = self.inner.current.write().expect("broker lock").take();
        if let Some(conn) = conn {
            // Bounded: a broker that stopped answering never answers the close.
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, conn.close(200, "shutting down".into())).await;
        }
    }
}

/// How long a connection or channel opening may wait for the broker.
/// Generous: declaring the topology on a loaded broker takes seconds.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

fn args(pairs: &[(&str, AMQPValue)]) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in pairs {
        t.insert((*k).into(), v.clone());
    }
    t
}

/// An AMQP long-string argument value.
pub(crate) fn text(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()))
}

/// How long closing a channel or connection may take.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// Closes `channel`, giving up after a bound: a broker that went away never
/// answers the close, and a connection whose socket ended before its close
/// frame was read leaves the close pending for good (seen after a broker
/// shutdown under load: the push service's stream reader waited there and
/// never reconnected). The only way a channel is closed here.
pub async fn close_channel(channel: &Channel, reason: &str) {
    match tokio::time::timeout(CLOSE_TIMEOUT, channel.close(200, reason.into())).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::debug!(reason, error = %e, "channel already closed"),
        Err(_) => {
            tracing::warn!(reason, timeout = ?CLOSE_TIMEOUT, "the broker did not answer a channel close; abandoned")
        }
    }
}

pub fn dead_letter_queue(queue: &str) -> String {
    format!("{queue}.dead")
}

pub fn retry_queue(queue: &str, delay: Duration) -> String {
    format!("{queue}.delay.{}ms", delay.as_millis())
}

/// Deliveries of a message after which its queue gives up on it and
/// dead-letters it (`x-delivery-limit`). Consumers return deliveries only
/// when their channel or connection fails (a database outage holds them,
/// see `consumer`), so this is reached by a message that keeps failing a
/// consumer in a way no handler sees (a crash while handling it), not by an
/// outage. The same as RabbitMQ 4's default, stated so that RabbitMQ 3 and 4
/// behave alike.
pub const DELIVERY_LIMIT: i64 = 20;

/// The arguments of the queue a service consumes from: a quorum queue that
/// dead-letters to `<queue>.dead` at least once (the source keeps the message
/// until the dead-letter queue confirmed it; this needs `x-overflow:
/// reject-publish`), after [`DELIVERY_LIMIT`] deliveries.
pub fn consumer_queue_arguments(queue: &str) -> Vec<(&'static str, AMQPValue)> {
    vec![
        ("x-dead-letter-exchange", text("")),
        ("x-dead-letter-routing-key", text(&dead_letter_queue(queue))),
        ("x-dead-letter-strategy", text("at-least-once")),
        ("x-overflow", text("reject-publish")),
        ("x-delivery-limit", AMQPValue::LongLongInt(DELIVERY_LIMIT)),
    ]
}

/// Whether the broker refused a declaration because the queue exists with
/// other arguments.
fn is_precondition_failed(e: &lapin::Error) -> bool {
    use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
    matches!(e.kind(), lapin::ErrorKind::ProtocolError(p)
        if matches!(p.kind(), AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED)))
}

/// Whether `service` consumes from `queue` (named `<consumer>.<source>`);
/// a broker of no service (ops commands, tests) declares every queue.
fn consumes(service: &str, queue: &str) -> bool {
    service.is_empty() || queue.split_once('.').is_some_and(|(consumer, _)| consumer == service)
}

/// Exchanges; the consumer queues of `service`, each with its dead-letter
/// queue; and the binding of every queue that takes messages from an
/// exchange `service` publishes to.
///
/// Creating a queue with a dead-letter target needs `read` on it (RabbitMQ
/// checks that when it creates such a queue), a right that per-service
/// users give only its consumer. A publisher creates a missing queue of its
/// exchange where it may; where it is refused, this connection fails and is
/// tried again with backoff until the consumer has created it. It binds them
/// itself, so that nothing it publishes can be routed past a queue that is
/// not there yet: with a topic exchange, a message that reaches one queue is
/// not returned.
async fn declare_topology(conn: &Connection, service: &str) -> lapin::Result<()> {
    let channel = conn.create_channel().await?;
    for exchange in topology::EXCHANGES {
        channel
            .exchange_declare(
                (*exchange).into(),
                ExchangeKind::Topic,
                ExchangeDeclareOptions { durable: true, ..Default::default() },
                FieldTable::default(),
            )
            .await?;
    }
    for queue in topology::QUEUES {
        if consumes(service, queue.name) {
            // The dead-letter queue first: a queue never dead-letters to nowhere.
            declare_quorum(&channel, &dead_letter_queue(queue.name), &[]).await?;
            declare_consumer_queue(conn, &channel, queue.name).await?;
        } else if queue.exchange == service {
            if !queue_exists(conn, queue.name).await? {
                // Created here where this service may (one user for all);
                // refused (per-service users: only the consumer may create
                // it), this connection fails and is tried again until the
                // consumer has created it.
                declare_quorum(&channel, &dead_letter_queue(queue.name), &[]).await?;
                declare_consumer_queue(conn, &channel, queue.name).await?;
            }
        } else {
            continue;
        }
        for key in queue.routing_keys {
            channel
                .queue_bind(
                    queue.name.into(),
                    queue.exchange.into(),
                    (*key).into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await?;
        }
    }
    close_channel(&channel, "topology declared").await;
    Ok(())
}

/// Whether `queue` exists (a passive declare, on a channel of its own, which
/// the broker closes when the queue is not there).
async fn queue_exists(conn: &Connection, queue: &str) -> lapin::Result<bool> {
    let own = conn.create_channel().await?;
    let declared = own
        .queue_declare(queue.into(), QueueDeclareOptions { passive: true, ..Default::default() }, FieldTable::default())
        .await;
    if declared.is_err() {
        tracing::info!(
            queue,
            "a queue this service publishes to does not exist yet; creating it, or waiting for its consumer to"
        );
        return Ok(false);
    }
    close_channel(&own, "queue found").await;
    Ok(true)
}

/// Declares `queue` with [`consumer_queue_arguments`] (on a channel of its
/// own, which a refusal closes). A queue declared by an older version without them exists
/// with other arguments, which the broker refuses to change (it closes the
/// channel with PRECONDITION_FAILED); such a queue is used as it is, and
/// reported (`queue_dead_letter_target{queue}` 0, an error in the log) until
/// the policy in docs/operations.md (Upgrades) gives it the same target and limit.
async fn declare_consumer_queue(conn: &Connection, channel: &Channel, queue: &str) -> lapin::Result<()> {
    let own = conn.create_channel().await?;
    let protected = match declare_quorum(&own, queue, &consumer_queue_arguments(queue)).await {
        Ok(()) => true,
        Err(e) if is_precondition_failed(&e) => {
            tracing::error!(queue, error = %e, "the queue was declared without a dead-letter target and delivery \
                limit and cannot be changed in place; apply the dead-letter policy (docs/operations.md, Upgrades)");
            channel
                .queue_declare(
                    queue.into(),
                    QueueDeclareOptions { passive: true, ..Default::default() },
                    FieldTable::default(),
                )
                .await?;
            false
        }
        Err(e) => return Err(e),
    };
    close_channel(&own, "queue declared").await;
    metrics::gauge!("queue_dead_letter_target", "queue" => queue.to_string()).set(if protected { 1.0 } else { 0.0 });
    Ok(())
}

async fn declare_quorum(channel: &Channel, name: &str, extra: &[(&str, AMQPValue)]) -> lapin::Result<()> {
    let mut pairs = vec![("x-queue-type", text("quorum"))];
    pairs.extend_from_slice(extra);
    channel
        .queue_declare(name.into(), QueueDeclareOptions { durable: true, ..Default::default() }, args(&pairs))
        .await?;
    Ok(())
}

/// The delay queues of `queue`: a message waits there for its TTL, then is
/// dead-lettered back to `queue` through the default exchange, at least once
/// (quorum queues: `x-dead-letter-strategy: at-least-once`, which needs
/// `x-overflow: reject-publish`; the default, at most once, drops a message
/// whose delay expires while the move fails).
///
/// They are named `<queue>.delay.<ms>ms`. Deployments from before
/// at-least-once have `<queue>.retry.<ms>ms` queues with other arguments,
/// which the broker refuses to redeclare (PRECONDITION_FAILED) and which a
/// quorum queue cannot replace safely (no `if-empty` delete): the new name
/// leaves them alone. They still move what they hold back to `queue` when its
/// delay expires, so they drain by themselves and can then be deleted.
pub async fn declare_retry_queues(channel: &Channel, queue: &QueueSpec, delays: &[Duration]) -> lapin::Result<()> {
    for delay in delays {
        let ttl = i64::try_from(delay.as_millis()).unwrap_or(i64::MAX);
        declare_quorum(
            channel,
            &retry_queue(queue.name, *delay),
            &[
                ("x-message-ttl", AMQPValue::LongLongInt(ttl)),
                ("x-dead-letter-exchange", text("")),
                ("x-dead-letter-routing-key", text(queue.name)),
                ("x-dead-letter-strategy", text("at-least-once")),
                ("x-overflow", text("reject-publish")),
            ],
        )
        .await?;
    }
    Ok(())
}

/// Why a publish was not taken by the broker.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("broker error: {0}")]
    Broker(#[from] lapin::Error),
    #[error("returned unroutable by the broker: {0}")]
    Returned(String),
    #[error("refused by the broker (nack)")]
    Nacked,
    #[error("channel is not in confirm mode")]
    NotConfirmed,
}

/// Publishes a persistent, mandatory message and returns the confirm to await
/// (so that a caller can pipeline many publishes before awaiting).
pub async fn publish(
    channel: &Channel,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
    properties: BasicProperties,
) -> Result<lapin::PublisherConfirm, PublishError> {
    Ok(channel
        .basic_publish(
            exchange.into(),
            routing_key.into(),
            BasicPublishOptions { mandatory: true, ..Default::default() },
            body,
            properties.with_delivery_mode(2),
        )
        .await?)
}

/// A confirm counts only if the broker acked it and did not return it
/// (lapin reports an unroutable mandatory message as an ack carrying it).
pub fn check_confirm(confirmation: Confirmation) -> Result<(), PublishError> {
    match confirmation {
        Confirmation::Ack(None) => Ok(()),
        Confirmation::Ack(Some(returned)) => Err(PublishError::Returned(returned.reply_text.to_string())),
        Confirmation::Nack(_) => Err(PublishError::Nacked),
        Confirmation::NotRequested => Err(PublishError::NotConfirmed),
    }
}

/// Publishes and waits for the broker's confirm.
pub async fn publish_confirmed(
    channel: &Channel,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
    properties: BasicProperties,
) -> Result<(), PublishError> {
    let confirm = publish(channel, exchange, routing_key, body, properties).await?;
    check_confirm(confirm.await?)
}

#[cfg(test)]
mod tests {
    use super::consumes;

    #[test]
    fn a_service_creates_only_the_queues_it_consumes_from() {
        assert!(consumes("billing", "billing.payments"));
        assert!(!consumes("identity", "billing.identity"));
        assert!(!consumes("bill", "billing.identity"));
        // Ops commands and tests (no service) declare every queue.
        assert!(consumes("", "notification.ordering"));
    }
}
