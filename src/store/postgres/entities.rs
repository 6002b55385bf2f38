//! The monotonic batch upsert: entities, their flattened properties and data group rows, and
//! their history, written a batch at a time with array parameters (one statement per table, not
//! one per row).
//!
//! Concurrency: every entity row a transaction touches is locked by one `INSERT … ON CONFLICT DO
//! UPDATE … WHERE entity.version < EXCLUDED.version` that walks the batch in entity-id (byte)
//! order, inserting or locking each row before the next, so two writers of overlapping batches
//! take their locks in the same order and never deadlock; the `WHERE` is evaluated against the
//! latest committed row, so a version never goes down, and only the writer whose row won writes
//! that entity's properties and history (`ON CONFLICT DO NOTHING` for a version stored before).
//! It must never take entity row locks in any other order, and never decide anything but the
//! version comparison.

use std::collections::{HashMap, HashSet};

use std::pin::Pin;

use chrono::{DateTime, Utc};
use deadpool_postgres::Transaction;
use serde_json::Value;
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::{ToSql, Type};

use crate::store::flatten::{CollectionRow, PropertyRow, Summary, Typed, flatten, text};
use crate::store::{EntitySnapshot, SyncCause, UpsertOutcome};

/// One entity to write, with the notification that caused it.
pub(super) struct Write<'a> {
    pub entity: &'a EntitySnapshot,
    pub cause: &'a SyncCause,
}

/// A [`Write`] with its rows flattened, done before a connection is taken.
pub(super) struct Prepared<'a> {
    write: &'a Write<'a>,
    summary: Summary,
    properties: Vec<PropertyRow>,
    collections: Vec<CollectionRow>,
}

impl<'a> Prepared<'a> {
    pub(super) fn of(write: &'a Write<'a>) -> Prepared<'a> {
        let (properties, collections) =
            flatten(write.entity.json.get("properties").unwrap_or(&Value::Null));
        Prepared {
            write,
            summary: Summary::of(&properties, &write.entity.json),
            properties,
            collections,
        }
    }

    fn id(&self) -> &'a str {
        &self.write.entity.entity_id
    }
}

/// Inserts or locks every entity row in order, writing those whose version is newer; it returns
/// the rows written, whether each was new, and (`prior`) the version each held when the
/// statement began: a write that waited for another instance's may have replaced a version
/// newer than that, so `previous_version` is a lower bound then (nothing reads it for more).
const UPSERT: &str = "
WITH input AS (
    SELECT * FROM unnest($2::text[], $3::text[], $4::bigint[], $5::text[], $6::timestamptz[],
                         $7::jsonb[], $8::text[], $9::text[], $10::timestamptz[], $12::text[],
                         $13::text[], $14::text[], $15::text[], $16::text[], $17::date[],
                         $18::text[], $19::text[], $20::text[]) WITH ORDINALITY
        AS i(entity_id, entity_type, version, status, created, json, notification_id,
             event_type, event_when, legal_entity_name, country_of_incorporation,
             registration_number, first_name, last_name, date_of_birth, entity_status,
             risk_category, risk_level, ord)
),
prior AS (
    SELECT e.entity_id, e.version FROM entity AS e JOIN input AS i
        ON e.tenant_id = $1 AND e.entity_id = i.entity_id
),
written AS (
    INSERT INTO entity AS e (tenant_id, entity_id, entity_type, version, status, created, json,
        last_notification_id, last_event_type, last_event_when, synced_at, legal_entity_name,
        country_of_incorporation, registration_number, first_name, last_name, date_of_birth,
        entity_status, risk_category, risk_level)
    SELECT $1, entity_id, entity_type, version, status, created, json, notification_id,
           event_type, event_when, $11, legal_entity_name, country_of_incorporation,
           registration_number, first_name, last_name, date_of_birth, entity_status,
           risk_category, risk_level
      FROM input ORDER BY ord
    ON CONFLICT (tenant_id, entity_id) DO UPDATE SET entity_type = EXCLUDED.entity_type,
        previous_version = e.version, version = EXCLUDED.version, status = EXCLUDED.status,
        created = EXCLUDED.created, legal_entity_name = EXCLUDED.legal_entity_name,
        country_of_incorporation = EXCLUDED.country_of_incorporation,
        registration_number = EXCLUDED.registration_number, first_name = EXCLUDED.first_name,
        last_name = EXCLUDED.last_name, date_of_birth = EXCLUDED.date_of_birth,
        entity_status = EXCLUDED.entity_status, risk_category = EXCLUDED.risk_category,
        risk_level = EXCLUDED.risk_level,
        json = EXCLUDED.json, last_notification_id = EXCLUDED.last_notification_id,
        last_event_type = EXCLUDED.last_event_type, last_event_when = EXCLUDED.last_event_when,
        synced_at = EXCLUDED.synced_at, absent_since = NULL
    WHERE e.version < EXCLUDED.version
    -- xmax is 0 only on a row this statement inserted (an updated row carries its lock).
    RETURNING e.entity_id, e.xmax = 0 AS inserted
),
history AS (
    INSERT INTO entity_version (tenant_id, entity_id, version, json, stored_at, notification_id,
        event_type)
    SELECT $1, i.entity_id, i.version, i.json, $11, i.notification_id, i.event_type
      FROM input AS i JOIN written AS w USING (entity_id)
    ON CONFLICT DO NOTHING
)
SELECT w.entity_id, w.inserted, p.version FROM written AS w LEFT JOIN prior AS p USING (entity_id)";

/// The old rows of the entities just written. A statement of its own: the upsert's snapshot may
/// predate the rows a concurrent writer committed while the upsert waited for its row lock.
const DELETE_ROWS: &str = "
WITH properties AS (
    DELETE FROM entity_property WHERE tenant_id = $1 AND entity_id = ANY($2)
)
DELETE FROM entity_collection_field WHERE tenant_id = $1 AND entity_id = ANY($2)";

/// The rows of the entities just written, once [`DELETE_ROWS`] made room: COPY, the fastest way
/// in (backfill pages carry tens of thousands of rows).
const COPY_PROPERTIES: &str = "COPY entity_property (tenant_id, entity_id, name, value, value_type,
    value_number, value_bool, value_date) FROM STDIN BINARY";
const COPY_COLLECTIONS: &str = "COPY entity_collection_field (tenant_id, entity_id, property,
    row_id, field, value, value_number, value_date) FROM STDIN BINARY";

/// Writes `batch` by the monotonic rule; outcomes in the order given.
pub(super) async fn write(
    tx: &Transaction<'_>,
    tenant: &str,
    batch: &[Prepared<'_>],
    now: DateTime<Utc>,
) -> Result<Vec<UpsertOutcome>, tokio_postgres::Error> {
    let mut outcomes = vec![UpsertOutcome::Unchanged; batch.len()];
    for round in rounds(batch) {
        let written = write_round(tx, tenant, batch, &round, now).await?;
        for (index, outcome) in written {
            outcomes[index] = outcome;
        }
    }
    Ok(outcomes)
}

/// `batch`'s indexes in entity-id order, split so that no round names an entity twice (one
/// statement cannot change a row twice); a repeated entity is written in the order given.
fn rounds(batch: &[Prepared<'_>]) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..batch.len()).collect();
    order.sort_by(|&a, &b| batch[a].id().cmp(batch[b].id()).then(a.cmp(&b)));
    let mut rounds: Vec<Vec<usize>> = Vec::new();
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for index in order {
        let occurrence = seen.entry(batch[index].id()).or_default();
        if rounds.len() <= *occurrence {
            rounds.push(Vec::new());
        }
        rounds[*occurrence].push(index);
        *occurrence += 1;
    }
    rounds
}

async fn write_round(
    tx: &Transaction<'_>,
    tenant: &str,
    batch: &[Prepared<'_>],
    round: &[usize],
    now: DateTime<Utc>,
) -> Result<Vec<(usize, UpsertOutcome)>, tokio_postgres::Error> {
    let items: Vec<&Prepared> = round.iter().map(|&i| &batch[i]).collect();
    let ids: Vec<&str> = items.iter().map(|p| p.id()).collect();
    fn entity<'p>(p: &&Prepared<'p>) -> &'p EntitySnapshot {
        p.write.entity
    }
    fn cause<'p>(p: &&Prepared<'p>) -> &'p SyncCause {
        p.write.cause
    }
    let types: Vec<Option<&str>> = items
        .iter()
        .map(|p| entity(p).entity_type.as_deref())
        .collect();
    let versions: Vec<i64> = items.iter().map(|p| entity(p).version).collect();
    let statuses: Vec<Option<&str>> = items.iter().map(|p| entity(p).status.as_deref()).collect();
    let created: Vec<Option<DateTime<Utc>>> = items
        .iter()
        .map(|p| entity(p).created.map(super::ms))
        .collect();
    let json: Vec<&Value> = items.iter().map(|p| &entity(p).json).collect();
    let notifications: Vec<&str> = items
        .iter()
        .map(|p| cause(p).notification_id.as_str())
        .collect();
    let events: Vec<Option<&str>> = items
        .iter()
        .map(|p| cause(p).event_type.as_deref())
        .collect();
    let whens: Vec<Option<DateTime<Utc>>> = items
        .iter()
        .map(|p| cause(p).event_when.map(super::ms))
        .collect();
    let summaries: Vec<&Summary> = items.iter().map(|p| &p.summary).collect();
    let text_of = |pick: fn(&Summary) -> &Option<String>| -> Vec<Option<&str>> {
        summaries.iter().map(|s| pick(s).as_deref()).collect()
    };
    let births: Vec<_> = summaries.iter().map(|s| s.date_of_birth).collect();
    let risk_of = |pick: fn(&Summary) -> &Option<Value>| -> Vec<Option<String>> {
        summaries
            .iter()
            .map(|s| pick(s).as_ref().and_then(text))
            .collect()
    };
    let upsert = tx.prepare_cached(UPSERT).await?;
    let rows = tx
        .query(
            &upsert,
            &[
                &tenant,
                &ids,
                &types,
                &versions,
                &statuses,
                &created,
                &json,
                &notifications,
                &events,
                &whens,
                &now,
                &text_of(|s| &s.legal_entity_name),
                &text_of(|s| &s.country_of_incorporation),
                &text_of(|s| &s.registration_number),
                &text_of(|s| &s.first_name),
                &text_of(|s| &s.last_name),
                &births,
                &text_of(|s| &s.entity_status),
                &risk_of(|s| &s.risk_category),
                &risk_of(|s| &s.risk_level),
            ],
        )
        .await?;
    let written: HashMap<String, Option<i64>> = rows
        .iter()
        .map(|r| {
            let inserted: bool = r.get(1);
            // Not inserted yet unseen: another instance inserted it while this one waited.
            let prior: Option<i64> = r.get(2);
            (r.get(0), (!inserted).then(|| prior.unwrap_or(0)))
        })
        .collect();
    let written_ids: Vec<&str> = ids
        .iter()
        .copied()
        .filter(|id| written.contains_key(*id))
        .collect();
    if !written_ids.is_empty() {
        let delete = tx.prepare_cached(DELETE_ROWS).await?;
        tx.execute(&delete, &[&tenant, &written_ids]).await?;
        let rows: Vec<&Prepared> = items
            .iter()
            .copied()
            .filter(|p| written.contains_key(p.id()))
            .collect();
        insert_rows(tx, tenant, &rows).await?;
    }
    // Rows not written are locked by the upsert now, so their versions stay as read here.
    let unwritten: Vec<&str> = ids
        .iter()
        .copied()
        .filter(|id| !written.contains_key(*id))
        .collect();
    let stored: HashMap<String, i64> = if unwritten.is_empty() {
        HashMap::new()
    } else {
        let select = tx
            .prepare_cached(
                "SELECT entity_id, version FROM entity WHERE tenant_id = $1 AND entity_id = ANY($2)",
            )
            .await?;
        tx.query(&select, &[&tenant, &unwritten])
            .await?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect()
    };
    Ok(round
        .iter()
        .zip(&items)
        .map(|(&index, p)| {
            let version = p.write.entity.version;
            let outcome = match (written.get(p.id()), stored.get(p.id())) {
                (Some(None), _) => UpsertOutcome::Inserted,
                (Some(Some(previous_version)), _) => UpsertOutcome::Updated {
                    previous_version: *previous_version,
                },
                (None, Some(&stored_version)) if stored_version > version => {
                    UpsertOutcome::Older { stored_version }
                }
                (None, _) => UpsertOutcome::Unchanged,
            };
            (index, outcome)
        })
        .collect())
}

/// Inserts the property and data group rows of `written`. A top-level name containing a dot
/// can coincide with a nested Custom path: the last row of a key wins (the JSON keeps both).
async fn insert_rows(
    tx: &Transaction<'_>,
    tenant: &str,
    written: &[&Prepared<'_>],
) -> Result<(), tokio_postgres::Error> {
    let mut properties = Vec::new();
    let mut fields = Vec::new();
    let mut seen_properties = HashSet::new();
    let mut seen_fields = HashSet::new();
    for p in written {
        let id = p.id();
        for row in p.properties.iter().rev() {
            if seen_properties.insert((id, row.name.as_str())) {
                properties.push((id, row));
            }
        }
        for row in p.collections.iter().rev() {
            let key = (
                id,
                row.property.as_str(),
                row.row_id.as_str(),
                row.field.as_str(),
            );
            if seen_fields.insert(key) {
                fields.push((id, row));
            }
        }
    }
    let mut copy = Copy::start(tx, COPY_PROPERTIES, &[Type::TEXT; 5], Readings::All).await?;
    for (id, row) in properties {
        let keys: [&(dyn ToSql + Sync); 5] = [
            &tenant,
            &id,
            &row.name,
            &row.value,
            &row.value_type.as_str(),
        ];
        copy.row(&keys, row.typed).await?;
    }
    copy.finish().await?;
    let mut copy = Copy::start(tx, COPY_COLLECTIONS, &[Type::TEXT; 6], Readings::NoBoolean).await?;
    for (id, row) in fields {
        let keys: [&(dyn ToSql + Sync); 6] = [
            &tenant,
            &id,
            &row.property,
            &row.row_id,
            &row.field,
            &row.value,
        ];
        copy.row(&keys, row.typed).await?;
    }
    copy.finish().await
}

/// Which of a value's typed readings a table's rows end in.
#[derive(Clone, Copy)]
enum Readings {
    /// Number, boolean and date (`entity_property`).
    All,
    /// Number and date: the view `entity_collection` derives the boolean from the text.
    NoBoolean,
}

/// A binary COPY of rows that end in a value's typed readings.
struct Copy {
    writer: Pin<Box<BinaryCopyInWriter>>,
    readings: Readings,
}

impl Copy {
    async fn start(
        tx: &Transaction<'_>,
        statement: &str,
        text_columns: &[Type],
        readings: Readings,
    ) -> Result<Copy, tokio_postgres::Error> {
        let sink = tx.copy_in(statement).await?;
        let mut types = text_columns.to_vec();
        types.push(Type::FLOAT8);
        if let Readings::All = readings {
            types.push(Type::BOOL);
        }
        types.push(Type::DATE);
        Ok(Copy {
            writer: Box::pin(BinaryCopyInWriter::new(sink, &types)),
            readings,
        })
    }

    async fn row(
        &mut self,
        columns: &[&(dyn ToSql + Sync)],
        typed: Typed,
    ) -> Result<(), tokio_postgres::Error> {
        let mut row: Vec<&(dyn ToSql + Sync)> = columns.to_vec();
        row.push(&typed.number);
        if let Readings::All = self.readings {
            row.push(&typed.boolean);
        }
        row.push(&typed.date);
        self.writer.as_mut().write(&row).await
    }

    async fn finish(mut self) -> Result<(), tokio_postgres::Error> {
        self.writer.as_mut().finish().await.map(drop)
    }
}
