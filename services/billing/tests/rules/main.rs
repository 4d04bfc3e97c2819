//! Billing's rules at their own level, each test on a database of its own:
//! payments charged once and answered (`payments`), and a balance that
//! payments handled at the same time never overdraw (`balance`).

mod balance;
mod payments;

/// Billing's database, of the test's own, migrated as billing does at start
/// and dropped when the test ends (also when it fails).
async fn test_db() -> test_support::ServiceDb {
    test_support::ServiceDb::new("billing", sqlx::migrate!("../../migrations/billing")).await
}
