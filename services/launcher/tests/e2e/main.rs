//! End-to-end tests of the order system through its gateway, on the real
//! PostgreSQL and RabbitMQ, with an SMTP sink (see `app`).

mod abuse;
mod api;
mod app;
mod assertions;
mod audit;
mod client;
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
mod page;
mod polling;
mod push;
mod reliability;
mod slow_clients;
mod stream_limits;
mod sweeper;
mod tokens;
mod web_push;
