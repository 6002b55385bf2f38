//! Telemetry: the Prometheus metrics every component records into ([`Metrics`], one registry
//! per app instance so in-process tests can assert on it, and the label sets they count by),
//! the log subscriber (`telemetry/logs.rs`: JSON for containers or readable lines for a
//! terminal, level from `log.level` unless `RUST_LOG` is set), and the text format a scrape gets
//! (`telemetry/exposition.rs`).
//!
//! Logs go to stderr so that command output on stdout stays clean, coloured only when stderr is
//! a terminal; JSON lines keep arrays as arrays. `/metrics` speaks the Prometheus text format
//! (0.0.4) unless the scraper asks for OpenMetrics. Nothing here may format a secret or a
//! request body, and no label may carry request-controlled text from an unsigned request.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::store::RunKind;
use exposition::openmetrics_to_prometheus;

mod exposition;
mod logs;

pub use exposition::Exposition;
pub use logs::{TelemetryError, init};

/// A duration as milliseconds rounded to the microsecond, for log fields (`latency_ms = 15.314`).
pub fn millis(duration: Duration) -> f64 {
    (duration.as_secs_f64() * 1_000_000.0).round() / 1000.0
}

/// Seconds since the Unix epoch, with the fraction, for `*_timestamp_seconds` gauges.
pub fn unix_seconds(at: chrono::DateTime<chrono::Utc>) -> f64 {
    at.timestamp_micros() as f64 / 1e6
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EventLabels {
    pub event_type: String,
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RecipeLabel {
    pub recipe: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabel {
    pub status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VersionLabel {
    pub version: String,
}

/// `backfill` or `reconcile` ([`crate::store::RunKind::as_str`]).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: String,
}

/// Every metric fenx-sync exports on `/metrics` (admin listener).
pub struct Metrics {
    registry: Registry,
    /// Webhook requests by outcome (`stored`, `duplicate`, `signature_mismatch`, `too_large`, …).
    pub webhook_requests: Family<OutcomeLabel, Counter>,
    /// Notifications received by event type and outcome (`stored` or `duplicate`).
    pub notifications_received: Family<EventLabels, Counter>,
    /// Rejected signatures by reason (`missing`, `empty`, `malformed`, `mismatch`).
    pub signature_failures: Family<ReasonLabel, Counter>,
    /// Accepted signatures by the recipe that matched (to pin `webhook.signature.recipe`).
    pub signature_recipes: Family<RecipeLabel, Counter>,
    /// Notifications settled by the sync worker, by event type and outcome.
    pub notifications_processed: Family<EventLabels, Counter>,
    /// Fenergo API responses by HTTP status (`error` for no response).
    pub api_responses: Family<StatusLabel, Counter>,
    /// Seconds per Fenergo API call of any kind (entity reads, list pages, polls, completions).
    pub fetch_seconds: Histogram,
    /// 429 answers from Fenergo.
    pub rate_limited: Counter,
    /// Access tokens fetched from the identity service.
    pub token_refreshes: Counter,
    /// Notifications dead-lettered.
    pub dead_letters: Counter,
    /// Seconds from a notification's `When` to its entity row being written.
    pub sync_lag_seconds: Histogram,
    /// Outbox rows by status (`pending`, `dead`), refreshed by the maintenance thread.
    pub outbox_rows: Family<StatusLabel, Gauge>,
    /// Age in seconds of the oldest pending notification (0 when none), refreshed likewise.
    pub oldest_pending_seconds: Gauge,
    /// Seconds from a webhook request's headers being read to its answer, any outcome.
    pub webhook_request_duration_seconds: Histogram,
    /// Seconds from a notification's arrival (outbox `received_at`) to its entity row stored.
    pub freshness_seconds: Histogram,
    /// 1, labelled with the running version.
    pub build_info: Family<VersionLabel, Gauge>,
    /// Unix time this process started, so "not in the last N hours" can allow for restarts.
    pub process_start_time_seconds: Gauge<f64, std::sync::atomic::AtomicU64>,
    /// 1 while a backfill or reconciliation runs in this process.
    pub reconcile_running: Family<KindLabel, Gauge>,
    /// Entities read from the list by the current (or last) run of each kind.
    pub reconcile_entities_seen: Family<KindLabel, Gauge>,
    /// What Fenergo says the list holds, as of the current (or last) run of each kind.
    pub reconcile_entities_listed: Family<KindLabel, Gauge>,
    /// Unix time the last run of each kind finished the whole list, in this process.
    pub reconcile_last_success: Family<KindLabel, Gauge<f64, std::sync::atomic::AtomicU64>>,
    /// Unix time the scheduled reconciliation is next due (0 without `reconcile.every`).
    pub reconcile_next_run: Gauge<f64, std::sync::atomic::AtomicU64>,
    /// 1 while `/readyz` answers 200, else 0.
    pub ready: Gauge,
    /// Free bytes on the filesystem under `store.dir`.
    pub store_free_bytes: Gauge,
    /// `done`/`ignored` outbox rows deleted after `store.retention`.
    pub outbox_pruned: Counter,
    /// Times `reporting.db` was found deleted or replaced and was reopened.
    pub reporting_store_reopened: Counter,
    /// 1 while the reporting store does not answer (checked every `store.probe_interval`).
    pub reporting_store_unavailable: Gauge,
    /// Indexes a bulk load dropped and has not built again yet (checked with the store).
    pub reporting_deferred_indexes: Gauge,
    /// 1 while Fenergo's identity service refuses our client credentials, else 0.
    pub credentials_refused: Gauge,
    /// Confirmation reads by result (`changed`: a newer version was found, `unchanged`).
    pub confirmations: Family<ResultLabel, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut metrics = Metrics {
            registry: Registry::with_prefix("fenx"),
            webhook_requests: Family::default(),
            notifications_received: Family::default(),
            signature_failures: Family::default(),
            signature_recipes: Family::default(),
            notifications_processed: Family::default(),
            api_responses: Family::default(),
            fetch_seconds: Histogram::new([
                0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ]),
            rate_limited: Counter::default(),
            token_refreshes: Counter::default(),
            dead_letters: Counter::default(),
            sync_lag_seconds: Histogram::new([
                0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
            ]),
            outbox_rows: Family::default(),
            oldest_pending_seconds: Gauge::default(),
            webhook_request_duration_seconds: Histogram::new([
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
            freshness_seconds: Histogram::new([
                0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
            ]),
            build_info: Family::default(),
            process_start_time_seconds: Gauge::default(),
            reconcile_running: Family::default(),
            reconcile_entities_seen: Family::default(),
            reconcile_entities_listed: Family::default(),
            reconcile_last_success: Family::default(),
            reconcile_next_run: Gauge::default(),
            ready: Gauge::default(),
            store_free_bytes: Gauge::default(),
            outbox_pruned: Counter::default(),
            reporting_store_reopened: Counter::default(),
            reporting_store_unavailable: Gauge::default(),
            reporting_deferred_indexes: Gauge::default(),
            credentials_refused: Gauge::default(),
            confirmations: Family::default(),
        };
        metrics
            .build_info
            .get_or_create(&VersionLabel {
                version: env!("CARGO_PKG_VERSION").to_owned(),
            })
            .set(1);
        metrics
            .process_start_time_seconds
            .set(unix_seconds(chrono::Utc::now()));
        // These series exist from the start, so a rate over them is 0 rather than absent, and a
        // last success of 0 means "none in this process", which an "overdue" alert must see.
        for kind in [RunKind::Backfill, RunKind::Reconcile] {
            let label = KindLabel {
                kind: kind.as_str().to_owned(),
            };
            metrics.reconcile_running.get_or_create(&label).set(0);
            metrics.reconcile_entities_seen.get_or_create(&label).set(0);
            metrics
                .reconcile_entities_listed
                .get_or_create(&label)
                .set(0);
            metrics
                .reconcile_last_success
                .get_or_create(&label)
                .set(0.0);
        }
        for result in ["changed", "unchanged"] {
            metrics
                .confirmations
                .get_or_create(&ResultLabel {
                    result: result.to_owned(),
                })
                .inc_by(0);
        }
        let r = &mut metrics.registry;
        r.register(
            "webhook_requests",
            "Webhook requests by outcome",
            metrics.webhook_requests.clone(),
        );
        r.register(
            "notifications_received",
            "Notifications received by event type and outcome",
            metrics.notifications_received.clone(),
        );
        r.register(
            "signature_failures",
            "Rejected webhook signatures by reason",
            metrics.signature_failures.clone(),
        );
        r.register(
            "signature_recipe_matches",
            "Accepted webhook signatures by recipe",
            metrics.signature_recipes.clone(),
        );
        r.register(
            "notifications_processed",
            "Notifications settled by the sync worker, by event type and outcome",
            metrics.notifications_processed.clone(),
        );
        r.register(
            "api_responses",
            "Fenergo API responses by HTTP status",
            metrics.api_responses.clone(),
        );
        r.register(
            "fetch_seconds",
            "Seconds per Fenergo API call of any kind: entity reads, list pages, polls, completions",
            metrics.fetch_seconds.clone(),
        );
        r.register(
            "rate_limited",
            "HTTP 429 answers from Fenergo",
            metrics.rate_limited.clone(),
        );
        r.register(
            "token_refreshes",
            "Access tokens fetched",
            metrics.token_refreshes.clone(),
        );
        r.register(
            "dead_letters",
            "Notifications dead-lettered by the sync worker",
            metrics.dead_letters.clone(),
        );
        r.register(
            "sync_lag_seconds",
            "Seconds from a notification's When to its entity row being written",
            metrics.sync_lag_seconds.clone(),
        );
        r.register(
            "outbox_rows",
            "Outbox rows by status",
            metrics.outbox_rows.clone(),
        );
        r.register(
            "oldest_pending_seconds",
            "Age in seconds of the oldest pending notification, 0 when none",
            metrics.oldest_pending_seconds.clone(),
        );
        r.register(
            "webhook_request_duration_seconds",
            "Seconds from a webhook request's headers to its answer, any outcome",
            metrics.webhook_request_duration_seconds.clone(),
        );
        r.register(
            "freshness_seconds",
            "Seconds from a notification's arrival to its entity row being stored",
            metrics.freshness_seconds.clone(),
        );
        r.register(
            "build_info",
            "Always 1, labelled with the fenx-sync version",
            metrics.build_info.clone(),
        );
        r.register(
            "process_start_time_seconds",
            "Unix time this fenx-sync process started",
            metrics.process_start_time_seconds.clone(),
        );
        r.register(
            "reconcile_running",
            "1 while a backfill or reconciliation runs in this process, by kind",
            metrics.reconcile_running.clone(),
        );
        r.register(
            "reconcile_entities_seen",
            "Entities read from Fenergo's list by the current or last run, by kind",
            metrics.reconcile_entities_seen.clone(),
        );
        r.register(
            "reconcile_entities_listed",
            "Entities Fenergo's list holds, as of the current or last run, by kind",
            metrics.reconcile_entities_listed.clone(),
        );
        r.register(
            "reconcile_last_success_timestamp_seconds",
            "Unix time the last run that walked the whole entity list finished, by kind",
            metrics.reconcile_last_success.clone(),
        );
        r.register(
            "reconcile_next_run_timestamp_seconds",
            "Unix time the scheduled reconciliation is next due, as recorded in the reporting store (0: no schedule)",
            metrics.reconcile_next_run.clone(),
        );
        r.register(
            "ready",
            "1 while /readyz answers 200 (free space above store.min_free_bytes and a recent durable outbox write succeeded), else 0",
            metrics.ready.clone(),
        );
        r.register(
            "store_free_bytes",
            "Free bytes on the filesystem holding store.dir",
            metrics.store_free_bytes.clone(),
        );
        r.register(
            "outbox_pruned",
            "Done and ignored outbox rows deleted after store.retention",
            metrics.outbox_pruned.clone(),
        );
        r.register(
            "reporting_store_reopened",
            "Times reporting.db was found deleted or replaced, reopened and re-synced",
            metrics.reporting_store_reopened.clone(),
        );
        r.register(
            "reporting_store_unavailable",
            "1 while the reporting store (SQLite or PostgreSQL) does not answer: rows wait, ingest continues",
            metrics.reporting_store_unavailable.clone(),
        );
        r.register(
            "reporting_deferred_indexes",
            "Indexes on property values a backfill into an empty store dropped and has not built yet: queries on them scan every row",
            metrics.reporting_deferred_indexes.clone(),
        );
        r.register(
            "fenergo_credentials_refused",
            "1 while Fenergo's identity service refuses the client credentials (sync is paused)",
            metrics.credentials_refused.clone(),
        );
        r.register(
            "confirmations",
            "Confirmation reads of provisionally stored entities, by whether the version changed",
            metrics.confirmations.clone(),
        );
        metrics
    }

    /// Every metric in the format `exposition` names.
    pub fn encode(&self, exposition: Exposition) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("writing to a String cannot fail");
        match exposition {
            Exposition::OpenMetrics => text,
            Exposition::Prometheus => openmetrics_to_prometheus(&text),
        }
    }

    pub fn count_webhook(&self, outcome: &str) {
        self.webhook_requests
            .get_or_create(&OutcomeLabel {
                outcome: outcome.to_owned(),
            })
            .inc();
    }

    pub fn count_event(
        family: &Family<EventLabels, Counter>,
        event_type: Option<&str>,
        outcome: &str,
    ) {
        family
            .get_or_create(&EventLabels {
                event_type: event_type.unwrap_or("(none)").to_owned(),
                outcome: outcome.to_owned(),
            })
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_text_names_counter_families_after_their_samples() {
        let metrics = Metrics::new();
        metrics.count_webhook("stored");
        metrics.fetch_seconds.observe(0.2);
        let text = metrics.encode(Exposition::Prometheus);
        assert!(text.contains(
            "# HELP fenx_webhook_requests_total Webhook requests by outcome.\n\
             # TYPE fenx_webhook_requests_total counter\n\
             fenx_webhook_requests_total{outcome=\"stored\"} 1\n"
        ));
        assert!(text.contains("# TYPE fenx_fetch_seconds histogram\n"));
        assert!(text.contains("fenx_fetch_seconds_bucket{le=\"0.25\"} 1\n"));
        assert!(!text.contains("# EOF") && !text.contains("# UNIT"));

        let openmetrics = metrics.encode(Exposition::OpenMetrics);
        assert!(openmetrics.contains("# TYPE fenx_webhook_requests counter\n"));
        assert!(openmetrics.ends_with("# EOF\n"));
    }
}
