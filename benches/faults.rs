//! Fault run: `cargo build && cargo bench --bench faults`.
//!
//! Runs the real binary (`target/debug/fenx-sync` by default, or `FENX_BIN`: the panicking-worker
//! fault needs a debug build, whose `FENX_DEBUG_PANIC` hook release builds compile out) under a
//! steady webhook load (100 signed notifications/s) and a 100 ms poll of `/readyz` and
//! `/healthz`, injects one storage fault per scenario, takes it away again, and prints what each
//! endpoint answered, how fast readiness followed the fault and the recovery, the ERROR lines
//! logged, and whether every acknowledged notification was stored.
//!
//! Faults: free space below `store.min_free_bytes` and a full disk (a small tmpfs; needs root),
//! a read-only store (`chattr +i`), the outbox lock held by another process, `reporting.db`
//! deleted (with the simulator and the sync worker), and a panicking sync worker. Every
//! scenario is bounded in time and requests.

use std::collections::{BTreeMap, HashSet};
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fenx_sim::testkit;
use fenx_sim::testkit::service::{AfterStart, Log, serve_command};
use fenx_sim::{SimConfig, Simulator};
use fenx_sync::signature::Recipe;

const SECRET: &str = "fault-run-secret";
const TENANT: &str = "45bf62ac-e4b1-4c16-ae32-d774cd18db6d";

fn main() {
    let bin = std::env::var("FENX_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|_| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/debug/fenx-sync"));
    assert!(
        bin.is_file(),
        "{} not found: run `cargo build` first (or set FENX_BIN)",
        bin.display()
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        println!("binary: {}\n", bin.display());
        low_disk(&bin).await;
        full_disk(&bin).await;
        read_only(&bin).await;
        held_lock(&bin).await;
        reporting_deleted(&bin).await;
        panicking_worker(&bin).await;
    });
}

/// The service as a child process, with its JSON log collected.
struct Service {
    child: Child,
    addr: SocketAddr,
    log: Log,
}

impl Service {
    fn start(bin: &Path, store: &Path, env: &[(&str, String)]) -> Service {
        let mut command = serve_command(bin, store, SECRET);
        command
            .env("FENX_LOG__LEVEL", "warn,fenx_sync=info")
            .env("FENX_SYNC__ENABLED", "false")
            .envs(env.iter().map(|(key, value)| (key, value)));
        let spawned = testkit::service::Service::spawn(command, AfterStart::Keep);
        Service {
            child: spawned.child,
            addr: spawned.addr,
            log: spawned.log,
        }
    }

    /// ERROR lines logged so far (their message), skipping per-request lines.
    fn errors(&self) -> Vec<String> {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["level"] == "ERROR" && v["message"] != "webhook not stored")
            .map(|v| v["message"].as_str().unwrap_or_default().to_owned())
            .collect()
    }

    fn stop(mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

/// What the load and the probes saw, with times relative to the start.
#[derive(Default)]
struct Observed {
    webhooks: Vec<(Duration, u16, String)>,
    probes: Vec<(Duration, u16, u16)>,
}

/// Steady webhook load and readiness/liveness polling until `stop`.
fn observe(addr: SocketAddr, started: Instant, stop: Arc<AtomicBool>) -> Arc<Mutex<Observed>> {
    let observed = Arc::new(Mutex::new(Observed::default()));
    let client = fenx_sync::fenergo::client_builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let recipe: Recipe = "sha256-hex/hex".parse().unwrap();
    // Up to 8 requests in flight: a stalled commit must not stall the whole timeline.
    for lane in 0..8 {
        let (client, observed, stop) = (client.clone(), observed.clone(), stop.clone());
        tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) && i < 5000 {
                let id = format!("fault-{lane}-{i}");
                let body = format!(
                    r#"{{"Id":"{id}","EventType":"journey:taskcompleted","RelativeUrl":"x","When":"2026-12-01T00:00:00Z"}}"#
                );
                let status = client
                    .post(format!("http://{addr}/webhooks/fenergo"))
                    .header("x-fenx-signature", recipe.sign(SECRET, body.as_bytes()))
                    .body(body)
                    .send()
                    .await
                    .map_or(0, |r| r.status().as_u16());
                observed
                    .lock()
                    .unwrap()
                    .webhooks
                    .push((started.elapsed(), status, id));
                i += 1;
                tokio::time::sleep(Duration::from_millis(80)).await;
            }
        });
    }
    let (observed_probes, stop_probes) = (observed.clone(), stop);
    tokio::spawn(async move {
        while !stop_probes.load(Ordering::Relaxed) {
            let get = |path: &str| {
                client
                    .get(format!("http://{addr}{path}"))
                    .timeout(Duration::from_secs(2))
                    .send()
            };
            let ready = get("/readyz").await.map_or(0, |r| r.status().as_u16());
            let alive = get("/healthz").await.map_or(0, |r| r.status().as_u16());
            observed_probes
                .lock()
                .unwrap()
                .probes
                .push((started.elapsed(), ready, alive));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    observed
}

/// Runs one fault: load for 1 s, `inject`, hold for `hold`, `recover`, load for 2 s more; prints.
async fn scenario(
    name: &str,
    service: Service,
    store: &Path,
    hold: Duration,
    inject: impl FnOnce(),
    recover: impl FnOnce(),
) {
    let started = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let observed = observe(service.addr, started, stop.clone());
    tokio::time::sleep(Duration::from_secs(1)).await;
    let fault_at = started.elapsed();
    inject();
    tokio::time::sleep(hold).await;
    let recover_at = started.elapsed();
    recover();
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let errors = service.errors();
    service.stop();
    let observed = observed.lock().unwrap();
    report(name, &observed, fault_at, recover_at, &errors, store);
}

fn report(
    name: &str,
    seen: &Observed,
    fault_at: Duration,
    recover_at: Duration,
    errors: &[String],
    store: &Path,
) {
    let phase = |t: Duration| match t {
        t if t < fault_at => "before",
        t if t < recover_at => "fault",
        _ => "after",
    };
    let mut webhooks: BTreeMap<(&str, u16), usize> = BTreeMap::new();
    for (t, status, _) in &seen.webhooks {
        *webhooks.entry((phase(*t), *status)).or_default() += 1;
    }
    let first_after = |from: Duration, want: &dyn Fn(u16, u16) -> bool| {
        seen.probes
            .iter()
            .find(|(t, r, h)| *t >= from && want(*r, *h))
            .map(|(t, ..)| format!("{:.0} ms", (*t - from).as_secs_f64() * 1000.0))
            .unwrap_or_else(|| "never".into())
    };
    let first_503 = seen
        .webhooks
        .iter()
        .filter(|(t, status, _)| *t >= fault_at && *status == 503)
        .map(|(t, ..)| *t)
        .min()
        .map_or("none".into(), |t| {
            format!("{:.0} ms", (t - fault_at).as_secs_f64() * 1000.0)
        });
    let healthz: HashSet<u16> = seen
        .probes
        .iter()
        .filter(|(t, ..)| phase(*t) == "fault")
        .map(|(.., h)| *h)
        .collect();
    println!("== {name}");
    println!(
        "  /readyz 503 {} after the fault; 200 again {} after it was removed; /healthz during the fault: {:?}",
        first_after(fault_at, &|r, _| r == 503),
        first_after(recover_at, &|r, _| r == 200),
        healthz
    );
    let statuses: Vec<String> = webhooks
        .iter()
        .map(|((phase, status), n)| format!("{phase}:{status}x{n}"))
        .collect();
    println!(
        "  webhooks: {}; first 503 {first_503} after the fault",
        statuses.join(" ")
    );
    println!("  {}", losses(seen, store));
    print_errors(errors);
}

/// "acknowledged A, stored S, lost L": every 200 must be in the outbox.
fn losses(seen: &Observed, store: &Path) -> String {
    let acknowledged: HashSet<&str> = seen
        .webhooks
        .iter()
        .filter(|(_, status, _)| *status == 200)
        .map(|(.., id)| id.as_str())
        .collect();
    let stored = stored_ids(store);
    let lost = acknowledged
        .iter()
        .filter(|id| !stored.contains(**id))
        .count();
    format!(
        "acknowledged {}, stored {}, lost {lost}",
        acknowledged.len(),
        stored.len()
    )
}

fn print_errors(errors: &[String]) {
    println!("  ERROR lines: {}", errors.len());
    for e in errors.iter().take(3) {
        println!("    {e}");
    }
    println!();
}

fn stored_ids(store: &Path) -> HashSet<String> {
    let Ok(conn) = rusqlite::Connection::open(store.join("outbox.db")) else {
        return HashSet::new();
    };
    conn.prepare("SELECT id FROM notification")
        .and_then(|mut s| s.query_map([], |r| r.get(0))?.collect())
        .unwrap_or_default()
}

/// A tmpfs mounted over a temp dir (unmounted on drop); `None` where mounting is not allowed.
struct SmallDisk(tempfile::TempDir);

impl SmallDisk {
    fn mount(mib: u64) -> Option<SmallDisk> {
        let dir = tempfile::tempdir().unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(dir.path())
            .status()
            .is_ok_and(|s| s.success());
        ok.then_some(SmallDisk(dir))
    }

    fn path(&self) -> &Path {
        self.0.path()
    }

    fn ballast(&self, bytes: u64) {
        let mut file = std::fs::File::create(self.path().join("ballast")).unwrap();
        let chunk = vec![0u8; 256 * 1024];
        let mut written = 0u64;
        while written < bytes {
            match file.write(&chunk) {
                Ok(n) => written += n as u64,
                Err(_) => break,
            }
        }
    }

    fn remove_ballast(&self) {
        let _ = std::fs::remove_file(self.path().join("ballast"));
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.path()).status();
    }
}

async fn low_disk(bin: &Path) {
    let Some(disk) = SmallDisk::mount(160) else {
        println!("== low disk: skipped (cannot mount a tmpfs here)\n");
        return;
    };
    let store = disk.path().join("store");
    std::fs::create_dir_all(&store).unwrap();
    let service = Service::start(bin, &store, &[]);
    let free = fenx_sync::health::free_bytes(disk.path()).unwrap();
    scenario(
        "free space below store.min_free_bytes (160 MiB tmpfs filled to 40 MiB free; default 64 MiB minimum)",
        service,
        &store,
        Duration::from_secs(4),
        || disk.ballast(free - 40 * 1024 * 1024),
        || disk.remove_ballast(),
    )
    .await;
}

async fn full_disk(bin: &Path) {
    let Some(disk) = SmallDisk::mount(24) else {
        println!("== full disk: skipped (cannot mount a tmpfs here)\n");
        return;
    };
    let store = disk.path().join("store");
    std::fs::create_dir_all(&store).unwrap();
    let service = Service::start(bin, &store, &[("FENX_STORE__MIN_FREE_BYTES", "0".into())]);
    scenario(
        "disk full (24 MiB tmpfs filled to ENOSPC, store.min_free_bytes = 0: SQLite meets it)",
        service,
        &store,
        Duration::from_secs(4),
        || disk.ballast(u64::MAX),
        || disk.remove_ballast(),
    )
    .await;
}

async fn read_only(bin: &Path) {
    let dir = tempfile::tempdir().unwrap();
    let service = Service::start(bin, dir.path(), &[]);
    let files: Vec<PathBuf> = ["outbox.db", "outbox.db-wal"]
        .iter()
        .map(|f| dir.path().join(f))
        .collect();
    let chattr = |flag: &str| {
        Command::new("chattr")
            .arg(flag)
            .args(&files)
            .status()
            .is_ok_and(|s| s.success())
    };
    scenario(
        "read-only store (chattr +i outbox.db outbox.db-wal)",
        service,
        dir.path(),
        Duration::from_secs(4),
        || {
            if !chattr("+i") {
                println!("(chattr +i failed: this scenario shows no fault)");
            }
        },
        || {
            chattr("-i");
        },
    )
    .await;
}

async fn held_lock(bin: &Path) {
    let dir = tempfile::tempdir().unwrap();
    let service = Service::start(bin, dir.path(), &[]);
    let blocker = Arc::new(Mutex::new(None::<rusqlite::Connection>));
    let (hold, release) = (blocker.clone(), blocker);
    let outbox = dir.path().join("outbox.db");
    scenario(
        "outbox write lock held by another process for 8 s (store.busy_timeout 5 s)",
        service,
        dir.path(),
        Duration::from_secs(8),
        move || {
            let conn = rusqlite::Connection::open(&outbox).unwrap();
            conn.execute_batch("BEGIN IMMEDIATE").unwrap();
            *hold.lock().unwrap() = Some(conn);
        },
        move || {
            if let Some(conn) = release.lock().unwrap().take() {
                conn.execute_batch("ROLLBACK").unwrap();
            }
        },
    )
    .await;
}

fn sim_env(sim: &Simulator) -> Vec<(&'static str, String)> {
    vec![
        ("FENX_SYNC__ENABLED", "true".into()),
        ("FENX_FENERGO__API_BASE", sim.api_base()),
        ("FENX_FENERGO__TOKEN_URL", sim.token_url()),
        ("FENX_FENERGO__TENANT_ID", TENANT.into()),
        ("FENX_FENERGO__CLIENT_ID", "fault-run".into()),
        ("FENX_FENERGO__CLIENT_SECRET", "client-secret".into()),
        ("FENX_FENERGO__REQUESTS_PER_SECOND", "1000".into()),
    ]
}

fn sim_config() -> SimConfig {
    SimConfig {
        tenant_id: TENANT.into(),
        client_id: "fault-run".into(),
        client_secret: "client-secret".into(),
        ..SimConfig::default()
    }
}

fn entity_count(path: &Path) -> Option<i64> {
    rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .ok()?
        .query_row("SELECT count(*) FROM entity", [], |r| r.get(0))
        .ok()
}

async fn wait_entities(path: &Path, want: i64, limit: Duration) -> Option<Duration> {
    let started = Instant::now();
    while started.elapsed() < limit {
        if entity_count(path).is_some_and(|n| n >= want) {
            return Some(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

async fn reporting_deleted(bin: &Path) {
    const ENTITIES: usize = 50;
    let sim = Simulator::start(sim_config()).await;
    let dir = tempfile::tempdir().unwrap();
    let service = Service::start(bin, dir.path(), &sim_env(&sim));
    let client = fenx_sync::fenergo::client_builder().build().unwrap();
    let recipe: Recipe = "sha256-hex/hex".parse().unwrap();
    for i in 0..ENTITIES {
        let (entity, _) = sim.sample_entity(i);
        let body = sim.notification("entitydata:draftverified", &entity);
        client
            .post(format!("http://{}/webhooks/fenergo", service.addr))
            .header("x-fenx-signature", recipe.sign(SECRET, body.as_bytes()))
            .body(body)
            .send()
            .await
            .unwrap();
    }
    let reporting = dir.path().join("reporting.db");
    let synced = wait_entities(&reporting, ENTITIES as i64, Duration::from_secs(30)).await;
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", reporting.display()));
    }
    let refilled = wait_entities(&reporting, ENTITIES as i64, Duration::from_secs(30)).await;
    let ready = client
        .get(format!("http://{}/readyz", service.addr))
        .send()
        .await
        .map_or(0, |r| r.status().as_u16());
    let errors = service.errors();
    service.stop();
    println!("== reporting.db (+ -wal, -shm) deleted while running, {ENTITIES} entities synced");
    println!(
        "  synced first in {synced:?}; after the delete, recreated and refilled with all {ENTITIES} in {refilled:?}; /readyz {ready} (the outbox is unaffected)"
    );
    print_errors(&errors);
}

async fn panicking_worker(bin: &Path) {
    let sim = Simulator::start(sim_config()).await;
    let dir = tempfile::tempdir().unwrap();
    let mut env = sim_env(&sim);
    env.push(("FENX_DEBUG_PANIC", "sync worker 1@2s".into()));
    let mut service = Service::start(bin, dir.path(), &env);
    let started = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let observed = observe(service.addr, started, stop.clone());
    let exit = loop {
        if let Some(status) = service.child.try_wait().unwrap() {
            break Some(status);
        }
        if started.elapsed() > Duration::from_secs(30) {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let exited_after = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let errors = service.errors();
    let _ = service.child.kill();
    let observed = observed.lock().unwrap();
    println!("== a sync worker panics 2 s after start (FENX_DEBUG_PANIC, debug build)");
    println!(
        "  process exited after {:.0} ms with {exit:?}; {}",
        exited_after.as_secs_f64() * 1000.0,
        losses(&observed, dir.path())
    );
    print_errors(&errors);
}
