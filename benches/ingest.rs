//! Ingest benchmark: `cargo bench --bench ingest`.
//!
//! Posts unique signed notifications over N concurrent keep-alive connections to the real
//! `fenx-sync serve` binary (release build, temp store, WAL + synchronous=FULL) and, in the same
//! run, to a bare hyper server that reads the body and answers 200 doing no other work. Prints
//! req/s, p50/p99/max latency, status counts and each server's peak RSS, our throughput as a
//! ratio of the bare server's, and the cost of one fdatasync on this disk for comparison.
//!
//! Knobs: FENX_BENCH_SECONDS (per scenario, default 5), FENX_BENCH_REQUESTS (cap per scenario,
//! default 200000), FENX_BENCH_CONNECTIONS (default "1,16,64").

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use fenx_sync::http::{ConnectionLimits, Routes, json_response};
use fenx_sync::signature::Recipe;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;

const SECRET: &str = "bench-secret";
const BARE_FLAG: &str = "--bare-server";

fn main() {
    if std::env::args().any(|a| a == BARE_FLAG) {
        run_bare_server();
        return;
    }
    let seconds: u64 = env_or("FENX_BENCH_SECONDS", 5);
    let cap: usize = env_or("FENX_BENCH_REQUESTS", 200_000);
    let connections: Vec<usize> = std::env::var("FENX_BENCH_CONNECTIONS")
        .unwrap_or_else(|_| "1,16,64".into())
        .split(',')
        .map(|c| {
            c.trim()
                .parse()
                .expect("FENX_BENCH_CONNECTIONS is a list of numbers")
        })
        .collect();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();

    let fsync = fdatasync_median();
    println!(
        "one fdatasync on this disk: median {:.3} ms (200 samples)",
        ms(fsync)
    );
    println!("each scenario: up to {seconds} s or {cap} requests\n");
    println!(
        "{:<10} {:>5} {:>9} {:>8} {:>8} {:>8} {:>9} {:>16}",
        "server", "conns", "req/s", "p50 ms", "p99 ms", "max ms", "peakRSS", "statuses"
    );
    for &conns in &connections {
        let bare = Server::bare();
        let bare_result = runtime.block_on(load(bare.addr, conns, seconds, cap, "bare"));
        let bare_rss = bare.stop();
        bare_result.print("bare", conns, bare_rss);

        let store = tempfile::tempdir().unwrap();
        let ours = Server::fenx_sync(store.path());
        let our_result = runtime.block_on(load(ours.addr, conns, seconds, cap, "fenx"));
        let our_rss = ours.stop();
        our_result.print("fenx-sync", conns, our_rss);
        let stored = count_rows(&store.path().join("outbox.db"));
        println!(
            "  -> fenx-sync at {conns} conns: {:.1}% of bare req/s; p50 minus one fdatasync: {:+.2} ms; \
             {stored} rows stored for {} acknowledged\n",
            100.0 * our_result.rate() / bare_result.rate(),
            ms(our_result.percentile(0.50)) - ms(fsync),
            our_result.ok(),
        );
        assert!(
            stored >= our_result.ok(),
            "acknowledged more than was stored"
        );
    }
}

struct LoadResult {
    latencies: Vec<Duration>,
    statuses: BTreeMap<String, usize>,
    elapsed: Duration,
}

impl LoadResult {
    fn rate(&self) -> f64 {
        self.latencies.len() as f64 / self.elapsed.as_secs_f64()
    }

    fn ok(&self) -> usize {
        self.statuses.get("200").copied().unwrap_or(0)
    }

    fn percentile(&self, p: f64) -> Duration {
        let index = ((self.latencies.len() as f64 - 1.0) * p).round() as usize;
        self.latencies.get(index).copied().unwrap_or_default()
    }

    fn print(&self, name: &str, conns: usize, rss_kib: u64) {
        let statuses: Vec<String> = self
            .statuses
            .iter()
            .map(|(s, n)| format!("{s}:{n}"))
            .collect();
        println!(
            "{:<10} {:>5} {:>9.0} {:>8.2} {:>8.2} {:>8.2} {:>6.1}MiB {:>16}",
            name,
            conns,
            self.rate(),
            ms(self.percentile(0.50)),
            ms(self.percentile(0.99)),
            ms(self.latencies.last().copied().unwrap_or_default()),
            rss_kib as f64 / 1024.0,
            statuses.join(" "),
        );
    }
}

/// Sends unique signed notifications on `conns` keep-alive connections until the time or the
/// request cap runs out.
async fn load(
    addr: SocketAddr,
    conns: usize,
    seconds: u64,
    cap: usize,
    run: &'static str,
) -> LoadResult {
    let client = fenx_sync::fenergo::client_builder()
        .pool_max_idle_per_host(conns)
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let url = format!("http://{addr}/webhooks/fenergo");
    let issued = Arc::new(AtomicUsize::new(0));
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let workers: Vec<_> = (0..conns)
        .map(|_| {
            let (client, url, issued) = (client.clone(), url.clone(), issued.clone());
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                let mut statuses: BTreeMap<String, usize> = BTreeMap::new();
                while Instant::now() < deadline {
                    let n = issued.fetch_add(1, Ordering::Relaxed);
                    if n >= cap {
                        break;
                    }
                    let body = format!(
                        r#"{{"Id":"{run}-{n}","TenantId":"45bf62ac-e4b1-4c16-ae32-d774cd18db6d","EventType":"entitydata:draftverified","RelativeUrl":"entitydataquery/api/entity/9b22ae41-3f0a-4c68-a332-8669705ee3ec-{n}","Payload":{{}},"When":"2026-11-23T10:19:17.3157953+00:00","CorrelationId":"bench","CausationId":"c780df56-5aa8-4d64-b9fd-3560d75817c8"}}"#
                    );
                    let signature = RECIPE.sign(SECRET, body.as_bytes());
                    let sent = Instant::now();
                    let status = match client.post(&url).header("x-fenx-signature", signature).body(body).send().await {
                        Ok(r) => {
                            let status = r.status().as_u16().to_string();
                            let _ = r.bytes().await;
                            status
                        }
                        Err(_) => "error".to_owned(),
                    };
                    latencies.push(sent.elapsed());
                    *statuses.entry(status).or_default() += 1;
                }
                (latencies, statuses)
            })
        })
        .collect();
    let mut result = LoadResult {
        latencies: Vec::new(),
        statuses: BTreeMap::new(),
        elapsed: Duration::ZERO,
    };
    for w in workers {
        let (latencies, statuses) = w.await.unwrap();
        result.latencies.extend(latencies);
        for (s, n) in statuses {
            *result.statuses.entry(s).or_default() += n;
        }
    }
    result.elapsed = started.elapsed();
    result.latencies.sort();
    result
}

const RECIPE: Recipe = Recipe {
    key: fenx_sync::signature::KeyDerivation::Sha256Hex,
    digest: fenx_sync::signature::DigestEncoding::Hex,
};

/// A server under test running as its own process, so its RSS is its own.
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

    fn fenx_sync(store: &std::path::Path) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_fenx-sync"))
            .arg("serve")
            .current_dir(store)
            .env("FENX_SERVER__LISTEN", "127.0.0.1:0")
            .env("FENX_WEBHOOK__SECRETS", SECRET)
            .env("FENX_STORE__DIR", store)
            .env("FENX_LOG__FORMAT", "json")
            .env("FENX_LOG__LEVEL", "warn,fenx_sync=info")
            .env_remove("FENX_CONFIG")
            .env_remove("RUST_LOG")
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let addr = loop {
            let line = lines.next().expect("fenx-sync logs its address").unwrap();
            if let Some(listen) = serde_json::from_str::<serde_json::Value>(&line)
                .ok()
                .and_then(|v| v["listen"].as_str().map(str::to_owned))
            {
                break listen.parse().unwrap();
            }
        };
        // The per-request log lines are part of the work being measured; discard them here.
        std::thread::spawn(move || lines.for_each(drop));
        Server { child, addr }
    }

    /// Stops the server and returns its peak RSS in KiB.
    fn stop(mut self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        let peak = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0);
        let _ = self.child.kill();
        let _ = self.child.wait();
        peak
    }
}

struct Bare;

impl Routes for Bare {
    async fn route(
        self: Arc<Self>,
        request: Request<Incoming>,
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

/// The median cost of writing 4 KiB and fdatasync-ing it, on the temp dir's disk.
fn fdatasync_median() -> Duration {
    let dir = tempfile::tempdir().unwrap();
    let mut file = std::fs::File::create(dir.path().join("probe")).unwrap();
    let mut samples: Vec<Duration> = (0..200)
        .map(|_| {
            file.write_all(&[7u8; 4096]).unwrap();
            let started = Instant::now();
            file.sync_data().unwrap();
            started.elapsed()
        })
        .collect();
    samples.sort();
    samples[samples.len() / 2]
}

fn count_rows(path: &std::path::Path) -> usize {
    let conn = rusqlite::Connection::open(path).unwrap();
    conn.query_row("SELECT count(*) FROM notification", [], |r| {
        r.get::<_, i64>(0)
    })
    .unwrap() as usize
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}
