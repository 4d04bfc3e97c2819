//! The contracts between the services: the messages they exchange over RabbitMQ
//! (each knows its exchange and routing key, so publisher and consumer cannot
//! disagree), the broker topology, and the JSON types of the public REST API.

pub mod api;
#[cfg(feature = "asyncapi")]
pub mod asyncapi;
#[cfg(feature = "sqlx")]
mod db;
pub mod messages;
pub mod money;
pub mod topology;

pub use messages::Message;
pub use money::Money;
