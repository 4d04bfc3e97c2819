//! What every service of the order system needs, written once: configuration,
//! telemetry, the database pool and migrations, the HTTP error type and
//! extractors, health endpoints, the RabbitMQ connection and topology, the
//! transactional outbox and its relay, the idempotent consumer loop,
//! conditional requests and long polls, idempotency keys, pruning, and
//! graceful shutdown.

pub mod auth;
pub mod backoff;
pub mod broker;
pub mod conditional;
pub mod config;
pub mod connections;
pub mod consumer;
pub mod contact;
pub mod db;
pub mod http;
pub mod idempotency;
pub mod limits;
pub mod metrics;
pub mod openapi;
pub mod outbox;
pub mod prune;
pub mod push_stream;
pub mod service;
pub mod shutdown;
pub mod telemetry;
pub mod tls;
pub mod tokens;
pub mod watch;

pub use broker::Broker;
pub use config::MessagingConfig;
pub use consumer::{Consumer, HandlerError, Incoming};
pub use http::{ApiError, Json, Page, Path, Query};
pub use limits::HttpLimits;
pub use service::Service;
pub use shutdown::Tasks;
