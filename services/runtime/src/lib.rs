//! What every service of the order system needs, written once, grouped by
//! concern:
//!
//! - [`http`]: the rules of every HTTP API: the error body and extractors,
//!   limits and connection bounds, conditional requests and long polls,
//!   idempotency keys, per-user rates, health, the OpenAPI documents;
//! - [`messaging`]: the RabbitMQ connection and topology, the transactional
//!   outbox and its relay, the idempotent consumer loop, the push stream;
//! - [`auth`]: the gateway's signed assertions, access-token verification,
//!   TLS;
//! - [`data`]: the service's database and migrations, pruning, waiting for a
//!   row to change;
//!
//! and, beside them, what a process has once: [`service`] (the skeleton every
//! service shares), [`shutdown`], [`telemetry`], [`metrics`], [`backoff`],
//! and [`contact`] (e-mail addresses and phone numbers parsed at the edge).

pub mod auth;
pub mod backoff;
pub mod contact;
pub mod data;
pub mod http;
pub mod messaging;
pub mod metrics;
pub mod service;
pub mod shutdown;
pub mod telemetry;

pub use http::limits::HttpLimits;
pub use http::{ApiError, Json, Page, Path, Query};
pub use messaging::broker::Broker;
pub use messaging::config::MessagingConfig;
pub use messaging::consumer::{Consumer, HandlerError, Incoming};
pub use service::{Service, ServiceConfig};
pub use shutdown::Tasks;
