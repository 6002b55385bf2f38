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
//! - [`sqlite`]: opening files with proven durability, schema sections, time format.
//! - [`telemetry`]: logs and Prometheus metrics; [`systemd`]: notify and watchdog.
//! - [`sim`]: the Fenergo simulator; [`demo`]: `fenx-sync demo`.
//!
//! # Invariants
//! - No code path answers 2xx before the outbox COMMIT returned at `synchronous=FULL`, and no
//!   polled batch is acknowledged before that.
//! - HTTP handlers never open SQLite themselves; only the outbox writer thread writes appends.
//! - The stored raw bytes are the bytes that were signed; JSON is never re-serialised.
//! - An older entity version never overwrites a newer one.

pub mod config;
pub mod demo;
pub mod fenergo;
pub mod http;
pub mod notification;
pub mod outbox;
pub mod poller;
pub mod reconcile;
pub mod signature;
pub mod sim;
pub mod sqlite;
pub mod store;
pub mod systemd;
pub mod telemetry;
pub mod worker;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::Settings;
use crate::fenergo::FenergoClient;
use crate::http::ConnectionLimits;
use crate::http::ingest::Ingress;
use crate::outbox::{Outbox, OutboxError, OutboxOptions};
use crate::poller::Poller;
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
/// admin endpoints on `listeners.admin`, and (when the Fenergo credentials are configured) the
/// sync worker and the poller. Then drains in-flight requests and their commits.
pub async fn run(
    settings: Settings,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
) -> Result<(), RunError> {
    let (outbox, writer) = Outbox::open(&settings.store.dir, &outbox_options(&settings))?;
    let metrics = Arc::new(telemetry::Metrics::new());
    let (stop, stopping) = watch::channel(false);
    let mut tasks = Vec::new();
    if let Some(listener) = listeners.admin {
        tracing::info!(admin = %local_addr(&listener), "serving /metrics");
        let admin = Arc::new(http::admin::Admin::new(
            metrics.clone(),
            settings.store.dir.clone(),
        ));
        tasks.push(tokio::spawn(http::serve(
            listener,
            admin,
            connection_limits(&settings),
            stopped(stopping.clone()),
        )));
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
        tasks.push(tokio::spawn(http::serve(
            listener,
            ingress,
            connection_limits(&settings),
            stopped(stopping.clone()),
        )));
    }
    if settings.sync.enabled || settings.polling.enabled {
        match settings.fenergo.missing().as_slice() {
            [] => {
                let client = Arc::new(FenergoClient::new(&settings.fenergo, metrics.clone())?);
                if settings.sync.enabled {
                    let worker =
                        Arc::new(SyncWorker::new(&settings, client.clone(), metrics.clone())?);
                    tracing::info!(workers = settings.sync.workers, api = %settings.fenergo.api_base, "sync worker started");
                    tasks.push(tokio::spawn(
                        worker.run(outbox.new_work(), stopping.clone()),
                    ));
                }
                if let Some(every) = settings.reconcile.schedule() {
                    let store = Arc::new(store::ReportingStore::open(
                        &settings.store.reporting_path(),
                    )?);
                    let reconciler = reconcile::Reconciler::new(
                        client.clone(),
                        store,
                        settings.reconcile.page_size,
                    );
                    tracing::info!(every = ?every, "scheduled reconciliation enabled");
                    tasks.push(tokio::spawn(
                        reconciler.run_on_schedule(every, stopping.clone()),
                    ));
                }
                if settings.polling.enabled {
                    let poller = Arc::new(Poller::new(client, outbox.clone(), &settings.polling));
                    tracing::info!(feeds = ?settings.polling.feeds, "polling Fenergo's notification feeds");
                    tasks.push(tokio::spawn(poller.run(stopping.clone())));
                }
            }
            missing => tracing::warn!(
                missing = %missing.join(", "),
                "sync worker and polling not started: Fenergo API credentials are not configured"
            ),
        }
    }
    tasks.push(tokio::spawn(systemd::watchdog(outbox, stopping.clone())));
    systemd::ready();
    shutdown.await;
    systemd::stopping();
    let _ = stop.send(true);
    for task in tasks {
        let _ = task.await;
    }
    let drained = tokio::task::spawn_blocking(move || writer.wait());
    if tokio::time::timeout(WRITER_DRAIN_TIMEOUT, drained)
        .await
        .is_err()
    {
        tracing::warn!(
            "outbox writer still busy at exit; unanswered requests were not acknowledged"
        );
    }
    tracing::info!("fenx-sync stopped");
    Ok(())
}

/// What stops fenx-sync from starting.
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

fn outbox_options(settings: &Settings) -> OutboxOptions {
    OutboxOptions {
        busy_timeout: settings.store.busy_timeout,
        max_batch: settings.store.max_batch,
        queue_capacity: settings.store.queue_capacity,
        enqueue_timeout: settings.store.busy_timeout,
    }
}

fn connection_limits(settings: &Settings) -> ConnectionLimits {
    ConnectionLimits {
        max_connections: settings.server.max_connections,
        header_read_timeout: settings.server.header_read_timeout,
        shutdown_grace: settings.server.shutdown_grace,
    }
}
