//! Configuration: built-in defaults, then the TOML file, then `FENX_*` environment variables,
//! then secrets from files or systemd credentials, into one plain [`Settings`] struct.
//!
//! This file holds what the configuration is: every section as a plain serde struct with its
//! defaults. `config/load.rs` reads the sources and is the only file that knows figment;
//! `config/validate.rs` checks the rules serde cannot express; `config/fields.rs` reads and
//! writes the fields that are not plain values (secrets, lists given as CSV). Everything else
//! takes `Settings` (tests build it in code). It must never print or log a secret: `Settings`
//! serialises secrets as redacted.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;
use secrecy::SecretString;
use serde::{Deserialize, Serialize};

use crate::signature::RecipeChoice;
use fields::{
    from_str, optional_secret, redact_optional_secret, redact_secrets, secrets_from_list_or_csv,
    to_string,
};

mod fields;
mod load;
mod validate;

pub use fields::DatabaseUrl;
pub use load::{DEFAULT_CONFIG_FILE, Sources};

/// The whole configuration. Every field has a default, so an empty file is valid.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    pub server: ServerSettings,
    pub admin: AdminSettings,
    pub webhook: WebhookSettings,
    pub store: StoreSettings,
    pub fenergo: FenergoSettings,
    pub sync: SyncSettings,
    pub polling: PollingSettings,
    pub reconcile: ReconcileSettings,
    pub log: LogSettings,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerSettings {
    /// Address the webhook listener binds.
    pub listen: SocketAddr,
    /// Most simultaneous connections; further ones wait in the kernel's accept queue.
    pub max_connections: usize,
    /// Most simultaneous connections from one peer address (IPv6: one /64); further ones from it
    /// are closed at accept. Peers in `trusted_proxies` are exempt (the cap cannot see `X-Forwarded-For`).
    pub max_connections_per_client: usize,
    /// Time a client has to send the request headers (also the idle keep-alive limit).
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// Time a client has to send the whole body once the headers are in.
    #[serde(with = "humantime_serde")]
    pub body_read_timeout: Duration,
    /// Largest accepted body; larger ones get 413.
    pub max_body_bytes: usize,
    /// Most body bytes held in memory across all requests at once; beyond it 503 + Retry-After.
    pub max_inflight_body_bytes: usize,
    /// Slowest acceptable body, in bytes per second after `min_body_rate_grace`; slower gets 408.
    /// 0 turns the rate check off (`body_read_timeout` still applies).
    pub min_body_rate: u64,
    /// Time a body may take before the rate check starts counting.
    #[serde(with = "humantime_serde")]
    pub min_body_rate_grace: Duration,
    /// Client networks allowed to post webhooks (empty: any). Others get 403.
    pub allow_networks: Vec<IpNet>,
    /// Reverse proxies whose `X-Forwarded-For` is trusted to name the real client.
    pub trusted_proxies: Vec<IpNet>,
    /// How long shutdown waits for in-flight requests before closing them.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
}

impl Default for ServerSettings {
    fn default() -> Self {
        ServerSettings {
            listen: "0.0.0.0:8080".parse().expect("valid literal"),
            max_connections: 4096,
            max_connections_per_client: 2048,
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(30),
            max_body_bytes: 1024 * 1024,
            max_inflight_body_bytes: 64 * 1024 * 1024,
            min_body_rate: 1024,
            min_body_rate_grace: Duration::from_secs(2),
            allow_networks: Vec::new(),
            trusted_proxies: Vec::new(),
            shutdown_grace: Duration::from_secs(20),
        }
    }
}

/// The admin listener: `/metrics` and `/healthz`, kept off the webhook address.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminSettings {
    pub enabled: bool,
    /// Loopback by default; expose it only to your monitoring network.
    pub listen: SocketAddr,
}

impl Default for AdminSettings {
    fn default() -> Self {
        AdminSettings {
            enabled: true,
            listen: "127.0.0.1:9090".parse().expect("valid literal"),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct WebhookSettings {
    /// Path Fenergo posts to.
    pub path: String,
    /// Webhook secrets as configured in Fenergo; several during rotation.
    #[serde(
        deserialize_with = "secrets_from_list_or_csv",
        serialize_with = "redact_secrets"
    )]
    pub secrets: Vec<SecretString>,
    /// A file with one secret per line, added to `secrets`.
    pub secrets_file: Option<PathBuf>,
    pub signature: SignatureSettings,
}

impl Default for WebhookSettings {
    fn default() -> Self {
        WebhookSettings {
            path: "/webhooks/fenergo".into(),
            secrets: Vec::new(),
            secrets_file: None,
            signature: SignatureSettings::default(),
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct SignatureSettings {
    /// `auto` (any candidate recipe) or one pinned recipe such as `sha256-hex/hex`.
    #[serde(deserialize_with = "from_str", serialize_with = "to_string")]
    pub recipe: RecipeChoice,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreSettings {
    /// Directory holding `outbox.db`.
    pub dir: PathBuf,
    /// How long a commit waits for SQLite's write lock before the request gets 503.
    #[serde(with = "humantime_serde")]
    pub busy_timeout: Duration,
    /// The most notifications in one group commit.
    pub max_batch: usize,
    /// Requests that may wait for the outbox writer at once.
    pub queue_capacity: usize,
    /// The reporting database; default `<dir>/reporting.db`.
    pub reporting_path: Option<PathBuf>,
    /// Below this many free bytes under `dir`, `/readyz` fails and webhooks get 503.
    pub min_free_bytes: u64,
    /// How often free space is measured and, when no group commit did lately, a probe row is
    /// committed; also how often `reporting.db` is checked for having been deleted or replaced.
    #[serde(with = "humantime_serde")]
    pub probe_interval: Duration,
    /// An outbox write in progress for longer than this fails `/healthz` (a wedged process).
    #[serde(with = "humantime_serde")]
    pub wedged_after: Duration,
    /// `done` and `ignored` outbox rows processed longer ago than this are pruned.
    #[serde(with = "humantime_serde")]
    pub retention: Duration,
    /// Entity versions (`entity_version`) stored longer ago than this are pruned, except each
    /// entity's current one; unset (the default) keeps every version.
    #[serde(with = "humantime_serde")]
    pub history_retention: Option<Duration>,
    /// A PostgreSQL URL: when set, the reporting store lives there and no `reporting.db` is
    /// written (the outbox stays in `dir`).
    pub reporting_url: Option<DatabaseUrl>,
    /// The PostgreSQL password, when the URL has none (before the systemd credential
    /// `reporting-db-password`).
    pub reporting_password_file: Option<PathBuf>,
    /// PEM trust anchors for `sslmode=verify-ca`/`verify-full`; default the system's.
    pub reporting_ca_file: Option<PathBuf>,
    /// Most connections to PostgreSQL at once.
    pub reporting_pool_size: usize,
    /// From `reporting_password_file` or the credential; never serialised.
    #[serde(skip)]
    pub reporting_password: Option<SecretString>,
}

impl StoreSettings {
    pub fn reporting_path(&self) -> PathBuf {
        self.reporting_path
            .clone()
            .unwrap_or_else(|| self.dir.join("reporting.db"))
    }
}

impl Default for StoreSettings {
    fn default() -> Self {
        StoreSettings {
            dir: PathBuf::from("./data"),
            busy_timeout: Duration::from_secs(5),
            max_batch: 512,
            queue_capacity: 4096,
            reporting_path: None,
            min_free_bytes: 64 * 1024 * 1024,
            probe_interval: Duration::from_secs(2),
            wedged_after: Duration::from_secs(30),
            retention: Duration::from_secs(90 * 24 * 3600),
            history_retention: None,
            reporting_url: None,
            reporting_password_file: None,
            reporting_ca_file: None,
            reporting_pool_size: 8,
            reporting_password: None,
        }
    }
}

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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One JSON object per line (containers, log shippers).
    Json,
    /// Readable lines (a terminal).
    Human,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogSettings {
    pub format: LogFormat,
    /// A tracing filter such as `info` or `fenx_sync=debug`; `RUST_LOG` overrides it.
    pub level: String,
}

impl Default for LogSettings {
    fn default() -> Self {
        LogSettings {
            format: LogFormat::Human,
            level: "info".into(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration file {0} does not exist")]
    MissingFile(PathBuf),
    #[error("invalid configuration: {0}")]
    Invalid(String),
    #[error("cannot read {key} from {path}: {source}")]
    SecretFile {
        key: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid configuration: {key}: {message}")]
    Rule { key: &'static str, message: String },
}

impl Settings {
    /// The effective configuration as TOML, secrets redacted (for `config check`).
    pub fn to_redacted_toml(&self) -> String {
        toml::to_string_pretty(self).expect("Settings always serialises")
    }
}

// Jail's closures must return figment's large error type.
#[allow(clippy::result_large_err)]
#[cfg(test)]
mod tests;
