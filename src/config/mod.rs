//! Configuration: built-in defaults, then the TOML file, then `FENX_*` environment variables,
//! then secrets from files or systemd credentials, into one plain [`Settings`] struct.
//!
//! The sections are plain serde structs with their defaults (`listeners.rs`, `store.rs`,
//! `sync.rs`); `load.rs` reads the sources and is the only file that knows figment;
//! `validate.rs` checks the rules serde cannot express; `fields.rs` reads and writes the fields
//! that are not plain values (secrets, lists given as CSV). Everything else takes `Settings`
//! (tests build it in code). It must never print or log a secret: `Settings` serialises secrets
//! as redacted.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

mod fields;
mod listeners;
mod load;
mod store;
mod sync;
mod validate;

pub use listeners::{AdminSettings, ServerSettings, SignatureSettings, WebhookSettings};
pub use load::{DEFAULT_CONFIG_FILE, Sources};
pub use store::StoreSettings;
pub use sync::{FenergoSettings, PollingSettings, ReconcileSettings, RouteAction, SyncSettings};

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
