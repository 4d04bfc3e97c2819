//! Per-user rate limits on the calls that cost more than their request:
//! placing an order (a payment, an e-mail), a deposit or a withdrawal (a
//! ledger entry each). GCRA limits from `governor`, kept in memory per
//! replica and keyed by the caller's user id; past one: 429 with
//! `Retry-After`, and other users are not affected.

use governor::clock::Clock;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::ApiError;

/// The per-user limits of the calls with a price, per minute, in bursts of
/// as many (0 turns one off). Billing reads the deposit and withdrawal
/// limits, ordering the order limit.
#[derive(clap::Args, Clone, Debug)]
pub struct PerUserLimits {
    /// Orders one user may place a minute.
    #[arg(long, env = "ORDERS_PER_USER_PER_MINUTE", default_value_t = 60)]
    pub orders_per_user_per_minute: u32,

    /// Deposits one user may make a minute.
    #[arg(long, env = "DEPOSITS_PER_USER_PER_MINUTE", default_value_t = 30)]
    pub deposits_per_user_per_minute: u32,

    /// Withdrawals one user may make a minute.
    #[arg(long, env = "WITHDRAWALS_PER_USER_PER_MINUTE", default_value_t = 30)]
    pub withdrawals_per_user_per_minute: u32,
}

impl Default for PerUserLimits {
    fn default() -> Self {
        PerUserLimits {
            orders_per_user_per_minute: 60,
            deposits_per_user_per_minute: 30,
            withdrawals_per_user_per_minute: 30,
        }
    }
}

/// One call's limit per user (see the module's comment).
pub struct PerUserRate {
    /// What is limited, plural, for the 429's message and the metric.
    what: &'static str,
    limiter: Option<DefaultKeyedRateLimiter<Uuid>>,
}

impl PerUserRate {
    /// `per_minute` calls a minute per user, in bursts of as many; 0: no limit.
    pub fn per_minute(what: &'static str, per_minute: u32) -> Arc<Self> {
        let limiter = NonZeroU32::new(per_minute).map(|n| RateLimiter::keyed(Quota::per_minute(n)));
        Arc::new(PerUserRate { what, limiter })
    }

    /// Takes one call from `user`'s allowance, or answers 429 with when the
    /// next one is allowed.
    pub fn check(&self, user: Uuid) -> Result<(), ApiError> {
        let Some(limiter) = &self.limiter else { return Ok(()) };
        limiter.check_key(&user).map_err(|not_until| {
            let wait = not_until.wait_time_from(limiter.clock().now());
            metrics::counter!("rate_limited_total", "what" => self.what).increment(1);
            tracing::info!(user_id = %user, what = self.what, "rate limited");
            ApiError::too_many_requests(format!("too many {} for this user, try again later", self.what), wait)
        })
    }

    /// Forgets, once a minute, the users whose allowance is full again, so
    /// memory follows the users active in the last minute.
    pub async fn prune(self: Arc<Self>, shutdown: CancellationToken) -> anyhow::Result<()> {
        let Some(limiter) = &self.limiter else { return Ok(()) };
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = tokio::time::sleep(Duration::from_secs(60)) => {}
            }
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::StatusCode;

    #[test]
    fn past_the_burst_a_user_gets_429_with_retry_after_and_others_do_not() {
        let rate = PerUserRate::per_minute("orders", 2);
        let (alice, bob) = (Uuid::new_v4(), Uuid::new_v4());
        rate.check(alice).unwrap();
        rate.check(alice).unwrap();
        let e = rate.check(alice).unwrap_err();
        assert_eq!(e.status, StatusCode::TOO_MANY_REQUESTS);
        assert!(e.message.contains("too many orders"), "{}", e.message);
        // One call back every 30 s at two a minute.
        let after = e.retry_after.expect("Retry-After");
        assert!(after > Duration::ZERO && after <= Duration::from_secs(30), "{after:?}");
        rate.check(bob).expect("another user has their own allowance");
    }

    #[test]
    fn zero_turns_the_limit_off() {
        let rate = PerUserRate::per_minute("deposits", 0);
        let user = Uuid::new_v4();
        for _ in 0..1000 {
            rate.check(user).unwrap();
        }
    }
}
