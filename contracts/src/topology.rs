//! The RabbitMQ topology: one durable topic exchange per publishing context,
//! one durable quorum queue per consuming service and source. Every service
//! declares all of it at start (declarations are idempotent), so a message
//! published before its consumer ever ran is kept, never returned as unroutable.

use crate::messages::{self, Message, exchange};

/// A consumer's queue and the messages bound to it.
#[derive(Clone, Copy, Debug)]
pub struct QueueSpec {
    pub name: &'static str,
    pub exchange: &'static str,
    pub routing_keys: &'static [&'static str],
}

pub const EXCHANGES: &[&str] = &[exchange::IDENTITY, exchange::BILLING, exchange::ORDERING, exchange::NOTIFICATION];

pub const BILLING_USERS: QueueSpec =
    QueueSpec { name: "billing.identity", exchange: exchange::IDENTITY, routing_keys: &[messages::UserCreated::NAME] };

pub const BILLING_PAYMENTS: QueueSpec = QueueSpec {
    name: "billing.payments",
    exchange: exchange::ORDERING,
    routing_keys: &[messages::CreatePayment::NAME, messages::VoidPayment::NAME],
};

pub const ORDERING_PAYMENTS: QueueSpec = QueueSpec {
    name: "ordering.billing",
    exchange: exchange::BILLING,
    routing_keys: &[messages::PaymentCreated::NAME, messages::PaymentFailed::NAME],
};

pub const NOTIFICATION_USERS: QueueSpec = QueueSpec {
    name: "notification.identity",
    exchange: exchange::IDENTITY,
    routing_keys: &[messages::UserCreated::NAME, messages::UserUpdated::NAME],
};

pub const NOTIFICATION_ORDERS: QueueSpec = QueueSpec {
    name: "notification.ordering",
    exchange: exchange::ORDERING,
    routing_keys: &[messages::OrderCreated::NAME, messages::OrderFailed::NAME],
};

/// The durable quorum queues of the system. The push service's stream is
/// not among them: `runtime::messaging::push_stream` declares it ([`PUSH_STREAM`]).
pub const QUEUES: &[QueueSpec] =
    &[BILLING_USERS, BILLING_PAYMENTS, ORDERING_PAYMENTS, NOTIFICATION_USERS, NOTIFICATION_ORDERS];

/// The RabbitMQ stream of order events that every push-service replica reads
/// from its own offset (the offsets are the SSE event ids).
pub const PUSH_STREAM: &str = "push.order-events";

/// How long the push stream keeps events unless the push service is
/// configured otherwise (RabbitMQ `x-max-age`).
pub const PUSH_STREAM_DEFAULT_MAX_AGE: &str = "24h";

/// What the push stream is bound to on the `ordering` exchange.
pub const PUSH_ORDER_EVENTS: &[&str] = &[messages::OrderCreated::NAME, messages::OrderFailed::NAME];

/// What the push stream is bound to on the `notification` exchange: a
/// user's notifications reach their pages the way their orders' outcomes do.
pub const PUSH_NOTIFICATION_EVENTS: &[&str] = &[messages::NotificationCreated::NAME];

/// Every binding of the push stream: (exchange, routing key).
pub const PUSH_BINDINGS: &[(&str, &[&str])] =
    &[(exchange::ORDERING, PUSH_ORDER_EVENTS), (exchange::NOTIFICATION, PUSH_NOTIFICATION_EVENTS)];
