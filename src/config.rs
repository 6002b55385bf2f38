//! Configuration: built-in defaults, then the TOML file, then `FENX_*` environment variables,
//! then secrets from files or systemd credentials, into one plain [`Settings`] struct.
//!
//! This is the only module that knows figment. Everything else takes `Settings` (tests build it
//! in code). It must never print or log a secret: `Settings` serialises secrets as redacted.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Toml};
use figment::value::{Dict, Map, Value};
use figment::{Metadata, Profile, Provider};
use ipnet::IpNet;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::signature::RecipeChoice;

/// The file read when neither `--config` nor `FENX_CONFIG` names one (skipped if absent).
pub const DEFAULT_CONFIG_FILE: &str = "config/fenx-sync.toml";
const ENV_PREFIX: &str = "FENX_";

/// Keys whose environment values are taken verbatim: figment would otherwise turn a secret such
/// as `0123` into the number 123 or strip quotes from `"abc"`.
const VERBATIM_ENV_KEYS: [(&str, &str); 3] = [
    ("webhook.secrets", "FENX_WEBHOOK__SECRETS"),
    ("fenergo.client_secret", "FENX_FENERGO__CLIENT_SECRET"),
    ("store.reporting_url", "FENX_STORE__REPORTING_URL"),
];

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

/// A PostgreSQL URL, which may carry a password: `Debug` and serialisation show it redacted.
#[derive(Clone, Deserialize)]
#[serde(from = "String")]
pub struct DatabaseUrl(SecretString);

impl DatabaseUrl {
    pub fn expose(&self) -> &str {
        self.0.expose_secret()
    }

    /// Whether the URL itself carries a password.
    fn has_password(&self) -> bool {
        url::Url::parse(self.expose()).is_ok_and(|u| u.password().is_some())
    }

    /// The URL with its password replaced by `[redacted]`; text that is no URL is withheld.
    pub fn redacted(&self) -> String {
        match url::Url::parse(self.expose()) {
            Ok(mut url) => {
                if url.password().is_some() {
                    let _ = url.set_password(Some("REDACTED"));
                }
                url.to_string().replacen(":REDACTED@", ":[redacted]@", 1)
            }
            Err(_) => "[not a URL: withheld]".to_owned(),
        }
    }
}

impl From<String> for DatabaseUrl {
    fn from(url: String) -> DatabaseUrl {
        DatabaseUrl(SecretString::from(url))
    }
}

impl std::fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl Serialize for DatabaseUrl {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.redacted())
    }
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

/// Where configuration comes from, so tests and the CLI can name them without touching the
/// process environment.
#[derive(Debug, Clone, Default)]
pub struct Sources {
    /// `--config PATH`; falls back to `FENX_CONFIG`, then [`DEFAULT_CONFIG_FILE`] if present.
    pub file: Option<PathBuf>,
}

impl Sources {
    /// The file [`Settings::load`] reads: `--config`, else `FENX_CONFIG`, else
    /// [`DEFAULT_CONFIG_FILE`] if it exists; `None`: defaults and environment only.
    pub fn file_in_use(&self) -> Option<PathBuf> {
        self.file
            .clone()
            .or_else(|| std::env::var_os("FENX_CONFIG").map(PathBuf::from))
            .or_else(|| {
                Path::new(DEFAULT_CONFIG_FILE)
                    .is_file()
                    .then(|| PathBuf::from(DEFAULT_CONFIG_FILE))
            })
    }
}

impl Settings {
    /// Loads the configuration from its sources, resolves secret files, and checks the rules that
    /// serde cannot express. Errors name the key and where its value came from.
    pub fn load(sources: &Sources) -> Result<Settings, ConfigError> {
        let explicit = sources
            .file
            .clone()
            .or_else(|| std::env::var_os("FENX_CONFIG").map(PathBuf::from));
        let mut figment = Figment::new();
        match explicit {
            Some(path) if !path.is_file() => return Err(ConfigError::MissingFile(path)),
            Some(path) => figment = figment.merge(Toml::file_exact(path)),
            None if Path::new(DEFAULT_CONFIG_FILE).is_file() => {
                figment = figment.merge(Toml::file_exact(DEFAULT_CONFIG_FILE));
            }
            None => {}
        }
        let ignored: Vec<&str> = std::iter::once("config")
            .chain(VERBATIM_ENV_KEYS.iter().map(|(key, _)| *key))
            .collect();
        figment = figment
            .merge(
                Env::prefixed(ENV_PREFIX)
                    .split("__")
                    .ignore(&ignored)
                    // Only `SECTION__KEY` names are configuration: Kubernetes injects
                    // FENX_SYNC_SERVICE_HOST and the like for a Service named fenx-sync.
                    .filter(|key| key.as_str().contains('.')),
            )
            .merge(VerbatimEnv);
        let mut settings: Settings = figment
            .extract()
            .map_err(|e| ConfigError::Invalid(describe(e)))?;
        settings
            .resolve_secret_files(std::env::var_os("CREDENTIALS_DIRECTORY").map(PathBuf::from))?;
        settings.validate()?;
        Ok(settings)
    }

    /// Adds secrets from `webhook.secrets_file` and from systemd's credentials directory
    /// (credential `webhook-secrets`, one secret per line).
    fn resolve_secret_files(
        &mut self,
        credentials_dir: Option<PathBuf>,
    ) -> Result<(), ConfigError> {
        let webhook = secrets_from_files(
            "webhook.secrets_file",
            self.webhook.secrets_file.as_ref(),
            credentials_dir.as_ref(),
            "webhook-secrets",
        )?;
        self.webhook.secrets.extend(webhook);
        let client = secrets_from_files(
            "fenergo.client_secret_file",
            self.fenergo.client_secret_file.as_ref(),
            credentials_dir.as_ref(),
            "fenergo-client-secret",
        )?;
        if let Some(secret) = client.into_iter().next() {
            self.fenergo.client_secret = Some(secret);
        }
        // The URL's own password wins; the file before the credential.
        if self
            .store
            .reporting_url
            .as_ref()
            .is_some_and(|u| !u.has_password())
        {
            self.store.reporting_password = secrets_from_files(
                "store.reporting_password_file",
                self.store.reporting_password_file.as_ref(),
                credentials_dir.as_ref(),
                "reporting-db-password",
            )?
            .into_iter()
            .next();
        }
        Ok(())
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let rule = |key, message: &str| {
            Err(ConfigError::Rule {
                key,
                message: message.to_owned(),
            })
        };
        if !self.webhook.path.starts_with('/') {
            return rule("webhook.path", "must start with '/'");
        }
        if ["/healthz", "/readyz"].contains(&self.webhook.path.as_str()) {
            return rule("webhook.path", "must not be /healthz or /readyz");
        }
        if self.server.max_body_bytes == 0 {
            return rule("server.max_body_bytes", "must be greater than 0");
        }
        if self.server.max_connections == 0 {
            return rule("server.max_connections", "must be greater than 0");
        }
        if self.server.max_connections_per_client == 0 {
            return rule(
                "server.max_connections_per_client",
                "must be greater than 0",
            );
        }
        if self.server.max_inflight_body_bytes < self.server.max_body_bytes {
            return rule(
                "server.max_inflight_body_bytes",
                "must be at least server.max_body_bytes, or no body of the largest size fits",
            );
        }
        if self.store.max_batch == 0 || self.store.queue_capacity == 0 {
            return rule(
                "store.max_batch",
                "store.max_batch and store.queue_capacity must be greater than 0",
            );
        }
        if self.sync.workers == 0 {
            return rule("sync.workers", "must be at least 1");
        }
        if self.polling.enabled && self.polling.feeds.is_empty() {
            return rule("polling.feeds", "name at least one feed (or \"all\")");
        }
        if self.store.reporting_pool_size == 0 {
            return rule("store.reporting_pool_size", "must be at least 1");
        }
        if self.store.probe_interval.is_zero() {
            return rule("store.probe_interval", "must be greater than 0");
        }
        if self.store.wedged_after <= self.store.busy_timeout {
            return rule(
                "store.wedged_after",
                "must be longer than store.busy_timeout (waiting for the lock is not wedged)",
            );
        }
        if self.store.retention < Duration::from_secs(31 * 24 * 3600) {
            return rule(
                "store.retention",
                "must be at least 31 days: Fenergo re-delivers for 30 days, and a pruned id \
                 would be stored and processed again",
            );
        }
        if self
            .webhook
            .secrets
            .iter()
            .any(|s| s.expose_secret().is_empty())
        {
            return rule("webhook.secrets", "a secret is empty");
        }
        Ok(())
    }

    /// Checks what `serve` needs beyond a well-formed file: at least one webhook secret.
    pub fn require_webhook_secrets(&self) -> Result<(), ConfigError> {
        if self.webhook.secrets.is_empty() {
            return Err(ConfigError::Rule {
                key: "webhook.secrets",
                message:
                    "no webhook secret configured: set webhook.secrets, FENX_WEBHOOK__SECRETS, \
                          webhook.secrets_file, or the systemd credential webhook-secrets"
                        .into(),
            });
        }
        Ok(())
    }

    /// The effective configuration as TOML, secrets redacted (for `config check`).
    pub fn to_redacted_toml(&self) -> String {
        toml::to_string_pretty(self).expect("Settings always serialises")
    }
}

/// Says, for every problem figment found, which key, what is wrong, and where the value came
/// from (the file, or the exact environment variable to fix).
fn describe(error: figment::Error) -> String {
    error
        .into_iter()
        .map(|e| {
            let key = e.path.join(".");
            let origin = match e.metadata.as_ref().and_then(|m| m.source.as_ref()) {
                Some(figment::Source::File(path)) => format!(" in {}", path.display()),
                _ if e
                    .metadata
                    .as_ref()
                    .is_some_and(|m| m.name.contains("environment")) =>
                {
                    format!(
                        " from environment variable {ENV_PREFIX}{}",
                        e.path.join("__").to_uppercase()
                    )
                }
                _ => String::new(),
            };
            format!("{key}: {}{origin}", e.kind)
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// Provides the [`VERBATIM_ENV_KEYS`] from the environment as plain strings.
struct VerbatimEnv;

impl Provider for VerbatimEnv {
    fn metadata(&self) -> Metadata {
        Metadata::named("FENX_ environment variable")
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        let mut root = Dict::new();
        for (key, var) in VERBATIM_ENV_KEYS {
            if let Ok(value) = std::env::var(var) {
                let (section, leaf) = key.split_once('.').expect("keys are section.leaf");
                let mut inner = Dict::new();
                inner.insert(leaf.to_owned(), Value::from(value));
                root.insert(section.to_owned(), Value::from(inner));
            }
        }
        Ok(Profile::Default.collect(root))
    }
}

/// The secrets in `file` (the `key` setting) and in the systemd credential `credential`, one per
/// line, in that order.
fn secrets_from_files(
    key: &'static str,
    file: Option<&PathBuf>,
    credentials_dir: Option<&PathBuf>,
    credential: &str,
) -> Result<Vec<SecretString>, ConfigError> {
    let credential = credentials_dir
        .map(|dir| dir.join(credential))
        .filter(|p| p.is_file());
    let mut secrets = Vec::new();
    for path in file.into_iter().chain(credential.as_ref()) {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::SecretFile {
            key,
            path: path.clone(),
            source,
        })?;
        secrets.extend(secret_lines(&text));
    }
    Ok(secrets)
}

fn secret_lines(text: &str) -> impl Iterator<Item = SecretString> + '_ {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| SecretString::from(l.to_owned()))
}

/// Accepts a TOML list of strings or one comma-separated string (the environment's form).
fn secrets_from_list_or_csv<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Vec<SecretString>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum ListOrCsv {
        List(Vec<String>),
        Csv(String),
    }
    let items = match ListOrCsv::deserialize(d)? {
        ListOrCsv::List(list) => list,
        ListOrCsv::Csv(csv) => csv
            .split(',')
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .collect(),
    };
    Ok(items.into_iter().map(SecretString::from).collect())
}

fn optional_secret<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SecretString>, D::Error> {
    Ok(Option::<String>::deserialize(d)?
        .filter(|s| !s.is_empty())
        .map(SecretString::from))
}

fn redact_optional_secret<S: Serializer>(
    secret: &Option<SecretString>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match secret {
        Some(_) => s.serialize_str("[redacted]"),
        None => s.serialize_none(),
    }
}

fn redact_secrets<S: Serializer>(secrets: &[SecretString], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(secrets.iter().map(|_| "[redacted]"))
}

fn from_str<'de, D: Deserializer<'de>, T: std::str::FromStr<Err = String>>(
    d: D,
) -> Result<T, D::Error> {
    String::deserialize(d)?
        .parse()
        .map_err(serde::de::Error::custom)
}

fn to_string<S: Serializer, T: std::fmt::Display>(value: &T, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(value)
}

// Jail's closures must return figment's large error type.
#[allow(clippy::result_large_err)]
#[cfg(test)]
mod tests {
    use super::*;
    use figment::Jail;

    fn load_in(jail: &Jail, file: Option<&str>) -> Result<Settings, ConfigError> {
        let file = file.map(|f| jail.directory().join(f));
        Settings::load(&Sources { file })
    }

    #[test]
    fn defaults_apply_without_any_file() {
        Jail::expect_with(|jail| {
            let s = load_in(jail, None).unwrap();
            assert_eq!(s.server.listen.to_string(), "0.0.0.0:8080");
            assert_eq!(s.webhook.path, "/webhooks/fenergo");
            assert_eq!(s.store.dir, PathBuf::from("./data"));
            assert_eq!(s.webhook.signature.recipe, RecipeChoice::Auto);
            assert!(s.require_webhook_secrets().is_err());
            Ok(())
        });
    }

    #[test]
    fn environment_overrides_the_file_and_takes_secrets_as_csv_verbatim() {
        Jail::expect_with(|jail| {
            jail.create_file(
                "c.toml",
                "[server]\nlisten = \"127.0.0.1:1\"\n[webhook]\nsecrets = [\"from-file\"]\n",
            )?;
            jail.set_env("FENX_SERVER__LISTEN", "127.0.0.1:9000");
            jail.set_env("FENX_WEBHOOK__SECRETS", "0123, \"quoted\",s3");
            jail.set_env("FENX_STORE__DIR", "/tmp/x");
            jail.set_env("FENX_WEBHOOK__SIGNATURE__RECIPE", "sha256-hex/hex");
            let s = load_in(jail, Some("c.toml")).unwrap();
            assert_eq!(s.server.listen.to_string(), "127.0.0.1:9000");
            let secrets: Vec<&str> = s
                .webhook
                .secrets
                .iter()
                .map(|s| s.expose_secret())
                .collect();
            assert_eq!(secrets, ["0123", "\"quoted\"", "s3"]);
            assert_eq!(s.store.dir, PathBuf::from("/tmp/x"));
            assert_eq!(s.webhook.signature.recipe.to_string(), "sha256-hex/hex");
            Ok(())
        });
    }

    #[test]
    fn unrelated_fenx_variables_are_not_configuration() {
        Jail::expect_with(|jail| {
            jail.set_env("FENX_SYNC_SERVICE_HOST", "10.0.0.1");
            jail.set_env("FENX_SYNC_PORT", "tcp://10.0.0.1:8080");
            jail.set_env("FENX_TEST_POSTGRES_URL", "postgres://x");
            load_in(jail, None).unwrap();
            jail.set_env("FENX_SERVR__LISTEN", "127.0.0.1:1");
            let err = load_in(jail, None).unwrap_err().to_string();
            assert!(
                err.contains("servr"),
                "a typo in a section is still an error: {err}"
            );
            Ok(())
        });
    }

    #[test]
    fn a_bad_value_names_the_key_and_its_source() {
        Jail::expect_with(|jail| {
            jail.set_env("FENX_SERVER__LISTEN", "not-an-address");
            let err = load_in(jail, None).unwrap_err().to_string();
            assert!(
                err.contains("listen") && err.contains("FENX_SERVER__LISTEN"),
                "{err}"
            );
            Ok(())
        });
        Jail::expect_with(|jail| {
            jail.create_file("c.toml", "[webhook.signature]\nrecipe = \"md5\"\n")?;
            let err = load_in(jail, Some("c.toml")).unwrap_err().to_string();
            assert!(
                err.contains("recipe") && err.contains("c.toml") && err.contains("sha256-hex/hex"),
                "{err}"
            );
            Ok(())
        });
        Jail::expect_with(|jail| {
            jail.create_file("c.toml", "[server]\nlisen = \"x\"\n")?;
            let err = load_in(jail, Some("c.toml")).unwrap_err().to_string();
            assert!(err.contains("lisen"), "{err}");
            Ok(())
        });
        Jail::expect_with(|jail| {
            let err = load_in(jail, Some("missing.toml")).unwrap_err().to_string();
            assert!(
                err.contains("missing.toml") && err.contains("does not exist"),
                "{err}"
            );
            Ok(())
        });
    }

    #[test]
    fn limits_that_could_never_admit_a_request_are_refused() {
        Jail::expect_with(|jail| {
            jail.set_env("FENX_SERVER__MAX_INFLIGHT_BODY_BYTES", "1000");
            let err = load_in(jail, None).unwrap_err().to_string();
            assert!(err.contains("server.max_inflight_body_bytes"), "{err}");
            jail.set_env("FENX_SERVER__MAX_INFLIGHT_BODY_BYTES", "2000000");
            jail.set_env("FENX_SERVER__MAX_CONNECTIONS_PER_CLIENT", "0");
            let err = load_in(jail, None).unwrap_err().to_string();
            assert!(err.contains("server.max_connections_per_client"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn store_health_keys_have_defaults_and_refuse_unsafe_values() {
        Jail::expect_with(|jail| {
            let s = load_in(jail, None).unwrap();
            assert_eq!(s.store.min_free_bytes, 64 * 1024 * 1024);
            assert_eq!(s.store.retention, Duration::from_secs(90 * 24 * 3600));
            for (var, bad, key, good) in [
                (
                    "FENX_STORE__WEDGED_AFTER",
                    "5s",
                    "store.wedged_after",
                    "30s",
                ),
                (
                    "FENX_STORE__RETENTION",
                    "7days",
                    "store.retention",
                    "90days",
                ),
                (
                    "FENX_STORE__PROBE_INTERVAL",
                    "0s",
                    "store.probe_interval",
                    "2s",
                ),
            ] {
                jail.set_env(var, bad);
                let err = load_in(jail, None).unwrap_err().to_string();
                assert!(err.contains(key), "{var}={bad}: {err}");
                jail.set_env(var, good);
            }
            jail.set_env("FENX_STORE__MIN_FREE_BYTES", "1048576");
            jail.set_env("FENX_STORE__RETENTION", "40days");
            let s = load_in(jail, None).unwrap();
            assert_eq!(s.store.min_free_bytes, 1 << 20);
            assert_eq!(s.store.retention, Duration::from_secs(40 * 24 * 3600));
            Ok(())
        });
    }

    #[test]
    fn secrets_come_from_files_and_systemd_credentials() {
        Jail::expect_with(|jail| {
            jail.create_file("secrets.txt", "# rotated 2026-11\nfirst\n\n second \n")?;
            jail.create_dir("creds")?;
            jail.create_file("creds/webhook-secrets", "third\n")?;
            jail.set_env(
                "FENX_WEBHOOK__SECRETS_FILE",
                jail.directory().join("secrets.txt").display(),
            );
            jail.set_env(
                "CREDENTIALS_DIRECTORY",
                jail.directory().join("creds").display(),
            );
            let s = load_in(jail, None).unwrap();
            let secrets: Vec<&str> = s
                .webhook
                .secrets
                .iter()
                .map(|s| s.expose_secret())
                .collect();
            assert_eq!(secrets, ["first", "second", "third"]);
            jail.set_env("FENX_WEBHOOK__SECRETS_FILE", "/nonexistent/secret");
            let err = load_in(jail, None).unwrap_err().to_string();
            assert!(err.contains("/nonexistent/secret"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn the_reporting_password_comes_from_the_url_then_the_file_then_the_credential() {
        Jail::expect_with(|jail| {
            jail.create_file("pw.txt", "from-file\n")?;
            jail.create_dir("creds")?;
            jail.create_file("creds/reporting-db-password", "from-credential\n")?;
            let dir = jail.directory().to_owned();
            jail.set_env("CREDENTIALS_DIRECTORY", dir.join("creds").display());
            let password = |jail: &Jail| {
                load_in(jail, None)
                    .unwrap()
                    .store
                    .reporting_password
                    .map(|p| p.expose_secret().to_owned())
            };
            jail.set_env("FENX_STORE__REPORTING_URL", "postgresql://fenx@db/r");
            assert_eq!(password(jail).as_deref(), Some("from-credential"));
            jail.set_env(
                "FENX_STORE__REPORTING_PASSWORD_FILE",
                dir.join("pw.txt").display(),
            );
            assert_eq!(password(jail).as_deref(), Some("from-file"));
            jail.set_env("FENX_STORE__REPORTING_URL", "postgresql://fenx:in-url@db/r");
            assert_eq!(password(jail), None);
            let s = load_in(jail, None).unwrap();
            for shown in [s.to_redacted_toml(), format!("{s:?}")] {
                assert!(
                    !shown.contains("in-url") && !shown.contains("from-"),
                    "{shown}"
                );
                assert!(
                    shown.contains("postgresql://fenx:[redacted]@db/r"),
                    "{shown}"
                );
            }
            Ok(())
        });
    }

    #[test]
    fn redacted_output_never_contains_a_secret() {
        Jail::expect_with(|jail| {
            jail.set_env("FENX_WEBHOOK__SECRETS", "super-secret-value");
            let s = load_in(jail, None).unwrap();
            let text = s.to_redacted_toml();
            assert!(!text.contains("super-secret-value"), "{text}");
            assert!(
                text.contains("[redacted]") && text.contains("listen"),
                "{text}"
            );
            assert!(!format!("{s:?}").contains("super-secret-value"));
            Ok(())
        });
    }

    #[test]
    fn the_shipped_config_file_is_valid_and_documents_every_key() {
        Jail::expect_with(|_jail| {
            let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join(DEFAULT_CONFIG_FILE);
            let loaded = Settings::load(&Sources {
                file: Some(shipped.clone()),
            })
            .unwrap();
            assert_eq!(loaded.sync.routes, SyncSettings::default().routes);
            let text = std::fs::read_to_string(&shipped).unwrap();
            let effective: toml::Table =
                toml::from_str(&Settings::default().to_redacted_toml()).unwrap();
            assert_documented(&text, "", &effective);
            Ok(())
        });
    }

    fn assert_documented(text: &str, prefix: &str, table: &toml::Table) {
        for (key, value) in table {
            match value.as_table() {
                Some(inner) => {
                    let path = format!("{prefix}{key}");
                    assert!(
                        text.contains(&format!("[{path}]")),
                        "[{path}] is not in {DEFAULT_CONFIG_FILE}"
                    );
                    assert_documented(text, &format!("{path}."), inner);
                }
                None => assert!(
                    text.contains(&format!("{key} =")) || text.contains(&format!("\"{key}\" =")),
                    "{prefix}{key} is not documented in {DEFAULT_CONFIG_FILE}"
                ),
            }
        }
    }
}
