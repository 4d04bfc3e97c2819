//! Pruning on a schedule: rows that outlived their use (expired idempotency
//! keys; anything else with an age, such as the inbox, the sent outbox or
//! revoked tokens) deleted in small batches, so that a large backlog never
//! holds long locks or one long transaction.

use sqlx::PgPool;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Rows deleted per statement.
pub const BATCH: i64 = 1000;

/// One kind of row to prune.
#[derive(Clone, Debug)]
pub struct Prune {
    /// For the logs: what is deleted.
    pub what: &'static str,
    /// A `DELETE` of at most `$2` rows older than `$1` seconds (a float).
    pub sql: &'static str,
    pub max_age: Duration,
}

impl Prune {
    /// Deletes every row due, batch after batch; returns how many.
    pub async fn once(&self, db: &PgPool) -> sqlx::Result<u64> {
        let mut total = 0;
        loop {
            let deleted =
                sqlx::query(self.sql).bind(self.max_age.as_secs_f64()).bind(BATCH).execute(db).await?.rows_affected();
            total += deleted;
            if deleted < BATCH as u64 {
                return Ok(total);
            }
        }
    }
}

/// Runs every job at start and then every `every`, until `shutdown`. A failed
/// round (database away) is logged and tried again at the next one.
pub async fn run(db: PgPool, jobs: Vec<Prune>, every: Duration, shutdown: CancellationToken) -> anyhow::Result<()> {
    loop {
        for job in &jobs {
            match job.once(&db).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(what = job.what, deleted = n, "pruned"),
                Err(e) => tracing::warn!(what = job.what, error = %e, "pruning failed; trying again later"),
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(every) => {}
        }
    }
}
