//! The outbox maintenance thread, on its own connection: every `store.probe_interval` it
//! measures free space under `store.dir`, commits a tiny probe row if no group commit has
//! succeeded within the interval, prunes `done`/`ignored` rows older than `store.retention` in
//! small batches, and refreshes the outbox gauges from partial indexes. Results go to
//! [`StoreHealth`] and the metrics, which `/readyz`, `/healthz`, the watchdog and `/metrics` read
//! without touching SQLite.
//!
//! Why its own thread and connection: a probe queued on the writer thread would sit in front of
//! (or behind) appends and, with the lock held elsewhere, make them wait out a second busy
//! timeout. Here a probe waits on its own connection; and while webhooks keep the writer
//! committing, their commits are the proof and no probe runs at all.
//!
//! It also checks that `outbox.db` is still the file the service opened: if it was deleted or
//! replaced, appends would be acknowledged into a file no restart will see, so the thread ends
//! with an ERROR and supervision stops the process.
//!
//! It never deletes a `pending` or `dead` row, and never holds the write lock for more than one
//! small batch.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread::JoinHandle;
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, TransactionBehavior};

use super::NotificationStatus::{Dead, Done, Ignored, Pending};
use super::{Durability, FILE_NAME, OutboxError, open_connection};
use crate::health::{self, NotReady, StoreHealth, Writer};
use crate::sqlite::FileIdentity;
use crate::supervisor::{self, ThreadEnded};
use crate::telemetry::{Metrics, StatusLabel};

/// The thread's name in logs and supervision.
pub const THREAD_NAME: &str = "outbox maintenance thread";

/// Rows deleted per pruning transaction, and transactions per round: small enough that an
/// append waiting for the lock waits for one short batch at most.
const PRUNE_BATCH: i64 = 200;
const PRUNE_BATCHES_PER_ROUND: usize = 25;

#[derive(Debug, Clone)]
pub struct MaintenanceOptions {
    pub busy_timeout: Duration,
    /// How often it wakes; a probe commit happens at most this often.
    pub probe_interval: Duration,
    /// `done` and `ignored` rows processed longer ago than this are deleted.
    pub retention: Duration,
}

/// The running thread. Dropping it (or [`stop`](Self::stop)) stops it after its current step.
pub struct MaintenanceThread {
    stop: mpsc::Sender<()>,
    handle: JoinHandle<()>,
    ended: Option<ThreadEnded>,
}

impl MaintenanceThread {
    /// Opens its connection to `dir/outbox.db` and starts; the first probe and free-space check
    /// happen at once.
    pub fn start(
        dir: &Path,
        options: MaintenanceOptions,
        health: Arc<StoreHealth>,
        metrics: Arc<Metrics>,
    ) -> Result<MaintenanceThread, OutboxError> {
        let conn = open_connection(dir, Durability::Full, options.busy_timeout)?;
        let (stop, stopped) = mpsc::channel();
        let mut maintenance = Maintenance {
            conn,
            outbox_file: FileIdentity::of(&dir.join(FILE_NAME)).ok(),
            dir: dir.to_owned(),
            options,
            health,
            metrics,
            last_readiness: Ok(()),
        };
        let (handle, ended) = supervisor::spawn_thread(THREAD_NAME, move || {
            loop {
                if !maintenance.outbox_file_in_place() {
                    return;
                }
                maintenance.tick();
                match stopped.recv_timeout(maintenance.options.probe_interval) {
                    Err(RecvTimeoutError::Timeout) => continue,
                    _ => return,
                }
            }
        });
        Ok(MaintenanceThread {
            stop,
            handle,
            ended: Some(ended),
        })
    }

    /// Completes when the thread ends (the first call only). Before shutdown that means it failed.
    pub fn ended(&mut self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let ended = self.ended.take();
        async move {
            match ended {
                Some(ended) => ended.wait(THREAD_NAME).await,
                None => std::future::pending().await,
            }
        }
    }

    /// Stops the thread and waits for its current step.
    pub fn stop(self) {
        drop(self.stop);
        let _ = self.handle.join();
    }
}

struct Maintenance {
    conn: Connection,
    /// The outbox file as opened at start.
    outbox_file: Option<FileIdentity>,
    dir: PathBuf,
    options: MaintenanceOptions,
    health: Arc<StoreHealth>,
    metrics: Arc<Metrics>,
    last_readiness: Result<(), NotReady>,
}

impl Maintenance {
    /// False (after an ERROR) when the path no longer names the outbox file opened at start.
    fn outbox_file_in_place(&self) -> bool {
        let path = self.dir.join(FILE_NAME);
        let now = FileIdentity::of(&path).ok();
        if self.outbox_file.is_none() || now == self.outbox_file {
            return true;
        }
        tracing::error!(
            path = %path.display(),
            "outbox.db was deleted or replaced while fenx-sync was running: stopping, so that a \
             restart opens the file at that path (acknowledged notifications would otherwise go \
             into a file no restart sees)"
        );
        false
    }

    fn tick(&mut self) {
        match health::free_bytes(&self.dir) {
            Ok(free) => {
                self.health.record_free_bytes(free);
                self.metrics
                    .store_free_bytes
                    .set(i64::try_from(free).unwrap_or(i64::MAX));
            }
            Err(error) => {
                tracing::error!(%error, dir = %self.dir.display(), "cannot measure free space under store.dir")
            }
        }
        let proven = self
            .health
            .since_last_write()
            .is_some_and(|since| since < self.options.probe_interval);
        if !proven || self.health.readiness().is_err() {
            self.probe();
        }
        self.report_readiness();
        if self.health.low_disk_space().is_none() {
            self.prune();
        }
        self.refresh_gauges();
    }

    /// One tiny durable commit, at `synchronous=FULL` like the appends it stands in for.
    fn probe(&mut self) {
        let write = self.health.begin_write(Writer::Probe);
        let result = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .and_then(|tx| {
                tx.execute(
                    "INSERT INTO write_probe (id, written_at) VALUES (1, ?1)
                     ON CONFLICT (id) DO UPDATE SET written_at = excluded.written_at",
                    [crate::time::now()],
                )?;
                tx.commit()
            });
        write.finish(result.map_err(|e| e.to_string()));
    }

    /// Logs each change of readiness once: an ERROR when it is lost, INFO when it is back.
    fn report_readiness(&mut self) {
        let now = self.health.readiness();
        self.metrics.ready.set(i64::from(now.is_ok()));
        // The same kind of reason with new figures (free bytes, error text) is not news.
        let kind = |r: &Result<(), NotReady>| r.as_ref().err().map(std::mem::discriminant);
        if kind(&now) == kind(&self.last_readiness) {
            return;
        }
        match &now {
            Err(reason) => {
                tracing::error!(%reason, "not ready: {reason}; webhooks get 503 until this clears")
            }
            Ok(()) => tracing::info!("ready again: the outbox takes durable writes"),
        }
        self.last_readiness = now;
    }

    fn prune(&mut self) {
        let retention =
            chrono::Duration::from_std(self.options.retention).unwrap_or(chrono::Duration::MAX);
        let cutoff = crate::time::format(
            chrono::Utc::now()
                .checked_sub_signed(retention)
                .unwrap_or(chrono::DateTime::<chrono::Utc>::MIN_UTC),
        );
        let mut pruned = 0;
        for _ in 0..PRUNE_BATCHES_PER_ROUND {
            match prune_batch(&mut self.conn, &cutoff) {
                Ok(n) => {
                    pruned += n;
                    if n < PRUNE_BATCH as usize {
                        break;
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, "outbox pruning failed; trying again later");
                    break;
                }
            }
        }
        if pruned > 0 {
            self.metrics.outbox_pruned.inc_by(pruned as u64);
            tracing::info!(
                pruned,
                older_than = %cutoff,
                "pruned done and ignored notifications past store.retention"
            );
        }
    }

    fn refresh_gauges(&mut self) {
        match outbox_gauges(&self.conn) {
            Ok(gauges) => {
                for (status, count) in [(Pending, gauges.pending), (Dead, gauges.dead)] {
                    self.metrics
                        .outbox_rows
                        .get_or_create(&StatusLabel {
                            status: status.as_str().to_owned(),
                        })
                        .set(count);
                }
                let age = gauges
                    .oldest_pending
                    .map_or(0, |t| (chrono::Utc::now() - t).num_seconds().max(0));
                self.metrics.oldest_pending_seconds.set(age);
            }
            Err(error) => tracing::warn!(%error, "outbox gauges not refreshed"),
        }
    }
}

/// Deletes up to [`PRUNE_BATCH`] finished rows processed before `cutoff`, oldest first, through
/// the `notification_finished` partial index.
fn prune_batch(conn: &mut Connection, cutoff: &str) -> rusqlite::Result<usize> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    // The statuses are in the text, not bound, so the planner can prove the partial index.
    let deleted = tx.execute(
        &format!(
            "DELETE FROM notification WHERE seq IN (
                 SELECT seq FROM notification INDEXED BY notification_finished
                  WHERE status IN ('{Done}', '{Ignored}') AND processed_at < ?1
                  ORDER BY processed_at LIMIT ?2)"
        ),
        rusqlite::params![cutoff, PRUNE_BATCH],
    )?;
    tx.commit()?;
    Ok(deleted)
}

struct OutboxGauges {
    pending: i64,
    dead: i64,
    oldest_pending: Option<chrono::DateTime<chrono::Utc>>,
}

/// Counts from the partial indexes on pending and dead rows (never a scan of every row).
fn outbox_gauges(conn: &Connection) -> rusqlite::Result<OutboxGauges> {
    conn.query_row(
        &format!(
            "SELECT (SELECT count(*) FROM notification INDEXED BY notification_due
                      WHERE status = '{Pending}'),
                    (SELECT count(*) FROM notification INDEXED BY notification_dead
                      WHERE status = '{Dead}')"
        ),
        [],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )
    .and_then(|(pending, dead)| {
        let oldest_pending = conn
            .query_row(
                &format!(
                    "SELECT received_at FROM notification
                      WHERE seq = (SELECT min(seq) FROM notification INDEXED BY notification_due
                                    WHERE status = '{Pending}')"
                ),
                [],
                |r| crate::sqlite::time_column(r, 0),
            )
            .optional()?;
        Ok(OutboxGauges {
            pending,
            dead,
            oldest_pending,
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::HealthRules;
    use crate::outbox::Outbox;
    use crate::outbox::tests::{options, row};

    async fn store(dir: &Path, ids: &[&str]) {
        let (outbox, writer) = Outbox::open(dir, &options()).unwrap();
        outbox
            .append_batch(ids.iter().map(|id| row(id)).collect())
            .await
            .unwrap();
        drop(outbox);
        writer.wait();
    }

    #[tokio::test]
    async fn old_finished_rows_are_pruned_and_pending_and_dead_rows_stay() {
        let dir = tempfile::tempdir().unwrap();
        let ids: Vec<String> = (0..450).map(|i| format!("n{i}")).collect();
        let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
        store(dir.path(), &refs).await;
        let conn = open_connection(dir.path(), Durability::Normal, Duration::from_secs(1)).unwrap();
        conn.execute_batch(
            "UPDATE notification SET status = 'done', processed_at = '2000-01-01T00:00:00.000Z'
              WHERE seq <= 400;
             UPDATE notification SET status = 'ignored', processed_at = '2000-01-01T00:00:00.000Z'
              WHERE seq BETWEEN 401 AND 420;
             UPDATE notification SET status = 'dead', processed_at = '2000-01-01T00:00:00.000Z'
              WHERE seq BETWEEN 421 AND 430;
             UPDATE notification SET status = 'done', processed_at = strftime('%Y-%m-%dT%H:%M:%fZ')
              WHERE seq BETWEEN 431 AND 440;",
        )
        .unwrap();
        let metrics = Arc::new(Metrics::new());
        let health = Arc::new(StoreHealth::new(HealthRules::default()));
        let thread = MaintenanceThread::start(
            dir.path(),
            MaintenanceOptions {
                busy_timeout: Duration::from_secs(1),
                probe_interval: Duration::from_secs(60),
                retention: Duration::from_secs(3600),
            },
            health.clone(),
            metrics.clone(),
        )
        .unwrap();
        thread.stop();
        let left: Vec<(String, i64)> = conn
            .prepare("SELECT status, count(*) FROM notification GROUP BY 1 ORDER BY 1")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        let expected = [("dead", 10), ("done", 10), ("pending", 10)];
        let expected: Vec<(String, i64)> = expected
            .iter()
            .map(|(s, n)| ((*s).to_owned(), *n))
            .collect();
        assert_eq!(left, expected);
        let text = metrics.encode(crate::telemetry::Exposition::Prometheus);
        assert!(text.contains("fenx_outbox_pruned_total 420"), "{text}");
        assert!(
            text.contains(r#"fenx_outbox_rows{status="pending"} 10"#),
            "{text}"
        );
        assert!(
            text.contains(r#"fenx_outbox_rows{status="dead"} 10"#),
            "{text}"
        );
        assert!(text.contains("fenx_ready 1"), "{text}");
        health.readiness().unwrap();
        assert!(health.free_bytes().unwrap() > 0);
    }

    #[test]
    fn pruning_and_gauges_use_the_partial_indexes() {
        let dir = tempfile::tempdir().unwrap();
        let conn = open_connection(dir.path(), Durability::Normal, Duration::from_secs(1)).unwrap();
        let plan = |sql: &str| -> String {
            conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}"))
                .unwrap()
                .query_map([], |r| r.get::<_, String>(3))
                .unwrap()
                .map(Result::unwrap)
                .collect::<Vec<_>>()
                .join("; ")
        };
        let prune = plan(
            "SELECT seq FROM notification WHERE status IN ('done', 'ignored')
              AND processed_at < 'x' ORDER BY processed_at LIMIT 10",
        );
        assert!(prune.contains("notification_finished"), "{prune}");
        let dead = plan("SELECT count(*) FROM notification WHERE status = 'dead'");
        assert!(dead.contains("notification_dead"), "{dead}");
    }
}
