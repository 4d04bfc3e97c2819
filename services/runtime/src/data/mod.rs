//! Data: the service's own database (created, migrated, pooled), rows
//! pruned on a schedule, and waiting for a row to change.

pub mod db;
pub mod prune;
pub mod watch;
