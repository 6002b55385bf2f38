//! The outbox writer thread: drains the append queue and writes everything waiting in one
//! transaction (group commit), answering each caller only after that COMMIT returned.
//!
//! It must never answer before the commit, and never report one caller's failure as another's
//! success: a failed group fails every request in it. Each group commit's outcome is recorded in
//! [`StoreHealth`]: a committed group is the proof of writability that readiness needs, so a
//! busy outbox needs no separate probe.

use std::sync::Arc;

use rusqlite::{Connection, TransactionBehavior};
use tokio::sync::{mpsc, oneshot};

use super::checkpoint::Checkpointer;
use super::{Appended, Command, NewNotification, OutboxError};
use crate::health::{StoreHealth, Writer};

pub(super) fn run(
    mut conn: Connection,
    mut rx: mpsc::Receiver<Command>,
    max_batch: usize,
    health: &StoreHealth,
    checkpointer: &Checkpointer,
) {
    while let Some(first) = rx.blocking_recv() {
        let mut appends = Vec::new();
        let mut rows = 0;
        let mut next = Some(first);
        while let Some(Command::Append { rows: r, reply }) = next.take() {
            rows += r.len();
            appends.push((r, reply));
            if rows < max_batch {
                next = rx.try_recv().ok();
            }
        }
        let write = health.begin_write(Writer::GroupCommit);
        let result = commit_appends(&mut conn, &appends);
        write.finish(result.as_ref().map(drop).map_err(ToString::to_string));
        answer_appends(result, appends);
        checkpointer.finish(&conn);
    }
}

type PendingAppend = (
    Vec<NewNotification>,
    oneshot::Sender<Result<Vec<Appended>, OutboxError>>,
);

fn answer_appends(
    result: Result<Vec<Vec<Appended>>, rusqlite::Error>,
    appends: Vec<PendingAppend>,
) {
    match result {
        Ok(outcomes) => {
            for ((_, reply), outcome) in appends.into_iter().zip(outcomes) {
                let _ = reply.send(Ok(outcome));
            }
        }
        Err(error) => {
            tracing::error!(%error, requests = appends.len(), "outbox group commit failed");
            let error = Arc::new(error);
            for (_, reply) in appends {
                let _ = reply.send(Err(OutboxError::Write(error.clone())));
            }
        }
    }
}

/// Writes every waiting append in one transaction. On any error nothing is committed and every
/// caller in the group is told so.
///
/// A plain insert that does nothing on a known id keeps the common case to one statement with
/// no statement journal (an upsert with RETURNING copies every page it touches first); only a
/// duplicate costs a second statement, to count it. Rows go in with `entity_indexed = 0`: the
/// worker's claim puts them in the entity index, many to a page, so an append dirties only the
/// id index's page at random (schema.sql, outbox block 3).
fn commit_appends(
    conn: &mut Connection,
    appends: &[PendingAppend],
) -> Result<Vec<Vec<Appended>>, rusqlite::Error> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let now = crate::time::now();
    let mut outcomes = Vec::with_capacity(appends.len());
    {
        let mut insert = tx.prepare_cached(
            "INSERT INTO notification (id, id_derived, event_type, tenant_id, relative_url,
                 event_when, correlation_id, causation_id, source, signature_recipe,
                 received_at, raw, entity_key, next_attempt_at, entity_indexed)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?11, 0)
             ON CONFLICT (id) DO NOTHING",
        )?;
        let mut count_duplicate = tx.prepare_cached(
            "UPDATE notification SET duplicates = duplicates + 1, last_duplicate_at = ?2
              WHERE id = ?1",
        )?;
        for (rows, _) in appends {
            let mut outcome = Vec::with_capacity(rows.len());
            for row in rows {
                let n = &row.notification;
                let inserted = insert.execute(rusqlite::params![
                    n.id,
                    n.id_derived,
                    n.event_type,
                    n.tenant_id,
                    n.relative_url,
                    n.when,
                    n.correlation_id,
                    n.causation_id,
                    row.source.as_str(),
                    row.signature_recipe.map(|r| r.to_string()),
                    now,
                    n.raw.as_ref(),
                    n.entity_key,
                ])?;
                outcome.push(if inserted == 1 {
                    Appended::Stored
                } else {
                    count_duplicate.execute(rusqlite::params![n.id, now])?;
                    Appended::Duplicate
                });
            }
            outcomes.push(outcome);
        }
    }
    tx.commit()?;
    Ok(outcomes)
}
