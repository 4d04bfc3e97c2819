//! Pruning on a schedule: rows that outlived their use (expired idempotency
//! keys; anything else with an age, such as the inbox, the sent outbox or
//! revoked tokens) deleted in small batches, so that a large backlog never
//! holds long locks or one long transaction.

pub use futures::future::BoxFuture;
use sqlx::PgPool;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Rows deleted per statement.
pub const BATCH: i64 = 1000;

/// A [`Prune`] job around one `DELETE`, checked at compile time like every
/// other statement (`sqlx::query!`), whose `$1` is the age in seconds past
/// which a row goes and `$2` the batch size:
/// `prune!("inbox", max_age, "DELETE FROM inbox WHERE ctid = ANY(ARRAY(SELECT ctid ... LIMIT $2))")`.
#[macro_export]
macro_rules! prune {
    ($what:expr, $max_age:expr, $sql:literal $(,)?) => {{
        fn delete(
            db: &::sqlx::PgPool,
            max_age_secs: f64,
            limit: i64,
        ) -> $crate::data::prune::BoxFuture<'_, ::sqlx::Result<u64>> {
            ::std::boxed::Box::pin(async move {
                let deleted = ::sqlx::query!($sql, max_age_secs, limit).execute(db).await?;
                Ok(deleted.rows_affected())
            })
        }
        $crate::data::prune::Prune { what: $what, delete, max_age: $max_age }
    }};
}

/// Processed-message records of the idempotent consumers (every service)
/// older than `max_age`.
pub fn inbox(max_age: Duration) -> Prune {
    crate::prune!(
        "inbox",
        max_age,
        "DELETE FROM inbox WHERE ctid = ANY(ARRAY(
             SELECT ctid FROM inbox WHERE received_at < now() - make_interval(secs => $1) LIMIT $2))"
    )
}

/// Outbox rows sent longer than `max_age` ago (unsent and parked rows stay).
pub fn sent_outbox(max_age: Duration) -> Prune {
    crate::prune!(
        "outbox",
        max_age,
        "DELETE FROM outbox WHERE ctid = ANY(ARRAY(
             SELECT ctid FROM outbox WHERE sent_at < now() - make_interval(secs => $1) LIMIT $2))"
    )
}

/// One kind of row to prune.
#[derive(Clone, Debug)]
pub struct Prune {
    /// For the logs: what is deleted.
    pub what: &'static str,
    /// Deletes at most `limit` rows older than `max_age_secs`, returning how
    /// many: a function around one `sqlx::query!` `DELETE` (see [`prune!`](crate::prune)).
    pub delete: for<'a> fn(&'a PgPool, f64, i64) -> BoxFuture<'a, sqlx::Result<u64>>,
    pub max_age: Duration,
}

impl Prune {
    /// Deletes every row due, batch after batch; returns how many.
    pub async fn once(&self, db: &PgPool) -> sqlx::Result<u64> {
        let mut total = 0;
        loop {
            let deleted = (self.delete)(db, self.max_age.as_secs_f64(), BATCH).await?;
            total += deleted;
            if deleted < BATCH as u64 {
                metrics::counter!("pruned_rows_total", "table" => self.what).increment(total);
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
