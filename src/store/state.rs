//! Small facts the service records for operators and for itself (`sync_state`): whether
//! Fenergo refuses our credentials (read by `fenx-sync status`, a separate process), and when
//! the next scheduled reconciliation is due (so a restart does not start a full pass).
//!
//! It stores what it is given; it never decides what the facts mean.

use chrono::{DateTime, Utc};
use rusqlite::{OptionalExtension, params};

use super::{ReportingStore, StoreError};
use crate::time;

/// Which fact.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StateKey {
    /// Value: why the identity service refuses the client credentials; since: when it started.
    CredentialsRefused,
    /// Value: when the next scheduled reconciliation is due (RFC 3339).
    ReconcileNextDue,
}

impl StateKey {
    fn as_str(self) -> &'static str {
        match self {
            StateKey::CredentialsRefused => "fenergo.credentials_refused",
            StateKey::ReconcileNextDue => "reconcile.next_due_at",
        }
    }
}

/// A recorded fact.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateEntry {
    pub value: String,
    pub since: DateTime<Utc>,
}

impl ReportingStore {
    /// Records `value` for `key`, first true at `since`.
    pub fn put_state(
        &self,
        key: StateKey,
        value: &str,
        since: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        self.lock()
            .execute(
                "INSERT INTO sync_state (key, value, since, updated_at) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value, since = excluded.since,
                     updated_at = excluded.updated_at",
                params![key.as_str(), value, time::format(since), crate::time::now()],
            )
            .map(drop)
            .map_err(|source| self.error(format!("record {}", key.as_str()), source))
    }

    pub fn clear_state(&self, key: StateKey) -> Result<(), StoreError> {
        self.lock()
            .execute("DELETE FROM sync_state WHERE key = ?1", [key.as_str()])
            .map(drop)
            .map_err(|source| self.error(format!("clear {}", key.as_str()), source))
    }

    pub fn state(&self, key: StateKey) -> Result<Option<StateEntry>, StoreError> {
        self.lock()
            .query_row(
                "SELECT value, since FROM sync_state WHERE key = ?1",
                [key.as_str()],
                |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)),
            )
            .optional()
            .map(|found| {
                found.map(|(value, since)| StateEntry {
                    value,
                    since: since.parse().unwrap_or_default(),
                })
            })
            .map_err(|source| self.error(format!("read {}", key.as_str()), source))
    }
}
