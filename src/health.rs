//! Readiness and liveness as cached facts: free space under `store.dir`, the outcome and age of
//! the last durable outbox write (a group commit or the maintenance thread's probe commit), and
//! how long a write has been in progress.
//!
//! Writers record facts here; `/readyz`, `/healthz`, the systemd watchdog and `/metrics` read
//! them. Reading never blocks, never waits for a lock and never touches SQLite, so a probe can
//! neither queue behind webhook commits nor delay them. A fact that has not been renewed in time
//! counts against readiness: a silent store is not a healthy one.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

// tokio's Instant is std's outside a runtime and in production; tests pause and advance it.
use tokio::time::Instant;

/// The thresholds readiness and liveness are judged by.
#[derive(Debug, Clone)]
pub struct HealthRules {
    /// Below this many free bytes under `store.dir`, not ready and appends are refused.
    pub min_free_bytes: u64,
    /// A write in progress for longer than this means the process is wedged (not alive).
    pub wedged_after: Duration,
    /// A successful durable write older than this no longer proves the store is writable.
    pub write_proof_expires: Duration,
}

impl Default for HealthRules {
    fn default() -> Self {
        HealthRules {
            min_free_bytes: 0,
            wedged_after: Duration::from_secs(30),
            write_proof_expires: Duration::from_secs(30),
        }
    }
}

/// Why `/readyz` says "not ready".
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotReady {
    #[error(
        "low disk space: {free} bytes free under store.dir, below store.min_free_bytes ({min})"
    )]
    LowDiskSpace { free: u64, min: u64 },
    #[error("the last durable outbox write failed: {0}")]
    WriteFailed(String),
    #[error("no durable outbox write has completed for {0:?}")]
    NoRecentWrite(Duration),
}

/// Why `/healthz` says "not alive".
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{writer} has been writing for {stuck_for:?} without finishing")]
pub struct Wedged {
    pub writer: Writer,
    pub stuck_for: Duration,
}

/// Who is writing to the outbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Writer {
    /// The group-commit writer thread.
    GroupCommit,
    /// The maintenance thread's probe commit.
    Probe,
}

impl std::fmt::Display for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Writer::GroupCommit => "the outbox writer",
            Writer::Probe => "the outbox write probe",
        })
    }
}

/// Facts about the store, shared by everything that writes or judges it. Times are milliseconds
/// since `epoch` plus one, so that 0 can mean "never" / "idle".
pub struct StoreHealth {
    rules: HealthRules,
    epoch: Instant,
    free_bytes: AtomicU64,
    last_write_ok: AtomicU64,
    /// Whether the write that finished last failed (with `last_error`).
    latest_write_failed: AtomicBool,
    last_error: Mutex<String>,
    commit_busy_since: AtomicU64,
    probe_busy_since: AtomicU64,
}

impl StoreHealth {
    pub fn new(rules: HealthRules) -> StoreHealth {
        StoreHealth {
            rules,
            epoch: Instant::now(),
            free_bytes: AtomicU64::new(u64::MAX),
            last_write_ok: AtomicU64::new(0),
            latest_write_failed: AtomicBool::new(false),
            last_error: Mutex::new(String::new()),
            commit_busy_since: AtomicU64::new(0),
            probe_busy_since: AtomicU64::new(0),
        }
    }

    fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX - 1) + 1
    }

    fn age(&self, stamp: u64) -> Duration {
        Duration::from_millis(self.now().saturating_sub(stamp))
    }

    /// Records a measurement of the free bytes under `store.dir`.
    pub fn record_free_bytes(&self, free: u64) {
        self.free_bytes.store(free, Ordering::Relaxed);
    }

    /// The last measured free bytes (`None` before the first measurement).
    pub fn free_bytes(&self) -> Option<u64> {
        Some(self.free_bytes.load(Ordering::Relaxed)).filter(|&b| b != u64::MAX)
    }

    /// `Some` when free space is below `min_free_bytes`: appends must be refused before SQLite
    /// meets a full disk.
    pub fn low_disk_space(&self) -> Option<NotReady> {
        let free = self.free_bytes()?;
        (free < self.rules.min_free_bytes).then_some(NotReady::LowDiskSpace {
            free,
            min: self.rules.min_free_bytes,
        })
    }

    /// Marks a durable write by `writer` as started; the guard records how it ended.
    pub fn begin_write(&self, writer: Writer) -> WriteInProgress<'_> {
        self.busy_since(writer).store(self.now(), Ordering::Relaxed);
        WriteInProgress {
            health: self,
            writer,
        }
    }

    fn busy_since(&self, writer: Writer) -> &AtomicU64 {
        match writer {
            Writer::GroupCommit => &self.commit_busy_since,
            Writer::Probe => &self.probe_busy_since,
        }
    }

    /// How long ago a durable write last succeeded (`None`: never).
    pub fn since_last_write(&self) -> Option<Duration> {
        let ok = self.last_write_ok.load(Ordering::Relaxed);
        (ok != 0).then(|| self.age(ok))
    }

    /// Ready means: enough free space, the latest durable write succeeded, and recently.
    pub fn readiness(&self) -> Result<(), NotReady> {
        if let Some(low) = self.low_disk_space() {
            return Err(low);
        }
        if self.latest_write_failed.load(Ordering::Relaxed) {
            let error = self
                .last_error
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            return Err(NotReady::WriteFailed(error.clone()));
        }
        let ok = self.last_write_ok.load(Ordering::Relaxed);
        let since = self.age(ok.max(1));
        if ok == 0 || since > self.rules.write_proof_expires {
            return Err(NotReady::NoRecentWrite(since));
        }
        Ok(())
    }

    /// Alive means: no outbox write has been in progress for longer than `wedged_after`.
    pub fn liveness(&self) -> Result<(), Wedged> {
        for writer in [Writer::GroupCommit, Writer::Probe] {
            let since = self.busy_since(writer).load(Ordering::Relaxed);
            if since != 0 {
                let stuck_for = self.age(since);
                if stuck_for > self.rules.wedged_after {
                    return Err(Wedged { writer, stuck_for });
                }
            }
        }
        Ok(())
    }
}

/// A durable write in progress; dropping it without [`finish`](Self::finish) (a panic) only
/// clears the in-progress mark.
pub struct WriteInProgress<'a> {
    health: &'a StoreHealth,
    writer: Writer,
}

impl WriteInProgress<'_> {
    pub fn finish(self, result: Result<(), String>) {
        let health = self.health;
        let now = health.now();
        match result {
            Ok(()) => {
                health.last_write_ok.store(now, Ordering::Relaxed);
                health.latest_write_failed.store(false, Ordering::Relaxed);
            }
            Err(error) => {
                *health
                    .last_error
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner) = error;
                health.latest_write_failed.store(true, Ordering::Relaxed);
            }
        }
    }
}

impl Drop for WriteInProgress<'_> {
    fn drop(&mut self) {
        self.health
            .busy_since(self.writer)
            .store(0, Ordering::Relaxed);
    }
}

/// Free bytes available to the service on the filesystem holding `dir` (what `df` calls
/// "Avail": blocks reserved for root are not counted, so root cannot fill them either).
pub fn free_bytes(dir: &Path) -> std::io::Result<u64> {
    let stat = rustix::fs::statvfs(dir)?;
    Ok(stat.f_bavail.saturating_mul(stat.f_frsize))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn health(min_free_bytes: u64) -> StoreHealth {
        StoreHealth::new(HealthRules {
            min_free_bytes,
            wedged_after: Duration::from_millis(50),
            write_proof_expires: Duration::from_millis(200),
        })
    }

    #[tokio::test(start_paused = true)]
    async fn ready_only_after_a_write_succeeded_and_while_space_lasts() {
        let h = health(1000);
        assert!(matches!(h.readiness(), Err(NotReady::NoRecentWrite(_))));
        h.begin_write(Writer::Probe).finish(Ok(()));
        assert_eq!(h.readiness(), Ok(()));
        h.record_free_bytes(999);
        assert_eq!(
            h.readiness(),
            Err(NotReady::LowDiskSpace {
                free: 999,
                min: 1000
            })
        );
        assert!(h.low_disk_space().is_some());
        h.record_free_bytes(1000);
        assert_eq!(h.readiness(), Ok(()));
        h.begin_write(Writer::GroupCommit)
            .finish(Err("disk I/O error".into()));
        assert_eq!(
            h.readiness(),
            Err(NotReady::WriteFailed("disk I/O error".into()))
        );
        h.begin_write(Writer::Probe).finish(Ok(()));
        assert_eq!(h.readiness(), Ok(()));
    }

    #[tokio::test(start_paused = true)]
    async fn an_old_write_proves_nothing() {
        let h = health(0);
        h.begin_write(Writer::GroupCommit).finish(Ok(()));
        tokio::time::advance(Duration::from_millis(250)).await;
        assert!(matches!(h.readiness(), Err(NotReady::NoRecentWrite(_))));
    }

    #[tokio::test(start_paused = true)]
    async fn a_write_stuck_past_wedged_after_is_not_alive() {
        let h = health(0);
        let write = h.begin_write(Writer::GroupCommit);
        assert_eq!(h.liveness(), Ok(()));
        tokio::time::advance(Duration::from_millis(80)).await;
        assert!(matches!(
            h.liveness(),
            Err(Wedged {
                writer: Writer::GroupCommit,
                ..
            })
        ));
        write.finish(Ok(()));
        assert_eq!(h.liveness(), Ok(()));
    }

    #[test]
    fn free_bytes_reads_the_filesystem() {
        let dir = tempfile::tempdir().unwrap();
        assert!(free_bytes(dir.path()).unwrap() > 0);
        assert!(free_bytes(&dir.path().join("missing")).is_err());
    }
}
