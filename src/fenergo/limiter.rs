//! The client-side limit on calls to Fenergo: requests per second (GCRA via governor, no burst
//! beyond one request, so a 1-second window never sees more than the rate), requests in flight
//! (a semaphore), and a shared pause after a 429 that every caller honours.
//!
//! It must never let a caller through while a 429 pause is in force.

use std::num::NonZeroU32;
use std::sync::Mutex;
use std::time::Duration;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use tokio::sync::{Semaphore, SemaphorePermit};
use tokio::time::Instant;

/// The longest a single 429 pauses everyone (Fenergo's tenant window is one second); a longer
/// reset (the daily domain quota) is honoured per notification through the outbox schedule
/// instead of by stalling the process.
pub const MAX_PAUSE: Duration = Duration::from_secs(5);

pub struct Limiter {
    rate: DefaultDirectRateLimiter,
    in_flight: Semaphore,
    paused_until: Mutex<Option<Instant>>,
}

impl Limiter {
    pub fn new(requests_per_second: u32, max_concurrent: u32) -> Limiter {
        let rate = NonZeroU32::new(requests_per_second.max(1)).expect("at least 1");
        let quota = Quota::per_second(rate).allow_burst(NonZeroU32::MIN);
        Limiter {
            rate: RateLimiter::direct(quota),
            in_flight: Semaphore::new(max_concurrent.max(1) as usize),
            paused_until: Mutex::new(None),
        }
    }

    /// Waits until a call may start; the permit is held for the call's duration.
    pub async fn acquire(&self) -> SemaphorePermit<'_> {
        let permit = self
            .in_flight
            .acquire()
            .await
            .expect("the semaphore is never closed");
        loop {
            let until = *self.paused_until.lock().unwrap_or_else(|p| p.into_inner());
            match until {
                Some(until) if until > Instant::now() => tokio::time::sleep_until(until).await,
                _ => break,
            }
        }
        self.rate.until_ready().await;
        permit
    }

    /// Stops every caller for `wait` (capped at [`MAX_PAUSE`]) after Fenergo answered 429.
    pub fn pause(&self, wait: Duration) {
        let until = Instant::now() + wait.min(MAX_PAUSE);
        let mut paused = self.paused_until.lock().unwrap_or_else(|p| p.into_inner());
        if paused.is_none_or(|current| current < until) {
            *paused = Some(until);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_rate_is_never_exceeded_in_any_second() {
        let limiter = Limiter::new(20, 5);
        let started = std::time::Instant::now();
        for _ in 0..21 {
            drop(limiter.acquire().await);
        }
        // 21 calls at 20/s with no burst take at least one second.
        assert!(
            started.elapsed() >= Duration::from_millis(950),
            "{:?}",
            started.elapsed()
        );
    }

    #[tokio::test]
    async fn a_pause_holds_every_caller_back() {
        let limiter = Limiter::new(1000, 5);
        limiter.pause(Duration::from_millis(200));
        let started = std::time::Instant::now();
        drop(limiter.acquire().await);
        assert!(started.elapsed() >= Duration::from_millis(190));
    }

    #[tokio::test]
    async fn in_flight_calls_are_capped() {
        let limiter = Limiter::new(1000, 2);
        let a = limiter.acquire().await;
        let _b = limiter.acquire().await;
        assert!(
            tokio::time::timeout(Duration::from_millis(50), limiter.acquire())
                .await
                .is_err()
        );
        drop(a);
        assert!(
            tokio::time::timeout(Duration::from_millis(500), limiter.acquire())
                .await
                .is_ok()
        );
    }
}
