//! End-to-end tests of the order system through its gateway, on the real
//! PostgreSQL, RabbitMQ and an SMTP server (see `helpers`).

mod abuse;
mod api;
mod assertions;
mod audit;
mod contract;
mod flow;
mod helpers;
mod hostile;
mod messaging;
mod metrics;
mod outage;
mod page;
mod polling;
mod push;
mod reliability;
mod stream_limits;
mod tokens;
mod transport;
