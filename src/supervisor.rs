//! Supervision of long-running tasks and threads: each has a name, and the first one to end
//! (return or panic) is reported, so that `lib::run` can drain and exit non-zero and the service
//! manager restarts a process that lost a part of itself.
//!
//! It never restarts anything in-process (a panicked task may have left state half-updated) and
//! never lets an ended task go unnoticed.

use std::collections::HashMap;
use std::future::Future;
use std::panic::AssertUnwindSafe;

use tokio::sync::{oneshot, watch};
use tokio::task::{Id, JoinSet};

/// How a supervised task ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ending {
    /// Its future completed.
    Returned,
    /// It panicked, with this message.
    Panicked(String),
    /// It was aborted.
    Cancelled,
}

/// A task that ended, by name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{task} {}", match ending {
    Ending::Returned => "ended".to_owned(),
    Ending::Panicked(message) => format!("panicked: {message}"),
    Ending::Cancelled => "was cancelled".to_owned(),
})]
pub struct Ended {
    pub task: String,
    pub ending: Ending,
}

/// A set of named tasks.
#[derive(Default)]
pub struct Supervisor {
    tasks: JoinSet<()>,
    names: HashMap<Id, String>,
}

impl Supervisor {
    pub fn new() -> Supervisor {
        Supervisor::default()
    }

    /// Spawns `task` under `name`.
    pub fn spawn(
        &mut self,
        name: impl Into<String>,
        task: impl Future<Output = ()> + Send + 'static,
    ) {
        let name = name.into();
        let injected = fault::panic_after(&name);
        let handle = self.tasks.spawn(async move {
            match injected {
                None => task.await,
                Some(delay) => tokio::select! {
                    () = task => {}
                    () = tokio::time::sleep(delay) => panic!("injected by FENX_DEBUG_PANIC"),
                },
            }
        });
        self.names.insert(handle.id(), name);
    }

    /// Waits for the next task to end. With no tasks left it never completes.
    pub async fn next_ended(&mut self) -> Ended {
        let Some(result) = self.tasks.join_next_with_id().await else {
            return std::future::pending().await;
        };
        let (id, ending) = match result {
            Ok((id, ())) => (id, Ending::Returned),
            Err(error) => {
                let id = error.id();
                let ending = match error.try_into_panic() {
                    Ok(payload) => Ending::Panicked(panic_message(payload.as_ref())),
                    Err(_) => Ending::Cancelled,
                };
                (id, ending)
            }
        };
        let task = self
            .names
            .remove(&id)
            .unwrap_or_else(|| "an unnamed task".into());
        Ended { task, ending }
    }

    /// Waits until every task has ended.
    pub async fn join_all(mut self) {
        while self.tasks.join_next().await.is_some() {}
    }

    /// For a pool of tasks that should run until `stopping` turns true: returns when the first
    /// one ends. An end before the stop is logged as an ERROR naming the task and returned;
    /// after the stop, the rest are awaited and `None` returned.
    pub async fn run_pool(mut self, stopping: &watch::Receiver<bool>) -> Option<Ended> {
        if self.tasks.is_empty() {
            let _ = stopping.clone().wait_for(|stop| *stop).await;
            return None;
        }
        let ended = self.next_ended().await;
        if *stopping.borrow() {
            self.join_all().await;
            return None;
        }
        tracing::error!(task = %ended.task, "{ended}");
        Some(ended)
    }
}

/// Runs `body` on a named OS thread; the returned receiver completes when the thread ends
/// (normally or by panic; a panic's message comes with it), so an async supervisor can watch it.
pub fn spawn_thread(
    name: &str,
    body: impl FnOnce() + Send + 'static,
) -> (std::thread::JoinHandle<()>, ThreadEnded) {
    let (ended, watch) = oneshot::channel();
    let handle = std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            let outcome = std::panic::catch_unwind(AssertUnwindSafe(body))
                .map_err(|payload| panic_message(payload.as_ref()));
            let _ = ended.send(outcome);
        })
        .expect("spawning a thread only fails when the OS is out of resources");
    (handle, ThreadEnded(watch))
}

/// Completes when a thread from [`spawn_thread`] has ended: `Err` holds its panic message.
pub struct ThreadEnded(oneshot::Receiver<Result<(), String>>);

impl ThreadEnded {
    /// Waits for the thread to end; a panic is logged as an ERROR naming the thread.
    pub async fn wait(self, name: &str) {
        if let Ok(Err(message)) = self.0.await {
            tracing::error!(thread = name, "{name} panicked: {message}");
        }
    }
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a non-text panic payload".into())
}

/// Debug builds only: `FENX_DEBUG_PANIC="<task name>@<delay>"` (e.g. `sync worker 1@2s`) makes
/// that task panic after the delay, so tests and the fault run can prove supervision
/// on the real binary. Release builds compile this out.
#[cfg(debug_assertions)]
mod fault {
    use std::time::Duration;

    pub fn panic_after(name: &str) -> Option<Duration> {
        let spec = std::env::var("FENX_DEBUG_PANIC").ok()?;
        let (task, delay) = spec.rsplit_once('@').unwrap_or((&spec, "0s"));
        (task == name)
            .then(|| humantime::parse_duration(delay).ok())
            .flatten()
    }
}

#[cfg(not(debug_assertions))]
mod fault {
    pub fn panic_after(_name: &str) -> Option<std::time::Duration> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn the_first_task_to_end_is_named_with_how_it_ended() {
        let mut tasks = Supervisor::new();
        tasks.spawn("forever", std::future::pending());
        tasks.spawn("panics", async {
            tokio::time::sleep(Duration::from_millis(10)).await;
            panic!("boom {}", 42);
        });
        let ended = tasks.next_ended().await;
        assert_eq!(ended.task, "panics");
        assert_eq!(ended.ending, Ending::Panicked("boom 42".into()));
        assert_eq!(ended.to_string(), "panics panicked: boom 42");

        tasks.spawn("returns", async {});
        let ended = tasks.next_ended().await;
        assert_eq!(
            (ended.task.as_str(), ended.ending),
            ("returns", Ending::Returned)
        );
    }

    #[tokio::test]
    async fn a_pool_reports_an_early_end_but_not_one_after_the_stop() {
        let (stop, stopping) = watch::channel(false);
        let mut pool = Supervisor::new();
        pool.spawn("worker 0", std::future::pending());
        pool.spawn("worker 1", async {});
        let ended = pool.run_pool(&stopping).await.unwrap();
        assert_eq!(ended.task, "worker 1");

        let mut pool = Supervisor::new();
        let mut rx = stopping.clone();
        pool.spawn("worker 0", async move {
            let _ = rx.wait_for(|s| *s).await;
        });
        stop.send(true).unwrap();
        assert_eq!(pool.run_pool(&stopping).await, None);
    }

    #[tokio::test]
    async fn a_thread_that_panics_is_seen_ending() {
        let (handle, ended) = spawn_thread("test thread", || panic!("thread boom"));
        assert_eq!(ended.0.await.unwrap(), Err("thread boom".to_owned()));
        assert!(handle.join().is_ok(), "the panic was caught and reported");
        let (_handle, ended) = spawn_thread("quiet thread", || {});
        assert_eq!(ended.0.await.unwrap(), Ok(()));
    }
}
