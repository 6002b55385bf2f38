//! What the benchmarks share beyond the service itself: knobs read from the environment and
//! figures printed in milliseconds. It must never decide a benchmark's defaults (each passes
//! its own).

use std::str::FromStr;
use std::time::Duration;

/// Environment variable `name` parsed, else `default`.
pub fn env_or<T: FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// `d` in (fractional) milliseconds.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
