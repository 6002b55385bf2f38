//! The reporting store's test suite, run against every implementation (`store_suite!` in
//! `sqlite/tests.rs` and `postgres/tests.rs`): what the worker, backfill and an analyst see,
//! through the [`ReportingStore`] interface and through SQL that runs unchanged on both stores.
//!
//! A suite test never depends on another's database: each gets a fresh one from its [`TestDb`].

use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Duration, Utc};
use serde_json::{Value, json};

pub(crate) use fenx_sim::testkit::cookbook::Dialect;

use super::*;

/// A fresh, empty database for one test.
#[async_trait]
pub(crate) trait TestDb: Send + Sync {
    fn dialect(&self) -> Dialect;
    /// A store on this database for `tenant` (opening it again for the same tenant is allowed).
    async fn open(&self, tenant: &str) -> Arc<dyn ReportingStore>;
    /// Every row of `sql`'s result, each as its columns' text joined by `|` (NULL as `NULL`).
    async fn rows(&self, sql: &str) -> Vec<String>;
}

/// One `#[tokio::test]` per suite test, each on a fresh database from `$db` (an async
/// expression giving `Option<impl TestDb>`; `None` skips, having said why).
macro_rules! store_suite {
    ($db:expr) => {
        store_suite!($db;
            a_newer_version_replaces_properties_and_collections_and_appends_history,
            the_same_version_twice_changes_nothing,
            an_older_version_after_a_newer_one_is_refused_and_changes_nothing,
            stored_state_reports_the_version_and_the_event_behind_it,
            nested_properties_and_data_groups_are_queryable_without_json_functions,
            values_are_typed_where_they_parse,
            colliding_flattened_names_do_not_fail_the_entity,
            current_entity_shows_the_common_properties_as_columns,
            sync_lag_measures_from_when_to_processed_at_per_event_type,
            recording_a_notification_again_replaces_its_row,
            a_backfill_page_is_written_by_the_same_monotonic_rule,
            tenants_sharing_a_store_never_see_each_other,
            two_writers_of_one_tenant_never_regress_and_write_history_once,
            confirmations_are_deferred_confirmed_and_postponed,
            runs_resume_and_mark_absent_entities,
            recorded_state_round_trips,
            history_is_pruned_but_never_the_current_version,
            stats_count_entities_and_bytes,
            statistics_are_refreshed_for_the_planner,
            value_indexes_are_deferred_only_while_no_tenant_has_entities,
            every_readme_cookbook_query_runs_and_finds_rows
        );
    };
    ($db:expr; $($name:ident),+ $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                if let Some(db) = $db.await {
                    crate::store::suite::$name(&db).await;
                }
            }
        )+
    };
}
pub(crate) use store_suite;

const TENANT: &str = "tenant-a";

pub(super) fn entity(id: &str, version: i64, properties: Value) -> EntitySnapshot {
    EntitySnapshot {
        entity_id: id.into(),
        entity_type: Some("Company".into()),
        version,
        status: Some("1".into()),
        created: crate::time::parse("2024-01-01T09:00:00.1234567+00:00"),
        json: json!({
            "id": id,
            "type": "Company",
            "version": version,
            "status": 1,
            "created": "2024-01-01T09:00:00.1234567+00:00",
            "risk": {"riskCategory": "High", "riskLevel": 3},
            "properties": properties,
        }),
    }
}

fn at(text: &str) -> DateTime<Utc> {
    crate::time::parse(text).expect("a valid test time")
}

fn cause(notification_id: &str, when: &str) -> SyncCause {
    SyncCause {
        notification_id: notification_id.into(),
        event_type: Some("entitydata:draftverified".into()),
        event_when: Some(at(when)),
    }
}

fn single(value: &str) -> Value {
    json!({"type": "Single", "value": value})
}

fn processed(id: &str, event_type: Option<&str>, outcome: SyncOutcome) -> ProcessedNotification {
    ProcessedNotification {
        notification_id: id.into(),
        event_type: event_type.map(str::to_owned),
        entity_id: Some("e-1".into()),
        outcome,
        attempts: 1,
        received_at: at("2024-01-01T10:00:00Z"),
        event_when: None,
        detail: None,
    }
}

/// The contents of every entity table, to prove a call wrote nothing (times compared as the
/// store's own text, whatever its dialect).
async fn everything(db: &dyn TestDb) -> Vec<String> {
    let mut all = Vec::new();
    for (table, order) in [
        ("entity", "entity_id"),
        ("entity_property", "entity_id, name"),
        ("entity_collection", "entity_id, property, row_id, field"),
        ("entity_version", "entity_id, version"),
        ("sync_log", "notification_id"),
    ] {
        all.extend(
            db.rows(&format!(
                "SELECT '{table}', t.* FROM {table} AS t ORDER BY tenant_id, {order}"
            ))
            .await,
        );
    }
    all
}

pub(crate) async fn a_newer_version_replaces_properties_and_collections_and_appends_history(
    db: &dyn TestDb,
) {
    let store = db.open(TENANT).await;
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
        .await
        .unwrap();
    let second = store
        .upsert_entity(&v2, &cause("n-2", "2024-01-02T10:00:00+00:00"))
        .await
        .unwrap();
    assert_eq!(first, UpsertOutcome::Inserted);
    assert_eq!(
        second,
        UpsertOutcome::Updated {
            previous_version: 1
        }
    );
    assert_eq!(
        db.rows("SELECT tenant_id, version, last_notification_id FROM entity")
            .await,
        ["tenant-a|2|n-2"]
    );
    assert_eq!(
        store
            .stored_state("e-1")
            .await
            .unwrap()
            .unwrap()
            .last_event_when,
        Some(at("2024-01-02T10:00:00Z"))
    );
    assert_eq!(
        db.rows("SELECT name, value, value_type FROM entity_property ORDER BY name")
            .await,
        ["legalEntityName|Acme Ltd|Single"]
    );
    assert_eq!(
        db.rows("SELECT property, row_id, field, value FROM entity_collection ORDER BY 1, 2, 3, 4")
            .await,
        ["addresses|r1|city|Cork", "addresses|r1|country|IE"]
    );
    assert_eq!(
        db.rows(
            "SELECT version, notification_id FROM entity_version
              WHERE entity_id = 'e-1' ORDER BY version"
        )
        .await,
        ["1|n-1", "2|n-2"]
    );
}

pub(crate) async fn the_same_version_twice_changes_nothing(db: &dyn TestDb) {
    let store = db.open(TENANT).await;
    let first = entity("e-1", 4, json!({"legalEntityName": single("Acme")}));
    store
        .upsert_entity(&first, &cause("n-1", "2024-01-01T10:00:00+00:00"))
        .await
        .unwrap();
    let before = everything(db).await;
    // Different content and cause: any write at all would show.
    let again = entity("e-1", 4, json!({"legalEntityName": single("Changed")}));
    let outcome = store
        .upsert_entity(&again, &cause("n-2", "2024-01-02T10:00:00+00:00"))
        .await
        .unwrap();
    assert_eq!(outcome, UpsertOutcome::Unchanged);
    assert_eq!(everything(db).await, before);
}

pub(crate) async fn an_older_version_after_a_newer_one_is_refused_and_changes_nothing(
    db: &dyn TestDb,
) {
    let store = db.open(TENANT).await;
    let newer = entity("e-1", 3, json!({"legalEntityName": single("New")}));
    store
        .upsert_entity(&newer, &cause("n-2", "2024-01-02T10:00:00+00:00"))
        .await
        .unwrap();
    let before = everything(db).await;
    let older = entity("e-1", 2, json!({"legalEntityName": single("Old")}));
    let outcome = store
        .upsert_entity(&older, &cause("n-1", "2024-01-01T10:00:00+00:00"))
        .await
        .unwrap();
    assert_eq!(outcome, UpsertOutcome::Older { stored_version: 3 });
    assert_eq!(everything(db).await, before);
    assert_eq!(store.stored_state("e-1").await.unwrap().unwrap().version, 3);
}

pub(crate) async fn stored_state_reports_the_version_and_the_event_behind_it(db: &dyn TestDb) {
    let store = db.open(TENANT).await;
    assert_eq!(store.stored_state("e-1").await.unwrap(), None);
    let before = Utc::now() - Duration::seconds(1);
    store
        .upsert_entity(
            &entity("e-1", 7, json!({})),
            &cause("n-1", "2021-05-05T10:19:17.3157953+00:00"),
        )
        .await
        .unwrap();
    let state = store.stored_state("e-1").await.unwrap().unwrap();
    assert_eq!(state.version, 7);
    // One precision in both stores: milliseconds (the original text stays in the outbox).
    assert_eq!(state.last_event_when, Some(at("2021-05-05T10:19:17.315Z")));
    assert!(state.synced_at > before, "{}", state.synced_at);
    assert_eq!(
        store.stored_state("E-1").await.unwrap(),
        None,
        "ids are case-sensitive"
    );
    // Fenergo's creation time is a time column; its text stays in the JSON.
    assert_eq!(
        db.rows("SELECT count(*) FROM entity WHERE created < synced_at")
            .await,
        ["1"]
    );
}

pub(crate) async fn nested_properties_and_data_groups_are_queryable_without_json_functions(
    db: &dyn TestDb,
) {
    let store = db.open(TENANT).await;
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
        .await
        .unwrap();
    assert_eq!(
        db.rows("SELECT name, value FROM entity_property ORDER BY name")
            .await,
        [
            "employees|250",
            "registeredAddress.city|Dublin",
            "registeredAddress.country|IE"
        ]
    );
    // Beneficial owners per nationality, with their share.
    assert_eq!(
        db.rows(
            "SELECT n.value, s.value, o.value
             FROM entity_collection AS n
             JOIN entity_collection AS s USING (tenant_id, entity_id, property, row_id)
             JOIN entity_collection AS o USING (tenant_id, entity_id, property, row_id)
             WHERE property = 'ubos' AND n.field = 'nationality' AND s.field = 'share'
               AND o.field = 'name'
             ORDER BY 1"
        )
        .await,
        ["FR|40|Bob", "IE|60|Ann"]
    );
}

pub(crate) async fn values_are_typed_where_they_parse(db: &dyn TestDb) {
    let store = db.open(TENANT).await;
    let properties = json!({
        "employees": {"type": "Single", "value": 250},
        "turnover": single("1250000.5"),
        "registrationNumber": single("00123"),
        "isListed": {"type": "Single", "value": true},
        "isRegulated": single("False"),
        "dateOfIncorporation": single("1999-12-31T00:00:00"),
        "ubos": {"type": "Collection", "collections": {
            "u1": {"properties": {"name": "Ann", "share": 60, "isDirector": true}},
            "u2": {"properties": {"name": "Bob", "share": "40", "isDirector": " False\t"}},
            "u3": {"properties": {"name": "Cy", "isDirector": "yes"}},
        }},
    });
    store
        .upsert_entity(
            &entity("e-1", 1, properties),
            &cause("n-1", "2024-01-01T10:00:00Z"),
        )
        .await
        .unwrap();
    // No CAST: numbers compare and sum as numbers, text that only looks numeric stays text.
    assert_eq!(
        db.rows("SELECT name FROM entity_property WHERE value_number > 100 ORDER BY name")
            .await,
        ["employees", "turnover"]
    );
    assert_eq!(
        db.rows("SELECT count(*) FROM entity_property WHERE name = 'registrationNumber' AND value_number IS NULL")
            .await,
        ["1"]
    );
    assert_eq!(
        db.rows("SELECT name FROM entity_property WHERE value_bool ORDER BY name")
            .await,
        ["isListed"]
    );
    assert_eq!(
        db.rows("SELECT name FROM entity_property WHERE value_bool IS NOT NULL AND NOT value_bool")
            .await,
        ["isRegulated"]
    );
    assert_eq!(
        db.rows(
            "SELECT name FROM entity_property
              WHERE value_date >= '1999-12-31' AND value_date < '2000-01-01'"
        )
        .await,
        ["dateOfIncorporation"]
    );
    assert_eq!(
        db.rows(
            "SELECT count(*), sum(value_number) FROM entity_collection
              WHERE property = 'ubos' AND field = 'share'"
        )
        .await,
        ["2|100"]
    );
    // Data group booleans read as property ones do (PostgreSQL derives them in a view).
    assert_eq!(
        db.rows(
            "SELECT row_id, CASE WHEN value_bool THEN 'yes' WHEN NOT value_bool THEN 'no' ELSE '-' END
               FROM entity_collection
              WHERE property = 'ubos' AND field = 'isDirector' ORDER BY row_id"
        )
        .await,
        ["u1|yes", "u2|no", "u3|-"]
    );
}

pub(crate) async fn colliding_flattened_names_do_not_fail_the_entity(db: &dyn TestDb) {
    let store = db.open(TENANT).await;
    let properties = json!({
        "a.b": single("top level"),
        "a": {"type": "Custom", "properties": {"b": single("nested")}},
    });
    let outcome = store
        .upsert_entity(
            &entity("e-1", 1, properties),
            &cause("n-1", "2024-01-01T10:00:00Z"),
        )
        .await
        .unwrap();
    assert_eq!(outcome, UpsertOutcome::Inserted);
    assert_eq!(
        db.rows("SELECT count(*) FROM entity_property WHERE name = 'a.b'")
            .await,
        ["1"]
    );
}

pub(crate) async fn current_entity_shows_the_common_properties_as_columns(db: &dyn TestDb) {
    let store = db.open(TENANT).await;
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
            "dateOfBirth": single("1980-02-29T00:00:00"),
        }),
    );
    person.entity_type = Some("Individual".into());
    person.json["risk"] = Value::Null;
    let mut unnamed = entity("u-1", 1, json!({"countryOfIncorporation": single("IE")}));
    unnamed.json.as_object_mut().unwrap().remove("risk");
    for (e, n) in [(&company, "n-1"), (&person, "n-2"), (&unnamed, "n-3")] {
        store
            .upsert_entity(e, &cause(n, "2024-01-01T10:00:00Z"))
            .await
            .unwrap();
    }
    assert_eq!(
        db.rows(
            "SELECT tenant_id, entity_id, entity_type, version, name, legal_entity_name,
                    country_of_incorporation, registration_number, first_name, last_name,
                    entity_status, risk_category, risk_level, last_event_type
             FROM current_entity ORDER BY entity_id"
        )
        .await,
        [
            "tenant-a|c-1|Company|2|Acme Ltd|Acme Ltd|IE|IE123|NULL|NULL|Active|High|3|\
             entitydata:draftverified",
            "tenant-a|p-1|Individual|1|Luis Ruiz|NULL|NULL|NULL|Luis|Ruiz|NULL|NULL|NULL|\
             entitydata:draftverified",
            "tenant-a|u-1|Company|1|NULL|NULL|IE|NULL|NULL|NULL|NULL|NULL|NULL|\
             entitydata:draftverified",
        ]
    );
    // Dates of birth are dates, so they compare as dates.
    assert_eq!(
        db.rows(
            "SELECT entity_id FROM current_entity
              WHERE date_of_birth >= '1980-02-29' AND date_of_birth < '1980-03-01'"
        )
        .await,
        ["p-1"]
    );
    // Entities by country of incorporation.
    assert_eq!(
        db.rows(
            "SELECT coalesce(country_of_incorporation, '(unknown)'), count(*)
             FROM current_entity GROUP BY 1 ORDER BY 2 DESC, 1"
        )
        .await,
        ["IE|2", "(unknown)|1"]
    );
    // A newer version replaces the columns (a property it no longer has is NULL) and names
    // the version it replaced.
    let renamed = entity(
        "c-1",
        3,
        json!({"legalEntityName": single("Acme Holdings")}),
    );
    store
        .upsert_entity(&renamed, &cause("n-4", "2024-01-02T10:00:00Z"))
        .await
        .unwrap();
    assert_eq!(
        db.rows(
            "SELECT previous_version, version, name, country_of_incorporation
             FROM current_entity WHERE entity_id = 'c-1'"
        )
        .await,
        ["2|3|Acme Holdings|NULL"]
    );
    assert_eq!(
        db.rows("SELECT previous_version FROM current_entity WHERE entity_id = 'p-1'")
            .await,
        ["NULL"]
    );
}

pub(crate) async fn statistics_are_refreshed_for_the_planner(db: &dyn TestDb) {
    let store = db.open(TENANT).await;
    store
        .upsert_entity(
            &entity("e-1", 1, json!({"legalEntityName": single("Acme")})),
            &cause("n-1", "2024-01-01T10:00:00Z"),
        )
        .await
        .unwrap();
    // SQLite keeps its statistics in a table that ANALYZE creates.
    let (exists, analyzed) = match db.dialect() {
        Dialect::Sqlite => (
            "SELECT 1 FROM sqlite_schema WHERE name = 'sqlite_stat1'",
            "SELECT DISTINCT tbl FROM sqlite_stat1 WHERE tbl = 'entity'",
        ),
        Dialect::Postgres => (
            "SELECT 1 FROM pg_class WHERE oid = 'entity'::regclass AND reltuples > 0",
            "SELECT relname FROM pg_class WHERE oid = 'entity'::regclass AND reltuples > 0",
        ),
    };
    assert!(db.rows(exists).await.is_empty(), "not analyzed yet");
    store.refresh_statistics().await.unwrap();
    assert_eq!(db.rows(analyzed).await, ["entity"]);
}

pub(crate) async fn value_indexes_are_deferred_only_while_no_tenant_has_entities(db: &dyn TestDb) {
    let names = BULK_LOAD_INDEXES.map(|name| format!("'{name}'")).join(", ");
    let present = match db.dialect() {
        Dialect::Sqlite => format!(
            "SELECT name FROM sqlite_schema WHERE type = 'index' AND name IN ({names}) ORDER BY name"
        ),
        Dialect::Postgres => format!(
            "SELECT indexname FROM pg_indexes
              WHERE schemaname = current_schema() AND indexname IN ({names}) ORDER BY indexname"
        ),
    };
    let all: Vec<String> = BULK_LOAD_INDEXES.map(String::from).to_vec();
    let store = db.open(TENANT).await;
    let other = db.open("tenant-b").await;
    assert_eq!(db.rows(&present).await, all);

    assert_eq!(store.defer_indexes().await.unwrap(), all);
    assert!(db.rows(&present).await.is_empty());
    assert_eq!(store.stats().await.unwrap().deferred_indexes, all);
    assert_eq!(store.deferred_indexes().await.unwrap(), all);
    assert_eq!(
        other.stats().await.unwrap().deferred_indexes,
        all,
        "store-wide"
    );
    // Writes and the queries the indexes serve go on without them.
    let mut person = entity(
        "p-1",
        1,
        json!({"dateOfBirth": single("1960-05-01"), "numberOfEmployees": {"type": "Single", "value": 300}}),
    );
    person.entity_type = Some("Individual".into());
    store
        .upsert_entity(&person, &cause("n-1", "2024-01-01T10:00:00Z"))
        .await
        .unwrap();
    let born_before_1970 = "SELECT entity_id FROM entity
        WHERE entity_type = 'Individual' AND date_of_birth < '1970-01-01'";
    assert_eq!(db.rows(born_before_1970).await, ["p-1"]);

    assert_eq!(store.build_deferred_indexes().await.unwrap(), all);
    assert_eq!(db.rows(&present).await, all);
    assert_eq!(db.rows(born_before_1970).await, ["p-1"]);
    assert!(store.stats().await.unwrap().deferred_indexes.is_empty());
    assert!(store.build_deferred_indexes().await.unwrap().is_empty());

    // Another tenant's entities make the store worth its indexes: they serve its analysts.
    let fresh = db.open("tenant-c").await;
    assert!(fresh.defer_indexes().await.unwrap().is_empty());
    assert_eq!(db.rows(&present).await, all);
}

pub(crate) async fn sync_lag_measures_from_when_to_processed_at_per_event_type(db: &dyn TestDb) {
    let store = db.open(TENANT).await;
    let verified = Some("entitydata:draftverified");
    let now = Utc::now();
    let with_when = |id: &str, event_type, outcome, seconds_ago: Option<i64>| {
        let mut n = processed(id, event_type, outcome);
        n.event_when = seconds_ago.map(|s| now - Duration::seconds(s));
        n
    };
    store
        .record_processed(&[
            with_when("a", verified, SyncOutcome::Synced, Some(100)),
            with_when("b", verified, SyncOutcome::Unchanged, Some(300)),
            // Dead letters and unreadable times count as events, not in the lag.
            with_when("c", verified, SyncOutcome::Dead, Some(5000)),
            with_when("d", verified, SyncOutcome::Synced, None),
            with_when("f", None, SyncOutcome::Ignored, Some(50)),
        ])
        .await
        .unwrap();
    // All were processed at one moment, so the lags differ exactly as the `When`s do.
    assert_eq!(
        db.rows(
            "SELECT tenant_id, event_type, events, timed_events, dead,
                    round(max_lag_seconds - avg_lag_seconds)
             FROM sync_lag ORDER BY coalesce(event_type, '')"
        )
        .await,
        [
            "tenant-a|NULL|1|1|0|0",
            "tenant-a|entitydata:draftverified|4|2|1|100",
        ]
    );
    assert_eq!(
        db.rows("SELECT count(*) FROM sync_lag WHERE avg_lag_seconds >= 50")
            .await,
        ["2"]
    );
}

pub(crate) async fn recording_a_notification_again_replaces_its_row(db: &dyn TestDb) {
    let store = db.open(TENANT).await;
    let mut dead = processed("n-1", Some("entitydata:created"), SyncOutcome::Dead);
    dead.detail = Some("404 after 5 attempts".into());
    store.record_processed(&[dead]).await.unwrap();
    let mut replayed = processed("n-1", Some("entitydata:created"), SyncOutcome::Synced);
    replayed.attempts = 6;
    store
        .record_processed(&[replayed, processed("N-1", None, SyncOutcome::Ignored)])
        .await
        .unwrap();
    assert_eq!(
        db.rows(
            "SELECT notification_id, outcome, attempts, detail FROM sync_log
             ORDER BY notification_id"
        )
        .await,
        ["N-1|ignored|1|NULL", "n-1|synced|6|NULL"]
    );
    store.record_processed(&[]).await.unwrap();
}

pub(crate) async fn a_backfill_page_is_written_by_the_same_monotonic_rule(db: &dyn TestDb) {
    let store = db.open(TENANT).await;
    store
        .upsert_entity(
            &entity("e-2", 5, json!({"legalEntityName": single("Kept")})),
            &cause("n-1", "2024-01-01T10:00:00Z"),
        )
        .await
        .unwrap();
    let page: Vec<EntitySnapshot> = [("e-3", 1), ("e-2", 4), ("e-1", 2), ("e-1", 3)]
        .into_iter()
        .map(|(id, v)| {
            entity(
                id,
                v,
                json!({"legalEntityName": single(&format!("{id} v{v}"))}),
            )
        })
        .collect();
    let backfill = SyncCause {
        notification_id: "backfill:1".into(),
        event_type: Some("fenx-sync:backfill".into()),
        event_when: None,
    };
    let outcomes = store.upsert_entities(&page, &backfill).await.unwrap();
    assert_eq!(
        outcomes,
        [
            UpsertOutcome::Inserted,
            UpsertOutcome::Older { stored_version: 5 },
            UpsertOutcome::Inserted,
            UpsertOutcome::Updated {
                previous_version: 2
            },
        ]
    );
    assert_eq!(
        db.rows("SELECT entity_id, version, name FROM current_entity ORDER BY entity_id")
            .await,
        ["e-1|3|e-1 v3", "e-2|5|Kept", "e-3|1|e-3 v1"]
    );
    assert_eq!(store.upsert_entities(&[], &backfill).await.unwrap(), []);
}

pub(crate) async fn tenants_sharing_a_store_never_see_each_other(db: &dyn TestDb) {
    let a = db.open(TENANT).await;
    let b = db.open("tenant-b").await;
    let same_id = |v| entity("e-1", v, json!({"legalEntityName": single("Acme")}));
    a.upsert_entity(&same_id(5), &cause("n-1", "2024-01-01T10:00:00Z"))
        .await
        .unwrap();
    // The same entity id in another tenant is another entity: a lower version still inserts.
    assert_eq!(
        b.upsert_entity(&same_id(2), &cause("n-1", "2024-01-01T10:00:00Z"))
            .await
            .unwrap(),
        UpsertOutcome::Inserted
    );
    assert_eq!(a.stored_state("e-1").await.unwrap().unwrap().version, 5);
    assert_eq!(b.stored_state("e-1").await.unwrap().unwrap().version, 2);
    a.record_processed(&[processed("n-1", None, SyncOutcome::Synced)])
        .await
        .unwrap();
    b.record_processed(&[processed("n-1", None, SyncOutcome::Dead)])
        .await
        .unwrap();
    a.put_state(StateKey::CredentialsRefused, "refused", Utc::now())
        .await
        .unwrap();
    assert_eq!(b.state(StateKey::CredentialsRefused).await.unwrap(), None);
    assert_eq!(
        db.rows("SELECT tenant_id, outcome FROM sync_log ORDER BY tenant_id")
            .await,
        ["tenant-a|synced", "tenant-b|dead"]
    );
    assert_eq!(a.stats().await.unwrap().entities, 1);
}

pub(crate) async fn two_writers_of_one_tenant_never_regress_and_write_history_once(
    db: &dyn TestDb,
) {
    let first = db.open(TENANT).await;
    let second = db.open(TENANT).await;
    // Both instances write every version of the same entities, in opposite orders, at once.
    let versions: Vec<i64> = (1..=12).collect();
    let write = |store: Arc<dyn ReportingStore>, order: Vec<i64>| async move {
        for v in order {
            for id in ["e-1", "e-2", "e-3"] {
                let e = entity(id, v, json!({"legalEntityName": single(&format!("v{v}"))}));
                store
                    .upsert_entity(&e, &cause(&format!("n-{v}"), "2024-01-01T10:00:00Z"))
                    .await
                    .unwrap();
                let stored = store.stored_state(id).await.unwrap().unwrap().version;
                assert!(
                    stored >= v,
                    "{id} went down to {stored} after {v} was written"
                );
            }
        }
    };
    let mut reversed = versions.clone();
    reversed.reverse();
    let (one, two) = tokio::join!(
        tokio::spawn(write(first, versions)),
        tokio::spawn(write(second, reversed))
    );
    one.unwrap();
    two.unwrap();
    assert_eq!(
        db.rows("SELECT entity_id, version FROM entity ORDER BY entity_id")
            .await,
        ["e-1|12", "e-2|12", "e-3|12"]
    );
    assert_eq!(
        db.rows(
            "SELECT entity_id, count(*), count(DISTINCT version) FROM entity_version
              GROUP BY entity_id HAVING count(*) <> count(DISTINCT version)"
        )
        .await,
        Vec::<String>::new()
    );
    assert_eq!(
        db.rows("SELECT value FROM entity_property WHERE entity_id = 'e-1'")
            .await,
        ["v12"]
    );
}

pub(crate) async fn confirmations_are_deferred_confirmed_and_postponed(db: &dyn TestDb) {
    let store = db.open(TENANT).await;
    let t0 = at("2024-01-01T10:00:00Z");
    let follow = ReadFollowUp::Confirm {
        due_at: t0 + Duration::seconds(30),
        received_at: t0,
        read_at: t0 + Duration::seconds(1),
    };
    let v1 = entity("e-1", 1, json!({}));
    store
        .store_read(&v1, &cause("n-1", "2024-01-01T10:00:00Z"), Some(&follow))
        .await
        .unwrap();
    assert_eq!(store.pending_confirmations().await.unwrap(), 1);
    assert!(
        store
            .due_confirmations(t0 + Duration::seconds(29), 10)
            .await
            .unwrap()
            .is_empty()
    );
    // A newer notification soon after is served by the pending read, whose due time moves.
    let deferred = store
        .defer_to_confirmation(
            "e-1",
            t0,
            t0 + Duration::seconds(40),
            &cause("n-2", "2024-01-01T10:00:10Z"),
            t0 + Duration::seconds(10),
        )
        .await
        .unwrap();
    assert!(deferred);
    assert!(
        !store
            .defer_to_confirmation(
                "e-9",
                t0,
                t0 + Duration::seconds(40),
                &cause("n-3", "2024-01-01T10:00:10Z"),
                t0,
            )
            .await
            .unwrap(),
        "nothing pending for e-9: fetch"
    );
    let due = store
        .due_confirmations(t0 + Duration::seconds(45), 10)
        .await
        .unwrap();
    assert_eq!(due.len(), 1);
    let pending = &due[0];
    assert_eq!(
        (
            pending.entity_id.as_str(),
            pending.due_at,
            pending.read_version
        ),
        ("e-1", t0 + Duration::seconds(40), 1)
    );
    assert_eq!(pending.cause.notification_id, "n-2");
    assert_eq!(pending.received_at, t0 + Duration::seconds(10));
    let backlog = store
        .confirmation_backlog(t0 + Duration::seconds(45))
        .await
        .unwrap();
    assert_eq!(
        backlog,
        ConfirmationBacklog {
            due: 1,
            oldest_due: Some(t0 + Duration::seconds(40))
        }
    );
    // A failed read comes back later, counted.
    store
        .postpone_confirmation(pending, t0 + Duration::seconds(100))
        .await
        .unwrap();
    let due = store
        .due_confirmations(t0 + Duration::seconds(100), 10)
        .await
        .unwrap();
    assert_eq!(due[0].attempts, 1);
    // The confirmation read finds version 2 and closes the confirmation.
    let outcomes = store
        .confirm(
            &[(due[0].clone(), entity("e-1", 2, json!({})))],
            t0 + Duration::seconds(101),
        )
        .await
        .unwrap();
    assert_eq!(
        outcomes,
        [UpsertOutcome::Updated {
            previous_version: 1
        }]
    );
    assert_eq!(store.pending_confirmations().await.unwrap(), 0);
    assert_eq!(
        db.rows(
            "SELECT last_notification_id FROM entity
              WHERE entity_id = 'e-1' AND confirmed_at IS NOT NULL"
        )
        .await,
        ["n-2"]
    );
    // A read outside every window confirms at once and leaves nothing pending.
    store
        .store_read(
            &entity("e-2", 1, json!({})),
            &cause("n-4", "2024-01-01T10:00:00Z"),
            Some(&follow),
        )
        .await
        .unwrap();
    store
        .store_read(
            &entity("e-2", 1, json!({})),
            &cause("n-5", "2024-01-01T10:00:00Z"),
            Some(&ReadFollowUp::Confirmed {
                at: t0 + Duration::seconds(60),
            }),
        )
        .await
        .unwrap();
    assert_eq!(store.pending_confirmations().await.unwrap(), 0);
    // A confirmation given up leaves nothing pending.
    store
        .store_read(
            &entity("e-3", 1, json!({})),
            &cause("n-6", "2024-01-01T10:00:00Z"),
            Some(&follow),
        )
        .await
        .unwrap();
    let due = store
        .due_confirmations(t0 + Duration::seconds(30), 10)
        .await
        .unwrap();
    store.drop_confirmation(&due[0]).await.unwrap();
    assert_eq!(store.pending_confirmations().await.unwrap(), 0);
}

pub(crate) async fn runs_resume_and_mark_absent_entities(db: &dyn TestDb) {
    let store = db.open(TENANT).await;
    assert_eq!(
        store.running_reconcile(RunKind::Backfill).await.unwrap(),
        None
    );
    assert_eq!(
        store.last_run_started(RunKind::Reconcile).await.unwrap(),
        None
    );
    let mut run = store.start_reconcile(RunKind::Backfill).await.unwrap();
    run.cursor = Some("cursor-1".into());
    run.total_items = Some(10);
    run.counts.seen = 5;
    run.counts.added = 5;
    store.save_reconcile(&run, false).await.unwrap();
    assert_eq!(
        store.running_reconcile(RunKind::Backfill).await.unwrap(),
        Some(run.clone())
    );
    store.save_reconcile(&run, true).await.unwrap();
    assert_eq!(
        store.running_reconcile(RunKind::Backfill).await.unwrap(),
        None
    );
    for id in ["listed", "gone"] {
        store
            .upsert_entity(
                &entity(id, 1, json!({})),
                &cause("n-1", "2024-01-01T10:00:00Z"),
            )
            .await
            .unwrap();
    }
    let reconcile = store.start_reconcile(RunKind::Reconcile).await.unwrap();
    assert!(reconcile.run_id != run.run_id);
    assert!(
        store
            .last_run_started(RunKind::Reconcile)
            .await
            .unwrap()
            .is_some()
    );
    store
        .mark_listed(reconcile.run_id, &["listed".to_owned()])
        .await
        .unwrap();
    assert_eq!(store.mark_absent(reconcile.run_id).await.unwrap(), 1);
    assert_eq!(store.mark_absent(reconcile.run_id).await.unwrap(), 0);
    assert_eq!(
        db.rows("SELECT entity_id FROM absent_entity").await,
        ["gone"]
    );
    // Another tenant's runs are its own.
    let other = db.open("tenant-b").await;
    assert_eq!(
        other.last_run_started(RunKind::Reconcile).await.unwrap(),
        None
    );
}

pub(crate) async fn recorded_state_round_trips(db: &dyn TestDb) {
    let store = db.open(TENANT).await;
    let since = at("2024-01-01T10:00:00.250Z");
    assert_eq!(
        store.state(StateKey::CredentialsRefused).await.unwrap(),
        None
    );
    store
        .put_state(StateKey::CredentialsRefused, "invalid_client", since)
        .await
        .unwrap();
    store
        .put_state(
            StateKey::ReconcileNextDue,
            "2024-01-02T00:00:00.000Z",
            since,
        )
        .await
        .unwrap();
    assert_eq!(
        store.state(StateKey::CredentialsRefused).await.unwrap(),
        Some(StateEntry {
            value: "invalid_client".into(),
            since
        })
    );
    let other = db.open("tenant-b").await;
    other
        .put_state(StateKey::CredentialsRefused, "unauthorized_client", since)
        .await
        .unwrap();
    let every: Vec<(String, String)> = store
        .state_of_every_tenant(StateKey::CredentialsRefused)
        .await
        .unwrap()
        .into_iter()
        .map(|(tenant, entry)| (tenant, entry.value))
        .collect();
    assert_eq!(
        every,
        [
            ("tenant-a".to_owned(), "invalid_client".to_owned()),
            ("tenant-b".to_owned(), "unauthorized_client".to_owned())
        ]
    );
    store
        .clear_state(StateKey::CredentialsRefused)
        .await
        .unwrap();
    assert_eq!(
        store.state(StateKey::CredentialsRefused).await.unwrap(),
        None
    );
    assert!(
        store
            .state(StateKey::ReconcileNextDue)
            .await
            .unwrap()
            .is_some()
    );
}

pub(crate) async fn history_is_pruned_but_never_the_current_version(db: &dyn TestDb) {
    let store = db.open(TENANT).await;
    for v in 1..=3 {
        store
            .upsert_entity(
                &entity("e-1", v, json!({})),
                &cause("n", "2024-01-01T10:00:00Z"),
            )
            .await
            .unwrap();
    }
    store
        .upsert_entity(
            &entity("e-2", 1, json!({})),
            &cause("n", "2024-01-01T10:00:00Z"),
        )
        .await
        .unwrap();
    assert_eq!(
        store
            .prune_history(Utc::now() - Duration::days(1))
            .await
            .unwrap(),
        0,
        "nothing is that old"
    );
    let pruned = store
        .prune_history(Utc::now() + Duration::seconds(1))
        .await
        .unwrap();
    assert_eq!(pruned, 2);
    assert_eq!(
        db.rows("SELECT entity_id, version FROM entity_version ORDER BY 1, 2")
            .await,
        ["e-1|3", "e-2|1"]
    );
}

pub(crate) async fn stats_count_entities_and_bytes(db: &dyn TestDb) {
    let store = db.open(TENANT).await;
    for id in ["e-1", "e-2"] {
        store
            .upsert_entity(
                &entity(id, 1, json!({"legalEntityName": single("Acme")})),
                &cause("n", "2024-01-01T10:00:00Z"),
            )
            .await
            .unwrap();
    }
    let stats = store.stats().await.unwrap();
    assert_eq!((stats.entities, stats.versions), (2, 2));
    assert!(stats.bytes > 0, "{stats:?}");
    assert!(
        stats.bytes_without_history > 0 && stats.bytes_without_history < stats.bytes,
        "{stats:?}"
    );
    assert!(store.check().await.is_ok());
    assert!(!store.describe().is_empty());
}

pub(crate) async fn every_readme_cookbook_query_runs_and_finds_rows(db: &dyn TestDb) {
    let store = db.open(TENANT).await;
    let company = |version, name: &str| {
        entity(
            "e-1",
            version,
            json!({
                "legalEntityName": single(name),
                "countryOfIncorporation": single("Ireland"),
                "numberOfEmployees": {"type": "Single", "value": 300},
                "addresses": {"type": "Collection", "collections": {
                    "r1": {"properties": {"addressLine1": "1 Main St", "city": "Cork", "country": "IE"}},
                }},
            }),
        )
    };
    let mut person = entity(
        "p-1",
        1,
        json!({"firstName": single("Ann"), "dateOfBirth": single("1960-05-01T00:00:00")}),
    );
    person.entity_type = Some("Individual".into());
    for (e, n) in [
        (company(1, "Acme"), "n-1"),
        (company(2, "Acme Ltd"), "n-2"),
        (person, "n-3"),
    ] {
        store
            .upsert_entity(&e, &cause(n, "2024-01-01T10:00:00Z"))
            .await
            .unwrap();
    }
    let mut dead = processed("n-4", Some("entitydata:draftverified"), SyncOutcome::Dead);
    dead.detail = Some("404 after 5 attempts".into());
    let mut synced = processed("n-2", Some("entitydata:draftverified"), SyncOutcome::Synced);
    synced.event_when = Some(Utc::now() - Duration::seconds(2));
    store.record_processed(&[synced, dead]).await.unwrap();
    let run = store.start_reconcile(RunKind::Reconcile).await.unwrap();
    store.save_reconcile(&run, true).await.unwrap();
    let readme = include_str!("../../README.md");
    let statements = fenx_sim::testkit::cookbook::statements(readme, db.dialect(), "e-1");
    assert!(statements.len() >= 10, "{statements:#?}");
    for (_, sql) in statements {
        let found = db.rows(&sql).await;
        assert!(!found.is_empty(), "no rows from:\n{sql}");
    }
}
