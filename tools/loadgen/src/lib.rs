//! The order system's load generator (`loadgen`) and the floor benchmark
//! (`floor`): the pure parts, unit-tested here: latency statistics, the
//! per-user bookkeeping that verifies every order, balance and stream event,
//! and the server-sent-events parser.

pub mod ledger;
pub mod sse;
pub mod stats;
