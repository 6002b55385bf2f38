//! Reading one request body into one buffer under every limit that protects memory: the body's
//! own size (`server.max_body_bytes`), a budget shared by all bodies held at once
//! (`server.max_inflight_body_bytes`), a minimum arrival rate and an overall time limit.
//!
//! It owns body bytes only, never their meaning. It must never keep a buffer per frame, never
//! allocate ahead of the bytes that arrived (a declared `Content-Length` costs nothing until it
//! is sent), and never hold bytes that its [`Reservation`] does not count.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use tokio::time::Instant;

use super::RequestBody;

/// The first allocation for a body: Fenergo's deliveries (400 bytes to a few KB) fit in it, and
/// a client that declares a large body but trickles it holds no more than this.
const FIRST_ALLOCATION: usize = 4096;

/// Limits on one body.
#[derive(Debug, Clone)]
pub struct BodyLimits {
    pub max_bytes: usize,
    pub read_timeout: Duration,
    /// Bytes per second once `rate_grace` has passed; 0: no rate check.
    pub min_rate: u64,
    pub rate_grace: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("body larger than {limit} bytes")]
    TooLarge { limit: usize },
    #[error("body not received within {0:?}")]
    Timeout(Duration),
    #[error("body arrived slower than {min_rate} bytes per second")]
    TooSlow { min_rate: u64 },
    #[error("more than {limit} bytes of request bodies in flight")]
    BudgetExhausted { limit: usize },
    #[error("body could not be read: {0}")]
    Read(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// The bytes of all bodies held at once (being read, or waiting for their commit), shared by
/// every connection of a listener.
#[derive(Debug)]
pub struct BodyBudget {
    limit: usize,
    in_use: AtomicUsize,
}

impl BodyBudget {
    pub fn new(limit: usize) -> Arc<BodyBudget> {
        Arc::new(BodyBudget {
            limit,
            in_use: AtomicUsize::new(0),
        })
    }

    fn empty_reservation(self: &Arc<Self>) -> Reservation {
        Reservation {
            budget: self.clone(),
            bytes: 0,
        }
    }

    fn try_take(&self, bytes: usize) -> Result<(), BodyError> {
        self.in_use
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(bytes).filter(|total| *total <= self.limit)
            })
            .map(drop)
            .map_err(|_| BodyError::BudgetExhausted { limit: self.limit })
    }
}

/// Bytes counted against a [`BodyBudget`] until dropped.
#[derive(Debug)]
pub struct Reservation {
    budget: Arc<BodyBudget>,
    bytes: usize,
}

impl Reservation {
    fn grow_to(&mut self, bytes: usize) -> Result<(), BodyError> {
        if let Some(more) = bytes.checked_sub(self.bytes).filter(|more| *more > 0) {
            self.budget.try_take(more)?;
            self.bytes = bytes;
        }
        Ok(())
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.budget.in_use.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

/// A whole body and the budget it holds; the budget is released when this is dropped.
#[derive(Debug)]
pub struct Body {
    pub bytes: Bytes,
    _reservation: Reservation,
}

/// Reads `body` (whose `Content-Length`, if any, is `declared`) into one buffer.
///
/// Memory is reserved from `budget` as bytes arrive, doubling the buffer so a body costs at most
/// twice its size; a body that cannot grow gets [`BodyError::BudgetExhausted`]. After the grace
/// period, a body must have arrived at `min_rate` on average since reading began.
pub async fn read<B: RequestBody>(
    mut body: B,
    declared: Option<u64>,
    limits: &BodyLimits,
    budget: &Arc<BodyBudget>,
) -> Result<Body, BodyError> {
    let too_large = || BodyError::TooLarge {
        limit: limits.max_bytes,
    };
    if declared.is_some_and(|len| len > limits.max_bytes as u64) {
        return Err(too_large());
    }
    let ceiling = declared.map_or(limits.max_bytes, |len| len as usize);
    let started = Instant::now();
    let timeout_at = started + limits.read_timeout;
    let mut buffer: Vec<u8> = Vec::new();
    let mut reservation = budget.empty_reservation();
    loop {
        let rate_deadline = rate_deadline(started, buffer.len(), limits);
        let wait_until = rate_deadline.map_or(timeout_at, |d| d.min(timeout_at));
        let frame = match tokio::time::timeout_at(wait_until, body.frame()).await {
            Err(_) if rate_deadline.is_some_and(|d| d < timeout_at) => {
                return Err(BodyError::TooSlow {
                    min_rate: limits.min_rate,
                });
            }
            Err(_) => return Err(BodyError::Timeout(limits.read_timeout)),
            Ok(None) => break,
            Ok(Some(Err(error))) => return Err(BodyError::Read(error.into())),
            Ok(Some(Ok(frame))) => frame,
        };
        let Ok(data) = frame.into_data() else {
            continue; // trailers carry nothing that is signed
        };
        let needed = buffer.len() + data.len();
        if needed > limits.max_bytes {
            return Err(too_large());
        }
        if needed > buffer.capacity() {
            let capacity = needed
                .max(buffer.capacity() * 2)
                .max(FIRST_ALLOCATION)
                .min(ceiling.max(needed));
            reservation.grow_to(capacity)?;
            buffer.reserve_exact(capacity - buffer.len());
        }
        buffer.extend_from_slice(&data);
    }
    Ok(Body {
        bytes: Bytes::from(buffer),
        _reservation: reservation,
    })
}

/// When a body of which `received` bytes are in falls below the minimum rate, if it checks one.
fn rate_deadline(started: Instant, received: usize, limits: &BodyLimits) -> Option<Instant> {
    (limits.min_rate > 0).then(|| {
        let earned = Duration::from_secs_f64(received as f64 / limits.min_rate as f64);
        started + limits.rate_grace + earned
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_budget_refuses_what_would_pass_its_limit_and_frees_on_drop() {
        let budget = BodyBudget::new(10_000);
        let mut first = budget.empty_reservation();
        first.grow_to(6_000).unwrap();
        let mut second = budget.empty_reservation();
        assert!(matches!(
            second.grow_to(5_000),
            Err(BodyError::BudgetExhausted { limit: 10_000 })
        ));
        second.grow_to(4_000).unwrap();
        assert_eq!(budget.in_use.load(Ordering::Relaxed), 10_000);
        first.grow_to(3_000).unwrap();
        assert_eq!(
            budget.in_use.load(Ordering::Relaxed),
            10_000,
            "a reservation never shrinks"
        );
        drop(first);
        assert_eq!(budget.in_use.load(Ordering::Relaxed), 4_000);
        drop(second);
        assert_eq!(budget.in_use.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn the_rate_deadline_moves_with_the_bytes_received() {
        let limits = BodyLimits {
            max_bytes: 1 << 20,
            read_timeout: Duration::from_secs(30),
            min_rate: 1000,
            rate_grace: Duration::from_secs(2),
        };
        let start = Instant::now();
        assert_eq!(
            rate_deadline(start, 0, &limits),
            Some(start + Duration::from_secs(2))
        );
        assert_eq!(
            rate_deadline(start, 3000, &limits),
            Some(start + Duration::from_secs(5))
        );
        let off = BodyLimits {
            min_rate: 0,
            ..limits
        };
        assert_eq!(rate_deadline(start, 3000, &off), None);
    }
}
