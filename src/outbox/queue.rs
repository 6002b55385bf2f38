//! The sync worker's side of the outbox: claiming due notifications under an entity lease, and
//! settling them (done, ignored, retry at a time, dead) with their retry schedule persisted so
//! restarts keep it.
//!
//! A claim takes the pending row that has been due longest (new rows are due on arrival, so they
//! go in arrival order; a retry takes its place when its time comes) and every other pending row
//! for the same entity (coalesced into one fetch), and leases the entity so no two workers work
//! on it at once. Finding that row is a range scan over rows already due, so rows waiting for a
//! later retry cost a claim nothing. A crashed worker's lease expires and the rows come back.
//! Appends leave the entity index alone; each claim first indexes the rows appended since the
//! last one (a bounded range scan), so coalescing sees them.
//! This module never deletes a notification (only the leases it took).

use std::sync::{LazyLock, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

use super::{NotificationStatus, OutboxError};
use crate::sqlite::time_column;
use crate::time;

use NotificationStatus::{Dead, Done, Ignored, Pending};

/// The most rows one claim coalesces (a burst of duplicates for one entity).
const MAX_GROUP: i64 = 1000;

/// The pending row due longest whose entity nobody holds. The status is written into the text
/// (not bound) so the planner can prove the partial index `notification_due` applies.
static DUE_FIRST: LazyLock<String> = LazyLock::new(|| {
    format!(
        "SELECT seq, entity_key FROM notification AS n INDEXED BY notification_due
          WHERE status = '{Pending}' AND next_attempt_at <= ?1
            AND NOT EXISTS (SELECT 1 FROM entity_lease AS l
                             WHERE l.entity_key = coalesce(n.entity_key, 'seq:' || n.seq)
                               AND l.leased_until > ?1)
          ORDER BY next_attempt_at, seq LIMIT 1"
    )
});

/// The most appended rows one claim moves into the entity index: after a burst, the backlog is
/// worked off over many claims, so no claim holds the write lock (and ingest) for long.
const INDEX_PER_CLAIM: i64 = 2000;

/// Puts rows appended since the last claim (oldest first) into `notification_pending_entity`:
/// a range scan over `notification_unindexed`, which appends grow at its end.
const INDEX_APPENDED: &str = "UPDATE notification SET entity_indexed = 1
  WHERE seq IN (SELECT seq FROM notification INDEXED BY notification_unindexed
                 WHERE entity_indexed = 0 ORDER BY seq LIMIT ?1)";

/// The claimed row and every indexed pending row of its entity, through the partial index
/// `notification_pending_entity`. The claimed row is named on its own, so a claim takes it
/// even while a burst's rows wait for the index; those of its entity that still wait are
/// claimed after.
static PENDING_OF_ENTITY: LazyLock<String> = LazyLock::new(|| {
    format!(
        "SELECT {CLAIMED_COLUMNS} FROM notification WHERE seq = ?3
         UNION
         SELECT {CLAIMED_COLUMNS} FROM notification INDEXED BY notification_pending_entity
          WHERE status = '{Pending}' AND entity_indexed = 1 AND entity_key = ?1
          ORDER BY seq LIMIT ?2"
    )
});

const CLAIMED_COLUMNS: &str = "seq, id, event_type, relative_url, entity_key, attempts, \
     received_at, event_when, stale_reads";

/// A claimed notification.
#[derive(Debug, Clone, PartialEq)]
pub struct Claimed {
    pub seq: i64,
    pub id: String,
    pub event_type: Option<String>,
    pub relative_url: Option<String>,
    pub entity_key: Option<String>,
    pub attempts: i64,
    /// Stale re-fetches so far (their own budget, apart from `attempts`).
    pub stale_reads: i64,
    pub received_at: DateTime<Utc>,
    /// `When` as Fenergo sent it, where [`time::parse`] can read it (the row keeps the text).
    pub event_when: Option<DateTime<Utc>>,
}

/// Rows leased together: every pending row for one entity (or one row with no entity).
#[derive(Debug, Clone)]
pub struct Claim {
    pub lease_key: String,
    /// Oldest first.
    pub rows: Vec<Claimed>,
}

/// What became of one claimed row.
#[derive(Debug, Clone, PartialEq)]
pub enum RowOutcome {
    Done {
        status: Option<u16>,
    },
    Ignored,
    /// Try again at `at`; `count_attempt` is false for waits that are not failures (429).
    RetryAt {
        at: DateTime<Utc>,
        error: String,
        status: Option<u16>,
        count_attempt: bool,
    },
    /// A stale read: re-fetch at `at`, counting against the stale budget, not `attempts`.
    StaleRetryAt {
        at: DateTime<Utc>,
        error: String,
    },
    Dead {
        reason: String,
        status: Option<u16>,
    },
}

#[derive(Debug, Clone)]
pub struct Settlement {
    pub seq: i64,
    pub outcome: RowOutcome,
}

/// The worker-side connection to `outbox.db` (shared by the worker tasks; each call is short and
/// runs on a blocking thread).
pub struct WorkQueue {
    conn: Mutex<Connection>,
}

impl WorkQueue {
    pub fn open(dir: &std::path::Path, busy_timeout: Duration) -> Result<WorkQueue, OutboxError> {
        Ok(WorkQueue {
            // A claim or settlement lost to a power cut only repeats idempotent work, so these
            // commits skip the fsync that appends need, and contend less with ingest.
            conn: Mutex::new(super::open_connection(
                dir,
                super::Durability::Normal,
                busy_timeout,
            )?),
        })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Claims the notification due longest whose entity nobody holds, with every other pending
    /// notification for that entity, and leases the entity to `owner` until `now + lease`.
    pub fn claim(
        &self,
        owner: &str,
        lease: Duration,
        now: DateTime<Utc>,
    ) -> Result<Option<Claim>, OutboxError> {
        let mut conn = self.conn();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(write_error)?;
        tx.prepare_cached(INDEX_APPENDED)
            .and_then(|mut stmt| stmt.execute([INDEX_PER_CLAIM]))
            .map_err(write_error)?;
        let now_text = time::format(now);
        let first: Option<(i64, Option<String>)> = tx
            .query_row(&DUE_FIRST, [&now_text], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()
            .map_err(write_error)?;
        let Some((seq, entity_key)) = first else {
            // Keeps the rows just indexed.
            tx.commit().map_err(write_error)?;
            return Ok(None);
        };
        let lease_key = entity_key.clone().unwrap_or_else(|| format!("seq:{seq}"));
        let rows = tx
            .prepare_cached(&PENDING_OF_ENTITY)
            .and_then(|mut stmt| {
                stmt.query_map(params![entity_key, MAX_GROUP, seq], |r| {
                    Ok(Claimed {
                        seq: r.get(0)?,
                        id: r.get(1)?,
                        event_type: r.get(2)?,
                        relative_url: r.get(3)?,
                        entity_key: r.get(4)?,
                        attempts: r.get(5)?,
                        received_at: time_column(r, 6)?,
                        event_when: r
                            .get::<_, Option<String>>(7)?
                            .as_deref()
                            .and_then(time::parse),
                        stale_reads: r.get(8)?,
                    })
                })?
                .collect::<Result<Vec<_>, _>>()
            })
            .map_err(write_error)?;
        let until = now + chrono::Duration::from_std(lease).unwrap_or(chrono::Duration::MAX);
        tx.execute(
            "INSERT INTO entity_lease (entity_key, owner, leased_until) VALUES (?1, ?2, ?3)
             ON CONFLICT (entity_key) DO UPDATE SET owner = excluded.owner, leased_until = excluded.leased_until",
            params![lease_key, owner, time::format(until)],
        )
        .map_err(write_error)?;
        tx.commit().map_err(write_error)?;
        Ok(Some(Claim { lease_key, rows }))
    }

    /// Records what became of each row and releases `owner`'s lease, in one transaction.
    pub fn settle(
        &self,
        lease_key: &str,
        owner: &str,
        settlements: &[Settlement],
    ) -> Result<(), OutboxError> {
        let mut conn = self.conn();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(write_error)?;
        let now = crate::time::now();
        for s in settlements {
            let changed = match &s.outcome {
                RowOutcome::Done { status } => tx.execute(
                    "UPDATE notification SET status = ?4, attempts = attempts + 1,
                            last_error = NULL, last_status = ?2, processed_at = ?3
                      WHERE seq = ?1 AND status = ?5",
                    params![s.seq, status, now, Done, Pending],
                ),
                RowOutcome::Ignored => tx.execute(
                    "UPDATE notification SET status = ?3, processed_at = ?2
                      WHERE seq = ?1 AND status = ?4",
                    params![s.seq, now, Ignored, Pending],
                ),
                RowOutcome::RetryAt {
                    at,
                    error,
                    status,
                    count_attempt,
                } => tx.execute(
                    "UPDATE notification SET next_attempt_at = ?2, attempts = attempts + ?3,
                            last_error = ?4, last_status = ?5
                      WHERE seq = ?1 AND status = ?6",
                    params![
                        s.seq,
                        time::format(*at),
                        i64::from(*count_attempt),
                        error,
                        status,
                        Pending
                    ],
                ),
                RowOutcome::StaleRetryAt { at, error } => tx.execute(
                    "UPDATE notification SET next_attempt_at = ?2, stale_reads = stale_reads + 1,
                            last_error = ?3, last_status = 200
                      WHERE seq = ?1 AND status = ?4",
                    params![s.seq, time::format(*at), error, Pending],
                ),
                RowOutcome::Dead { reason, status } => tx.execute(
                    "UPDATE notification SET status = ?5, attempts = attempts + 1,
                            last_error = ?2, last_status = ?3, processed_at = ?4
                      WHERE seq = ?1 AND status = ?6",
                    params![s.seq, reason, status, now, Dead, Pending],
                ),
            };
            changed.map_err(write_error)?;
        }
        tx.execute(
            "DELETE FROM entity_lease WHERE entity_key = ?1 AND owner = ?2",
            params![lease_key, owner],
        )
        .map_err(write_error)?;
        tx.commit().map_err(write_error)
    }
}

fn write_error(e: rusqlite::Error) -> OutboxError {
    OutboxError::Write(std::sync::Arc::new(e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbox::{NewNotification, Outbox, OutboxOptions, Source};
    use bytes::Bytes;

    async fn outbox_with(dir: &std::path::Path, bodies: &[String]) {
        let options = OutboxOptions {
            busy_timeout: Duration::from_secs(1),
            max_batch: 100,
            queue_capacity: 10,
            enqueue_timeout: Duration::from_secs(1),
        };
        let (outbox, writer) = Outbox::open(dir, &options).unwrap();
        let rows = bodies
            .iter()
            .flat_map(|b| crate::notification::parse_body(&Bytes::from(b.clone())).unwrap())
            .map(|notification| NewNotification {
                notification,
                source: Source::Webhook,
                signature_recipe: None,
            })
            .collect();
        outbox.append_batch(rows).await.unwrap();
        drop(outbox);
        writer.wait();
    }

    fn body(id: &str, entity: &str) -> String {
        format!(
            r#"{{"Id":"{id}","EventType":"entitydata:draftverified","RelativeUrl":"entitydataquery/api/entity/{entity}"}}"#
        )
    }

    fn ids(claim: &Claim) -> Vec<&str> {
        claim.rows.iter().map(|r| r.id.as_str()).collect()
    }

    fn unindexed(dir: &std::path::Path) -> i64 {
        Connection::open(dir.join(super::super::FILE_NAME))
            .unwrap()
            .query_row(
                "SELECT count(*) FROM notification WHERE entity_indexed = 0",
                [],
                |r| r.get(0),
            )
            .unwrap()
    }

    #[tokio::test]
    async fn appends_leave_the_entity_index_to_the_claim_which_still_coalesces_them() {
        let dir = tempfile::tempdir().unwrap();
        let no_entity = r#"{"Id":"loose","EventType":"entitydata:draftverified"}"#.to_owned();
        outbox_with(
            dir.path(),
            &[body("1", "A"), no_entity, body("2", "B"), body("3", "A")],
        )
        .await;
        assert_eq!(unindexed(dir.path()), 4);
        let q = WorkQueue::open(dir.path(), Duration::from_secs(1)).unwrap();
        let (now, lease) = (Utc::now(), Duration::from_secs(60));
        let a = q.claim("w1", lease, now).unwrap().unwrap();
        assert_eq!(ids(&a), ["1", "3"]);
        assert_eq!(unindexed(dir.path()), 0);
        let loose = q.claim("w2", lease, now).unwrap().unwrap();
        assert_eq!(
            (loose.lease_key.starts_with("seq:"), ids(&loose)),
            (true, vec!["loose"])
        );
        outbox_with(dir.path(), &[body("4", "B")]).await;
        let b = q.claim("w3", lease, now).unwrap().unwrap();
        assert_eq!(ids(&b), ["2", "4"]);
    }

    #[tokio::test]
    async fn claims_coalesce_an_entity_and_lease_it_from_other_workers() {
        let dir = tempfile::tempdir().unwrap();
        outbox_with(
            dir.path(),
            &[
                body("1", "A"),
                body("2", "B"),
                body("3", "A"),
                body("4", "C"),
            ],
        )
        .await;
        let q = WorkQueue::open(dir.path(), Duration::from_secs(1)).unwrap();
        let now = Utc::now();
        let lease = Duration::from_secs(60);
        let a = q.claim("w1", lease, now).unwrap().unwrap();
        assert_eq!((a.lease_key.as_str(), ids(&a)), ("A", vec!["1", "3"]));
        let b = q.claim("w2", lease, now).unwrap().unwrap();
        assert_eq!(ids(&b), ["2"]);
        let c = q.claim("w3", lease, now).unwrap().unwrap();
        assert_eq!(ids(&c), ["4"]);
        assert!(q.claim("w4", lease, now).unwrap().is_none());

        // w1 crashes; after its lease expires, another worker gets entity A back.
        let later = now + chrono::Duration::seconds(61);
        q.settle(
            &b.lease_key,
            "w2",
            &[Settlement {
                seq: b.rows[0].seq,
                outcome: RowOutcome::Done { status: Some(200) },
            }],
        )
        .unwrap();
        let again = q.claim("w5", lease, later).unwrap().unwrap();
        assert_eq!(ids(&again), ["1", "3"]);
    }

    fn retry(q: &WorkQueue, claim: &Claim, at: DateTime<Utc>) {
        let outcome = RowOutcome::RetryAt {
            at,
            error: "HTTP 404".into(),
            status: Some(404),
            count_attempt: true,
        };
        let settlements: Vec<Settlement> = claim
            .rows
            .iter()
            .map(|r| Settlement {
                seq: r.seq,
                outcome: outcome.clone(),
            })
            .collect();
        q.settle(&claim.lease_key, "w", &settlements).unwrap();
    }

    #[tokio::test]
    async fn claims_take_the_row_due_longest_first() {
        let dir = tempfile::tempdir().unwrap();
        outbox_with(
            dir.path(),
            &[body("1", "A"), body("2", "B"), body("3", "C")],
        )
        .await;
        let q = WorkQueue::open(dir.path(), Duration::from_secs(1)).unwrap();
        let now = Utc::now();
        let lease = Duration::from_secs(60);
        let first = q.claim("w", lease, now).unwrap().unwrap();
        assert_eq!(ids(&first), ["1"], "new rows go in arrival order");
        retry(&q, &first, now + chrono::Duration::seconds(5));
        let second = q.claim("w", lease, now).unwrap().unwrap();
        assert_eq!(ids(&second), ["2"]);
        retry(&q, &second, now + chrono::Duration::seconds(1));
        // All three are due by now; each goes in the order it became due.
        let later = now + chrono::Duration::seconds(10);
        let order: Vec<String> = std::iter::from_fn(|| q.claim("w", lease, later).unwrap())
            .map(|c| c.rows[0].id.clone())
            .collect();
        assert_eq!(order, ["3", "2", "1"]);
    }

    #[tokio::test]
    async fn rows_waiting_for_a_retry_are_passed_over_and_due_ones_found() {
        let dir = tempfile::tempdir().unwrap();
        let waiting: Vec<String> = (0..300)
            .map(|i| body(&format!("w{i}"), &format!("W{i}")))
            .collect();
        outbox_with(dir.path(), &waiting).await;
        let q = WorkQueue::open(dir.path(), Duration::from_secs(1)).unwrap();
        let now = Utc::now();
        let lease = Duration::from_secs(60);
        let hour = now + chrono::Duration::hours(1);
        while let Some(claim) = q.claim("w", lease, now).unwrap() {
            retry(&q, &claim, hour);
        }
        outbox_with(dir.path(), &[body("due", "D"), body("w7-again", "W7")]).await;
        // The due rows come first, the second with the waiting row of its entity coalesced;
        // the other waiting rows stay put.
        let now = Utc::now();
        let claim = q.claim("w", lease, now).unwrap().unwrap();
        assert_eq!(ids(&claim), ["due"]);
        let again = q.claim("w", lease, now).unwrap().unwrap();
        assert_eq!(ids(&again), ["w7", "w7-again"]);
        assert!(q.claim("w", lease, now).unwrap().is_none());
    }

    #[tokio::test]
    async fn retries_wait_for_their_time_and_settled_rows_are_not_claimed_again() {
        let dir = tempfile::tempdir().unwrap();
        outbox_with(dir.path(), &[body("1", "A"), body("2", "B")]).await;
        let q = WorkQueue::open(dir.path(), Duration::from_secs(1)).unwrap();
        let now = Utc::now();
        let lease = Duration::from_secs(60);
        let a = q.claim("w", lease, now).unwrap().unwrap();
        let at = now + chrono::Duration::seconds(30);
        let retry = RowOutcome::RetryAt {
            at,
            error: "HTTP 404".into(),
            status: Some(404),
            count_attempt: true,
        };
        q.settle(
            &a.lease_key,
            "w",
            &[Settlement {
                seq: a.rows[0].seq,
                outcome: retry,
            }],
        )
        .unwrap();
        let b = q.claim("w", lease, now).unwrap().unwrap();
        assert_eq!(ids(&b), ["2"]);
        q.settle(
            &b.lease_key,
            "w",
            &[Settlement {
                seq: b.rows[0].seq,
                outcome: RowOutcome::Ignored,
            }],
        )
        .unwrap();
        assert!(q.claim("w", lease, now).unwrap().is_none());
        let due = q.claim("w", lease, at).unwrap().unwrap();
        assert_eq!(ids(&due), ["1"]);
        assert_eq!(due.rows[0].attempts, 1);
    }
}
