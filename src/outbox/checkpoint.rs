//! Checkpoints of the outbox's write-ahead log, off the commit path: committed pages are copied
//! from `outbox-wal` into `outbox.db` by a thread with its own connection, so no append waits for
//! a checkpoint.
//!
//! The writer connection reports the log's size after every commit (SQLite's WAL hook, which
//! takes the place of its auto-checkpoint). Past [`CHECKPOINT_PAGES`] this thread runs a PASSIVE
//! checkpoint, which never blocks the writer; the next commit after a complete one starts the log
//! over. If the thread falls behind (a long reader, a slow disk) and the log reaches
//! [`BACKSTOP_PAGES`], the writer checkpoints in line, as SQLite would, so the log stays bounded.
//! It must never make a commit look failed: the hook runs after the commit, so it logs checkpoint
//! errors instead of returning them.

use std::ffi::c_int;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use rusqlite::hooks::Wal;
use rusqlite::Connection;
use rusqlite::wal::CheckpointMode;

/// Log size (in pages) that asks for a background checkpoint: SQLite's own auto-checkpoint size.
pub const CHECKPOINT_PAGES: c_int = 1000;
/// Log size at which the writer stops waiting for the background thread and checkpoints itself.
pub const BACKSTOP_PAGES: c_int = 10 * CHECKPOINT_PAGES;

#[derive(Default)]
struct Signal {
    state: Mutex<State>,
    wake: Condvar,
}

#[derive(Default)]
struct State {
    requested: bool,
    stopping: bool,
}

impl Signal {
    fn update(&self, change: impl FnOnce(&mut State)) {
        change(&mut self.state.lock().unwrap_or_else(|p| p.into_inner()));
        self.wake.notify_one();
    }
}

/// The checkpoint thread. Dropping it stops the thread and waits for it.
pub struct Checkpointer {
    signal: Arc<Signal>,
    thread: Option<JoinHandle<()>>,
}

impl Checkpointer {
    /// Starts the thread on `conn`, its own connection to the outbox.
    pub fn start(conn: Connection) -> Checkpointer {
        let signal = Arc::new(Signal::default());
        let thread = std::thread::Builder::new()
            .name("outbox-checkpoint".into())
            .spawn({
                let signal = signal.clone();
                move || run(&conn, &signal)
            })
            .expect("spawning a thread only fails when the OS is out of resources");
        Checkpointer {
            signal,
            thread: Some(thread),
        }
    }

    /// Hands `writer`'s checkpoints to this thread (with the in-line backstop).
    pub fn attach(&self, writer: &mut Connection) -> rusqlite::Result<()> {
        let signal = self.signal.clone();
        writer.wal_hook(Some(move |wal: &mut Wal, pages: c_int| {
            if pages >= BACKSTOP_PAGES {
                tracing::warn!(
                    pages,
                    "outbox write-ahead log is large; the writer checkpoints it itself"
                );
                if let Err(error) = wal.checkpoint_v2(CheckpointMode::PASSIVE) {
                    tracing::error!(%error, pages, "outbox checkpoint failed");
                }
            } else if pages >= CHECKPOINT_PAGES {
                signal.update(|s| s.requested = true);
            }
            Ok(())
        }))
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        self.signal.update(|s| s.stopping = true);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn run(conn: &Connection, signal: &Signal) {
    loop {
        {
            let mut state = signal.state.lock().unwrap_or_else(|p| p.into_inner());
            while !state.requested && !state.stopping {
                state = signal.wake.wait(state).unwrap_or_else(|p| p.into_inner());
            }
            if state.stopping {
                return;
            }
            state.requested = false;
        }
        // Requests that arrive meanwhile are served by the next pass.
        let checkpoint = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
            Ok((r.get::<_, i64>(1)?, r.get::<_, i64>(2)?))
        });
        match checkpoint {
            Ok((log, copied)) => tracing::trace!(log, copied, "outbox checkpoint"),
            Err(error) => tracing::error!(%error, "outbox checkpoint failed"),
        }
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
    fn the_log_stays_bounded_while_the_writer_never_checkpoints_itself() {
        let dir = tempfile::tempdir().unwrap();
        let mut writer = open(dir.path());
        writer
            .execute_batch("CREATE TABLE t (x BLOB)")
            .unwrap();
        let checkpointer = Checkpointer::start(open(dir.path()));
        checkpointer.attach(&mut writer).unwrap();
        // Each commit adds a page or two: well over twice the backstop in all.
        let blob = vec![7u8; 3000];
        for _ in 0..(5 * BACKSTOP_PAGES / 2) {
            writer.execute("INSERT INTO t VALUES (?1)", [&blob]).unwrap();
        }
        drop(checkpointer);
        assert!(
            wal_pages(dir.path()) <= 2 * BACKSTOP_PAGES as u64,
            "{} pages in the log",
            wal_pages(dir.path())
        );
        let rows: i64 = writer
            .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .unwrap();
        assert_eq!(rows, i64::from(5 * BACKSTOP_PAGES / 2));
    }
}
