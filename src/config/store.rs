//! The `[store]` section: where the outbox and reporting store live, and the outbox's write,
//! health and retention limits.
//!
//! Plain data with defaults; it must never read the environment or files (that is `load.rs`).

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

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
        }
    }
}
