//! Backfill and reconciliation: walks Fenergo's paged entity list (`getentitiespagedlist`, with
//! its `searchAfter` cursor) and writes every entity through the same monotonic upsert as the
//! sync worker, so a new install starts complete and gaps (a disabled webhook, notifications
//! past their 30-day TTL) are repaired. Progress and the cursor are saved after every page, so
//! an interrupted backfill resumes where it stopped. A reconciliation that walked the whole list
//! marks stored entities the list no longer returns (`absent_since`). A walk into a store holding
//! no entities defers the indexes on property values; they are built at the end of a walk once
//! no backfill is unfinished (a failed backfill, resumed, goes on without them); a finished
//! backfill has the store refresh its planner statistics, as it has just filled it. The
//! schedule counts from the last recorded run (kept in the store), so a restart does not start
//! a full pass. With [`Reconciler::with_metrics`] each run reports its progress and its last
//! success as `fenx_reconcile_*` gauges.
//!
//! It never lets a listed version overwrite a newer stored one, never deletes an entity, never
//! retries refused credentials (they stop a run at once), and never goes around the client's
//! rate limiter.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::{Notify, watch};

use crate::fenergo::token::TokenError;
use crate::fenergo::{FenergoClient, FetchError, Page};
use crate::store::{
    EntitySnapshot, ReconcileRun, ReportingStore, RunKind, StateKey, StoreError, SyncCause,
    UpsertOutcome,
};
use crate::telemetry::{KindLabel, Metrics};

/// How soon an unreadable schedule is read again.
const SCHEDULE_RETRY: Duration = Duration::from_secs(5);

/// Attempts at one page before the run stops (it can be resumed).
const PAGE_ATTEMPTS: usize = 6;

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("{0}")]
    CredentialsRefused(FetchError),
    #[error("reading the entity list failed after {attempts} attempts: {source}")]
    List {
        attempts: usize,
        #[source]
        source: FetchError,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

pub struct Reconciler {
    client: Arc<FenergoClient>,
    store: Arc<dyn ReportingStore>,
    page_size: usize,
    metrics: Option<Arc<Metrics>>,
}

impl Reconciler {
    pub fn new(
        client: Arc<FenergoClient>,
        store: Arc<dyn ReportingStore>,
        page_size: usize,
    ) -> Reconciler {
        Reconciler {
            client,
            store,
            page_size: page_size.clamp(1, 1000),
            metrics: None,
        }
    }

    /// Reports every run's progress and last success into `metrics` (for `/metrics`).
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Reconciler {
        self.metrics = Some(metrics);
        self
    }

    /// Runs [`Reconciler::walk`] with the `fenx_reconcile_*` gauges kept up to date.
    pub async fn run(
        &self,
        kind: RunKind,
        resume: bool,
        mut on_page: impl FnMut(&ReconcileRun),
    ) -> Result<ReconcileRun, ReconcileError> {
        let Some(metrics) = &self.metrics else {
            return self.walk(kind, resume, on_page).await;
        };
        let label = KindLabel {
            kind: kind.as_str().to_owned(),
        };
        let running = metrics.reconcile_running.get_or_create(&label).clone();
        running.set(1);
        let result = self
            .walk(kind, resume, |run| {
                metrics
                    .reconcile_entities_seen
                    .get_or_create(&label)
                    .set(run.counts.seen);
                if let Some(total) = run.total_items {
                    metrics
                        .reconcile_entities_listed
                        .get_or_create(&label)
                        .set(total);
                }
                on_page(run);
            })
            .await;
        running.set(0);
        if result.is_ok() {
            metrics
                .reconcile_last_success
                .get_or_create(&label)
                .set(crate::telemetry::unix_seconds(chrono::Utc::now()));
        }
        result
    }

    /// Walks the whole list once. A backfill with `resume` continues an interrupted run from its
    /// saved cursor; otherwise a new run starts at the beginning. `on_page` sees the progress
    /// after every stored page. Into a store holding no entities the walk is a bulk load: the
    /// indexes on property values are dropped first and built once at the end.
    async fn walk(
        &self,
        kind: RunKind,
        resume: bool,
        on_page: impl FnMut(&ReconcileRun),
    ) -> Result<ReconcileRun, ReconcileError> {
        match self.store.defer_indexes().await {
            Ok(deferred) if !deferred.is_empty() => tracing::info!(
                indexes = deferred.join(", "),
                "the reporting store holds no entities: its indexes on property values are built once this {} ends, not row by row",
                kind.as_str()
            ),
            Ok(_) => {}
            Err(error) => {
                tracing::warn!(%error, "cannot defer the indexes on property values; the {} keeps them up as it goes", kind.as_str());
            }
        }
        let walked = self.walk_pages(kind, resume, on_page).await;
        let built = build_deferred_indexes_unless_a_backfill_is_unfinished(&*self.store).await;
        // A store that cannot refresh its statistics only plans queries less well, so the walk
        // still succeeds.
        if walked.is_ok()
            && (kind == RunKind::Backfill || built)
            && let Err(error) = self.store.refresh_statistics().await
        {
            tracing::warn!(%error, "{} finished, but the store's query planner statistics were not refreshed; analysts' queries may be slow until ANALYZE runs", kind.as_str());
        }
        walked
    }

    async fn walk_pages(
        &self,
        kind: RunKind,
        resume: bool,
        mut on_page: impl FnMut(&ReconcileRun),
    ) -> Result<ReconcileRun, ReconcileError> {
        let mut run = match self.store.running_reconcile(kind).await? {
            Some(run) if resume => run,
            _ => self.store.start_reconcile(kind).await?,
        };
        if run.cursor.is_some() {
            tracing::info!(
                run = run.run_id,
                seen = run.counts.seen,
                "resuming {} from its saved cursor",
                kind.as_str()
            );
        }
        loop {
            let page = self.page(run.cursor.as_deref(), run.run_id).await?;
            for problem in &page.unusable {
                tracing::warn!(run = run.run_id, %problem, "skipped an unusable item of the entity list");
            }
            let last = page.search_after.is_none() || page.len == 0;
            let cause = SyncCause {
                notification_id: format!("{}:{}", kind.as_str(), run.run_id),
                event_type: Some(format!("fenx-sync:{}", kind.as_str())),
                event_when: None,
            };
            let snapshots: Vec<_> = page.entities.iter().map(EntitySnapshot::from).collect();
            let outcomes = self.store.upsert_entities(&snapshots, &cause).await?;
            if kind == RunKind::Reconcile {
                let ids: Vec<String> = snapshots.into_iter().map(|s| s.entity_id).collect();
                self.store.mark_listed(run.run_id, &ids).await?;
            }
            for outcome in outcomes {
                let counts = &mut run.counts;
                counts.seen += 1;
                match outcome {
                    UpsertOutcome::Inserted => counts.added += 1,
                    UpsertOutcome::Updated { .. } => counts.updated += 1,
                    UpsertOutcome::Unchanged | UpsertOutcome::Older { .. } => counts.unchanged += 1,
                }
            }
            run.cursor = page.search_after;
            run.total_items = page.total_items.or(run.total_items);
            self.store.save_reconcile(&run, last).await?;
            let absent = match (last, kind) {
                (true, RunKind::Reconcile) => self.store.mark_absent(run.run_id).await?,
                _ => 0,
            };
            if absent > 0 {
                tracing::warn!(
                    run = run.run_id,
                    absent,
                    "entities stored here are no longer in Fenergo's entity list; marked absent_since (see the absent_entity view), not deleted"
                );
            }
            on_page(&run);
            if last {
                return Ok(run);
            }
        }
    }

    /// One page, retried with back-off on transient failures and 429s.
    async fn page(&self, cursor: Option<&str>, run_id: i64) -> Result<Page, ReconcileError> {
        let mut delays =
            crate::backoff::delays(Duration::from_millis(500), Duration::from_secs(30));
        let correlation_id = format!("fenx-sync:reconcile:{run_id}");
        let mut attempt = 1;
        loop {
            match self
                .client
                .list_entities(cursor, self.page_size, &correlation_id)
                .await
            {
                Ok(page) => return Ok(page),
                Err(error @ FetchError::Token(TokenError::Refused { .. })) => {
                    return Err(ReconcileError::CredentialsRefused(error));
                }
                Err(
                    error @ (FetchError::Transient { .. }
                    | FetchError::RateLimited { .. }
                    | FetchError::Token(TokenError::Unavailable(_))),
                ) if attempt < PAGE_ATTEMPTS => {
                    let wait = match &error {
                        FetchError::RateLimited { retry_after } => *retry_after,
                        _ => delays.next().unwrap_or(Duration::from_secs(30)),
                    };
                    let retry_in_ms = crate::telemetry::millis(wait);
                    tracing::warn!(%error, attempt, retry_in_ms, "entity list page failed; retrying");
                    tokio::time::sleep(wait).await;
                    attempt += 1;
                }
                Err(source) => {
                    return Err(ReconcileError::List {
                        attempts: attempt,
                        source,
                    });
                }
            }
        }
    }
}

/// Builds the indexes a bulk load deferred, unless a backfill is unfinished: resumed, it goes on
/// loading without them and builds them when it finishes. Runs at the end of every walk and at
/// the service's start-up (after a crash or a build that failed). Returns whether it built any.
pub async fn build_deferred_indexes_unless_a_backfill_is_unfinished(
    store: &dyn ReportingStore,
) -> bool {
    let deferred = match store.deferred_indexes().await {
        Ok(deferred) if deferred.is_empty() => return false,
        Ok(deferred) => deferred.join(", "),
        Err(error) => {
            tracing::error!(%error, "cannot read which indexes are deferred");
            return false;
        }
    };
    match store.running_reconcile(RunKind::Backfill).await {
        Ok(None) => {}
        Ok(Some(run)) => {
            tracing::warn!(
                run = run.run_id,
                indexes = deferred,
                "indexes on property values stay deferred until the unfinished backfill is resumed (fenx-sync backfill) and finishes; queries on them scan every row meanwhile"
            );
            return false;
        }
        Err(error) => {
            tracing::error!(%error, indexes = deferred, "cannot tell whether a backfill is unfinished, so the deferred indexes are not built yet");
            return false;
        }
    }
    tracing::info!(
        indexes = deferred,
        "building the deferred indexes: on a store of millions of entities this takes a minute or more, and writes wait for it"
    );
    match store.build_deferred_indexes().await {
        Ok(built) => {
            tracing::info!(indexes = built.join(", "), "built the deferred indexes");
            !built.is_empty()
        }
        Err(error) => {
            tracing::error!(%error, "cannot build the deferred indexes on property values; queries on them scan every row until the next walk's end or the service's next start builds them");
            false
        }
    }
}

impl Reconciler {
    /// Runs a reconciliation every `every` until stopped, counting from the last recorded run:
    /// the next due time is kept in the store, so a restart waits for it (and an interrupted
    /// pass resumes from its cursor) instead of starting a full pass. `now` starts one at once
    /// (after the reporting store was recreated).
    pub async fn run_on_schedule(
        self,
        every: Duration,
        now: Arc<Notify>,
        mut stopping: watch::Receiver<bool>,
    ) {
        loop {
            let due = match self.next_due(every).await {
                Ok(due) => due,
                // An unavailable store (a PostgreSQL restart) must not end the schedule.
                Err(error) => {
                    tracing::error!(%error, retry_in = ?SCHEDULE_RETRY, "cannot read the reconciliation schedule; trying again");
                    tokio::select! {
                        _ = tokio::time::sleep(SCHEDULE_RETRY) => continue,
                        _ = stopping.wait_for(|stop| *stop) => return,
                    }
                }
            };
            tracing::info!(next = %due.to_rfc3339(), "next scheduled reconciliation");
            if let Some(metrics) = &self.metrics {
                metrics
                    .reconcile_next_run
                    .set(crate::telemetry::unix_seconds(due));
            }
            let wait = (due - Utc::now()).to_std().unwrap_or(Duration::ZERO);
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = now.notified() => {}
                _ = stopping.wait_for(|stop| *stop) => return,
            }
            let started = Utc::now();
            match self.run(RunKind::Reconcile, true, |_| {}).await {
                Ok(run) => tracing::info!(
                    run = run.run_id,
                    seen = run.counts.seen,
                    missing_repaired = run.counts.added,
                    behind_repaired = run.counts.updated,
                    "reconciliation finished"
                ),
                Err(error) => {
                    tracing::error!(%error, "reconciliation failed; next attempt at the next interval")
                }
            }
            let next = after(started, every);
            if let Err(error) = self.save_next_due(next).await {
                tracing::error!(%error, "cannot record the next reconciliation time");
            }
        }
    }

    /// The recorded next due time; else the last run's start + `every`; else now + `every`
    /// (recorded, so restarts keep counting from the first start).
    async fn next_due(&self, every: Duration) -> Result<DateTime<Utc>, ReconcileError> {
        if let Some(recorded) = self.store.state(StateKey::ReconcileNextDue).await?
            && let Some(due) = crate::time::parse(&recorded.value)
        {
            return Ok(due);
        }
        let last = self.store.last_run_started(RunKind::Reconcile).await?;
        let due = after(last.unwrap_or_else(Utc::now), every);
        self.save_next_due(due).await?;
        Ok(due)
    }

    async fn save_next_due(&self, due: DateTime<Utc>) -> Result<(), ReconcileError> {
        let due = crate::time::format(due);
        Ok(self
            .store
            .put_state(StateKey::ReconcileNextDue, &due, Utc::now())
            .await?)
    }
}

/// `at + every`, saturating (a huge interval means "practically never", not a panic).
fn after(at: DateTime<Utc>, every: Duration) -> DateTime<Utc> {
    at.checked_add_signed(crate::worker::policy::to_chrono(every))
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
}
