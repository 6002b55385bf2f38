//! Operator actions on the outbox, for the admin CLI: status counts, dead letters (list, show,
//! retry), replaying ignored notifications once a rule covers them, and queuing a re-sync of
//! named entities. Safe while the service runs (WAL; short `BEGIN IMMEDIATE` writes).
//!
//! It never creates an outbox (a missing file is an error that says where it looked) and never
//! deletes a row.

use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::{DateTime, Utc};
use rusqlite::{
    Connection, OpenFlags, OptionalExtension, TransactionBehavior, params, params_from_iter,
};
use serde::Serialize;

use super::NotificationStatus::{self, Dead, Done, Ignored, Pending};
use crate::notification::RESYNC_EVENT_TYPE;
use crate::signature::Recipe;
use crate::sqlite::{DbError, optional_time_column, time_column};

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("no outbox at {0}: check store.dir (has `fenx-sync serve` run with it?)")]
    Missing(PathBuf),
    #[error(
        "the outbox at {path} is busy (another process held its write lock for {waited:?}); try again"
    )]
    Locked { path: PathBuf, waited: Duration },
    #[error("outbox {path}: {source}")]
    Db {
        path: PathBuf,
        #[source]
        source: DbError,
    },
    #[error("no notification with id {0:?}")]
    NotFound(String),
}

/// Counts for `fenx-sync status`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Status {
    /// Rows per status, for the statuses that have any, in the order of their names.
    pub by_status: Vec<(NotificationStatus, i64)>,
    pub by_event_type: Vec<EventTypeCounts>,
    #[serde(serialize_with = "crate::time::serialize_option")]
    pub oldest_pending_received_at: Option<DateTime<Utc>>,
    pub oldest_pending_age_secs: Option<i64>,
    pub dead_letters: i64,
    #[serde(serialize_with = "crate::time::serialize_option")]
    pub last_sync_at: Option<DateTime<Utc>>,
    pub signature_recipes: Vec<(Recipe, i64)>,
    pub duplicates_received: i64,
}

impl Status {
    /// How many rows have `status`.
    pub fn count(&self, status: NotificationStatus) -> i64 {
        self.by_status
            .iter()
            .find(|(s, _)| *s == status)
            .map_or(0, |(_, n)| *n)
    }
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct EventTypeCounts {
    pub event_type: String,
    pub pending: i64,
    pub done: i64,
    pub ignored: i64,
    pub dead: i64,
}

/// One row as the CLI shows it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct NotificationRow {
    pub id: String,
    pub event_type: Option<String>,
    pub entity_key: Option<String>,
    pub status: NotificationStatus,
    pub attempts: i64,
    pub last_status: Option<i64>,
    pub last_error: Option<String>,
    #[serde(serialize_with = "crate::time::serialize")]
    pub received_at: DateTime<Utc>,
    #[serde(serialize_with = "crate::time::serialize_option")]
    pub processed_at: Option<DateTime<Utc>>,
    #[serde(serialize_with = "crate::time::serialize")]
    pub next_attempt_at: DateTime<Utc>,
    pub relative_url: Option<String>,
    pub source: String,
    pub signature_recipe: Option<Recipe>,
    /// The raw bytes as text (lossy for non-UTF-8), only for `show`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub raw: Option<String>,
}

/// Which dead letters to retry.
#[derive(Debug, Clone)]
pub enum Selection {
    Ids(Vec<String>),
    EventType(String),
    All,
}

pub struct OutboxAdmin {
    conn: Connection,
    file: OpenedFile,
}

/// Which file the connection is to and how long it waits for a lock: what an error names. Apart
/// from the connection so that errors can be built while a transaction borrows it.
struct OpenedFile {
    path: PathBuf,
    busy_timeout: Duration,
}

impl OpenedFile {
    /// Says "busy" for a lock held past the timeout; anything else is a database error.
    fn error(&self, e: rusqlite::Error) -> AdminError {
        if e.sqlite_error_code() == Some(rusqlite::ErrorCode::DatabaseBusy) {
            return AdminError::Locked {
                path: self.path.clone(),
                waited: self.busy_timeout,
            };
        }
        AdminError::Db {
            path: self.path.clone(),
            source: DbError::Sqlite(e),
        }
    }
}

const ROW_COLUMNS: &str = "id, event_type, entity_key, status, attempts, last_status, last_error,
     received_at, processed_at, next_attempt_at, relative_url, source, signature_recipe";

impl OutboxAdmin {
    /// Opens an existing `dir/outbox.db` (never creates one).
    pub fn open(dir: &Path, busy_timeout: Duration) -> Result<OutboxAdmin, AdminError> {
        let path = dir.join(super::FILE_NAME);
        if !path.is_file() {
            return Err(AdminError::Missing(path));
        }
        let db = |source: DbError| AdminError::Db {
            path: path.clone(),
            source,
        };
        let conn = Connection::open_with_flags(&path, OpenFlags::SQLITE_OPEN_READ_WRITE)
            .map_err(|e| db(DbError::Sqlite(e)))?;
        conn.busy_timeout(busy_timeout)
            .map_err(|e| db(DbError::Sqlite(e)))?;
        Ok(OutboxAdmin {
            conn,
            file: OpenedFile { path, busy_timeout },
        })
    }

    pub fn status(&self) -> Result<Status, AdminError> {
        let c = &self.conn;
        let run = || -> Result<Status, rusqlite::Error> {
            let by_event_type = c
                .prepare(
                    "SELECT coalesce(event_type, '(none)'),
                            sum(status = ?1), sum(status = ?2), sum(status = ?3), sum(status = ?4)
                       FROM notification GROUP BY 1 ORDER BY count(*) DESC, 1",
                )?
                .query_map(params![Pending, Done, Ignored, Dead], |r| {
                    Ok(EventTypeCounts {
                        event_type: r.get(0)?,
                        pending: r.get(1)?,
                        done: r.get(2)?,
                        ignored: r.get(3)?,
                        dead: r.get(4)?,
                    })
                })?
                .collect::<Result<_, _>>()?;
            let oldest = c.query_row(
                "SELECT min(received_at) FROM notification WHERE status = ?1",
                [Pending],
                |r| optional_time_column(r, 0),
            )?;
            let age = oldest.map(|t| (Utc::now() - t).num_seconds());
            Ok(Status {
                by_status: c
                    .prepare("SELECT status, count(*) FROM notification GROUP BY 1 ORDER BY 1")?
                    .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
                    .collect::<Result<_, _>>()?,
                by_event_type,
                oldest_pending_received_at: oldest,
                oldest_pending_age_secs: age,
                dead_letters: c.query_row(
                    "SELECT count(*) FROM notification WHERE status = ?1",
                    [Dead],
                    |r| r.get(0),
                )?,
                last_sync_at: c.query_row(
                    "SELECT max(processed_at) FROM notification WHERE status = ?1",
                    [Done],
                    |r| optional_time_column(r, 0),
                )?,
                signature_recipes: c
                    .prepare(
                        "SELECT signature_recipe, count(*) FROM notification
                          WHERE signature_recipe IS NOT NULL GROUP BY 1 ORDER BY 2 DESC",
                    )?
                    .query_map([], |r| Ok((recipe_column(r, 0)?, r.get(1)?)))?
                    .collect::<Result<_, _>>()?,
                duplicates_received: c.query_row(
                    "SELECT coalesce(sum(duplicates), 0) FROM notification",
                    [],
                    |r| r.get(0),
                )?,
            })
        };
        run().map_err(|e| self.file.error(e))
    }

    /// Dead letters, newest first.
    pub fn dead_letters(&self, limit: usize) -> Result<Vec<NotificationRow>, AdminError> {
        let sql = format!(
            "SELECT {ROW_COLUMNS}, NULL FROM notification WHERE status = ?2
              ORDER BY processed_at DESC, seq DESC LIMIT ?1"
        );
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.conn
            .prepare(&sql)
            .and_then(|mut s| s.query_map(params![limit, Dead], read_row)?.collect())
            .map_err(|e| self.file.error(e))
    }

    /// One notification, with its raw body.
    pub fn show(&self, id: &str) -> Result<NotificationRow, AdminError> {
        let sql = format!("SELECT {ROW_COLUMNS}, raw FROM notification WHERE id = ?1");
        self.conn
            .query_row(&sql, [id], read_row)
            .optional()
            .map_err(|e| self.file.error(e))?
            .ok_or_else(|| AdminError::NotFound(id.to_owned()))
    }

    /// Puts dead letters back in the queue, due now with a fresh attempt count. Returns how many.
    pub fn retry_dead(&mut self, selection: &Selection) -> Result<usize, AdminError> {
        let reset = format!(
            "UPDATE notification SET status = '{Pending}', attempts = 0, next_attempt_at = ?1,
                    last_error = NULL, processed_at = NULL
              WHERE status = '{Dead}'"
        );
        self.requeue(&reset, selection)
    }

    /// Puts ignored notifications of `event_type` (any casing) back in the queue, for when a
    /// routing rule now covers them. Returns how many.
    pub fn replay_ignored(&mut self, event_type: &str) -> Result<usize, AdminError> {
        let reset = format!(
            "UPDATE notification SET status = '{Pending}', next_attempt_at = ?1, processed_at = NULL
              WHERE status = '{Ignored}'"
        );
        self.requeue(&reset, &Selection::EventType(event_type.to_owned()))
    }

    fn requeue(&mut self, reset: &str, selection: &Selection) -> Result<usize, AdminError> {
        let now = crate::time::now();
        let (filter, values): (String, Vec<String>) = match selection {
            Selection::All => (String::new(), vec![now]),
            Selection::EventType(t) => (
                " AND lower(event_type) = lower(?2)".into(),
                vec![now, t.clone()],
            ),
            Selection::Ids(ids) => {
                let marks: Vec<String> = (0..ids.len()).map(|i| format!("?{}", i + 2)).collect();
                let values = std::iter::once(now).chain(ids.iter().cloned()).collect();
                (format!(" AND id IN ({})", marks.join(", ")), values)
            }
        };
        let sql = format!("{reset}{filter}");
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|e| self.file.error(e))?;
        let changed = tx
            .execute(&sql, params_from_iter(values.iter()))
            .and_then(|n| tx.commit().map(|()| n))
            .map_err(|e| self.file.error(e))?;
        Ok(changed)
    }

    /// Queues a fetch of every entity the worker ever stored (an outbox row `done` for it), for
    /// when the reporting store lost them, 500 per transaction. Returns how many entities.
    pub fn resync_synced_entities(&mut self) -> Result<usize, AdminError> {
        let entities: Vec<String> = self
            .conn
            .prepare(
                "SELECT DISTINCT entity_key FROM notification
                  WHERE status = ?1 AND entity_key IS NOT NULL AND instr(entity_key, '/') = 0",
            )
            .and_then(|mut s| s.query_map([Done], |r| r.get(0))?.collect())
            .map_err(|e| self.file.error(e))?;
        // Small transactions: webhook appends wait for the write lock between them, not for all.
        for chunk in entities.chunks(500) {
            self.resync(chunk)?;
        }
        Ok(entities.len())
    }

    /// Queues a fetch of each entity now, whatever happened before. Returns the new ids.
    pub fn resync(&mut self, entity_ids: &[String]) -> Result<Vec<String>, AdminError> {
        let now = crate::time::now();
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|e| self.file.error(e))?;
        let mut ids = Vec::with_capacity(entity_ids.len());
        for entity in entity_ids {
            let id = format!("resync:{entity}:{now}");
            let relative_url = crate::fenergo::entity_path(entity);
            let raw = serde_json::json!({
                "Id": id, "EventType": RESYNC_EVENT_TYPE, "RelativeUrl": relative_url, "When": now,
            })
            .to_string();
            tx.execute(
                "INSERT INTO notification (id, event_type, relative_url, entity_key, event_when, source,
                                           received_at, raw, next_attempt_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, 'resync', ?5, ?6, ?5)
                 ON CONFLICT (id) DO NOTHING",
                params![id, RESYNC_EVENT_TYPE, relative_url, entity, now, raw.as_bytes()],
            )
            .map_err(|e| self.file.error(e))?;
            ids.push(id);
        }
        tx.commit().map_err(|e| self.file.error(e))?;
        Ok(ids)
    }
}

/// Reads a stored signature recipe name.
fn recipe_column(r: &rusqlite::Row<'_>, idx: usize) -> rusqlite::Result<Recipe> {
    r.get::<_, String>(idx)?.parse().map_err(|e: String| {
        rusqlite::Error::FromSqlConversionFailure(idx, rusqlite::types::Type::Text, e.into())
    })
}

fn read_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<NotificationRow> {
    Ok(NotificationRow {
        id: r.get(0)?,
        event_type: r.get(1)?,
        entity_key: r.get(2)?,
        status: r.get(3)?,
        attempts: r.get(4)?,
        last_status: r.get(5)?,
        last_error: r.get(6)?,
        received_at: time_column(r, 7)?,
        processed_at: optional_time_column(r, 8)?,
        next_attempt_at: time_column(r, 9)?,
        relative_url: r.get(10)?,
        source: r.get(11)?,
        signature_recipe: r
            .get::<_, Option<String>>(12)?
            .map(|_| recipe_column(r, 12))
            .transpose()?,
        raw: r
            .get::<_, Option<Vec<u8>>>(13)?
            .map(|b| String::from_utf8_lossy(&b).into_owned()),
    })
}
