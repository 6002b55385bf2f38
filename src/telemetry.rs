//! Telemetry: the log subscriber (JSON for containers or readable lines for a terminal, level
//! from `log.level` unless `RUST_LOG` is set) and the Prometheus metrics every component records
//! into ([`Metrics`], one registry per app instance so in-process tests can assert on it).
//!
//! Logs go to stderr so that command output on stdout stays clean. Nothing here may format a
//! secret or a request body, and no label may carry request-controlled text from an unsigned
//! request.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tracing_subscriber::EnvFilter;

use crate::config::{LogFormat, LogSettings};

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("invalid log filter {filter:?} (log.level or RUST_LOG): {source}")]
    Filter {
        filter: String,
        #[source]
        source: tracing_subscriber::filter::ParseError,
    },
}

/// Installs the global subscriber. Call once, at the binary's edge.
pub fn init(settings: &LogSettings) -> Result<(), TelemetryError> {
    let filter_text = std::env::var("RUST_LOG")
        .ok()
        .filter(|f| !f.trim().is_empty())
        .unwrap_or_else(|| settings.level.clone());
    let filter = EnvFilter::try_new(&filter_text).map_err(|source| TelemetryError::Filter {
        filter: filter_text,
        source,
    })?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // A second init (tests, embedding) keeps the first subscriber; that is fine.
    let _ = match settings.format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init(),
        LogFormat::Human => builder.try_init(),
    };
    Ok(())
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
    /// Seconds per Fenergo entity fetch.
    pub fetch_seconds: Histogram,
    /// 429 answers from Fenergo.
    pub rate_limited: Counter,
    /// Access tokens fetched from the identity service.
    pub token_refreshes: Counter,
    /// Notifications dead-lettered.
    pub dead_letters: Counter,
    /// Seconds from a notification's `When` to its entity row being written.
    pub sync_lag_seconds: Histogram,
    /// Outbox rows by status, read at scrape time.
    pub outbox_rows: Family<StatusLabel, Gauge>,
    /// Age in seconds of the oldest pending notification (0 when none), read at scrape time.
    pub oldest_pending_seconds: Gauge,
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
            credentials_refused: Gauge::default(),
            confirmations: Family::default(),
        };
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
            "Seconds per Fenergo entity fetch",
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
            "Notifications dead-lettered",
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
            "Age of the oldest pending notification",
            metrics.oldest_pending_seconds.clone(),
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

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("writing to a String cannot fail");
        text
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
