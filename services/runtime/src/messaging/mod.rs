//! Messaging: the RabbitMQ connection and topology, the transactional outbox
//! and its relay, the idempotent consumer loop, and the push stream.

pub mod broker;
pub mod channel;
pub mod config;
pub mod consumer;
pub mod outbox;
pub mod push_stream;
