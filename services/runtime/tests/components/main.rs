//! Runtime's components against the real PostgreSQL and RabbitMQ, without
//! the services: the outbox relay, the broker client, TLS to both servers.

mod broker;
mod outbox;
mod transport;
