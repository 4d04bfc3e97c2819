//! The one-process launcher of the order system, and the public API document
//! assembled from every service's own.

pub mod audit;
pub mod openapi;
