//! Checkpoints of the outbox's write-ahead log, kept off the commit path: committed pages are
//! copied from `outbox.db-wal` into `outbox.db` by a thread with its own connection, so no append
//! waits while they are copied.
//!
//! The writer connection reports the log's size after every commit (SQLite's WAL hook, which
//! takes the place of its auto-checkpoint). Every [`CHECKPOINT_PAGES`] this thread copies the new
//! pages with a PASSIVE checkpoint, which never blocks the writer. A log only starts over once a
//! checkpoint has copied all of it, which a thread racing a busy writer seldom manages; so after
//! each pass the writer, between two group commits, copies the few pages committed meanwhile
//! itself ([`Checkpointer::finish`]). If the thread falls behind (a slow disk) and the log
//! reaches [`BACKSTOP_INTERVALS`] intervals, the writer does the whole checkpoint, so the log
//! stays bounded.
//!
//! It must never make a commit look failed: checkpoint errors are logged, not returned, since the
//! commits they follow have already happened. Copying fewer, larger batches copies each
//! repeatedly changed page (index pages take most appends' writes) once instead of many times.

use std::ffi::c_int;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use rusqlite::Connection;
use rusqlite::hooks::Wal;

/// Pages of log between background checkpoints (64 MiB at SQLite's default page size): at 32 MiB
/// the copying made p99 at 64 connections almost twice as long (README, Benchmarks).
pub const CHECKPOINT_PAGES: c_int = 16 * 1024;
/// Log size, in multiples of the checkpoint interval, at which the writer checkpoints everything
/// itself.
const BACKSTOP_INTERVALS: c_int = 4;

struct Shared {
    /// Pages of log between background passes.
    every: c_int,
    state: Mutex<State>,
    wake: Condvar,
    /// Set after a background pass (or at the backstop): the writer should checkpoint the rest.
    finish: AtomicBool,
}

#[derive(Default)]
struct State {
    /// Log size the next background pass waits for.
    next_pass_at: c_int,
    requested: bool,
    stopping: bool,
}

impl Shared {
    fn update(&self, change: impl FnOnce(&mut State)) {
        change(&mut self.state.lock().unwrap_or_else(|p| p.into_inner()));
        self.wake.notify_one();
    }

    /// Called after every commit with the log's size in pages.
    fn committed(&self, pages: c_int) {
        if pages >= self.every.saturating_mul(BACKSTOP_INTERVALS) {
            self.finish.store(true, Ordering::Release);
            return;
        }
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if pages < state.next_pass_at.saturating_sub(self.every) {
            // The log started over.
            state.next_pass_at = self.every;
        }
        if pages >= state.next_pass_at.max(self.every) && !state.requested {
            state.requested = true;
            state.next_pass_at = pages.saturating_add(self.every);
            drop(state);
            self.wake.notify_one();
        }
    }
}

/// The checkpoint thread. Dropping it stops the thread and waits for it.
pub struct Checkpointer {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Checkpointer {
    /// Starts the thread on `conn`, its own connection to the outbox, for a pass every `every`
    /// pages of log ([`CHECKPOINT_PAGES`] for the outbox).
    pub fn start(conn: Connection, every: c_int) -> Checkpointer {
        let shared = Arc::new(Shared {
            every: every.max(1),
            state: Mutex::default(),
            wake: Condvar::new(),
            finish: AtomicBool::new(false),
        });
        let thread = std::thread::Builder::new()
            .name("outbox-checkpoint".into())
            .spawn({
                let shared = shared.clone();
                move || run(&conn, &shared)
            })
            .expect("spawning a thread only fails when the OS is out of resources");
        Checkpointer {
            shared,
            thread: Some(thread),
        }
    }

    /// Takes over `writer`'s checkpoints (SQLite's auto-checkpoint no longer runs on it).
    pub fn attach(&self, writer: &mut Connection) -> rusqlite::Result<()> {
        let shared = self.shared.clone();
        writer.wal_hook(Some(move |_: &mut Wal, pages: c_int| {
            shared.committed(pages);
            Ok(())
        }))
    }

    /// For the writer, between group commits: after a background pass, copies what was
    /// committed meanwhile, so the next commit starts the log over.
    pub fn finish(&self, writer: &Connection) {
        if self.shared.finish.swap(false, Ordering::AcqRel) {
            checkpoint(writer);
        }
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        self.shared.update(|s| s.stopping = true);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn run(conn: &Connection, shared: &Shared) {
    loop {
        {
            let mut state = shared.state.lock().unwrap_or_else(|p| p.into_inner());
            while !state.requested && !state.stopping {
                state = shared.wake.wait(state).unwrap_or_else(|p| p.into_inner());
            }
            if state.stopping {
                return;
            }
        }
        checkpoint(conn);
        shared.finish.store(true, Ordering::Release);
        shared.update(|s| s.requested = false);
    }
}

fn checkpoint(conn: &Connection) {
    let result = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
        Ok((r.get::<_, i64>(1)?, r.get::<_, i64>(2)?))
    });
    match result {
        Ok((log, copied)) => tracing::trace!(log, copied, "outbox checkpoint"),
        Err(error) => tracing::error!(%error, "outbox checkpoint failed"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(dir: &std::path::Path) -> Connection {
        let conn = Connection::open(dir.join("t.db")).unwrap();
        conn.query_row("PRAGMA journal_mode=WAL", [], |_| Ok(()))
            .unwrap();
        // Durability is not what this test is about; thousands of fsyncs would only slow it.
        conn.pragma_update(None, "synchronous", "OFF").unwrap();
        conn
    }

    fn wal_pages(dir: &std::path::Path) -> u64 {
        std::fs::metadata(dir.join("t.db-wal")).map_or(0, |m| m.len()) / 4096
    }

    #[test]
    fn the_log_stays_bounded_and_starts_over() {
        let dir = tempfile::tempdir().unwrap();
        let mut writer = open(dir.path());
        writer.execute_batch("CREATE TABLE t (x BLOB)").unwrap();
        let every = 64;
        let backstop = every * BACKSTOP_INTERVALS;
        let checkpointer = Checkpointer::start(open(dir.path()), every);
        checkpointer.attach(&mut writer).unwrap();
        // A page per commit, several times the backstop in all.
        let blob = vec![7u8; 3000];
        let commits = 10 * backstop;
        for _ in 0..commits {
            writer
                .execute("INSERT INTO t VALUES (?1)", [&blob])
                .unwrap();
            checkpointer.finish(&writer);
        }
        drop(checkpointer);
        // Without checkpoints the log would hold every page written (two or more per commit);
        // started over, it holds about the backstop's worth (more only while a pass held the
        // checkpoint lock when the writer wanted it).
        let pages = wal_pages(dir.path());
        let written = 2 * u64::try_from(commits).unwrap();
        assert!(pages < written / 4, "{pages} pages in the log");
        let rows: i64 = writer
            .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .unwrap();
        assert_eq!(rows, i64::from(commits));
    }
}
