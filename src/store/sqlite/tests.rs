//! The store suite on SQLite, and what only the SQLite store does: its file, its pragmas, and
//! upgrading a version 2 file in place.
//!
//! They must never depend on another test's file: each opens its own temp directory.

use std::sync::Arc;

use async_trait::async_trait;
use rusqlite::types::ValueRef;
use serde_json::json;

use super::*;
use crate::store::suite::{Dialect, TestDb, store_suite};
use crate::store::{FILE_NAME, SyncOutcome};

struct SqliteDb {
    dir: tempfile::TempDir,
}

impl SqliteDb {
    fn path(&self) -> PathBuf {
        self.dir.path().join(FILE_NAME)
    }
}

#[async_trait]
impl TestDb for SqliteDb {
    fn dialect(&self) -> Dialect {
        Dialect::Sqlite
    }

    async fn open(&self, tenant: &str) -> Arc<dyn ReportingStore> {
        Arc::new(SqliteStore::open(&self.path(), tenant).unwrap())
    }

    async fn rows(&self, sql: &str) -> Vec<String> {
        rows(&self.path(), sql)
    }
}

async fn sqlite_db() -> Option<SqliteDb> {
    Some(SqliteDb {
        dir: tempfile::tempdir().unwrap(),
    })
}

store_suite!(sqlite_db());

/// Every row of `sql`'s result, each as its columns' text joined by `|` (NULL as `NULL`).
fn rows(path: &Path, sql: &str) -> Vec<String> {
    let conn = Connection::open(path).unwrap();
    let mut select = conn.prepare(sql).unwrap();
    let columns = select.column_count();
    select
        .query_map([], |r| {
            (0..columns)
                .map(|i| {
                    Ok(match r.get_ref(i)? {
                        ValueRef::Null => "NULL".to_owned(),
                        ValueRef::Integer(n) => n.to_string(),
                        ValueRef::Real(x) => x.to_string(),
                        ValueRef::Text(t) => String::from_utf8_lossy(t).into(),
                        ValueRef::Blob(b) => format!("{b:?}"),
                    })
                })
                .collect::<rusqlite::Result<Vec<_>>>()
                .map(|cols| cols.join("|"))
        })
        .unwrap()
        .collect::<rusqlite::Result<_>>()
        .unwrap()
}

fn cause(notification_id: &str) -> SyncCause {
    SyncCause {
        notification_id: notification_id.into(),
        event_type: Some("entitydata:draftverified".into()),
        event_when: crate::time::parse("2024-01-02T10:00:00.1234567+00:00"),
    }
}

fn entity(id: &str, version: i64, name: &str) -> EntitySnapshot {
    EntitySnapshot {
        entity_id: id.into(),
        entity_type: Some("Company".into()),
        version,
        status: None,
        created: None,
        json: json!({"id": id, "version": version,
                     "properties": {"legalEntityName": {"type": "Single", "value": name}}}),
    }
}

#[tokio::test]
async fn times_are_stored_in_one_form_and_history_reads_with_json_functions() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(FILE_NAME);
    let store = SqliteStore::open(&path, "t").unwrap();
    for (v, name) in [(1, "Acme"), (2, "Acme Ltd")] {
        store
            .upsert_entity(&entity("e-1", v, name), &cause(&format!("n-{v}")))
            .await
            .unwrap();
    }
    let times = rows(
        &path,
        "SELECT last_event_when, length(synced_at), substr(synced_at, -1) FROM entity",
    );
    assert_eq!(times, ["2024-01-02T10:00:00.123Z|24|Z"]);
    // Current and previous value of a property, from the history (SQLite's JSON functions).
    assert_eq!(
        rows(
            &path,
            "SELECT version, notification_id,
                    json_extract(json, '$.properties.legalEntityName.value') AS name,
                    lag(json_extract(json, '$.properties.legalEntityName.value'))
                        OVER (PARTITION BY entity_id ORDER BY version) AS previous_name
             FROM entity_version WHERE entity_id = 'e-1' ORDER BY version"
        ),
        ["1|n-1|Acme|NULL", "2|n-2|Acme Ltd|Acme"]
    );
}

#[tokio::test]
async fn opening_twice_and_reapplying_the_schema_is_harmless() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nested").join("dir").join(FILE_NAME);
    let first = SqliteStore::open(&path, "t").unwrap();
    first
        .upsert_entity(&entity("e-1", 1, "Acme"), &cause("n-1"))
        .await
        .unwrap();
    let second = SqliteStore::open(&path, "t").unwrap();
    assert_eq!(
        second.stored_state("e-1").await.unwrap().unwrap().version,
        1
    );
    let mut conn = sqlite::open(&path, Durability::Normal, PageSize::Large, BUSY_TIMEOUT).unwrap();
    conn.execute_batch("CREATE TEMP TABLE migration_tenant AS SELECT 't' AS tenant_id")
        .unwrap();
    assert_eq!(sqlite::apply_schema(&mut conn, &path, SECTION).unwrap(), 5);
    assert_eq!(
        rows(&path, "SELECT max(version) FROM schema_version"),
        ["5"]
    );
    assert_eq!(rows(&path, "SELECT name FROM current_entity"), ["Acme"]);
    let journal: String = Connection::open(&path)
        .unwrap()
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .unwrap();
    assert_eq!(journal, "wal");
    let page_size: i64 = Connection::open(&path)
        .unwrap()
        .query_row("PRAGMA page_size", [], |r| r.get(0))
        .unwrap();
    assert_eq!(page_size, 16_384, "entities share pages");
}

/// A version 2 file, as fenx-sync wrote it before tenant keys, one time form and typed values.
fn write_version_2_file(path: &Path) {
    let conn = Connection::open(path).unwrap();
    let (_, section) = crate::sqlite::schema_section(SECTION).unwrap();
    let (base, upgrades) = crate::sqlite::split_upgrades(section);
    conn.execute_batch(base).unwrap();
    for (to, sql) in upgrades {
        if to <= 2 {
            conn.execute_batch(sql).unwrap();
        }
    }
    conn.execute_batch(
        "INSERT INTO schema_version VALUES (2, '2026-01-01T00:00:00.000Z');
         INSERT INTO entity (entity_id, entity_type, version, status, created, json,
             last_notification_id, last_event_type, last_event_when, synced_at)
         VALUES ('e-1', 'Individual', 3, '1', '2020-01-01T09:00:00.1234567+00:00',
             '{\"id\":\"e-1\",\"properties\":{\"dateOfBirth\":{\"type\":\"Single\",
               \"value\":\"1980-02-29T00:00:00\"},\"firstName\":{\"type\":\"Single\",\"value\":\"Ann\"}}}',
             'n-3', 'entitydata:draftverified', '2024-01-01T11:00:00.5+01:00',
             '2024-01-01T10:00:01.000Z');
         INSERT INTO entity_property VALUES ('e-1', 'firstName', 'Ann', 'Single');
         INSERT INTO entity_version VALUES ('e-1', 3, '{}', '2024-01-01T10:00:01.000Z', 'n-3', NULL);
         INSERT INTO entity_version VALUES ('e-1', 2, '{}', '2024-01-01T09:00:01.000Z', 'n-2', NULL);
         INSERT INTO sync_log VALUES ('n-3', NULL, 'e-1', 'synced', 1, '2024-01-01T10:00:00.900Z',
             '2024-01-01t10:00:00.5z', '2024-01-01T10:00:01.000Z', NULL);
         INSERT INTO sync_state VALUES ('reconcile.next_due_at', 'x', '2024-01-01T10:00:01.000Z',
             '2024-01-01T10:00:01.000Z');",
    )
    .unwrap();
}

#[tokio::test]
async fn a_version_2_file_is_upgraded_in_place_under_the_configured_tenant() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(FILE_NAME);
    write_version_2_file(&path);
    let store = SqliteStore::open(&path, "bank-1").unwrap();
    assert_eq!(
        rows(&path, "SELECT max(version) FROM schema_version"),
        ["5"]
    );
    assert_eq!(
        rows(
            &path,
            "SELECT tenant_id, entity_id, version, created, last_event_when FROM entity"
        ),
        ["bank-1|e-1|3|2020-01-01T09:00:00.123Z|2024-01-01T10:00:00.500Z"]
    );
    // Flattened again from the JSON, with the typed columns filled.
    assert_eq!(
        rows(
            &path,
            "SELECT first_name, date_of_birth, previous_version FROM current_entity"
        ),
        ["Ann|1980-02-29|2"]
    );
    assert_eq!(
        rows(&path, "SELECT tenant_id, event_when FROM sync_log"),
        ["bank-1|2024-01-01T10:00:00.500Z"]
    );
    assert_eq!(rows(&path, "SELECT count(*) FROM entity_version"), ["2"]);
    assert!(
        store
            .state(StateKey::ReconcileNextDue)
            .await
            .unwrap()
            .is_some()
    );
    // The upgraded store keeps working by the monotonic rule.
    assert_eq!(
        store
            .upsert_entity(&entity("e-1", 2, "Old"), &cause("n-4"))
            .await
            .unwrap(),
        UpsertOutcome::Older { stored_version: 3 }
    );
    drop(store);
    SqliteStore::open(&path, "bank-1").unwrap();
    assert_eq!(
        rows(&path, "SELECT count(*) FROM entity"),
        ["1"],
        "upgraded once"
    );
}

#[tokio::test]
async fn a_deleted_file_is_reopened_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(FILE_NAME);
    let store = SqliteStore::open(&path, "t").unwrap();
    store
        .record_processed(&[ProcessedNotification {
            notification_id: "n-1".into(),
            event_type: None,
            entity_id: None,
            outcome: SyncOutcome::Ignored,
            attempts: 1,
            received_at: chrono::Utc::now(),
            event_when: None,
            detail: None,
        }])
        .await
        .unwrap();
    assert_eq!(store.check().await.unwrap().reopened, 0);
    std::fs::remove_file(&path).unwrap();
    assert_eq!(store.check().await.unwrap().reopened, 1);
    assert!(path.exists());
    assert_eq!(rows(&path, "SELECT count(*) FROM sync_log"), ["0"]);
}

#[tokio::test]
async fn risk_columns_keep_the_json_type_as_json_extract_did() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(FILE_NAME);
    let store = SqliteStore::open(&path, "t").unwrap();
    for (id, level) in [("e-1", json!(10)), ("e-2", json!(2)), ("e-3", json!(true))] {
        let mut e = entity(id, 1, "Acme");
        e.json["risk"] = json!({"riskCategory": "High", "riskLevel": level});
        store.upsert_entity(&e, &cause(id)).await.unwrap();
    }
    assert_eq!(
        rows(
            &path,
            "SELECT entity_id, typeof(risk_level), typeof(risk_category) FROM current_entity
              WHERE risk_level > 2 ORDER BY entity_id"
        ),
        ["e-1|integer|text"],
        "10 > 2 as numbers; true is 1"
    );
}

#[tokio::test]
async fn a_current_file_opens_while_another_writer_holds_the_lock() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(FILE_NAME);
    SqliteStore::open(&path, "t").unwrap();
    // As a long index build or ANALYZE in another process holds it.
    let writer = Connection::open(&path).unwrap();
    writer.execute_batch("BEGIN IMMEDIATE").unwrap();
    let reader = SqliteStore::open(&path, "t").unwrap();
    assert_eq!(reader.stats().await.unwrap().entities, 0);
}
