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
//! FENX_BENCH_PAGE_SIZE (default 100).

use std::sync::Arc;
use std::time::{Duration, Instant};

use fenx_sim::testkit::bench::env_or;
use fenx_sim::testkit::postgres::FreshDatabase;
use fenx_sim::{SimConfig, Simulator};
use fenx_sync::config::Settings;
use fenx_sync::fenergo::FenergoClient;
use fenx_sync::reconcile::Reconciler;
use fenx_sync::store::RunKind;
use fenx_sync::telemetry::Metrics;

fn main() {
    let entities: usize = env_or("FENX_BENCH_ENTITIES", 5000);
    let latency = Duration::from_millis(env_or("FENX_BENCH_LATENCY_MS", 20));
    let rps: u32 = env_or("FENX_BENCH_RPS", 50);
    let page_size: usize = env_or("FENX_BENCH_PAGE_SIZE", 100);
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
    for (name, limit) in [
        (format!("tenant limit {rps} rps"), Some(rps)),
        ("no rate limit".to_owned(), None),
    ] {
        runtime.block_on(scenario(&name, entities, latency, limit, page_size, None));
    }
    match FreshDatabase::create("backfill_bench") {
        Some(db) => {
            let name = "no limit, PostgreSQL";
            runtime.block_on(scenario(
                name,
                entities,
                latency,
                None,
                page_size,
                Some(&db.url),
            ));
        }
        None => println!("(no PostgreSQL row: set FENX_BENCH_POSTGRES_URL to a database URL)"),
    }
}

async fn scenario(
    name: &str,
    entities: usize,
    latency: Duration,
    rps: Option<u32>,
    page_size: usize,
    postgres: Option<&str>,
) {
    let sim = Simulator::start(SimConfig {
        requests_per_second: rps,
        max_concurrent: rps.map(|_| 10),
        latency,
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
    let client = Arc::new(FenergoClient::new(&settings.fenergo, Arc::new(Metrics::new())).unwrap());
    let store = fenx_sync::store::open(&settings).await.unwrap();
    let reconciler = Reconciler::new(client, store.clone(), page_size);
    let before = sim.stats();
    let started = Instant::now();
    let run = reconciler
        .run(RunKind::Backfill, false, |_| {})
        .await
        .unwrap();
    let elapsed = started.elapsed().as_secs_f64();
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
}
