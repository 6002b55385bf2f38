//! Storage faults and supervision as an operator meets them: a disk filling up, a full disk, a
//! read-only store, a lock held by another process, a wedged writer, a deleted or replaced
//! reporting store, finished rows piling up, and a task that panics. Each checks what `/readyz`,
//! `/healthz` and the webhooks answered, and that nothing acknowledged was lost. Every wait is a
//! bounded condition.
//!
//! The small-disk tests mount a tmpfs and the read-only test uses `chattr +i` (root can write
//! through a plain chmod); where the machine does not allow that, they say so and skip.

use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use fenx_sim::Simulator;
use fenx_sim::testkit::service::{AfterStart, Service, serve_command};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::helpers::{SECRET, TestApp, eventually, notification, sign};
use crate::sync::{sim_config, sync_settings};

const MIB: u64 = 1024 * 1024;

/// Posts a signed notification with this id; returns the status.
async fn post(app: &TestApp, id: &str) -> reqwest::Response {
    app.post_signed(&notification(id, "entitydata:created"))
        .await
}

fn stored_ids(app: &TestApp) -> HashSet<String> {
    app.stored().into_iter().map(|r| r.id).collect()
}

fn assert_none_lost(app: &TestApp, acknowledged: &HashSet<String>) {
    let stored = stored_ids(app);
    let lost: Vec<&String> = acknowledged.difference(&stored).collect();
    assert!(lost.is_empty(), "acknowledged but not stored: {lost:?}");
}

/// Waits until `path` on the webhook listener answers `status` with `text` in its body.
async fn wait_probe(app: &TestApp, path: &str, status: u16, text: &str) -> String {
    eventually(
        &format!("{path} to answer {status} with {text:?}"),
        || async {
            let (got, body) = app.probe(path).await;
            (got == status && body.contains(text)).then_some(body)
        },
    )
    .await
}

async fn wait_metric(app: &TestApp, line: &str) {
    eventually(&format!("metric line {line:?}"), || async {
        app.metrics().await.lines().any(|l| l == line).then_some(())
    })
    .await
}

/// Waits until `reporting.db` holds at least `want` entities. Tolerant: the file may be
/// mid-recreation (no tables yet) when looked at, and is only ever opened read-only here.
async fn entities_stored(reporting: &std::path::Path, want: i64) {
    eventually(&format!("{want} entities in reporting.db"), || async {
        let conn = rusqlite::Connection::open_with_flags(
            reporting,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )
        .ok()?;
        let n: i64 = conn
            .query_row("SELECT count(*) FROM entity", [], |r| r.get(0))
            .ok()?;
        (n >= want).then_some(())
    })
    .await
}

/// A tmpfs of a few MiB mounted over a temp dir, unmounted on drop.
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    /// `None` (after saying why) where this process may not mount.
    fn mount(mib: u64) -> Option<SmallDisk> {
        let dir = tempfile::tempdir().unwrap();
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(dir.path())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !mounted {
            eprintln!("skipped: cannot mount a tmpfs here (needs root / CAP_SYS_ADMIN)");
            return None;
        }
        Some(SmallDisk { dir })
    }

    /// A temp dir for the store, on the small disk (the service needs to own a `TempDir`).
    fn store_dir(&self) -> tempfile::TempDir {
        tempfile::tempdir_in(self.dir.path()).unwrap()
    }

    fn free(&self) -> u64 {
        fenx_sync::health::free_bytes(self.dir.path()).unwrap()
    }

    /// Writes a ballast file of `bytes` (or until the disk is full); returns its path.
    fn ballast(&self, bytes: u64) -> PathBuf {
        let path = self.dir.path().join("ballast");
        let mut file = std::fs::File::create(&path).unwrap();
        let chunk = vec![0u8; 256 * 1024];
        let mut written = 0;
        while written < bytes {
            match file.write(&chunk[..chunk.len().min((bytes - written) as usize)]) {
                Ok(n) => written += n as u64,
                Err(_) => break,
            }
        }
        path
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_threshold_above_the_free_space_means_not_ready_and_503_before_sqlite() {
    let app = TestApp::start_in(tempfile::tempdir().unwrap(), |s| {
        s.store.min_free_bytes = u64::MAX;
    })
    .await;
    let body = wait_probe(&app, "/readyz", 503, "low disk space").await;
    assert!(body.contains("store.min_free_bytes"), "{body}");
    let refused = post(&app, "no-room").await;
    assert_eq!(refused.status(), 503);
    assert_eq!(refused.headers()["retry-after"], "5");
    assert_eq!(app.probe("/healthz").await.0, 200, "alive, just not ready");
    let metrics = app.metrics().await;
    assert!(metrics.lines().any(|l| l == "fenx_ready 0"), "{metrics}");
    let free = metrics
        .lines()
        .find_map(|l| l.strip_prefix("fenx_store_free_bytes "))
        .and_then(|v| v.parse::<u64>().ok())
        .expect("fenx_store_free_bytes is exported");
    assert!(free > 0);
    assert!(app.stored().is_empty());
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filling_disk_stops_webhooks_at_min_free_bytes_and_they_resume_when_space_returns() {
    let Some(disk) = SmallDisk::mount(160) else {
        return;
    };
    // Default store.min_free_bytes (64 MiB).
    let app = TestApp::start_in(disk.store_dir(), |_| {}).await;
    wait_probe(&app, "/readyz", 200, "ready").await;
    let mut acknowledged = HashSet::new();
    for i in 0..5 {
        let id = format!("before-{i}");
        assert_eq!(post(&app, &id).await.status(), 200);
        acknowledged.insert(id);
    }

    let ballast = disk.ballast(disk.free() - 40 * MIB);
    wait_probe(&app, "/readyz", 503, "low disk space").await;
    let refused = post(&app, "while-full").await;
    assert_eq!(refused.status(), 503);
    assert_eq!(refused.headers()["retry-after"], "5");
    assert_eq!(app.probe("/healthz").await.0, 200);
    wait_metric(&app, "fenx_ready 0").await;

    std::fs::remove_file(ballast).unwrap();
    wait_probe(&app, "/readyz", 200, "ready").await;
    assert_eq!(post(&app, "after").await.status(), 200);
    acknowledged.insert("after".into());
    wait_metric(&app, "fenx_ready 1").await;
    assert_none_lost(&app, &acknowledged);
    assert!(!stored_ids(&app).contains("while-full"));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_fails_the_commit_and_readiness_and_recovers_without_a_restart() {
    let Some(disk) = SmallDisk::mount(24) else {
        return;
    };
    let app = TestApp::start_in(disk.store_dir(), |s| s.store.min_free_bytes = 0).await;
    wait_probe(&app, "/readyz", 200, "ready").await;
    let ballast = disk.ballast(u64::MAX);
    let mut acknowledged = HashSet::new();
    let padding = "x".repeat(16 * 1024);
    let mut refused = None;
    for i in 0..2000 {
        let id = format!("fill-{i}");
        let body = notification(&id, "entitydata:created").replace(
            "\"Payload\":{}",
            &format!("\"Payload\":{{\"pad\":\"{padding}\"}}"),
        );
        let response = app.post_signed(&body).await;
        match response.status().as_u16() {
            200 => {
                acknowledged.insert(id);
            }
            status => {
                refused = Some((status, response.headers().get("retry-after").cloned()));
                break;
            }
        }
    }
    let (status, retry_after) = refused.expect("a full disk refuses a write");
    assert_eq!(status, 503);
    assert!(retry_after.is_some());
    wait_probe(&app, "/readyz", 503, "failed").await;

    std::fs::remove_file(ballast).unwrap();
    wait_probe(&app, "/readyz", 200, "ready").await;
    assert_eq!(post(&app, "after-full").await.status(), 200);
    acknowledged.insert("after-full".into());
    assert_none_lost(&app, &acknowledged);
    app.stop().await;
}

/// `chattr +i` on the outbox files, undone on drop (an immutable file left in /tmp would outlive
/// the test).
struct Immutable(Vec<PathBuf>);

impl Immutable {
    fn set(paths: Vec<PathBuf>) -> Option<Immutable> {
        let ok = Command::new("chattr")
            .arg("+i")
            .args(&paths)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        let guard = Immutable(paths);
        if !ok {
            eprintln!("skipped: chattr +i is not available on this filesystem");
            return None;
        }
        Some(guard)
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        let _ = Command::new("chattr").arg("-i").args(&self.0).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_store_fails_readiness_and_webhooks_then_recovers() {
    let app = TestApp::spawn().await;
    assert_eq!(post(&app, "before").await.status(), 200);
    let files: Vec<PathBuf> = ["outbox.db", "outbox.db-wal"]
        .iter()
        .map(|f| app.dir.path().join(f))
        .collect();
    let Some(immutable) = Immutable::set(files) else {
        app.stop().await;
        return;
    };
    // Taking the lock and rolling back still works on such a file; only a real commit fails.
    wait_probe(&app, "/readyz", 503, "failed").await;
    let refused = post(&app, "while-read-only").await;
    assert_eq!(refused.status(), 503);
    assert_eq!(refused.headers()["retry-after"], "5");
    assert_eq!(app.probe("/healthz").await.0, 200);

    drop(immutable);
    wait_probe(&app, "/readyz", 200, "ready").await;
    assert_eq!(post(&app, "after").await.status(), 200);
    let stored = stored_ids(&app);
    assert!(
        stored.contains("before") && stored.contains("after"),
        "{stored:?}"
    );
    assert!(!stored.contains("while-read-only"));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_outbox_lock_gives_the_first_503_after_one_busy_timeout_while_readyz_answers_at_once()
 {
    let busy_timeout = Duration::from_secs(2);
    let app = TestApp::spawn_with(|s| s.store.busy_timeout = busy_timeout).await;
    let blocker = app.outbox();
    blocker.execute_batch("BEGIN IMMEDIATE").unwrap();
    let app = Arc::new(app);
    // Probes keep coming meanwhile: none may queue in front of the webhook's commit.
    let prober = {
        let app = app.clone();
        tokio::spawn(async move {
            for _ in 0..20 {
                let answered = tokio::time::timeout(busy_timeout / 2, app.probe("/readyz")).await;
                assert!(answered.is_ok(), "/readyz waited for the outbox lock");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    let answer = tokio::time::timeout(busy_timeout * 7 / 4, post(&app, "while-locked")).await;
    let response = answer.expect("the first 503 came later than one busy_timeout (plus margin)");
    assert_eq!(response.status(), 503);
    prober.await.unwrap();
    wait_probe(&app, "/readyz", 503, "not ready").await;

    blocker.execute_batch("ROLLBACK").unwrap();
    assert_eq!(post(&app, "after").await.status(), 200);
    wait_probe(&app, "/readyz", 200, "ready").await;
    let app = Arc::into_inner(app).unwrap();
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_stuck_past_wedged_after_fails_liveness_until_it_moves_again() {
    // A lock held for longer than wedged_after stands in for a hung disk. (Loaded from a file,
    // wedged_after must exceed busy_timeout, so a lock wait alone never counts as wedged.)
    let app = TestApp::spawn_with(|s| {
        s.store.busy_timeout = Duration::from_secs(20);
        s.store.wedged_after = Duration::from_millis(500);
    })
    .await;
    let blocker = app.outbox();
    blocker.execute_batch("BEGIN IMMEDIATE").unwrap();
    let app = Arc::new(app);
    let stuck = {
        let app = app.clone();
        tokio::spawn(async move { post(&app, "stuck").await.status().as_u16() })
    };
    let body = wait_probe(&app, "/healthz", 503, "wedged").await;
    assert!(body.contains("outbox"), "{body}");
    let admin_health = app
        .client
        .get(format!("http://{}/healthz", app.admin_addr))
        .send()
        .await
        .unwrap();
    assert_eq!(admin_health.status(), 503);

    blocker.execute_batch("ROLLBACK").unwrap();
    assert_eq!(stuck.await.unwrap(), 200);
    wait_probe(&app, "/healthz", 200, "ok").await;
    assert!(stored_ids(&app).contains("stuck"));
    let app = Arc::into_inner(app).unwrap();
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_or_replaced_reporting_store_is_recreated_and_refilled() {
    let sim = Simulator::start(sim_config()).await;
    let app = TestApp::spawn_with(|s| sync_settings(s, &sim)).await;
    let reporting = app.dir.path().join("reporting.db");
    let entities: Vec<String> = (0..3).map(|i| sim.sample_entity(i).0).collect();
    for entity in &entities {
        let body = sim.notification("entitydata:draftverified", entity);
        assert_eq!(app.post_signed(&body).await.status(), 200);
    }
    entities_stored(&reporting, 3).await;

    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", reporting.display()));
    }
    eventually("reporting.db to be recreated", || async {
        reporting.exists().then_some(())
    })
    .await;
    entities_stored(&reporting, 3).await;
    wait_metric(&app, "fenx_reporting_store_reopened_total 1").await;

    // An operator restores some other file over it: also detected, also refilled.
    let other = app.dir.path().join("other.db");
    rusqlite::Connection::open(&other)
        .unwrap()
        .execute_batch("CREATE TABLE unrelated (x)")
        .unwrap();
    std::fs::rename(&other, &reporting).unwrap();
    entities_stored(&reporting, 3).await;
    wait_metric(&app, "fenx_reporting_store_reopened_total 2").await;

    // And new notifications land in the file analysts see.
    let (fourth, _) = sim.sample_entity(3);
    let body = sim.notification("entitydata:draftverified", &fourth);
    assert_eq!(app.post_signed(&body).await.status(), 200);
    entities_stored(&reporting, 4).await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_rows_past_retention_are_pruned_and_dead_and_pending_rows_stay() {
    let app = TestApp::spawn_with(|s| s.sync.enabled = false).await;
    for id in ["old-done", "old-ignored", "old-dead", "new-done", "pending"] {
        assert_eq!(post(&app, id).await.status(), 200);
    }
    app.outbox()
        .execute_batch(
            "UPDATE notification SET status = 'done', processed_at = '2020-01-01T00:00:00.000Z'
              WHERE id = 'old-done';
             UPDATE notification SET status = 'ignored', processed_at = '2020-01-01T00:00:00.000Z'
              WHERE id = 'old-ignored';
             UPDATE notification SET status = 'dead', processed_at = '2020-01-01T00:00:00.000Z'
              WHERE id = 'old-dead';
             UPDATE notification SET status = 'done', processed_at = strftime('%Y-%m-%dT%H:%M:%fZ')
              WHERE id = 'new-done';",
        )
        .unwrap();
    wait_metric(&app, "fenx_outbox_pruned_total 2").await;
    let left = stored_ids(&app);
    let expected: HashSet<String> = ["old-dead", "new-done", "pending"].map(String::from).into();
    assert_eq!(left, expected);
    wait_metric(&app, r#"fenx_outbox_rows{status="dead"} 1"#).await;
    app.stop().await;
}

/// The real binary with `FENX_DEBUG_PANIC` (debug builds only) set for one sync worker: the
/// process logs an ERROR naming it, finishes the request in flight, and exits non-zero.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_worker_stops_the_process_non_zero_after_draining() {
    let store = tempfile::tempdir().unwrap();
    let Service {
        mut child,
        addr,
        log,
    } = start_binary(
        store.path(),
        &[
            ("FENX_FENERGO__API_BASE", "http://127.0.0.1:9"),
            ("FENX_FENERGO__TENANT_ID", "t"),
            ("FENX_FENERGO__CLIENT_ID", "c"),
            ("FENX_FENERGO__CLIENT_SECRET", "s"),
            ("FENX_DEBUG_PANIC", "sync worker 1@3s"),
            // The body is held back across the panic on purpose: not a slow client.
            ("FENX_SERVER__MIN_BODY_RATE_GRACE", "60s"),
        ],
    );

    // A delivery whose body is still arriving when the worker panics.
    let body = notification("in-flight", "journey:taskcompleted");
    let signature = sign(SECRET, "sha256-hex/hex", &body);
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /webhooks/fenergo HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\nx-fenx-signature: {signature}\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(&body.as_bytes()[..10]).await.unwrap();

    let error = eventually("an ERROR naming the panicked worker", || async {
        log.lock()
            .unwrap()
            .iter()
            .find(|l| l.contains("\"ERROR\"") && l.contains("sync worker 1"))
            .cloned()
    })
    .await;
    assert!(error.contains("panicked"), "{error}");

    stream.write_all(&body.as_bytes()[10..]).await.unwrap();
    let mut answer = vec![0u8; 512];
    let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut answer))
        .await
        .expect("the in-flight request is answered")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer[..n]);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");

    let status = wait_exit(&mut child).await;
    assert!(!status.success(), "exit status {status:?}");
    let stored = crate::helpers::read_outbox(&store.path().join("outbox.db"));
    assert!(stored.iter().any(|r| r.id == "in-flight"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_outbox_stops_the_process_instead_of_acknowledging_into_a_lost_file() {
    let store = tempfile::tempdir().unwrap();
    let Service { mut child, log, .. } =
        start_binary(store.path(), &[("FENX_STORE__PROBE_INTERVAL", "100ms")]);
    for suffix in ["", "-wal", "-shm"] {
        std::fs::remove_file(store.path().join(format!("outbox.db{suffix}"))).unwrap();
    }
    let status = wait_exit(&mut child).await;
    assert!(!status.success(), "exit status {status:?}");
    let log = log.lock().unwrap();
    assert!(
        log.iter()
            .any(|l| l.contains("\"ERROR\"") && l.contains("outbox.db was deleted")),
        "{log:?}"
    );
}

/// `fenx-sync serve` on 127.0.0.1:0 (both listeners) with JSON logs and `env` added; returns
/// it with its webhook address and the log lines it writes.
fn start_binary(store: &Path, env: &[(&str, &str)]) -> Service {
    let mut command = serve_command(Path::new(env!("CARGO_BIN_EXE_fenx-sync")), store, SECRET);
    command.envs(env.iter().copied());
    Service::spawn(command, AfterStart::Keep)
}

/// Waits (bounded: 10 s) for the child to exit.
async fn wait_exit(child: &mut std::process::Child) -> std::process::ExitStatus {
    for _ in 0..500 {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = child.kill();
    panic!("the process did not exit within 10 s");
}
