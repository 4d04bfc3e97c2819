//! Retry delays computed in Rust: `base * 2^attempts`, capped. (PostgreSQL's
//! `interval * power(2, n)` overflows from n = 43 and fails the statement;
//! this never overflows and never exceeds `cap`.)

use std::time::Duration;

/// The delay before the next try after `attempts` failed ones.
pub fn delay(attempts: u32, base: Duration, cap: Duration) -> Duration {
    // 2^31 times any base already passes every sensible cap; beyond it, the cap.
    let factor = 1u32.checked_shl(attempts.min(31)).unwrap_or(u32::MAX);
    base.checked_mul(factor).unwrap_or(cap).min(cap)
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);
    const CAP: Duration = Duration::from_secs(300);

    #[test]
    fn doubles_from_the_base() {
        assert_eq!(delay(0, S, CAP), S);
        assert_eq!(delay(1, S, CAP), 2 * S);
        assert_eq!(delay(5, S, CAP), 32 * S);
    }

    #[test]
    fn stops_at_the_cap_and_never_overflows() {
        assert_eq!(delay(9, S, CAP), CAP);
        for attempts in [31, 32, 43, 44, 64, 1000, u32::MAX] {
            assert_eq!(delay(attempts, S, CAP), CAP, "{attempts}");
            assert_eq!(delay(attempts, Duration::MAX, Duration::MAX), Duration::MAX, "{attempts}");
        }
        assert_eq!(delay(3, Duration::from_secs(2), Duration::from_secs(3600)), Duration::from_secs(16));
    }

    proptest::proptest! {
        // Any attempt count, base and cap: no panic, never above the cap, and
        // one more failure never waits less.
        #[test]
        fn never_overflows_never_exceeds_the_cap_and_never_shrinks(
            attempts in proptest::prelude::any::<u32>(),
            base_ms in 0u64..10_000_000,
            cap_ms in 0u64..u64::MAX / 2,
        ) {
            let (base, cap) = (Duration::from_millis(base_ms), Duration::from_millis(cap_ms));
            let now = delay(attempts, base, cap);
            proptest::prop_assert!(now <= cap);
            proptest::prop_assert!(delay(attempts.saturating_add(1), base, cap) >= now);
        }
    }
}
