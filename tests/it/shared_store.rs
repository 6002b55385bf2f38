//! Two `serve` processes with separate outboxes share one PostgreSQL reporting store, as two
//! replicas behind a load balancer would: webhooks for the same entities arrive at different
//! instances, the newer before the older, while PostgreSQL's port is cut and restored mid-run.
//! The store must end equal to the simulator's truth, no stored version may ever go down, and
//! nothing acknowledged may be lost or dead-lettered.
//!
//! Needs `FENX_TEST_POSTGRES_URL` (`.ci/run` sets it); without it the test says it is skipped.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use fenx_sim::testkit::service::{AfterStart, Service, serve_command};
use fenx_sim::{SimConfig, Simulator};

use crate::helpers::{SECRET, post_signed_to};
use crate::proxy::CuttableProxy;

const ENTITIES: usize = 12;
const ROUNDS: usize = 4;

/// The test database's URL, or `None` (having said so) when PostgreSQL is not configured.
fn postgres_url() -> Option<url::Url> {
    match std::env::var("FENX_TEST_POSTGRES_URL") {
        Ok(text) => Some(url::Url::parse(&text).expect("FENX_TEST_POSTGRES_URL is a URL")),
        Err(_) => {
            eprintln!("skipped: FENX_TEST_POSTGRES_URL not set (.ci/run sets it)");
            None
        }
    }
}

fn server_addr(url: &url::Url) -> SocketAddr {
    let host = url.host_str().unwrap_or("127.0.0.1");
    let host = if host == "localhost" {
        "127.0.0.1"
    } else {
        host
    };
    format!("{host}:{}", url.port().unwrap_or(5432))
        .parse()
        .expect("PostgreSQL on a numeric address")
}

/// `serve` for `sim`'s tenant with its outbox in `store` and its reporting store at `reporting`.
fn start(store: &Path, sim: &Simulator, reporting: &url::Url) -> Service {
    let config = sim.config();
    let mut command = serve_command(Path::new(env!("CARGO_BIN_EXE_fenx-sync")), store, SECRET);
    command
        .env("FENX_ADMIN__ENABLED", "false")
        .env("FENX_FENERGO__API_BASE", sim.api_base())
        .env("FENX_FENERGO__TOKEN_URL", sim.token_url())
        .env("FENX_FENERGO__TENANT_ID", &config.tenant_id)
        .env("FENX_FENERGO__CLIENT_ID", &config.client_id)
        .env("FENX_FENERGO__CLIENT_SECRET", &config.client_secret)
        .env("FENX_STORE__REPORTING_URL", reporting.as_str())
        .env("FENX_STORE__PROBE_INTERVAL", "200ms")
        .env("FENX_SYNC__IDLE_POLL", "50ms")
        // Reads inside the window are confirmed this soon after (30 s by default).
        .env("FENX_SYNC__CONFIRM_AFTER", "2s");
    Service::spawn(command, AfterStart::Keep)
}

async fn connect(url: &url::Url) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url.as_str(), tokio_postgres::NoTls)
        .await
        .expect("the test database answers");
    tokio::spawn(connection);
    client
}

/// Every stored entity of `tenant` and its version.
async fn stored_versions(db: &tokio_postgres::Client, tenant: &str) -> HashMap<String, i64> {
    db.query(
        "SELECT entity_id, version FROM entity WHERE tenant_id = $1",
        &[&tenant],
    )
    .await
    .map(|rows| rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    .unwrap_or_default()
}

/// Waits (bounded: 60 s, as a loaded machine needs after an outage) until `check` holds.
async fn until<Fut: std::future::Future<Output = bool>>(
    what: &str,
    mut check: impl FnMut() -> Fut,
) {
    for _ in 0..1200 {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{what} did not happen within 60 s");
}

/// Dead-lettered outbox rows in `store`.
fn dead_rows(store: &Path) -> i64 {
    rusqlite::Connection::open(store.join("outbox.db"))
        .unwrap()
        .query_row(
            "SELECT count(*) FROM notification WHERE status = 'dead'",
            [],
            |r| r.get(0),
        )
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_share_one_postgres_store_converge_and_ride_out_its_outage() {
    let Some(url) = postgres_url() else { return };
    // A tenant of its own keeps this test's rows apart from every other test's.
    let sim = Simulator::start(SimConfig {
        tenant_id: format!("shared-store-{}", fastrand::u64(..)),
        ..SimConfig::default()
    })
    .await;
    let tenant = sim.config().tenant_id.clone();
    let ids: Vec<String> = sim
        .sample_entities(0..ENTITIES)
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    let proxy = CuttableProxy::start(server_addr(&url)).await;
    let mut proxied = url.clone();
    proxied.set_host(Some("127.0.0.1")).unwrap();
    proxied.set_port(Some(proxy.addr().port())).unwrap();
    let stores = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let mut services = [
        start(stores[0].path(), &sim, &proxied),
        start(stores[1].path(), &sim, &proxied),
    ];

    // A reader of its own, straight to PostgreSQL: no stored version may ever go down.
    let watching = Arc::new(AtomicBool::new(true));
    let watcher = {
        let (db, tenant, watching) = (connect(&url).await, tenant.clone(), watching.clone());
        tokio::spawn(async move {
            let mut highest: HashMap<String, i64> = HashMap::new();
            while watching.load(Ordering::SeqCst) {
                for (id, version) in stored_versions(&db, &tenant).await {
                    let seen = highest.entry(id.clone()).or_insert(version);
                    assert!(version >= *seen, "{id} went down from {seen} to {version}");
                    *seen = version;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };

    let client = fenx_sync::fenergo::client_builder().build().unwrap();
    for round in 0..ROUNDS {
        if round == 1 {
            proxy.cut();
            for service in &services {
                let logged = || {
                    service.lines().iter().any(|l| {
                        l.contains("\"ERROR\"") && l.contains("reporting store is unavailable")
                    })
                };
                for _ in 0..600 {
                    if logged() {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                assert!(
                    logged(),
                    "no ERROR for the store outage within 30 s; the log ends:\n{}",
                    service
                        .lines()
                        .iter()
                        .rev()
                        .take(15)
                        .rev()
                        .cloned()
                        .collect::<Vec<_>>()
                        .join("\n")
                );
            }
        }
        if round == 3 {
            proxy.restore();
        }
        for (index, id) in ids.iter().enumerate() {
            // The change and its notification, then a notification of an earlier event for the
            // same entity at the other instance: newer before older.
            let earlier = chrono::Utc::now() - chrono::Duration::minutes(5);
            sim.sample_entity(index);
            let newer = sim.notification("entitydata:draftverified", id);
            let older = sim.notification_at("entitydata:draftverified", id, earlier);
            let (first, second) = if (index + round) % 2 == 0 {
                (0, 1)
            } else {
                (1, 0)
            };
            for (instance, body) in [(first, newer), (second, older)] {
                let listen = services[instance].addr.to_string();
                let answer = post_signed_to(&client, &listen, body).await;
                assert_eq!(
                    answer.status(),
                    200,
                    "ingest stays ready through the outage"
                );
            }
        }
    }

    let truth: HashMap<String, i64> = ids
        .iter()
        .map(|id| (id.clone(), sim.latest_version(id).unwrap()))
        .collect();
    let db = connect(&url).await;
    until(
        "PostgreSQL's entity table equal to the simulator's truth",
        || {
            let (db, tenant, truth) = (&db, &tenant, &truth);
            async move { stored_versions(db, tenant).await == *truth }
        },
    )
    .await;
    watching.store(false, Ordering::SeqCst);
    watcher.await.expect("no version went down");
    let history: i64 = db
        .query_one(
            "SELECT count(*) - count(DISTINCT (entity_id, version)) FROM entity_version
              WHERE tenant_id = $1",
            &[&tenant],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(history, 0, "no history row written twice");
    for (store, service) in stores.iter().zip(&mut services) {
        assert_eq!(dead_rows(store.path()), 0, "an outage dead-letters nothing");
        service.child.kill().unwrap();
        service.child.wait().unwrap();
    }
    sim.shutdown().await;
}
