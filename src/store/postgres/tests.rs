//! Tests of the PostgreSQL store against a real server: `FENX_TEST_POSTGRES_URL` names a database
//! (`.ci/run` creates a fresh one); without it each test prints a "skipped" line and passes.
//!
//! Each test works in a schema of its own, so tests run in parallel and never see each other's
//! rows; the schema is dropped when the test ends well.

use std::io::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use serde_json::{Value, json};
use tokio_postgres::NoTls;

use super::*;
use crate::config::DatabaseUrl;
use crate::store::suite::{Dialect, TestDb, entity, store_suite};

const URL_VAR: &str = "FENX_TEST_POSTGRES_URL";

/// A schema of the test database for one test.
struct Schema {
    base_url: String,
    name: String,
    admin: tokio_postgres::Client,
}

impl Schema {
    /// A new empty schema, or `None` (saying so) when no test database is configured.
    async fn fresh(test: &str) -> Option<Schema> {
        let Ok(base_url) = std::env::var(URL_VAR) else {
            // Straight to stderr: libtest would hide a print from a passing test.
            let _ = writeln!(std::io::stderr(), "{test}: skipped: {URL_VAR} not set");
            return None;
        };
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "fenx_test_{}_{}_{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed),
            fastrand::u32(..)
        );
        let (admin, connection) = tokio_postgres::connect(&base_url, NoTls)
            .await
            .unwrap_or_else(|e| panic!("{URL_VAR}={base_url}: {e}"));
        tokio::spawn(connection);
        admin
            .batch_execute(&format!("CREATE SCHEMA {name}"))
            .await
            .unwrap();
        Some(Schema {
            base_url,
            name,
            admin,
        })
    }

    /// The URL of this schema (its tables are created there).
    fn url(&self) -> String {
        let separator = if self.base_url.contains('?') {
            '&'
        } else {
            '?'
        };
        format!(
            "{}{separator}options=-c%20search_path%3D{}&application_name={}",
            self.base_url, self.name, self.name
        )
    }

    fn target(&self) -> Target {
        Target {
            url: DatabaseUrl::from(self.url()),
            password: None,
            ca_file: None,
            pool_size: 4,
        }
    }

    async fn open(&self, tenant: &str) -> PostgresStore {
        PostgresStore::open(&self.target(), tenant).await.unwrap()
    }

    /// Every row of `sql` (run in this schema), each as its columns' text joined by `|`.
    async fn rows(&self, sql: &str) -> Vec<String> {
        let sql = format!("SET search_path = {}; {sql}", self.name);
        let mut rows = Vec::new();
        for message in self.admin.simple_query(&sql).await.unwrap() {
            if let tokio_postgres::SimpleQueryMessage::Row(row) = message {
                let columns: Vec<&str> = (0..row.len())
                    .map(|i| row.get(i).unwrap_or("NULL"))
                    .collect();
                rows.push(columns.join("|"));
            }
        }
        rows
    }

    async fn drop(self) {
        self.admin
            .batch_execute(&format!("DROP SCHEMA {} CASCADE", self.name))
            .await
            .unwrap();
    }
}

#[async_trait]
impl TestDb for Schema {
    fn dialect(&self) -> Dialect {
        Dialect::Postgres
    }

    async fn open(&self, tenant: &str) -> Arc<dyn ReportingStore> {
        Arc::new(Schema::open(self, tenant).await)
    }

    async fn rows(&self, sql: &str) -> Vec<String> {
        Schema::rows(self, sql).await
    }
}

store_suite!(Schema::fresh("store suite"));

fn cause(notification_id: &str) -> SyncCause {
    SyncCause {
        notification_id: notification_id.into(),
        event_type: Some("entitydata:draftverified".into()),
        event_when: crate::time::parse("2024-01-01T10:00:00Z"),
    }
}

fn company(name: &str) -> Value {
    json!({
        "legalEntityName": {"type": "Single", "value": name},
        "employees": {"type": "Single", "value": 42},
        "dateOfBirth": {"type": "Single", "value": "1980-03-04T00:00:00Z"},
        "listed": {"type": "Single", "value": "True"},
    })
}

#[tokio::test]
async fn a_batch_is_written_in_one_go_and_a_repeated_entity_in_order() {
    let Some(schema) = Schema::fresh("a_batch_is_written_in_one_go").await else {
        return;
    };
    let store = schema.open("t1").await;
    store
        .upsert_entity(&entity("b", 5, company("B")), &cause("n-0"))
        .await
        .unwrap();
    let page = [
        entity("c", 1, company("C")),
        entity("b", 4, company("B-old")),
        entity("a", 1, company("A")),
        entity("a", 2, company("A2")),
        entity("b", 6, company("B6")),
    ];
    assert_eq!(
        store
            .upsert_entities(&page, &cause("backfill"))
            .await
            .unwrap(),
        [
            UpsertOutcome::Inserted,
            UpsertOutcome::Older { stored_version: 5 },
            UpsertOutcome::Inserted,
            UpsertOutcome::Updated {
                previous_version: 1
            },
            UpsertOutcome::Updated {
                previous_version: 5
            },
        ]
    );
    assert_eq!(
        schema
            .rows(
                "SELECT entity_id, version, value FROM entity JOIN entity_property
                  USING (tenant_id, entity_id) WHERE name = 'legalEntityName' ORDER BY entity_id"
            )
            .await,
        ["a|2|A2", "b|6|B6", "c|1|C"]
    );
    let stats = store.stats().await.unwrap();
    assert_eq!((stats.entities, stats.versions), (3, 5));
    assert!(stats.bytes > stats.bytes_without_history && stats.bytes_without_history > 0);
    schema.drop().await;
}

#[tokio::test]
async fn rewriting_an_entity_leaves_another_tenants_entity_of_the_same_id_alone() {
    let Some(schema) = Schema::fresh("rewriting_an_entity_leaves_another_tenant").await else {
        return;
    };
    let (a, b) = (schema.open("t1").await, schema.open("t2").await);
    let with_address = |name: &str| {
        let mut properties = company(name);
        properties["addresses"] = json!({"type": "Collection",
            "collections": {"r1": {"properties": {"city": name}}}});
        properties
    };
    for (store, name) in [(&a, "A"), (&b, "B")] {
        store
            .upsert_entity(&entity("e", 1, with_address(name)), &cause("n-1"))
            .await
            .unwrap();
    }
    // Their property and data group rows are found by entity id alone.
    b.upsert_entity(&entity("e", 2, with_address("B2")), &cause("n-2"))
        .await
        .unwrap();
    assert_eq!(
        schema
            .rows(
                "SELECT tenant_id, p.value, c.value FROM entity_property AS p
                   JOIN entity_collection AS c USING (tenant_id, entity_id)
                  WHERE p.name = 'legalEntityName' ORDER BY tenant_id"
            )
            .await,
        ["t1|A|A", "t2|B2|B2"]
    );
    schema.drop().await;
}

#[tokio::test]
async fn a_version_1_database_gets_its_summary_columns_and_keeps_working() {
    let Some(schema) = Schema::fresh("a_version_1_database_upgrades").await else {
        return;
    };
    let full = include_str!("../../../schema.postgres.sql");
    let version_1 = &full[..full.find("-- migration: 2").expect("a migration 2")];
    let json = r#"{"id": "e-1", "risk": {"riskLevel": 2}, "properties": {
        "legalEntityName": {"type": "Single", "value": "Acme v2"}}}"#;
    schema
        .rows(&format!(
            "{version_1};
             INSERT INTO schema_version VALUES (1, now());
             INSERT INTO entity (tenant_id, entity_id, entity_type, version, json, synced_at)
                 VALUES ('t1', 'e-1', 'Company', 2, '{json}', now());
             INSERT INTO entity_property (tenant_id, entity_id, name, value, value_type)
                 VALUES ('t1', 'e-1', 'legalEntityName', 'Acme v2', 'Single');
             INSERT INTO entity_version (tenant_id, entity_id, version, json, stored_at)
                 VALUES ('t1', 'e-1', 1, '{{}}', now()), ('t1', 'e-1', 2, '{json}', now());
             INSERT INTO entity (tenant_id, entity_id, version, json, synced_at)
                 VALUES ('t1', 'e-2', 1, '{{\"risk\": {{\"riskLevel\": 1}}}}', now());"
        ))
        .await;
    let store = schema.open("t1").await;
    assert_eq!(
        schema
            .rows(
                "SELECT entity_id, previous_version, version, name, risk_level
                 FROM current_entity ORDER BY entity_id"
            )
            .await,
        ["e-1|1|2|Acme v2|2", "e-2|NULL|1|NULL|1"]
    );
    let newer = entity(
        "e-1",
        3,
        json!({"legalEntityName": {"type": "Single", "value": "Acme v3"}}),
    );
    store.upsert_entity(&newer, &cause("n-3")).await.unwrap();
    assert_eq!(
        schema
            .rows(
                "SELECT previous_version, version, name FROM current_entity WHERE entity_id = 'e-1'"
            )
            .await,
        ["2|3|Acme v3"]
    );
    schema.drop().await;
}

#[tokio::test]
async fn the_migration_is_recorded_and_a_newer_database_refused() {
    let Some(schema) = Schema::fresh("the_migration_is_recorded").await else {
        return;
    };
    let store = schema.open("t1").await;
    assert_eq!(store.migrate().await.unwrap(), migrate::latest());
    assert_eq!(
        schema.rows("SELECT version FROM schema_version").await,
        (1..=migrate::latest())
            .map(|v| v.to_string())
            .collect::<Vec<_>>()
    );
    let newer = migrate::latest() + 1;
    schema
        .rows(&format!(
            "INSERT INTO schema_version VALUES ({newer}, now())"
        ))
        .await;
    let refused = PostgresStore::open(&schema.target(), "t1")
        .await
        .err()
        .expect("a newer schema must be refused");
    assert!(
        matches!(
            refused,
            StoreError::Postgres(PgError::SchemaTooNew { found, .. }) if found == newer
        ),
        "{refused}"
    );
    schema.drop().await;
}

#[tokio::test]
async fn two_instances_writing_the_same_entities_never_regress_nor_repeat_history() {
    let Some(schema) = Schema::fresh("two_instances_writing_the_same_entities").await else {
        return;
    };
    let a = Arc::new(schema.open("t1").await);
    let b = Arc::new(schema.open("t1").await);
    const ENTITIES: usize = 20;
    const VERSIONS: i64 = 15;
    // Each instance writes every version of every entity, in its own order (one newest first,
    // the other oldest first, pages of opposite entity order): both race for every row.
    let writer = |store: Arc<PostgresStore>, reverse: bool| {
        tokio::spawn(async move {
            let mut versions: Vec<i64> = (1..=VERSIONS).collect();
            if reverse {
                versions.reverse();
            }
            let mut outcomes = Vec::new();
            for version in versions {
                let mut page: Vec<EntitySnapshot> = (0..ENTITIES)
                    .map(|i| entity(&format!("e-{i:02}"), version, company("x")))
                    .collect();
                if reverse {
                    page.reverse();
                }
                let written = store
                    .upsert_entities(&page, &cause(&format!("n-{version}")))
                    .await
                    .unwrap();
                outcomes.extend(written.into_iter().map(|o| (version, o)));
                let one = &page[version as usize % ENTITIES];
                let written = store.upsert_entity(one, &cause("single")).await.unwrap();
                outcomes.push((version, written));
            }
            outcomes
        })
    };
    // A reader watches throughout: no entity's version may ever be seen going down.
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = {
        let done = done.clone();
        let url = schema.url();
        tokio::spawn(async move {
            let (client, connection) = tokio_postgres::connect(&url, NoTls).await.unwrap();
            tokio::spawn(connection);
            let mut seen = std::collections::HashMap::<String, i64>::new();
            let mut reads = 0;
            while !done.load(Ordering::Relaxed) || reads == 0 {
                for row in client
                    .query("SELECT entity_id, version FROM entity", &[])
                    .await
                    .unwrap()
                {
                    let (id, version): (String, i64) = (row.get(0), row.get(1));
                    let before = seen.insert(id.clone(), version).unwrap_or(0);
                    assert!(
                        version >= before,
                        "{id} went from {before} down to {version}"
                    );
                }
                reads += 1;
            }
        })
    };
    let (one, two) = tokio::join!(writer(a.clone(), false), writer(b, true));
    done.store(true, Ordering::Relaxed);
    watcher.await.unwrap();
    let outcomes: Vec<(i64, UpsertOutcome)> =
        one.unwrap().into_iter().chain(two.unwrap()).collect();
    let inserted = outcomes
        .iter()
        .filter(|(_, o)| *o == UpsertOutcome::Inserted)
        .count();
    assert_eq!(
        inserted, ENTITIES,
        "each entity is inserted once, by one of them"
    );
    for (version, outcome) in &outcomes {
        match outcome {
            UpsertOutcome::Updated { previous_version } => assert!(previous_version < version),
            UpsertOutcome::Older { stored_version } => assert!(stored_version > version),
            _ => {}
        }
    }
    assert_eq!(
        schema.rows("SELECT DISTINCT version FROM entity").await,
        [VERSIONS.to_string()]
    );
    // Every version stored at most once, and exactly as many history rows as writes.
    assert_eq!(
        schema
            .rows(
                "SELECT count(*) FROM entity_version
                  GROUP BY entity_id, version HAVING count(*) > 1"
            )
            .await,
        Vec::<String>::new()
    );
    let wrote = outcomes.iter().filter(|(_, o)| o.wrote()).count();
    assert_eq!(
        schema.rows("SELECT count(*) FROM entity_version").await,
        [wrote.to_string()]
    );
    assert_eq!(
        schema
            .rows("SELECT count(DISTINCT entity_id) FROM entity_property")
            .await,
        [ENTITIES.to_string()]
    );
    schema.drop().await;
}

#[tokio::test]
async fn grant_read_lets_a_role_select_but_not_write() {
    let Some(schema) = Schema::fresh("grant_read_lets_a_role_select").await else {
        return;
    };
    let store = schema.open("t1").await;
    store
        .upsert_entity(&entity("e-1", 1, company("A")), &cause("n-1"))
        .await
        .unwrap();
    let role = format!("{}_reader", schema.name);
    schema
        .admin
        .batch_execute(&format!("CREATE ROLE \"{role}\" NOLOGIN"))
        .await
        .unwrap();
    store.grant_read(&role).await.unwrap();
    let as_role = |sql: &str| {
        format!(
            "BEGIN; SET LOCAL ROLE \"{role}\"; SET LOCAL search_path = {}; {sql}; COMMIT",
            schema.name
        )
    };
    let read = schema
        .admin
        .simple_query(&as_role("SELECT count(*) FROM current_entity"))
        .await;
    assert!(read.is_ok(), "{read:?}");
    let write = schema
        .admin
        .simple_query(&as_role(
            "INSERT INTO sync_state VALUES ('t', 'k', 'v', now(), now())",
        ))
        .await;
    assert!(
        write
            .as_ref()
            .is_err_and(|e| e.to_string().contains("permission denied")
                || e.as_db_error()
                    .is_some_and(|d| d.message().contains("permission denied"))),
        "{write:?}"
    );
    schema.admin.batch_execute("ROLLBACK").await.unwrap();
    assert!(matches!(
        store.grant_read("").await,
        Err(StoreError::Postgres(PgError::BadRole(_)))
    ));
    schema.drop().await;
    schema_cleanup_role(&role).await;
}

/// Drops a role a test created (roles belong to the cluster, not the schema).
async fn schema_cleanup_role(role: &str) {
    let url = std::env::var(URL_VAR).unwrap();
    let (admin, connection) = tokio_postgres::connect(&url, NoTls).await.unwrap();
    tokio::spawn(connection);
    admin
        .batch_execute(&format!("DROP ROLE \"{role}\""))
        .await
        .unwrap();
}

#[tokio::test]
async fn an_unreachable_server_is_a_prompt_error() {
    // A port that was just free: nothing listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let target = Target {
        url: DatabaseUrl::from(format!("postgresql://fenx:pw@127.0.0.1:{port}/db")),
        password: None,
        ca_file: None,
        pool_size: 1,
    };
    let error = PostgresStore::open(&target, "t1")
        .await
        .err()
        .expect("nothing listens")
        .to_string();
    assert!(error.contains("migrate"), "{error}");
    assert!(!error.contains(":pw@"), "{error}");
}

#[tokio::test]
async fn sslmode_require_encrypts_and_verify_full_checks_the_certificate() {
    let Some(schema) = Schema::fresh("sslmode_require_encrypts").await else {
        return;
    };
    let server_ssl = schema.rows("SHOW ssl").await;
    if server_ssl != ["on"] {
        let _ = writeln!(
            std::io::stderr(),
            "sslmode test: skipped: the server has ssl off"
        );
        schema.drop().await;
        return;
    }
    let with_mode = |mode: &str| Target {
        url: DatabaseUrl::from(format!("{}&sslmode={mode}", schema.url())),
        ..schema.target()
    };
    let store = PostgresStore::open(&with_mode("require"), "t1")
        .await
        .unwrap();
    let client = store.pool.get().await.unwrap();
    let encrypted: bool = client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(encrypted);
    drop(client);
    // This server's certificate is self-signed (Debian's snakeoil): never trusted by default.
    let refused = PostgresStore::open(&with_mode("verify-full"), "t1")
        .await
        .err()
        .expect("an untrusted certificate must be refused")
        .to_string();
    assert!(refused.to_lowercase().contains("certificate"), "{refused}");
    schema.drop().await;
}

#[tokio::test]
async fn connections_the_server_dropped_are_replaced() {
    let Some(schema) = Schema::fresh("connections_the_server_dropped_are_replaced").await else {
        return;
    };
    let store = schema.open("t1").await;
    store.check().await.unwrap();
    // What a server restart does to every open connection.
    let killed = schema
        .rows(&format!(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
              WHERE application_name = '{}'",
            schema.name
        ))
        .await;
    assert!(
        !killed.is_empty(),
        "the store's connection was found and terminated"
    );
    assert_eq!(
        store
            .upsert_entity(&entity("e-1", 1, company("A")), &cause("n-1"))
            .await
            .unwrap(),
        UpsertOutcome::Inserted
    );
    schema.drop().await;
}
