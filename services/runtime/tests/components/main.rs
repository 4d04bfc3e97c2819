//! Runtime's components against the real PostgreSQL and RabbitMQ, without
//! the services: the outbox and its relay, the consumer's retries and dead letters, the
//! broker client, TLS to both servers.

mod broker;
mod messaging;
mod outbox;
mod transport;
