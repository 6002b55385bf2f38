//! Confirmation reads waiting to be made (`entity_confirmation`): a read taken inside Fenergo's
//! consistency window is stored at once and recorded here, to be read again once that window
//! has passed. Rows survive restarts; one row per entity, so a later provisional read moves the
//! due time forward instead of adding a second read.
//!
//! It stores and hands out what is due; it never decides when a read is provisional or calls
//! Fenergo (the sync worker does).

use chrono::{DateTime, Utc};
use rusqlite::{OptionalExtension, Transaction, TransactionBehavior, params};

use super::entities::Prepared;
use super::{Inner, read_time};
use crate::store::{
    ConfirmationBacklog, EntitySnapshot, PendingConfirmation, ReadFollowUp, StoreError, SyncCause,
    UpsertOutcome,
};
use crate::time;

impl Inner {
    /// Records what a worker's read leaves to do, inside the read's transaction.
    pub(super) fn record_follow_up(
        &self,
        tx: &Transaction<'_>,
        entity: &EntitySnapshot,
        cause: &SyncCause,
        follow_up: &ReadFollowUp,
    ) -> rusqlite::Result<()> {
        match follow_up {
            ReadFollowUp::Confirm {
                due_at,
                received_at,
                read_at,
            } => {
                // A later due time wins, with the cause that set it.
                tx.prepare_cached(
                    "INSERT INTO entity_confirmation (tenant_id, entity_id, due_at, read_version,
                         notification_id, event_type, event_when, received_at, requested_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
                     ON CONFLICT (tenant_id, entity_id) DO UPDATE SET
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
                    self.tenant,
                    entity.entity_id,
                    time::format(*due_at),
                    entity.version,
                    cause.notification_id,
                    cause.event_type,
                    cause.event_when.map(time::format),
                    time::format(*received_at),
                    time::format(*read_at),
                ])?;
            }
            ReadFollowUp::Confirmed { at } => {
                let at = time::format(*at);
                tx.prepare_cached(
                    "DELETE FROM entity_confirmation
                      WHERE tenant_id = ?1 AND entity_id = ?2 AND due_at <= ?3",
                )?
                .execute(params![self.tenant, entity.entity_id, at])?;
                self.mark_confirmed(tx, &entity.entity_id, &at)?;
            }
        }
        Ok(())
    }

    pub(super) fn defer_to_confirmation(
        &self,
        entity_id: &str,
        read_after: DateTime<Utc>,
        due_at: DateTime<Utc>,
        cause: &SyncCause,
        received_at: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        self.lock()
            .prepare_cached(
                "UPDATE entity_confirmation SET
                     notification_id = CASE WHEN ?4 >= due_at THEN ?5 ELSE notification_id END,
                     event_type = CASE WHEN ?4 >= due_at THEN ?6 ELSE event_type END,
                     event_when = CASE WHEN ?4 >= due_at THEN ?7 ELSE event_when END,
                     received_at = CASE WHEN ?4 >= due_at THEN ?8 ELSE received_at END,
                     due_at = max(due_at, ?4)
                  WHERE tenant_id = ?1 AND entity_id = ?2 AND requested_at > ?3",
            )
            .and_then(|mut update| {
                update.execute(params![
                    self.tenant,
                    entity_id,
                    time::format(read_after),
                    time::format(due_at),
                    cause.notification_id,
                    cause.event_type,
                    cause.event_when.map(time::format),
                    time::format(received_at),
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

    pub(super) fn due_confirmations(
        &self,
        now: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<PendingConfirmation>, StoreError> {
        let read = || -> rusqlite::Result<Vec<PendingConfirmation>> {
            let conn = self.lock();
            let mut select = conn.prepare_cached(
                "SELECT entity_id, due_at, read_version, notification_id, event_type, event_when,
                        received_at, attempts
                   FROM entity_confirmation WHERE tenant_id = ?1 AND due_at <= ?2
                  ORDER BY due_at LIMIT ?3",
            )?;
            select
                .query_map(
                    params![
                        self.tenant,
                        time::format(now),
                        i64::try_from(limit).unwrap_or(i64::MAX)
                    ],
                    |r| {
                        Ok(PendingConfirmation {
                            entity_id: r.get(0)?,
                            due_at: read_time(r.get(1)?),
                            read_version: r.get(2)?,
                            cause: SyncCause {
                                notification_id: r.get(3)?,
                                event_type: r.get(4)?,
                                event_when: r.get::<_, Option<String>>(5)?.map(read_time),
                            },
                            received_at: read_time(r.get(6)?),
                            attempts: r.get(7)?,
                        })
                    },
                )?
                .collect()
        };
        read().map_err(|source| self.error("read due confirmations".into(), source))
    }

    pub(super) fn confirmation_backlog(
        &self,
        now: DateTime<Utc>,
    ) -> Result<ConfirmationBacklog, StoreError> {
        self.lock()
            .prepare_cached(
                "SELECT count(*), min(due_at) FROM entity_confirmation
                  WHERE tenant_id = ?1 AND due_at <= ?2",
            )
            .and_then(|mut select| {
                select.query_row(params![self.tenant, time::format(now)], |r| {
                    Ok(ConfirmationBacklog {
                        due: r.get(0)?,
                        oldest_due: r.get::<_, Option<String>>(1)?.map(read_time),
                    })
                })
            })
            .map_err(|source| self.error("count due confirmations".into(), source))
    }

    pub(super) fn confirm(
        &self,
        reads: &[(PendingConfirmation, EntitySnapshot)],
        at: DateTime<Utc>,
    ) -> Result<Vec<UpsertOutcome>, StoreError> {
        let prepared: Vec<Prepared> = reads.iter().map(|(_, e)| Prepared::of(e)).collect();
        let now = time::now();
        let at = time::format(at);
        let mut conn = self.lock();
        let mut write = || -> rusqlite::Result<Vec<UpsertOutcome>> {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let mut outcomes = Vec::with_capacity(reads.len());
            for ((pending, entity), prepared) in reads.iter().zip(&prepared) {
                outcomes.push(self.write_entity(&tx, entity, &pending.cause, prepared, &now)?);
                self.close(&tx, pending)?;
                self.mark_confirmed(&tx, &pending.entity_id, &at)?;
            }
            tx.commit()?;
            Ok(outcomes)
        };
        write().map_err(|source| self.error(format!("confirm {} entities", reads.len()), source))
    }

    pub(super) fn postpone_confirmation(
        &self,
        pending: &PendingConfirmation,
        retry_at: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        self.lock()
            .prepare_cached(
                "UPDATE entity_confirmation SET due_at = ?4, attempts = attempts + 1
                  WHERE tenant_id = ?1 AND entity_id = ?2 AND due_at = ?3",
            )
            .and_then(|mut update| {
                update.execute(params![
                    self.tenant,
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

    pub(super) fn drop_confirmation(
        &self,
        pending: &PendingConfirmation,
    ) -> Result<(), StoreError> {
        let conn = self.lock();
        self.close(&conn, pending).map(drop).map_err(|source| {
            self.error(
                format!("drop the confirmation of {}", pending.entity_id),
                source,
            )
        })
    }

    pub(super) fn pending_confirmations(&self) -> Result<i64, StoreError> {
        self.lock()
            .query_row(
                "SELECT count(*) FROM entity_confirmation WHERE tenant_id = ?1",
                [&self.tenant],
                |r| r.get(0),
            )
            .optional()
            .map(Option::unwrap_or_default)
            .map_err(|source| self.error("count confirmations".into(), source))
    }

    /// Deletes `pending`'s row unless a later provisional read has moved its due time.
    fn close(
        &self,
        conn: &rusqlite::Connection,
        pending: &PendingConfirmation,
    ) -> rusqlite::Result<usize> {
        conn.prepare_cached(
            "DELETE FROM entity_confirmation WHERE tenant_id = ?1 AND entity_id = ?2 AND due_at = ?3",
        )?
        .execute(params![
            self.tenant,
            pending.entity_id,
            time::format(pending.due_at)
        ])
    }

    /// A read proved the entity exists at this version (or newer) as of `at`.
    fn mark_confirmed(
        &self,
        conn: &rusqlite::Connection,
        entity_id: &str,
        at: &str,
    ) -> rusqlite::Result<()> {
        conn.prepare_cached(
            "UPDATE entity SET confirmed_at = ?3, absent_since = NULL
              WHERE tenant_id = ?1 AND entity_id = ?2",
        )?
        .execute(params![self.tenant, entity_id, at])
        .map(drop)
    }
}
