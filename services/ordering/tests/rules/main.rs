//! Ordering's rules at their own level, each test on a database of its own:
//! the order states (`orders`) and the sweeper of pending orders (`sweeper`).

mod orders;
mod sweeper;

/// Ordering's database, of the test's own, migrated as ordering does at
/// start and dropped when the test ends (also when it fails).
async fn test_db() -> test_support::ServiceDb {
    test_support::ServiceDb::new("ordering", sqlx::migrate!("../../migrations/ordering")).await
}
