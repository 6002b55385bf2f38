//! Backfill benchmark: `cargo bench --bench backfill`.
//!
//! Fills an empty reporting store from the simulator's paged entity list, at a given API latency
//! and tenant rate limit, and prints entities per second, pages and API calls made, 429s served,
//! and the achieved call rate as a share of the limit, and the store's size per entity (all of
//! it, and without the history table). A second scenario with no rate limit shows what the store
//! itself sustains, and, with `FENX_BENCH_POSTGRES_URL` (or `FENX_TEST_POSTGRES_URL`) naming a
//! PostgreSQL database, the same scenario into a fresh PostgreSQL reporting store beside it, in
//! the same run.
//!
//! Knobs: FENX_BENCH_ENTITIES (default 5000), FENX_BENCH_LATENCY_MS (default 20),
//! FENX_BENCH_RPS (the tenant limit, default 50 as on a Fenergo SDLC tenant),
//! FENX_BENCH_PAGE_SIZE (default 100), FENX_BENCH_STORES (default "sqlite,postgres": which stores'
//! scenarios run).
//!
//! Growth (`FENX_BENCH_GROWTH=1`): does the store's cost stay flat as it grows? The unlimited
//! scenarios only, by default 1,000,000 entities, 500 per page, no API latency (the store is
//! what is measured); each prints the backfill rate over the first and the last 10% of the
//! entities and their ratio, then runs every README cookbook query on the full store and prints
//! its time and rows.

use std::sync::Arc;
use std::time::{Duration, Instant};

use fenx_sim::testkit::bench::{env_or, ms};
use fenx_sim::testkit::cookbook::{self, Dialect};
use fenx_sim::testkit::postgres::FreshDatabase;
use fenx_sim::{SimConfig, Simulator};
use fenx_sync::config::Settings;
use fenx_sync::fenergo::FenergoClient;
use fenx_sync::reconcile::Reconciler;
use fenx_sync::store::RunKind;
use fenx_sync::telemetry::Metrics;

fn main() {
    let growth = env_or("FENX_BENCH_GROWTH", 0) == 1;
    let entities: usize = env_or("FENX_BENCH_ENTITIES", if growth { 1_000_000 } else { 5000 });
    let latency =
        Duration::from_millis(env_or("FENX_BENCH_LATENCY_MS", if growth { 0 } else { 20 }));
    let rps: u32 = env_or("FENX_BENCH_RPS", 50);
    let page_size: usize = env_or("FENX_BENCH_PAGE_SIZE", if growth { 500 } else { 100 });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    println!("backfill of {entities} entities, {page_size} per page, API latency {latency:?}\n");
    println!(
        "{:<22} {:>10} {:>8} {:>10} {:>8} {:>12} {:>14} {:>16}",
        "scenario",
        "entities/s",
        "pages",
        "API calls",
        "429s",
        "calls/s",
        "bytes/entity",
        "w/o history"
    );
    let run = Run {
        entities,
        latency,
        page_size,
        growth,
    };
    let stores = std::env::var("FENX_BENCH_STORES").unwrap_or_else(|_| "sqlite,postgres".into());
    let stores: Vec<&str> = stores.split(',').map(str::trim).collect();
    if stores.contains(&"sqlite") {
        if !growth {
            let name = format!("tenant limit {rps} rps");
            runtime.block_on(run.scenario(&name, Some(rps), None));
        }
        runtime.block_on(run.scenario("no rate limit", None, None));
    }
    if !stores.contains(&"postgres") {
        return;
    }
    match FreshDatabase::create("backfill_bench") {
        Some(db) => {
            runtime.block_on(run.scenario("no limit, PostgreSQL", None, Some(&db.url)));
        }
        None => println!("(no PostgreSQL row: set FENX_BENCH_POSTGRES_URL to a database URL)"),
    }
}

struct Run {
    entities: usize,
    latency: Duration,
    page_size: usize,
    growth: bool,
}

impl Run {
    async fn scenario(&self, name: &str, rps: Option<u32>, postgres: Option<&str>) {
        let (entities, page_size) = (self.entities, self.page_size);
        let sim = Simulator::start(SimConfig {
            requests_per_second: rps,
            max_concurrent: rps.map(|_| 10),
            latency: self.latency,
            ..SimConfig::default()
        })
        .await;
        sim.sample_entities(0..entities);
        let dir = tempfile::tempdir().unwrap();
        let mut settings = Settings::default();
        settings.store.dir = dir.path().to_owned();
        settings.store.reporting_url = postgres.map(|url| url.to_owned().into());
        let config = sim.config();
        let f = &mut settings.fenergo;
        f.api_base = sim.api_base();
        f.token_url = sim.token_url();
        f.tenant_id = config.tenant_id.clone();
        f.client_id = config.client_id.clone();
        f.client_secret = Some(config.client_secret.clone().into());
        f.requests_per_second = rps.unwrap_or(10_000);
        let client =
            Arc::new(FenergoClient::new(&settings.fenergo, Arc::new(Metrics::new())).unwrap());
        let store = fenx_sync::store::open(&settings).await.unwrap();
        let reconciler = Reconciler::new(client, store.clone(), page_size);
        let before = sim.stats();
        let started = Instant::now();
        let mut pages: Vec<(Instant, i64)> = Vec::new();
        let run = reconciler
            .run(RunKind::Backfill, false, |run| {
                pages.push((Instant::now(), run.counts.seen))
            })
            .await
            .unwrap();
        let finished = Instant::now();
        let elapsed = (finished - started).as_secs_f64();
        let stats = sim.stats();
        assert_eq!(run.counts.added, entities as i64, "every entity stored");
        let calls = stats.api_calls - before.api_calls;
        let share = rps.map_or(String::new(), |r| {
            format!(
                " ({:.0}% of {r})",
                100.0 * calls as f64 / elapsed / f64::from(r)
            )
        });
        let size = store.stats().await.unwrap();
        let per_entity = |bytes: i64| bytes / size.entities.max(1);
        println!(
            "{:<22} {:>10.0} {:>8} {:>10} {:>8} {:>8.1}{share} {:>14} {:>16}",
            name,
            entities as f64 / elapsed,
            stats.list_pages - before.list_pages,
            calls,
            stats.rate_limited - before.rate_limited,
            calls as f64 / elapsed,
            per_entity(size.bytes),
            per_entity(size.bytes_without_history),
        );
        sim.shutdown().await;
        if self.growth {
            print_growth(started, &pages, entities as i64, finished);
            match postgres {
                Some(url) => time_cookbook_postgres(url).await,
                None => time_cookbook_sqlite(&dir.path().join("reporting.db")),
            }
        }
    }
}

/// The backfill rate over the first and the last tenth of `total` entities, from the time each
/// page was stored, and the time the run took after its last page (building the indexes it
/// deferred, refreshing statistics), which the overall rate above includes.
fn print_growth(started: Instant, pages: &[(Instant, i64)], total: i64, finished: Instant) {
    let reached = |seen: i64| {
        pages
            .iter()
            .find(|(_, s)| *s >= seen)
            .map(|&(at, s)| (at, s))
            .unwrap_or((started, 0))
    };
    let (first_at, first_seen) = reached(total / 10);
    let (last_from, last_from_seen) = reached(total - total / 10);
    let (end, end_seen) = pages.last().copied().unwrap_or((started, 0));
    let first = first_seen as f64 / (first_at - started).as_secs_f64();
    let last = (end_seen - last_from_seen) as f64 / (end - last_from).as_secs_f64();
    println!(
        "  growth: first 10% {first:.0} entities/s, last 10% {last:.0} entities/s, last/first {:.2} (goal >= 0.80)",
        last / first
    );
    println!(
        "  after the last page: {:.1} s (deferred indexes built, statistics refreshed)",
        (finished - end).as_secs_f64()
    );
}

fn time_cookbook_sqlite(path: &std::path::Path) {
    let conn = rusqlite::Connection::open(path).unwrap();
    let id: String = conn
        .query_row("SELECT entity_id FROM entity LIMIT 1", [], |r| r.get(0))
        .unwrap();
    for (title, sql) in cookbook::statements(README, Dialect::Sqlite, &id) {
        let started = Instant::now();
        let mut statement = conn.prepare(&sql).unwrap();
        let mut rows = statement.query([]).unwrap();
        let mut count = 0;
        while rows.next().unwrap().is_some() {
            count += 1;
        }
        print_query(&title, started.elapsed(), count);
    }
}

async fn time_cookbook_postgres(url: &str) {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let id: String = client
        .query_one("SELECT entity_id FROM entity LIMIT 1", &[])
        .await
        .unwrap()
        .get(0);
    for (title, sql) in cookbook::statements(README, Dialect::Postgres, &id) {
        let started = Instant::now();
        let count = client
            .simple_query(&sql)
            .await
            .unwrap()
            .iter()
            .filter(|m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(_)))
            .count();
        print_query(&title, started.elapsed(), count);
    }
}

const README: &str = include_str!("../README.md");

fn print_query(title: &str, took: Duration, rows: usize) {
    let verdict = if took < Duration::from_secs(1) {
        ""
    } else {
        "  (over 1 s)"
    };
    println!("  {:>9.1} ms {rows:>9} rows  {title}{verdict}", ms(took));
}
