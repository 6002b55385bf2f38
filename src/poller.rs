//! The polling source, for deployments Fenergo's webhooks cannot reach: takes batches from
//! `GET eventnotifications/v2/{feed}/next`, stores every notification in the outbox through the
//! same group commit and de-duplication as webhooks, and only after that commit acknowledges the
//! batch with `POST eventnotifications/v2/{feed}/{batchId}/complete`.
//!
//! It must never acknowledge a batch before its notifications are durable: a crash in between
//! re-delivers the batch, and the outbox de-duplicates it.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::Method;
use serde::Deserialize;
use tokio::sync::watch;

use crate::config::PollingSettings;
use crate::fenergo::{FenergoClient, FetchError};
use crate::notification::{self, ParseError};
use crate::outbox::{Appended, NewNotification, Outbox, OutboxError, Source};
use crate::supervisor::Supervisor;

#[derive(Debug, thiserror::Error)]
pub enum PollError {
    #[error("feed {feed}: {source}")]
    Fetch {
        feed: String,
        #[source]
        source: FetchError,
    },
    #[error("feed {feed}: batch is not usable: {reason}")]
    Batch { feed: String, reason: String },
    #[error("feed {feed}: batch {batch_id} not stored, so not acknowledged: {source}")]
    Store {
        feed: String,
        batch_id: String,
        #[source]
        source: OutboxError,
    },
}

/// What one poll did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Polled {
    /// 204: nothing waiting.
    Empty,
    /// A batch stored and acknowledged.
    Batch {
        batch_id: String,
        stored: usize,
        duplicates: usize,
        more_available: bool,
    },
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct BatchHeader {
    batch_id: serde_json::Value,
    #[serde(default)]
    more_available: bool,
}

pub struct Poller {
    client: Arc<FenergoClient>,
    outbox: Outbox,
    feeds: Vec<String>,
    interval: Duration,
    retry_max: Duration,
}

impl Poller {
    pub fn new(client: Arc<FenergoClient>, outbox: Outbox, settings: &PollingSettings) -> Poller {
        Poller {
            client,
            outbox,
            feeds: settings.feeds.clone(),
            interval: settings.interval,
            retry_max: settings.retry_max,
        }
    }

    /// Takes one batch from `feed`, stores it, then acknowledges it.
    pub async fn poll_once(&self, feed: &str) -> Result<Polled, PollError> {
        let Some(batch) = self.take_batch(feed).await? else {
            return Ok(Polled::Empty);
        };
        let (stored, duplicates) = self.store(feed, &batch).await?;
        self.acknowledge(feed, &batch.batch_id).await?;
        tracing::info!(feed, batch_id = %batch.batch_id, stored, duplicates, more_available = batch.more_available, "polled batch stored and acknowledged");
        Ok(Polled::Batch {
            batch_id: batch.batch_id,
            stored,
            duplicates,
            more_available: batch.more_available,
        })
    }

    /// `GET …/next`: the next batch, or `None` when nothing waits (204).
    pub async fn take_batch(&self, feed: &str) -> Result<Option<Batch>, PollError> {
        let (status, body) = self
            .client
            .request(
                Method::GET,
                &format!("eventnotifications/v2/{feed}/next"),
                None,
                &correlation_id(feed),
            )
            .await
            .map_err(|source| fetch_error(feed, source))?;
        if status == 204 || body.iter().all(u8::is_ascii_whitespace) {
            return Ok(None);
        }
        parse_batch(&body)
            .map(Some)
            .map_err(|reason| PollError::Batch {
                feed: feed.to_owned(),
                reason,
            })
    }

    /// Appends the batch's notifications to the outbox (durably); returns (stored, duplicates).
    pub async fn store(&self, feed: &str, batch: &Batch) -> Result<(usize, usize), PollError> {
        let outcomes = self
            .outbox
            .append_batch(batch.rows.clone())
            .await
            .map_err(|source| PollError::Store {
                feed: feed.to_owned(),
                batch_id: batch.batch_id.clone(),
                source,
            })?;
        let duplicates = outcomes
            .iter()
            .filter(|o| **o == Appended::Duplicate)
            .count();
        Ok((outcomes.len() - duplicates, duplicates))
    }

    /// `POST …/{batchId}/complete`: Fenergo may now forget the batch.
    pub async fn acknowledge(&self, feed: &str, batch_id: &str) -> Result<(), PollError> {
        let complete = format!("eventnotifications/v2/{feed}/{batch_id}/complete");
        self.client
            .request(Method::POST, &complete, None, &correlation_id(feed))
            .await
            .map(drop)
            .map_err(|source| fetch_error(feed, source))
    }

    /// Polls every configured feed until `stop`: again at once while `moreAvailable`, after
    /// `polling.interval` when a feed is drained, with back-off after errors.
    /// Returns early, with an ERROR naming the feed, as soon as any feed's loop ends or panics
    /// before `stop`.
    pub async fn run(self: Arc<Self>, stop: watch::Receiver<bool>) {
        let mut pool = Supervisor::new();
        for feed in &self.feeds {
            let (poller, feed, feed_stop) = (self.clone(), feed.clone(), stop.clone());
            pool.spawn(format!("poller for feed {feed}"), async move {
                poller.run_feed(&feed, feed_stop).await
            });
        }
        pool.run_pool(&stop).await;
    }

    async fn run_feed(&self, feed: &str, mut stop: watch::Receiver<bool>) {
        let mut failures = 0usize;
        while !*stop.borrow() {
            let pause = match self.poll_once(feed).await {
                Ok(Polled::Batch {
                    more_available: true,
                    ..
                }) => {
                    failures = 0;
                    continue;
                }
                Ok(_) => {
                    failures = 0;
                    self.interval
                }
                Err(error) => {
                    let wait =
                        crate::backoff::nth(Duration::from_secs(1), self.retry_max, failures);
                    failures += 1;
                    let retry_in_ms = crate::telemetry::millis(wait);
                    tracing::warn!(%error, retry_in_ms, "polling failed");
                    wait
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = stop.changed() => {}
            }
        }
    }
}

/// A batch taken from a feed, ready for the outbox.
#[derive(Debug, Clone)]
pub struct Batch {
    pub batch_id: String,
    pub more_available: bool,
    pub rows: Vec<NewNotification>,
}

fn correlation_id(feed: &str) -> String {
    format!("fenx-sync:poll:{feed}")
}

fn fetch_error(feed: &str, source: FetchError) -> PollError {
    PollError::Fetch {
        feed: feed.to_owned(),
        source,
    }
}

/// The batch id, `moreAvailable`, and the notifications ready for the outbox.
fn parse_batch(body: &Bytes) -> Result<Batch, String> {
    let header: BatchHeader =
        serde_json::from_slice(body).map_err(|e| format!("not a batch: {e}"))?;
    let batch_id = match header.batch_id {
        serde_json::Value::String(s) if !s.is_empty() => s,
        serde_json::Value::Number(n) => n.to_string(),
        other => return Err(format!("batchId is {other}")),
    };
    let notifications = notification::parse_body(body).map_err(|e: ParseError| e.to_string())?;
    let rows = notifications
        .into_iter()
        .map(|notification| NewNotification {
            notification,
            source: Source::Poll,
            signature_recipe: None,
        })
        .collect();
    Ok(Batch {
        batch_id,
        more_available: header.more_available,
        rows,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_keeps_each_notifications_bytes_and_its_id() {
        let body = Bytes::from_static(
            br#"{"batchId":"1642925639481","notifications":[{"id":"a","eventType":"journey:taskcompleted"},{"id":"b","url":"x"}],"moreAvailable":true}"#,
        );
        let Batch {
            batch_id,
            more_available,
            rows,
        } = parse_batch(&body).unwrap();
        assert_eq!((batch_id.as_str(), more_available), ("1642925639481", true));
        assert_eq!(rows.len(), 2);
        assert_eq!(
            rows[0].notification.raw,
            br#"{"id":"a","eventType":"journey:taskcompleted"}"#.as_slice()
        );
        assert_eq!(rows[1].notification.relative_url.as_deref(), Some("x"));
        assert_eq!(rows[0].source, Source::Poll);
    }

    #[test]
    fn numeric_batch_ids_and_missing_more_available_are_accepted() {
        let batch =
            parse_batch(&Bytes::from_static(br#"{"batchId":42,"notifications":[]}"#)).unwrap();
        assert_eq!(
            (
                batch.batch_id.as_str(),
                batch.more_available,
                batch.rows.len()
            ),
            ("42", false, 0)
        );
        assert!(parse_batch(&Bytes::from_static(br#"{"notifications":[]}"#)).is_err());
        assert!(parse_batch(&Bytes::from_static(b"[]")).is_err());
    }
}
