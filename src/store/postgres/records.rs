//! What the PostgreSQL store keeps beside the entities: the log of processed notifications,
//! recorded state, backfill and reconciliation runs (with listed and absent entities), history
//! pruning, the store's size, and read access for analysts.
//!
//! Every statement is keyed by the tenant; statements that lock many rows of one table lock them
//! in key (byte) order, as the entity upsert does, so they never deadlock with each other or with
//! it. It never deletes an entity.

use chrono::{DateTime, Utc};
use deadpool_postgres::{Client, GenericClient};

use super::{Failure, PgError, ms};
use crate::store::{
    ProcessedNotification, ReconcileRun, RunCounts, RunKind, StateEntry, StateKey, StoreStats,
};

/// Logs `records` (the last of a repeated id wins) in notification-id order.
pub(super) async fn log_processed(
    client: &impl GenericClient,
    tenant: &str,
    records: &[ProcessedNotification],
    processed_at: DateTime<Utc>,
) -> Result<(), Failure> {
    let mut order: Vec<&ProcessedNotification> = records.iter().rev().collect();
    // Stable: of a repeated id, the last given sorts first and is the one kept.
    order.sort_by(|a, b| a.notification_id.cmp(&b.notification_id));
    order.dedup_by(|later, kept| later.notification_id == kept.notification_id);
    let column = |f: fn(&ProcessedNotification) -> Option<&str>| -> Vec<Option<&str>> {
        order.iter().map(|r| f(r)).collect()
    };
    let ids = column(|r| Some(&r.notification_id));
    let events = column(|r| r.event_type.as_deref());
    let entities = column(|r| r.entity_id.as_deref());
    let outcomes = column(|r| Some(r.outcome.as_str()));
    let details = column(|r| r.detail.as_deref());
    let attempts: Vec<i64> = order.iter().map(|r| r.attempts).collect();
    let received: Vec<DateTime<Utc>> = order.iter().map(|r| ms(r.received_at)).collect();
    let whens: Vec<Option<DateTime<Utc>>> = order.iter().map(|r| r.event_when.map(ms)).collect();
    let insert = client
        .prepare_cached(
            "INSERT INTO sync_log (tenant_id, notification_id, event_type, entity_id, outcome,
                 attempts, received_at, event_when, processed_at, detail)
             SELECT $1, n, e, en, o, a, r, w, $9, d
               FROM unnest($2::text[], $3::text[], $4::text[], $5::text[], $6::bigint[],
                           $7::timestamptz[], $8::timestamptz[], $10::text[])
                    WITH ORDINALITY AS i(n, e, en, o, a, r, w, d, ord)
              ORDER BY ord
             ON CONFLICT (tenant_id, notification_id) DO UPDATE SET
                 event_type = EXCLUDED.event_type, entity_id = EXCLUDED.entity_id,
                 outcome = EXCLUDED.outcome, attempts = EXCLUDED.attempts,
                 received_at = EXCLUDED.received_at, event_when = EXCLUDED.event_when,
                 processed_at = EXCLUDED.processed_at, detail = EXCLUDED.detail",
        )
        .await?;
    client
        .execute(
            &insert,
            &[
                &tenant,
                &ids,
                &events,
                &entities,
                &outcomes,
                &attempts,
                &received,
                &whens,
                &processed_at,
                &details,
            ],
        )
        .await?;
    Ok(())
}

pub(super) async fn put_state(
    client: &impl GenericClient,
    tenant: &str,
    key: StateKey,
    value: &str,
    since: DateTime<Utc>,
) -> Result<(), Failure> {
    let upsert = client
        .prepare_cached(
            "INSERT INTO sync_state (tenant_id, key, value, since, updated_at)
             VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (tenant_id, key) DO UPDATE SET value = EXCLUDED.value,
                 since = EXCLUDED.since, updated_at = EXCLUDED.updated_at",
        )
        .await?;
    client
        .execute(
            &upsert,
            &[&tenant, &key.as_str(), &value, &ms(since), &ms(Utc::now())],
        )
        .await?;
    Ok(())
}

pub(super) async fn clear_state(
    client: &impl GenericClient,
    tenant: &str,
    key: StateKey,
) -> Result<(), Failure> {
    let delete = client
        .prepare_cached("DELETE FROM sync_state WHERE tenant_id = $1 AND key = $2")
        .await?;
    client.execute(&delete, &[&tenant, &key.as_str()]).await?;
    Ok(())
}

pub(super) async fn state(
    client: &impl GenericClient,
    tenant: &str,
    key: StateKey,
) -> Result<Option<StateEntry>, Failure> {
    let select = client
        .prepare_cached("SELECT value, since FROM sync_state WHERE tenant_id = $1 AND key = $2")
        .await?;
    let row = client.query_opt(&select, &[&tenant, &key.as_str()]).await?;
    Ok(row.map(|r| StateEntry {
        value: r.get(0),
        since: r.get(1),
    }))
}

/// `key` for every tenant, by tenant id.
pub(super) async fn state_of_every_tenant(
    client: &impl GenericClient,
    key: StateKey,
) -> Result<Vec<(String, StateEntry)>, Failure> {
    let select = client
        .prepare_cached(
            "SELECT tenant_id, value, since FROM sync_state WHERE key = $1 ORDER BY tenant_id",
        )
        .await?;
    let rows = client.query(&select, &[&key.as_str()]).await?;
    Ok(rows
        .iter()
        .map(|r| {
            let entry = StateEntry {
                value: r.get(1),
                since: r.get(2),
            };
            (r.get(0), entry)
        })
        .collect())
}

pub(super) async fn running_run(
    client: &impl GenericClient,
    tenant: &str,
    kind: RunKind,
) -> Result<Option<ReconcileRun>, Failure> {
    let select = client
        .prepare_cached(
            "SELECT run_id, cursor, total_items, seen, added, updated, unchanged FROM reconcile_run
              WHERE tenant_id = $1 AND kind = $2 AND status = 'running'
              ORDER BY run_id DESC LIMIT 1",
        )
        .await?;
    let row = client
        .query_opt(&select, &[&tenant, &kind.as_str()])
        .await?;
    Ok(row.map(|r| ReconcileRun {
        run_id: r.get(0),
        cursor: r.get(1),
        total_items: r.get(2),
        counts: RunCounts {
            seen: r.get(3),
            added: r.get(4),
            updated: r.get(5),
            unchanged: r.get(6),
        },
    }))
}

/// Closes the tenant's unfinished runs of `kind` and starts a new one.
pub(super) async fn start_run(
    client: &mut Client,
    tenant: &str,
    kind: RunKind,
    now: DateTime<Utc>,
) -> Result<ReconcileRun, Failure> {
    let tx = client.transaction().await?;
    let close = tx
        .prepare_cached(
            "UPDATE reconcile_run SET status = 'finished', finished_at = $3
              WHERE tenant_id = $1 AND kind = $2 AND status = 'running'",
        )
        .await?;
    tx.execute(&close, &[&tenant, &kind.as_str(), &now]).await?;
    let insert = tx
        .prepare_cached(
            "INSERT INTO reconcile_run (tenant_id, kind, status, started_at, updated_at)
             VALUES ($1, $2, 'running', $3, $3) RETURNING run_id",
        )
        .await?;
    let run_id: i64 = tx
        .query_one(&insert, &[&tenant, &kind.as_str(), &now])
        .await?
        .get(0);
    tx.commit().await?;
    Ok(ReconcileRun {
        run_id,
        cursor: None,
        total_items: None,
        counts: RunCounts::default(),
    })
}

pub(super) async fn save_run(
    client: &impl GenericClient,
    tenant: &str,
    run: &ReconcileRun,
    finished: bool,
    now: DateTime<Utc>,
) -> Result<(), Failure> {
    let update = client
        .prepare_cached(
            "UPDATE reconcile_run SET cursor = $3, total_items = $4, seen = $5, added = $6,
                    updated = $7, unchanged = $8, updated_at = $9,
                    status = CASE WHEN $10 THEN 'finished' ELSE 'running' END,
                    finished_at = CASE WHEN $10 THEN $9::timestamptz END
              WHERE tenant_id = $1 AND run_id = $2",
        )
        .await?;
    let c = &run.counts;
    client
        .execute(
            &update,
            &[
                &tenant,
                &run.run_id,
                &run.cursor,
                &run.total_items,
                &c.seen,
                &c.added,
                &c.updated,
                &c.unchanged,
                &now,
                &finished,
            ],
        )
        .await?;
    Ok(())
}

pub(super) async fn mark_listed(
    client: &impl GenericClient,
    tenant: &str,
    run_id: i64,
    entity_ids: &[String],
) -> Result<(), Failure> {
    let update = client
        .prepare_cached(
            "UPDATE entity AS e SET last_listed_run = $2, absent_since = NULL
               FROM (SELECT entity_id FROM entity WHERE tenant_id = $1 AND entity_id = ANY($3)
                      ORDER BY entity_id COLLATE \"C\" FOR UPDATE) AS l
              WHERE e.tenant_id = $1 AND e.entity_id = l.entity_id",
        )
        .await?;
    client
        .execute(&update, &[&tenant, &run_id, &entity_ids])
        .await?;
    Ok(())
}

/// Marks `absent_since` on the tenant's entities run `run_id` did not list, except those first
/// written after it started (the list may not show them yet).
pub(super) async fn mark_absent(
    client: &impl GenericClient,
    tenant: &str,
    run_id: i64,
    now: DateTime<Utc>,
) -> Result<u64, Failure> {
    let update = client
        .prepare_cached(
            "UPDATE entity AS e SET absent_since = $3
               FROM (SELECT entity_id FROM entity
                      WHERE tenant_id = $1 AND absent_since IS NULL
                        AND (last_listed_run IS NULL OR last_listed_run <> $2)
                        AND synced_at <= (SELECT started_at FROM reconcile_run
                                           WHERE tenant_id = $1 AND run_id = $2)
                      ORDER BY entity_id COLLATE \"C\" FOR UPDATE) AS l
              WHERE e.tenant_id = $1 AND e.entity_id = l.entity_id",
        )
        .await?;
    Ok(client.execute(&update, &[&tenant, &run_id, &now]).await?)
}

pub(super) async fn last_run_started(
    client: &impl GenericClient,
    tenant: &str,
    kind: RunKind,
) -> Result<Option<DateTime<Utc>>, Failure> {
    let select = client
        .prepare_cached(
            "SELECT max(started_at) FROM reconcile_run WHERE tenant_id = $1 AND kind = $2",
        )
        .await?;
    Ok(client
        .query_one(&select, &[&tenant, &kind.as_str()])
        .await?
        .get(0))
}

/// Deletes the tenant's history rows stored before `before`, except each entity's current one.
pub(super) async fn prune_history(
    client: &impl GenericClient,
    tenant: &str,
    before: DateTime<Utc>,
) -> Result<u64, Failure> {
    let delete = client
        .prepare_cached(
            "DELETE FROM entity_version AS v
              WHERE v.tenant_id = $1 AND v.stored_at < $2
                AND NOT EXISTS (SELECT 1 FROM entity AS e WHERE e.tenant_id = v.tenant_id
                                   AND e.entity_id = v.entity_id AND e.version = v.version)",
        )
        .await?;
    Ok(client.execute(&delete, &[&tenant, &before]).await?)
}

/// The reporting tables, for their size (`entity_collection` is a view over
/// `entity_collection_field`).
const TABLES: [&str; 10] = [
    "entity",
    "entity_property",
    "entity_collection_field",
    "entity_version",
    "sync_log",
    "reconcile_run",
    "sync_state",
    "entity_confirmation",
    "deferred_index",
    "schema_version",
];

pub(super) async fn stats(
    client: &impl GenericClient,
    tenant: &str,
) -> Result<StoreStats, Failure> {
    let select = client
        .prepare_cached(
            "SELECT (SELECT count(*) FROM entity WHERE tenant_id = $1),
                    (SELECT count(*) FROM entity_version WHERE tenant_id = $1),
                    (SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0)::bigint
                       FROM pg_class AS c JOIN pg_namespace AS n ON n.oid = c.relnamespace
                      WHERE n.nspname = current_schema() AND c.relname = ANY($2)
                        AND c.relkind = 'r'),
                    pg_total_relation_size('entity_version'),
                    (SELECT coalesce(array_agg(name::text ORDER BY name), '{}')
                       FROM deferred_index)",
        )
        .await?;
    let row = client.query_one(&select, &[&tenant, &&TABLES[..]]).await?;
    let bytes: i64 = row.get(2);
    let history: i64 = row.get(3);
    Ok(StoreStats {
        entities: row.get(0),
        versions: row.get(1),
        bytes,
        bytes_without_history: bytes - history,
        deferred_indexes: row.get(4),
    })
}

/// Lets `role` read every table and view in the store's schema, now and as later migrations
/// create them.
pub(super) async fn grant_read(client: &mut Client, role: &str) -> Result<(), Failure> {
    let role = quote_identifier(role)?;
    let tx = client.transaction().await?;
    let schema: String = tx.query_one("SELECT current_schema()", &[]).await?.get(0);
    let schema = quote_identifier(&schema)?;
    tx.batch_execute(&format!(
        "GRANT USAGE ON SCHEMA {schema} TO {role};
         GRANT SELECT ON ALL TABLES IN SCHEMA {schema} TO {role};
         ALTER DEFAULT PRIVILEGES IN SCHEMA {schema} GRANT SELECT ON TABLES TO {role};"
    ))
    .await?;
    tx.commit().await?;
    Ok(())
}

/// `name` as a quoted SQL identifier: any text but NUL is a valid one once its quotes double.
fn quote_identifier(name: &str) -> Result<String, Failure> {
    if name.is_empty() || name.contains('\0') {
        return Err(Failure::Refused(PgError::BadRole(name.to_owned())));
    }
    Ok(format!("\"{}\"", name.replace('"', "\"\"")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_are_quoted_so_no_text_escapes_them() {
        assert_eq!(quote_identifier("analyst").ok(), Some("\"analyst\"".into()));
        assert_eq!(
            quote_identifier("x\"; DROP TABLE entity; --").ok(),
            Some("\"x\"\"; DROP TABLE entity; --\"".into())
        );
        assert!(quote_identifier("").is_err());
        assert!(quote_identifier("a\0b").is_err());
    }
}
