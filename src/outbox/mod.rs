//! The durable outbox (`outbox.db`): every accepted notification, byte-exact, with its
//! processing state.
//!
//! Owns the single writer thread (`writer.rs`) that turns concurrent appends into group commits:
//! it drains whatever is queued, writes it in one `BEGIN IMMEDIATE` transaction at
//! `synchronous=FULL`, and only then answers each waiting caller. De-duplication on the
//! notification id happens here. The sync worker's claims, leases and retry schedule are in
//! `queue.rs` ([`WorkQueue`]). The maintenance thread (`maintenance.rs`) proves the file
//! writable with a probe commit when no group commit has lately, watches free space, prunes old
//! finished rows and refreshes the outbox gauges, all on its own connection.
//!
//! It must never answer an append before its COMMIT has returned, never let a failed commit
//! look like a success (the caller's 2xx depends on it), and never start an append while free
//! space under the store is below `store.min_free_bytes`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use rusqlite::Connection;
use tokio::sync::{Notify, mpsc, oneshot};

pub mod admin;
mod checkpoint;
mod maintenance;
mod queue;
mod status;
mod writer;

pub use maintenance::{MaintenanceOptions, MaintenanceThread, THREAD_NAME as MAINTENANCE_THREAD};
pub use queue::{Claim, Claimed, RowOutcome, Settlement, WorkQueue};
pub use status::NotificationStatus;

use crate::health::{HealthRules, StoreHealth};
use crate::notification::Notification;
use crate::signature::Recipe;
pub use crate::sqlite::Durability;
use crate::sqlite::{self, DbError, PageSize};
use crate::supervisor::{self, ThreadEnded};

/// The outbox file inside `store.dir`.
pub const FILE_NAME: &str = "outbox.db";

/// The writer's page cache, in KiB: room for the id and entity index pages every append visits,
/// so a growing outbox is not re-read from the OS on every commit.
const WRITER_CACHE_KIB: i64 = 8 * 1024;

/// Where a notification came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Webhook,
    /// Taken from a polling feed.
    Poll,
}

impl Source {
    fn as_str(self) -> &'static str {
        match self {
            Source::Webhook => "webhook",
            Source::Poll => "poll",
        }
    }
}

/// A notification to append, with how it arrived.
#[derive(Debug, Clone)]
pub struct NewNotification {
    pub notification: Notification,
    pub source: Source,
    /// The signature recipe that verified it (stored as its name, e.g. `sha256-hex/hex`).
    pub signature_recipe: Option<Recipe>,
}

/// What an append did with one notification.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Appended {
    Stored,
    /// The id was already in the outbox; its duplicate count went up and nothing else changed.
    Duplicate,
}

#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("cannot create the store directory {path}: {source}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("outbox write failed: {0}")]
    Write(#[source] Arc<rusqlite::Error>),
    #[error("outbox writer queue stayed full for {0:?}")]
    QueueFull(Duration),
    #[error("outbox writer has stopped")]
    WriterStopped,
    #[error("not stored: {free} bytes free under store.dir, below store.min_free_bytes ({min})")]
    LowDiskSpace { free: u64, min: u64 },
}

/// Tuning for the writer.
#[derive(Debug, Clone)]
pub struct OutboxOptions {
    /// How long a commit may wait for SQLite's write lock before failing.
    pub busy_timeout: Duration,
    /// The most notifications in one group commit.
    pub max_batch: usize,
    /// Appends that may wait for the writer before callers are turned away.
    pub queue_capacity: usize,
    /// How long an append may wait for room in the queue.
    pub enqueue_timeout: Duration,
}

pub(crate) enum Command {
    Append {
        rows: Vec<NewNotification>,
        reply: oneshot::Sender<Result<Vec<Appended>, OutboxError>>,
    },
}

/// A cloneable handle to the outbox writer. The writer thread stops once every handle is dropped
/// and everything queued has been committed.
#[derive(Clone)]
pub struct Outbox {
    queue: mpsc::Sender<Command>,
    enqueue_timeout: Duration,
    new_work: Arc<Notify>,
    health: Arc<StoreHealth>,
}

/// The thread's name in logs and supervision.
pub const WRITER_THREAD: &str = "outbox writer thread";

/// Joins the writer thread; `wait` returns once the last `Outbox` handle is gone and the final
/// commit is on disk.
pub struct WriterThread {
    handle: JoinHandle<()>,
    ended: Option<ThreadEnded>,
}

impl WriterThread {
    pub fn wait(self) {
        let _ = self.handle.join();
    }

    /// Completes when the thread ends (the first call only; later calls never complete). Before
    /// shutdown that means it failed.
    pub fn ended(&mut self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let ended = self.ended.take();
        async move {
            match ended {
                Some(ended) => ended.wait(WRITER_THREAD).await,
                None => std::future::pending().await,
            }
        }
    }
}

impl Outbox {
    /// Opens `dir/outbox.db` (creating the directory and file), refuses it unless WAL with
    /// `synchronous=FULL` is in effect, applies the schema, and starts the writer thread.
    pub fn open(
        dir: &Path,
        options: &OutboxOptions,
    ) -> Result<(Outbox, WriterThread), OutboxError> {
        Self::open_with_health(
            dir,
            options,
            Arc::new(StoreHealth::new(HealthRules::default())),
        )
    }

    /// [`open`](Self::open), recording every group commit's outcome (and refusing appends on
    /// low disk space) in `health`.
    pub fn open_with_health(
        dir: &Path,
        options: &OutboxOptions,
        health: Arc<StoreHealth>,
    ) -> Result<(Outbox, WriterThread), OutboxError> {
        let mut conn = open_connection(dir, Durability::Full, options.busy_timeout)?;
        conn.pragma_update(None, "cache_size", -WRITER_CACHE_KIB)
            .map_err(DbError::from)?;
        let checkpointer = checkpoint::Checkpointer::start(
            open_connection(dir, Durability::Full, options.busy_timeout)?,
            checkpoint::CHECKPOINT_PAGES,
        );
        checkpointer.attach(&mut conn).map_err(DbError::from)?;
        let (queue, rx) = mpsc::channel(options.queue_capacity.max(1));
        let max_batch = options.max_batch.max(1);
        let writer_health = health.clone();
        let (handle, ended) = supervisor::spawn_thread(WRITER_THREAD, move || {
            writer::run(conn, rx, max_batch, &writer_health, &checkpointer);
            // Last, so its connection is the last to close: that one checkpoints the whole log.
            drop(checkpointer);
        });
        let outbox = Outbox {
            queue,
            enqueue_timeout: options.enqueue_timeout,
            new_work: Arc::new(Notify::new()),
            health,
        };
        let thread = WriterThread {
            handle,
            ended: Some(ended),
        };
        Ok((outbox, thread))
    }

    /// Appends notifications durably, in one transaction with whatever else is waiting. Returns
    /// once that transaction has committed, with one outcome per row in order.
    pub async fn append_batch(
        &self,
        rows: Vec<NewNotification>,
    ) -> Result<Vec<Appended>, OutboxError> {
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        if let Some(crate::health::NotReady::LowDiskSpace { free, min }) =
            self.health.low_disk_space()
        {
            return Err(OutboxError::LowDiskSpace { free, min });
        }
        let (reply, answer) = oneshot::channel();
        self.send(Command::Append { rows, reply }).await?;
        let outcomes = answer.await.map_err(|_| OutboxError::WriterStopped)??;
        if outcomes.contains(&Appended::Stored) {
            self.new_work.notify_waiters();
        }
        Ok(outcomes)
    }

    /// Signalled after every commit that stored something new, so idle sync workers start at
    /// once instead of at their next poll.
    pub fn new_work(&self) -> Arc<Notify> {
        self.new_work.clone()
    }

    /// What readiness and liveness are judged from.
    pub fn health(&self) -> Arc<StoreHealth> {
        self.health.clone()
    }

    async fn send(&self, command: Command) -> Result<(), OutboxError> {
        match tokio::time::timeout(self.enqueue_timeout, self.queue.send(command)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(OutboxError::WriterStopped),
            Err(_) => Err(OutboxError::QueueFull(self.enqueue_timeout)),
        }
    }
}

/// Opens the outbox file with the current schema. Appends need [`Durability::Full`]; the
/// worker's claims and settlements may use `Normal`, since losing one to a power cut only
/// repeats idempotent work.
pub fn open_connection(
    dir: &Path,
    durability: Durability,
    busy_timeout: Duration,
) -> Result<Connection, OutboxError> {
    std::fs::create_dir_all(dir).map_err(|source| OutboxError::CreateDir {
        path: dir.to_owned(),
        source,
    })?;
    let path = dir.join(FILE_NAME);
    let mut conn = sqlite::open(&path, durability, PageSize::Default, busy_timeout)?;
    sqlite::apply_schema(&mut conn, &path, "outbox")?;
    Ok(conn)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    pub(super) fn options() -> OutboxOptions {
        OutboxOptions {
            busy_timeout: Duration::from_millis(200),
            max_batch: 256,
            queue_capacity: 64,
            enqueue_timeout: Duration::from_secs(1),
        }
    }

    pub(super) fn row(id: &str) -> NewNotification {
        let body = Bytes::from(format!(r#"{{"Id":"{id}"}}"#));
        let mut notification = crate::notification::parse_body(&body).unwrap().remove(0);
        notification.id = id.to_owned();
        NewNotification {
            notification,
            source: Source::Webhook,
            signature_recipe: Some("secret/hex".parse().unwrap()),
        }
    }

    #[tokio::test]
    async fn concurrent_appends_are_stored_once_and_duplicates_counted() {
        let dir = tempfile::tempdir().unwrap();
        let (outbox, writer) = Outbox::open(dir.path(), &options()).unwrap();
        let tasks: Vec<_> = (0..50)
            .map(|i| {
                let outbox = outbox.clone();
                tokio::spawn(async move {
                    outbox
                        .append_batch(vec![row(&format!("n{}", i % 25))])
                        .await
                })
            })
            .collect();
        let mut stored = 0;
        for t in tasks {
            if t.await.unwrap().unwrap() == [Appended::Stored] {
                stored += 1;
            }
        }
        assert_eq!(stored, 25);
        drop(outbox);
        writer.wait();
        let conn = Connection::open(dir.path().join(FILE_NAME)).unwrap();
        let (rows, dups): (i64, i64) = conn
            .query_row(
                "SELECT count(*), sum(duplicates) FROM notification",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        assert_eq!((rows, dups), (25, 25));
    }

    #[tokio::test]
    async fn ids_differing_only_in_case_are_different_notifications() {
        let dir = tempfile::tempdir().unwrap();
        let (outbox, _writer) = Outbox::open(dir.path(), &options()).unwrap();
        let got = outbox
            .append_batch(vec![row("abc"), row("ABC"), row("abc")])
            .await
            .unwrap();
        assert_eq!(
            got,
            [Appended::Stored, Appended::Stored, Appended::Duplicate]
        );
    }

    #[tokio::test]
    async fn a_redelivery_after_a_restart_is_counted_not_stored_again() {
        let dir = tempfile::tempdir().unwrap();
        for _ in 0..2 {
            let (outbox, writer) = Outbox::open(dir.path(), &options()).unwrap();
            outbox.append_batch(vec![row("same")]).await.unwrap();
            drop(outbox);
            writer.wait();
        }
        let (outbox, _writer) = Outbox::open(dir.path(), &options()).unwrap();
        assert_eq!(
            outbox
                .append_batch(vec![row("same"), row("same"), row("new")])
                .await
                .unwrap(),
            [Appended::Duplicate, Appended::Duplicate, Appended::Stored]
        );
        let conn = Connection::open(dir.path().join(FILE_NAME)).unwrap();
        let (rows, dups, last): (i64, i64, Option<String>) = conn
            .query_row(
                "SELECT count(*), sum(duplicates), max(last_duplicate_at) FROM notification",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .unwrap();
        assert_eq!((rows, dups), (2, 3));
        assert!(last.is_some());
    }

    #[tokio::test]
    async fn a_version_1_outbox_is_upgraded_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let (outbox, writer) = Outbox::open(dir.path(), &options()).unwrap();
        outbox.append_batch(vec![row("kept")]).await.unwrap();
        drop(outbox);
        writer.wait();
        // Put the file back as version 1 left it: indexes over every row.
        let conn = Connection::open(dir.path().join(FILE_NAME)).unwrap();
        conn.execute_batch(
            "DROP INDEX notification_due;
             DROP INDEX notification_pending_entity;
             DROP INDEX notification_unindexed;
             ALTER TABLE notification DROP COLUMN entity_indexed;
             CREATE INDEX notification_pending ON notification (seq) WHERE status = 'pending';
             CREATE INDEX notification_entity ON notification (entity_key, status);
             DROP INDEX notification_finished;
             DROP INDEX notification_dead;
             ALTER TABLE notification DROP COLUMN stale_reads;
             DELETE FROM schema_version;
             INSERT INTO schema_version VALUES (1, '2026-11-23T00:00:00.000Z');",
        )
        .unwrap();
        drop(conn);
        let conn = open_connection(dir.path(), Durability::Full, Duration::from_secs(1)).unwrap();
        let indexes: Vec<String> = conn
            .prepare(
                "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'notification'
                   AND name NOT LIKE 'sqlite_%' ORDER BY name",
            )
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(
            indexes,
            [
                "notification_dead",
                "notification_due",
                "notification_event_type",
                "notification_finished",
                "notification_pending_entity",
                "notification_unindexed"
            ]
        );
        let (version, rows): (i64, i64) = conn
            .query_row(
                "SELECT (SELECT max(version) FROM schema_version), (SELECT count(*) FROM notification)",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        assert_eq!((version, rows), (3, 1));
        let queue = WorkQueue::open(dir.path(), Duration::from_secs(1)).unwrap();
        let claim = queue
            .claim("w", Duration::from_secs(60), chrono::Utc::now())
            .unwrap()
            .unwrap();
        assert_eq!(claim.rows[0].id, "kept");
    }

    #[tokio::test]
    async fn a_held_write_lock_fails_the_append_then_it_recovers() {
        let dir = tempfile::tempdir().unwrap();
        let (outbox, _writer) = Outbox::open(dir.path(), &options()).unwrap();
        let blocker = Connection::open(dir.path().join(FILE_NAME)).unwrap();
        blocker.execute_batch("BEGIN IMMEDIATE").unwrap();
        assert!(matches!(
            outbox.append_batch(vec![row("a")]).await,
            Err(OutboxError::Write(_))
        ));
        assert!(matches!(
            outbox.health().readiness(),
            Err(crate::health::NotReady::WriteFailed(_))
        ));
        blocker.execute_batch("ROLLBACK").unwrap();
        assert_eq!(
            outbox.append_batch(vec![row("a")]).await.unwrap(),
            [Appended::Stored]
        );
        outbox.health().readiness().unwrap();
    }

    #[tokio::test]
    async fn appends_are_refused_before_the_disk_fills() {
        let dir = tempfile::tempdir().unwrap();
        let rules = HealthRules {
            min_free_bytes: 1 << 20,
            ..HealthRules::default()
        };
        let health = Arc::new(StoreHealth::new(rules));
        let (outbox, _writer) =
            Outbox::open_with_health(dir.path(), &options(), health.clone()).unwrap();
        health.record_free_bytes(1000);
        assert!(matches!(
            outbox.append_batch(vec![row("a")]).await,
            Err(OutboxError::LowDiskSpace { free: 1000, .. })
        ));
        health.record_free_bytes(2 << 20);
        assert_eq!(
            outbox.append_batch(vec![row("a")]).await.unwrap(),
            [Appended::Stored]
        );
    }
}
