//! Eventual-consistency lag for one entity ([`Record`]): which version a read sees while an
//! update is pending, for a time or for a number of reads. It must never show a version the
//! projection has not reached, and never count a peek as a read.

use chrono::{DateTime, Utc};
use tokio::time::Instant;

use crate::Lag;
use crate::entities::EntityJson;

/// One entity: its latest version, and what reads see while that version's lag lasts.
pub(crate) struct Record {
    pub(crate) version: i64,
    pub(crate) created: DateTime<Utc>,
    pub(crate) current: EntityJson,
    /// The version readers saw before the pending update (`None`: the entity is new).
    pub(crate) visible: Option<EntityJson>,
    pub(crate) pending: Option<Pending>,
}

/// How long the latest update stays invisible.
pub(crate) enum Pending {
    Until(Instant),
    Reads(u32),
}

impl Pending {
    pub(crate) fn start(lag: Lag, now: Instant) -> Option<Pending> {
        match lag {
            Lag::For(duration) if !duration.is_zero() => Some(Pending::Until(now + duration)),
            Lag::Reads(reads) if reads > 0 => Some(Pending::Reads(reads)),
            _ => None,
        }
    }

    fn active(&self, now: Instant) -> bool {
        match *self {
            Pending::Until(until) => now < until,
            Pending::Reads(left) => left > 0,
        }
    }
}

impl Record {
    /// Whether reads still see the version before the latest update (or nothing).
    pub(crate) fn lagging(&self, now: Instant) -> bool {
        self.pending.as_ref().is_some_and(|p| p.active(now))
    }

    /// What a read would get now, without counting as one.
    pub(crate) fn peek(&self, now: Instant) -> Option<&EntityJson> {
        if self.lagging(now) {
            self.visible.as_ref()
        } else {
            Some(&self.current)
        }
    }

    /// What a read gets now; a read while an update is pending uses up one lagging read.
    pub(crate) fn read(&mut self, now: Instant) -> Option<EntityJson> {
        let seen = self.peek(now).cloned();
        if let Some(Pending::Reads(left)) = &mut self.pending {
            *left = left.saturating_sub(1);
        }
        seen
    }
}
