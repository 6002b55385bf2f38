//! The processing log (`sync_log`), backfill and reconciliation runs (`reconcile_run`, the
//! `last_listed_run`/`absent_since` marks on `entity`) and recorded facts (`sync_state`) in
//! `reporting.db`.
//!
//! It stores what it is given; it never decides what a run or a fact means, and never deletes
//! an entity.

use chrono::{DateTime, Utc};
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

use super::{Inner, read_time};
use crate::store::{
    ProcessedNotification, ReconcileRun, RunCounts, RunKind, StateEntry, StateKey, StoreError,
};
use crate::time;

impl Inner {
    pub(super) fn record_processed(
        &self,
        records: &[ProcessedNotification],
    ) -> Result<(), StoreError> {
        let processed_at = time::now();
        let mut conn = self.lock();
        let mut log = || -> rusqlite::Result<()> {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let mut insert = tx.prepare_cached(
                "INSERT OR REPLACE INTO sync_log (tenant_id, notification_id, event_type,
                     entity_id, outcome, attempts, received_at, event_when, processed_at, detail)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            )?;
            for r in records {
                insert.execute(params![
                    self.tenant,
                    r.notification_id,
                    r.event_type,
                    r.entity_id,
                    r.outcome.as_str(),
                    r.attempts,
                    time::format(r.received_at),
                    r.event_when.map(time::format),
                    processed_at,
                    r.detail,
                ])?;
            }
            drop(insert);
            tx.commit()
        };
        log().map_err(|source| {
            self.error(
                format!("log {} processed notifications", records.len()),
                source,
            )
        })
    }

    pub(super) fn running_reconcile(
        &self,
        kind: RunKind,
    ) -> Result<Option<ReconcileRun>, StoreError> {
        self.lock()
            .query_row(
                "SELECT run_id, cursor, total_items, seen, added, updated, unchanged
                   FROM reconcile_run
                  WHERE tenant_id = ?1 AND kind = ?2 AND status = 'running'
                  ORDER BY run_id DESC LIMIT 1",
                params![self.tenant, kind.as_str()],
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

    pub(super) fn start_reconcile(&self, kind: RunKind) -> Result<ReconcileRun, StoreError> {
        let now = time::now();
        let mut conn = self.lock();
        let start = |conn: &mut Connection| -> rusqlite::Result<i64> {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            tx.execute(
                "UPDATE reconcile_run SET status = 'finished', finished_at = ?3
                  WHERE tenant_id = ?1 AND kind = ?2 AND status = 'running'",
                params![self.tenant, kind.as_str(), now],
            )?;
            tx.execute(
                "INSERT INTO reconcile_run (tenant_id, kind, status, started_at, updated_at)
                 VALUES (?1, ?2, 'running', ?3, ?3)",
                params![self.tenant, kind.as_str(), now],
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

    pub(super) fn save_reconcile(
        &self,
        run: &ReconcileRun,
        finished: bool,
    ) -> Result<(), StoreError> {
        let c = &run.counts;
        self.lock()
            .execute(
                "UPDATE reconcile_run SET cursor = ?2, total_items = ?3, seen = ?4, added = ?5,
                        updated = ?6, unchanged = ?7, updated_at = ?8,
                        status = CASE WHEN ?9 THEN 'finished' ELSE 'running' END,
                        finished_at = CASE WHEN ?9 THEN ?8 END
                  WHERE run_id = ?1",
                params![
                    run.run_id,
                    run.cursor,
                    run.total_items,
                    c.seen,
                    c.added,
                    c.updated,
                    c.unchanged,
                    time::now(),
                    finished
                ],
            )
            .map(drop)
            .map_err(|source| self.error(format!("save run {}", run.run_id), source))
    }

    pub(super) fn mark_listed(&self, run_id: i64, entity_ids: &[String]) -> Result<(), StoreError> {
        let mut conn = self.lock();
        let mark = |conn: &mut Connection| -> rusqlite::Result<()> {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let mut update = tx.prepare_cached(
                "UPDATE entity SET last_listed_run = ?2, absent_since = NULL
                  WHERE tenant_id = ?1 AND entity_id = ?3",
            )?;
            for id in entity_ids {
                update.execute(params![self.tenant, run_id, id])?;
            }
            drop(update);
            tx.commit()
        };
        mark(&mut conn)
            .map_err(|source| self.error(format!("mark run {run_id}'s entities listed"), source))
    }

    pub(super) fn mark_absent(&self, run_id: i64) -> Result<u64, StoreError> {
        self.lock()
            .execute(
                "UPDATE entity SET absent_since = ?3
                  WHERE tenant_id = ?1 AND absent_since IS NULL
                    AND (last_listed_run IS NULL OR last_listed_run <> ?2)
                    AND synced_at <= (SELECT started_at FROM reconcile_run WHERE run_id = ?2)",
                params![self.tenant, run_id, time::now()],
            )
            .map(|marked| marked as u64)
            .map_err(|source| {
                self.error(format!("mark entities run {run_id} did not list"), source)
            })
    }

    pub(super) fn last_run_started(
        &self,
        kind: RunKind,
    ) -> Result<Option<DateTime<Utc>>, StoreError> {
        self.lock()
            .query_row(
                "SELECT max(started_at) FROM reconcile_run WHERE tenant_id = ?1 AND kind = ?2",
                params![self.tenant, kind.as_str()],
                |r| r.get::<_, Option<String>>(0),
            )
            .map(|started| started.map(read_time))
            .map_err(|source| self.error(format!("read the last {} run", kind.as_str()), source))
    }

    pub(super) fn put_state(
        &self,
        key: StateKey,
        value: &str,
        since: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        self.lock()
            .execute(
                "INSERT INTO sync_state (tenant_id, key, value, since, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (tenant_id, key) DO UPDATE SET value = excluded.value,
                     since = excluded.since, updated_at = excluded.updated_at",
                params![
                    self.tenant,
                    key.as_str(),
                    value,
                    time::format(since),
                    time::now()
                ],
            )
            .map(drop)
            .map_err(|source| self.error(format!("record {}", key.as_str()), source))
    }

    pub(super) fn clear_state(&self, key: StateKey) -> Result<(), StoreError> {
        self.lock()
            .execute(
                "DELETE FROM sync_state WHERE tenant_id = ?1 AND key = ?2",
                params![self.tenant, key.as_str()],
            )
            .map(drop)
            .map_err(|source| self.error(format!("clear {}", key.as_str()), source))
    }

    pub(super) fn state_of_every_tenant(
        &self,
        key: StateKey,
    ) -> Result<Vec<(String, StateEntry)>, StoreError> {
        let conn = self.lock();
        let read = || -> rusqlite::Result<Vec<(String, StateEntry)>> {
            conn.prepare_cached(
                "SELECT tenant_id, value, since FROM sync_state WHERE key = ?1 ORDER BY tenant_id",
            )?
            .query_map([key.as_str()], |r| {
                Ok((
                    r.get(0)?,
                    StateEntry {
                        value: r.get(1)?,
                        since: read_time(r.get(2)?),
                    },
                ))
            })?
            .collect()
        };
        read().map_err(|source| self.error(format!("read {}", key.as_str()), source))
    }

    pub(super) fn state(&self, key: StateKey) -> Result<Option<StateEntry>, StoreError> {
        self.lock()
            .query_row(
                "SELECT value, since FROM sync_state WHERE tenant_id = ?1 AND key = ?2",
                params![self.tenant, key.as_str()],
                |r| {
                    Ok(StateEntry {
                        value: r.get(0)?,
                        since: read_time(r.get(1)?),
                    })
                },
            )
            .optional()
            .map_err(|source| self.error(format!("read {}", key.as_str()), source))
    }
}
