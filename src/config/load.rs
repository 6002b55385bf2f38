//! Reading the configuration's sources in order: defaults, the TOML file, `FENX_*` environment
//! variables (secrets verbatim), then secret files and systemd credentials. Errors name the key
//! and where its value came from.
//!
//! The only file that knows figment. It must never log a value it reads.

use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Env, Format, Toml};
use figment::value::{Dict, Map, Value};
use figment::{Metadata, Profile, Provider};
use secrecy::SecretString;

use super::{ConfigError, Settings};

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
