//! The one-process launcher of the order system: its composition root
//! (`system`), the throwaway profile for scripts and benchmarks, the
//! operations commands and the cross-service audit, and the public API
//! document assembled from every service's own.

pub mod audit;
pub mod openapi;
pub mod ops;
pub mod system;
pub mod throwaway;
