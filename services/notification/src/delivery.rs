//! What the mailer and the pusher share: a worker woken by NOTIFY when a
//! delivery is queued (a poll as safety net) that sends what is due, pass
//! after pass; a budget of deliveries per recipient an hour, kept in the
//! database so that every replica spends the same one; and the delay before
//! a delivery that failed for now is tried again.
//!
//! Each keeps its own tables (`email_*`, `push_*`): what they claim, how they
//! send and what a recipient is (an address, a user) are theirs.

use runtime::data::db::Wakeup;
use sqlx::PgPool;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// The window of a recipient's budget.
pub(crate) const BUDGET_WINDOW: Duration = Duration::from_secs(3600);

/// The longest wait between tries, whatever the growing delay or the
/// receiving side says.
pub(crate) const RETRY_CAP: Duration = Duration::from_secs(3600);

/// Runs `pass` (send what is due) at start, then each time `channel` is
/// notified or `poll` passes, until `shutdown`. A pass that fails is logged
/// as `what`'s and tried again on the next wake-up.
pub(crate) async fn run<F, Fut>(
    db: &PgPool,
    channel: &'static str,
    poll: Duration,
    shutdown: &CancellationToken,
    what: &'static str,
    mut pass: F,
) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let mut wakeup = Wakeup::new(db.clone(), channel, poll);
    loop {
        wakeup.listen().await;
        if let Err(e) = pass().await {
            tracing::warn!(error = %e, "{what} pass failed");
        }
        if !wakeup.wait(shutdown).await {
            return Ok(());
        }
    }
}

/// Deliveries one recipient may be sent in [`BUDGET_WINDOW`]; beyond it a
/// delivery is suppressed (its notification stays stored and listed).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Budget(Option<i32>);

impl Budget {
    /// `per_hour` deliveries a recipient; 0: no budget.
    pub(crate) fn per_hour(per_hour: u32) -> Self {
        Budget((per_hour > 0).then(|| i32::try_from(per_hour).unwrap_or(i32::MAX)))
    }

    /// Whether a delivery tried `attempts` times before may be sent. It is
    /// taken from the budget on its first attempt only (a retry was counted
    /// then), by `take`: one upsert of the recipient's row that starts a new
    /// window once the last one (of the seconds it is given) is over, and
    /// returns what the window has used, this delivery included. One
    /// statement, so replicas that send to the same recipient at once
    /// cannot both overspend.
    pub(crate) async fn allows<F, Fut>(self, attempts: i32, take: F) -> sqlx::Result<bool>
    where
        F: FnOnce(f64) -> Fut,
        Fut: Future<Output = sqlx::Result<i32>>,
    {
        let Some(budget) = self.0 else { return Ok(true) };
        if attempts > 0 {
            return Ok(true);
        }
        Ok(take(BUDGET_WINDOW.as_secs_f64()).await? <= budget)
    }
}

/// The wait before the next try of a delivery that failed `attempts` times
/// for now: what the receiving side asked for (`after`), else growing from
/// `base`; at most [`RETRY_CAP`].
pub(crate) fn retry_delay(attempts: i32, base: Duration, after: Option<Duration>) -> Duration {
    let attempts = u32::try_from(attempts).unwrap_or(0);
    after.unwrap_or_else(|| runtime::backoff::delay(attempts, base, RETRY_CAP)).min(RETRY_CAP)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_budget_is_taken_on_the_first_attempt_only_and_none_allows_everything() {
        let used = |n: i32| move |_window: f64| async move { Ok(n) };
        let budget = Budget::per_hour(2);
        assert!(budget.allows(0, used(2)).await.unwrap(), "the last one of the window");
        assert!(!budget.allows(0, used(3)).await.unwrap(), "one beyond it");
        let untouched = |_window: f64| async { panic!("a retry takes nothing from the budget") };
        assert!(budget.allows(1, untouched).await.unwrap(), "a retry was counted on its first attempt");
        let untouched = |_window: f64| async { panic!("no budget: nothing to take") };
        assert!(Budget::per_hour(0).allows(0, untouched).await.unwrap());
        let window = |window: f64| async move { Ok(if window == 3600.0 { 1 } else { 99 }) };
        assert!(budget.allows(0, window).await.unwrap(), "the window is an hour");
    }

    #[test]
    fn a_retry_waits_what_the_receiver_asked_else_a_growing_delay_and_never_beyond_the_cap() {
        let base = Duration::from_secs(2);
        assert_eq!(retry_delay(0, base, Some(Duration::from_secs(7))), Duration::from_secs(7));
        assert_eq!(retry_delay(0, base, Some(Duration::from_secs(86_400))), RETRY_CAP);
        assert_eq!(retry_delay(3, base, None), runtime::backoff::delay(3, base, RETRY_CAP));
        assert_eq!(retry_delay(-1, base, None), runtime::backoff::delay(0, base, RETRY_CAP));
        assert!(retry_delay(40, base, None) <= RETRY_CAP);
    }
}
