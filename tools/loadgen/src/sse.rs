//! The event-stream parser, shared with the tests (`test-support`).

pub use test_support::sse::{Event, Parser};
