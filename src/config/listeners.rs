//! The listener sections: `[server]` (the webhook listener's socket, limits and who may
//! connect), `[admin]` (metrics and probes), `[webhook]` (path, secrets, signature recipe).
//!
//! Plain data with defaults; it must never read the environment or files (that is `load.rs`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;
use secrecy::SecretString;
use serde::{Deserialize, Serialize};

use super::fields::{from_str, redact_secrets, secrets_from_list_or_csv, to_string};
use crate::signature::RecipeChoice;

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
