//! What to do with a claimed notification after a fetch failed, and when a successful read is
//! stale: the retry schedule as pure functions of the error, the row and the time.
//!
//! It must never drop a notification silently: every path ends in done, a retry time, or a dead
//! letter with its reason and status code.

use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::config::SyncSettings;
use crate::fenergo::FetchError;
use crate::fenergo::token::TokenError;
use crate::outbox::{Claimed, RowOutcome};

/// The shortest wait after a 429, whatever its headers say.
const MIN_RATE_LIMIT_WAIT: Duration = Duration::from_millis(250);

#[derive(Debug, Clone)]
pub struct RetryPolicy {
    pub not_found_window: Duration,
    pub stale_retries: u32,
    pub stale_delay: Duration,
    pub max_attempts: u32,
    pub retry_base: Duration,
    pub retry_max: Duration,
}

impl RetryPolicy {
    pub fn new(settings: &SyncSettings) -> RetryPolicy {
        RetryPolicy {
            not_found_window: settings.not_found_window,
            stale_retries: settings.stale_retries,
            stale_delay: settings.stale_delay,
            max_attempts: settings.max_attempts,
            retry_base: settings.retry_base,
            retry_max: settings.retry_max,
        }
    }

    /// Exponential back-off with jitter for the `attempts`-th retry (0-based).
    pub fn backoff(&self, attempts: i64) -> Duration {
        crate::backoff::nth(
            self.retry_base,
            self.retry_max,
            usize::try_from(attempts).unwrap_or(0),
        )
    }

    /// The outcome for `row` after `error` at `now`.
    pub fn on_error(&self, error: &FetchError, row: &Claimed, now: DateTime<Utc>) -> RowOutcome {
        let status = error.status();
        let retry = |wait: Duration, count_attempt: bool| RowOutcome::RetryAt {
            at: now + to_chrono(wait),
            error: error.to_string(),
            status,
            count_attempt,
        };
        match error {
            FetchError::NotFound => {
                let age = received_age(row, now);
                if age < self.not_found_window {
                    retry(self.backoff(row.attempts), true)
                } else {
                    RowOutcome::Dead {
                        reason: format!(
                            "HTTP 404: entity still not found {}s after the notification arrived",
                            age.as_secs()
                        ),
                        status,
                    }
                }
            }
            FetchError::RateLimited { retry_after } => {
                retry((*retry_after).max(MIN_RATE_LIMIT_WAIT), false)
            }
            FetchError::Rejected { .. } => RowOutcome::Dead {
                reason: error.to_string(),
                status,
            },
            // Refused credentials are an operator's problem, not the notification's: it waits
            // (the worker does not claim while they are refused) without using up attempts.
            FetchError::Token(TokenError::Refused { .. }) => retry(Duration::ZERO, false),
            FetchError::Transient { .. } | FetchError::Token(TokenError::Unavailable(_)) => {
                if row.attempts + 1 >= i64::from(self.max_attempts) {
                    RowOutcome::Dead {
                        reason: format!("gave up after {} attempts: {error}", row.attempts + 1),
                        status,
                    }
                } else {
                    retry(self.backoff(row.attempts), true)
                }
            }
        }
    }

    /// Whether a stale read (not newer than the store, although the notification is newer than
    /// our last sync) should be re-fetched later rather than accepted: while stale re-fetches
    /// remain. `stale_reads` is the stored stale counter, never the row's `attempts`: 404s and
    /// 5xx must not use up this budget.
    pub fn retry_stale(&self, stale_reads: i64, stale: bool) -> bool {
        stale && stale_reads < i64::from(self.stale_retries)
    }
}

fn received_age(row: &Claimed, now: DateTime<Utc>) -> Duration {
    (now - row.received_at).to_std().unwrap_or(Duration::ZERO)
}

pub fn to_chrono(d: Duration) -> chrono::Duration {
    chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryPolicy {
        RetryPolicy::new(&SyncSettings::default())
    }

    fn row(attempts: i64, received_secs_ago: i64, now: DateTime<Utc>) -> Claimed {
        Claimed {
            seq: 1,
            id: "n".into(),
            event_type: Some("entitydata:draftverified".into()),
            relative_url: Some("entitydataquery/api/entity/e".into()),
            entity_key: Some("e".into()),
            attempts,
            stale_reads: 0,
            received_at: now - chrono::Duration::seconds(received_secs_ago),
            event_when: None,
        }
    }

    #[test]
    fn not_found_is_retried_inside_the_window_then_dead() {
        let now = Utc::now();
        let p = policy();
        match p.on_error(&FetchError::NotFound, &row(0, 1, now), now) {
            RowOutcome::RetryAt {
                at,
                status,
                count_attempt,
                ..
            } => {
                assert!(at > now && at <= now + chrono::Duration::seconds(5));
                assert_eq!((status, count_attempt), (Some(404), true));
            }
            other => panic!("{other:?}"),
        }
        let late = p.on_error(&FetchError::NotFound, &row(5, 16 * 60, now), now);
        assert!(
            matches!(late, RowOutcome::Dead { status: Some(404), ref reason } if reason.contains("still not found"))
        );
    }

    #[test]
    fn rejections_are_dead_at_once_and_transient_errors_until_max_attempts() {
        let now = Utc::now();
        let p = policy();
        for status in [400, 403, 410] {
            let e = FetchError::Rejected {
                status,
                excerpt: "no".into(),
            };
            assert!(
                matches!(p.on_error(&e, &row(0, 0, now), now), RowOutcome::Dead { status: Some(s), .. } if s == status)
            );
        }
        let e = FetchError::Transient {
            status: Some(503),
            reason: "HTTP 503".into(),
        };
        assert!(matches!(
            p.on_error(&e, &row(0, 0, now), now),
            RowOutcome::RetryAt { .. }
        ));
        let last = p.on_error(&e, &row(i64::from(p.max_attempts) - 1, 0, now), now);
        assert!(
            matches!(last, RowOutcome::Dead { ref reason, .. } if reason.contains("gave up after 12 attempts"))
        );
    }

    #[test]
    fn rate_limits_wait_as_asked_without_counting_an_attempt() {
        let now = Utc::now();
        let e = FetchError::RateLimited {
            retry_after: Duration::from_secs(30),
        };
        match policy().on_error(&e, &row(3, 0, now), now) {
            RowOutcome::RetryAt {
                at,
                count_attempt,
                status,
                ..
            } => {
                assert_eq!(at, now + chrono::Duration::seconds(30));
                assert_eq!((count_attempt, status), (false, Some(429)));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn refused_credentials_burn_no_attempt_and_never_dead_letter() {
        let now = Utc::now();
        let e = FetchError::Token(TokenError::Refused {
            status: 401,
            client_id: "c".into(),
            reason: "invalid_client".into(),
        });
        let p = policy();
        let last = row(i64::from(p.max_attempts) - 1, 16 * 60, now);
        assert!(matches!(
            p.on_error(&e, &last, now),
            RowOutcome::RetryAt {
                count_attempt: false,
                ..
            }
        ));
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let p = policy();
        assert!(p.backoff(0) >= Duration::from_secs(2) && p.backoff(0) < Duration::from_secs(5));
        assert!(p.backoff(4) >= Duration::from_secs(32));
        assert!(p.backoff(50) <= p.retry_max * 2);
    }

    #[test]
    fn stale_reads_are_retried_only_while_retries_remain() {
        let p = policy();
        assert!(p.retry_stale(0, true));
        assert!(p.retry_stale(i64::from(p.stale_retries) - 1, true));
        assert!(!p.retry_stale(0, false));
        assert!(!p.retry_stale(i64::from(p.stale_retries), true));
    }
}
