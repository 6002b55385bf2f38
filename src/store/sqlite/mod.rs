//! The SQLite reporting store (`reporting.db`, the default): the [`ReportingStore`] interface
//! over one file, schema section `reporting` of `schema.sql`. Entity writes are in `entities.rs`,
//! confirmations in `confirmations.rs`, a bulk load's deferred indexes in `indexes.rs`, the
//! processing log, runs and recorded state in `records.rs`.
//!
//! It must never write into a file that is no longer `reporting.db` (every use first compares
//! the path's device and inode with the file it opened, and reopens with an ERROR when it was
//! deleted or replaced; re-syncing a reopened store is the reporting store watch's, in
//! `lib.rs`), never hold its connection across an `.await` (every call runs on a blocking
//! thread), and never touch another tenant's rows.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use rusqlite::Connection;

mod confirmations;
mod entities;
mod indexes;
mod records;

use super::{
    ConfirmationBacklog, EntitySnapshot, PendingConfirmation, ProcessedNotification, ReadFollowUp,
    ReconcileRun, ReportingStore, RunKind, StateEntry, StateKey, StoreCheck, StoreError,
    StoreStats, StoredState, SyncCause, UpsertOutcome,
};
use crate::sqlite::{self, Durability, FileIdentity, PageSize};

const SECTION: &str = "reporting";

/// Readers never block the writer in WAL mode; this only covers another writer on the same file,
/// such as a second fenx-sync process or an operator's tool.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Page cache of the store's connection. SQLite's default 2 MiB holds a few hundred of its 16 KiB
/// pages, so once a backfill has grown the value indexes past that every insert into them reads
/// its page back from the OS; allocated only as pages are used.
const CACHE_KIB: i64 = 32 * 1024;

/// The reporting file. Cheap to clone: clones share one connection.
#[derive(Clone)]
pub struct SqliteStore {
    inner: Arc<Inner>,
}

/// One connection behind a mutex: SQLite admits one writer at a time anyway, and callers run on
/// blocking threads.
struct Inner {
    conn: Mutex<Connection>,
    /// The device and inode of the file `conn` has open; guarded by `conn`'s lock.
    identity: Mutex<Option<FileIdentity>>,
    path: PathBuf,
    tenant: String,
    reopened: AtomicU64,
}

impl SqliteStore {
    /// Opens (creating it and its directory if needed) the reporting file in WAL mode with
    /// `synchronous=NORMAL` (everything in it can be re-fetched), and applies its schema; rows
    /// are read and written as `tenant`'s (and an older file's rows are taken as `tenant`'s).
    pub fn open(path: &Path, tenant: &str) -> Result<SqliteStore, StoreError> {
        let (conn, identity) = open_file(path, tenant)?;
        Ok(SqliteStore {
            inner: Arc::new(Inner {
                conn: Mutex::new(conn),
                identity: Mutex::new(identity),
                path: path.to_owned(),
                tenant: tenant.to_owned(),
                reopened: AtomicU64::new(0),
            }),
        })
    }

    /// Runs `f` on a blocking thread: SQLite calls block.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Inner) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || f(&inner)).await?
    }
}

impl Inner {
    /// The connection, to the file the path names now. A panic while the lock was held cannot
    /// have left a transaction open (dropping one rolls it back), so a poisoned lock still
    /// guards a usable connection.
    fn lock(&self) -> MutexGuard<'_, Connection> {
        let mut conn = self.conn.lock().unwrap_or_else(PoisonError::into_inner);
        self.follow_path(&mut conn);
        conn
    }

    /// One `stat`: if the path no longer names the open file, close it and open the path again
    /// (a new, empty store if the file was deleted), so writes never vanish into an unlinked
    /// inode.
    fn follow_path(&self, conn: &mut Connection) {
        let mut identity = self.identity.lock().unwrap_or_else(PoisonError::into_inner);
        let what_happened = match (FileIdentity::of(&self.path), *identity) {
            (Ok(now), Some(opened)) if now == opened => return,
            (Ok(now), None) => {
                *identity = Some(now);
                return;
            }
            (Ok(_), Some(_)) => "replaced by another file",
            (Err(error), _) if error.kind() == std::io::ErrorKind::NotFound => "deleted",
            (Err(error), _) => {
                tracing::warn!(%error, path = %self.path.display(), "cannot check the reporting store file");
                return;
            }
        };
        // Close first: the old connection checkpoints into, and removes, its own WAL, which must
        // not be replayed into the new file.
        match Connection::open_in_memory() {
            Ok(placeholder) => drop(std::mem::replace(conn, placeholder)),
            Err(error) => tracing::warn!(%error, "cannot close the old reporting store first"),
        }
        match open_file(&self.path, &self.tenant) {
            Ok((reopened, opened)) => {
                *conn = reopened;
                *identity = opened;
                self.reopened.fetch_add(1, AtomicOrdering::Relaxed);
                tracing::error!(
                    path = %self.path.display(),
                    "the reporting store was {what_happened} while fenx-sync was running; opened {} again",
                    self.path.display()
                );
            }
            Err(error) => {
                *identity = FileIdentity::of(&self.path).ok();
                tracing::error!(
                    %error,
                    path = %self.path.display(),
                    "the reporting store was {what_happened} while fenx-sync was running and cannot be opened again"
                );
            }
        }
    }

    fn error(&self, action: String, source: rusqlite::Error) -> StoreError {
        StoreError::Sqlite {
            path: self.path.clone(),
            action,
            source,
        }
    }
}

/// Opens `path` (creating it and its directory) with its schema, and says which file it is.
fn open_file(path: &Path, tenant: &str) -> Result<(Connection, Option<FileIdentity>), StoreError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|source| StoreError::CreateDir {
            path: dir.to_owned(),
            source,
        })?;
    }
    let mut conn = sqlite::open(path, Durability::Normal, PageSize::Large, BUSY_TIMEOUT)?;
    conn.pragma_update(None, "cache_size", -CACHE_KIB)
        .map_err(|source| StoreError::Sqlite {
            path: path.to_owned(),
            action: "set the page cache size".into(),
            source,
        })?;
    // Upgrade 3 files an older file's rows under the configured tenant.
    conn.execute(
        "CREATE TEMP TABLE IF NOT EXISTS migration_tenant (tenant_id TEXT NOT NULL)",
        [],
    )
    .and_then(|_| conn.execute("DELETE FROM migration_tenant", []))
    .and_then(|_| conn.execute("INSERT INTO migration_tenant VALUES (?1)", [tenant]))
    .map_err(|source| StoreError::Sqlite {
        path: path.to_owned(),
        action: "prepare the schema upgrade".into(),
        source,
    })?;
    sqlite::apply_schema_then(&mut conn, path, SECTION, |tx, found| {
        if found.is_some_and(|v| v < 4) {
            entities::flatten_all(tx)?;
        }
        Ok(())
    })?;
    Ok((conn, FileIdentity::of(path).ok()))
}

/// Reads a time this store wrote ([`crate::time::format`]); anything else reads as the epoch.
fn read_time(text: String) -> DateTime<Utc> {
    crate::time::parse(&text).unwrap_or_default()
}

#[async_trait]
impl ReportingStore for SqliteStore {
    fn describe(&self) -> String {
        format!("SQLite {}", self.inner.path.display())
    }

    async fn store_read(
        &self,
        entity: &EntitySnapshot,
        cause: &SyncCause,
        follow_up: Option<&ReadFollowUp>,
    ) -> Result<UpsertOutcome, StoreError> {
        let (entity, cause, follow_up) = (entity.clone(), cause.clone(), follow_up.cloned());
        self.blocking(move |s| s.store_read(&entity, &cause, follow_up.as_ref()))
            .await
    }

    async fn upsert_entities(
        &self,
        entities: &[EntitySnapshot],
        cause: &SyncCause,
    ) -> Result<Vec<UpsertOutcome>, StoreError> {
        let (entities, cause) = (entities.to_vec(), cause.clone());
        self.blocking(move |s| s.upsert_entities(&entities, &cause))
            .await
    }

    async fn stored_state(&self, entity_id: &str) -> Result<Option<StoredState>, StoreError> {
        let id = entity_id.to_owned();
        self.blocking(move |s| s.stored_state(&id)).await
    }

    async fn record_processed(&self, records: &[ProcessedNotification]) -> Result<(), StoreError> {
        if records.is_empty() {
            return Ok(());
        }
        let records = records.to_vec();
        self.blocking(move |s| s.record_processed(&records)).await
    }

    async fn defer_to_confirmation(
        &self,
        entity_id: &str,
        read_after: DateTime<Utc>,
        due_at: DateTime<Utc>,
        cause: &SyncCause,
        received_at: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        let (id, cause) = (entity_id.to_owned(), cause.clone());
        self.blocking(move |s| {
            s.defer_to_confirmation(&id, read_after, due_at, &cause, received_at)
        })
        .await
    }

    async fn due_confirmations(
        &self,
        now: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<PendingConfirmation>, StoreError> {
        self.blocking(move |s| s.due_confirmations(now, limit))
            .await
    }

    async fn confirmation_backlog(
        &self,
        now: DateTime<Utc>,
    ) -> Result<ConfirmationBacklog, StoreError> {
        self.blocking(move |s| s.confirmation_backlog(now)).await
    }

    async fn confirm(
        &self,
        reads: &[(PendingConfirmation, EntitySnapshot)],
        at: DateTime<Utc>,
    ) -> Result<Vec<UpsertOutcome>, StoreError> {
        let reads = reads.to_vec();
        self.blocking(move |s| s.confirm(&reads, at)).await
    }

    async fn postpone_confirmation(
        &self,
        pending: &PendingConfirmation,
        retry_at: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let pending = pending.clone();
        self.blocking(move |s| s.postpone_confirmation(&pending, retry_at))
            .await
    }

    async fn drop_confirmation(&self, pending: &PendingConfirmation) -> Result<(), StoreError> {
        let pending = pending.clone();
        self.blocking(move |s| s.drop_confirmation(&pending)).await
    }

    async fn pending_confirmations(&self) -> Result<i64, StoreError> {
        self.blocking(Inner::pending_confirmations).await
    }

    async fn put_state(
        &self,
        key: StateKey,
        value: &str,
        since: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let value = value.to_owned();
        self.blocking(move |s| s.put_state(key, &value, since))
            .await
    }

    async fn clear_state(&self, key: StateKey) -> Result<(), StoreError> {
        self.blocking(move |s| s.clear_state(key)).await
    }

    async fn state(&self, key: StateKey) -> Result<Option<StateEntry>, StoreError> {
        self.blocking(move |s| s.state(key)).await
    }

    async fn state_of_every_tenant(
        &self,
        key: StateKey,
    ) -> Result<Vec<(String, StateEntry)>, StoreError> {
        self.blocking(move |s| s.state_of_every_tenant(key)).await
    }

    async fn running_reconcile(&self, kind: RunKind) -> Result<Option<ReconcileRun>, StoreError> {
        self.blocking(move |s| s.running_reconcile(kind)).await
    }

    async fn start_reconcile(&self, kind: RunKind) -> Result<ReconcileRun, StoreError> {
        self.blocking(move |s| s.start_reconcile(kind)).await
    }

    async fn save_reconcile(&self, run: &ReconcileRun, finished: bool) -> Result<(), StoreError> {
        let run = run.clone();
        self.blocking(move |s| s.save_reconcile(&run, finished))
            .await
    }

    async fn mark_listed(&self, run_id: i64, entity_ids: &[String]) -> Result<(), StoreError> {
        let ids = entity_ids.to_vec();
        self.blocking(move |s| s.mark_listed(run_id, &ids)).await
    }

    async fn mark_absent(&self, run_id: i64) -> Result<u64, StoreError> {
        self.blocking(move |s| s.mark_absent(run_id)).await
    }

    async fn last_run_started(&self, kind: RunKind) -> Result<Option<DateTime<Utc>>, StoreError> {
        self.blocking(move |s| s.last_run_started(kind)).await
    }

    async fn prune_history(&self, before: DateTime<Utc>) -> Result<u64, StoreError> {
        self.blocking(move |s| s.prune_history(before)).await
    }

    async fn refresh_statistics(&self) -> Result<(), StoreError> {
        self.blocking(|s| {
            // Sampled first (the first rows of each index: enough to tell that tenant_id has few
            // values, so a lookup by entity id alone skip-scans the keys), then exact for entity,
            // whose indexes the planner must choose between. An exact ANALYZE of the whole file
            // reads every property row, holding the write lock all the while.
            s.lock()
                .execute_batch(
                    "PRAGMA analysis_limit = 1000; ANALYZE;
                     PRAGMA analysis_limit = 0; ANALYZE entity;",
                )
                .map_err(|source| s.error("refresh the query planner's statistics".into(), source))
        })
        .await
    }

    async fn defer_indexes(&self) -> Result<Vec<String>, StoreError> {
        self.blocking(Inner::defer_indexes).await
    }

    async fn build_deferred_indexes(&self) -> Result<Vec<String>, StoreError> {
        self.blocking(Inner::build_deferred_indexes).await
    }

    async fn deferred_indexes(&self) -> Result<Vec<String>, StoreError> {
        self.blocking(Inner::list_deferred_indexes).await
    }

    async fn check(&self) -> Result<StoreCheck, StoreError> {
        self.blocking(|s| {
            drop(s.lock());
            Ok(StoreCheck {
                reopened: s.reopened.load(AtomicOrdering::Relaxed),
            })
        })
        .await
    }

    async fn stats(&self) -> Result<StoreStats, StoreError> {
        self.blocking(Inner::stats).await
    }

    async fn grant_read(&self, _role: &str) -> Result<(), StoreError> {
        Err(StoreError::Unsupported {
            what: "granting a database role read access (give the reader the file instead)",
            backend: "SQLite",
        })
    }
}

#[cfg(test)]
mod tests;
