//! The sync worker: claims due notifications from the outbox, routes them by event type, fetches
//! the entity they point at (one fetch per entity, however many notifications are waiting for
//! it), upserts it into the reporting store, and settles every row: done, ignored, retry at a
//! time, or dead with its reason.
//!
//! It must never let an older entity version overwrite a newer one (the store's upsert is
//! monotonic and stale reads are re-fetched), never drop a notification silently, and never keep
//! retry state only in memory: schedules live in the outbox rows.

pub mod policy;
pub mod routing;

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::{Notify, watch};

use crate::config::{RouteAction, Settings};
use crate::fenergo::{Entity, FenergoClient};
use crate::notification::entity_id;
use crate::outbox::{Claim, Claimed, OutboxError, RowOutcome, Settlement, WorkQueue};
use crate::store::{
    EntitySnapshot, ProcessedNotification, ReportingStore, StoreError, SyncCause, UpsertOutcome,
};
use crate::supervisor::Supervisor;
use crate::telemetry::Metrics;
use policy::RetryPolicy;
use routing::Router;

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Outbox(#[from] OutboxError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("a blocking database task failed: {0}")]
    Blocking(#[from] tokio::task::JoinError),
}

/// What one step did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Nothing was due.
    Idle,
    /// A claim was processed: how many rows, and whether Fenergo was called.
    Settled { rows: usize, fetched: bool },
}

pub struct SyncWorker {
    queue: Arc<WorkQueue>,
    store: Arc<ReportingStore>,
    client: Arc<FenergoClient>,
    router: Router,
    policy: RetryPolicy,
    lease: Duration,
    idle_poll: Duration,
    workers: usize,
    metrics: Arc<Metrics>,
}

impl SyncWorker {
    /// Opens the outbox (worker side) and the reporting store; calls Fenergo through `client`
    /// (shared with the poller, so both stay under one rate limit and one token).
    pub fn new(
        settings: &Settings,
        client: Arc<FenergoClient>,
        metrics: Arc<Metrics>,
    ) -> Result<SyncWorker, WorkerError> {
        Ok(SyncWorker {
            queue: Arc::new(WorkQueue::open(
                &settings.store.dir,
                settings.store.busy_timeout,
            )?),
            store: Arc::new(ReportingStore::open(&settings.store.reporting_path())?),
            client,
            router: Router::new(&settings.sync.routes),
            policy: RetryPolicy::new(&settings.sync),
            lease: settings.sync.lease,
            idle_poll: settings.sync.idle_poll,
            workers: settings.sync.workers,
            metrics,
        })
    }

    /// The reporting store the worker writes to (shared with reconciliation and the store watch,
    /// so that a deleted file is reopened once).
    pub fn store(&self) -> Arc<ReportingStore> {
        self.store.clone()
    }

    /// Runs `sync.workers` loops until `shutdown` turns true; a step in progress is finished.
    /// `new_work` wakes idle loops as soon as ingest stores something. Returns early, with an
    /// ERROR naming it, as soon as any one loop ends or panics before `shutdown`.
    pub async fn run(self: Arc<Self>, new_work: Arc<Notify>, shutdown: watch::Receiver<bool>) {
        let mut pool = Supervisor::new();
        for index in 0..self.workers {
            let worker = self.clone();
            let (new_work, stop) = (new_work.clone(), shutdown.clone());
            let owner = format!("{}-{}-{index}", std::process::id(), fastrand::u32(..));
            pool.spawn(format!("sync worker {index}"), async move {
                worker.run_loop(owner, new_work, stop).await
            });
        }
        pool.run_pool(&shutdown).await;
    }

    async fn run_loop(
        &self,
        owner: String,
        new_work: Arc<Notify>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        while !*shutdown.borrow() {
            let pause = match self.run_once(&owner).await {
                Ok(Step::Settled { .. }) => continue,
                Ok(Step::Idle) => self.idle_poll,
                Err(error) => {
                    tracing::error!(%error, "sync step failed; retrying shortly");
                    self.idle_poll * 4
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = new_work.notified() => {}
                _ = shutdown.changed() => {}
            }
        }
    }

    /// Claims and processes one entity's worth of notifications, as of now.
    pub async fn run_once(&self, owner: &str) -> Result<Step, WorkerError> {
        self.run_once_at(owner, Utc::now()).await
    }

    /// [`run_once`](Self::run_once) with the clock given, so tests can step past retry times
    /// without sleeping.
    pub async fn run_once_at(&self, owner: &str, now: DateTime<Utc>) -> Result<Step, WorkerError> {
        let (queue, lease, owner_text) = (self.queue.clone(), self.lease, owner.to_owned());
        let claim =
            tokio::task::spawn_blocking(move || queue.claim(&owner_text, lease, now)).await??;
        let Some(claim) = claim else {
            return Ok(Step::Idle);
        };
        let rows = claim.rows.len();
        let mut work = Work::default();
        let mut fetch_rows = Vec::new();
        for row in &claim.rows {
            match (
                self.router.route(row.event_type.as_deref()),
                &row.relative_url,
            ) {
                (RouteAction::FetchEntity, Some(_)) => fetch_rows.push(row.clone()),
                (RouteAction::FetchEntity, None) => {
                    work.dead(row, "no relativeUrl to follow".into(), None);
                }
                (RouteAction::Ignore, _) => {
                    work.settle(row, RowOutcome::Ignored, Some("ignored"), None)
                }
            }
        }
        let fetched = !fetch_rows.is_empty();
        if fetched {
            self.fetch_and_store(&fetch_rows, now, &mut work).await?;
        }
        self.finish(claim, owner, work).await?;
        Ok(Step::Settled { rows, fetched })
    }

    /// One fetch for all of `rows` (the same entity), then one outcome per row.
    async fn fetch_and_store(
        &self,
        rows: &[Claimed],
        now: DateTime<Utc>,
        work: &mut Work,
    ) -> Result<(), WorkerError> {
        let newest = rows.last().expect("called with at least one row");
        let relative_url = newest.relative_url.as_deref().unwrap_or_default();
        let path = entity_id(relative_url)
            .map(|id| format!("entitydataquery/api/entity/{id}"))
            .unwrap_or_else(|| relative_url.to_owned());
        let correlation_id = format!("fenx-sync:{}:{}", newest.id, newest.attempts + 1);
        let entity = match self.client.get_entity(&path, &correlation_id).await {
            Ok(entity) => entity,
            Err(error) => {
                let entity = newest.entity_key.as_deref().unwrap_or(relative_url);
                tracing::info!(entity, %error, notifications = rows.len(), "fetch failed");
                for row in rows {
                    let outcome = self.policy.on_error(&error, row, now);
                    let entity_key = row.entity_key.clone();
                    match outcome {
                        RowOutcome::Dead { reason, status } => work.dead(row, reason, status),
                        outcome => work.settle(row, outcome, None, entity_key),
                    }
                }
                return Ok(());
            }
        };
        let store = self.store.clone();
        let id = entity.id.clone();
        let state = tokio::task::spawn_blocking(move || store.stored_state(&id)).await??;
        // Stale: not newer than what we hold, although the event is newer than our last sync.
        let stale = state.as_ref().is_some_and(|s| {
            entity.version <= s.version
                && rows.iter().any(|r| event_after_last_write(r, &s.synced_at))
        });
        // The budget is the group's: a notification arriving later must not restart it.
        let attempts = rows.iter().map(|r| r.attempts).max().unwrap_or(0);
        if self.policy.retry_stale(attempts, stale) {
            let stored = state.as_ref().map_or(0, |s| s.version);
            tracing::info!(entity = %entity.id, fetched = entity.version, stored, "stale read; re-fetching later");
            for row in rows {
                let outcome = RowOutcome::RetryAt {
                    at: now + policy::to_chrono(self.policy.stale_delay),
                    error: format!(
                        "stale read: fetched version {} is not newer than stored {stored}",
                        entity.version
                    ),
                    status: Some(200),
                    count_attempt: true,
                };
                work.settle(row, outcome, None, Some(entity.id.clone()));
            }
            return Ok(());
        }
        let snapshot = snapshot(&entity);
        let cause = SyncCause {
            notification_id: newest.id.clone(),
            event_type: newest.event_type.clone(),
            event_when: newest.event_when.clone(),
        };
        let store = self.store.clone();
        let upsert =
            tokio::task::spawn_blocking(move || store.upsert_entity(&snapshot, &cause)).await??;
        let label = match upsert {
            UpsertOutcome::Inserted | UpsertOutcome::Updated { .. } => "synced",
            UpsertOutcome::Unchanged | UpsertOutcome::Older { .. } if stale => "stale-accepted",
            UpsertOutcome::Unchanged => "unchanged",
            UpsertOutcome::Older { .. } => "older-ignored",
        };
        tracing::info!(entity = %entity.id, version = entity.version, outcome = label, notifications = rows.len(), "entity synced");
        for row in rows {
            work.settle(
                row,
                RowOutcome::Done { status: Some(200) },
                Some(label),
                Some(entity.id.clone()),
            );
        }
        Ok(())
    }

    fn record_metrics(&self, log: &[ProcessedNotification]) {
        let now = Utc::now();
        for p in log {
            Metrics::count_event(
                &self.metrics.notifications_processed,
                p.event_type.as_deref(),
                &p.outcome,
            );
            match p.outcome.as_str() {
                "dead" => {
                    self.metrics.dead_letters.inc();
                }
                "synced" => {
                    let when = p
                        .event_when
                        .as_deref()
                        .and_then(|w| DateTime::parse_from_rfc3339(w.trim()).ok());
                    if let Some(lag) =
                        when.and_then(|w| (now - w.with_timezone(&Utc)).to_std().ok())
                    {
                        self.metrics.sync_lag_seconds.observe(lag.as_secs_f64());
                    }
                    if let Ok(received) = DateTime::parse_from_rfc3339(&p.received_at) {
                        let age = now - received.with_timezone(&Utc);
                        let seconds = age.num_microseconds().unwrap_or(0).max(0) as f64 / 1e6;
                        self.metrics.freshness_seconds.observe(seconds);
                    }
                }
                _ => {}
            }
        }
    }

    /// Writes the processing log to the store, then settles the rows and releases the lease. A
    /// crash between the two replays the claim after the lease expires, which the idempotent
    /// upsert and log make harmless.
    async fn finish(&self, claim: Claim, owner: &str, work: Work) -> Result<(), WorkerError> {
        self.record_metrics(&work.log);
        let store = self.store.clone();
        let log = work.log;
        if !log.is_empty() {
            tokio::task::spawn_blocking(move || store.record_processed(&log)).await??;
        }
        let (queue, owner) = (self.queue.clone(), owner.to_owned());
        let settlements = work.settlements;
        tokio::task::spawn_blocking(move || queue.settle(&claim.lease_key, &owner, &settlements))
            .await??;
        Ok(())
    }
}

/// Outcomes collected during one step.
#[derive(Default)]
struct Work {
    settlements: Vec<Settlement>,
    log: Vec<ProcessedNotification>,
}

impl Work {
    /// Records `outcome` for `row`, and a processing-log entry when the row is finished.
    fn settle(
        &mut self,
        row: &Claimed,
        outcome: RowOutcome,
        logged: Option<&str>,
        entity_id: Option<String>,
    ) {
        if let Some(label) = logged {
            self.log.push(processed(row, label, entity_id, None));
        }
        self.settlements.push(Settlement {
            seq: row.seq,
            outcome,
        });
    }

    fn dead(&mut self, row: &Claimed, reason: String, status: Option<u16>) {
        tracing::warn!(notification_id = %row.id, entity = row.entity_key.as_deref(), %reason, "notification dead-lettered");
        self.log.push(processed(
            row,
            "dead",
            row.entity_key.clone(),
            Some(reason.clone()),
        ));
        self.settlements.push(Settlement {
            seq: row.seq,
            outcome: RowOutcome::Dead { reason, status },
        });
    }
}

fn processed(
    row: &Claimed,
    outcome: &str,
    entity_id: Option<String>,
    detail: Option<String>,
) -> ProcessedNotification {
    ProcessedNotification {
        notification_id: row.id.clone(),
        event_type: row.event_type.clone(),
        entity_id,
        outcome: outcome.to_owned(),
        attempts: row.attempts + 1,
        received_at: row.received_at.clone(),
        event_when: row.event_when.clone(),
        detail,
    }
}

/// Whether `row`'s event happened after we last wrote the entity (`synced_at`): only then can a
/// read that is not newer be stale. An event from before that write was already covered by it
/// (so a late duplicate costs no re-fetch). Uses the event's `When` where readable, else our
/// receive time.
fn event_after_last_write(row: &Claimed, synced_at: &str) -> bool {
    let parse = |t: &str| DateTime::parse_from_rfc3339(t.trim()).ok();
    let event = row
        .event_when
        .as_deref()
        .and_then(parse)
        .or_else(|| parse(&row.received_at));
    matches!((event, parse(synced_at)), (Some(event), Some(written)) if event > written)
}

/// Fenergo's wire entity in the store's terms.
pub(crate) fn snapshot(entity: &Entity) -> EntitySnapshot {
    EntitySnapshot {
        entity_id: entity.id.clone(),
        entity_type: entity.entity_type.clone(),
        version: entity.version,
        status: entity.status.clone(),
        created: entity.created.clone(),
        json: entity.data.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(when: Option<&str>, received: &str) -> Claimed {
        Claimed {
            seq: 1,
            id: "n".into(),
            event_type: None,
            relative_url: None,
            entity_key: None,
            attempts: 0,
            received_at: received.into(),
            event_when: when.map(str::to_owned),
        }
    }

    #[test]
    fn only_events_after_our_last_write_make_a_read_stale() {
        let written = "2021-05-05T10:19:17.500Z";
        let after = row(
            Some("2021-05-05T10:19:17.5000001+00:00"),
            "2021-05-05T10:19:18.000Z",
        );
        assert!(event_after_last_write(&after, written));
        let before = row(
            Some("2021-05-05T11:19:17.4+01:00"),
            "2021-05-05T10:19:18.000Z",
        );
        assert!(
            !event_after_last_write(&before, written),
            "a late duplicate is not stale"
        );
        // No usable When: our own receive time decides.
        assert!(event_after_last_write(
            &row(None, "2021-05-05T10:19:18.000Z"),
            written
        ));
        assert!(!event_after_last_write(
            &row(Some("garbage"), "2021-05-05T10:19:17.000Z"),
            written
        ));
    }
}
