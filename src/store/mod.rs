//! The reporting store: the latest version of every synced entity, flattened for plain SQL, the
//! history of every version stored, the log of processed notifications, backfill and
//! reconciliation runs, pending confirmation reads and the service's recorded state. One
//! interface, [`ReportingStore`], with two implementations: SQLite (`reporting.db`, the default,
//! in `sqlite/`) and PostgreSQL (`store.reporting_url`, in `postgres/`). The worker, backfill,
//! reconciliation and the admin CLI hold an `Arc<dyn ReportingStore>` and never know which.
//! `schema.sql` (section `reporting`) and `schema.postgres.sql` document every table, column and
//! view; both have the same names, so one SQL cookbook serves both.
//!
//! Every implementation must never let an older or equal version overwrite what is stored (the
//! upsert is monotonic, per entity, in one transaction with its properties, data group rows and
//! history), never write a history row twice, never mix tenants (every key starts with the
//! tenant id), and never decide what to fetch, retry or dead-letter: that is the sync worker's
//! job.

use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde_json::Value;

mod flatten;
pub mod postgres;
pub mod sqlite;
#[cfg(test)]
mod suite;

use crate::config::Settings;
use crate::sqlite::DbError;
pub use postgres::PostgresStore;
pub use sqlite::SqliteStore;

/// The default reporting file inside `store.dir`.
pub const FILE_NAME: &str = "reporting.db";

/// An entity as fetched, in the store's terms (the worker converts from Fenergo's wire type).
#[derive(Debug, Clone, PartialEq)]
pub struct EntitySnapshot {
    pub entity_id: String,
    pub entity_type: Option<String>,
    pub version: i64,
    pub status: Option<String>,
    /// Fenergo's creation time; its original text stays in `json`.
    pub created: Option<DateTime<Utc>>,
    /// The `data` object exactly as returned, with `properties` inside.
    pub json: Value,
}

/// The notification that caused this write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncCause {
    pub notification_id: String,
    pub event_type: Option<String>,
    /// The notification's `When`, where readable (its text stays in the outbox row).
    pub event_when: Option<DateTime<Utc>>,
}

/// What an upsert did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpsertOutcome {
    Inserted,
    Updated {
        previous_version: i64,
    },
    /// This version was already stored; nothing was written.
    Unchanged,
    /// A newer version is stored; nothing was written.
    Older {
        stored_version: i64,
    },
}

impl UpsertOutcome {
    /// Whether this write stored a new version.
    pub fn wrote(self) -> bool {
        matches!(
            self,
            UpsertOutcome::Inserted | UpsertOutcome::Updated { .. }
        )
    }
}

/// What the store holds for an entity, for the worker's stale-read decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredState {
    pub version: i64,
    /// `When` of the notification that last changed the entity.
    pub last_event_when: Option<DateTime<Utc>>,
    pub synced_at: DateTime<Utc>,
}

/// How the sync worker finished with a notification (`sync_log.outcome`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SyncOutcome {
    /// A new version was stored.
    Synced,
    /// We already had that version.
    Unchanged,
    /// Fenergo returned an older version than ours.
    OlderIgnored,
    /// Still not newer after the stale re-fetches.
    StaleAccepted,
    /// Served by the entity's pending confirmation read, not a fetch.
    ConfirmationPending,
    /// A confirmation read found a newer version (notification id `confirm:…`).
    ConfirmedChanged,
    /// The event type is not synced.
    Ignored,
    /// Given up on; `detail` says why.
    Dead,
}

impl SyncOutcome {
    pub const ALL: [SyncOutcome; 8] = [
        SyncOutcome::Synced,
        SyncOutcome::Unchanged,
        SyncOutcome::OlderIgnored,
        SyncOutcome::StaleAccepted,
        SyncOutcome::ConfirmationPending,
        SyncOutcome::ConfirmedChanged,
        SyncOutcome::Ignored,
        SyncOutcome::Dead,
    ];

    /// The stored text.
    pub fn as_str(self) -> &'static str {
        match self {
            SyncOutcome::Synced => "synced",
            SyncOutcome::Unchanged => "unchanged",
            SyncOutcome::OlderIgnored => "older-ignored",
            SyncOutcome::StaleAccepted => "stale-accepted",
            SyncOutcome::ConfirmationPending => "confirmation-pending",
            SyncOutcome::ConfirmedChanged => "confirmed-changed",
            SyncOutcome::Ignored => "ignored",
            SyncOutcome::Dead => "dead",
        }
    }
}

impl std::fmt::Display for SyncOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One finished notification for `sync_log`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessedNotification {
    pub notification_id: String,
    pub event_type: Option<String>,
    pub entity_id: Option<String>,
    pub outcome: SyncOutcome,
    pub attempts: i64,
    pub received_at: DateTime<Utc>,
    pub event_when: Option<DateTime<Utc>>,
    /// Why, for dead letters.
    pub detail: Option<String>,
}

/// Which kind of pass over the entity list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunKind {
    /// `fenx-sync backfill`: fill an empty or incomplete store; resumable.
    Backfill,
    /// The scheduled check that repairs gaps.
    Reconcile,
}

impl RunKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RunKind::Backfill => "backfill",
            RunKind::Reconcile => "reconcile",
        }
    }
}

/// What a run found so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RunCounts {
    pub seen: i64,
    pub added: i64,
    pub updated: i64,
    pub unchanged: i64,
}

/// A backfill or reconciliation run, with the cursor to resume from.
#[derive(Debug, Clone, PartialEq)]
pub struct ReconcileRun {
    pub run_id: i64,
    pub cursor: Option<String>,
    pub total_items: Option<i64>,
    pub counts: RunCounts,
}

/// A confirmation read to make once `due_at` has passed.
#[derive(Debug, Clone, PartialEq)]
pub struct PendingConfirmation {
    pub entity_id: String,
    pub due_at: DateTime<Utc>,
    /// The version the provisional read returned.
    pub read_version: i64,
    /// The newest notification the provisional read served: the cause of a write it leads to.
    pub cause: SyncCause,
    /// When that notification arrived.
    pub received_at: DateTime<Utc>,
    /// Failed confirmation reads so far.
    pub attempts: i64,
}

/// What to record beside an entity read by the sync worker, in the same transaction.
#[derive(Debug, Clone, PartialEq)]
pub enum ReadFollowUp {
    /// The read was provisional: read the entity again at `due_at` (or later, if a
    /// confirmation is already due later).
    Confirm {
        due_at: DateTime<Utc>,
        received_at: DateTime<Utc>,
        /// When the provisional read was taken.
        read_at: DateTime<Utc>,
    },
    /// The read was taken after the window of every notification it served: it confirms the
    /// entity, and any confirmation due by `at` is no longer needed.
    Confirmed { at: DateTime<Utc> },
}

/// How many confirmations are due, and since when.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ConfirmationBacklog {
    pub due: i64,
    pub oldest_due: Option<DateTime<Utc>>,
}

/// A fact the service records (`sync_state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StateKey {
    /// Value: why the identity service refuses the client credentials; since: when it started.
    CredentialsRefused,
    /// Value: when the next scheduled reconciliation is due (RFC 3339).
    ReconcileNextDue,
}

impl StateKey {
    pub fn as_str(self) -> &'static str {
        match self {
            StateKey::CredentialsRefused => "fenergo.credentials_refused",
            StateKey::ReconcileNextDue => "reconcile.next_due_at",
        }
    }
}

/// A recorded fact.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateEntry {
    pub value: String,
    pub since: DateTime<Utc>,
}

/// What a health check of the store found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StoreCheck {
    /// How many times the store was found replaced (SQLite: the file deleted or swapped) and
    /// opened anew since start-up; entities written before are gone from it.
    pub reopened: u64,
}

/// The store's size, for `fenx-sync status` and the benchmarks.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StoreStats {
    /// Entities of this tenant.
    pub entities: i64,
    /// History rows (`entity_version`) of this tenant.
    pub versions: i64,
    /// Bytes the whole store takes (all tenants), indexes included.
    pub bytes: i64,
    /// Bytes of everything but the history (`entity_version` and its indexes).
    pub bytes_without_history: i64,
    /// Indexes a bulk load dropped and has not built again yet ([`ReportingStore::defer_indexes`]).
    pub deferred_indexes: Vec<String>,
}

/// The indexes a bulk load into an empty store builds at its end instead of row by row: the two
/// whose keys are property values. The others grow at their ends (their keys lead with
/// low-cardinality columns), are empty during a first load (`entity_with_previous`), or are
/// the keys the upsert itself looks up.
pub const BULK_LOAD_INDEXES: [&str; 2] = ["entity_by_date_of_birth", "entity_property_by_number"];

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("cannot create the reporting store directory {path}: {source}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: cannot {action}: {source}")]
    Sqlite {
        path: PathBuf,
        action: String,
        #[source]
        source: rusqlite::Error,
    },
    #[error("{what} is not supported by the {backend} reporting store")]
    Unsupported {
        what: &'static str,
        backend: &'static str,
    },
    #[error("a blocking store task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
    #[error(transparent)]
    Postgres(#[from] postgres::PgError),
}

/// The reporting store's interface. Every method is one transaction (or none).
#[async_trait]
pub trait ReportingStore: Send + Sync {
    /// Where the store is, for logs and `fenx-sync status` (never a password).
    fn describe(&self) -> String;

    /// Stores `entity` if its version is newer than the stored one: the entity row, its
    /// flattened properties and data group rows, and a history row, with `follow_up` (a
    /// worker's read) recorded in the same transaction. An equal or older version writes no
    /// entity rows.
    async fn store_read(
        &self,
        entity: &EntitySnapshot,
        cause: &SyncCause,
        follow_up: Option<&ReadFollowUp>,
    ) -> Result<UpsertOutcome, StoreError>;

    /// [`store_read`](Self::store_read) without a follow-up.
    async fn upsert_entity(
        &self,
        entity: &EntitySnapshot,
        cause: &SyncCause,
    ) -> Result<UpsertOutcome, StoreError> {
        self.store_read(entity, cause, None).await
    }

    /// Many entities in one transaction (a page of a backfill), each by the monotonic rule.
    async fn upsert_entities(
        &self,
        entities: &[EntitySnapshot],
        cause: &SyncCause,
    ) -> Result<Vec<UpsertOutcome>, StoreError>;

    /// The stored version of an entity and the event that produced it; `None` if never stored.
    async fn stored_state(&self, entity_id: &str) -> Result<Option<StoredState>, StoreError>;

    /// Logs finished notifications in one transaction. A notification logged again (a replay
    /// after a crash, or a delivery to another instance) replaces its earlier row.
    async fn record_processed(&self, records: &[ProcessedNotification]) -> Result<(), StoreError>;

    /// Lets the pending confirmation of `entity_id` serve a newer notification instead of a
    /// fetch, if its provisional read was taken after `read_after`: its due time moves to at
    /// least `due_at`, with `cause` (received at `received_at`) as the cause of what it writes.
    /// Returns whether it did; `false` (nothing pending, or too old) means fetch.
    async fn defer_to_confirmation(
        &self,
        entity_id: &str,
        read_after: DateTime<Utc>,
        due_at: DateTime<Utc>,
        cause: &SyncCause,
        received_at: DateTime<Utc>,
    ) -> Result<bool, StoreError>;

    /// Up to `limit` confirmations due by `now`, the longest overdue first.
    async fn due_confirmations(
        &self,
        now: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<PendingConfirmation>, StoreError>;

    /// How many confirmations are due by `now`, and the oldest due time.
    async fn confirmation_backlog(
        &self,
        now: DateTime<Utc>,
    ) -> Result<ConfirmationBacklog, StoreError>;

    /// Stores what confirmation reads returned, each with its confirmation's cause and by the
    /// monotonic rule, marks the entities confirmed at `at`, and closes the confirmations
    /// (unless a newer provisional read moved one meanwhile), in one transaction.
    async fn confirm(
        &self,
        reads: &[(PendingConfirmation, EntitySnapshot)],
        at: DateTime<Utc>,
    ) -> Result<Vec<UpsertOutcome>, StoreError>;

    /// A confirmation read failed: try again at `retry_at`.
    async fn postpone_confirmation(
        &self,
        pending: &PendingConfirmation,
        retry_at: DateTime<Utc>,
    ) -> Result<(), StoreError>;

    /// Gives a confirmation up (the entity is no longer readable, or it failed too often).
    async fn drop_confirmation(&self, pending: &PendingConfirmation) -> Result<(), StoreError>;

    /// Confirmations not made yet, due or not.
    async fn pending_confirmations(&self) -> Result<i64, StoreError>;

    /// Records `value` for `key`, first true at `since`.
    async fn put_state(
        &self,
        key: StateKey,
        value: &str,
        since: DateTime<Utc>,
    ) -> Result<(), StoreError>;

    async fn clear_state(&self, key: StateKey) -> Result<(), StoreError>;

    async fn state(&self, key: StateKey) -> Result<Option<StateEntry>, StoreError>;

    /// `key`'s recorded value for every tenant in the store (for `fenx-sync status`, which may
    /// run without a tenant configured), by tenant id.
    async fn state_of_every_tenant(
        &self,
        key: StateKey,
    ) -> Result<Vec<(String, StateEntry)>, StoreError>;

    /// The unfinished run of `kind` to resume, if any.
    async fn running_reconcile(&self, kind: RunKind) -> Result<Option<ReconcileRun>, StoreError>;

    /// Starts a run of `kind`; earlier unfinished runs of that kind are closed.
    async fn start_reconcile(&self, kind: RunKind) -> Result<ReconcileRun, StoreError>;

    /// Saves a run's progress after a page was stored, or marks it finished.
    async fn save_reconcile(&self, run: &ReconcileRun, finished: bool) -> Result<(), StoreError>;

    /// Records that run `run_id` listed these entities: they are not absent.
    async fn mark_listed(&self, run_id: i64, entity_ids: &[String]) -> Result<(), StoreError>;

    /// After run `run_id` walked the whole list: marks `absent_since` on stored entities it did
    /// not list (never deleting them), except those first written after the run started.
    /// Returns how many were newly marked.
    async fn mark_absent(&self, run_id: i64) -> Result<u64, StoreError>;

    /// When the last run of `kind` started, if there was one.
    async fn last_run_started(&self, kind: RunKind) -> Result<Option<DateTime<Utc>>, StoreError>;

    /// Deletes history rows stored before `before`, except each entity's current version.
    /// Returns how many were deleted.
    async fn prune_history(&self, before: DateTime<Utc>) -> Result<u64, StoreError>;

    /// Refreshes the query planner's statistics (`ANALYZE`; PostgreSQL also vacuums `entity`
    /// for index-only scans), after a pass that wrote much of the store: without them a freshly
    /// filled store's planner guesses, and may scan a million entity rows where an index finds a
    /// few thousand.
    async fn refresh_statistics(&self) -> Result<(), StoreError>;

    /// Before a bulk load: when the store holds no entities of any tenant, drops the
    /// [`BULK_LOAD_INDEXES`], recording each one's definition in `deferred_index`, and returns
    /// their names; a store with entities keeps them (and `[]` is returned). Their keys are
    /// property values, so each insert into one dirties a page at random: building them once
    /// after the load costs a fraction of keeping them up row by row.
    async fn defer_indexes(&self) -> Result<Vec<String>, StoreError>;

    /// Creates every index recorded in `deferred_index` (by this instance or another), one
    /// transaction each, and returns their names; `[]` when none is deferred.
    async fn build_deferred_indexes(&self) -> Result<Vec<String>, StoreError>;

    /// The indexes recorded in `deferred_index`.
    async fn deferred_indexes(&self) -> Result<Vec<String>, StoreError>;

    /// Proves the store answers (and, for SQLite, that the path still names the open file).
    async fn check(&self) -> Result<StoreCheck, StoreError>;

    /// How big the store is.
    async fn stats(&self) -> Result<StoreStats, StoreError>;

    /// Lets `role` read every reporting table and view (PostgreSQL only).
    async fn grant_read(&self, role: &str) -> Result<(), StoreError>;
}

/// Opens the reporting store the settings name if it exists already (for `fenx-sync status`,
/// which never creates one): `None` when the SQLite file is not there.
pub async fn open_existing(
    settings: &Settings,
) -> Result<Option<Arc<dyn ReportingStore>>, StoreError> {
    if settings.store.reporting_url.is_none() && !settings.store.reporting_path().exists() {
        return Ok(None);
    }
    open(settings).await.map(Some)
}

/// Opens the reporting store the settings name (PostgreSQL when `store.reporting_url` is set,
/// else the SQLite file), creating or migrating its schema; fails when it cannot (the admin
/// commands' way: say so and stop).
pub async fn open(settings: &Settings) -> Result<Arc<dyn ReportingStore>, StoreError> {
    if let Some(target) = postgres::Target::of(&settings.store) {
        let store = PostgresStore::open(&target, &settings.fenergo.tenant_id).await?;
        return Ok(Arc::new(store));
    }
    open_sqlite(settings).await
}

/// [`open`] for the running service, which must keep ingesting while a network database is
/// unreachable: a PostgreSQL store that cannot be reached yet is returned anyway (with an
/// ERROR) and migrates on its first successful call. A database newer than this build, or a
/// SQLite file that cannot be opened, still fails.
pub async fn open_for_service(settings: &Settings) -> Result<Arc<dyn ReportingStore>, StoreError> {
    if let Some(target) = postgres::Target::of(&settings.store) {
        let store = PostgresStore::lazy(&target, &settings.fenergo.tenant_id)?;
        match store.migrate().await {
            Ok(_) => {}
            Err(error @ StoreError::Postgres(postgres::PgError::SchemaTooNew { .. })) => {
                return Err(error);
            }
            Err(error) => tracing::error!(
                %error,
                "the reporting store is unavailable at start-up; webhooks are still stored, and sync starts once it answers"
            ),
        }
        return Ok(Arc::new(store));
    }
    open_sqlite(settings).await
}

async fn open_sqlite(settings: &Settings) -> Result<Arc<dyn ReportingStore>, StoreError> {
    let tenant = settings.fenergo.tenant_id.clone();
    let path = settings.store.reporting_path();
    let store = tokio::task::spawn_blocking(move || SqliteStore::open(&path, &tenant)).await??;
    Ok(Arc::new(store))
}
