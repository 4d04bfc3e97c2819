//! Latency histograms (HdrHistogram, microseconds, 3 significant figures)
//! and their summaries.

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

/// Longest latency recorded as itself: 10 minutes; longer ones count as that.
const HIGHEST_US: u64 = 600_000_000;

/// A latency distribution.
#[derive(Clone)]
pub struct Latencies(Histogram<u64>);

impl Default for Latencies {
    fn default() -> Self {
        Latencies(Histogram::new_with_bounds(1, HIGHEST_US, 3).expect("valid histogram bounds"))
    }
}

impl Latencies {
    /// Records one latency (below 1 µs counts as 1 µs, above 10 min as 10 min).
    pub fn record(&mut self, latency: Duration) {
        let us = u64::try_from(latency.as_micros()).unwrap_or(HIGHEST_US).clamp(1, HIGHEST_US);
        self.0.saturating_record(us);
    }

    pub fn count(&self) -> u64 {
        self.0.len()
    }

    pub fn add(&mut self, other: &Latencies) {
        self.0.add(&other.0).expect("histograms of the same bounds");
    }

    pub fn summary(&self) -> Summary {
        if self.0.is_empty() {
            return Summary::default();
        }
        let ms = |us: u64| us as f64 / 1000.0;
        Summary {
            count: self.0.len(),
            p50_ms: ms(self.0.value_at_quantile(0.50)),
            p90_ms: ms(self.0.value_at_quantile(0.90)),
            p99_ms: ms(self.0.value_at_quantile(0.99)),
            max_ms: ms(self.0.max()),
        }
    }
}

/// Percentiles of a distribution, in milliseconds; all 0 when it is empty.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub count: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.count == 0 {
            return f.write_str("none");
        }
        write!(
            f,
            "p50 {} / p90 {} / p99 {} / max {} ms ({} samples)",
            short(self.p50_ms),
            short(self.p90_ms),
            short(self.p99_ms),
            short(self.max_ms),
            self.count
        )
    }
}

/// A millisecond figure with as many decimals as its size deserves.
pub fn short(ms: f64) -> String {
    if ms < 10.0 {
        format!("{ms:.2}")
    } else if ms < 100.0 {
        format!("{ms:.1}")
    } else {
        format!("{ms:.0}")
    }
}

/// Events per second over `elapsed` (0 when no time passed).
pub fn per_second(count: u64, elapsed: Duration) -> f64 {
    let secs = elapsed.as_secs_f64();
    if secs <= 0.0 { 0.0 } else { count as f64 / secs }
}

/// Errors counted by kind ("post: HTTP 503", "stream: disconnected", ...).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct ErrorCounts(pub BTreeMap<String, u64>);

impl ErrorCounts {
    pub fn add(&mut self, kind: impl Into<String>) {
        *self.0.entry(kind.into()).or_default() += 1;
    }

    pub fn total(&self) -> u64 {
        self.0.values().sum()
    }

    pub fn merge(&mut self, other: &ErrorCounts) {
        for (k, n) in &other.0 {
            *self.0.entry(k.clone()).or_default() += n;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_distribution_summarises_to_zeros() {
        assert_eq!(Latencies::default().summary(), Summary::default());
        assert_eq!(Summary::default().to_string(), "none");
    }

    #[test]
    fn percentiles_come_from_the_recorded_values() {
        let mut l = Latencies::default();
        for ms in 1..=100 {
            l.record(Duration::from_millis(ms));
        }
        let s = l.summary();
        assert_eq!(s.count, 100);
        // 3 significant figures: within 0.1 % of the exact rank.
        assert!((s.p50_ms - 50.0).abs() <= 0.05, "{s:?}");
        assert!((s.p90_ms - 90.0).abs() <= 0.1, "{s:?}");
        assert!((s.p99_ms - 99.0).abs() <= 0.1, "{s:?}");
        assert!((s.max_ms - 100.0).abs() <= 0.1, "{s:?}");
    }

    #[test]
    fn values_outside_the_range_are_clamped_not_lost() {
        let mut l = Latencies::default();
        l.record(Duration::ZERO);
        l.record(Duration::from_secs(3600));
        let s = l.summary();
        assert_eq!(s.count, 2);
        assert!(s.p50_ms > 0.0 && s.p50_ms < 0.01, "{s:?}");
        assert!(s.max_ms >= 599_000.0, "{s:?}");
    }

    #[test]
    fn distributions_add_up() {
        let (mut a, mut b) = (Latencies::default(), Latencies::default());
        a.record(Duration::from_millis(1));
        b.record(Duration::from_millis(9));
        a.add(&b);
        assert_eq!(a.count(), 2);
        assert!((a.summary().max_ms - 9.0).abs() < 0.01);
    }

    #[test]
    fn rates_and_error_counts() {
        assert_eq!(per_second(10, Duration::from_secs(2)), 5.0);
        assert_eq!(per_second(10, Duration::ZERO), 0.0);
        let mut e = ErrorCounts::default();
        e.add("post: HTTP 503");
        e.add("post: HTTP 503");
        let mut other = ErrorCounts::default();
        other.add("stream: disconnected");
        e.merge(&other);
        assert_eq!(e.total(), 3);
        assert_eq!(e.0["post: HTTP 503"], 2);
    }
}
