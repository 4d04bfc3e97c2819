//! Reading a service's database in a test: a count, and what its outbox
//! holds (every service's outbox has the runtime's shape).

/// What `count_sql` (a `SELECT count(*)` with one parameter, `arg`) counts in `db`.
pub async fn count<A>(db: &sqlx::PgPool, count_sql: &'static str, arg: A) -> i64
where
    A: for<'q> sqlx::Encode<'q, sqlx::Postgres> + sqlx::Type<sqlx::Postgres> + Send + 'static,
{
    sqlx::query_scalar(count_sql).bind(arg).fetch_one(db).await.expect("a count")
}

/// The messages the outbox of `db` holds for `correlation_id` (an order's
/// or a payment's id), oldest first: their type and payload.
pub async fn outbox_messages(db: &sqlx::PgPool, correlation_id: uuid::Uuid) -> Vec<(String, serde_json::Value)> {
    sqlx::query_as("SELECT message_type, payload FROM outbox WHERE correlation_id = $1 ORDER BY id")
        .bind(correlation_id.to_string())
        .fetch_all(db)
        .await
        .expect("the outbox's messages")
}

/// Transactions of `db`'s database left open between statements (`idle in
/// transaction`): what a service must not hold while it waits for a broker
/// or a mail server.
pub async fn idle_in_transaction(db: &sqlx::PgPool) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND state LIKE 'idle in transaction%'",
    )
    .fetch_one(db)
    .await
    .expect("pg_stat_activity")
}
