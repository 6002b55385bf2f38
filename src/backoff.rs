//! The one retry back-off: exponential from a minimum to a maximum delay, with jitter so that
//! retries of many rows (or many instances) do not arrive together. Used by the worker's retry
//! schedule, the poller and reconciliation's page reads.
//!
//! It only computes delays; it must never sleep or decide whether to retry.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};

/// Successive delays, doubling from `min` up to `max`, jittered; never ends.
pub fn delays(min: Duration, max: Duration) -> impl Iterator<Item = Duration> {
    ExponentialBuilder::default()
        .with_min_delay(min)
        .with_max_delay(max)
        .with_jitter()
        .without_max_times()
        .build()
}

/// The delay before retry number `n` (0-based) of [`delays`].
pub fn nth(min: Duration, max: Duration, n: usize) -> Duration {
    delays(min, max).nth(n).unwrap_or(max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_from_the_minimum_and_stay_under_the_maximum_with_jitter() {
        let (min, max) = (Duration::from_secs(1), Duration::from_secs(30));
        let first: Vec<Duration> = delays(min, max).take(3).collect();
        // Jitter adds up to one more delay of the same size.
        for (n, d) in first.iter().enumerate() {
            let base = min * 2u32.pow(n as u32);
            assert!(*d >= base && *d <= base * 2, "retry {n}: {d:?}");
        }
        for n in [10, 100, 10_000] {
            assert!(nth(min, max, n) <= max * 2, "retry {n}");
            assert!(nth(min, max, n) >= max, "retry {n}");
        }
    }
}
