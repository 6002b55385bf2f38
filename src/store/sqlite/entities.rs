//! Entity rows in `reporting.db`: the monotonic upsert (entity, flattened properties and data
//! group rows, history, in one transaction), the stored version, history pruning, size.
//!
//! It never writes an equal or older version and never rewrites a history row.

use std::cmp::Ordering;

use chrono::{DateTime, Utc};
use rusqlite::{OptionalExtension, Transaction, TransactionBehavior, params};
use serde_json::Value;

use super::{Inner, read_time};
use crate::store::flatten::{CollectionRow, PropertyRow, Summary, Typed, flatten};
use crate::store::{
    EntitySnapshot, ReadFollowUp, StoreError, StoreStats, StoredState, SyncCause, UpsertOutcome,
};
use crate::time;

/// An entity's JSON text and flattened rows, computed before the write lock is taken.
pub(super) struct Prepared {
    json: String,
    summary: Summary,
    properties: Vec<PropertyRow>,
    collections: Vec<CollectionRow>,
}

impl Prepared {
    pub(super) fn of(entity: &EntitySnapshot) -> Prepared {
        Prepared::from_json(entity.json.to_string(), &entity.json)
    }

    fn from_json(text: String, json: &Value) -> Prepared {
        let (properties, collections) = flatten(json.get("properties").unwrap_or(&Value::Null));
        Prepared {
            json: text,
            summary: Summary::of(&properties, json),
            properties,
            collections,
        }
    }
}

impl Inner {
    pub(super) fn store_read(
        &self,
        entity: &EntitySnapshot,
        cause: &SyncCause,
        follow_up: Option<&ReadFollowUp>,
    ) -> Result<UpsertOutcome, StoreError> {
        let prepared = Prepared::of(entity);
        let now = time::now();
        let mut conn = self.lock();
        let mut write = || -> rusqlite::Result<UpsertOutcome> {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let outcome = self.write_entity(&tx, entity, cause, &prepared, &now)?;
            if let Some(follow_up) = follow_up {
                self.record_follow_up(&tx, entity, cause, follow_up)?;
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

    pub(super) fn upsert_entities(
        &self,
        entities: &[EntitySnapshot],
        cause: &SyncCause,
    ) -> Result<Vec<UpsertOutcome>, StoreError> {
        // Pure work outside the lock, so concurrent workers only queue for the SQL itself.
        let prepared: Vec<Prepared> = entities.iter().map(Prepared::of).collect();
        let now = time::now();
        let mut conn = self.lock();
        let mut write = || -> rusqlite::Result<Vec<UpsertOutcome>> {
            // IMMEDIATE: the version check and the write must see the same state, and a deferred
            // transaction upgrading to a writer would fail at once instead of waiting.
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let outcomes = entities
                .iter()
                .zip(&prepared)
                .map(|(entity, rows)| self.write_entity(&tx, entity, cause, rows, &now))
                .collect::<rusqlite::Result<_>>()?;
            tx.commit()?;
            Ok(outcomes)
        };
        write().map_err(|source| {
            let what = match entities {
                [one] => format!("store entity {} version {}", one.entity_id, one.version),
                many => format!("store {} entities", many.len()),
            };
            self.error(what, source)
        })
    }

    pub(super) fn stored_state(&self, entity_id: &str) -> Result<Option<StoredState>, StoreError> {
        self.lock()
            .prepare_cached(
                "SELECT version, last_event_when, synced_at FROM entity
                  WHERE tenant_id = ?1 AND entity_id = ?2",
            )
            .and_then(|mut select| {
                select
                    .query_row(params![self.tenant, entity_id], |r| {
                        Ok(StoredState {
                            version: r.get(0)?,
                            last_event_when: r.get::<_, Option<String>>(1)?.map(read_time),
                            synced_at: read_time(r.get(2)?),
                        })
                    })
                    .optional()
            })
            .map_err(|source| self.error(format!("read entity {entity_id}"), source))
    }

    /// Writes one entity inside `tx` if its version is newer than the stored one.
    pub(super) fn write_entity(
        &self,
        tx: &Transaction<'_>,
        entity: &EntitySnapshot,
        cause: &SyncCause,
        rows: &Prepared,
        now: &str,
    ) -> rusqlite::Result<UpsertOutcome> {
        let (tenant, id) = (&self.tenant, &entity.entity_id);
        let stored: Option<i64> = tx
            .prepare_cached("SELECT version FROM entity WHERE tenant_id = ?1 AND entity_id = ?2")?
            .query_row(params![tenant, id], |r| r.get(0))
            .optional()?;
        let outcome = match stored.map(|v| (v, v.cmp(&entity.version))) {
            None => UpsertOutcome::Inserted,
            Some((previous_version, Ordering::Less)) => UpsertOutcome::Updated { previous_version },
            Some((_, Ordering::Equal)) => return Ok(UpsertOutcome::Unchanged),
            Some((stored_version, Ordering::Greater)) => {
                return Ok(UpsertOutcome::Older { stored_version });
            }
        };
        // An update keeps confirmed_at and last_listed_run (they describe reads, not versions);
        // a write proves the entity exists, so it is no longer absent.
        tx.prepare_cached(
            "INSERT INTO entity (tenant_id, entity_id, entity_type, version, status, created, json,
                 last_notification_id, last_event_type, last_event_when, synced_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)
             ON CONFLICT (tenant_id, entity_id) DO UPDATE SET
                 entity_type = excluded.entity_type, previous_version = version,
                 version = excluded.version, status = excluded.status,
                 created = excluded.created, json = excluded.json,
                 last_notification_id = excluded.last_notification_id,
                 last_event_type = excluded.last_event_type,
                 last_event_when = excluded.last_event_when, synced_at = excluded.synced_at,
                 absent_since = NULL",
        )?
        .execute(params![
            tenant,
            id,
            entity.entity_type,
            entity.version,
            entity.status,
            entity.created.map(time::format),
            rows.json,
            cause.notification_id,
            cause.event_type,
            cause.event_when.map(time::format),
            now,
        ])?;
        write_summary(tx, tenant, id, &rows.summary)?;
        write_flattened(tx, tenant, id, rows)?;
        // OR IGNORE: history is append-only; a version stored before (say, after the entity row
        // was deleted by hand) keeps its first record.
        tx.prepare_cached(
            "INSERT OR IGNORE INTO entity_version
                 (tenant_id, entity_id, version, json, stored_at, notification_id, event_type)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        )?
        .execute(params![
            tenant,
            id,
            entity.version,
            rows.json,
            now,
            cause.notification_id,
            cause.event_type,
        ])?;
        Ok(outcome)
    }

    pub(super) fn prune_history(&self, before: DateTime<Utc>) -> Result<u64, StoreError> {
        self.lock()
            .execute(
                "DELETE FROM entity_version AS v
                  WHERE v.tenant_id = ?1 AND v.stored_at < ?2
                    AND v.version <> coalesce((SELECT e.version FROM entity AS e
                         WHERE e.tenant_id = v.tenant_id AND e.entity_id = v.entity_id), -1)",
                params![self.tenant, time::format(before)],
            )
            .map(|deleted| deleted as u64)
            .map_err(|source| self.error("prune entity history".into(), source))
    }

    pub(super) fn stats(&self) -> Result<StoreStats, StoreError> {
        let conn = self.lock();
        let read = || -> rusqlite::Result<StoreStats> {
            let count = |table: &str| -> rusqlite::Result<i64> {
                conn.query_row(
                    &format!("SELECT count(*) FROM {table} WHERE tenant_id = ?1"),
                    [&self.tenant],
                    |r| r.get(0),
                )
            };
            let bytes: i64 = conn.query_row(
                "SELECT page_count * page_size FROM pragma_page_count(), pragma_page_size()",
                [],
                |r| r.get(0),
            )?;
            // dbstat is compiled into the bundled SQLite; it sizes each table and index.
            let history: i64 = conn.query_row(
                "SELECT coalesce(sum(pgsize), 0) FROM dbstat
                  WHERE name IN (SELECT name FROM sqlite_master WHERE tbl_name = 'entity_version')",
                [],
                |r| r.get(0),
            )?;
            Ok(StoreStats {
                entities: count("entity")?,
                versions: count("entity_version")?,
                bytes,
                bytes_without_history: bytes - history,
                deferred_indexes: Inner::deferred_indexes(&conn)?,
            })
        };
        read().map_err(|source| self.error("measure the store".into(), source))
    }
}

/// Sets the entity row's summary columns (the row exists: it was just written).
fn write_summary(
    tx: &Transaction<'_>,
    tenant: &str,
    id: &str,
    summary: &Summary,
) -> rusqlite::Result<()> {
    tx.prepare_cached(
        "UPDATE entity SET legal_entity_name = ?3, country_of_incorporation = ?4,
             registration_number = ?5, first_name = ?6, last_name = ?7, date_of_birth = ?8,
             entity_status = ?9, risk_category = ?10, risk_level = ?11
          WHERE tenant_id = ?1 AND entity_id = ?2",
    )?
    .execute(params![
        tenant,
        id,
        summary.legal_entity_name,
        summary.country_of_incorporation,
        summary.registration_number,
        summary.first_name,
        summary.last_name,
        summary
            .date_of_birth
            .map(|d| d.format("%Y-%m-%d").to_string()),
        summary.entity_status,
        summary.risk_category.as_ref().map(json_scalar),
        summary.risk_level.as_ref().map(json_scalar),
    ])?;
    Ok(())
}

/// A JSON value as `json_extract` returns it: numbers as numbers, booleans as 1/0, strings as
/// text, arrays and objects as their JSON text.
fn json_scalar(value: &Value) -> rusqlite::types::Value {
    use rusqlite::types::Value as Sql;
    match value {
        Value::Null => Sql::Null,
        Value::Bool(b) => Sql::Integer(i64::from(*b)),
        Value::Number(n) => n
            .as_i64()
            .map(Sql::Integer)
            .or_else(|| n.as_f64().map(Sql::Real))
            .unwrap_or_else(|| Sql::Text(n.to_string())),
        Value::String(s) => Sql::Text(s.clone()),
        other => Sql::Text(other.to_string()),
    }
}

/// Replaces an entity's property and data group rows with `rows`'.
fn write_flattened(
    tx: &Transaction<'_>,
    tenant: &str,
    id: &str,
    rows: &Prepared,
) -> rusqlite::Result<()> {
    tx.prepare_cached("DELETE FROM entity_property WHERE tenant_id = ?1 AND entity_id = ?2")?
        .execute(params![tenant, id])?;
    tx.prepare_cached("DELETE FROM entity_collection WHERE tenant_id = ?1 AND entity_id = ?2")?
        .execute(params![tenant, id])?;
    // OR REPLACE: a top-level name containing a dot can coincide with a nested Custom path;
    // that must not fail the entity (its JSON keeps both).
    let mut insert_property = tx.prepare_cached(
        "INSERT OR REPLACE INTO entity_property (tenant_id, entity_id, name, value, value_type,
             value_number, value_bool, value_date)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
    )?;
    for p in &rows.properties {
        let (number, boolean, date) = typed_params(&p.typed);
        insert_property.execute(params![
            tenant,
            id,
            p.name,
            p.value,
            p.value_type.as_str(),
            number,
            boolean,
            date
        ])?;
    }
    let mut insert_field = tx.prepare_cached(
        "INSERT OR REPLACE INTO entity_collection (tenant_id, entity_id, property, row_id, field,
             value, value_number, value_bool, value_date)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
    )?;
    for c in &rows.collections {
        let (number, boolean, date) = typed_params(&c.typed);
        insert_field.execute(params![
            tenant, id, c.property, c.row_id, c.field, c.value, number, boolean, date
        ])?;
    }
    Ok(())
}

/// The typed columns as SQLite stores them: REAL, 0/1, 'YYYY-MM-DD'.
fn typed_params(typed: &Typed) -> (Option<f64>, Option<bool>, Option<String>) {
    (
        typed.number,
        typed.boolean,
        typed.date.map(|d| d.format("%Y-%m-%d").to_string()),
    )
}

/// Flattens every stored entity's JSON into its summary columns, property and data group rows
/// again: after an upgrade that changed what flattening writes.
pub(super) fn flatten_all(tx: &Transaction<'_>) -> rusqlite::Result<()> {
    let mut select = tx.prepare("SELECT tenant_id, entity_id, json FROM entity")?;
    let entities = select
        .query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
            ))
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    for (tenant, id, json) in entities {
        let parsed: Value = serde_json::from_str(&json).unwrap_or(Value::Null);
        let rows = Prepared::from_json(json, &parsed);
        write_summary(tx, &tenant, &id, &rows.summary)?;
        write_flattened(tx, &tenant, &id, &rows)?;
    }
    Ok(())
}
