//! Indexes deferred by a bulk load in `reporting.db` (table `deferred_index`, schema.sql
//! reporting version 5): dropping [`BULK_LOAD_INDEXES`] before a backfill into an empty file and
//! building them again after it.
//!
//! It never drops an index of a file that holds entities, and never drops one without recording
//! its definition in the same transaction, so a crash leaves the index either in place or
//! recorded for building.

use rusqlite::{OptionalExtension, TransactionBehavior, params};

use super::Inner;
use crate::store::{BULK_LOAD_INDEXES, StoreError};

impl Inner {
    pub(super) fn defer_indexes(&self) -> Result<Vec<String>, StoreError> {
        let mut conn = self.lock();
        let mut defer = || -> rusqlite::Result<Vec<String>> {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let empty: bool =
                tx.query_row("SELECT NOT EXISTS (SELECT 1 FROM entity)", [], |r| r.get(0))?;
            let mut deferred = Vec::new();
            if !empty {
                return Ok(deferred);
            }
            for name in BULK_LOAD_INDEXES {
                let definition: Option<String> = tx
                    .query_row(
                        "SELECT sql FROM sqlite_schema WHERE type = 'index' AND name = ?1",
                        [name],
                        |r| r.get(0),
                    )
                    .optional()?;
                let Some(definition) = definition else {
                    continue;
                };
                tx.execute(
                    "INSERT OR REPLACE INTO deferred_index (name, definition, deferred_at)
                     VALUES (?1, ?2, ?3)",
                    params![name, definition, crate::time::now()],
                )?;
                tx.execute_batch(&format!("DROP INDEX \"{name}\""))?;
                deferred.push(name.to_owned());
            }
            tx.commit()?;
            Ok(deferred)
        };
        defer().map_err(|source| self.error("defer the bulk load's indexes".into(), source))
    }

    /// One transaction per index, each holding the write lock while it builds (seconds to tens
    /// of seconds per million entities; the worker's writes wait it out).
    pub(super) fn build_deferred_indexes(&self) -> Result<Vec<String>, StoreError> {
        let mut conn = self.lock();
        let mut build = || -> rusqlite::Result<Vec<String>> {
            let mut built = Vec::new();
            for name in Inner::deferred_indexes(&conn)? {
                let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
                let definition: Option<String> = tx
                    .query_row(
                        "SELECT definition FROM deferred_index WHERE name = ?1",
                        [&name],
                        |r| r.get(0),
                    )
                    .optional()?;
                let Some(definition) = definition else {
                    continue;
                };
                // An operator may have created it by hand meanwhile.
                let exists: bool = tx.query_row(
                    "SELECT EXISTS (SELECT 1 FROM sqlite_schema WHERE type = 'index' AND name = ?1)",
                    [&name],
                    |r| r.get(0),
                )?;
                if !exists {
                    tx.execute_batch(&definition)?;
                }
                tx.execute("DELETE FROM deferred_index WHERE name = ?1", [&name])?;
                tx.commit()?;
                built.push(name);
            }
            Ok(built)
        };
        build().map_err(|source| self.error("build the deferred indexes".into(), source))
    }

    pub(super) fn list_deferred_indexes(&self) -> Result<Vec<String>, StoreError> {
        Inner::deferred_indexes(&self.lock())
            .map_err(|source| self.error("list the deferred indexes".into(), source))
    }

    pub(super) fn deferred_indexes(conn: &rusqlite::Connection) -> rusqlite::Result<Vec<String>> {
        conn.prepare("SELECT name FROM deferred_index ORDER BY name")?
            .query_map([], |r| r.get(0))?
            .collect()
    }
}
