//! The reporting store (`reporting.db`): the latest version of every synced entity, flattened
//! for plain SQL, the history of every version stored, and the log of processed notifications;
//! the pending confirmation reads (`confirmations.rs`) and the service's recorded state
//! (`state.rs`). `schema.sql` (section `reporting`) documents every table, column and view.
//!
//! It must never let an older or equal version overwrite what is stored, never leave an entity
//! half-written (each upsert is one transaction), never write into a file that is no longer
//! `reporting.db` (every use first compares the path's device and inode with the file it opened,
//! and reopens with an ERROR when it was deleted or replaced), and never decide what to fetch,
//! retry or dead-letter: that is the sync worker's job (and re-syncing a reopened store is the
//! reporting store watch's, in `lib.rs`).

use std::cmp::Ordering;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use serde_json::Value;

mod confirmations;
mod flatten;
mod state;

use crate::sqlite::{self, DbError, Durability, FileIdentity};
pub use confirmations::{ConfirmationBacklog, PendingConfirmation, ReadFollowUp};
use flatten::{CollectionRow, PropertyRow, flatten};
pub use state::{StateEntry, StateKey};

/// The default reporting file inside `store.dir`.
pub const FILE_NAME: &str = "reporting.db";

const SECTION: &str = "reporting";

/// Readers never block the writer in WAL mode; this only covers another writer on the same file,
/// such as a second fenx-sync process or an operator's tool.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// An entity as fetched, in the store's terms (the worker converts from Fenergo's wire type).
#[derive(Debug, Clone, PartialEq)]
pub struct EntitySnapshot {
    pub entity_id: String,
    pub entity_type: Option<String>,
    pub version: i64,
    pub status: Option<String>,
    pub created: Option<String>,
    /// The `data` object exactly as returned, with `properties` inside.
    pub json: Value,
}

/// The notification that caused this write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncCause {
    pub notification_id: String,
    pub event_type: Option<String>,
    /// The notification's `When`, as sent.
    pub event_when: Option<String>,
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

/// What the store holds for an entity, for the worker's stale-read decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredState {
    pub version: i64,
    /// `When` of the notification that last changed the entity, as sent.
    pub last_event_when: Option<String>,
    pub synced_at: String,
}

/// One finished notification for `sync_log`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessedNotification {
    pub notification_id: String,
    pub event_type: Option<String>,
    pub entity_id: Option<String>,
    /// `synced`, `unchanged`, `older-ignored`, `stale-accepted`, `confirmation-pending`,
    /// `confirmed-changed`, `ignored` or `dead`.
    pub outcome: String,
    pub attempts: i64,
    pub received_at: String,
    pub event_when: Option<String>,
    /// Why, for dead letters.
    pub detail: Option<String>,
}

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
}

/// The reporting database. One connection behind a mutex: SQLite admits one writer at a time
/// anyway, and callers run on blocking threads.
pub struct ReportingStore {
    conn: Mutex<Connection>,
    /// The device and inode of the file `conn` has open; guarded by `conn`'s lock.
    identity: Mutex<Option<FileIdentity>>,
    path: PathBuf,
    reopened: AtomicU64,
}

impl ReportingStore {
    /// Opens (creating it and its directory if needed) the reporting file in WAL mode with
    /// `synchronous=NORMAL` (everything in it can be re-fetched), and applies its schema.
    pub fn open(path: &Path) -> Result<ReportingStore, StoreError> {
        let (conn, identity) = open_file(path)?;
        Ok(ReportingStore {
            conn: Mutex::new(conn),
            identity: Mutex::new(identity),
            path: path.to_owned(),
            reopened: AtomicU64::new(0),
        })
    }

    /// How many times the file was found deleted or replaced and reopened.
    pub fn reopened(&self) -> u64 {
        self.reopened.load(AtomicOrdering::Relaxed)
    }

    /// Checks that the path still names the file in use (reopening it if not, as every other
    /// call does first); returns [`reopened`](Self::reopened).
    pub fn ensure_present(&self) -> u64 {
        drop(self.lock());
        self.reopened()
    }

    /// Stores `entity` if its version is newer than the stored one: the entity row, its
    /// flattened properties and data group rows, and a history row, all in one transaction.
    /// An equal or older version writes nothing at all.
    pub fn upsert_entity(
        &self,
        entity: &EntitySnapshot,
        cause: &SyncCause,
    ) -> Result<UpsertOutcome, StoreError> {
        let outcomes = self.upsert_entities(std::slice::from_ref(entity), cause)?;
        Ok(outcomes[0])
    }

    /// [`upsert_entity`](Self::upsert_entity) for many entities in one transaction (a page of a
    /// backfill), with the same monotonic rule for each.
    pub fn upsert_entities(
        &self,
        entities: &[EntitySnapshot],
        cause: &SyncCause,
    ) -> Result<Vec<UpsertOutcome>, StoreError> {
        // Pure work outside the lock, so concurrent workers only queue for the SQL itself.
        let prepared: Vec<Prepared> = entities.iter().map(Prepared::of).collect();
        let rows: Vec<Flattened> = prepared.iter().map(Prepared::rows).collect();
        upsert(&mut self.lock(), entities, cause, &rows).map_err(|source| {
            let what = match entities {
                [one] => format!("store entity {} version {}", one.entity_id, one.version),
                many => format!("store {} entities", many.len()),
            };
            self.error(what, source)
        })
    }

    /// The stored version of an entity and the event that produced it; `None` if never stored.
    pub fn stored_state(&self, entity_id: &str) -> Result<Option<StoredState>, StoreError> {
        self.lock()
            .prepare_cached(
                "SELECT version, last_event_when, synced_at FROM entity WHERE entity_id = ?1",
            )
            .and_then(|mut select| {
                select
                    .query_row([entity_id], |r| {
                        Ok(StoredState {
                            version: r.get(0)?,
                            last_event_when: r.get(1)?,
                            synced_at: r.get(2)?,
                        })
                    })
                    .optional()
            })
            .map_err(|source| self.error(format!("read entity {entity_id}"), source))
    }

    /// Logs finished notifications in one transaction. A notification logged again (a replay
    /// after a crash) replaces its earlier row.
    pub fn record_processed(&self, records: &[ProcessedNotification]) -> Result<(), StoreError> {
        self.record_processed_at(records, &crate::time::now())
    }

    fn record_processed_at(
        &self,
        records: &[ProcessedNotification],
        processed_at: &str,
    ) -> Result<(), StoreError> {
        if records.is_empty() {
            return Ok(());
        }
        log_processed(&mut self.lock(), records, processed_at).map_err(|source| {
            self.error(
                format!("log {} processed notifications", records.len()),
                source,
            )
        })
    }

    /// The unfinished run of `kind` to resume, if any.
    pub fn running_reconcile(&self, kind: RunKind) -> Result<Option<ReconcileRun>, StoreError> {
        self.lock()
            .query_row(
                "SELECT run_id, cursor, total_items, seen, added, updated, unchanged FROM reconcile_run
                  WHERE kind = ?1 AND status = 'running' ORDER BY run_id DESC LIMIT 1",
                [kind.as_str()],
                |r| {
                    Ok(ReconcileRun {
                        run_id: r.get(0)?,
                        cursor: r.get(1)?,
                        total_items: r.get(2)?,
                        counts: RunCounts {
                            seen: r.get(3)?,
                            added: r.get(4)?,
                            updated: r.get(5)?,
                            unchanged: r.get(6)?,
                        },
                    })
                },
            )
            .optional()
            .map_err(|source| self.error(format!("read the running {} run", kind.as_str()), source))
    }

    /// Starts a run of `kind`; earlier unfinished runs of that kind are closed.
    pub fn start_reconcile(&self, kind: RunKind) -> Result<ReconcileRun, StoreError> {
        let now = crate::time::now();
        let mut conn = self.lock();
        let start = |conn: &mut Connection| -> rusqlite::Result<i64> {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            tx.execute(
                "UPDATE reconcile_run SET status = 'finished', finished_at = ?2
                  WHERE kind = ?1 AND status = 'running'",
                (kind.as_str(), &now),
            )?;
            tx.execute(
                "INSERT INTO reconcile_run (kind, status, started_at, updated_at) VALUES (?1, 'running', ?2, ?2)",
                (kind.as_str(), &now),
            )?;
            let id = tx.last_insert_rowid();
            tx.commit()?;
            Ok(id)
        };
        let run_id = start(&mut conn)
            .map_err(|source| self.error(format!("start a {} run", kind.as_str()), source))?;
        Ok(ReconcileRun {
            run_id,
            cursor: None,
            total_items: None,
            counts: RunCounts::default(),
        })
    }

    /// Saves a run's progress after a page was stored, or marks it finished.
    pub fn save_reconcile(&self, run: &ReconcileRun, finished: bool) -> Result<(), StoreError> {
        let now = crate::time::now();
        let c = &run.counts;
        self.lock()
            .execute(
                "UPDATE reconcile_run SET cursor = ?2, total_items = ?3, seen = ?4, added = ?5,
                        updated = ?6, unchanged = ?7, updated_at = ?8,
                        status = CASE WHEN ?9 THEN 'finished' ELSE 'running' END,
                        finished_at = CASE WHEN ?9 THEN ?8 END
                  WHERE run_id = ?1",
                rusqlite::params![
                    run.run_id,
                    run.cursor,
                    run.total_items,
                    c.seen,
                    c.added,
                    c.updated,
                    c.unchanged,
                    now,
                    finished
                ],
            )
            .map(drop)
            .map_err(|source| self.error(format!("save run {}", run.run_id), source))
    }

    /// Records that run `run_id` listed these entities: they are not absent.
    pub fn mark_listed(&self, run_id: i64, entity_ids: &[String]) -> Result<(), StoreError> {
        let mut conn = self.lock();
        let mark = |conn: &mut Connection| -> rusqlite::Result<()> {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let mut update = tx.prepare_cached(
                "UPDATE entity SET last_listed_run = ?1, absent_since = NULL WHERE entity_id = ?2",
            )?;
            for id in entity_ids {
                update.execute(params![run_id, id])?;
            }
            drop(update);
            tx.commit()
        };
        mark(&mut conn)
            .map_err(|source| self.error(format!("mark run {run_id}'s entities listed"), source))
    }

    /// After run `run_id` walked the whole list: marks `absent_since` on stored entities it did
    /// not list (never deleting them), except those first written after the run started (the
    /// list may not show them yet). Returns how many were newly marked.
    pub fn mark_absent(&self, run_id: i64) -> Result<usize, StoreError> {
        self.lock()
            .execute(
                "UPDATE entity SET absent_since = ?2
                  WHERE absent_since IS NULL
                    AND (last_listed_run IS NULL OR last_listed_run <> ?1)
                    AND synced_at <= (SELECT started_at FROM reconcile_run WHERE run_id = ?1)",
                params![run_id, crate::time::now()],
            )
            .map_err(|source| {
                self.error(format!("mark entities run {run_id} did not list"), source)
            })
    }

    /// When the last run of `kind` started, if there was one.
    pub fn last_run_started(
        &self,
        kind: RunKind,
    ) -> Result<Option<chrono::DateTime<chrono::Utc>>, StoreError> {
        self.lock()
            .query_row(
                "SELECT max(started_at) FROM reconcile_run WHERE kind = ?1",
                [kind.as_str()],
                |r| r.get::<_, Option<String>>(0),
            )
            .map(|started| started.and_then(|s| s.parse().ok()))
            .map_err(|source| self.error(format!("read the last {} run", kind.as_str()), source))
    }

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
        match open_file(&self.path) {
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
fn open_file(path: &Path) -> Result<(Connection, Option<FileIdentity>), StoreError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|source| StoreError::CreateDir {
            path: dir.to_owned(),
            source,
        })?;
    }
    let mut conn = sqlite::open(path, Durability::Normal, BUSY_TIMEOUT)?;
    sqlite::apply_schema(&mut conn, path, SECTION)?;
    Ok((conn, FileIdentity::of(path).ok()))
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

/// An entity's JSON text and flattened rows, computed before the write lock is taken.
struct Prepared {
    json: String,
    properties: Vec<PropertyRow>,
    collections: Vec<CollectionRow>,
}

impl Prepared {
    fn of(entity: &EntitySnapshot) -> Prepared {
        let (properties, collections) =
            flatten(entity.json.get("properties").unwrap_or(&Value::Null));
        Prepared {
            json: entity.json.to_string(),
            properties,
            collections,
        }
    }

    fn rows(&self) -> Flattened<'_> {
        Flattened {
            json: &self.json,
            properties: &self.properties,
            collections: &self.collections,
        }
    }
}

/// An entity's rows, prepared before the write lock is taken.
struct Flattened<'a> {
    json: &'a str,
    properties: &'a [PropertyRow],
    collections: &'a [CollectionRow],
}

fn upsert(
    conn: &mut Connection,
    entities: &[EntitySnapshot],
    cause: &SyncCause,
    rows: &[Flattened],
) -> rusqlite::Result<Vec<UpsertOutcome>> {
    // IMMEDIATE: the version check and the write must see the same state, and a deferred
    // transaction upgrading to a writer would fail at once instead of waiting for the lock.
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let now = crate::time::now();
    let outcomes = entities
        .iter()
        .zip(rows)
        .map(|(entity, rows)| write_entity(&tx, entity, cause, rows, &now))
        .collect::<rusqlite::Result<_>>()?;
    tx.commit()?;
    Ok(outcomes)
}

/// Writes one entity inside `tx` if its version is newer than the stored one.
fn write_entity(
    tx: &rusqlite::Transaction<'_>,
    entity: &EntitySnapshot,
    cause: &SyncCause,
    rows: &Flattened,
    now: &str,
) -> rusqlite::Result<UpsertOutcome> {
    let id = &entity.entity_id;
    let stored: Option<i64> = tx
        .prepare_cached("SELECT version FROM entity WHERE entity_id = ?1")?
        .query_row([id], |r| r.get(0))
        .optional()?;
    let outcome = match stored.map(|v| (v, v.cmp(&entity.version))) {
        None => UpsertOutcome::Inserted,
        Some((previous_version, Ordering::Less)) => UpsertOutcome::Updated { previous_version },
        Some((_, Ordering::Equal)) => return Ok(UpsertOutcome::Unchanged),
        Some((stored_version, Ordering::Greater)) => {
            return Ok(UpsertOutcome::Older { stored_version });
        }
    };
    // An update keeps confirmed_at and last_listed_run (they describe reads, not versions); a
    // write proves the entity exists, so it is no longer absent.
    tx.prepare_cached(
        "INSERT INTO entity (entity_id, entity_type, version, status, created, json,
             last_notification_id, last_event_type, last_event_when, synced_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)
         ON CONFLICT (entity_id) DO UPDATE SET entity_type = excluded.entity_type,
             version = excluded.version, status = excluded.status, created = excluded.created,
             json = excluded.json, last_notification_id = excluded.last_notification_id,
             last_event_type = excluded.last_event_type,
             last_event_when = excluded.last_event_when, synced_at = excluded.synced_at,
             absent_since = NULL",
    )?
    .execute(params![
        id,
        entity.entity_type,
        entity.version,
        entity.status,
        entity.created,
        rows.json,
        cause.notification_id,
        cause.event_type,
        cause.event_when,
        now,
    ])?;
    tx.prepare_cached("DELETE FROM entity_property WHERE entity_id = ?1")?
        .execute([id])?;
    tx.prepare_cached("DELETE FROM entity_collection WHERE entity_id = ?1")?
        .execute([id])?;
    // OR REPLACE: a top-level name containing a dot can coincide with a nested Custom path;
    // that must not fail the entity (its JSON keeps both).
    let mut insert_property = tx.prepare_cached(
        "INSERT OR REPLACE INTO entity_property (entity_id, name, value, value_type)
         VALUES (?1, ?2, ?3, ?4)",
    )?;
    for p in rows.properties {
        insert_property.execute(params![id, p.name, p.value, p.value_type.as_str()])?;
    }
    drop(insert_property);
    let mut insert_field = tx.prepare_cached(
        "INSERT OR REPLACE INTO entity_collection (entity_id, property, row_id, field, value)
         VALUES (?1, ?2, ?3, ?4, ?5)",
    )?;
    for c in rows.collections {
        insert_field.execute(params![id, c.property, c.row_id, c.field, c.value])?;
    }
    drop(insert_field);
    // OR IGNORE: history is append-only; a version stored before (say, after the entity row was
    // deleted by hand) keeps its first record.
    tx.prepare_cached(
        "INSERT OR IGNORE INTO entity_version
             (entity_id, version, json, stored_at, notification_id, event_type)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?
    .execute(params![
        id,
        entity.version,
        rows.json,
        now,
        cause.notification_id,
        cause.event_type,
    ])?;
    Ok(outcome)
}

fn log_processed(
    conn: &mut Connection,
    records: &[ProcessedNotification],
    processed_at: &str,
) -> rusqlite::Result<()> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let mut insert = tx.prepare_cached(
        "INSERT OR REPLACE INTO sync_log (notification_id, event_type, entity_id, outcome,
             attempts, received_at, event_when, processed_at, detail)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
    )?;
    for r in records {
        insert.execute(params![
            r.notification_id,
            r.event_type,
            r.entity_id,
            r.outcome,
            r.attempts,
            r.received_at,
            r.event_when,
            processed_at,
            r.detail,
        ])?;
    }
    drop(insert);
    tx.commit()
}

#[cfg(test)]
mod tests;
