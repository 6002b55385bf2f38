//! Ingest benchmark: `cargo bench --bench ingest`.
//!
//! This binary is the load generator, in a process of its own. It drives two servers, each a
//! child process on an ephemeral loopback port, in the same run:
//! - the release `fenx-sync serve` in its default configuration (only the listen addresses, one
//!   webhook secret and a fresh store directory are set), logging to a pipe this binary drains;
//! - a bare hyper server (this binary re-run with `--bare-server`; the same accept loop and
//!   connection settings as fenx-sync) that reads the body and answers 200 doing no other work:
//!   the ceiling of the machine and of this load generator.
//!
//! The load: pre-built requests over N keep-alive connections (one request in flight on each),
//! written raw on a multi-thread runtime, so generating load costs as little as it can. The mix:
//! unique ~400-byte Fenergo-shaped notifications, 5% exact re-deliveries of an earlier one,
//! 1% with a bad signature. Each server gets the same requests; each fenx-sync run a fresh
//! store. After each fenx-sync run the server is killed with SIGKILL and every acknowledged id is
//! looked up in its outbox (the run aborts if one is missing).
//!
//! Printed per round and as medians over the rounds: req/s, p50/p99/max latency, statuses, the
//! server's peak RSS (`VmHWM`), fenx-sync's req/s as a ratio of the bare server's in the same
//! round, and one fdatasync's cost on the store's disk (the floor of a durable c=1 request).
//!
//! Knobs: FENX_BENCH_SECONDS (per scenario, default 4), FENX_BENCH_REQUESTS (cap per scenario,
//! default 300000), FENX_BENCH_CONNECTIONS (default "1,16,64"), FENX_BENCH_ROUNDS (default 3),
//! FENX_BENCH_LOAD_THREADS (load generator threads, default 2); TOKIO_WORKER_THREADS, when set, is
//! passed to fenx-sync (its runtime's threads; by default one fewer than the cores).

use std::collections::{BTreeMap, HashSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use fenx_sim::testkit::bench::{env_or, ms};
use fenx_sim::testkit::service::peak_rss_kib;
use fenx_sync::http::{ConnectionLimits, RequestBody, Routes, json_response};
use fenx_sync::signature::{DigestEncoding, KeyDerivation, Recipe};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const SECRET: &str = "bench-secret";
const BARE_FLAG: &str = "--bare-server";
const RECIPE: Recipe = Recipe {
    key: KeyDerivation::Sha256Hex,
    digest: DigestEncoding::Hex,
};
/// Percent of requests that re-deliver an earlier notification byte for byte.
const DUPLICATE_PERCENT: u32 = 5;
/// Percent of requests whose signature is wrong.
const BAD_SIGNATURE_PERCENT: u32 = 1;

fn main() {
    if std::env::args().any(|a| a == BARE_FLAG) {
        run_bare_server();
        return;
    }
    let knobs = Knobs::from_env();
    let stores = tempfile::tempdir().unwrap();
    let fsync = fdatasync_median(stores.path());
    let workload = Arc::new(Workload::build(knobs.cap));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(knobs.load_threads)
        .enable_all()
        .build()
        .unwrap();
    println!(
        "one fdatasync on the store's disk: median {:.3} ms (200 samples)",
        ms(fsync)
    );
    println!(
        "load: {} pre-built requests, mean body {} bytes ({DUPLICATE_PERCENT}% re-deliveries, \
         {BAD_SIGNATURE_PERCENT}% bad signatures); each scenario up to {} s; {} rounds; load \
         generator on {} threads in its own process",
        workload.len(),
        workload.mean_body_bytes(),
        knobs.seconds,
        knobs.rounds,
        knobs.load_threads,
    );
    println!(
        "\n{:<6} {:<10} {:>5} {:>9} {:>8} {:>8} {:>8} {:>9} {:>7} {:>7}  statuses",
        "round",
        "server",
        "conns",
        "req/s",
        "p50 ms",
        "p99 ms",
        "max ms",
        "peakRSS",
        "ratio",
        "cpu us"
    );
    let mut results: BTreeMap<usize, Vec<(Run, Run)>> = BTreeMap::new();
    for round in 1..=knobs.rounds {
        for &conns in &knobs.connections {
            let bare = Server::bare();
            let bare_run = runtime.block_on(load(bare.addr, conns, &knobs, &workload));
            let bare_run = bare_run.finish(bare.stop());
            bare_run.print(round, "bare", conns, None);

            let store = tempfile::tempdir_in(stores.path()).unwrap();
            let ours = Server::fenx_sync(store.path());
            let our_run = runtime.block_on(load(ours.addr, conns, &knobs, &workload));
            let our_run = our_run.finish(ours.stop());
            our_run.print(round, "fenx-sync", conns, Some(&bare_run));
            check_acknowledged(&store.path().join("outbox.db"), &our_run, &workload);
            results.entry(conns).or_default().push((bare_run, our_run));
        }
    }
    print_summary(&results, fsync);
}

struct Knobs {
    seconds: u64,
    cap: usize,
    connections: Vec<usize>,
    rounds: usize,
    load_threads: usize,
}

impl Knobs {
    fn from_env() -> Knobs {
        Knobs {
            seconds: env_or("FENX_BENCH_SECONDS", 4),
            cap: env_or("FENX_BENCH_REQUESTS", 300_000),
            connections: std::env::var("FENX_BENCH_CONNECTIONS")
                .unwrap_or_else(|_| "1,16,64".into())
                .split(',')
                .map(|c| {
                    c.trim()
                        .parse()
                        .expect("FENX_BENCH_CONNECTIONS is a list of numbers")
                })
                .collect(),
            rounds: env_or("FENX_BENCH_ROUNDS", 3),
            load_threads: env_or("FENX_BENCH_LOAD_THREADS", 2),
        }
    }
}

/// What a request is, for checking the answers.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Unique,
    /// The same bytes as the earlier request at this index.
    Redelivery(usize),
    BadSignature,
}

/// Every request of a scenario, built before the clock starts: raw HTTP/1.1 bytes in one buffer.
struct Workload {
    bytes: Bytes,
    /// `(start, end)` of each request in `bytes`.
    spans: Vec<(usize, usize)>,
    kinds: Vec<Kind>,
    /// The notification id of each request.
    ids: Vec<String>,
    body_bytes: usize,
}

impl Workload {
    fn build(count: usize) -> Workload {
        let mut rng = fastrand::Rng::with_seed(11);
        let mut bytes = Vec::with_capacity(count * 700);
        let mut spans = Vec::with_capacity(count);
        let mut kinds = Vec::with_capacity(count);
        let mut ids: Vec<String> = Vec::with_capacity(count);
        let mut body_bytes = 0;
        for i in 0..count {
            let roll = rng.u32(0..100);
            // A re-delivery repeats a unique notification sent a while before, as Fenergo's
            // retries do; the first ones have nothing to repeat yet.
            let earlier = (i > 2_000)
                .then(|| rng.usize(i - 2_000..i - 200))
                .filter(|&j| kinds[j] == Kind::Unique);
            let kind = match (roll, earlier) {
                (r, Some(j)) if r < DUPLICATE_PERCENT => Kind::Redelivery(j),
                (r, _) if r >= 100 - BAD_SIGNATURE_PERCENT => Kind::BadSignature,
                _ => Kind::Unique,
            };
            let start = bytes.len();
            match kind {
                Kind::Redelivery(j) => {
                    let (from, to) = spans[j];
                    bytes.extend_from_within(from..to);
                    body_bytes += to - from;
                    ids.push(ids[j].clone());
                }
                Kind::Unique | Kind::BadSignature => {
                    let id = uuid(&mut rng);
                    let body = notification_body(&id, &mut rng);
                    let secret = if kind == Kind::BadSignature {
                        "not-the-secret"
                    } else {
                        SECRET
                    };
                    let signature = RECIPE.sign(secret, body.as_bytes());
                    write!(
                        bytes,
                        "POST /webhooks/fenergo HTTP/1.1\r\nhost: fenx-sync-bench\r\n\
                         content-type: application/json\r\nx-fenx-signature: {signature}\r\n\
                         content-length: {}\r\n\r\n{body}",
                        body.len()
                    )
                    .unwrap();
                    body_bytes += body.len();
                    ids.push(id);
                }
            }
            spans.push((start, bytes.len()));
            kinds.push(kind);
        }
        Workload {
            bytes: Bytes::from(bytes),
            spans,
            kinds,
            ids,
            body_bytes,
        }
    }

    fn len(&self) -> usize {
        self.spans.len()
    }

    fn request(&self, i: usize) -> &[u8] {
        let (start, end) = self.spans[i];
        &self.bytes[start..end]
    }

    fn mean_body_bytes(&self) -> usize {
        self.body_bytes / self.len().max(1)
    }
}

/// A webhook body shaped like Fenergo's (PascalCase, as its docs show it), about 400 bytes.
fn notification_body(id: &str, rng: &mut fastrand::Rng) -> String {
    let (entity, correlation, causation, journey) = (uuid(rng), uuid(rng), uuid(rng), uuid(rng));
    format!(
        r#"{{"Id":"{id}","TenantId":"45bf62ac-e4b1-4c16-ae32-d774cd18db6d","EventType":"entitydata:draftverified","RelativeUrl":"entitydataquery/api/entity/{entity}","Payload":{{"JourneyId":"{journey}"}},"When":"2026-11-23T10:19:{:02}.{:07}+00:00","CorrelationId":"{correlation}","CausationId":"{causation}"}}"#,
        rng.u32(0..60),
        rng.u32(0..10_000_000),
    )
}

fn uuid(rng: &mut fastrand::Rng) -> String {
    let hex = format!("{:032x}", rng.u128(..));
    format!(
        "{}-{}-4{}-a{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[13..16],
        &hex[17..20],
        &hex[20..]
    )
}

/// What one connection saw.
#[derive(Default)]
struct ConnectionLog {
    /// Microseconds, one per answered request.
    latencies: Vec<u32>,
    statuses: BTreeMap<u16, usize>,
    /// Indices of the requests answered 2xx.
    acknowledged: Vec<u32>,
    /// 2xx answers that said the notification was a duplicate.
    duplicate_answers: usize,
    errors: usize,
}

/// Sends requests from `workload` in order, each taken by the next free connection, until the
/// time or the requests run out.
async fn load(addr: SocketAddr, conns: usize, knobs: &Knobs, workload: &Arc<Workload>) -> Load {
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let deadline = started + Duration::from_secs(knobs.seconds);
    let tasks: Vec<_> = (0..conns)
        .map(|_| {
            let (next, workload) = (next.clone(), workload.clone());
            tokio::spawn(async move { connection(addr, &next, &workload, deadline).await })
        })
        .collect();
    let mut logs = Vec::with_capacity(conns);
    for task in tasks {
        logs.push(task.await.unwrap());
    }
    Load {
        elapsed: started.elapsed(),
        logs,
    }
}

async fn connection(
    addr: SocketAddr,
    next: &AtomicUsize,
    workload: &Workload,
    deadline: Instant,
) -> ConnectionLog {
    let mut log = ConnectionLog {
        latencies: Vec::with_capacity(workload.len() / 8),
        ..ConnectionLog::default()
    };
    let mut stream: Option<TcpStream> = None;
    let mut buffer = Vec::with_capacity(4096);
    loop {
        let i = next.fetch_add(1, Ordering::Relaxed);
        if i >= workload.len() || Instant::now() >= deadline {
            return log;
        }
        let sent = Instant::now();
        if stream.is_none() {
            let s = TcpStream::connect(addr).await.expect("the server accepts");
            s.set_nodelay(true).unwrap();
            stream = Some(s);
        }
        let s = stream.as_mut().expect("connected above");
        let answer = match s.write_all(workload.request(i)).await {
            Ok(()) => read_response(s, &mut buffer).await,
            Err(e) => Err(e),
        };
        match answer {
            Ok(response) => {
                log.latencies.push(sent.elapsed().as_micros() as u32);
                *log.statuses.entry(response.status).or_default() += 1;
                if (200..300).contains(&response.status) {
                    log.acknowledged.push(i as u32);
                    log.duplicate_answers += usize::from(response.duplicate);
                }
                if response.close {
                    stream = None;
                }
            }
            Err(_) => {
                log.errors += 1;
                stream = None;
            }
        }
    }
}

struct Answer {
    status: u16,
    /// The body says `"stored":0`: fenx-sync recognised a duplicate.
    duplicate: bool,
    /// The server will close the connection after this response.
    close: bool,
}

/// Reads one HTTP/1.1 response with a `content-length` body.
async fn read_response(stream: &mut TcpStream, buffer: &mut Vec<u8>) -> std::io::Result<Answer> {
    buffer.clear();
    let mut chunk = [0u8; 2048];
    let head_end = loop {
        if let Some(at) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buffer.extend_from_slice(&chunk[..n]);
    };
    let head = std::str::from_utf8(&buffer[..head_end])
        .map_err(|_| std::io::Error::other("response head is not UTF-8"))?
        .to_ascii_lowercase();
    let status = head
        .get(9..12)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other("no status"))?;
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    let close = head.contains("\r\nconnection: close");
    while buffer.len() < head_end + length {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buffer.extend_from_slice(&chunk[..n]);
    }
    let body = &buffer[head_end..head_end + length];
    let duplicate = body.windows(10).any(|w| w == b"\"stored\":0");
    Ok(Answer {
        status,
        duplicate,
        close,
    })
}

struct Load {
    elapsed: Duration,
    logs: Vec<ConnectionLog>,
}

impl Load {
    fn finish(self, usage: Usage) -> Run {
        let mut run = Run {
            elapsed: self.elapsed,
            usage,
            latencies: Vec::new(),
            statuses: BTreeMap::new(),
            acknowledged: Vec::new(),
            duplicate_answers: 0,
            errors: 0,
        };
        for log in self.logs {
            run.latencies.extend(log.latencies);
            for (s, n) in log.statuses {
                *run.statuses.entry(s).or_default() += n;
            }
            run.acknowledged.extend(log.acknowledged);
            run.duplicate_answers += log.duplicate_answers;
            run.errors += log.errors;
        }
        run.latencies.sort_unstable();
        run
    }
}

/// One server under one load.
struct Run {
    elapsed: Duration,
    usage: Usage,
    latencies: Vec<u32>,
    statuses: BTreeMap<u16, usize>,
    acknowledged: Vec<u32>,
    duplicate_answers: usize,
    errors: usize,
}

impl Run {
    fn rate(&self) -> f64 {
        self.latencies.len() as f64 / self.elapsed.as_secs_f64()
    }

    /// In milliseconds.
    fn percentile(&self, p: f64) -> f64 {
        let index = ((self.latencies.len() as f64 - 1.0) * p).round() as usize;
        f64::from(self.latencies.get(index).copied().unwrap_or_default()) / 1000.0
    }

    fn rss_mib(&self) -> f64 {
        self.usage.peak_rss_kib as f64 / 1024.0
    }

    /// The server's CPU time (all threads, user + system) per answered request.
    fn cpu_us_per_request(&self) -> f64 {
        self.usage.cpu.as_secs_f64() * 1e6 / self.latencies.len().max(1) as f64
    }

    fn print(&self, round: usize, name: &str, conns: usize, bare: Option<&Run>) {
        let mut statuses: Vec<String> = self
            .statuses
            .iter()
            .map(|(s, n)| format!("{s}:{n}"))
            .collect();
        if self.errors > 0 {
            statuses.push(format!("errors:{}", self.errors));
        }
        if bare.is_some() {
            statuses.push(format!("dup-answers:{}", self.duplicate_answers));
        }
        let ratio = bare.map_or(String::new(), |b| format!("{:.3}", self.rate() / b.rate()));
        println!(
            "{:<6} {:<10} {:>5} {:>9.0} {:>8.2} {:>8.2} {:>8.2} {:>6.1}MiB {:>7} {:>7.1}  {}",
            round,
            name,
            conns,
            self.rate(),
            self.percentile(0.50),
            self.percentile(0.99),
            self.percentile(1.0),
            self.rss_mib(),
            ratio,
            self.cpu_us_per_request(),
            statuses.join(" "),
        );
    }
}

/// After a SIGKILL: every acknowledged notification id is in the outbox, stored once.
fn check_acknowledged(outbox: &Path, run: &Run, workload: &Workload) {
    let conn = rusqlite::Connection::open(outbox).unwrap();
    let stored: HashSet<String> = conn
        .prepare("SELECT id FROM notification")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let acknowledged: HashSet<&str> = run
        .acknowledged
        .iter()
        .map(|&i| workload.ids[i as usize].as_str())
        .collect();
    let missing = acknowledged
        .iter()
        .filter(|id| !stored.contains(**id))
        .count();
    assert_eq!(
        missing, 0,
        "acknowledged notifications missing from the outbox after SIGKILL"
    );
    let forged = run
        .acknowledged
        .iter()
        .filter(|&&i| workload.kinds[i as usize] == Kind::BadSignature)
        .count();
    assert_eq!(forged, 0, "a request with a bad signature was acknowledged");
    let redelivered = run
        .acknowledged
        .iter()
        .filter(|&&i| matches!(workload.kinds[i as usize], Kind::Redelivery(_)))
        .count();
    // A re-delivery may reach the server before its original (both are then acknowledged and
    // one of them is the duplicate), so only the totals must agree.
    assert_eq!(
        run.duplicate_answers + acknowledged.len(),
        run.acknowledged.len(),
        "duplicate answers do not match the re-deliveries acknowledged"
    );
    assert!(run.duplicate_answers <= redelivered);
}

/// Medians over the rounds, per connection count.
fn print_summary(results: &BTreeMap<usize, Vec<(Run, Run)>>, fsync: Duration) {
    println!(
        "\nmedians of {} rounds (ratio: median of each round's fenx-sync/bare):",
        results.values().next().map_or(0, Vec::len)
    );
    println!(
        "{:<10} {:>5} {:>9} {:>8} {:>8} {:>9} {:>7} {:>7}",
        "server", "conns", "req/s", "p50 ms", "p99 ms", "peakRSS", "ratio", "cpu us"
    );
    let mut bare_ceiling: f64 = 0.0;
    for (conns, runs) in results {
        let bare: Vec<&Run> = runs.iter().map(|(b, _)| b).collect();
        let ours: Vec<&Run> = runs.iter().map(|(_, o)| o).collect();
        let ratio = median(runs.iter().map(|(b, o)| o.rate() / b.rate()));
        bare_ceiling = bare_ceiling.max(median(bare.iter().map(|r| r.rate())));
        for (name, set, ratio) in [("bare", &bare, None), ("fenx-sync", &ours, Some(ratio))] {
            println!(
                "{:<10} {:>5} {:>9.0} {:>8.2} {:>8.2} {:>6.1}MiB {:>7} {:>7.1}",
                name,
                conns,
                median(set.iter().map(|r| r.rate())),
                median(set.iter().map(|r| r.percentile(0.50))),
                median(set.iter().map(|r| r.percentile(0.99))),
                median(set.iter().map(|r| r.rss_mib())),
                ratio.map_or(String::new(), |r| format!("{r:.3}")),
                median(set.iter().map(|r| r.cpu_us_per_request())),
            );
        }
        if *conns == 1 {
            let p50 = median(ours.iter().map(|r| r.percentile(0.50)));
            println!(
                "  -> c=1: fenx-sync p50 {p50:.2} ms = one fdatasync ({:.2} ms) {:+.2} ms",
                ms(fsync),
                p50 - ms(fsync)
            );
        }
    }
    println!("load generator ceiling: bare server driven to {bare_ceiling:.0} req/s (median)");
    println!("every acknowledged id was found in the outbox after SIGKILL, stored once");
}

fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut values: Vec<f64> = values.collect();
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
}

/// A server under test running as its own process, so its CPU and RSS are its own.
struct Server {
    child: Child,
    addr: SocketAddr,
}

impl Server {
    fn bare() -> Server {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .arg(BARE_FLAG)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line.trim().parse().expect("bare server prints its address");
        Server { child, addr }
    }

    /// `fenx-sync serve` with its defaults, except ephemeral ports, the secret and the store.
    fn fenx_sync(store: &Path) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_fenx-sync"))
            .arg("serve")
            .current_dir(store)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .envs(std::env::var_os("TOKIO_WORKER_THREADS").map(|n| ("TOKIO_WORKER_THREADS", n)))
            .env("FENX_SERVER__LISTEN", "127.0.0.1:0")
            .env("FENX_ADMIN__LISTEN", "127.0.0.1:0")
            .env("FENX_WEBHOOK__SECRETS", SECRET)
            .env("FENX_STORE__DIR", store)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (found, address) = std::sync::mpsc::channel();
        // The log is part of the work being measured: it goes to a pipe, as under systemd or a
        // container runtime, and this thread reads it in large chunks.
        std::thread::spawn(move || drain_log(stderr, found));
        let addr = address
            .recv_timeout(Duration::from_secs(30))
            .expect("fenx-sync logs its listen address");
        Server { child, addr }
    }

    /// Reads the server's peak RSS and CPU time, then kills it with SIGKILL (on drop).
    fn stop(self) -> Usage {
        let proc = |file: &str| {
            std::fs::read_to_string(format!("/proc/{}/{file}", self.child.id())).unwrap_or_default()
        };
        let peak_rss_kib = peak_rss_kib(self.child.id());
        // utime and stime, fields 14 and 15, in USER_HZ (100 per second on Linux).
        let stat = proc("stat");
        let ticks: u64 = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.split_whitespace().skip(11).take(2))
            .into_iter()
            .flatten()
            .filter_map(|t| t.parse::<u64>().ok())
            .sum();
        Usage {
            peak_rss_kib,
            cpu: Duration::from_millis(ticks * 10),
        }
    }
}

impl Drop for Server {
    /// A run that panics must not leave its server behind.
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What a server used over its life.
struct Usage {
    peak_rss_kib: u64,
    cpu: Duration,
}

/// Finds `listen=ADDR` in fenx-sync's start-up log, then discards the rest of the log.
fn drain_log(mut stderr: impl Read, found: std::sync::mpsc::Sender<SocketAddr>) {
    let mut seen = String::new();
    let mut chunk = vec![0u8; 64 * 1024];
    let mut reported = false;
    while let Ok(n) = stderr.read(&mut chunk) {
        if n == 0 {
            return;
        }
        if reported {
            continue;
        }
        seen.push_str(&String::from_utf8_lossy(&chunk[..n]));
        let plain = strip_ansi(&seen);
        if let Some(addr) = plain
            .split_whitespace()
            .find_map(|word| word.strip_prefix("listen="))
            .and_then(|a| a.parse().ok())
        {
            let _ = found.send(addr);
            reported = true;
        }
    }
}

fn strip_ansi(text: &str) -> String {
    let mut plain = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            plain.push(c);
        }
    }
    plain
}

struct Bare;

impl Routes for Bare {
    async fn route<B: RequestBody>(
        self: Arc<Self>,
        request: Request<B>,
        _: SocketAddr,
    ) -> Response<Full<Bytes>> {
        let _ = request.into_body().collect().await;
        json_response(
            StatusCode::OK,
            serde_json::json!({"stored": 1, "duplicates": 0}),
        )
    }
}

fn run_bare_server() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        println!("{}", listener.local_addr().unwrap());
        std::io::stdout().flush().unwrap();
        let limits = ConnectionLimits {
            max_connections: 1024,
            header_read_timeout: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(1),
        };
        fenx_sync::http::serve(listener, Arc::new(Bare), limits, std::future::pending()).await;
    });
}

/// The median cost of writing 4 KiB and fdatasync-ing it, in `dir` (where the stores live).
fn fdatasync_median(dir: &Path) -> Duration {
    let mut file = std::fs::File::create(dir.join("probe")).unwrap();
    let mut samples: Vec<Duration> = (0..200)
        .map(|_| {
            file.write_all(&[7u8; 4096]).unwrap();
            let started = Instant::now();
            file.sync_data().unwrap();
            started.elapsed()
        })
        .collect();
    let _ = std::fs::remove_file(dir.join("probe"));
    samples.sort();
    samples[samples.len() / 2]
}
