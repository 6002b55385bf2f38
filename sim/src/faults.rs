//! The deterministic fault knobs in force ([`FaultState`]: forced 429s, injected 5xx) and what a
//! 429 tells the client ([`Throttle`]). `state` asks it under its lock. Past the moment the
//! knobs are set, its answers depend only on the knobs, its counters and the `now` it is given,
//! so a test can predict every one.

use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::Faults;

/// What a 429 tells the client.
#[derive(Debug)]
pub(crate) struct Throttle {
    pub reset: DateTime<Utc>,
    pub retry_after: Option<Duration>,
}

/// The fault knobs plus the counters that make them deterministic.
pub(crate) struct FaultState {
    pub(crate) faults: Faults,
    rate_limited_left: u32,
    rate_limited_until: Option<DateTime<Utc>>,
    server_errors_left: u32,
    /// Entity-service requests since the knobs were set (for "every Nth").
    served: u64,
}

impl FaultState {
    pub(crate) fn new(faults: Faults) -> FaultState {
        FaultState {
            rate_limited_left: faults.rate_limited_requests,
            rate_limited_until: faults
                .rate_limited_for
                .and_then(|d| chrono::Duration::from_std(d).ok())
                .map(|d| Utc::now() + d),
            server_errors_left: faults.server_errors,
            served: 0,
            faults,
        }
    }

    /// A forced 429 for this request, if the knobs ask for one.
    pub(crate) fn forced_throttle(&mut self, now: DateTime<Utc>) -> Option<Throttle> {
        let retry_after = self.faults.retry_after;
        let reset_after_retry = retry_after
            .and_then(|d| chrono::Duration::from_std(d).ok())
            .map(|d| now + d);
        if self.rate_limited_left > 0 {
            self.rate_limited_left -= 1;
            return Some(Throttle {
                reset: reset_after_retry.unwrap_or_else(|| next_second(now)),
                retry_after,
            });
        }
        match self.rate_limited_until {
            Some(until) if now < until => Some(Throttle {
                reset: reset_after_retry.unwrap_or(until),
                retry_after,
            }),
            _ => None,
        }
    }

    /// Whether this entity-service request fails on purpose.
    pub(crate) fn server_error(&mut self) -> bool {
        self.served += 1;
        if self.server_errors_left > 0 {
            self.server_errors_left -= 1;
            return true;
        }
        let every = u64::from(self.faults.server_error_every);
        every > 0 && self.served.is_multiple_of(every)
    }
}

/// The start of the next UNIX second: when the real rate limit's window resets.
pub(crate) fn next_second(now: DateTime<Utc>) -> DateTime<Utc> {
    DateTime::from_timestamp(now.timestamp() + 1, 0).unwrap_or(now)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rate_limited_window_ends_when_it_says() {
        let window = Duration::from_millis(300);
        let mut faults = FaultState::new(Faults {
            rate_limited_for: Some(window),
            ..Faults::default()
        });
        let until = faults.rate_limited_until.unwrap();
        let throttle = faults
            .forced_throttle(until - chrono::Duration::milliseconds(1))
            .unwrap();
        assert_eq!((throttle.reset, throttle.retry_after), (until, None));
        assert!(faults.forced_throttle(until).is_none());
    }
}
