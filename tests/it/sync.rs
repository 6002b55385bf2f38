//! End to end: signed webhook → outbox → sync worker → reporting store, against the Fenergo
//! simulator, covering each failure class. The worker is stepped with `run_once_at` so retry
//! times are reached by moving the clock, not by sleeping.

use std::time::Duration;

use chrono::{DateTime, Utc};
use fenx_sim::{Faults, Lag, SimConfig, Simulator};
use fenx_sync::config::Settings;
use fenx_sync::fenergo::FenergoClient;
use fenx_sync::telemetry::Metrics;
use fenx_sync::worker::{Step, SyncWorker};
use rusqlite::Connection;

use crate::helpers::{TestApp, test_settings, wait_for};

const TENANT: &str = "45bf62ac-e4b1-4c16-ae32-d774cd18db6d";

/// An outbox row's processing state.
pub struct Row {
    pub id: String,
    pub status: String,
    pub attempts: i64,
    pub stale_reads: i64,
    pub last_status: Option<i64>,
    pub last_error: Option<String>,
}

pub struct Harness {
    pub app: TestApp,
    pub sim: Simulator,
    pub worker: SyncWorker,
    pub settings: Settings,
}

pub fn sim_config() -> SimConfig {
    SimConfig {
        tenant_id: TENANT.into(),
        client_id: "fenx-sync-test".into(),
        client_secret: "client-secret".into(),
        ..SimConfig::default()
    }
}

/// Points `settings` at `sim` with retry timings short enough for tests.
pub fn sync_settings(settings: &mut Settings, sim: &Simulator) {
    let f = &mut settings.fenergo;
    f.api_base = sim.api_base();
    f.token_url = sim.token_url();
    f.tenant_id = TENANT.into();
    f.client_id = "fenx-sync-test".into();
    f.client_secret = Some("client-secret".into());
    f.requests_per_second = 1000;
    f.max_concurrent_requests = 20;
    let s = &mut settings.sync;
    s.retry_base = Duration::from_secs(2);
    s.stale_delay = Duration::from_secs(5);
    s.idle_poll = Duration::from_millis(20);
}

impl Harness {
    /// Ingest runs as a service (sync disabled there); the worker is stepped by the test.
    pub async fn start(customise: impl FnOnce(&mut Settings)) -> Harness {
        Harness::start_with(sim_config(), customise).await
    }

    /// [`Harness::start`] against a simulator configured as given.
    pub async fn start_with(config: SimConfig, customise: impl FnOnce(&mut Settings)) -> Harness {
        let sim = Simulator::start(config).await;
        let app = TestApp::spawn_with(|s| s.sync.enabled = false).await;
        let mut settings = test_settings(app.dir.path());
        sync_settings(&mut settings, &sim);
        customise(&mut settings);
        let worker = new_worker(&settings);
        Harness {
            app,
            sim,
            worker,
            settings,
        }
    }

    pub async fn deliver(&self, event_type: &str, entity_id: &str) -> String {
        self.deliver_body(self.sim.notification(event_type, entity_id))
            .await
    }

    /// Delivers a notification whose `When` is a millisecond after our last write of
    /// `entity_id` (its `synced_at`): an event we have not seen yet, whatever the clock's
    /// resolution, so a read that is not newer is stale.
    pub async fn deliver_after_last_write(&self, event_type: &str, entity_id: &str) -> String {
        let synced_at: String = self
            .reporting()
            .query_row(
                "SELECT synced_at FROM entity WHERE entity_id = ?1",
                [entity_id],
                |r| r.get(0),
            )
            .unwrap();
        let when = fenx_sync::time::parse(&synced_at).unwrap() + chrono::Duration::milliseconds(1);
        self.deliver_body(self.sim.notification_at(event_type, entity_id, when))
            .await
    }

    async fn deliver_body(&self, body: String) -> String {
        let response = self.app.post_signed(&body).await;
        assert_eq!(response.status(), 200);
        body
    }

    /// Steps the worker at `now` until nothing is due; returns the steps that did something.
    pub async fn drain_at(&self, now: DateTime<Utc>) -> usize {
        let mut steps = 0;
        while let Step::Settled { .. } = self.worker.run_once_at("test-worker", now).await.unwrap()
        {
            steps += 1;
            assert!(steps < 10_000, "worker never went idle");
        }
        steps
    }

    pub async fn drain(&self) -> usize {
        self.drain_at(Utc::now()).await
    }

    pub fn reporting(&self) -> Connection {
        Connection::open(self.settings.store.reporting_path()).unwrap()
    }

    pub fn outbox_rows(&self) -> Vec<Row> {
        let conn = self.app.outbox();
        let mut stmt = conn
            .prepare(
                "SELECT id, status, attempts, stale_reads, last_status, last_error
                   FROM notification ORDER BY seq",
            )
            .unwrap();
        stmt.query_map([], |r| {
            Ok(Row {
                id: r.get(0)?,
                status: r.get(1)?,
                attempts: r.get(2)?,
                stale_reads: r.get(3)?,
                last_status: r.get(4)?,
                last_error: r.get(5)?,
            })
        })
        .unwrap()
        .map(Result::unwrap)
        .collect()
    }

    pub fn stored_version(&self, entity_id: &str) -> Option<i64> {
        self.reporting()
            .query_row(
                "SELECT version FROM entity WHERE entity_id = ?1",
                [entity_id],
                |r| r.get(0),
            )
            .ok()
    }

    pub fn history(&self, entity_id: &str) -> Vec<i64> {
        let conn = self.reporting();
        let mut stmt = conn
            .prepare("SELECT version FROM entity_version WHERE entity_id = ?1 ORDER BY version")
            .unwrap();
        stmt.query_map([entity_id], |r| r.get(0))
            .unwrap()
            .map(Result::unwrap)
            .collect()
    }

    pub fn outcomes(&self) -> Vec<(String, String)> {
        let conn = self.reporting();
        let mut stmt = conn
            .prepare(
                "SELECT coalesce(event_type, ''), outcome FROM sync_log ORDER BY notification_id",
            )
            .unwrap();
        stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .map(Result::unwrap)
            .collect()
    }
}

pub fn new_worker(settings: &Settings) -> SyncWorker {
    new_worker_with_metrics(settings).0
}

/// A worker and the metrics it reports to.
pub fn new_worker_with_metrics(settings: &Settings) -> (SyncWorker, std::sync::Arc<Metrics>) {
    let metrics = std::sync::Arc::new(Metrics::new());
    let client = FenergoClient::new(&settings.fenergo, metrics.clone()).unwrap();
    let store = fenx_sync::store::SqliteStore::open(
        &settings.store.reporting_path(),
        &settings.fenergo.tenant_id,
    )
    .unwrap();
    let worker = SyncWorker::new(
        settings,
        std::sync::Arc::new(store),
        std::sync::Arc::new(client),
        metrics.clone(),
    )
    .unwrap();
    (worker, metrics)
}

pub fn later(secs: i64) -> DateTime<Utc> {
    Utc::now() + chrono::Duration::seconds(secs)
}

#[tokio::test]
async fn a_verified_entity_lands_in_the_store_with_its_properties() {
    let h = Harness::start(|_| {}).await;
    let (entity, version) = h.sim.sample_entity(1);
    h.deliver("entitydata:draftverified", &entity).await;
    assert_eq!(h.drain().await, 1);

    assert_eq!(h.stored_version(&entity), Some(version));
    let conn = h.reporting();
    let properties: i64 = conn
        .query_row(
            "SELECT count(*) FROM entity_property WHERE entity_id = ?1",
            [&entity],
            |r| r.get(0),
        )
        .unwrap();
    assert!(properties > 0);
    let (event_type, last_id): (String, String) = conn
        .query_row(
            "SELECT last_event_type, last_notification_id FROM entity WHERE entity_id = ?1",
            [&entity],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!(event_type, "entitydata:draftverified");
    assert_eq!(h.outbox_rows()[0].id, last_id);
    assert_eq!(h.outbox_rows()[0].status, "done");
    assert_eq!(
        h.outcomes(),
        [("entitydata:draftverified".to_owned(), "synced".to_owned())]
    );

    let stats = h.sim.stats();
    assert_eq!(stats.token_requests, 1);
    assert_eq!(stats.requests_missing_correlation_id, 0);
    assert_eq!(stats.requests_missing_tenant, 0);
}

#[tokio::test]
async fn unknown_and_unrouted_event_types_are_ignored_not_errors() {
    let h = Harness::start(|_| {}).await;
    let (entity, _) = h.sim.sample_entity(2);
    h.deliver("journey:taskcompleted", &entity).await;
    h.deliver("brandnewdomain:somethinghappened", &entity).await;
    h.app.post_signed(r#"{"Id":"no-type"}"#).await;
    h.drain().await;
    let statuses: Vec<String> = h.outbox_rows().into_iter().map(|r| r.status).collect();
    assert_eq!(statuses, ["ignored", "ignored", "ignored"]);
    assert_eq!(
        h.sim.stats().entity_requests(),
        0,
        "ignored events cost no API call"
    );
    assert_eq!(h.stored_version(&entity), None);
}

#[tokio::test]
async fn a_404_right_after_the_event_is_retried_until_the_entity_appears() {
    let h = Harness::start(|_| {}).await;
    h.sim.set_lag(Lag::Reads(2));
    let (entity, version) = h.sim.sample_entity(3);
    h.deliver("entitydata:created", &entity).await;
    h.drain().await;
    let row = &h.outbox_rows()[0];
    assert_eq!(
        (row.status.as_str(), row.attempts, row.last_status),
        ("pending", 1, Some(404))
    );
    // Not due yet: nothing happens now.
    assert_eq!(h.drain().await, 0);
    h.drain_at(later(5)).await;
    h.drain_at(later(20)).await;
    assert_eq!(h.stored_version(&entity), Some(version));
    assert_eq!(h.outbox_rows()[0].status, "done");
}

#[tokio::test]
async fn a_404_past_the_window_is_dead_lettered_with_its_reason() {
    let h = Harness::start(|s| s.sync.not_found_window = Duration::from_secs(60)).await;
    h.deliver("entitydata:created", "never-created").await;
    h.drain().await;
    h.drain_at(later(120)).await;
    let row = &h.outbox_rows()[0];
    assert_eq!((row.status.as_str(), row.last_status), ("dead", Some(404)));
    assert!(
        row.last_error
            .as_deref()
            .unwrap()
            .contains("still not found")
    );
    assert_eq!(h.outcomes()[0].1, "dead");
}

#[tokio::test]
async fn a_stale_read_is_refetched_and_the_newer_version_wins() {
    let h = Harness::start(|_| {}).await;
    let (entity, v1) = h.sim.sample_entity(4);
    h.deliver("entitydata:created", &entity).await;
    h.drain().await;
    assert_eq!(h.stored_version(&entity), Some(v1));
    // Confirmed, so the next notification is fetched rather than left to a pending confirmation.
    h.worker.confirm_due_at(later(31)).await.unwrap();

    h.sim.set_lag(Lag::Reads(1));
    let v2 = h.sim.put_entity(
        &entity,
        "Company",
        serde_json::json!({"legalEntityName": {"type": "Single", "value": "Renamed Ltd"}}),
    );
    h.deliver_after_last_write("entitydata:draftverified", &entity)
        .await;
    h.drain().await;
    assert_eq!(
        h.stored_version(&entity),
        Some(v1),
        "stale read must not be taken as current"
    );
    assert_eq!(h.outbox_rows()[1].status, "pending");
    h.drain_at(later(10)).await;
    assert_eq!(h.stored_version(&entity), Some(v2));
    assert_eq!(h.history(&entity), [v1, v2]);
}

#[tokio::test]
async fn a_read_that_stays_stale_is_accepted_after_the_retries() {
    let h = Harness::start(|s| s.sync.stale_retries = 2).await;
    let (entity, v1) = h.sim.sample_entity(5);
    h.deliver("entitydata:created", &entity).await;
    h.drain().await;
    h.worker.confirm_due_at(later(31)).await.unwrap();
    h.sim.set_lag(Lag::Reads(100));
    h.sim.put_entity(&entity, "Company", serde_json::json!({}));
    h.deliver_after_last_write("entitydata:draftverified", &entity)
        .await;
    for step in 0..4 {
        h.drain_at(later(10 * step)).await;
    }
    assert_eq!(h.outbox_rows()[1].status, "done");
    assert_eq!(h.stored_version(&entity), Some(v1));
    assert!(h.outcomes().contains(&(
        "entitydata:draftverified".to_owned(),
        "stale-accepted".to_owned()
    )));
}

#[tokio::test]
async fn out_of_order_events_never_regress_the_store() {
    let h = Harness::start(|_| {}).await;
    let (entity, _) = h.sim.sample_entity(6);
    let an_hour_ago = Utc::now() - chrono::Duration::hours(1);
    let older = h
        .sim
        .notification_at("entitydata:created", &entity, an_hour_ago);
    let v2 = h.sim.put_entity(&entity, "Company", serde_json::json!({}));
    h.deliver("entitydata:draftverified", &entity).await;
    h.drain().await;
    assert_eq!(h.stored_version(&entity), Some(v2));
    // The older event arrives late; the store keeps v2.
    assert_eq!(h.app.post_signed(&older).await.status(), 200);
    h.drain().await;
    assert_eq!(h.stored_version(&entity), Some(v2));
    assert_eq!(h.history(&entity), [v2]);
}

#[tokio::test]
async fn a_burst_of_duplicates_for_one_entity_costs_one_fetch() {
    let h = Harness::start(|_| {}).await;
    let (entity, version) = h.sim.sample_entity(7);
    for _ in 0..50 {
        h.deliver("entitydata:draftverified", &entity).await;
    }
    assert_eq!(h.drain().await, 1);
    assert_eq!(h.sim.stats().entity_requests(), 1);
    assert!(h.outbox_rows().iter().all(|r| r.status == "done"));
    assert_eq!(h.history(&entity), [version]);
}

#[tokio::test]
async fn rate_limits_wait_as_asked_without_using_up_attempts() {
    let h = Harness::start(|_| {}).await;
    let (entity, version) = h.sim.sample_entity(8);
    h.sim.set_faults(Faults {
        rate_limited_requests: 1,
        retry_after: Some(Duration::from_secs(2)),
        ..Faults::default()
    });
    h.deliver("entitydata:created", &entity).await;
    h.drain().await;
    let row = &h.outbox_rows()[0];
    assert_eq!(
        (row.status.as_str(), row.attempts, row.last_status),
        ("pending", 0, Some(429))
    );
    assert_eq!(h.drain_at(later(1)).await, 0, "retried before Retry-After");
    h.drain_at(later(3)).await;
    assert_eq!(h.stored_version(&entity), Some(version));
}

#[tokio::test]
async fn server_errors_back_off_with_the_schedule_kept_in_the_outbox() {
    let h = Harness::start(|_| {}).await;
    let (entity, version) = h.sim.sample_entity(9);
    h.sim.set_faults(Faults {
        server_errors: 2,
        ..Faults::default()
    });
    h.deliver("entitydata:created", &entity).await;
    h.drain().await;
    let next: String = h
        .app
        .outbox()
        .query_row("SELECT next_attempt_at FROM notification", [], |r| r.get(0))
        .unwrap();
    assert!(
        next > fenx_sync::time::now(),
        "retry time is persisted in the row"
    );
    // A restarted worker (a new one on the same files) keeps the schedule.
    let restarted = new_worker(&h.settings);
    assert_eq!(
        restarted.run_once_at("w2", Utc::now()).await.unwrap(),
        Step::Idle
    );
    h.drain_at(later(10)).await;
    h.drain_at(later(60)).await;
    assert_eq!(h.stored_version(&entity), Some(version));
    assert_eq!(h.outbox_rows()[0].attempts, 3);
}

#[tokio::test]
async fn a_refusal_is_dead_lettered_with_status_and_excerpt() {
    let h = Harness::start(|s| s.fenergo.tenant_id = "another-tenant".into()).await;
    let (entity, _) = h.sim.sample_entity(10);
    h.deliver("entitydata:created", &entity).await;
    h.drain().await;
    let row = &h.outbox_rows()[0];
    assert_eq!((row.status.as_str(), row.last_status), ("dead", Some(403)));
    assert!(row.last_error.as_deref().unwrap().starts_with("HTTP 403"));
}

#[tokio::test]
async fn a_worker_killed_mid_fetch_is_replaced_after_its_lease() {
    let h = Harness::start(|s| s.sync.lease = Duration::from_secs(60)).await;
    let (entity, version) = h.sim.sample_entity(11);
    h.deliver("entitydata:created", &entity).await;
    h.sim.set_faults(Faults {
        latency: Duration::from_secs(5),
        ..Faults::default()
    });
    // The step is abandoned mid-fetch, as if the process died.
    let killed = tokio::time::timeout(
        Duration::from_millis(300),
        h.worker.run_once_at("doomed", Utc::now()),
    )
    .await;
    assert!(killed.is_err());
    h.sim.set_faults(Faults::default());
    assert_eq!(
        h.drain().await,
        0,
        "the entity is still leased to the dead worker"
    );
    h.drain_at(later(61)).await;
    assert_eq!(h.stored_version(&entity), Some(version));
    assert_eq!(h.history(&entity), [version]);
    let rows: i64 = h
        .reporting()
        .query_row(
            "SELECT count(*) FROM entity WHERE entity_id = ?1",
            [&entity],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(rows, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_expiring_mid_run_is_refreshed_once_for_all_workers() {
    let sim = Simulator::start(sim_config()).await;
    let app = TestApp::spawn_with(|s| {
        sync_settings(s, &sim);
        s.sync.workers = 8;
    })
    .await;
    let entities: Vec<(String, i64)> = (0..40).map(|i| sim.sample_entity(100 + i)).collect();
    let deliver = |batch: &[(String, i64)]| {
        let bodies: Vec<String> = batch
            .iter()
            .map(|(entity, _)| sim.notification("entitydata:created", entity))
            .collect();
        let app = &app;
        async move {
            for body in bodies {
                assert_eq!(app.post_signed(&body).await.status(), 200);
            }
        }
    };
    let done = "SELECT count(*) FROM notification WHERE status = 'done'";
    let outbox = app.dir.path().join("outbox.db");
    deliver(&entities[..20]).await;
    wait_for(&outbox, done, 20).await;
    sim.expire_tokens();
    deliver(&entities[20..]).await;
    wait_for(&outbox, done, 40).await;
    assert_eq!(
        sim.stats().token_requests,
        2,
        "one token, then exactly one refresh"
    );
    app.stop().await;
}
