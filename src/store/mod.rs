//! The reporting store (`reporting.db`): the latest version of every synced entity, flattened
//! for plain SQL, the history of every version stored, and the log of processed notifications.
//! `schema.sql` (section `reporting`) documents every table, column and view.
//!
//! It must never let an older or equal version overwrite what is stored, never leave an entity
//! half-written (each upsert is one transaction), and never decide what to fetch, retry or
//! dead-letter: that is the sync worker's job.

use std::cmp::Ordering;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use serde_json::Value;

mod flatten;

use crate::sqlite::{self, DbError, Durability};
use flatten::{CollectionRow, PropertyRow, flatten};

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
    /// `synced`, `unchanged`, `older-ignored`, `stale-accepted`, `ignored` or `dead`.
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
    path: PathBuf,
}

impl ReportingStore {
    /// Opens (creating it and its directory if needed) the reporting file in WAL mode with
    /// `synchronous=NORMAL` (everything in it can be re-fetched), and applies its schema.
    pub fn open(path: &Path) -> Result<ReportingStore, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| StoreError::CreateDir {
                path: dir.to_owned(),
                source,
            })?;
        }
        let mut conn = sqlite::open(path, Durability::Normal, BUSY_TIMEOUT)?;
        sqlite::apply_schema(&mut conn, path, SECTION)?;
        Ok(ReportingStore {
            conn: Mutex::new(conn),
            path: path.to_owned(),
        })
    }

    /// Stores `entity` if its version is newer than the stored one: the entity row, its
    /// flattened properties and data group rows, and a history row, all in one transaction.
    /// An equal or older version writes nothing at all.
    pub fn upsert_entity(
        &self,
        entity: &EntitySnapshot,
        cause: &SyncCause,
    ) -> Result<UpsertOutcome, StoreError> {
        // Pure work outside the lock, so concurrent workers only queue for the SQL itself.
        let (properties, collections) =
            flatten(entity.json.get("properties").unwrap_or(&Value::Null));
        let json = entity.json.to_string();
        let rows = Flattened {
            json: &json,
            properties: &properties,
            collections: &collections,
        };
        upsert(&mut self.lock(), entity, cause, &rows).map_err(|source| {
            self.error(
                format!(
                    "store entity {} version {}",
                    entity.entity_id, entity.version
                ),
                source,
            )
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
        self.record_processed_at(records, &sqlite::now())
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

    /// A panic while the lock was held cannot have left a transaction open (dropping one rolls
    /// it back), so a poisoned lock still guards a usable connection.
    fn lock(&self) -> MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn error(&self, action: String, source: rusqlite::Error) -> StoreError {
        StoreError::Sqlite {
            path: self.path.clone(),
            action,
            source,
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
    entity: &EntitySnapshot,
    cause: &SyncCause,
    rows: &Flattened,
) -> rusqlite::Result<UpsertOutcome> {
    // IMMEDIATE: the version check and the write must see the same state, and a deferred
    // transaction upgrading to a writer would fail at once instead of waiting for the lock.
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
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
    let now = sqlite::now();
    tx.prepare_cached(
        "INSERT OR REPLACE INTO entity (entity_id, entity_type, version, status, created, json,
             last_notification_id, last_event_type, last_event_when, synced_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
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
    tx.commit()?;
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
