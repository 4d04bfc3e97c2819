//! What the workspace's tests share, each piece once: a [`Sandbox`] of their
//! own on the real PostgreSQL and RabbitMQ that is removed also when a test
//! fails, a [`TcpProxy`] that cuts or stalls a dependency, an [`SmtpSink`]
//! that receives (or refuses) the system's mail, a parser of event streams
//! ([`sse`]), TLS for the tests' own servers ([`tls`]), and [`eventually`]
//! to wait on a condition instead of a clock.

pub mod db;
pub mod eventually;
pub mod proxy;
pub mod sandbox;
pub mod servers;
pub mod smtp;
pub mod sse;
pub mod tls;

pub use db::{count, idle_in_transaction, outbox_messages};
pub use eventually::{eventually, eventually_counts};
pub use proxy::{Link, SilentListener, TcpProxy, authority};
pub use sandbox::{Sandbox, ServiceDb, broker_connections, close_broker_connections, queue_depth};
pub use servers::{amqp_base, postgres_url, rabbitmq_api};
pub use smtp::{Mail, Rcpt, SmtpSink};
