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

use chrono::{DateTime, NaiveDate, Utc};
use deadpool_postgres::Transaction;
use serde_json::Value;

use crate::store::flatten::{CollectionRow, PropertyRow, flatten};
use crate::store::{EntitySnapshot, SyncCause, UpsertOutcome};

/// One entity to write, with the notification that caused it.
pub(super) struct Write<'a> {
    pub entity: &'a EntitySnapshot,
    pub cause: &'a SyncCause,
}

/// A [`Write`] with its rows flattened, done before a connection is taken.
pub(super) struct Prepared<'a> {
    write: &'a Write<'a>,
    properties: Vec<PropertyRow>,
    collections: Vec<CollectionRow>,
}

impl<'a> Prepared<'a> {
    pub(super) fn of(write: &'a Write<'a>) -> Prepared<'a> {
        let (properties, collections) =
            flatten(write.entity.json.get("properties").unwrap_or(&Value::Null));
        Prepared {
            write,
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
                         $7::jsonb[], $8::text[], $9::text[], $10::timestamptz[]) WITH ORDINALITY
        AS i(entity_id, entity_type, version, status, created, json, notification_id,
             event_type, event_when, ord)
),
prior AS (
    SELECT e.entity_id, e.version FROM entity AS e JOIN input AS i
        ON e.tenant_id = $1 AND e.entity_id = i.entity_id
),
written AS (
    INSERT INTO entity AS e (tenant_id, entity_id, entity_type, version, status, created, json,
        last_notification_id, last_event_type, last_event_when, synced_at)
    SELECT $1, entity_id, entity_type, version, status, created, json, notification_id,
           event_type, event_when, $11
      FROM input ORDER BY ord
    ON CONFLICT (tenant_id, entity_id) DO UPDATE SET entity_type = EXCLUDED.entity_type,
        version = EXCLUDED.version, status = EXCLUDED.status, created = EXCLUDED.created,
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
DELETE FROM entity_collection WHERE tenant_id = $1 AND entity_id = ANY($2)";

/// The rows of the entities just written, once [`DELETE_ROWS`] made room.
const INSERT_ROWS: &str = "
WITH properties AS (
    INSERT INTO entity_property (tenant_id, entity_id, name, value, value_type, value_number,
        value_bool, value_date)
    SELECT $1, * FROM unnest($2::text[], $3::text[], $4::text[], $5::text[], $6::float8[],
                             $7::bool[], $8::date[])
)
INSERT INTO entity_collection (tenant_id, entity_id, property, row_id, field, value,
    value_number, value_bool, value_date)
SELECT $1, * FROM unnest($9::text[], $10::text[], $11::text[], $12::text[], $13::text[],
                         $14::float8[], $15::bool[], $16::date[])";

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
    let created: Vec<Option<DateTime<Utc>>> = items.iter().map(|p| entity(p).created).collect();
    let json: Vec<&Value> = items.iter().map(|p| &entity(p).json).collect();
    let notifications: Vec<&str> = items
        .iter()
        .map(|p| cause(p).notification_id.as_str())
        .collect();
    let events: Vec<Option<&str>> = items
        .iter()
        .map(|p| cause(p).event_type.as_deref())
        .collect();
    let whens: Vec<Option<DateTime<Utc>>> = items.iter().map(|p| cause(p).event_when).collect();
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
        insert_rows(
            tx,
            tenant,
            items.iter().filter(|p| written.contains_key(p.id())),
        )
        .await?;
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
async fn insert_rows<'p>(
    tx: &Transaction<'_>,
    tenant: &str,
    written: impl Iterator<Item = &'p &'p Prepared<'p>>,
) -> Result<(), tokio_postgres::Error> {
    let mut properties = Columns::default();
    let mut collections = Columns::default();
    let mut seen_properties = HashSet::new();
    let mut seen_fields = HashSet::new();
    for p in written {
        let id = p.id();
        for row in p.properties.iter().rev() {
            if seen_properties.insert((id, row.name.as_str())) {
                properties.push(
                    id,
                    [&row.name, row.value_type.as_str()],
                    &row.value,
                    row.typed,
                );
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
                collections.push(
                    id,
                    [&row.property, &row.row_id, &row.field],
                    &row.value,
                    row.typed,
                );
            }
        }
    }
    if properties.ids.is_empty() && collections.ids.is_empty() {
        return Ok(());
    }
    let [name, value_type] = properties.keys();
    let [property, row_id, field] = collections.keys();
    let insert = tx.prepare_cached(INSERT_ROWS).await?;
    tx.execute(
        &insert,
        &[
            &tenant,
            &properties.ids,
            &name,
            &properties.values,
            &value_type,
            &properties.numbers,
            &properties.bools,
            &properties.dates,
            &collections.ids,
            &property,
            &row_id,
            &field,
            &collections.values,
            &collections.numbers,
            &collections.bools,
            &collections.dates,
        ],
    )
    .await?;
    Ok(())
}

/// Rows as parameter arrays: the entity id, `N` key columns, the value and its typed readings.
/// `value_type` travels as the property rows' second key column.
struct Columns<'r, const N: usize> {
    ids: Vec<&'r str>,
    keys: Vec<[&'r str; N]>,
    values: Vec<Option<&'r str>>,
    numbers: Vec<Option<f64>>,
    bools: Vec<Option<bool>>,
    dates: Vec<Option<NaiveDate>>,
}

impl<const N: usize> Default for Columns<'_, N> {
    fn default() -> Self {
        Columns {
            ids: Vec::new(),
            keys: Vec::new(),
            values: Vec::new(),
            numbers: Vec::new(),
            bools: Vec::new(),
            dates: Vec::new(),
        }
    }
}

impl<'r, const N: usize> Columns<'r, N> {
    fn push(
        &mut self,
        id: &'r str,
        keys: [&'r str; N],
        value: &'r Option<String>,
        typed: crate::store::flatten::Typed,
    ) {
        self.ids.push(id);
        self.keys.push(keys);
        self.values.push(value.as_deref());
        self.numbers.push(typed.number);
        self.bools.push(typed.boolean);
        self.dates.push(typed.date);
    }

    /// The key columns, one array each.
    fn keys(&self) -> [Vec<&'r str>; N] {
        std::array::from_fn(|k| self.keys.iter().map(|row| row[k]).collect())
    }
}
