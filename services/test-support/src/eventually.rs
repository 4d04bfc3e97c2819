//! Waiting on a condition with a deadline, the tests' only way to wait.

use std::time::Duration;

/// Retries `check` until it yields a value, or fails the test after `limit`.
pub async fn eventually<T, F, Fut>(limit: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(tokio::time::Instant::now() < deadline, "condition not met within {limit:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until `count_sql` (a `SELECT count(*)` with one parameter, `arg`)
/// counts `expected` rows in `db`, or fails the test after `limit`.
pub async fn eventually_counts<A>(limit: Duration, db: &sqlx::PgPool, count_sql: &'static str, arg: A, expected: i64)
where
    A: for<'q> sqlx::Encode<'q, sqlx::Postgres> + sqlx::Type<sqlx::Postgres> + Clone + Send + 'static,
{
    eventually(limit, || async { (crate::count(db, count_sql, arg.clone()).await == expected).then_some(()) }).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn it_returns_the_first_value_the_check_yields() {
        let mut calls = 0;
        let v = eventually(Duration::from_secs(5), || {
            calls += 1;
            let n = calls;
            async move { (n == 3).then_some(n * 10) }
        })
        .await;
        assert_eq!(v, 30);
    }

    #[tokio::test]
    #[should_panic(expected = "condition not met within")]
    async fn a_condition_never_met_fails_the_test_at_the_deadline() {
        eventually(Duration::from_millis(120), || async { None::<()> }).await;
    }
}
