//! The rules `Settings` must satisfy that serde cannot express (non-zero limits, one setting
//! longer than another, a path that is not a probe's), each refused with the key it is about.
//!
//! It must never change a setting: a rule either holds or names what to fix.

use std::time::Duration;

use secrecy::ExposeSecret;

use super::{ConfigError, Settings};

impl Settings {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
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
}
