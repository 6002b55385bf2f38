//! systemd integration: `READY=1` once the outbox is open and the listeners are bound,
//! `STOPPING=1` on shutdown, and watchdog pings that only go out while the service is ready
//! (free space above `store.min_free_bytes`, a recent durable outbox write succeeded) and alive
//! (no write stuck past `store.wedged_after`), so a full disk, a read-only store or a wedged
//! writer gets the service restarted.
//!
//! Every call is a no-op without `NOTIFY_SOCKET` (containers, tests, a terminal). The watchdog
//! reads cached facts ([`StoreHealth`]); it never waits on the outbox itself.

use std::sync::Arc;
use std::time::Duration;

use sd_notify::NotifyState;
use tokio::sync::watch;

use crate::health::StoreHealth;

pub fn ready() {
    notify(&[
        NotifyState::Ready,
        NotifyState::Status("receiving and syncing"),
    ]);
}

pub fn stopping() {
    notify(&[NotifyState::Stopping, NotifyState::Status("draining")]);
}

/// The watchdog interval systemd asked for (`WATCHDOG_USEC`), if any.
pub fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled()
}

/// Pings the watchdog at half its interval while the store is ready and the writer alive,
/// until `stop`.
pub async fn watchdog(
    health: Arc<StoreHealth>,
    interval: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let period = interval / 2;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(period) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        match (health.readiness(), health.liveness()) {
            (Ok(()), Ok(())) => notify(&[NotifyState::Watchdog]),
            (Err(reason), _) => {
                tracing::warn!(%reason, "not ready; withholding the watchdog ping")
            }
            (_, Err(wedged)) => {
                tracing::error!(%wedged, "outbox writer wedged; withholding the watchdog ping")
            }
        }
    }
}

fn notify(states: &[NotifyState]) {
    if let Err(error) = sd_notify::notify(states) {
        tracing::warn!(%error, "cannot notify systemd");
    }
}
