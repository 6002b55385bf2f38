//! The client-side limit on calls to Fenergo: requests per second, requests in flight (a
//! semaphore), and a shared pause after a 429 that every caller honours.
//!
//! The rate is a sliding window: a call may start when fewer than `rate` calls started in the
//! last [`WINDOW`]. Fenergo counts requests per 1-second window, so no second, however its edges
//! fall, sees more than the rate; the window is a little longer than a second so that requests
//! reaching Fenergo a few milliseconds apart from when they started still fit. Unlike a
//! no-burst token bucket, a call that starts late (the in-flight cap, the scheduler) does not lose
//! its slot: the window only counts calls that did start. Starts are also spaced at least half
//! the mean interval apart, so a freed window is refilled at twice the rate, not all at once.
//!
//! It must never let a caller through while a 429 pause is in force, nor more than `rate` calls
//! start in any [`WINDOW`].

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::{Semaphore, SemaphorePermit};
use tokio::time::Instant;

/// The longest a single 429 pauses everyone (Fenergo's tenant window is one second); a longer
/// reset (the daily domain quota) is honoured per notification through the outbox schedule
/// instead of by stalling the process.
pub const MAX_PAUSE: Duration = Duration::from_secs(5);

/// The span in which at most `rate` calls start: Fenergo's one-second window plus room for the
/// time between a call starting here and reaching Fenergo.
pub const WINDOW: Duration = Duration::from_millis(1_025);

pub struct Limiter {
    rate: usize,
    /// Half the mean interval between starts at the full rate.
    min_spacing: Duration,
    /// When each of the last `rate` calls started, oldest first.
    starts: Mutex<VecDeque<Instant>>,
    in_flight: Semaphore,
    paused_until: Mutex<Option<Instant>>,
}

impl Limiter {
    pub fn new(requests_per_second: u32, max_concurrent: u32) -> Limiter {
        let rate = requests_per_second.max(1) as usize;
        Limiter {
            rate,
            min_spacing: WINDOW / (2 * requests_per_second.max(1)),
            starts: Mutex::new(VecDeque::with_capacity(rate)),
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
                _ => {}
            }
            match self.try_start(Instant::now()) {
                Ok(()) => return permit,
                Err(at) => tokio::time::sleep_until(at).await,
            }
        }
    }

    /// Records a start at `now` if the window has room, else says when to try again.
    fn try_start(&self, now: Instant) -> Result<(), Instant> {
        let mut starts = self.starts.lock().unwrap_or_else(|p| p.into_inner());
        while starts.front().is_some_and(|&s| s + WINDOW <= now) {
            starts.pop_front();
        }
        if let Some(&last) = starts.back()
            && now < last + self.min_spacing
        {
            return Err(last + self.min_spacing);
        }
        if starts.len() >= self.rate {
            return Err(starts[0] + WINDOW);
        }
        starts.push_back(now);
        Ok(())
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

    /// Start times of `calls` calls, each holding its permit for `hold`, `concurrency` at once.
    async fn starts(limiter: &'static Limiter, calls: usize, hold: Duration) -> Vec<Instant> {
        let tasks: Vec<_> = (0..calls)
            .map(|_| {
                tokio::spawn(async move {
                    let _permit = limiter.acquire().await;
                    let started = Instant::now();
                    tokio::time::sleep(hold).await;
                    started
                })
            })
            .collect();
        let mut starts = Vec::new();
        for t in tasks {
            starts.push(t.await.unwrap());
        }
        starts.sort();
        starts
    }

    fn most_in_any_second(starts: &[Instant]) -> usize {
        starts
            .iter()
            .map(|&from| {
                starts
                    .iter()
                    .filter(|&&s| s >= from && s < from + Duration::from_secs(1))
                    .count()
            })
            .max()
            .unwrap_or(0)
    }

    #[tokio::test(start_paused = true)]
    async fn no_second_sees_more_than_the_rate_and_the_rate_is_used() {
        let limiter: &'static Limiter = Box::leak(Box::new(Limiter::new(200, 50)));
        let starts = starts(limiter, 1_000, Duration::from_millis(20)).await;
        assert!(most_in_any_second(&starts) <= 200);
        let span = (starts[starts.len() - 1] - starts[0]).as_secs_f64();
        let rate = (starts.len() - 1) as f64 / span;
        assert!(rate >= 0.96 * 200.0, "{rate:.1} calls/s");
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_that_starts_late_keeps_its_slot() {
        let limiter = Limiter::new(10, 10);
        for _ in 0..5 {
            drop(limiter.acquire().await);
        }
        // Idle for a while: the five unused slots of this window are still there.
        tokio::time::sleep(Duration::from_millis(400)).await;
        let before = Instant::now();
        for _ in 0..5 {
            drop(limiter.acquire().await);
        }
        // Five starts at half the mean interval apart, not one per interval.
        assert!(Instant::now() - before < Duration::from_millis(400));
    }

    #[tokio::test(start_paused = true)]
    async fn a_pause_holds_every_caller_back() {
        let limiter = Limiter::new(1000, 5);
        limiter.pause(Duration::from_millis(200));
        let started = Instant::now();
        drop(limiter.acquire().await);
        assert!(Instant::now() - started >= Duration::from_millis(200));
    }

    #[tokio::test(start_paused = true)]
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
