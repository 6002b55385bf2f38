//! fenx-sync: a webhook receiver and data-sync sidecar for the Fenergo SaaS platform (FenX).
//!
//! # Layout (one module per concern; ARCHITECTURE.md draws the data flow)
//! - [`config`]: defaults → TOML → `FENX_*` env → secret files, into [`config::Settings`].
//! - [`signature`]: the candidate HMAC recipes and pure verification of `x-fenx-signature`.
//! - [`notification`]: tolerant, pure parsing of one notification or a batch.
//! - [`http`]: the hyper server ([`http::serve`]), the webhook/health routes
//!   ([`http::ingest::Ingress`]) and `/metrics` ([`http::admin`]); [`http::error`] maps every
//!   refusal to a status code.
//! - [`outbox`]: the group-commit writer over `outbox.db`, the worker's claims and leases, and the
//!   operator actions.
//! - [`poller`]: polling Fenergo's notification feeds into the outbox.
//! - [`worker`]: routing, one fetch per entity, failure classes, settling rows.
//! - [`fenergo`]: the query API client (tokens, rate limit, classified errors, wire types).
//! - [`store`]: the reporting database and its monotonic upsert.
//! - [`reconcile`]: backfill and reconciliation over the paged entity list.
//! - [`sqlite`]: opening files with proven durability, schema sections, reading stored times;
//!   [`time`]: the one format and parser of times; [`backoff`]: the one retry back-off.
//! - [`health`]: readiness and liveness as cached facts (free space, last durable write, a
//!   write in progress too long); [`supervisor`]: named tasks whose end stops the process.
//! - [`telemetry`]: logs and Prometheus metrics; [`systemd`]: notify and watchdog.
//! - [`demo`]: `fenx-sync demo` (feature `simulator`), on the Fenergo simulator, which is the
//!   separate crate `fenx-sim` (`sim/`) so that a production build holds none of it.
//!
//! # Invariants
//! - No code path answers 2xx before the outbox COMMIT returned at `synchronous=FULL`, and no
//!   polled batch is acknowledged before that.
//! - HTTP handlers never open SQLite themselves; only the outbox writer thread writes appends.
//! - `/readyz` (and the watchdog ping, and `fenx_ready`) is 200 only while free space under
//!   `store.dir` is at least `store.min_free_bytes` and the latest durable outbox write (a
//!   group commit or a probe commit) succeeded within the last two probe intervals plus the busy
//!   timeout and a second; appends are refused on low space before SQLite sees them.
//! - No long-running task or thread ends unnoticed: the first to end stops the process with an
//!   error.
//! - The stored raw bytes are the bytes that were signed; JSON is never re-serialised.
//! - An older entity version never overwrites a newer one.

pub mod backoff;
pub mod config;
#[cfg(feature = "simulator")]
pub mod demo;
pub mod fenergo;
pub mod health;
pub mod http;
pub mod notification;
pub mod outbox;
pub mod poller;
pub mod reconcile;
pub mod signature;
pub mod sqlite;
pub mod store;
pub mod supervisor;
pub mod systemd;
pub mod telemetry;
pub mod time;
pub mod worker;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{Notify, watch};

use crate::config::Settings;
use crate::fenergo::FenergoClient;
use crate::health::{HealthRules, StoreHealth};
use crate::http::ConnectionLimits;
use crate::http::ingest::Ingress;
use crate::outbox::admin::OutboxAdmin;
use crate::outbox::{
    MaintenanceOptions, MaintenanceThread, Outbox, OutboxError, OutboxOptions, WRITER_THREAD,
};
use crate::poller::Poller;
use crate::store::ReportingStore;
use crate::supervisor::{Ended, Ending, Supervisor};
use crate::worker::SyncWorker;

/// How long shutdown waits for the last group commit after the listener has drained.
const WRITER_DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Sockets bound by the caller (port 0 in tests): the webhook listener, and the admin listener
/// for `/metrics`. Either may be absent (`serve --sync-only`, `admin.enabled = false`).
#[derive(Default)]
pub struct Listeners {
    pub webhook: Option<TcpListener>,
    pub admin: Option<TcpListener>,
}

/// Runs fenx-sync until `shutdown` completes: the webhook receiver on `listeners.webhook`, the
/// admin endpoints on `listeners.admin`, the outbox writer and maintenance threads, and (when
/// the Fenergo credentials are configured) the sync worker, the poller, the reconciler and the
/// reporting store watch. Then drains in-flight requests and their commits.
///
/// Every one of those is supervised: if any ends or panics before `shutdown`, that is logged as
/// an ERROR naming it, everything drains as on shutdown, and the error is returned (so the
/// process exits non-zero and the service manager restarts it).
pub async fn run(
    settings: Settings,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
) -> Result<(), RunError> {
    let metrics = Arc::new(telemetry::Metrics::new());
    let health = Arc::new(StoreHealth::new(health_rules(&settings)));
    let (outbox, mut writer) = Outbox::open_with_health(
        &settings.store.dir,
        &outbox_options(&settings),
        health.clone(),
    )?;
    let mut maintenance = MaintenanceThread::start(
        &settings.store.dir,
        MaintenanceOptions {
            busy_timeout: settings.store.busy_timeout,
            probe_interval: settings.store.probe_interval,
            retention: settings.store.retention,
        },
        health.clone(),
        metrics.clone(),
    )?;
    let (stop, stopping) = watch::channel(false);
    let mut tasks = Supervisor::new();
    if let Some(listener) = listeners.admin {
        tracing::info!(admin = %local_addr(&listener), "serving /metrics");
        let admin = Arc::new(http::admin::Admin::new(metrics.clone(), health.clone()));
        tasks.spawn(
            "admin listener",
            http::serve(
                listener,
                admin,
                connection_limits(&settings),
                stopped(stopping.clone()),
            ),
        );
    }
    if let Some(listener) = listeners.webhook {
        tracing::info!(
            listen = %local_addr(&listener),
            path = %settings.webhook.path,
            store = %settings.store.dir.display(),
            recipe = %settings.webhook.signature.recipe,
            secrets = settings.webhook.secrets.len(),
            "fenx-sync receiving webhooks"
        );
        let ingress = Arc::new(Ingress::new(&settings, outbox.clone(), metrics.clone()));
        tasks.spawn(
            "webhook summary",
            ingress.clone().summarize(stopped(stopping.clone())),
        );
        tasks.spawn(
            "webhook listener",
            http::serve(
                listener,
                ingress,
                connection_limits(&settings),
                stopped(stopping.clone()),
            ),
        );
    }
    if settings.sync.enabled || settings.polling.enabled {
        match settings.fenergo.missing().as_slice() {
            [] => {
                let client = Arc::new(FenergoClient::new(&settings.fenergo, metrics.clone())?);
                let mut store = None;
                if settings.sync.enabled || settings.reconcile.schedule().is_some() {
                    let opened = store::open_for_service(&settings).await?;
                    tracing::info!(store = %opened.describe(), "reporting store open");
                    let deferring = opened.clone();
                    tokio::spawn(async move {
                        reconcile::build_deferred_indexes_unless_a_backfill_is_unfinished(
                            &*deferring,
                        )
                        .await
                    });
                    store = Some(opened);
                }
                if let (true, Some(store)) = (settings.sync.enabled, &store) {
                    let worker = Arc::new(SyncWorker::new(
                        &settings,
                        store.clone(),
                        client.clone(),
                        metrics.clone(),
                    )?);
                    tracing::info!(workers = settings.sync.workers, api = %settings.fenergo.api_base, "sync worker started");
                    tasks.spawn(
                        "sync worker pool",
                        worker.run(outbox.new_work(), stopping.clone()),
                    );
                }
                let reconcile_now = Arc::new(Notify::new());
                if let (Some(every), Some(store)) = (settings.reconcile.schedule(), &store) {
                    let reconciler = reconcile::Reconciler::new(
                        client.clone(),
                        store.clone(),
                        settings.reconcile.page_size,
                    )
                    .with_metrics(metrics.clone());
                    tracing::info!(every = ?every, "scheduled reconciliation enabled");
                    tasks.spawn(
                        "reconciler",
                        reconciler.run_on_schedule(every, reconcile_now.clone(), stopping.clone()),
                    );
                }
                if let Some(store) = store {
                    tasks.spawn(
                        "reporting store watch",
                        watch_reporting_store(
                            ReportingStoreWatch {
                                store,
                                history_retention: settings.store.history_retention,
                                outbox_dir: settings.store.dir.clone(),
                                busy_timeout: settings.store.busy_timeout,
                                every: settings.store.probe_interval,
                                reconcile_now,
                                metrics: metrics.clone(),
                            },
                            stopping.clone(),
                        ),
                    );
                }
                if settings.polling.enabled {
                    let poller = Arc::new(Poller::new(client, outbox.clone(), &settings.polling));
                    tracing::info!(feeds = ?settings.polling.feeds, "polling Fenergo's notification feeds");
                    tasks.spawn("poller", poller.run(stopping.clone()));
                }
            }
            missing => tracing::warn!(
                missing = %missing.join(", "),
                "sync worker and polling not started: Fenergo API credentials are not configured"
            ),
        }
    }
    if let Some(interval) = systemd::watchdog_interval() {
        tasks.spawn(
            "watchdog",
            systemd::watchdog(health.clone(), interval, stopping.clone()),
        );
    }
    systemd::ready();
    let thread_ended = |name: &str| Ended {
        task: name.to_owned(),
        ending: Ending::Returned,
    };
    let failure = tokio::select! {
        () = shutdown => None,
        ended = tasks.next_ended() => Some(ended),
        () = writer.ended() => Some(thread_ended(WRITER_THREAD)),
        () = maintenance.ended() => Some(thread_ended(outbox::MAINTENANCE_THREAD)),
    };
    if let Some(ended) = &failure {
        tracing::error!(
            task = %ended.task,
            "{ended}; draining in-flight requests, then exiting non-zero so that the service manager restarts fenx-sync"
        );
    }
    systemd::stopping();
    let _ = stop.send(true);
    tasks.join_all().await;
    drop(outbox);
    let drained = tokio::task::spawn_blocking(move || writer.wait());
    if tokio::time::timeout(WRITER_DRAIN_TIMEOUT, drained)
        .await
        .is_err()
    {
        tracing::warn!(
            "outbox writer still busy at exit; unanswered requests were not acknowledged"
        );
    }
    let _ = tokio::task::spawn_blocking(move || maintenance.stop()).await;
    match failure {
        Some(ended) => Err(RunError::TaskEnded(ended)),
        None => {
            tracing::info!("fenx-sync stopped");
            Ok(())
        }
    }
}

/// What stops fenx-sync from starting, or made it stop.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Outbox(#[from] OutboxError),
    #[error(transparent)]
    Client(#[from] fenergo::ClientError),
    #[error(transparent)]
    Worker(#[from] worker::WorkerError),
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error("stopped because a long-running task failed: {0}")]
    TaskEnded(Ended),
}

/// What the reporting store watch needs.
struct ReportingStoreWatch {
    store: Arc<dyn ReportingStore>,
    history_retention: Option<Duration>,
    outbox_dir: PathBuf,
    busy_timeout: Duration,
    every: Duration,
    reconcile_now: Arc<Notify>,
    metrics: Arc<telemetry::Metrics>,
}

/// Every `every`, checks that the reporting store answers (and, for SQLite, that `reporting.db`
/// is still the file it opened; the worker's writes check too), saying loudly when it does not
/// and when it is back. After the store was found replaced, queues a re-fetch of every entity
/// synced before and starts a reconciliation if one is scheduled, so the store is whole again.
/// Prunes history older than `store.history_retention`, when set.
async fn watch_reporting_store(watch: ReportingStoreWatch, mut stopping: watch::Receiver<bool>) {
    let mut seen = 0;
    let mut resync_owed = false;
    let mut available = true;
    let mut last_prune: Option<std::time::Instant> = None;
    loop {
        let reopened = match watch.store.check().await {
            Ok(check) => {
                if !available {
                    tracing::warn!(store = %watch.store.describe(), "the reporting store answers again; sync resumes");
                }
                available = true;
                watch.metrics.reporting_store_unavailable.set(0);
                check.reopened
            }
            Err(error) => {
                if available {
                    tracing::error!(%error, store = %watch.store.describe(), "the reporting store is unavailable; notifications stay pending and ingest continues");
                }
                available = false;
                watch.metrics.reporting_store_unavailable.set(1);
                seen
            }
        };
        if available {
            match watch.store.deferred_indexes().await {
                Ok(deferred) => {
                    let count = i64::try_from(deferred.len()).unwrap_or(i64::MAX);
                    watch.metrics.reporting_deferred_indexes.set(count);
                }
                Err(error) => tracing::warn!(%error, "cannot read which indexes are deferred"),
            }
        }
        if let Some(retention) = watch.history_retention
            && available
            && last_prune.is_none_or(|at| at.elapsed() >= HISTORY_PRUNE_EVERY)
        {
            last_prune = Some(std::time::Instant::now());
            let before = chrono::Utc::now() - worker::policy::to_chrono(retention);
            match watch.store.prune_history(before).await {
                Ok(0) => {}
                Ok(pruned) => {
                    tracing::info!(pruned, "pruned entity history past store.history_retention")
                }
                Err(error) => tracing::error!(%error, "cannot prune entity history"),
            }
        }
        if reopened > seen {
            watch
                .metrics
                .reporting_store_reopened
                .inc_by(reopened - seen);
            seen = reopened;
            resync_owed = true;
            watch.reconcile_now.notify_one();
        }
        if resync_owed {
            let (dir, busy_timeout) = (watch.outbox_dir.clone(), watch.busy_timeout);
            let queued = tokio::task::spawn_blocking(move || {
                OutboxAdmin::open(&dir, busy_timeout)?.resync_synced_entities()
            })
            .await;
            match queued {
                Ok(Ok(entities)) => {
                    resync_owed = false;
                    tracing::warn!(
                        entities,
                        "queued a re-sync of every entity synced before, to refill the reopened reporting store"
                    );
                }
                Ok(Err(error)) => {
                    tracing::error!(%error, "cannot queue the re-sync of the reopened reporting store; retrying")
                }
                Err(error) => tracing::error!(%error, "reporting store re-sync task failed"),
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(watch.every) => {}
            _ = stopping.wait_for(|stop| *stop) => return,
        }
    }
}

/// How often history past `store.history_retention` is pruned.
const HISTORY_PRUNE_EVERY: Duration = Duration::from_secs(3600);

fn health_rules(settings: &Settings) -> HealthRules {
    let store = &settings.store;
    HealthRules {
        min_free_bytes: store.min_free_bytes,
        wedged_after: store.wedged_after,
        // Without traffic a probe commits every probe_interval and may wait busy_timeout for
        // the lock; a proof older than two intervals plus that wait (and a second for a slow
        // fsync) means probing has stalled.
        write_proof_expires: store.probe_interval * 2 + store.busy_timeout + Duration::from_secs(1),
    }
}

/// Completes once the stop flag turns true.
async fn stopped(mut stopping: watch::Receiver<bool>) {
    let _ = stopping.wait_for(|stop| *stop).await;
}

fn local_addr(listener: &TcpListener) -> String {
    listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default()
}

/// How long a webhook may wait for room in the outbox writer's queue before it is answered 503.
/// Fenergo retries a 503, so waiting longer than a commit or two only holds its connection.
const ENQUEUE_TIMEOUT: Duration = Duration::from_secs(5);

fn outbox_options(settings: &Settings) -> OutboxOptions {
    OutboxOptions {
        busy_timeout: settings.store.busy_timeout,
        max_batch: settings.store.max_batch,
        queue_capacity: settings.store.queue_capacity,
        enqueue_timeout: ENQUEUE_TIMEOUT,
    }
}

fn connection_limits(settings: &Settings) -> ConnectionLimits {
    ConnectionLimits {
        max_connections: settings.server.max_connections,
        header_read_timeout: settings.server.header_read_timeout,
        shutdown_grace: settings.server.shutdown_grace,
    }
}
