//! Sync benchmark: `cargo bench --bench sync`.
//!
//! Runs fenx-sync in-process (`fenx_sync::run`: webhook ingest and the sync worker in one
//! service on 127.0.0.1:0 with a temp store) against the Fenergo simulator, posts signed
//! webhooks for distinct sample entities and waits (bounded) until every outbox row is settled.
//! Each scenario gets a fresh simulator and store, and waits for the confirmation reads too
//! (`sync.confirm_after` shortened to FENX_BENCH_CONFIRM_AFTER). Per scenario it prints entities
//! synced per second, API calls per entity including confirmation reads (bulk and single),
//! bulk reads, confirmations that changed the version, token requests, 429s served, the steady
//! API call rate, and the webhook-acknowledged → first reporting-row latency (the provisional
//! row: the entity's first `entity_version.stored_at`) p50/p99/max. The scenarios: a burst at
//! 1, the default and 8 workers (scaling); a burst of 1,000 distinct entities (confirmation
//! batching); a paced stream below capacity (latency without a backlog); a duplicate-heavy
//! burst, interleaved so each entity's notifications are as far apart as the burst allows
//! (coalescing); the same entities each updated again inside a 1 s consistency lag just before
//! their webhooks (confirmations that change the version); a tenant rate limit on both sides
//! (limiter adherence), at the SDLC and at the production limits. It times the worker's claims
//! (claim and settle, straight on the outbox) with nothing else queued and behind 100,000 rows
//! waiting on a retry (a 404 or 429 storm). Then it upserts fetched sample entities straight
//! into a `ReportingStore` for its entities/s and property+collection rows/s. With
//! `FENX_BENCH_POSTGRES_URL` (or `FENX_TEST_POSTGRES_URL`) naming a PostgreSQL database, the
//! paced scenario and the store run are repeated on a fresh PostgreSQL reporting store beside
//! it, in the same run.
//!
//! Timing is reported, never asserted; the run asserts correctness only (every webhook 200,
//! every row done, every entity stored at its latest version).
//!
//! Knobs: FENX_BENCH_ENTITIES (per scaling/paced scenario, default 500), FENX_BENCH_LATENCY_MS
//! (simulated API latency, default 20), FENX_BENCH_PACE (webhooks/s of the paced run, default
//! 100), FENX_BENCH_DUP_ENTITIES and FENX_BENCH_DUPLICATES (duplicate run, default 200 × 5),
//! FENX_BENCH_DUP_PACE (webhooks/s of the duplicate run, default 0: a burst; a pace spreads each
//! entity's notifications over time, e.g. 100 with 50 × 3 puts them 0.5 s apart), FENX_BENCH_RPS (tenant limit of the rate-limit run, default 50, Fenergo's SDLC limit),
//! FENX_BENCH_RATE_SECONDS (its intended length at that rate, default 6), FENX_BENCH_BURST
//! (entities of the large burst, default 1000), FENX_BENCH_CONFIRM_AFTER_MS (the confirmation
//! window, default 2000),
//! FENX_BENCH_PRODUCTION_SECONDS (length of the production-limit run at 200 req/s and 50 in
//! flight, default 15: 3000 entities), FENX_BENCH_CLAIMS and FENX_BENCH_WAITING (claim run:
//! claims timed with no other rows and with this many rows waiting on a retry, default 2000 and
//! 100000), FENX_BENCH_UPSERTS
//! (store run, default 2000), FENX_BENCH_CONNECTIONS (webhook connections, default 16),
//! FENX_BENCH_TIMEOUT_SECS (bound on each scenario's wait, default 60).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use fenx_sim::testkit::bench::env_or;
use fenx_sim::testkit::postgres::FreshDatabase;
use fenx_sim::{Lag, SimConfig, Simulator};
use fenx_sync::config::{FenergoSettings, Settings, SyncSettings};
use fenx_sync::fenergo::FenergoClient;
use fenx_sync::outbox::{
    NewNotification, Outbox, OutboxOptions, RowOutcome, Settlement, Source, WorkQueue,
};
use fenx_sync::signature::{DigestEncoding, KeyDerivation, Recipe, RecipeChoice};
use fenx_sync::store::{EntitySnapshot, ReportingStore, SqliteStore, SyncCause, UpsertOutcome};
use fenx_sync::telemetry::Metrics;
use tempfile::TempDir;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

const SECRET: &str = "bench-secret";
const RECIPE: Recipe = Recipe {
    key: KeyDerivation::Sha256Hex,
    digest: DigestEncoding::Hex,
};
/// An event type the default routes fetch.
const EVENT: &str = "entitydata:draftverified";
/// "A high client rate limit": the one the integration tests use, far above what the
/// simulator's latency lets the worker reach, so only the worker count limits throughput.
const HIGH_LIMIT: Limit = Limit {
    rps: 1000,
    concurrent: 20,
};
/// Fenergo's SDLC tenant allows 10 requests in flight.
const TENANT_CONCURRENCY: u32 = 10;
/// A production tenant: 200 requests per second, 50 in flight.
const PRODUCTION_LIMIT: Limit = Limit {
    rps: 200,
    concurrent: 50,
};
/// Enough workers that the production limit, not the worker count, holds the run back.
const PRODUCTION_RUN_WORKERS: usize = 64;
/// More workers than the tenant's concurrency, so the client limiter, not the worker count, is
/// what holds the rate-limit run back.
const RATE_RUN_WORKERS: usize = 16;
/// How often progress (outbox rows settled, API calls served) is sampled.
const POLL: Duration = Duration::from_millis(10);
/// How long updates stay invisible in the lagged scenario: shorter than the confirmation
/// window, so the confirmation reads see what the first reads could not.
const LAG: Duration = Duration::from_secs(1);
/// Distinct sample entities behind the store run (half companies, half individuals).
const STORE_SAMPLES: usize = 16;

fn main() {
    let knobs = Knobs::from_env();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let default_workers = SyncSettings::default().workers;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let rate_entities = knobs.rps as usize * knobs.rate_seconds as usize;
    let production_entities = PRODUCTION_LIMIT.rps as usize * knobs.production_seconds as usize;
    let scenarios = [
        Scenario::burst(knobs.entities, 1),
        Scenario::burst(knobs.entities, default_workers),
        Scenario::burst(knobs.entities, 8),
        Scenario {
            name: format!("burst {}", knobs.burst),
            ..Scenario::burst(knobs.burst, default_workers)
        },
        Scenario {
            name: format!("paced {}/s", knobs.pace),
            pace: Some(knobs.pace),
            ..Scenario::burst(knobs.entities, default_workers)
        },
        Scenario {
            name: format!("dupes x{}", knobs.duplicates),
            per_entity: knobs.duplicates,
            pace: knobs.dup_pace,
            ..Scenario::burst(knobs.dup_entities, default_workers)
        },
        Scenario {
            name: format!("lagged x{}", knobs.duplicates),
            per_entity: knobs.duplicates,
            update_inside_lag: true,
            ..Scenario::burst(knobs.dup_entities, default_workers)
        },
        Scenario {
            name: format!("limit {}/s", knobs.rps),
            limit: Some(Limit {
                rps: knobs.rps,
                concurrent: TENANT_CONCURRENCY,
            }),
            ..Scenario::burst(rate_entities, RATE_RUN_WORKERS)
        },
        Scenario {
            name: format!("limit {}/s", PRODUCTION_LIMIT.rps),
            limit: Some(PRODUCTION_LIMIT),
            ..Scenario::burst(production_entities, PRODUCTION_RUN_WORKERS)
        },
    ];

    println!(
        "simulated API latency {} ms; client limit {} req/s, {} in flight (limit row: {} req/s, \
         {TENANT_CONCURRENCY} in flight at both simulator and client); default sync.workers = \
         {default_workers}; {} webhook connections; service, simulator and load share one \
         {threads}-thread tokio runtime on 127.0.0.1",
        knobs.latency.as_millis(),
        HIGH_LIMIT.rps,
        HIGH_LIMIT.concurrent,
        knobs.rps,
        knobs.connections,
    );
    println!(
        "each scenario: fresh simulator and store, waits up to {} s for every row and every \
         confirmation read (sync.confirm_after = {} ms); latency = the entity's first \
         (provisional) row minus the 200 for its first webhook (burst rows include the \
         backlog); calls/ent counts single reads and bulk confirmation reads\n",
        knobs.timeout.as_secs(),
        knobs.confirm_after.as_millis(),
    );
    println!(
        "{:<13} {:>7} {:>8} {:>8} {:>6} {:>7} {:>9} {:>5} {:>7} {:>6} {:>5} {:>7} {:>8} {:>8} {:>8}",
        "scenario",
        "workers",
        "entities",
        "webhooks",
        "secs",
        "ent/s",
        "calls/ent",
        "bulk",
        "changed",
        "tokens",
        "429s",
        "calls/s",
        "p50 ms",
        "p99 ms",
        "max ms"
    );
    let [_, _, _, burst, paced, dupes, lagged, limited, production] =
        scenarios.each_ref().map(|scenario| {
            let outcome = runtime.block_on(run_scenario(&knobs, scenario));
            outcome.print(scenario);
            outcome
        });
    // The paced run again with a PostgreSQL reporting store, in the same run.
    let postgres_db = FreshDatabase::create("sync_bench_paced");
    let paced_postgres = postgres_db.as_ref().map(|db| {
        let scenario = Scenario {
            name: format!("paced {}/s PG", knobs.pace),
            pace: Some(knobs.pace),
            postgres: Some(db.url.clone()),
            ..Scenario::burst(knobs.entities, default_workers)
        };
        let outcome = runtime.block_on(run_scenario(&knobs, &scenario));
        outcome.print(&scenario);
        outcome
    });
    println!();
    println!(
        "webhook -> row latency at {} webhooks/s, {default_workers} workers: p50 {:.1} ms, \
         p99 {:.1} ms, max {:.1} ms",
        knobs.pace,
        paced.latency(0.50),
        paced.latency(0.99),
        paced.latency(1.0),
    );
    match &paced_postgres {
        Some(pg) => println!(
            "webhook -> row latency with the PostgreSQL store, same pace: p50 {:.1} ms, \
             p99 {:.1} ms, max {:.1} ms",
            pg.latency(0.50),
            pg.latency(0.99),
            pg.latency(1.0),
        ),
        None => println!("(no PostgreSQL latency row: set FENX_BENCH_POSTGRES_URL)"),
    }
    println!(
        "burst of {} distinct entities: {:.3} API calls per entity including {} bulk \
         confirmation read(s) (target <= 1.05); provisional row p50 {:.1} ms, p99 {:.1} ms",
        knobs.burst,
        burst.calls_per_entity(),
        burst.bulk_reads,
        burst.latency(0.50),
        burst.latency(0.99),
    );
    println!(
        "updated inside a {} s lag ({} entities x {} notifications): {} confirmation(s) changed \
         the version, {:.3} API calls per entity, every entity at Fenergo's latest version",
        LAG.as_secs(),
        knobs.dup_entities,
        knobs.duplicates,
        lagged.confirmations_changed,
        lagged.calls_per_entity(),
    );
    println!(
        "duplicates ({} entities x {} notifications, {}): {:.3} API calls per entity including \
         confirmations (target <= 1.05), {} token request(s) (expect 1), every row done after \
         {:.2} s",
        knobs.dup_entities,
        knobs.duplicates,
        knobs
            .dup_pace
            .map_or("one burst".to_owned(), |pace| format!("{pace} webhooks/s")),
        dupes.calls_per_entity(),
        dupes.token_requests,
        dupes.elapsed.as_secs_f64(),
    );
    println!(
        "tenant limit {} req/s, {TENANT_CONCURRENCY} in flight: {:.1} API calls/s = {:.1}% of \
         the limit (goal: within 5%, no 429s); {} 429s served; at most {} calls in flight at \
         the simulator",
        knobs.rps,
        limited.call_rate,
        100.0 * limited.call_rate / f64::from(knobs.rps),
        limited.rate_limited,
        limited.max_in_flight,
    );
    println!(
        "production tenant limit {} req/s, {} in flight, {} entities: {:.1} API calls/s = \
         {:.1}% of the limit (goal: >= 96%, no 429s); {} 429s served; {:.3} calls per entity",
        PRODUCTION_LIMIT.rps,
        PRODUCTION_LIMIT.concurrent,
        production.entities,
        production.call_rate,
        100.0 * production.call_rate / f64::from(PRODUCTION_LIMIT.rps),
        production.rate_limited,
        production.calls_per_entity(),
    );
    let empty = runtime.block_on(claim_run(knobs.claims, 0));
    let backlog = runtime.block_on(claim_run(knobs.claims, knobs.waiting));
    println!(
        "claims: {:.0} claims/s with no other rows, {:.0} claims/s with {} rows waiting on a \
         retry ({:.2}x slower; goal: within 2x); {} claims each, claim + settle",
        empty,
        backlog,
        knobs.waiting,
        empty / backlog,
        knobs.claims,
    );
    let samples = runtime.block_on(fetched_samples(STORE_SAMPLES));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(fenx_sync::store::FILE_NAME);
    let sqlite = SqliteStore::open(&path, "bench").unwrap();
    let elapsed = runtime.block_on(upsert_run(&samples, knobs.upserts, &sqlite));
    // The same entities give the same rows in either store; SQLite's file counts them.
    let rows: i64 = rusqlite::Connection::open(&path)
        .unwrap()
        .query_row(
            "SELECT (SELECT count(*) FROM entity_property) + (SELECT count(*) FROM entity_collection)",
            [],
            |r| r.get(0),
        )
        .unwrap();
    let print_store = |store: &str, elapsed: Duration| {
        let secs = elapsed.as_secs_f64();
        println!(
            "store ({store}): {} upserts in {secs:.2} s: {:.0} entities/s, {:.0} \
             property+collection rows/s ({:.1} rows per entity), one transaction each",
            knobs.upserts,
            knobs.upserts as f64 / secs,
            rows as f64 / secs,
            rows as f64 / knobs.upserts as f64,
        );
    };
    print_store("SQLite", elapsed);
    match FreshDatabase::create("sync_bench") {
        Some(db) => {
            let mut settings = Settings::default();
            settings.fenergo.tenant_id = "bench".into();
            settings.store.reporting_url = Some(db.url.clone().into());
            let elapsed = runtime.block_on(async {
                let postgres = fenx_sync::store::open(&settings).await.unwrap();
                upsert_run(&samples, knobs.upserts, &*postgres).await
            });
            print_store("PostgreSQL", elapsed);
        }
        None => {
            println!("(no PostgreSQL store row: set FENX_BENCH_POSTGRES_URL to a database URL)")
        }
    }
}

struct Knobs {
    entities: usize,
    latency: Duration,
    pace: u32,
    dup_entities: usize,
    duplicates: usize,
    dup_pace: Option<u32>,
    rps: u32,
    rate_seconds: u32,
    production_seconds: u32,
    claims: usize,
    waiting: usize,
    upserts: usize,
    connections: usize,
    timeout: Duration,
    burst: usize,
    confirm_after: Duration,
}

impl Knobs {
    fn from_env() -> Knobs {
        Knobs {
            entities: env_or("FENX_BENCH_ENTITIES", 500),
            latency: Duration::from_millis(env_or("FENX_BENCH_LATENCY_MS", 20)),
            pace: env_or("FENX_BENCH_PACE", 100),
            dup_entities: env_or("FENX_BENCH_DUP_ENTITIES", 200),
            duplicates: env_or("FENX_BENCH_DUPLICATES", 5),
            dup_pace: Some(env_or("FENX_BENCH_DUP_PACE", 0)).filter(|&pace| pace > 0),
            rps: env_or("FENX_BENCH_RPS", 50),
            rate_seconds: env_or("FENX_BENCH_RATE_SECONDS", 6),
            production_seconds: env_or("FENX_BENCH_PRODUCTION_SECONDS", 15),
            claims: env_or("FENX_BENCH_CLAIMS", 2000),
            waiting: env_or("FENX_BENCH_WAITING", 100_000),
            upserts: env_or("FENX_BENCH_UPSERTS", 2000),
            connections: env_or("FENX_BENCH_CONNECTIONS", 16),
            timeout: Duration::from_secs(env_or("FENX_BENCH_TIMEOUT_SECS", 60)),
            burst: env_or("FENX_BENCH_BURST", 1000),
            confirm_after: Duration::from_millis(env_or("FENX_BENCH_CONFIRM_AFTER_MS", 2000)),
        }
    }
}

/// A request limit, per second and in flight.
#[derive(Clone, Copy)]
struct Limit {
    rps: u32,
    concurrent: u32,
}

struct Scenario {
    name: String,
    entities: usize,
    /// Notifications per entity, each with its own id.
    per_entity: usize,
    workers: usize,
    /// Webhooks per second; `None` sends them as fast as the connections allow.
    pace: Option<u32>,
    /// The tenant limit, applied by the simulator and configured in the client alike; `None`
    /// means an unlimited simulator and [`HIGH_LIMIT`] in the client.
    limit: Option<Limit>,
    /// Update every entity once more, inside a [`LAG`], just before its webhooks.
    update_inside_lag: bool,
    /// The PostgreSQL database to use as the reporting store; `None`: SQLite.
    postgres: Option<String>,
}

impl Scenario {
    fn burst(entities: usize, workers: usize) -> Scenario {
        Scenario {
            name: "burst".to_owned(),
            entities,
            per_entity: 1,
            workers,
            pace: None,
            limit: None,
            update_inside_lag: false,
            postgres: None,
        }
    }
}

struct Outcome {
    entities: usize,
    /// From the first webhook sent until every outbox row was settled.
    elapsed: Duration,
    entity_requests: u64,
    bulk_reads: u64,
    confirmations_changed: i64,
    token_requests: u64,
    rate_limited: u64,
    max_in_flight: u32,
    /// API calls per second between the first and the last call observed.
    call_rate: f64,
    /// Per entity, sorted, in ms.
    latencies: Vec<f64>,
}

impl Outcome {
    /// Single reads and bulk confirmation reads per entity.
    fn calls_per_entity(&self) -> f64 {
        (self.entity_requests + self.bulk_reads) as f64 / self.entities as f64
    }

    fn latency(&self, p: f64) -> f64 {
        let index = ((self.latencies.len() as f64 - 1.0) * p).round() as usize;
        self.latencies.get(index).copied().unwrap_or_default()
    }

    fn print(&self, scenario: &Scenario) {
        let secs = self.elapsed.as_secs_f64();
        println!(
            "{:<13} {:>7} {:>8} {:>8} {:>6.2} {:>7.1} {:>9.3} {:>5} {:>7} {:>6} {:>5} {:>7.1} {:>8.1} {:>8.1} {:>8.1}",
            scenario.name,
            scenario.workers,
            self.entities,
            self.entities * scenario.per_entity,
            secs,
            self.entities as f64 / secs,
            self.calls_per_entity(),
            self.bulk_reads,
            self.confirmations_changed,
            self.token_requests,
            self.rate_limited,
            self.call_rate,
            self.latency(0.50),
            self.latency(0.99),
            self.latency(1.0),
        );
    }
}

async fn run_scenario(knobs: &Knobs, scenario: &Scenario) -> Outcome {
    let sim = Simulator::start(SimConfig {
        requests_per_second: scenario.limit.map(|l| l.rps),
        max_concurrent: scenario.limit.map(|l| l.concurrent),
        latency: knobs.latency,
        ..SimConfig::default()
    })
    .await;
    let ids: Vec<String> = (0..scenario.entities)
        .map(|i| sim.sample_entity(i).0)
        .collect();
    if scenario.update_inside_lag {
        sim.set_lag(Lag::For(LAG));
        for i in 0..scenario.entities {
            sim.sample_entity(i);
        }
    }
    // Interleaved, round by round: every entity's k-th notification goes before any (k+1)-th,
    // so an entity's duplicates are as far apart as the delivery allows, the hard case for
    // coalescing them into one fetch.
    let bodies: Vec<(usize, String)> = (0..scenario.per_entity)
        .flat_map(|_| ids.iter().enumerate())
        .map(|(i, id)| (i, sim.notification(EVENT, id)))
        .collect();
    let total = bodies.len();
    let service = Service::start(
        &sim,
        scenario.workers,
        scenario.limit.unwrap_or(HIGH_LIMIT),
        knobs.confirm_after,
        scenario.postgres.as_deref(),
    )
    .await;
    let started = Instant::now();
    let delivery = tokio::spawn(deliver(
        service.url("/webhooks/fenergo"),
        bodies,
        knobs.connections,
        scenario.pace,
    ));
    let progress = watch(
        &sim,
        &service.dir.path().join("outbox.db"),
        scenario.postgres.as_deref(),
        total,
        started,
        knobs.timeout,
    )
    .await;
    let acks = delivery.await;
    let dir = service.stop().await;
    let acks = acks.expect("every webhook is answered 200");
    let stats = sim.stats();
    let latest: Vec<i64> = ids
        .iter()
        .map(|id| sim.latest_version(id).expect("the simulator holds it"))
        .collect();
    sim.shutdown().await;

    assert_eq!(
        (progress.done, progress.settled),
        (total, total),
        "{}: (done, settled) outbox rows of {total} within {:?}",
        scenario.name,
        knobs.timeout
    );
    let (stored, (pending_confirmations, confirmations_changed)) = match &scenario.postgres {
        Some(url) => postgres_outcome(url).await,
        None => {
            let reporting = dir.path().join(fenx_sync::store::FILE_NAME);
            (stored_entities(&reporting), confirmations(&reporting))
        }
    };
    assert_eq!(
        pending_confirmations, 0,
        "{}: confirmations still pending after {:?}",
        scenario.name, knobs.timeout
    );
    let mut first_ack: Vec<Option<DateTime<Utc>>> = vec![None; ids.len()];
    for (entity, at) in acks {
        let first = &mut first_ack[entity];
        *first = Some(first.map_or(at, |f| f.min(at)));
    }
    let mut latencies: Vec<f64> = ids
        .iter()
        .zip(&latest)
        .zip(&first_ack)
        .map(|((id, latest), ack)| {
            let (version, first_stored_at) = stored
                .get(id)
                .unwrap_or_else(|| panic!("{}: entity {id} is not in the store", scenario.name));
            assert_eq!(
                version, latest,
                "{}: entity {id} stored at an old version",
                scenario.name
            );
            let ack = ack.expect("every entity had a webhook acknowledged");
            // stored_at has millisecond resolution; a row written within the same millisecond
            // as the 200 would otherwise come out slightly negative.
            ((*first_stored_at - ack).as_seconds_f64() * 1000.0).max(0.0)
        })
        .collect();
    latencies.sort_by(f64::total_cmp);
    Outcome {
        entities: ids.len(),
        elapsed: progress.elapsed,
        entity_requests: stats.entity_requests(),
        bulk_reads: stats.bulk_reads,
        confirmations_changed,
        token_requests: stats.token_requests,
        rate_limited: stats.rate_limited,
        max_in_flight: stats.max_in_flight,
        call_rate: progress.call_rate,
        latencies,
    }
}

/// fenx-sync as `serve` runs it, in-process: ingest and the sync worker over one temp store.
struct Service {
    addr: SocketAddr,
    dir: TempDir,
    stop: oneshot::Sender<()>,
    task: JoinHandle<Result<(), fenx_sync::RunError>>,
}

impl Service {
    async fn start(
        sim: &Simulator,
        workers: usize,
        limit: Limit,
        confirm_after: Duration,
        postgres: Option<&str>,
    ) -> Service {
        let dir = tempfile::tempdir().unwrap();
        let mut settings = Settings::default();
        settings.store.dir = dir.path().to_owned();
        settings.store.reporting_url = postgres.map(|url| url.to_owned().into());
        settings.webhook.secrets = vec![SECRET.into()];
        settings.webhook.signature.recipe = RecipeChoice::Pinned(RECIPE);
        settings.server.shutdown_grace = Duration::from_secs(5);
        point_at(&mut settings.fenergo, sim, limit);
        // Timings as in the integration tests' `sync_settings`.
        let sync = &mut settings.sync;
        sync.workers = workers;
        sync.retry_base = Duration::from_secs(2);
        sync.stale_delay = Duration::from_secs(5);
        sync.idle_poll = Duration::from_millis(20);
        sync.confirm_after = confirm_after;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let listeners = fenx_sync::Listeners {
            webhook: Some(listener),
            admin: None,
        };
        let task = tokio::spawn(fenx_sync::run(settings, listeners, async {
            let _ = stopped.await;
        }));
        let service = Service {
            addr,
            dir,
            stop,
            task,
        };
        service.wait_ready().await;
        service
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Waits until `/readyz` says the outbox is writable, so start-up is not timed.
    async fn wait_ready(&self) {
        let client = fenx_sync::fenergo::client_builder().build().unwrap();
        for _ in 0..100 {
            if let Ok(r) = client.get(self.url("/readyz")).send().await
                && r.status() == 200
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("fenx-sync at {} never became ready", self.addr);
    }

    /// Shuts the service down and waits (bounded) until it has drained; hands back the store.
    async fn stop(self) -> TempDir {
        let _ = self.stop.send(());
        tokio::time::timeout(Duration::from_secs(15), self.task)
            .await
            .expect("fenx-sync stops within 15 s")
            .expect("the service task does not panic")
            .expect("fenx-sync runs and stops without error");
        self.dir
    }
}

/// Points the client at `sim` with the simulator's own credentials, under `limit`.
fn point_at(fenergo: &mut FenergoSettings, sim: &Simulator, limit: Limit) {
    let config = sim.config();
    fenergo.api_base = sim.api_base();
    fenergo.token_url = sim.token_url();
    fenergo.tenant_id = config.tenant_id.clone();
    fenergo.client_id = config.client_id.clone();
    fenergo.client_secret = Some(config.client_secret.as_str().into());
    fenergo.requests_per_second = limit.rps;
    fenergo.max_concurrent_requests = limit.concurrent;
}

/// Posts every body, signed, over `connections` keep-alive connections (at `pace` per second
/// if given, else as fast as they go); returns each entity index with the time of its 200.
async fn deliver(
    url: String,
    bodies: Vec<(usize, String)>,
    connections: usize,
    pace: Option<u32>,
) -> Vec<(usize, DateTime<Utc>)> {
    let client = fenx_sync::fenergo::client_builder()
        .pool_max_idle_per_host(connections)
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let bodies = Arc::new(bodies);
    let next = Arc::new(AtomicUsize::new(0));
    let started = tokio::time::Instant::now();
    let senders: Vec<_> = (0..connections)
        .map(|_| {
            let (client, url, bodies, next) =
                (client.clone(), url.clone(), bodies.clone(), next.clone());
            tokio::spawn(async move {
                let mut acks = Vec::new();
                loop {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    let Some((entity, body)) = bodies.get(n) else {
                        break;
                    };
                    if let Some(pace) = pace {
                        let due = Duration::from_secs_f64(n as f64 / f64::from(pace));
                        tokio::time::sleep_until(started + due).await;
                    }
                    let response = client
                        .post(&url)
                        .header("content-type", "application/json")
                        .header("x-fenx-signature", RECIPE.sign(SECRET, body.as_bytes()))
                        .body(body.clone())
                        .send()
                        .await
                        .expect("the webhook reaches fenx-sync");
                    assert_eq!(response.status(), 200, "webhook {n} refused");
                    acks.push((*entity, Utc::now()));
                }
                acks
            })
        })
        .collect();
    let mut acks = Vec::with_capacity(bodies.len());
    for sender in senders {
        acks.extend(sender.await.expect("a webhook sender failed"));
    }
    acks
}

struct Progress {
    done: usize,
    /// Rows no longer pending (done, ignored or dead).
    settled: usize,
    elapsed: Duration,
    call_rate: f64,
}

/// Samples the outbox and the simulator every [`POLL`] until all `total` rows are settled or
/// `timeout` has passed since `started`.
async fn watch(
    sim: &Simulator,
    outbox: &Path,
    postgres: Option<&str>,
    total: usize,
    started: Instant,
    timeout: Duration,
) -> Progress {
    // (when, count) at the first and the latest sample that saw more API calls: the steady
    // rate excludes start-up (webhooks not yet arrived) and the drain after the last call.
    let mut first_call: Option<(Instant, u64)> = None;
    let mut last_call = (started, 0);
    loop {
        let calls = sim.stats().api_calls;
        let now = Instant::now();
        if calls > last_call.1 {
            first_call.get_or_insert((now, calls));
            last_call = (now, calls);
        }
        let path = outbox.to_owned();
        let (done, settled, mut confirming) = tokio::task::spawn_blocking(move || {
            let (done, settled) = settled_rows(&path);
            let reporting = path.with_file_name(fenx_sync::store::FILE_NAME);
            (done, settled, confirmations(&reporting).0)
        })
        .await
        .unwrap();
        if let Some(url) = postgres {
            confirming = postgres_outcome(url).await.1.0;
        }
        if (settled >= total && confirming == 0) || now - started > timeout {
            let call_rate = match first_call {
                Some((at, count)) if last_call.0 > at => {
                    (last_call.1 - count) as f64 / (last_call.0 - at).as_secs_f64()
                }
                _ => f64::NAN,
            };
            return Progress {
                done,
                settled,
                elapsed: now - started,
                call_rate,
            };
        }
        tokio::time::sleep(POLL).await;
    }
}

/// (done, not pending) outbox rows.
fn settled_rows(outbox: &Path) -> (usize, usize) {
    let conn = rusqlite::Connection::open(outbox).unwrap();
    conn.query_row(
        "SELECT coalesce(sum(status = 'done'), 0), coalesce(sum(status <> 'pending'), 0)
           FROM notification",
        [],
        |r| Ok((r.get::<_, i64>(0)? as usize, r.get::<_, i64>(1)? as usize)),
    )
    .unwrap()
}

/// (pending, version-changing) confirmation reads; (0, 0) before the store exists.
fn confirmations(reporting: &Path) -> (i64, i64) {
    if !reporting.exists() {
        return (0, 0);
    }
    let conn = rusqlite::Connection::open(reporting).unwrap();
    conn.query_row(
        "SELECT (SELECT count(*) FROM entity_confirmation),
                (SELECT count(*) FROM sync_log WHERE outcome = 'confirmed-changed')",
        [],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )
    .unwrap_or((0, 0))
}

/// [`stored_entities`] and [`confirmations`] from a PostgreSQL reporting store; nothing before
/// the service has created its tables.
async fn postgres_outcome(url: &str) -> (HashMap<String, (i64, DateTime<Utc>)>, (i64, i64)) {
    let (db, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("the bench database answers");
    tokio::spawn(connection);
    let stored = db
        .query(
            "SELECT e.entity_id, e.version,
                    (SELECT min(stored_at) FROM entity_version AS v
                      WHERE v.tenant_id = e.tenant_id AND v.entity_id = e.entity_id)
               FROM entity AS e",
            &[],
        )
        .await
        .unwrap_or_default()
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2))))
        .collect();
    let counts = db
        .query_one(
            "SELECT (SELECT count(*) FROM entity_confirmation),
                    (SELECT count(*) FROM sync_log WHERE outcome = 'confirmed-changed')",
            &[],
        )
        .await
        .map_or((0, 0), |r| (r.get(0), r.get(1)));
    (stored, counts)
}

/// Every stored entity's version and when its first (provisional) row was written.
fn stored_entities(reporting: &Path) -> HashMap<String, (i64, DateTime<Utc>)> {
    let conn = rusqlite::Connection::open(reporting).unwrap();
    let mut select = conn
        .prepare(
            "SELECT e.entity_id, e.version,
                    (SELECT min(stored_at) FROM entity_version AS v WHERE v.entity_id = e.entity_id)
               FROM entity AS e",
        )
        .unwrap();
    select
        .query_map([], |r| {
            Ok((r.get::<_, String>(0)?, r.get(1)?, r.get::<_, String>(2)?))
        })
        .unwrap()
        .map(|row| {
            let (id, version, stored_at) = row.unwrap();
            let stored_at = DateTime::parse_from_rfc3339(&stored_at)
                .expect("stored_at is RFC 3339")
                .with_timezone(&Utc);
            (id, (version, stored_at))
        })
        .collect()
}

/// `count` sample entities as the worker would store them: fetched from a simulator through
/// the real client, so the store run writes the JSON Fenergo's shape produces.
async fn fetched_samples(count: usize) -> Vec<EntitySnapshot> {
    let sim = Simulator::start(SimConfig::default()).await;
    let mut fenergo = FenergoSettings::default();
    point_at(&mut fenergo, &sim, HIGH_LIMIT);
    let client = FenergoClient::new(&fenergo, Arc::new(Metrics::new())).unwrap();
    let mut samples = Vec::with_capacity(count);
    for index in 0..count {
        let (id, _) = sim.sample_entity(index);
        let entity = client
            .get_entity(
                &format!("entitydataquery/api/entity/{id}"),
                "fenx-sync-bench",
            )
            .await
            .expect("the simulator serves its sample entity");
        samples.push(EntitySnapshot::from(&entity));
    }
    sim.shutdown().await;
    samples
}

/// Claims per second (each settled at once) over `claims` due rows, with `waiting` other rows
/// pending but not due for an hour, in a fresh outbox.
async fn claim_run(claims: usize, waiting: usize) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let options = OutboxOptions {
        busy_timeout: Duration::from_secs(5),
        max_batch: 1000,
        queue_capacity: 64,
        enqueue_timeout: Duration::from_secs(5),
    };
    let (outbox, writer) = Outbox::open(dir.path(), &options).unwrap();
    let rows = |prefix: &'static str, range: std::ops::Range<usize>| {
        range
            .map(|i| NewNotification {
                notification: fenx_sync::notification::parse_body(&bytes::Bytes::from(format!(
                    r#"{{"Id":"{prefix}-{i}","EventType":"{EVENT}","RelativeUrl":"entitydataquery/api/entity/{prefix}-{i}"}}"#
                )))
                .unwrap()
                .remove(0),
                source: Source::Webhook,
                signature_recipe: None,
            })
            .collect::<Vec<_>>()
    };
    for start in (0..waiting).step_by(1000) {
        outbox
            .append_batch(rows("waiting", start..waiting.min(start + 1000)))
            .await
            .unwrap();
    }
    // What a storm of 404s or 429s leaves behind: every one of them claimed once (so in the
    // entity index, where a claim puts the rows it finds appended) and scheduled for later.
    let later = fenx_sync::time::format(Utc::now() + chrono::Duration::hours(1));
    rusqlite::Connection::open(dir.path().join(fenx_sync::outbox::FILE_NAME))
        .unwrap()
        .execute(
            "UPDATE notification SET next_attempt_at = ?1, entity_indexed = 1",
            [later],
        )
        .unwrap();
    for start in (0..claims).step_by(1000) {
        outbox
            .append_batch(rows("due", start..claims.min(start + 1000)))
            .await
            .unwrap();
    }
    drop(outbox);
    writer.wait();
    tokio::task::spawn_blocking(move || {
        let queue = WorkQueue::open(dir.path(), Duration::from_secs(5)).unwrap();
        let lease = Duration::from_secs(60);
        let started = Instant::now();
        let mut claimed = 0;
        while let Some(claim) = queue.claim("bench", lease, Utc::now()).unwrap() {
            let settlements: Vec<Settlement> = claim
                .rows
                .iter()
                .map(|r| Settlement {
                    seq: r.seq,
                    outcome: RowOutcome::Done { status: Some(200) },
                })
                .collect();
            queue
                .settle(&claim.lease_key, "bench", &settlements)
                .unwrap();
            claimed += 1;
        }
        assert_eq!(claimed, claims, "every due row is claimed, no waiting one");
        claimed as f64 / started.elapsed().as_secs_f64()
    })
    .await
    .unwrap()
}

/// Upserts `count` distinct entities (the samples under new ids) into a fresh reporting store,
/// one transaction each, as the worker does.
async fn upsert_run(
    samples: &[EntitySnapshot],
    count: usize,
    store: &dyn ReportingStore,
) -> Duration {
    // Prepared before the clock starts, so only the store's work is timed.
    let snapshots: Vec<EntitySnapshot> = (0..count)
        .map(|i| {
            let mut snapshot = samples[i % samples.len()].clone();
            snapshot.entity_id = format!("{}-{i}", snapshot.entity_id);
            snapshot
        })
        .collect();
    let cause = SyncCause {
        notification_id: "fenx-sync-bench".to_owned(),
        event_type: Some(EVENT.to_owned()),
        event_when: None,
    };
    let started = Instant::now();
    for snapshot in &snapshots {
        assert_eq!(
            store.upsert_entity(snapshot, &cause).await.unwrap(),
            UpsertOutcome::Inserted
        );
    }
    started.elapsed()
}
