//! The sync worker: claims due notifications from the outbox, routes them by event type, fetches
//! the entity they point at (one fetch per entity, however many notifications are waiting for
//! it), upserts it into the reporting store, and settles every row: done, ignored, retry at a
//! time, or dead with its reason. A read taken inside `sync.confirm_after` of the newest
//! notification it serves is provisional: it is stored at once and confirmed later
//! (`confirm.rs`); notifications arriving soon after a provisional read are left to that
//! confirmation instead of costing a fetch.
//!
//! It must never let an older entity version overwrite a newer one (the store's upsert is
//! monotonic and stale reads are re-fetched), never drop a notification silently, never keep
//! retry state only in memory (schedules live in the outbox rows, pending confirmations in the
//! reporting store), and never charge a notification an attempt for something that is not
//! Fenergo's answer about it (refused credentials, a busy local store).

mod confirm;
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
    EntitySnapshot, ProcessedNotification, ReadFollowUp, ReportingStore, StoreError, SyncCause,
    SyncOutcome, UpsertOutcome,
};
use crate::supervisor::Supervisor;
use crate::telemetry::Metrics;
pub use confirm::ConfirmReport;
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
    store: Arc<dyn ReportingStore>,
    client: Arc<FenergoClient>,
    router: Router,
    policy: RetryPolicy,
    lease: Duration,
    idle_poll: Duration,
    workers: usize,
    confirm_after: Duration,
    confirmer: confirm::Confirmer,
    metrics: Arc<Metrics>,
}

/// How soon rows come back after the local reporting store failed (e.g. SQLITE_BUSY).
const LOCAL_RETRY: Duration = Duration::from_secs(2);

impl SyncWorker {
    /// Opens the outbox (worker side); writes to `store`; calls Fenergo through `client`
    /// (shared with the poller, so both stay under one rate limit and one token).
    pub fn new(
        settings: &Settings,
        store: Arc<dyn ReportingStore>,
        client: Arc<FenergoClient>,
        metrics: Arc<Metrics>,
    ) -> Result<SyncWorker, WorkerError> {
        Ok(SyncWorker {
            queue: Arc::new(WorkQueue::open(
                &settings.store.dir,
                settings.store.busy_timeout,
            )?),
            store,
            client,
            router: Router::new(&settings.sync.routes),
            policy: RetryPolicy::new(&settings.sync),
            lease: settings.sync.lease,
            idle_poll: settings.sync.idle_poll,
            workers: settings.sync.workers,
            confirm_after: settings.sync.confirm_after,
            confirmer: confirm::Confirmer::new(settings.sync.confirm_after),
            metrics,
        })
    }

    /// The reporting store the worker writes to (shared with reconciliation and the store watch,
    /// so that a deleted file is reopened once).
    pub fn store(&self) -> Arc<dyn ReportingStore> {
        self.store.clone()
    }

    /// Runs `sync.workers` loops and the confirmation loop until `shutdown` turns true; a step
    /// in progress is finished. `new_work` wakes idle loops as soon as ingest stores something.
    /// Returns early, with an ERROR naming it, as soon as any one loop ends or panics before
    /// `shutdown`.
    pub async fn run(self: Arc<Self>, new_work: Arc<Notify>, shutdown: watch::Receiver<bool>) {
        let mut pool = Supervisor::new();
        {
            let worker = self.clone();
            let stop = shutdown.clone();
            pool.spawn("confirmation loop", async move {
                worker.confirm_loop(stop).await
            });
        }
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
        // While Fenergo refuses our credentials, claiming would only churn rows: they wait.
        if !self.client.credentials_usable() {
            return Ok(Step::Idle);
        }
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
                    work.settle(row, RowOutcome::Ignored, Some(SyncOutcome::Ignored), None)
                }
            }
        }
        let fetched = !fetch_rows.is_empty() && !self.deferred(&fetch_rows, now, &mut work).await;
        if fetched {
            self.fetch_and_store(&fetch_rows, now, &mut work).await?;
        }
        self.finish(claim, owner, work).await?;
        Ok(Step::Settled { rows, fetched })
    }

    /// Whether `rows` (one entity) are served by the entity's pending confirmation instead of a
    /// fetch: when its provisional read was taken less than `confirm_after` ago, the
    /// confirmation is moved to this notification's window and the rows are done
    /// (`confirmation-pending`). A fetch now would be as provisional as the last one; waiting
    /// costs no call and the entity is never more than about `confirm_after` behind. An
    /// operator's resync always fetches.
    async fn deferred(&self, rows: &[Claimed], now: DateTime<Utc>, work: &mut Work) -> bool {
        let newest = rows.last().expect("called with at least one row");
        let resync = rows
            .iter()
            .any(|r| r.event_type.as_deref() == Some(crate::notification::RESYNC_EVENT_TYPE));
        let entity = newest.relative_url.as_deref().and_then(entity_id);
        let (
            Some(entity),
            false,
            Some(ReadFollowUp::Confirm {
                due_at,
                received_at,
                ..
            }),
        ) = (entity, resync, self.follow_up(newest, now))
        else {
            return false;
        };
        let read_after = now
            .checked_sub_signed(policy::to_chrono(self.confirm_after))
            .unwrap_or(DateTime::<Utc>::MIN_UTC);
        let deferred = self
            .store
            .defer_to_confirmation(entity, read_after, due_at, &cause(newest), received_at)
            .await;
        match deferred {
            Ok(true) => {
                tracing::info!(entity, notifications = rows.len(), due = %due_at.to_rfc3339(), "served by the pending confirmation read");
                for row in rows {
                    work.settle(
                        row,
                        RowOutcome::Done { status: None },
                        Some(SyncOutcome::ConfirmationPending),
                        Some(entity.to_owned()),
                    );
                }
                true
            }
            Ok(false) => false,
            // Fetching is always a safe answer.
            Err(error) => {
                tracing::warn!(%error, entity, "cannot check the pending confirmation; fetching");
                false
            }
        }
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
            .map(crate::fenergo::entity_path)
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
        match self.store_fetched(rows, entity, now, work).await {
            Err(WorkerError::Store(error)) => {
                tracing::error!(%error, notifications = rows.len(), retry_in = ?LOCAL_RETRY, "the reporting store failed; the notifications are retried without counting an attempt");
                work.retry_locally(rows, &error, now);
                Ok(())
            }
            other => other,
        }
    }

    /// Stores what one fetch returned: re-fetch later if it is stale, else upsert it, with a
    /// confirmation read to follow when it was taken inside `confirm_after`.
    async fn store_fetched(
        &self,
        rows: &[Claimed],
        entity: Entity,
        now: DateTime<Utc>,
        work: &mut Work,
    ) -> Result<(), WorkerError> {
        let newest = rows.last().expect("called with at least one row");
        let state = self.store.stored_state(&entity.id).await?;
        // Stale: not newer than what we hold, although the event is newer than our last sync.
        let stale = state.as_ref().is_some_and(|s| {
            entity.version <= s.version
                && rows.iter().any(|r| event_after_last_write(r, s.synced_at))
        });
        // The budget is the group's: a notification arriving later must not restart it. It is
        // the stored stale counter, so 404s and 5xx before this read do not use it up.
        let stale_reads = rows.iter().map(|r| r.stale_reads).max().unwrap_or(0);
        if self.policy.retry_stale(stale_reads, stale) {
            let stored = state.as_ref().map_or(0, |s| s.version);
            tracing::info!(entity = %entity.id, fetched = entity.version, stored, "stale read; re-fetching later");
            for row in rows {
                let outcome = RowOutcome::StaleRetryAt {
                    at: now + policy::to_chrono(self.policy.stale_delay),
                    error: format!(
                        "stale read: fetched version {} is not newer than stored {stored}",
                        entity.version
                    ),
                };
                work.settle(row, outcome, None, Some(entity.id.clone()));
            }
            return Ok(());
        }
        let follow_up = self.follow_up(newest, now);
        let provisional = matches!(follow_up, Some(ReadFollowUp::Confirm { .. }));
        let upsert = self
            .store
            .store_read(
                &EntitySnapshot::from(&entity),
                &cause(newest),
                follow_up.as_ref(),
            )
            .await?;
        let label = match upsert {
            UpsertOutcome::Inserted | UpsertOutcome::Updated { .. } => SyncOutcome::Synced,
            UpsertOutcome::Unchanged | UpsertOutcome::Older { .. } if stale => {
                SyncOutcome::StaleAccepted
            }
            UpsertOutcome::Unchanged => SyncOutcome::Unchanged,
            UpsertOutcome::Older { .. } => SyncOutcome::OlderIgnored,
        };
        tracing::info!(entity = %entity.id, version = entity.version, outcome = %label, provisional, notifications = rows.len(), "entity synced");
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

    /// What a read at `now` that served `newest` (the latest arrival of its group) leaves to do:
    /// a confirmation once `confirm_after` has passed since that arrival, or nothing more (it is
    /// itself a confirmation). `None` when confirmation reads are off.
    fn follow_up(&self, newest: &Claimed, now: DateTime<Utc>) -> Option<ReadFollowUp> {
        if self.confirm_after.is_zero() {
            return None;
        }
        let received = newest.received_at;
        let due_at = received
            .checked_add_signed(policy::to_chrono(self.confirm_after))
            .unwrap_or(DateTime::<Utc>::MAX_UTC);
        Some(if now < due_at {
            ReadFollowUp::Confirm {
                due_at,
                received_at: received,
                read_at: now,
            }
        } else {
            ReadFollowUp::Confirmed { at: now }
        })
    }

    fn record_metrics(&self, log: &[ProcessedNotification]) {
        let now = Utc::now();
        for p in log {
            Metrics::count_event(
                &self.metrics.notifications_processed,
                p.event_type.as_deref(),
                p.outcome.as_str(),
            );
            match p.outcome {
                SyncOutcome::Dead => {
                    self.metrics.dead_letters.inc();
                }
                SyncOutcome::Synced => {
                    if let Some(lag) = p.event_when.and_then(|w| (now - w).to_std().ok()) {
                        self.metrics.sync_lag_seconds.observe(lag.as_secs_f64());
                    }
                    let age = now - p.received_at;
                    let seconds = age.num_microseconds().unwrap_or(0).max(0) as f64 / 1e6;
                    self.metrics.freshness_seconds.observe(seconds);
                }
                _ => {}
            }
        }
    }

    /// Writes the processing log to the store, then settles the rows and releases the lease. A
    /// crash between the two replays the claim after the lease expires, which the idempotent
    /// upsert and log make harmless.
    async fn finish(&self, claim: Claim, owner: &str, mut work: Work) -> Result<(), WorkerError> {
        let log = std::mem::take(&mut work.log);
        match self.store.record_processed(&log).await {
            Ok(()) => self.record_metrics(&log),
            // Nothing is settled without its log entry: the rows come back shortly, and the
            // idempotent upsert makes the repeat harmless.
            Err(error) => {
                tracing::error!(%error, notifications = claim.rows.len(), retry_in = ?LOCAL_RETRY, "the reporting store failed; the notifications are retried without counting an attempt");
                work = Work::default();
                work.retry_locally(&claim.rows, &error, Utc::now());
            }
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
        logged: Option<SyncOutcome>,
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

    /// The local reporting store failed: every row comes back after [`LOCAL_RETRY`], without
    /// counting an attempt (Fenergo was not at fault).
    fn retry_locally(&mut self, rows: &[Claimed], error: &StoreError, now: DateTime<Utc>) {
        self.settlements.extend(rows.iter().map(|row| Settlement {
            seq: row.seq,
            outcome: RowOutcome::RetryAt {
                at: now + policy::to_chrono(LOCAL_RETRY),
                error: format!("reporting store: {error}"),
                status: None,
                count_attempt: false,
            },
        }));
    }

    fn dead(&mut self, row: &Claimed, reason: String, status: Option<u16>) {
        tracing::warn!(notification_id = %row.id, entity = row.entity_key.as_deref(), %reason, "notification dead-lettered");
        self.log.push(processed(
            row,
            SyncOutcome::Dead,
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
    outcome: SyncOutcome,
    entity_id: Option<String>,
    detail: Option<String>,
) -> ProcessedNotification {
    ProcessedNotification {
        notification_id: row.id.clone(),
        event_type: row.event_type.clone(),
        entity_id,
        outcome,
        attempts: row.attempts + 1,
        received_at: row.received_at,
        event_when: row.event_when,
        detail,
    }
}

/// The notification `row` as the cause of a write.
fn cause(row: &Claimed) -> SyncCause {
    SyncCause {
        notification_id: row.id.clone(),
        event_type: row.event_type.clone(),
        event_when: row.event_when,
    }
}

/// Whether `row`'s event happened after we last wrote the entity (`synced_at`): only then can a
/// read that is not newer be stale. An event from before that write was already covered by it
/// (so a late duplicate costs no re-fetch). Uses the event's `When` where readable, else our
/// receive time.
fn event_after_last_write(row: &Claimed, synced_at: DateTime<Utc>) -> bool {
    row.event_when.unwrap_or(row.received_at) > synced_at
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
            stale_reads: 0,
            received_at: crate::time::parse(received).unwrap(),
            event_when: when.and_then(crate::time::parse),
        }
    }

    #[test]
    fn only_events_after_our_last_write_make_a_read_stale() {
        let written = crate::time::parse("2021-05-05T10:19:17.500Z").unwrap();
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
