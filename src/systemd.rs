//! systemd integration: `READY=1` once the outbox is open and the listeners are bound,
//! `STOPPING=1` on shutdown, and watchdog pings that only go out while the outbox can take a
//! write, so a wedged writer gets the service restarted.
//!
//! Every call is a no-op without `NOTIFY_SOCKET` (containers, tests, a terminal).

use sd_notify::NotifyState;
use tokio::sync::watch;

use crate::outbox::Outbox;

pub fn ready() {
    notify(&[
        NotifyState::Ready,
        NotifyState::Status("receiving and syncing"),
    ]);
}

pub fn stopping() {
    notify(&[NotifyState::Stopping, NotifyState::Status("draining")]);
}

/// Pings the watchdog at half its interval while the outbox proves writable, until `stop`.
pub async fn watchdog(outbox: Outbox, mut stop: watch::Receiver<bool>) {
    let Some(interval) = sd_notify::watchdog_enabled() else {
        return;
    };
    let period = interval / 2;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(period) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        match tokio::time::timeout(period, outbox.check_writable()).await {
            Ok(Ok(())) => notify(&[NotifyState::Watchdog]),
            Ok(Err(error)) => {
                tracing::warn!(%error, "outbox not writable; withholding the watchdog ping")
            }
            Err(_) => {
                tracing::warn!(waited = ?period, "outbox writer unresponsive; withholding the watchdog ping")
            }
        }
    }
}

fn notify(states: &[NotifyState]) {
    if let Err(error) = sd_notify::notify(states) {
        tracing::warn!(%error, "cannot notify systemd");
    }
}
