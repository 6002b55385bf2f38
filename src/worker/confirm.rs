//! Confirmation reads: an entity stored from a provisional read (taken less than
//! `sync.confirm_after` after the newest notification it served arrived) is read again once
//! that time has passed, up to 100 entities per bulk read (`getentitieslist`), single GETs for
//! ids the bulk read omits or when Fenergo does not serve it. A newer version is upserted and
//! logged (`confirmed-changed`); every confirmed entity gets `confirmed_at`. This loop also
//! records whether Fenergo refuses our credentials, for `fenx-sync status`.
//!
//! It must never read an entity before its confirmation is due (that read could be as stale as
//! the first), never let a confirmation overwrite a newer version, and never lose a pending
//! confirmation: they live in the reporting store, and a failed read postpones, not drops, them
//! (except an entity that is no longer readable, or one that failed `max_attempts` times).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use tokio::sync::watch;

use super::{SyncWorker, WorkerError, policy};
use crate::fenergo::{Entity, FetchError, token::TokenError};
use crate::store::{
    EntitySnapshot, PendingConfirmation, ProcessedNotification, StateKey, SyncOutcome,
};
use crate::telemetry::ResultLabel;

/// The most ids one bulk read asks for (contract §6).
pub const BATCH: usize = 100;
/// After Fenergo answered the bulk read with 404/405, single GETs are used this long before the
/// bulk read is tried again.
const BULK_RETRY_AFTER: Duration = Duration::from_secs(60 * 60);
/// The event type of `sync_log` rows written by confirmations.
pub const CONFIRMATION_EVENT_TYPE: &str = "fenx-sync:confirmation";

/// What one pass over the due confirmations did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConfirmReport {
    /// Entities read again and recorded as confirmed.
    pub confirmed: usize,
    /// Of those, how many had a newer version than the provisional read.
    pub changed: usize,
    /// Bulk read calls made.
    pub bulk_calls: usize,
    /// Single GETs made (omitted ids, or no bulk read).
    pub single_reads: usize,
}

/// A credentials refusal as recorded for `fenx-sync status`: since when, and the text shown.
type RecordedRefusal = Option<(DateTime<Utc>, String)>;

/// The confirmation loop's own state (the rest is in the store).
pub(super) struct Confirmer {
    /// How long a partial batch waits for more confirmations to fall due, so a burst is read in
    /// full batches; a full batch goes at once.
    patience: Duration,
    bulk_unsupported_until: Mutex<Option<Instant>>,
    /// The credentials refusal last written to the store (`None`: nothing written yet).
    recorded_refusal: Mutex<Option<RecordedRefusal>>,
}

impl Confirmer {
    pub(super) fn new(confirm_after: Duration) -> Confirmer {
        Confirmer {
            patience: (confirm_after / 10)
                .clamp(Duration::from_millis(100), Duration::from_secs(3)),
            bulk_unsupported_until: Mutex::new(None),
            recorded_refusal: Mutex::new(None),
        }
    }

    fn bulk_usable(&self) -> bool {
        self.bulk_unsupported_until
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_none_or(|until| Instant::now() >= until)
    }

    fn bulk_unsupported(&self) {
        *self
            .bulk_unsupported_until
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(Instant::now() + BULK_RETRY_AFTER);
    }
}

impl SyncWorker {
    /// Makes every confirmation due by `now`, in batches of up to 100 (for tests and
    /// `confirm_loop`, which waits for fuller batches).
    pub async fn confirm_due_at(&self, now: DateTime<Utc>) -> Result<ConfirmReport, WorkerError> {
        self.confirm_batches(now, Duration::ZERO).await
    }

    /// Pending confirmations, due or not.
    pub async fn pending_confirmations(&self) -> Result<i64, WorkerError> {
        Ok(self.store.pending_confirmations().await?)
    }

    pub(super) async fn confirm_loop(&self, mut shutdown: watch::Receiver<bool>) {
        let tick = self.idle_poll.max(Duration::from_millis(100));
        while !*shutdown.borrow() {
            if let Err(error) = self.record_credentials_state().await {
                tracing::error!(%error, "cannot record the Fenergo credentials state");
            }
            if !self.confirm_after.is_zero()
                && let Err(error) = self
                    .confirm_batches(Utc::now(), self.confirmer.patience)
                    .await
            {
                tracing::error!(%error, "confirmation reads failed; retrying shortly");
            }
            tokio::select! {
                _ = tokio::time::sleep(tick) => {}
                _ = shutdown.changed() => {}
            }
        }
    }

    /// Full batches of due confirmations go at once; a partial one once its oldest has been
    /// due for `patience`.
    async fn confirm_batches(
        &self,
        now: DateTime<Utc>,
        patience: Duration,
    ) -> Result<ConfirmReport, WorkerError> {
        let mut report = ConfirmReport::default();
        while self.client.credentials_usable() {
            let due = self.store.due_confirmations(now, BATCH).await?;
            let full = due.len() == BATCH;
            let waited = due
                .first()
                .is_some_and(|oldest| oldest.due_at + policy::to_chrono(patience) <= now);
            if due.is_empty() || !(full || waited) {
                break;
            }
            self.confirm_batch(due, now, &mut report).await?;
            if !full {
                break;
            }
        }
        Ok(report)
    }

    async fn confirm_batch(
        &self,
        batch: Vec<PendingConfirmation>,
        now: DateTime<Utc>,
        report: &mut ConfirmReport,
    ) -> Result<(), WorkerError> {
        let correlation_id = format!("fenx-sync:confirm:{}:{}", batch[0].entity_id, batch.len());
        let mut found: HashMap<String, Entity> = HashMap::new();
        if self.confirmer.bulk_usable() {
            let ids: Vec<String> = batch.iter().map(|p| p.entity_id.clone()).collect();
            report.bulk_calls += 1;
            match self.client.get_entities(&ids, &correlation_id).await {
                Ok(Some(list)) => {
                    for problem in &list.unusable {
                        tracing::warn!(%problem, "skipped an unusable item of a bulk read");
                    }
                    found.extend(list.entities.into_iter().map(|e| (e.id.clone(), e)));
                }
                Ok(None) => {
                    tracing::info!(
                        "Fenergo does not serve the bulk read by id; confirming with single reads"
                    );
                    self.confirmer.bulk_unsupported();
                }
                Err(error) => {
                    tracing::info!(%error, entities = batch.len(), "bulk confirmation read failed; retrying later");
                    return self.postpone(&batch, &error, now).await;
                }
            }
        }
        let mut reads: Vec<(PendingConfirmation, EntitySnapshot)> = Vec::new();
        for (index, pending) in batch.iter().enumerate() {
            if let Some(entity) = found.remove(&pending.entity_id) {
                reads.push((pending.clone(), EntitySnapshot::from(&entity)));
                continue;
            }
            report.single_reads += 1;
            let path = crate::fenergo::entity_path(&pending.entity_id);
            match self.client.get_entity(&path, &correlation_id).await {
                Ok(entity) => reads.push((pending.clone(), EntitySnapshot::from(&entity))),
                Err(FetchError::NotFound) => {
                    tracing::warn!(entity = %pending.entity_id, "entity no longer readable; its confirmation is dropped (reconciliation will mark it if Fenergo no longer lists it)");
                    self.store.drop_confirmation(pending).await?;
                }
                Err(error) => {
                    // A refusal stops the pass; the rest stay due for when it lifts.
                    let rest = if matches!(error, FetchError::Token(TokenError::Refused { .. })) {
                        &batch[index..]
                    } else {
                        std::slice::from_ref(pending)
                    };
                    self.postpone(rest, &error, now).await?;
                    if rest.len() > 1 {
                        break;
                    }
                }
            }
        }
        self.record_confirmed(reads, now, report).await
    }

    /// Stores the confirmation reads, counts and logs those that changed the version.
    async fn record_confirmed(
        &self,
        reads: Vec<(PendingConfirmation, EntitySnapshot)>,
        now: DateTime<Utc>,
        report: &mut ConfirmReport,
    ) -> Result<(), WorkerError> {
        if reads.is_empty() {
            return Ok(());
        }
        let outcomes = self.store.confirm(&reads, now).await?;
        let mut log = Vec::new();
        for ((pending, entity), outcome) in reads.iter().zip(outcomes) {
            let changed = outcome.wrote();
            let result = if changed { "changed" } else { "unchanged" };
            self.metrics
                .confirmations
                .get_or_create(&ResultLabel {
                    result: result.into(),
                })
                .inc();
            report.confirmed += 1;
            if changed {
                report.changed += 1;
                tracing::info!(entity = %entity.entity_id, provisional = pending.read_version, confirmed = entity.version, "confirmation read found a newer version");
                log.push(ProcessedNotification {
                    notification_id: format!(
                        "confirm:{}:{}",
                        pending.entity_id,
                        crate::time::format(pending.due_at)
                    ),
                    event_type: Some(CONFIRMATION_EVENT_TYPE.into()),
                    entity_id: Some(entity.entity_id.clone()),
                    outcome: SyncOutcome::ConfirmedChanged,
                    attempts: pending.attempts + 1,
                    received_at: pending.received_at,
                    event_when: pending.cause.event_when,
                    detail: Some(format!(
                        "provisional read had version {}, confirmation read version {}",
                        pending.read_version, entity.version
                    )),
                });
            }
        }
        self.store.record_processed(&log).await?;
        Ok(())
    }

    /// Failed confirmation reads are tried again after a back-off (refused credentials: as soon
    /// as they work again), and given up after `max_attempts`.
    async fn postpone(
        &self,
        pending: &[PendingConfirmation],
        error: &FetchError,
        now: DateTime<Utc>,
    ) -> Result<(), WorkerError> {
        let refused = matches!(error, FetchError::Token(TokenError::Refused { .. }));
        if refused {
            return Ok(());
        }
        for p in pending {
            if p.attempts + 1 >= i64::from(self.policy.max_attempts) {
                tracing::warn!(entity = %p.entity_id, %error, attempts = p.attempts + 1, "confirmation read given up; reconciliation will catch what it missed");
                self.store.drop_confirmation(p).await?;
            } else {
                let retry_at = now + policy::to_chrono(self.policy.backoff(p.attempts));
                self.store.postpone_confirmation(p, retry_at).await?;
            }
        }
        Ok(())
    }

    /// Writes the credentials refusal (or its end) to the store when it changed, so
    /// `fenx-sync status` (another process) can show it.
    async fn record_credentials_state(&self) -> Result<(), WorkerError> {
        let current = self.client.credentials_refusal().map(|r| {
            (
                r.since,
                format!(
                    "client id {}: {} (HTTP {})",
                    r.client_id, r.reason, r.status
                ),
            )
        });
        let unchanged = self
            .confirmer
            .recorded_refusal
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            == Some(&current);
        if unchanged {
            return Ok(());
        }
        match &current {
            Some((since, reason)) => {
                self.store
                    .put_state(StateKey::CredentialsRefused, reason, *since)
                    .await?
            }
            None => self.store.clear_state(StateKey::CredentialsRefused).await?,
        }
        *self
            .confirmer
            .recorded_refusal
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(current);
        Ok(())
    }
}
