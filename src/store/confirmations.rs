//! Confirmation reads waiting to be made (`entity_confirmation`): a read taken inside Fenergo's
//! consistency window is stored at once and recorded here, to be read again once that window
//! has passed. Rows survive restarts; one row per entity, so a later provisional read moves the
//! due time forward instead of adding a second read.
//!
//! It stores and hands out what is due; it never decides when a read is provisional or calls
//! Fenergo (the sync worker does).

use chrono::{DateTime, Utc};
use rusqlite::{OptionalExtension, TransactionBehavior, params};

use super::{EntitySnapshot, Prepared, ReportingStore, StoreError, SyncCause, UpsertOutcome};
use crate::time;

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
    pub received_at: String,
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
        received_at: String,
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

impl ReportingStore {
    /// Stores a worker's read like [`upsert_entity`](Self::upsert_entity) and records its
    /// follow-up (a confirmation to make, or the confirmation it is), in one transaction.
    pub fn store_read(
        &self,
        entity: &EntitySnapshot,
        cause: &SyncCause,
        follow_up: &ReadFollowUp,
    ) -> Result<UpsertOutcome, StoreError> {
        let prepared = Prepared::of(entity);
        let rows = prepared.rows();
        let now = crate::time::now();
        let mut conn = self.lock();
        let mut write = || -> rusqlite::Result<UpsertOutcome> {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let outcome = super::write_entity(&tx, entity, cause, &rows, &now)?;
            match follow_up {
                ReadFollowUp::Confirm {
                    due_at,
                    received_at,
                    read_at,
                } => {
                    // A later due time wins, with the cause that set it.
                    tx.prepare_cached(
                        "INSERT INTO entity_confirmation (entity_id, due_at, read_version,
                             notification_id, event_type, event_when, received_at, requested_at)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
                         ON CONFLICT (entity_id) DO UPDATE SET
                             read_version = excluded.read_version, attempts = 0,
                             requested_at = excluded.requested_at,
                             notification_id = CASE WHEN excluded.due_at >= due_at
                                 THEN excluded.notification_id ELSE notification_id END,
                             event_type = CASE WHEN excluded.due_at >= due_at
                                 THEN excluded.event_type ELSE event_type END,
                             event_when = CASE WHEN excluded.due_at >= due_at
                                 THEN excluded.event_when ELSE event_when END,
                             received_at = CASE WHEN excluded.due_at >= due_at
                                 THEN excluded.received_at ELSE received_at END,
                             due_at = max(due_at, excluded.due_at)",
                    )?
                    .execute(params![
                        entity.entity_id,
                        time::format(*due_at),
                        entity.version,
                        cause.notification_id,
                        cause.event_type,
                        cause.event_when,
                        received_at,
                        time::format(*read_at),
                    ])?;
                }
                ReadFollowUp::Confirmed { at } => {
                    let at = time::format(*at);
                    tx.prepare_cached(
                        "DELETE FROM entity_confirmation WHERE entity_id = ?1 AND due_at <= ?2",
                    )?
                    .execute(params![entity.entity_id, at])?;
                    mark_confirmed(&tx, &entity.entity_id, &at)?;
                }
            }
            tx.commit()?;
            Ok(outcome)
        };
        write().map_err(|source| {
            self.error(
                format!(
                    "store entity {} version {}",
                    entity.entity_id, entity.version
                ),
                source,
            )
        })
    }

    /// Lets the pending confirmation of `entity_id` serve a newer notification instead of a
    /// fetch, if its provisional read was taken after `read_after` (recently enough that
    /// waiting for it keeps the entity fresh): its due time moves to at least `due_at`, with
    /// `cause` (received at `received_at`) as the cause of what it writes. Returns whether it
    /// did; `false` (nothing pending, or too old) means fetch.
    pub fn defer_to_confirmation(
        &self,
        entity_id: &str,
        read_after: DateTime<Utc>,
        due_at: DateTime<Utc>,
        cause: &SyncCause,
        received_at: &str,
    ) -> Result<bool, StoreError> {
        self.lock()
            .prepare_cached(
                "UPDATE entity_confirmation SET
                     notification_id = CASE WHEN ?3 >= due_at THEN ?4 ELSE notification_id END,
                     event_type = CASE WHEN ?3 >= due_at THEN ?5 ELSE event_type END,
                     event_when = CASE WHEN ?3 >= due_at THEN ?6 ELSE event_when END,
                     received_at = CASE WHEN ?3 >= due_at THEN ?7 ELSE received_at END,
                     due_at = max(due_at, ?3)
                  WHERE entity_id = ?1 AND requested_at > ?2",
            )
            .and_then(|mut update| {
                update.execute(params![
                    entity_id,
                    time::format(read_after),
                    time::format(due_at),
                    cause.notification_id,
                    cause.event_type,
                    cause.event_when,
                    received_at,
                ])
            })
            .map(|changed| changed > 0)
            .map_err(|source| {
                self.error(
                    format!("defer {entity_id} to its pending confirmation"),
                    source,
                )
            })
    }

    /// Up to `limit` confirmations due by `now`, the longest overdue first.
    pub fn due_confirmations(
        &self,
        now: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<PendingConfirmation>, StoreError> {
        let read = || -> rusqlite::Result<Vec<PendingConfirmation>> {
            let conn = self.lock();
            let mut select = conn.prepare_cached(
                "SELECT entity_id, due_at, read_version, notification_id, event_type, event_when,
                        received_at, attempts
                   FROM entity_confirmation WHERE due_at <= ?1 ORDER BY due_at LIMIT ?2",
            )?;
            select
                .query_map(
                    params![time::format(now), i64::try_from(limit).unwrap_or(i64::MAX)],
                    |r| {
                        Ok(PendingConfirmation {
                            entity_id: r.get(0)?,
                            due_at: parse_time(r.get::<_, String>(1)?),
                            read_version: r.get(2)?,
                            cause: SyncCause {
                                notification_id: r.get(3)?,
                                event_type: r.get(4)?,
                                event_when: r.get(5)?,
                            },
                            received_at: r.get(6)?,
                            attempts: r.get(7)?,
                        })
                    },
                )?
                .collect()
        };
        read().map_err(|source| self.error("read due confirmations".into(), source))
    }

    /// How many confirmations are due by `now`, and the oldest due time.
    pub fn confirmation_backlog(
        &self,
        now: DateTime<Utc>,
    ) -> Result<ConfirmationBacklog, StoreError> {
        self.lock()
            .prepare_cached(
                "SELECT count(*), min(due_at) FROM entity_confirmation WHERE due_at <= ?1",
            )
            .and_then(|mut select| {
                select.query_row([time::format(now)], |r| {
                    Ok(ConfirmationBacklog {
                        due: r.get(0)?,
                        oldest_due: r.get::<_, Option<String>>(1)?.map(parse_time),
                    })
                })
            })
            .map_err(|source| self.error("count due confirmations".into(), source))
    }

    /// Stores what confirmation reads returned, each with its confirmation's cause and by the
    /// monotonic rule, marks the entities confirmed at `at`, and closes the confirmations (unless
    /// a newer provisional read moved one meanwhile), in one transaction.
    pub fn confirm(
        &self,
        reads: &[(PendingConfirmation, EntitySnapshot)],
        at: DateTime<Utc>,
    ) -> Result<Vec<UpsertOutcome>, StoreError> {
        let prepared: Vec<Prepared> = reads.iter().map(|(_, e)| Prepared::of(e)).collect();
        let now = crate::time::now();
        let at = time::format(at);
        let mut conn = self.lock();
        let mut write = || -> rusqlite::Result<Vec<UpsertOutcome>> {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let mut outcomes = Vec::with_capacity(reads.len());
            for ((pending, entity), prepared) in reads.iter().zip(&prepared) {
                outcomes.push(super::write_entity(
                    &tx,
                    entity,
                    &pending.cause,
                    &prepared.rows(),
                    &now,
                )?);
                close(&tx, pending)?;
                mark_confirmed(&tx, &pending.entity_id, &at)?;
            }
            tx.commit()?;
            Ok(outcomes)
        };
        write().map_err(|source| self.error(format!("confirm {} entities", reads.len()), source))
    }

    /// A confirmation read failed: try again at `retry_at`.
    pub fn postpone_confirmation(
        &self,
        pending: &PendingConfirmation,
        retry_at: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        self.lock()
            .prepare_cached(
                "UPDATE entity_confirmation SET due_at = ?3, attempts = attempts + 1
                  WHERE entity_id = ?1 AND due_at = ?2",
            )
            .and_then(|mut update| {
                update.execute(params![
                    pending.entity_id,
                    time::format(pending.due_at),
                    time::format(retry_at)
                ])
            })
            .map(drop)
            .map_err(|source| {
                self.error(
                    format!("postpone the confirmation of {}", pending.entity_id),
                    source,
                )
            })
    }

    /// Gives a confirmation up (the entity is no longer readable, or it failed too often).
    pub fn drop_confirmation(&self, pending: &PendingConfirmation) -> Result<(), StoreError> {
        let conn = self.lock();
        close(&conn, pending).map(drop).map_err(|source| {
            self.error(
                format!("drop the confirmation of {}", pending.entity_id),
                source,
            )
        })
    }

    /// Confirmations not made yet, due or not (for status and tests).
    pub fn pending_confirmations(&self) -> Result<i64, StoreError> {
        self.lock()
            .query_row("SELECT count(*) FROM entity_confirmation", [], |r| r.get(0))
            .optional()
            .map(Option::unwrap_or_default)
            .map_err(|source| self.error("count confirmations".into(), source))
    }
}

/// Deletes `pending`'s row unless a later provisional read has moved its due time.
fn close(conn: &rusqlite::Connection, pending: &PendingConfirmation) -> rusqlite::Result<usize> {
    conn.prepare_cached("DELETE FROM entity_confirmation WHERE entity_id = ?1 AND due_at = ?2")?
        .execute(params![pending.entity_id, time::format(pending.due_at)])
}

/// A read proved the entity exists at this version (or newer) as of `at`.
fn mark_confirmed(conn: &rusqlite::Connection, entity_id: &str, at: &str) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "UPDATE entity SET confirmed_at = ?2, absent_since = NULL WHERE entity_id = ?1",
    )?
    .execute(params![entity_id, at])
    .map(drop)
}

/// Times written by [`time::format`] always parse; anything else reads as the epoch (due now).
fn parse_time(text: String) -> DateTime<Utc> {
    text.parse().unwrap_or_default()
}
