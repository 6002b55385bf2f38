//! The sections about reaching Fenergo and keeping the store in step with it: `[fenergo]`,
//! `[sync]` (the worker, its retries and routing), `[polling]`, `[reconcile]`.
//!
//! Plain data with defaults; it must never read the environment or files (that is `load.rs`).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use secrecy::SecretString;

use super::fields::{optional_secret, redact_optional_secret};

/// How to reach Fenergo's query API and identity service.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct FenergoSettings {
    /// Base URL that notifications' `relativeUrl` is joined to, e.g. `https://api.fenergox.com`.
    pub api_base: String,
    /// OAuth2 token endpoint, e.g. `https://identity.fenergox.com/connect/token`.
    pub token_url: String,
    /// Sent as `X-TENANT-ID` on every call.
    pub tenant_id: String,
    pub client_id: String,
    #[serde(
        deserialize_with = "optional_secret",
        serialize_with = "redact_optional_secret"
    )]
    pub client_secret: Option<SecretString>,
    /// A file holding the client secret (first line), instead of `client_secret`.
    pub client_secret_file: Option<PathBuf>,
    /// Space-separated scopes for the token request.
    pub scope: String,
    /// Client-side limit on API calls per second (Fenergo SDLC tenants allow 50, production 200).
    pub requests_per_second: u32,
    /// Client-side limit on API calls in flight (SDLC burst 10, production 50).
    pub max_concurrent_requests: u32,
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// A token is renewed this long before its `expires_in` runs out.
    #[serde(with = "humantime_serde")]
    pub token_refresh_margin: Duration,
}

impl Default for FenergoSettings {
    fn default() -> Self {
        FenergoSettings {
            api_base: "https://api.fenergox.com".into(),
            token_url: "https://identity.fenergox.com/connect/token".into(),
            tenant_id: String::new(),
            client_id: String::new(),
            client_secret: None,
            client_secret_file: None,
            scope: "fenx.all".into(),
            requests_per_second: 50,
            max_concurrent_requests: 10,
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(30),
            token_refresh_margin: Duration::from_secs(60),
        }
    }
}

impl FenergoSettings {
    /// What is missing before the sync worker can call Fenergo (empty when ready).
    pub fn missing(&self) -> Vec<&'static str> {
        [
            ("fenergo.tenant_id", self.tenant_id.is_empty()),
            ("fenergo.client_id", self.client_id.is_empty()),
            ("fenergo.client_secret", self.client_secret.is_none()),
        ]
        .into_iter()
        .filter_map(|(key, missing)| missing.then_some(key))
        .collect()
    }
}

/// What the sync worker does with an event type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RouteAction {
    /// Fetch the entity the notification points at and upsert it into the reporting store.
    FetchEntity,
    /// Keep the notification, mark it ignored (replayable later).
    Ignore,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct SyncSettings {
    /// Run the sync worker inside `serve` (it also needs the `fenergo` keys).
    pub enabled: bool,
    /// Entities fetched concurrently.
    pub workers: usize,
    /// How long a worker holds an entity; a crashed worker's entities come back after this.
    #[serde(with = "humantime_serde")]
    pub lease: Duration,
    /// How often an idle worker looks for due notifications.
    #[serde(with = "humantime_serde")]
    pub idle_poll: Duration,
    /// How long a 404 right after an event is retried (eventual consistency) before dead-lettering.
    #[serde(with = "humantime_serde")]
    pub not_found_window: Duration,
    /// Re-fetches of a stale read (version not newer than stored although the event is newer)
    /// before the read is accepted.
    pub stale_retries: u32,
    #[serde(with = "humantime_serde")]
    pub stale_delay: Duration,
    /// A read taken less than this after the newest notification it serves arrived may predate
    /// that event (Fenergo is eventually consistent): it is stored at once and the entity is read
    /// again (in batches) once this has passed. `0s` turns confirmation reads off.
    #[serde(with = "humantime_serde")]
    pub confirm_after: Duration,
    /// Attempts on 5xx, timeouts and connection errors before dead-lettering.
    pub max_attempts: u32,
    /// First retry delay; doubles per attempt with jitter, up to `retry_max`.
    #[serde(with = "humantime_serde")]
    pub retry_base: Duration,
    #[serde(with = "humantime_serde")]
    pub retry_max: Duration,
    /// Event type (exact, any casing) or `domain:*` pattern → `fetch-entity` or `ignore`.
    /// Types no rule covers are ignored. Setting this table replaces the default one.
    pub routes: BTreeMap<String, RouteAction>,
}

impl Default for SyncSettings {
    fn default() -> Self {
        let fetch = [
            "entitydata:created",
            "entitydata:draftverified",
            "entitydata:dataPublished",
            "entitydata:migrated",
            "entitydata:migrationupdated",
        ];
        SyncSettings {
            enabled: true,
            workers: 4,
            lease: Duration::from_secs(120),
            idle_poll: Duration::from_millis(250),
            not_found_window: Duration::from_secs(15 * 60),
            stale_retries: 3,
            stale_delay: Duration::from_secs(10),
            confirm_after: Duration::from_secs(30),
            max_attempts: 12,
            retry_base: Duration::from_secs(2),
            retry_max: Duration::from_secs(10 * 60),
            routes: fetch
                .into_iter()
                .map(|t| (t.to_owned(), RouteAction::FetchEntity))
                .collect(),
        }
    }
}

/// Polling Fenergo's event notification feeds, for when webhooks cannot reach fenx-sync.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct PollingSettings {
    /// Poll inside `serve` (needs the `fenergo` keys). Webhooks may run at the same time: a
    /// notification arriving both ways is stored once.
    pub enabled: bool,
    /// Feeds to poll: `all`, or per source (`entitydata`, `journey`, `screening`, …).
    pub feeds: Vec<String>,
    /// Wait after a feed answered "nothing waiting" (204).
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// The longest back-off after polling errors.
    #[serde(with = "humantime_serde")]
    pub retry_max: Duration,
}

impl Default for PollingSettings {
    fn default() -> Self {
        PollingSettings {
            enabled: false,
            feeds: vec!["all".into()],
            interval: Duration::from_secs(30),
            retry_max: Duration::from_secs(5 * 60),
        }
    }
}

/// Backfill and the scheduled reconciliation against Fenergo's paged entity list.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReconcileSettings {
    /// Inside `serve`, compare the whole store with Fenergo this often and repair what is missing
    /// or behind, counted from the last recorded run (a restart does not start a pass); `0s`:
    /// never.
    #[serde(with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub every: Option<Duration>,
    /// Entities per page of the list.
    pub page_size: usize,
}

impl ReconcileSettings {
    /// The interval of the scheduled reconciliation; `None` when it is off (unset or `0s`).
    pub fn schedule(&self) -> Option<Duration> {
        self.every.filter(|every| !every.is_zero())
    }
}

impl Default for ReconcileSettings {
    fn default() -> Self {
        ReconcileSettings {
            every: Some(Duration::from_secs(24 * 60 * 60)),
            page_size: 100,
        }
    }
}
