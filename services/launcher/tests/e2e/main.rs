//! End-to-end tests of the order system through its gateway, on the real
//! PostgreSQL, RabbitMQ and an SMTP server (see `helpers`).

mod abuse;
mod api;
mod assertions;
mod audit;
mod contract;
mod deploy;
mod email;
mod flow;
mod helpers;
mod herd;
mod hostile;
mod live_notifications;
mod messaging;
mod metrics;
mod outage;
mod page;
mod polling;
mod push;
mod reliability;
mod slow_clients;
mod stream_limits;
mod sweeper;
mod tokens;
mod transport;
