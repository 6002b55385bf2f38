//! Confirmation reads waiting to be made (`entity_confirmation`), in PostgreSQL: recorded beside
//! a provisional read, moved by later notifications, handed out when due and closed when made.
//! The rules are the SQLite store's (`sqlite/confirmations.rs`): one row per entity, a later due
//! time wins together with the cause that set it.
//!
//! It stores and hands out what is due; it never decides when a read is provisional or calls
//! Fenergo (the sync worker does). Statements that change an entity row run only where that row
//! is already locked by the upsert, so they add no lock-order of their own.

use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;

use super::{Failure, ms};
use crate::store::{
    ConfirmationBacklog, EntitySnapshot, PendingConfirmation, ReadFollowUp, SyncCause,
};

/// Records what a worker's read leaves to do, in the read's transaction.
pub(super) async fn follow_up(
    tx: &impl GenericClient,
    tenant: &str,
    entity: &EntitySnapshot,
    cause: &SyncCause,
    follow_up: &ReadFollowUp,
) -> Result<(), Failure> {
    match follow_up {
        ReadFollowUp::Confirm {
            due_at,
            received_at,
            read_at,
        } => {
            let upsert = tx
                .prepare_cached(
                    "INSERT INTO entity_confirmation AS c (tenant_id, entity_id, due_at,
                         read_version, notification_id, event_type, event_when, received_at,
                         requested_at)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
                     ON CONFLICT (tenant_id, entity_id) DO UPDATE SET
                         read_version = EXCLUDED.read_version, attempts = 0,
                         requested_at = EXCLUDED.requested_at,
                         notification_id = CASE WHEN EXCLUDED.due_at >= c.due_at
                             THEN EXCLUDED.notification_id ELSE c.notification_id END,
                         event_type = CASE WHEN EXCLUDED.due_at >= c.due_at
                             THEN EXCLUDED.event_type ELSE c.event_type END,
                         event_when = CASE WHEN EXCLUDED.due_at >= c.due_at
                             THEN EXCLUDED.event_when ELSE c.event_when END,
                         received_at = CASE WHEN EXCLUDED.due_at >= c.due_at
                             THEN EXCLUDED.received_at ELSE c.received_at END,
                         due_at = greatest(c.due_at, EXCLUDED.due_at)",
                )
                .await?;
            tx.execute(
                &upsert,
                &[
                    &tenant,
                    &entity.entity_id,
                    &ms(*due_at),
                    &entity.version,
                    &cause.notification_id,
                    &cause.event_type,
                    &cause.event_when.map(ms),
                    &ms(*received_at),
                    &ms(*read_at),
                ],
            )
            .await?;
        }
        ReadFollowUp::Confirmed { at } => {
            let delete = tx
                .prepare_cached(
                    "DELETE FROM entity_confirmation
                      WHERE tenant_id = $1 AND entity_id = $2 AND due_at <= $3",
                )
                .await?;
            tx.execute(&delete, &[&tenant, &entity.entity_id, &ms(*at)])
                .await?;
            mark_confirmed(tx, tenant, &[entity.entity_id.as_str()], *at).await?;
        }
    }
    Ok(())
}

/// A notification to let a pending confirmation serve, and when the read it needs was taken.
pub(super) struct Deferral<'a> {
    pub entity_id: &'a str,
    pub read_after: DateTime<Utc>,
    pub due_at: DateTime<Utc>,
    pub cause: &'a SyncCause,
    pub received_at: DateTime<Utc>,
}

/// Moves the pending confirmation of the entity to serve `d.cause`; whether there was one
/// recent enough.
pub(super) async fn defer(
    client: &impl GenericClient,
    tenant: &str,
    d: &Deferral<'_>,
) -> Result<bool, Failure> {
    let update = client
        .prepare_cached(
            "UPDATE entity_confirmation SET
                 notification_id = CASE WHEN $4 >= due_at THEN $5 ELSE notification_id END,
                 event_type = CASE WHEN $4 >= due_at THEN $6 ELSE event_type END,
                 event_when = CASE WHEN $4 >= due_at THEN $7 ELSE event_when END,
                 received_at = CASE WHEN $4 >= due_at THEN $8 ELSE received_at END,
                 due_at = greatest(due_at, $4)
              WHERE tenant_id = $1 AND entity_id = $2 AND requested_at > $3",
        )
        .await?;
    let changed = client
        .execute(
            &update,
            &[
                &tenant,
                &d.entity_id,
                &ms(d.read_after),
                &ms(d.due_at),
                &d.cause.notification_id,
                &d.cause.event_type,
                &d.cause.event_when.map(ms),
                &ms(d.received_at),
            ],
        )
        .await?;
    Ok(changed > 0)
}

/// Up to `limit` confirmations due by `now`, the longest overdue first.
pub(super) async fn due(
    client: &impl GenericClient,
    tenant: &str,
    now: DateTime<Utc>,
    limit: usize,
) -> Result<Vec<PendingConfirmation>, Failure> {
    let select = client
        .prepare_cached(
            "SELECT entity_id, due_at, read_version, notification_id, event_type, event_when,
                    received_at, attempts
               FROM entity_confirmation WHERE tenant_id = $1 AND due_at <= $2
              ORDER BY due_at LIMIT $3",
        )
        .await?;
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let rows = client.query(&select, &[&tenant, &ms(now), &limit]).await?;
    Ok(rows
        .iter()
        .map(|r| PendingConfirmation {
            entity_id: r.get(0),
            due_at: r.get(1),
            read_version: r.get(2),
            cause: SyncCause {
                notification_id: r.get(3),
                event_type: r.get(4),
                event_when: r.get(5),
            },
            received_at: r.get(6),
            attempts: r.get(7),
        })
        .collect())
}

pub(super) async fn backlog(
    client: &impl GenericClient,
    tenant: &str,
    now: DateTime<Utc>,
) -> Result<ConfirmationBacklog, Failure> {
    let select = client
        .prepare_cached(
            "SELECT count(*), min(due_at) FROM entity_confirmation
              WHERE tenant_id = $1 AND due_at <= $2",
        )
        .await?;
    let row = client.query_one(&select, &[&tenant, &ms(now)]).await?;
    Ok(ConfirmationBacklog {
        due: row.get(0),
        oldest_due: row.get(1),
    })
}

/// Deletes each confirmation unless a later provisional read has moved its due time.
pub(super) async fn close(
    client: &impl GenericClient,
    tenant: &str,
    pending: &[&PendingConfirmation],
) -> Result<(), Failure> {
    let ids: Vec<&str> = pending.iter().map(|p| p.entity_id.as_str()).collect();
    let due: Vec<DateTime<Utc>> = pending.iter().map(|p| p.due_at).collect();
    let delete = client
        .prepare_cached(
            "DELETE FROM entity_confirmation AS c
              USING unnest($2::text[], $3::timestamptz[]) AS d(entity_id, due_at)
              WHERE c.tenant_id = $1 AND c.entity_id = d.entity_id AND c.due_at = d.due_at",
        )
        .await?;
    client.execute(&delete, &[&tenant, &ids, &due]).await?;
    Ok(())
}

/// Reads proved these entities exist at their stored version (or newer) as of `at`.
pub(super) async fn mark_confirmed(
    client: &impl GenericClient,
    tenant: &str,
    entity_ids: &[&str],
    at: DateTime<Utc>,
) -> Result<(), Failure> {
    let update = client
        .prepare_cached(
            "UPDATE entity SET confirmed_at = $3, absent_since = NULL
              WHERE tenant_id = $1 AND entity_id = ANY($2)",
        )
        .await?;
    client
        .execute(&update, &[&tenant, &entity_ids, &ms(at)])
        .await?;
    Ok(())
}

/// A confirmation read failed: due again at `retry_at`.
pub(super) async fn postpone(
    client: &impl GenericClient,
    tenant: &str,
    pending: &PendingConfirmation,
    retry_at: DateTime<Utc>,
) -> Result<(), Failure> {
    let update = client
        .prepare_cached(
            "UPDATE entity_confirmation SET due_at = $4, attempts = attempts + 1
              WHERE tenant_id = $1 AND entity_id = $2 AND due_at = $3",
        )
        .await?;
    client
        .execute(
            &update,
            &[&tenant, &pending.entity_id, &pending.due_at, &ms(retry_at)],
        )
        .await?;
    Ok(())
}

/// Confirmations not made yet, due or not.
pub(super) async fn pending(client: &impl GenericClient, tenant: &str) -> Result<i64, Failure> {
    let select = client
        .prepare_cached("SELECT count(*) FROM entity_confirmation WHERE tenant_id = $1")
        .await?;
    Ok(client.query_one(&select, &[&tenant]).await?.get(0))
}
