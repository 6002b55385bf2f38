//! Keeping the store complete without webhooks: the polling source, backfill with resume, and
//! reconciliation that repairs planted gaps, all against the simulator.

use std::sync::Arc;
use std::time::Duration;

use fenx_sim::{PollingKnobs, SimConfig, Simulator};
use fenx_sync::config::Settings;
use fenx_sync::fenergo::FenergoClient;
use fenx_sync::outbox::{Outbox, OutboxOptions};
use fenx_sync::poller::{Polled, Poller};
use fenx_sync::reconcile::{
    ReconcileError, Reconciler, build_deferred_indexes_unless_a_backfill_is_unfinished,
};
use fenx_sync::store::{ReportingStore, RunKind, SqliteStore};
use fenx_sync::telemetry::Metrics;
use rusqlite::Connection;

use crate::helpers::{TestApp, eventually, test_settings, wait_for};
use crate::sync::sync_settings;

fn client(settings: &Settings) -> Arc<FenergoClient> {
    Arc::new(FenergoClient::new(&settings.fenergo, Arc::new(Metrics::new())).unwrap())
}

fn sim_config(requests_per_second: Option<u32>) -> SimConfig {
    SimConfig {
        requests_per_second,
        max_concurrent: requests_per_second.map(|_| 10),
        ..crate::sync::sim_config()
    }
}

/// The SQLite reporting store the settings name.
fn reporting_store(settings: &Settings) -> Arc<SqliteStore> {
    Arc::new(
        SqliteStore::open(
            &settings.store.reporting_path(),
            &settings.fenergo.tenant_id,
        )
        .unwrap(),
    )
}

fn count(conn: &Connection, sql: &str) -> i64 {
    conn.query_row(sql, [], |r| r.get(0)).unwrap()
}

/// The service's `fenx_reporting_deferred_indexes` gauge.
async fn deferred_gauge(app: &TestApp) -> Option<i64> {
    app.metrics().await.lines().find_map(|l| {
        l.strip_prefix("fenx_reporting_deferred_indexes ")?
            .parse()
            .ok()
    })
}

/// How many of the bulk load's indexes are deferred, and how many exist.
fn bulk_load_indexes(conn: &Connection) -> (i64, i64) {
    let names = fenx_sync::store::BULK_LOAD_INDEXES
        .map(|name| format!("'{name}'"))
        .join(", ");
    (
        count(conn, "SELECT count(*) FROM deferred_index"),
        count(
            conn,
            &format!(
                "SELECT count(*) FROM sqlite_schema WHERE type = 'index' AND name IN ({names})"
            ),
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn polled_notifications_are_stored_acknowledged_and_synced() {
    let sim = Simulator::start(sim_config(None)).await;
    sim.set_polling(PollingKnobs {
        batch_size: 7,
        duplicate_every: 4,
        ..PollingKnobs::default()
    });
    let entities: Vec<String> = (0..25).map(|i| sim.sample_entity(i).0).collect();
    for entity in &entities {
        sim.publish("entitydata:draftverified", entity);
    }
    sim.publish("journey:taskcompleted", &entities[0]);
    let app = TestApp::spawn_with(|s| {
        sync_settings(s, &sim);
        s.polling.enabled = true;
        s.polling.interval = Duration::from_millis(50);
    })
    .await;
    let outbox = app.dir.path().join("outbox.db");
    wait_for(
        &outbox,
        "SELECT count(*) FROM notification WHERE status <> 'pending'",
        26,
    )
    .await;
    let conn = Connection::open(&outbox).unwrap();
    assert_eq!(
        count(&conn, "SELECT count(*) FROM notification"),
        26,
        "duplicates stored once"
    );
    assert_eq!(
        count(
            &conn,
            "SELECT count(*) FROM notification WHERE source = 'poll'"
        ),
        26
    );
    assert!(count(&conn, "SELECT sum(duplicates) FROM notification") >= 6);
    let reporting = Connection::open(app.dir.path().join("reporting.db")).unwrap();
    assert_eq!(count(&reporting, "SELECT count(*) FROM entity"), 25);
    let stats = sim.stats();
    assert_eq!(
        stats.feed_depth.get("all").copied().unwrap_or(0),
        0,
        "every batch acknowledged"
    );
    assert!(stats.batches_completed >= 5);
    app.stop().await;
}

#[tokio::test]
async fn a_crash_between_storing_and_acknowledging_redelivers_without_doubling() {
    let sim = Simulator::start(sim_config(None)).await;
    sim.set_polling(PollingKnobs {
        batch_size: 10,
        ..PollingKnobs::default()
    });
    let entities: Vec<String> = (0..5).map(|i| sim.sample_entity(i).0).collect();
    for entity in &entities {
        sim.publish("entitydata:created", entity);
    }
    let dir = tempfile::tempdir().unwrap();
    let mut settings = test_settings(dir.path());
    sync_settings(&mut settings, &sim);
    let options = OutboxOptions {
        busy_timeout: Duration::from_secs(1),
        max_batch: 100,
        queue_capacity: 10,
        enqueue_timeout: Duration::from_secs(1),
    };
    let (outbox, _writer) = Outbox::open(dir.path(), &options).unwrap();
    let poller = Poller::new(client(&settings), outbox, &settings.polling);

    // Take and store a batch, then "crash" before acknowledging it.
    let batch = poller.take_batch("all").await.unwrap().expect("a batch");
    assert_eq!(poller.store("all", &batch).await.unwrap(), (5, 0));
    assert_eq!(
        poller.poll_once("all").await.unwrap(),
        Polled::Empty,
        "the batch is in flight"
    );

    sim.expire_batches();
    match poller.poll_once("all").await.unwrap() {
        Polled::Batch {
            stored,
            duplicates,
            batch_id,
            ..
        } => {
            assert_eq!(
                (stored, duplicates),
                (0, 5),
                "redelivered, recognised, not doubled"
            );
            assert_ne!(batch_id, batch.batch_id);
        }
        other => panic!("expected the redelivered batch, got {other:?}"),
    }
    assert_eq!(poller.poll_once("all").await.unwrap(), Polled::Empty);
    let conn = Connection::open(dir.path().join("outbox.db")).unwrap();
    assert_eq!(count(&conn, "SELECT count(*) FROM notification"), 5);
    assert_eq!(sim.stats().feed_depth.get("all").copied().unwrap_or(0), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_and_polling_together_store_each_notification_once() {
    let sim = Simulator::start(sim_config(None)).await;
    let entities: Vec<String> = (0..10).map(|i| sim.sample_entity(i).0).collect();
    let app = TestApp::spawn_with(|s| {
        sync_settings(s, &sim);
        s.polling.enabled = true;
        s.polling.interval = Duration::from_millis(50);
    })
    .await;
    for entity in &entities {
        let id = sim.publish("entitydata:draftverified", entity);
        let body = format!(
            r#"{{"Id":"{id}","EventType":"entitydata:draftverified","RelativeUrl":"entitydataquery/api/entity/{entity}"}}"#
        );
        assert_eq!(app.post_signed(&body).await.status(), 200);
    }
    let outbox = app.dir.path().join("outbox.db");
    wait_for(&outbox, "SELECT sum(duplicates) FROM notification", 10).await;
    let conn = Connection::open(&outbox).unwrap();
    assert_eq!(count(&conn, "SELECT count(*) FROM notification"), 10);
    app.stop().await;
}

#[tokio::test]
async fn a_backfill_resumes_after_an_interruption_and_reads_each_page_once() {
    let sim = Simulator::start(sim_config(None)).await;
    sim.sample_entities(0..2000);
    let dir = tempfile::tempdir().unwrap();
    let mut settings = test_settings(dir.path());
    sync_settings(&mut settings, &sim);
    let store = reporting_store(&settings);
    let reconciler = Arc::new(Reconciler::new(client(&settings), store.clone(), 100));

    // Interrupted after five pages, as if the process were killed.
    let (pages, mut seen) = tokio::sync::mpsc::unbounded_channel();
    let first = {
        let reconciler = reconciler.clone();
        tokio::spawn(async move {
            reconciler
                .run(RunKind::Backfill, true, |_| {
                    let _ = pages.send(());
                })
                .await
        })
    };
    for _ in 0..5 {
        seen.recv().await.unwrap();
    }
    first.abort();
    let _ = first.await;
    let pages_before = sim.stats().list_pages;
    let reporting = Connection::open(settings.store.reporting_path()).unwrap();
    assert_eq!(
        bulk_load_indexes(&reporting),
        (2, 0),
        "a backfill into an empty store builds its value indexes at its end, not row by row"
    );

    let run = reconciler
        .run(RunKind::Backfill, true, |_| {})
        .await
        .unwrap();
    assert_eq!(count(&reporting, "SELECT count(*) FROM entity"), 2000);
    assert_eq!(
        bulk_load_indexes(&reporting),
        (0, 2),
        "the resumed backfill built the indexes the interrupted one deferred"
    );
    assert_eq!(
        (run.counts.seen, run.counts.added),
        (2000, 2000),
        "counts carry over the resume"
    );
    let pages_after = sim.stats().list_pages - pages_before;
    assert!(
        pages_after <= 15,
        "{pages_after} pages read after resuming: it started over"
    );
    assert_eq!(
        count(
            &reporting,
            "SELECT count(*) FROM reconcile_run WHERE status = 'finished'"
        ),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_backfill_leaves_its_indexes_deferred_for_the_resumed_run_to_build() {
    let sim = Simulator::start(sim_config(None)).await;
    sim.sample_entities(0..10);
    let dir = tempfile::tempdir().unwrap();
    let mut settings = test_settings(dir.path());
    sync_settings(&mut settings, &sim);
    let store = reporting_store(&settings);
    let mut refused_settings = settings.clone();
    refused_settings.fenergo.client_secret = Some("not-the-secret".into());
    let refused = Reconciler::new(client(&refused_settings), store.clone(), 100)
        .run(RunKind::Backfill, true, |_| {})
        .await;
    assert!(
        matches!(refused, Err(ReconcileError::CredentialsRefused(_))),
        "{refused:?}"
    );
    let reporting = Connection::open(settings.store.reporting_path()).unwrap();
    assert_eq!(bulk_load_indexes(&reporting), (2, 0));
    assert_eq!(
        store.stats().await.unwrap().deferred_indexes,
        fenx_sync::store::BULK_LOAD_INDEXES.map(String::from),
        "fenx-sync status names them"
    );

    let run = Reconciler::new(client(&settings), store.clone(), 100)
        .run(RunKind::Backfill, true, |_| {})
        .await
        .unwrap();
    assert_eq!(run.counts.added, 10);
    assert_eq!(bulk_load_indexes(&reporting), (0, 2));
}

#[tokio::test]
async fn deferred_indexes_are_built_unless_a_backfill_is_unfinished() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("reporting.db");
    let store: Arc<dyn ReportingStore> = Arc::new(SqliteStore::open(&path, "tenant").unwrap());
    store.defer_indexes().await.unwrap();
    let run = store.start_reconcile(RunKind::Backfill).await.unwrap();
    let reporting = Connection::open(&path).unwrap();

    build_deferred_indexes_unless_a_backfill_is_unfinished(&*store).await;
    assert_eq!(
        bulk_load_indexes(&reporting),
        (2, 0),
        "left for the unfinished backfill to build when it is resumed"
    );
    store.save_reconcile(&run, true).await.unwrap();
    build_deferred_indexes_unless_a_backfill_is_unfinished(&*store).await;
    assert_eq!(bulk_load_indexes(&reporting), (0, 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_reports_deferred_indexes_and_builds_them_once_no_backfill_is_unfinished() {
    let sim = Simulator::start(sim_config(None)).await;
    let dir = tempfile::tempdir().unwrap();
    let mut settings = test_settings(dir.path());
    sync_settings(&mut settings, &sim);
    let store = reporting_store(&settings);
    store.defer_indexes().await.unwrap();
    let run = store.start_reconcile(RunKind::Backfill).await.unwrap();
    let path = settings.store.reporting_path();
    drop(store);
    let app = TestApp::start_in(dir, |s| sync_settings(s, &sim)).await;
    eventually("the gauge counts both deferred indexes", || async {
        deferred_gauge(&app).await.filter(|&n| n == 2)
    })
    .await;
    let reporting = Connection::open(&path).unwrap();
    assert_eq!(
        bulk_load_indexes(&reporting),
        (2, 0),
        "the unfinished backfill builds them"
    );
    let dir = app.stop().await;

    let store = reporting_store(&settings);
    store.save_reconcile(&run, true).await.unwrap();
    drop(store);
    let app = TestApp::start_in(dir, |s| sync_settings(s, &sim)).await;
    eventually("start-up builds them", || async {
        (bulk_load_indexes(&reporting) == (0, 2)).then_some(())
    })
    .await;
    app.stop().await;
}

#[tokio::test]
async fn reconciliation_repairs_missing_and_behind_entities_within_the_rate_limit() {
    let sim = Simulator::start(sim_config(Some(20))).await;
    let entities = sim.sample_entities(0..300);
    let dir = tempfile::tempdir().unwrap();
    let mut settings = test_settings(dir.path());
    sync_settings(&mut settings, &sim);
    // A little under the tenant's limit: network jitter can bunch two calls at the server.
    settings.fenergo.requests_per_second = 19;
    settings.fenergo.max_concurrent_requests = 10;
    let store = reporting_store(&settings);
    let reconciler = Reconciler::new(client(&settings), store, 25);
    let first = reconciler
        .run(RunKind::Backfill, false, |_| {})
        .await
        .unwrap();
    assert_eq!(first.counts.added, 300);

    // Plant gaps: ten entities vanish from the store, five move on in Fenergo.
    let reporting = Connection::open(settings.store.reporting_path()).unwrap();
    for (id, _) in &entities[..10] {
        reporting
            .execute("DELETE FROM entity WHERE entity_id = ?1", [id])
            .unwrap();
    }
    for (id, _) in &entities[100..105] {
        sim.put_entity(
            id,
            "Company",
            serde_json::json!({"legalEntityName": {"type": "Single", "value": "Moved On"}}),
        );
    }
    let repair = reconciler
        .run(RunKind::Reconcile, false, |_| {})
        .await
        .unwrap();
    assert_eq!((repair.counts.added, repair.counts.updated), (10, 5));
    assert_eq!(repair.counts.unchanged, 285);
    assert_eq!(count(&reporting, "SELECT count(*) FROM entity"), 300);
    assert_eq!(
        sim.stats().rate_limited,
        0,
        "the client stayed under the tenant's rate limit"
    );
}
