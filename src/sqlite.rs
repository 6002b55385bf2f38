//! SQLite plumbing shared by the outbox and the reporting store: opening a file with the
//! durability it needs (and proving the pragmas took effect), applying its `schema.sql` section
//! idempotently with a recorded version, and reading back the times fenx-sync stored.
//!
//! It must never decide what a table means; that belongs to the module owning the file.

use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::{DateTime, Utc};
use rusqlite::{Connection, OpenFlags, OptionalExtension, Row, TransactionBehavior};

/// The whole schema file; each owner applies its own section.
const SCHEMA: &str = include_str!("../schema.sql");

/// How hard commits are pushed to disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// WAL + `synchronous=FULL`: a commit survives power loss (one fsync per commit).
    Full,
    /// WAL + `synchronous=NORMAL`: a commit survives a process crash; for data we can re-fetch.
    Normal,
}

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("cannot open {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error(
        "{path} is not durable: journal_mode={journal_mode}, synchronous={synchronous} \
         (need wal and {wanted}); WAL does not work on network filesystems such as NFS or SMB"
    )]
    NotDurable {
        path: PathBuf,
        journal_mode: String,
        synchronous: i64,
        wanted: i64,
    },
    #[error(
        "{path} has schema version {found}, newer than the {known} this fenx-sync knows; \
         run a newer fenx-sync"
    )]
    SchemaTooNew {
        path: PathBuf,
        found: i64,
        known: i64,
    },
    #[error("no section {0:?} in schema.sql")]
    NoSection(&'static str),
    #[error(transparent)]
    Sqlite(#[from] rusqlite::Error),
}

/// Reads column `idx`, a time fenx-sync stored with [`crate::time::format`]. Such columns are
/// written only by fenx-sync, so text that is not a time is an error, not a guess.
pub fn time_column(row: &Row<'_>, idx: usize) -> rusqlite::Result<DateTime<Utc>> {
    parse_time(idx, row.get(idx)?)
}

/// [`time_column`] of a nullable column.
pub fn optional_time_column(row: &Row<'_>, idx: usize) -> rusqlite::Result<Option<DateTime<Utc>>> {
    row.get::<_, Option<String>>(idx)?
        .map(|text| parse_time(idx, text))
        .transpose()
}

fn parse_time(idx: usize, text: String) -> rusqlite::Result<DateTime<Utc>> {
    crate::time::parse(&text).ok_or_else(|| {
        rusqlite::Error::FromSqlConversionFailure(
            idx,
            rusqlite::types::Type::Text,
            format!("not a stored time: {text:?}").into(),
        )
    })
}

/// The page size of a file [`open`] creates (an existing file keeps its own).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageSize {
    /// SQLite's 4 KiB: small rows, small commits (the outbox).
    Default,
    /// 16 KiB: rows of a few KB (an entity's JSON) share a page instead of taking one each,
    /// which halves the reporting store.
    Large,
}

/// Opens (creating if needed) a database file in WAL mode with the given durability, and reads
/// the pragmas back: they are per connection and silently ignored on some filesystems.
pub fn open(
    path: &Path,
    durability: Durability,
    page_size: PageSize,
    busy_timeout: Duration,
) -> Result<Connection, DbError> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|source| DbError::Open {
        path: path.to_owned(),
        source,
    })?;
    conn.busy_timeout(busy_timeout)?;
    // Takes effect only before the header is first written (switching to WAL writes it).
    if page_size == PageSize::Large {
        conn.pragma_update(None, "page_size", 16_384)?;
    }
    let wanted = match durability {
        Durability::Full => 2,
        Durability::Normal => 1,
    };
    let journal_mode: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?;
    conn.pragma_update(None, "synchronous", wanted)?;
    let synchronous: i64 = conn.query_row("PRAGMA synchronous", [], |r| r.get(0))?;
    if !journal_mode.eq_ignore_ascii_case("wal") || synchronous != wanted {
        return Err(DbError::NotDurable {
            path: path.to_owned(),
            journal_mode,
            synchronous,
            wanted,
        });
    }
    Ok(conn)
}

/// Applies the named `schema.sql` section and records its version. Idempotent; refuses a file
/// whose recorded version is newer than the section's.
pub fn apply_schema(
    conn: &mut Connection,
    path: &Path,
    section: &'static str,
) -> Result<i64, DbError> {
    apply_schema_then(conn, path, section, |_, _| Ok(()))
}

/// [`apply_schema`], then `then` in the same transaction with the version the file was recorded
/// at before (`None`: a new file), for the owner's own upgrade steps that SQL cannot express. A
/// file already at the section's version is only read: neither the SQL nor `then` runs.
pub fn apply_schema_then(
    conn: &mut Connection,
    path: &Path,
    section: &'static str,
    then: impl FnOnce(&rusqlite::Transaction<'_>, Option<i64>) -> rusqlite::Result<()>,
) -> Result<i64, DbError> {
    let (version, sql) = schema_section(section).ok_or(DbError::NoSection(section))?;
    // A file already at this version needs no write, so opening it (`fenx-sync status`, a
    // restart) never waits on a writer holding the lock for long, such as an index build.
    if recorded_version(conn)? == Some(version) {
        return Ok(version);
    }
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let found = recorded_version(&tx)?;
    if let Some(found) = found.filter(|&f| f > version) {
        return Err(DbError::SchemaTooNew {
            path: path.to_owned(),
            found,
            known: version,
        });
    }
    let (base, upgrades) = split_upgrades(sql);
    tx.execute_batch(base)?;
    // A file without a recorded version is new: its tables were just created in their first
    // shape, so every upgrade applies to it as well.
    for (to, upgrade) in upgrades {
        if found.unwrap_or(0) < to {
            tx.execute_batch(upgrade)?;
        }
    }
    then(&tx, found)?;
    tx.execute(
        "INSERT OR IGNORE INTO schema_version (version, applied_at) VALUES (?1, ?2)",
        (version, crate::time::now()),
    )?;
    tx.commit()?;
    Ok(version)
}

/// The schema version recorded in the file; `None` for a new file.
fn recorded_version(conn: &Connection) -> rusqlite::Result<Option<i64>> {
    let has_table: bool = conn.query_row(
        "SELECT count(*) > 0 FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'",
        [],
        |r| r.get(0),
    )?;
    if !has_table {
        return Ok(None);
    }
    conn.query_row("SELECT max(version) FROM schema_version", [], |r| r.get(0))
        .optional()
        .map(Option::flatten)
}

/// A section's idempotent part (`CREATE … IF NOT EXISTS`), and its `-- upgrade: N` blocks in
/// order: statements such as `ALTER TABLE … ADD COLUMN` that must run exactly once, on a file
/// recorded below version N.
pub(crate) fn split_upgrades(sql: &str) -> (&str, Vec<(i64, &str)>) {
    const MARK: &str = "-- upgrade: ";
    let mut parts = sql.split(MARK);
    let base = parts.next().unwrap_or_default();
    let upgrades = parts
        .filter_map(|part| {
            let (header, body) = part.split_once('\n').unwrap_or((part, ""));
            Some((header.trim().parse().ok()?, body))
        })
        .collect();
    (base, upgrades)
}

/// The `(version, sql)` of a `-- section: NAME version: N` block of schema.sql.
pub(crate) fn schema_section(name: &str) -> Option<(i64, &'static str)> {
    let mut rest = SCHEMA;
    while let Some(start) = rest.find("-- section: ") {
        let block = &rest[start..];
        let header_end = block.find('\n').unwrap_or(block.len());
        let header = &block["-- section: ".len()..header_end];
        let body_and_more = &block[header_end..];
        let body_end = body_and_more
            .find("-- section: ")
            .unwrap_or(body_and_more.len());
        let mut words = header.split_whitespace();
        if words.next() == Some(name) && words.next() == Some("version:") {
            let version = words.next()?.parse().ok()?;
            return Some((version, &body_and_more[..body_end]));
        }
        rest = body_and_more;
    }
    None
}

/// Which file a path names (device and inode): a deleted file's path names nothing, a replaced
/// one's another inode. SQLite keeps writing to the file it opened either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileIdentity {
    device: u64,
    inode: u64,
}

impl FileIdentity {
    pub fn of(path: &Path) -> std::io::Result<FileIdentity> {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(path)?;
        Ok(FileIdentity {
            device: meta.dev(),
            inode: meta.ino(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_durability_is_read_back_and_schema_applies_twice() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let mut conn = open(
            &path,
            Durability::Full,
            PageSize::Default,
            Duration::from_secs(1),
        )
        .unwrap();
        let sync: i64 = conn
            .query_row("PRAGMA synchronous", [], |r| r.get(0))
            .unwrap();
        assert_eq!(sync, 2);
        assert_eq!(apply_schema(&mut conn, &path, "outbox").unwrap(), 3);
        assert_eq!(apply_schema(&mut conn, &path, "outbox").unwrap(), 3);
        let rows: i64 = conn
            .query_row("SELECT count(*) FROM schema_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(rows, 1);
    }

    #[test]
    fn a_file_at_version_1_is_upgraded_in_place_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let mut conn = open(
            &path,
            Durability::Full,
            PageSize::Default,
            Duration::from_secs(1),
        )
        .unwrap();
        let (_, sql) = schema_section("outbox").unwrap();
        conn.execute_batch(split_upgrades(sql).0).unwrap();
        conn.execute(
            "INSERT INTO schema_version VALUES (1, '2026-01-01T00:00:00.000Z')",
            [],
        )
        .unwrap();
        assert_eq!(apply_schema(&mut conn, &path, "outbox").unwrap(), 3);
        assert_eq!(apply_schema(&mut conn, &path, "outbox").unwrap(), 3);
        let stale_reads: i64 = conn
            .query_row(
                "SELECT count(*) FROM pragma_table_info('notification') WHERE name = 'stale_reads'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(stale_reads, 1);
    }

    #[test]
    fn a_file_from_a_newer_version_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let mut conn = open(
            &path,
            Durability::Full,
            PageSize::Default,
            Duration::from_secs(1),
        )
        .unwrap();
        apply_schema(&mut conn, &path, "outbox").unwrap();
        conn.execute("INSERT INTO schema_version VALUES (99, 'x')", [])
            .unwrap();
        let err = apply_schema(&mut conn, &path, "outbox").unwrap_err();
        assert!(err.to_string().contains("schema version 99"), "{err}");
    }
}
