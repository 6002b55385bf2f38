//! The processing state of an outbox row, and its stored text.
//!
//! The `status` column holds the lower-case name (`pending`, `done`, `ignored`, `dead`): the
//! README cookbook, `schema.sql`'s partial indexes and operators' own SQL spell it out, so the
//! text must never change. Rust code names a state only through [`NotificationStatus`].

use std::fmt;

use rusqlite::types::{FromSql, FromSqlError, FromSqlResult, ToSql, ToSqlOutput, ValueRef};
use serde::Serialize;

/// Where a notification stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum NotificationStatus {
    /// Waiting for the worker (now or at `next_attempt_at`).
    Pending,
    /// Synced (or served without a fetch).
    Done,
    /// No routing rule covers its event type.
    Ignored,
    /// Out of attempts, or refused for good; waits for an operator.
    Dead,
}

impl NotificationStatus {
    pub const ALL: [NotificationStatus; 4] = [
        NotificationStatus::Pending,
        NotificationStatus::Done,
        NotificationStatus::Ignored,
        NotificationStatus::Dead,
    ];

    /// The stored text.
    pub fn as_str(self) -> &'static str {
        match self {
            NotificationStatus::Pending => "pending",
            NotificationStatus::Done => "done",
            NotificationStatus::Ignored => "ignored",
            NotificationStatus::Dead => "dead",
        }
    }

    fn from_stored(text: &str) -> Option<NotificationStatus> {
        Self::ALL.into_iter().find(|s| s.as_str() == text)
    }
}

impl fmt::Display for NotificationStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

impl ToSql for NotificationStatus {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::Borrowed(ValueRef::Text(
            self.as_str().as_bytes(),
        )))
    }
}

impl FromSql for NotificationStatus {
    fn column_result(value: ValueRef<'_>) -> FromSqlResult<Self> {
        let text = value.as_str()?;
        Self::from_stored(text).ok_or_else(|| {
            FromSqlError::Other(format!("unknown notification status {text:?}").into())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_status_reads_back_from_its_stored_text() {
        let conn = rusqlite::Connection::open_in_memory().unwrap();
        for status in NotificationStatus::ALL {
            let (text, back): (String, NotificationStatus) = conn
                .query_row("SELECT ?1, ?1", [status], |r| Ok((r.get(0)?, r.get(1)?)))
                .unwrap();
            assert_eq!((text.as_str(), back), (status.as_str(), status));
        }
        let unknown: rusqlite::Result<NotificationStatus> =
            conn.query_row("SELECT 'later'", [], |r| r.get(0));
        assert!(unknown.is_err());
    }
}
