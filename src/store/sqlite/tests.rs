//! Tests of the reporting store as an analyst sees it: table contents and the SQL they would
//! write against them.
//!
//! They must never depend on another test's file: each opens its own temp directory.

use rusqlite::types::ValueRef;
use serde_json::json;

use super::*;

fn open_in(dir: &tempfile::TempDir) -> ReportingStore {
    ReportingStore::open(&dir.path().join(FILE_NAME)).unwrap()
}

fn entity(id: &str, version: i64, properties: Value) -> EntitySnapshot {
    EntitySnapshot {
        entity_id: id.into(),
        entity_type: Some("Company".into()),
        version,
        status: Some("1".into()),
        created: Some("2024-01-01T09:00:00.1234567+00:00".into()),
        json: json!({
            "id": id,
            "type": "Company",
            "version": version,
            "status": 1,
            "risk": {"riskCategory": "High", "riskLevel": 3},
            "properties": properties,
        }),
    }
}

fn cause(notification_id: &str, when: &str) -> SyncCause {
    SyncCause {
        notification_id: notification_id.into(),
        event_type: Some("entitydata:draftverified".into()),
        event_when: Some(when.into()),
    }
}

fn single(value: &str) -> Value {
    json!({"type": "Single", "value": value})
}

fn processed(id: &str, event_type: Option<&str>, outcome: &str) -> ProcessedNotification {
    ProcessedNotification {
        notification_id: id.into(),
        event_type: event_type.map(str::to_owned),
        entity_id: Some("e-1".into()),
        outcome: outcome.into(),
        attempts: 1,
        received_at: "2024-01-01T10:00:00.000Z".into(),
        event_when: None,
        detail: None,
    }
}

/// Every row of `sql`'s result, each as its columns' text joined by `|` (NULL as `NULL`).
fn rows(store: &ReportingStore, sql: &str) -> Vec<String> {
    let conn = store.lock();
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

/// The full contents of every table, to prove a call wrote nothing.
fn everything(store: &ReportingStore) -> Vec<String> {
    [
        "entity",
        "entity_property",
        "entity_collection",
        "entity_version",
        "sync_log",
    ]
    .iter()
    .flat_map(|table| {
        rows(
            store,
            &format!("SELECT '{table}', * FROM {table} ORDER BY 2, 3, 4, 5"),
        )
    })
    .collect()
}

#[test]
fn a_newer_version_replaces_properties_and_collections_and_appends_history() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_in(&dir);
    let v1 = entity(
        "e-1",
        1,
        json!({
            "legalEntityName": single("Acme"),
            "formerName": single("Acme Holdings"),
            "addresses": {"type": "Collection", "collections": {
                "r1": {"properties": {"city": "Dublin", "country": "IE"}},
                "r2": {"properties": {"city": "Paris", "country": "FR"}},
            }},
        }),
    );
    let v2 = entity(
        "e-1",
        2,
        json!({
            "legalEntityName": single("Acme Ltd"),
            "addresses": {"type": "Collection", "collections": {
                "r1": {"properties": {"city": "Cork", "country": "IE"}},
            }},
        }),
    );
    let first = store
        .upsert_entity(&v1, &cause("n-1", "2024-01-01T10:00:00+00:00"))
        .unwrap();
    let second = store
        .upsert_entity(&v2, &cause("n-2", "2024-01-02T10:00:00+00:00"))
        .unwrap();
    assert_eq!(first, UpsertOutcome::Inserted);
    assert_eq!(
        second,
        UpsertOutcome::Updated {
            previous_version: 1
        }
    );
    assert_eq!(
        rows(
            &store,
            "SELECT version, last_notification_id, last_event_when FROM entity"
        ),
        ["2|n-2|2024-01-02T10:00:00+00:00"]
    );
    assert_eq!(
        rows(
            &store,
            "SELECT name, value, value_type FROM entity_property ORDER BY name"
        ),
        ["legalEntityName|Acme Ltd|Single"]
    );
    assert_eq!(
        rows(
            &store,
            "SELECT property, row_id, field, value FROM entity_collection ORDER BY 1, 2, 3"
        ),
        ["addresses|r1|city|Cork", "addresses|r1|country|IE"]
    );
    // Current and previous value of a property, from the history.
    assert_eq!(
        rows(
            &store,
            "SELECT version, notification_id,
                    json_extract(json, '$.properties.legalEntityName.value') AS name,
                    lag(json_extract(json, '$.properties.legalEntityName.value'))
                        OVER (PARTITION BY entity_id ORDER BY version) AS previous_name
             FROM entity_version WHERE entity_id = 'e-1' ORDER BY version"
        ),
        ["1|n-1|Acme|NULL", "2|n-2|Acme Ltd|Acme"]
    );
}

#[test]
fn the_same_version_twice_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_in(&dir);
    let first = entity("e-1", 4, json!({"legalEntityName": single("Acme")}));
    store
        .upsert_entity(&first, &cause("n-1", "2024-01-01T10:00:00+00:00"))
        .unwrap();
    let before = everything(&store);
    // Different content and cause, and a later clock: any write at all would show.
    std::thread::sleep(Duration::from_millis(5));
    let again = entity("e-1", 4, json!({"legalEntityName": single("Changed")}));
    let outcome = store
        .upsert_entity(&again, &cause("n-2", "2024-01-02T10:00:00+00:00"))
        .unwrap();
    assert_eq!(outcome, UpsertOutcome::Unchanged);
    assert_eq!(everything(&store), before);
}

#[test]
fn an_older_version_after_a_newer_one_is_refused_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_in(&dir);
    let newer = entity("e-1", 3, json!({"legalEntityName": single("New")}));
    store
        .upsert_entity(&newer, &cause("n-2", "2024-01-02T10:00:00+00:00"))
        .unwrap();
    let before = everything(&store);
    let older = entity("e-1", 2, json!({"legalEntityName": single("Old")}));
    let outcome = store
        .upsert_entity(&older, &cause("n-1", "2024-01-01T10:00:00+00:00"))
        .unwrap();
    assert_eq!(outcome, UpsertOutcome::Older { stored_version: 3 });
    assert_eq!(everything(&store), before);
    assert_eq!(store.stored_state("e-1").unwrap().unwrap().version, 3);
}

#[test]
fn stored_state_reports_the_version_and_the_event_behind_it() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_in(&dir);
    assert_eq!(store.stored_state("e-1").unwrap(), None);
    store
        .upsert_entity(
            &entity("e-1", 7, json!({})),
            &cause("n-1", "2021-05-05T10:19:17.3157953+00:00"),
        )
        .unwrap();
    let state = store.stored_state("e-1").unwrap().unwrap();
    assert_eq!(state.version, 7);
    assert_eq!(
        state.last_event_when.as_deref(),
        Some("2021-05-05T10:19:17.3157953+00:00")
    );
    assert!(
        chrono::DateTime::parse_from_rfc3339(&state.synced_at).is_ok(),
        "{}",
        state.synced_at
    );
    assert_eq!(
        store.stored_state("E-1").unwrap(),
        None,
        "ids are case-sensitive"
    );
}

#[test]
fn nested_properties_and_data_groups_are_queryable_without_json_functions() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_in(&dir);
    let properties = json!({
        "registeredAddress": {"type": "Custom", "value": null, "properties": {
            "city": single("Dublin"),
            "country": single("IE"),
        }},
        "ubos": {"type": "Collection", "collections": {
            "u1": {"properties": {"name": "Ann", "nationality": "IE", "share": "60"}},
            "u2": {"properties": {"name": "Bob", "nationality": "FR", "share": "40"}},
        }},
        "employees": {"type": "Single", "value": 250},
    });
    store
        .upsert_entity(
            &entity("e-1", 1, properties),
            &cause("n-1", "2024-01-01T10:00:00Z"),
        )
        .unwrap();
    assert_eq!(
        rows(
            &store,
            "SELECT name, value FROM entity_property ORDER BY name"
        ),
        [
            "employees|250",
            "registeredAddress.city|Dublin",
            "registeredAddress.country|IE"
        ]
    );
    // Beneficial owners per nationality, with their share.
    assert_eq!(
        rows(
            &store,
            "SELECT n.value, s.value, o.value
             FROM entity_collection AS n
             JOIN entity_collection AS s USING (entity_id, property, row_id)
             JOIN entity_collection AS o USING (entity_id, property, row_id)
             WHERE property = 'ubos' AND n.field = 'nationality' AND s.field = 'share'
               AND o.field = 'name'
             ORDER BY 1"
        ),
        ["FR|40|Bob", "IE|60|Ann"]
    );
}

#[test]
fn colliding_flattened_names_do_not_fail_the_entity() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_in(&dir);
    let properties = json!({
        "a.b": single("top level"),
        "a": {"type": "Custom", "properties": {"b": single("nested")}},
    });
    let outcome = store
        .upsert_entity(
            &entity("e-1", 1, properties),
            &cause("n-1", "2024-01-01T10:00:00Z"),
        )
        .unwrap();
    assert_eq!(outcome, UpsertOutcome::Inserted);
    assert_eq!(
        rows(
            &store,
            "SELECT count(*) FROM entity_property WHERE name = 'a.b'"
        ),
        ["1"]
    );
}

#[test]
fn current_entity_shows_the_common_properties_as_columns() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_in(&dir);
    let company = entity(
        "c-1",
        2,
        json!({
            "legalEntityName": single("Acme Ltd"),
            "countryOfIncorporation": single("IE"),
            "registrationNumber": single("IE123"),
            "entityStatus": single("Active"),
            "sector": single("Banking"),
        }),
    );
    let mut person = entity(
        "p-1",
        1,
        json!({
            "firstName": single("Luis"),
            "lastName": single("Ruiz"),
            "dateOfBirth": single("1980-02-29"),
        }),
    );
    person.entity_type = Some("Individual".into());
    person.json["risk"] = Value::Null;
    let mut unnamed = entity("u-1", 1, json!({"countryOfIncorporation": single("IE")}));
    unnamed.json.as_object_mut().unwrap().remove("risk");
    for (e, n) in [(&company, "n-1"), (&person, "n-2"), (&unnamed, "n-3")] {
        store
            .upsert_entity(e, &cause(n, "2024-01-01T10:00:00Z"))
            .unwrap();
    }
    assert_eq!(
        rows(
            &store,
            "SELECT entity_id, entity_type, version, name, legal_entity_name,
                    country_of_incorporation, registration_number, first_name, last_name,
                    date_of_birth, entity_status, risk_category, risk_level, last_event_type
             FROM current_entity ORDER BY entity_id"
        ),
        [
            "c-1|Company|2|Acme Ltd|Acme Ltd|IE|IE123|NULL|NULL|NULL|Active|High|3|\
             entitydata:draftverified",
            "p-1|Individual|1|Luis Ruiz|NULL|NULL|NULL|Luis|Ruiz|1980-02-29|NULL|NULL|NULL|\
             entitydata:draftverified",
            "u-1|Company|1|NULL|NULL|IE|NULL|NULL|NULL|NULL|NULL|NULL|NULL|\
             entitydata:draftverified",
        ]
    );
    // Entities by country of incorporation.
    assert_eq!(
        rows(
            &store,
            "SELECT coalesce(country_of_incorporation, '(unknown)'), count(*)
             FROM current_entity GROUP BY 1 ORDER BY 2 DESC, 1"
        ),
        ["IE|2", "(unknown)|1"]
    );
}

#[test]
fn sync_lag_measures_from_when_to_processed_at_per_event_type() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_in(&dir);
    let verified = Some("entitydata:draftverified");
    let with_when = |id: &str, event_type, outcome: &str, when: Option<&str>| {
        let mut n = processed(id, event_type, outcome);
        n.event_when = when.map(str::to_owned);
        n
    };
    store
        .record_processed_at(
            &[
                // Fenergo's usual form: 7 fractional digits and an offset. 1.5 s.
                with_when(
                    "a",
                    verified,
                    "synced",
                    Some("2024-01-01T10:00:08.5000000+00:00"),
                ),
                // Another offset: 10:00:04Z. 6 s.
                with_when(
                    "b",
                    verified,
                    "unchanged",
                    Some("2024-01-01T11:00:04+01:00"),
                ),
                // Dead letters and unreadable times count as events, not in the lag.
                with_when("c", verified, "dead", Some("2024-01-01T09:00:00Z")),
                with_when("d", verified, "synced", None),
                with_when("e", verified, "synced", Some("yesterday")),
                // RFC 3339 allows lower case. 2.75 s.
                with_when("f", None, "ignored", Some("2024-01-01t10:00:07.25z")),
            ],
            "2024-01-01T10:00:10.000Z",
        )
        .unwrap();
    assert_eq!(
        rows(
            &store,
            "SELECT event_type, events, timed_events, dead, avg_lag_seconds, max_lag_seconds
             FROM sync_lag ORDER BY event_type"
        ),
        [
            "NULL|1|1|0|2.75|2.75",
            "entitydata:draftverified|5|2|1|3.75|6"
        ]
    );
}

#[test]
fn recording_a_notification_again_replaces_its_row() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_in(&dir);
    let mut dead = processed("n-1", Some("entitydata:created"), "dead");
    dead.detail = Some("404 after 5 attempts".into());
    store.record_processed(&[dead]).unwrap();
    let mut replayed = processed("n-1", Some("entitydata:created"), "synced");
    replayed.attempts = 6;
    store
        .record_processed(&[replayed, processed("N-1", None, "ignored")])
        .unwrap();
    assert_eq!(
        rows(
            &store,
            "SELECT notification_id, outcome, attempts, detail FROM sync_log
             ORDER BY notification_id"
        ),
        ["N-1|ignored|1|NULL", "n-1|synced|6|NULL"]
    );
    store.record_processed(&[]).unwrap();
}

#[test]
fn opening_twice_and_reapplying_the_schema_is_harmless() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nested").join("dir").join(FILE_NAME);
    let first = ReportingStore::open(&path).unwrap();
    first
        .upsert_entity(
            &entity("e-1", 1, json!({"legalEntityName": single("Acme")})),
            &cause("n-1", "2024-01-01T10:00:00Z"),
        )
        .unwrap();
    let second = ReportingStore::open(&path).unwrap();
    assert_eq!(second.stored_state("e-1").unwrap().unwrap().version, 1);
    let mut conn = sqlite::open(&path, Durability::Normal, BUSY_TIMEOUT).unwrap();
    assert_eq!(sqlite::apply_schema(&mut conn, &path, SECTION).unwrap(), 2);
    assert_eq!(rows(&second, "SELECT version FROM schema_version"), ["2"]);
    assert_eq!(rows(&second, "SELECT name FROM current_entity"), ["Acme"]);
    let synchronous = rows(&second, "PRAGMA synchronous");
    assert_eq!(synchronous, ["1"], "NORMAL: the data can be re-fetched");
}
