//! What the tests import: the system of one test ([`crate::app`]), its
//! clients ([`crate::client`]) and the workspace's shared test pieces
//! (`test_support`: sandbox, fault proxy, SMTP sink, SSE parser, eventually).

pub use crate::app::{SERVICES_WITH_DB, TestApp, sandboxed, sweeper_off};
pub use crate::client::{ASSERTION, User, as_current, assert_error};
pub use test_support::sse::{Event as SseEvent, events as sse_events};
pub use test_support::{
    Link, Sandbox, TcpProxy, broker_connections, close_broker_connections, eventually, eventually_counts, postgres_url,
    rabbitmq_api,
};
