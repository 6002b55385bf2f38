//! Hostile-client benchmark: `cargo bench --bench hostile`.
//!
//! Runs the real `fenx-sync serve` binary (release build, default settings apart from loopback
//! port 0 and a temp store) and attacks it from this process while valid signed deliveries are
//! sent from another runtime on its own thread, each on a fresh connection from 127.0.0.1 (as a
//! delivery from Fenergo would come):
//!
//! 1. baseline: valid deliveries only;
//! 2. slow bodies: 1,024 connections from 16 loopback addresses (127.0.1.1-16, 64 each, within
//!    the per-client cap) declare `Content-Length: 1000000`, send any 64-hex signature and then
//!    2 bytes every 10 ms (200 B/s), reconnecting whenever they are cut off;
//! 3. slowloris: 1,024 connections from 127.0.0.2 send an unfinished request head, one header
//!    byte a second, reconnecting 100 ms after being closed.
//!
//! Prints, per phase, the server's peak RSS (VmHWM of a fresh server process), what the attack
//! connections got, and p50/p99/max latency and statuses of the valid deliveries.
//! Knobs: FENX_BENCH_SECONDS (per attack phase, default 20), FENX_BENCH_ATTACKERS (default 1024).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fenx_sim::testkit::bench::{env_or, ms};
use fenx_sim::testkit::service::{AfterStart, Service, serve_command};
use fenx_sync::signature::Recipe;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::watch;

const SECRET: &str = "bench-secret";
/// Valid deliveries in flight at once during every phase.
const SENDERS: usize = 4;
/// Pause between one sender's deliveries.
const SEND_PAUSE: Duration = Duration::from_millis(20);
/// A valid delivery that takes longer than this counts as failed.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(5);
const BASELINE: Duration = Duration::from_secs(5);

fn main() {
    let seconds: u64 = env_or("FENX_BENCH_SECONDS", 20);
    let attackers: usize = env_or("FENX_BENCH_ATTACKERS", 1024);
    let _ = rlimit::increase_nofile_limit(attackers as u64 * 2 + 256);
    let phase = Duration::from_secs(seconds);
    println!(
        "fenx-sync serve with default limits; {SENDERS} valid senders from 127.0.0.1, a fresh \
         connection per delivery; {attackers} attack connections per attack phase\n"
    );
    println!(
        "{:<12} {:>9} {:>9} {:>8} {:>8} {:>8} {:>20}  attack connections",
        "phase", "peakRSS", "delivered", "p50 ms", "p99 ms", "max ms", "statuses"
    );
    run_phase("baseline", BASELINE, None);
    run_phase("slow bodies", phase, Some(Attack::SlowBodies(attackers)));
    run_phase("slowloris", phase, Some(Attack::Slowloris(attackers)));
}

#[derive(Debug, Clone, Copy)]
enum Attack {
    SlowBodies(usize),
    Slowloris(usize),
}

/// What the attack connections experienced, by kind.
type Tally = Arc<Mutex<BTreeMap<String, usize>>>;

fn run_phase(name: &str, length: Duration, attack: Option<Attack>) {
    let store = tempfile::tempdir().unwrap();
    let server = start_server(store.path());
    let (stop, stopping) = watch::channel(false);
    let tally: Tally = Arc::default();
    // The attack runs on its own runtime threads, so it cannot delay the senders' timers.
    let attack_thread = attack.map(|attack| {
        let (addr, tally, stopping) = (server.addr, tally.clone(), stopping.clone());
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(run_attack(attack, addr, tally, stopping));
        })
    });
    // Let the attack take hold before measuring.
    if attack.is_some() {
        std::thread::sleep(Duration::from_secs(2));
    }
    let addr = server.addr;
    let deliveries = std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(deliver(addr, length))
    })
    .join()
    .unwrap();
    let _ = stop.send(true);
    if let Some(thread) = attack_thread {
        thread.join().unwrap();
    }
    let rss_kib = stop_server(server);
    let stored = count_rows(&store.path().join("outbox.db"));
    assert!(
        stored >= deliveries.ok(),
        "acknowledged more than was stored"
    );
    let attack_summary: Vec<String> = tally
        .lock()
        .unwrap()
        .iter()
        .map(|(k, n)| format!("{k}:{n}"))
        .collect();
    println!(
        "{:<12} {:>6.1}MiB {:>9} {:>8.1} {:>8.1} {:>8.1} {:>20}  {}",
        name,
        rss_kib as f64 / 1024.0,
        deliveries.latencies.len(),
        ms(deliveries.percentile(0.50)),
        ms(deliveries.percentile(0.99)),
        ms(deliveries.latencies.last().copied().unwrap_or_default()),
        deliveries.statuses(),
        if attack_summary.is_empty() {
            "-".to_owned()
        } else {
            attack_summary.join(" ")
        },
    );
}

async fn run_attack(
    attack: Attack,
    addr: SocketAddr,
    tally: Tally,
    stopping: watch::Receiver<bool>,
) {
    let tasks: Vec<_> = match attack {
        Attack::SlowBodies(n) => (0..n)
            .map(|i| {
                let source = format!("127.0.1.{}", 1 + i % 16);
                tokio::spawn(attacker(
                    addr,
                    source,
                    SLOW_BODY,
                    tally.clone(),
                    stopping.clone(),
                ))
            })
            .collect(),
        Attack::Slowloris(n) => (0..n)
            .map(|_| {
                tokio::spawn(attacker(
                    addr,
                    "127.0.0.2".into(),
                    SLOWLORIS,
                    tally.clone(),
                    stopping.clone(),
                ))
            })
            .collect(),
    };
    for task in tasks {
        let _ = task.await;
    }
}

/// One attack connection's script: a head, then a trickle.
struct Script {
    head: &'static str,
    trickle: &'static [u8],
    every: Duration,
}

const SLOW_BODY: Script = Script {
    head: "POST /webhooks/fenergo HTTP/1.1\r\nhost: x\r\ncontent-length: 1000000\r\n\
           x-fenx-signature: 0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef\r\n\r\n",
    trickle: b"{\"",
    every: Duration::from_millis(10),
};

const SLOWLORIS: Script = Script {
    head: "POST /webhooks/fenergo HTTP/1.1\r\nhost: x\r\nx-padding: ",
    trickle: b"a",
    every: Duration::from_secs(1),
};

/// Keeps one attack connection going until stopped: connect from `source`, send the head, then
/// the trickle, and start again when the server answers or closes.
async fn attacker(
    addr: SocketAddr,
    source: String,
    script: Script,
    tally: Tally,
    mut stopping: watch::Receiver<bool>,
) {
    let source: SocketAddr = format!("{source}:0").parse().unwrap();
    while !*stopping.borrow() {
        let outcome = tokio::select! {
            outcome = attack_once(addr, source, &script) => outcome,
            _ = stopping.wait_for(|stop| *stop) => return,
        };
        *tally.lock().unwrap().entry(outcome).or_default() += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One attack connection from start to end; says how it ended.
async fn attack_once(addr: SocketAddr, source: SocketAddr, script: &Script) -> String {
    let started = Instant::now();
    let outcome = attack_connection(addr, source, script).await;
    match outcome.as_str() {
        "closed" if started.elapsed() < Duration::from_millis(500) => "closed_at_once".into(),
        "closed" => "closed_later".into(),
        _ => outcome,
    }
}

async fn attack_connection(addr: SocketAddr, source: SocketAddr, script: &Script) -> String {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(source).unwrap();
    let Ok(mut stream) = socket.connect(addr).await else {
        return "connect_failed".into();
    };
    if stream.write_all(script.head.as_bytes()).await.is_err() {
        return "closed".into();
    }
    let mut ticks = tokio::time::interval(script.every);
    let mut answer = [0u8; 64];
    loop {
        tokio::select! {
            read = stream.read(&mut answer) => return ended(read, &answer),
            _ = ticks.tick() => {
                if stream.write_all(script.trickle).await.is_err() {
                    return ended(read_now(&mut stream, &mut answer).await, &answer);
                }
            }
        }
    }
}

async fn read_now(stream: &mut TcpStream, buf: &mut [u8]) -> std::io::Result<usize> {
    tokio::time::timeout(Duration::from_millis(100), stream.read(buf))
        .await
        .unwrap_or(Ok(0))
}

/// "closed" for a close without an answer (at accept, or at the header timeout), else the status.
fn ended(read: std::io::Result<usize>, answer: &[u8]) -> String {
    match read {
        Ok(n) if n >= 12 && answer.starts_with(b"HTTP/1.1 ") => {
            String::from_utf8_lossy(&answer[9..12]).into_owned()
        }
        _ => "closed".into(),
    }
}

struct Deliveries {
    /// Sorted.
    latencies: Vec<Duration>,
    statuses: BTreeMap<String, usize>,
}

impl Deliveries {
    fn ok(&self) -> usize {
        self.statuses.get("200").copied().unwrap_or(0)
    }

    fn percentile(&self, p: f64) -> Duration {
        let index = ((self.latencies.len() as f64 - 1.0) * p).round() as usize;
        self.latencies.get(index).copied().unwrap_or_default()
    }

    fn statuses(&self) -> String {
        let parts: Vec<String> = self
            .statuses
            .iter()
            .map(|(s, n)| format!("{s}:{n}"))
            .collect();
        parts.join(" ")
    }
}

/// Valid signed deliveries from 127.0.0.1 for `length`, each on a new connection.
async fn deliver(addr: SocketAddr, length: Duration) -> Deliveries {
    let client = fenx_sync::fenergo::client_builder()
        .pool_max_idle_per_host(0)
        .timeout(DELIVERY_TIMEOUT)
        .build()
        .unwrap();
    let url = format!("http://{addr}/webhooks/fenergo");
    let recipe: Recipe = "sha256-hex/hex".parse().unwrap();
    let until = Instant::now() + length;
    let senders: Vec<_> = (0..SENDERS)
        .map(|sender| {
            let (client, url) = (client.clone(), url.clone());
            tokio::spawn(async move {
                let mut results = Vec::new();
                let mut i = 0;
                while Instant::now() < until {
                    let body = format!(
                        r#"{{"Id":"valid-{sender}-{i}","EventType":"entitydata:draftverified","RelativeUrl":"entitydataquery/api/entity/9b22ae41-3f0a-4c68-a332-8669705ee3ec","Payload":{{}}}}"#
                    );
                    let signature = recipe.sign(SECRET, body.as_bytes());
                    let started = Instant::now();
                    let status = match client
                        .post(&url)
                        .header("x-fenx-signature", signature)
                        .body(body)
                        .send()
                        .await
                    {
                        Ok(response) => response.status().as_u16().to_string(),
                        Err(error) if error.is_timeout() => "timeout".into(),
                        Err(_) => "error".into(),
                    };
                    results.push((started.elapsed(), status));
                    i += 1;
                    tokio::time::sleep(SEND_PAUSE).await;
                }
                results
            })
        })
        .collect();
    let mut deliveries = Deliveries {
        latencies: Vec::new(),
        statuses: BTreeMap::new(),
    };
    for sender in senders {
        for (latency, status) in sender.await.unwrap() {
            deliveries.latencies.push(latency);
            *deliveries.statuses.entry(status).or_default() += 1;
        }
    }
    deliveries.latencies.sort();
    deliveries
}

/// The real binary on 127.0.0.1:0 with a temp store, its log (a line per delivery) dropped.
fn start_server(store: &std::path::Path) -> Service {
    let mut command = serve_command(Path::new(env!("CARGO_BIN_EXE_fenx-sync")), store, SECRET);
    command.env("FENX_LOG__LEVEL", "warn,fenx_sync=info");
    Service::spawn(command, AfterStart::Discard)
}

/// Stops the server and returns its peak RSS in KiB.
fn stop_server(mut server: Service) -> u64 {
    let rss = server.peak_rss_kib();
    let _ = server.child.kill();
    let _ = server.child.wait();
    rss
}

fn count_rows(path: &std::path::Path) -> usize {
    rusqlite::Connection::open(path)
        .and_then(|c| {
            c.query_row("SELECT count(*) FROM notification", [], |r| {
                r.get::<_, i64>(0)
            })
        })
        .map_or(0, |n| n as usize)
}
