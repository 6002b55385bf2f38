//! The store converges to Fenergo's truth: reads taken inside Fenergo's consistency lag are
//! confirmed later (in batches, surviving restarts), stale re-fetches keep their own budget,
//! short-lived tokens are reused, refused credentials stop syncing loudly without losing
//! anything, a busy local store costs no attempt, and reconciliation marks entities Fenergo no
//! longer lists. The worker is stepped with `run_once_at` / `confirm_due_at`, so confirmation
//! times are reached by moving the clock, not by sleeping.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use fenx_sim::{Faults, Lag, SimConfig};
use fenx_sync::fenergo::FenergoClient;
use fenx_sync::reconcile::Reconciler;
use fenx_sync::store::{RunKind, SqliteStore};
use fenx_sync::telemetry::Metrics;
use serde_json::json;

use crate::helpers::eventually;
use crate::sync::{Harness, later, new_worker, new_worker_with_metrics, sim_config};

const UPDATED: &str = "entitydata:draftverified";

fn name(value: &str) -> serde_json::Value {
    json!({"legalEntityName": {"type": "Single", "value": value}})
}

/// Makes `entity` readable at a first version, then updates it again inside the lag: reads see
/// the first version once more before the second. Returns both versions.
fn update_twice_inside_the_lag(h: &Harness, entity: &str) -> (i64, i64) {
    h.sim.set_lag(Lag::None);
    let first = h.sim.put_entity(entity, "Company", name("First Ltd"));
    h.sim.set_lag(Lag::Reads(1));
    let second = h.sim.put_entity(entity, "Company", name("Second Ltd"));
    (first, second)
}

fn confirmed_at(h: &Harness, entity: &str) -> Option<String> {
    h.reporting()
        .query_row(
            "SELECT confirmed_at FROM entity WHERE entity_id = ?1",
            [entity],
            |r| r.get(0),
        )
        .unwrap()
}

#[tokio::test]
async fn a_new_entity_updated_twice_inside_the_lag_ends_at_the_second_version() {
    let h = Harness::start(|_| {}).await;
    let entity = "c0ffee00-0000-4000-8000-000000000001";
    let (first, second) = update_twice_inside_the_lag(&h, entity);
    h.deliver("entitydata:created", entity).await;
    h.deliver(UPDATED, entity).await;
    h.drain().await;
    assert_eq!(
        h.stored_version(entity),
        Some(first),
        "the provisional row is stored at once"
    );
    assert_eq!(confirmed_at(&h, entity), None);
    assert_eq!(h.worker.pending_confirmations().await.unwrap(), 1);

    let early = h.worker.confirm_due_at(Utc::now()).await.unwrap();
    assert_eq!(early.confirmed, 0, "no confirmation before confirm_after");
    assert_eq!(h.sim.stats().bulk_reads, 0);

    let report = h.worker.confirm_due_at(later(31)).await.unwrap();
    assert_eq!((report.confirmed, report.changed), (1, 1));
    assert_eq!(h.stored_version(entity), Some(second));
    assert_eq!(h.history(entity), [first, second]);
    assert!(confirmed_at(&h, entity).is_some());
    assert!(h.outcomes().contains(&(
        "fenx-sync:confirmation".to_owned(),
        "confirmed-changed".to_owned()
    )));
    assert_eq!(h.worker.pending_confirmations().await.unwrap(), 0);
    let stats = h.sim.stats();
    assert_eq!((stats.entity_requests(), stats.bulk_reads), (1, 1));
}

#[tokio::test]
async fn a_stored_entity_whose_two_updates_land_inside_the_lag_ends_current() {
    let h = Harness::start(|_| {}).await;
    let (entity, v1) = h.sim.sample_entity(20);
    h.deliver("entitydata:created", &entity).await;
    h.drain().await;
    let settled = h.worker.confirm_due_at(later(31)).await.unwrap();
    assert_eq!((settled.confirmed, settled.changed), (1, 0));

    let v2 = h.sim.put_entity(&entity, "Company", name("Second Ltd"));
    h.sim.set_lag(Lag::Reads(1));
    let v3 = h.sim.put_entity(&entity, "Company", name("Third Ltd"));
    h.deliver(UPDATED, &entity).await;
    h.deliver(UPDATED, &entity).await;
    h.drain().await;
    assert_eq!(
        h.stored_version(&entity),
        Some(v2),
        "newer than stored, yet not Fenergo's latest"
    );
    let report = h.worker.confirm_due_at(later(31)).await.unwrap();
    assert_eq!((report.confirmed, report.changed), (1, 1));
    assert_eq!(h.stored_version(&entity), Some(v3));
    assert_eq!(h.history(&entity), [v1, v2, v3]);
}

#[tokio::test]
async fn server_errors_before_a_stale_read_leave_the_stale_budget_intact() {
    let h = Harness::start(|_| {}).await;
    let (entity, v1) = h.sim.sample_entity(21);
    h.deliver("entitydata:created", &entity).await;
    h.drain().await;
    h.worker.confirm_due_at(later(31)).await.unwrap();
    h.sim.set_lag(Lag::Reads(1000));
    h.sim.put_entity(&entity, "Company", name("Renamed Ltd"));
    h.deliver_after_last_write(UPDATED, &entity).await;
    h.sim.set_faults(Faults {
        server_errors: 3,
        ..Faults::default()
    });
    // Step the clock until the first read gets past the 503s.
    let mut t = 0;
    while h.outbox_rows()[1].stale_reads == 0 {
        t += 30;
        assert!(t < 3600, "never got past the server errors");
        h.drain_at(later(t)).await;
    }
    let row = &h.outbox_rows()[1];
    assert_eq!(
        (row.status.as_str(), row.attempts, row.stale_reads),
        ("pending", 3, 1),
        "after three 503s the stale read is re-fetched, not accepted"
    );
    assert_eq!(row.last_status, Some(200));
    while h.outbox_rows()[1].status == "pending" {
        t += 30;
        assert!(t < 7200, "the stale read was never accepted");
        h.drain_at(later(t)).await;
    }
    let row = &h.outbox_rows()[1];
    assert_eq!((row.status.as_str(), row.stale_reads), ("done", 3));
    assert_eq!(h.stored_version(&entity), Some(v1));
    assert!(
        h.outcomes()
            .contains(&(UPDATED.to_owned(), "stale-accepted".to_owned()))
    );
    let stats = h.sim.stats();
    assert_eq!(
        (stats.entity_requests(), stats.bulk_reads),
        (1 + 3 + 4, 1),
        "first sync and its confirmation, three 503s, four stale reads"
    );
}

#[tokio::test]
async fn tokens_shorter_lived_than_the_refresh_margin_are_reused() {
    let config = SimConfig {
        token_ttl: Duration::from_secs(20),
        ..sim_config()
    };
    let h = Harness::start_with(config, |_| {}).await;
    for index in 0..20 {
        let (entity, _) = h.sim.sample_entity(40 + index);
        h.deliver("entitydata:created", &entity).await;
        h.drain().await;
    }
    let stats = h.sim.stats();
    assert_eq!(stats.entity_requests(), 20);
    assert!(
        stats.token_requests <= 2,
        "{} token requests for 20 reads with 20 s tokens",
        stats.token_requests
    );
}

#[tokio::test]
async fn confirmations_are_batched_a_hundred_entities_per_call() {
    let h = Harness::start(|_| {}).await;
    let n = 150;
    for index in 0..n {
        let (entity, _) = h.sim.sample_entity(200 + index);
        h.deliver("entitydata:created", &entity).await;
    }
    h.drain().await;
    assert_eq!(h.worker.pending_confirmations().await.unwrap(), 150);
    let report = h.worker.confirm_due_at(later(31)).await.unwrap();
    assert_eq!(report.bulk_calls, n.div_ceil(100));
    assert_eq!((report.confirmed, report.single_reads), (n, 0));
    let stats = h.sim.stats();
    assert_eq!(
        (
            stats.bulk_reads,
            stats.bulk_read_ids,
            stats.entity_requests()
        ),
        (2, 150, 150)
    );
    assert_eq!(h.worker.pending_confirmations().await.unwrap(), 0);
    let unconfirmed: i64 = h
        .reporting()
        .query_row(
            "SELECT count(*) FROM entity WHERE confirmed_at IS NULL",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(unconfirmed, 0);
}

#[tokio::test]
async fn omitted_ids_and_a_missing_bulk_read_fall_back_to_single_reads() {
    let h = Harness::start(|_| {}).await;
    let entities: Vec<String> = (0..3).map(|i| h.sim.sample_entity(60 + i).0).collect();
    for entity in &entities {
        h.deliver("entitydata:created", entity).await;
    }
    h.drain().await;
    // Gone from Fenergo since: the bulk read omits it, its single read is a 404.
    assert!(h.sim.delete_entity(&entities[0]));
    let report = h.worker.confirm_due_at(later(31)).await.unwrap();
    assert_eq!(
        (report.confirmed, report.bulk_calls, report.single_reads),
        (2, 1, 1)
    );
    assert_eq!(h.worker.pending_confirmations().await.unwrap(), 0);

    let h = Harness::start(|_| {}).await;
    h.sim.set_faults(Faults {
        no_bulk_read: true,
        ..Faults::default()
    });
    for index in 0..3 {
        let (entity, _) = h.sim.sample_entity(70 + index);
        h.deliver("entitydata:created", &entity).await;
    }
    h.drain().await;
    let report = h.worker.confirm_due_at(later(31)).await.unwrap();
    assert_eq!(
        (report.confirmed, report.bulk_calls, report.single_reads),
        (3, 1, 3)
    );
}

#[tokio::test]
async fn pending_confirmations_survive_a_restart_and_serve_newer_notifications() {
    let h = Harness::start(|_| {}).await;
    let entity = "c0ffee00-0000-4000-8000-000000000002";
    let (first, second) = update_twice_inside_the_lag(&h, entity);
    h.deliver(UPDATED, entity).await;
    h.drain().await;
    assert_eq!(h.stored_version(entity), Some(first));

    h.sim.set_lag(Lag::None);
    let (other, _) = h.sim.sample_entity(80);
    h.deliver("entitydata:created", &other).await;
    h.drain().await;
    // Another notification while its confirmation is pending: served by that confirmation
    // (moved to this notification's window), not by a fetch as well.
    h.deliver(UPDATED, &other).await;
    h.drain().await;
    assert_eq!(h.sim.stats().fetches(&other), 1);
    assert_eq!(h.worker.pending_confirmations().await.unwrap(), 2);
    assert!(
        h.outcomes()
            .contains(&(UPDATED.to_owned(), "confirmation-pending".to_owned()))
    );

    let (restarted, metrics) = new_worker_with_metrics(&h.settings);
    assert_eq!(restarted.pending_confirmations().await.unwrap(), 2);
    let report = restarted.confirm_due_at(later(31)).await.unwrap();
    assert_eq!(
        (report.confirmed, report.changed, report.bulk_calls),
        (2, 1, 1)
    );
    assert_eq!(h.stored_version(entity), Some(second));
    assert_eq!(restarted.pending_confirmations().await.unwrap(), 0);
    let text = metrics.encode(fenx_sync::telemetry::Exposition::Prometheus);
    assert!(
        text.contains(r#"fenx_confirmations_total{result="changed"} 1"#),
        "{text}"
    );
    assert!(
        text.contains(r#"fenx_confirmations_total{result="unchanged"} 1"#),
        "{text}"
    );
}

#[tokio::test]
async fn a_busy_reporting_store_releases_the_entity_without_counting_an_attempt() {
    let h = Harness::start(|_| {}).await;
    let (entity, version) = h.sim.sample_entity(81);
    h.deliver("entitydata:created", &entity).await;
    let blocker = h.reporting();
    blocker.execute_batch("BEGIN EXCLUSIVE").unwrap();
    // The step waits out the store's busy timeout, then gives the rows back.
    h.drain().await;
    let row = &h.outbox_rows()[0];
    assert_eq!((row.status.as_str(), row.attempts), ("pending", 0));
    assert!(
        row.last_error
            .as_deref()
            .unwrap()
            .contains("reporting store"),
        "{:?}",
        row.last_error
    );
    blocker.execute_batch("COMMIT").unwrap();
    // Due again within seconds, and not leased any more: another worker takes it.
    let other = new_worker(&h.settings);
    while other.run_once_at("other", later(3)).await.unwrap() != fenx_sync::worker::Step::Idle {}
    assert_eq!(h.stored_version(&entity), Some(version));
    assert_eq!(h.outbox_rows()[0].status, "done");
}

#[tokio::test]
async fn an_entity_fenergo_no_longer_lists_is_marked_absent_not_deleted() {
    let h = Harness::start(|_| {}).await;
    let entities: Vec<String> = (0..3).map(|i| h.sim.sample_entity(90 + i).0).collect();
    for entity in &entities {
        h.deliver("entitydata:created", entity).await;
    }
    h.drain().await;
    assert!(h.sim.delete_entity(&entities[1]));
    let metrics = Arc::new(Metrics::new());
    let client = Arc::new(FenergoClient::new(&h.settings.fenergo, metrics).unwrap());
    let store = Arc::new(
        SqliteStore::open(
            &h.settings.store.reporting_path(),
            &h.settings.fenergo.tenant_id,
        )
        .unwrap(),
    );
    let reconciler = Reconciler::new(client, store, 2);
    let absent = || -> Vec<String> {
        let conn = h.reporting();
        let mut select = conn
            .prepare("SELECT entity_id FROM absent_entity ORDER BY entity_id")
            .unwrap();
        select
            .query_map([], |r| r.get(0))
            .unwrap()
            .map(Result::unwrap)
            .collect()
    };
    let run = reconciler
        .run(RunKind::Reconcile, false, |_| {})
        .await
        .unwrap();
    assert_eq!(run.counts.seen, 2);
    assert_eq!(absent(), [entities[1].clone()]);
    assert!(
        h.stored_version(&entities[1]).is_some(),
        "an absent entity is kept"
    );

    // Listed again (restored in Fenergo): no longer absent.
    h.sim
        .put_entity(&entities[1], "Company", name("Restored Ltd"));
    reconciler
        .run(RunKind::Reconcile, false, |_| {})
        .await
        .unwrap();
    assert!(absent().is_empty());
}

#[tokio::test]
async fn the_reconciliation_schedule_survives_a_restart_instead_of_starting_a_pass() {
    let h = Harness::start(|_| {}).await;
    let path = h.settings.store.reporting_path();
    let next_due = || -> Option<String> {
        h.reporting()
            .query_row(
                "SELECT value FROM sync_state WHERE key = 'reconcile.next_due_at'",
                [],
                |r| r.get(0),
            )
            .ok()
    };
    let start = || {
        let metrics = Arc::new(Metrics::new());
        let client = Arc::new(FenergoClient::new(&h.settings.fenergo, metrics.clone()).unwrap());
        let store = Arc::new(SqliteStore::open(&path, &h.settings.fenergo.tenant_id).unwrap());
        let (stop, stopping) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(
            Reconciler::new(client, store, 100)
                .with_metrics(metrics.clone())
                .run_on_schedule(
                    Duration::from_secs(24 * 60 * 60),
                    Arc::new(tokio::sync::Notify::new()),
                    stopping,
                ),
        );
        (stop, task, metrics)
    };
    let (stop, task, _) = start();
    let first = eventually("the schedule is recorded", || async { next_due() }).await;
    assert!(first > fenx_sync::time::format(later(23 * 60 * 60)));
    stop.send(true).unwrap();
    task.await.unwrap();

    // Restarted: once it is waiting (it says when for), the same due time and no pass started.
    let (stop, task, metrics) = start();
    let due = fenx_sync::time::parse(&first).unwrap();
    let waiting_for = eventually("the restarted schedule is waiting", || async {
        Some(metrics.reconcile_next_run.get()).filter(|&at| at > 0.0)
    })
    .await;
    assert_eq!(waiting_for, fenx_sync::telemetry::unix_seconds(due));
    stop.send(true).unwrap();
    task.await.unwrap();
    assert_eq!(next_due(), Some(first));
    let runs: i64 = h
        .reporting()
        .query_row("SELECT count(*) FROM reconcile_run", [], |r| r.get(0))
        .unwrap();
    assert_eq!(runs, 0);
    assert_eq!(h.sim.stats().list_pages, 0);
}
