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
}
