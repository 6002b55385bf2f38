//! `fenx-sync demo`: the newcomer's first run. Starts the Fenergo simulator and the service on
//! loopback with a temporary store, sends a realistic burst of signed notifications (verified
//! entities, duplicates, unknown event types, an entity that is stale at first, transient API
//! failures), waits until everything is settled, and prints a summary and two cookbook queries.
//!
//! It never touches a configured store or a real Fenergo tenant: everything is on 127.0.0.1 and
//! in a directory it creates.

use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use fenx_sim::{DeliveryReport, Faults, Lag, Redelivery, SimConfig, Simulator, WebhookSender};
use rusqlite::Connection;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

use crate::config::Settings;
use crate::outbox::NotificationStatus;
use crate::outbox::admin::{OutboxAdmin, Status};

const SECRET: &str = "demo-webhook-secret";
const ENTITIES: usize = 24;
/// The demo gives up waiting after this long (it normally settles in a few seconds).
const SETTLE_TIMEOUT: Duration = Duration::from_secs(45);

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("demo I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Sim(#[from] fenx_sim::SimError),
    #[error(transparent)]
    Webhook(#[from] fenx_sim::WebhookError),
    #[error(transparent)]
    Run(#[from] crate::RunError),
    #[error(transparent)]
    Admin(#[from] crate::outbox::admin::AdminError),
    #[error("reading the reporting store: {0}")]
    Report(#[from] rusqlite::Error),
    #[error("{pending} notification(s) still pending after {waited:?}")]
    NotSettled { pending: i64, waited: Duration },
}

/// What the demo observed, for callers and tests.
#[derive(Debug, Clone)]
pub struct DemoReport {
    pub store_dir: PathBuf,
    pub delivered: usize,
    pub done: i64,
    pub ignored: i64,
    pub dead: i64,
    pub entities: i64,
    pub api_calls: u64,
    pub elapsed: Duration,
}

/// Runs the demo, writing its narrative to `out`. The store is left in `store_dir` for
/// exploring with `sqlite3` when `keep` is set, else removed.
pub async fn run(keep: bool, out: &mut (dyn Write + Send)) -> Result<DemoReport, DemoError> {
    let started = Instant::now();
    let store_dir = tempfile::Builder::new()
        .prefix("fenx-sync-demo-")
        .tempdir()?;
    let demo = Demo::start(store_dir.path().to_owned(), out).await?;
    let entities: Vec<String> = (0..ENTITIES).map(|i| demo.sim.sample_entity(i).0).collect();
    let first = demo.sync_then_lag_behind(&entities[0]).await?;
    let bodies = burst_bodies(&demo.sim, &entities);
    let reports = demo.sender.burst(bodies, 8).await;
    let delivered = reports
        .iter()
        .chain([&first])
        .filter(|r| r.delivered())
        .count();
    writeln!(
        out,
        "\nsent {} notifications: {ENTITIES} verified entities, 5 duplicate deliveries, 4 more events for \
         entities already queued, 4 event types no rule covers; 1 entity stale at first; 2 API failures",
        reports.len() + 1
    )?;

    let status = wait_settled(&demo.settings, SETTLE_TIMEOUT).await?;
    writeln!(
        out,
        "\nall settled in {:.1} s",
        started.elapsed().as_secs_f64()
    )?;
    let summary = summarise(&demo, &status, &entities[0], out)?;
    demo.stop().await;
    Ok(DemoReport {
        store_dir: keep_or_remove(store_dir, keep, out)?,
        delivered,
        done: summary.done,
        ignored: summary.ignored,
        dead: summary.dead,
        entities: summary.entities,
        api_calls: summary.api_calls,
        elapsed: started.elapsed(),
    })
}

/// What the settled run left, as [`summarise`] printed it.
struct Summary {
    done: i64,
    ignored: i64,
    dead: i64,
    entities: i64,
    api_calls: u64,
}

/// Prints what the outbox, the Fenergo API and the store show once everything settled (the
/// `stale` entity's name proves the newer version won), then two cookbook queries.
fn summarise(
    demo: &Demo,
    status: &Status,
    stale: &str,
    out: &mut (dyn Write + Send),
) -> Result<Summary, DemoError> {
    let stats = demo.sim.stats();
    let reporting = Connection::open(demo.settings.store.reporting_path())?;
    let entities_stored: i64 =
        reporting.query_row("SELECT count(*) FROM entity", [], |r| r.get(0))?;
    let renamed: String = reporting.query_row(
        "SELECT legal_entity_name FROM current_entity WHERE entity_id = ?1",
        [stale],
        |r| r.get(0),
    )?;
    writeln!(
        out,
        "  outbox: {} done, {} ignored, {} dead; {} duplicate deliveries recognised",
        status.count(NotificationStatus::Done),
        status.count(NotificationStatus::Ignored),
        status.count(NotificationStatus::Dead),
        status.duplicates_received
    )?;
    writeln!(
        out,
        "  Fenergo API: {} entity reads for {entities_stored} entities ({} answered 5xx), {} token request(s)",
        stats.entity_requests(),
        stats.server_errors,
        stats.token_requests
    )?;
    writeln!(
        out,
        "  the stale entity now reads {renamed:?} (the newer version won)"
    )?;
    print_cookbook(&reporting, out)?;
    Ok(Summary {
        done: status.count(NotificationStatus::Done),
        ignored: status.count(NotificationStatus::Ignored),
        dead: status.count(NotificationStatus::Dead),
        entities: entities_stored,
        api_calls: stats.entity_requests(),
    })
}

/// The simulator, the service in this process, and a webhook sender pointed at it.
struct Demo {
    sim: Simulator,
    settings: Settings,
    sender: WebhookSender,
    stop: oneshot::Sender<()>,
    service: tokio::task::JoinHandle<Result<(), crate::RunError>>,
}

impl Demo {
    /// Starts everything on loopback with its store in `store_dir`, and says where.
    async fn start(store_dir: PathBuf, out: &mut (dyn Write + Send)) -> Result<Demo, DemoError> {
        let sim = Simulator::start(SimConfig::default()).await;
        let settings = demo_settings(&sim, store_dir);
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let webhook_url = format!("http://{}{}", listener.local_addr()?, settings.webhook.path);
        writeln!(out, "fenx-sync demo")?;
        writeln!(out, "  Fenergo simulator  {}", sim.api_base())?;
        writeln!(out, "  webhook receiver   {webhook_url}")?;
        writeln!(out, "  store              {}", settings.store.dir.display())?;
        let (stop, stopped) = oneshot::channel::<()>();
        let service = tokio::spawn(crate::run(
            settings.clone(),
            crate::Listeners {
                webhook: Some(listener),
                admin: None,
            },
            async {
                let _ = stopped.await;
            },
        ));
        let sender = WebhookSender::new(&webhook_url, SECRET, Redelivery::default())?;
        Ok(Demo {
            sim,
            settings,
            sender,
            stop,
            service,
        })
    }

    /// Syncs `stale` once, then updates it while Fenergo's read side lags behind, so that its
    /// next notification arrives while a read still returns the old version; and makes the next
    /// two reads fail with 5xx (Fenergo has a bad moment).
    async fn sync_then_lag_behind(&self, stale: &str) -> Result<DeliveryReport, DemoError> {
        let first = self
            .sender
            .deliver(self.sim.notification("entitydata:created", stale))
            .await;
        wait_settled(&self.settings, SETTLE_TIMEOUT).await?;
        self.sim.set_lag_for(stale, Lag::Reads(1));
        self.sim.put_entity(
            stale,
            "Company",
            serde_json::json!({
                "legalEntityName": {"type": "Single", "value": "Renamed After Review Ltd"},
                "countryOfIncorporation": {"type": "Single", "value": "Ireland"}
            }),
        );
        self.sim.set_faults(Faults {
            server_errors: 2,
            ..Faults::default()
        });
        Ok(first)
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.service.await;
        self.sim.shutdown().await;
    }
}

/// The burst: a verification per entity, five of them delivered twice, more events for entities
/// already queued, and event types no routing rule covers.
fn burst_bodies(sim: &Simulator, entities: &[String]) -> Vec<String> {
    let mut bodies: Vec<String> = entities
        .iter()
        .map(|id| sim.notification("entitydata:draftverified", id))
        .collect();
    let duplicates: Vec<String> = bodies.iter().take(5).cloned().collect();
    bodies.extend(duplicates);
    bodies.extend(
        entities
            .iter()
            .take(4)
            .map(|id| sim.notification("entitydata:dataPublished", id)),
    );
    bodies.extend(
        entities
            .iter()
            .take(3)
            .map(|id| sim.notification("journey:taskcompleted", id)),
    );
    bodies.push(sim.notification("brandnewdomain:somethinghappened", &entities[1]));
    bodies
}

/// Two README cookbook queries over the demo's store.
fn print_cookbook(reporting: &Connection, out: &mut (dyn Write + Send)) -> Result<(), DemoError> {
    writeln!(
        out,
        "\n-- entities by country of incorporation (README cookbook)"
    )?;
    print_query(
        reporting,
        "SELECT country_of_incorporation AS country, count(*) AS companies
           FROM current_entity WHERE entity_type = 'Company'
          GROUP BY country ORDER BY companies DESC, country",
        out,
    )?;
    writeln!(out, "\n-- sync lag per event type (README cookbook)")?;
    print_query(
        reporting,
        "SELECT event_type, events, avg_lag_seconds, max_lag_seconds FROM sync_lag ORDER BY events DESC",
        out,
    )
}

/// Where the store is left: kept (and said so) with `keep`, else removed with `store_dir`.
fn keep_or_remove(
    store_dir: tempfile::TempDir,
    keep: bool,
    out: &mut (dyn Write + Send),
) -> Result<PathBuf, DemoError> {
    if !keep {
        return Ok(store_dir.path().to_owned());
    }
    let kept = store_dir.keep();
    writeln!(
        out,
        "\nstore kept for exploring: sqlite3 {}/reporting.db",
        kept.display()
    )?;
    Ok(kept)
}

fn demo_settings(sim: &Simulator, dir: PathBuf) -> Settings {
    let mut s = Settings::default();
    s.store.dir = dir;
    s.webhook.secrets = vec![SECRET.into()];
    let config = sim.config();
    s.fenergo.api_base = sim.api_base();
    s.fenergo.token_url = sim.token_url();
    s.fenergo.tenant_id = config.tenant_id.clone();
    s.fenergo.client_id = config.client_id.clone();
    s.fenergo.client_secret = Some(config.client_secret.clone().into());
    // Demo timings: retries in fractions of a second rather than Fenergo-realistic minutes.
    s.sync.retry_base = Duration::from_millis(300);
    s.sync.stale_delay = Duration::from_millis(500);
    s.sync.idle_poll = Duration::from_millis(50);
    s
}

/// Waits until no notification is pending, then returns the outbox status.
async fn wait_settled(settings: &Settings, timeout: Duration) -> Result<Status, DemoError> {
    let started = Instant::now();
    loop {
        let dir = settings.store.dir.clone();
        let busy = settings.store.busy_timeout;
        let status = tokio::task::spawn_blocking(move || {
            OutboxAdmin::open(&dir, busy).and_then(|a| a.status())
        })
        .await
        .map_err(|e| DemoError::Io(std::io::Error::other(e)))??;
        let pending = status.count(NotificationStatus::Pending);
        if pending == 0 {
            return Ok(status);
        }
        if started.elapsed() > timeout {
            return Err(DemoError::NotSettled {
                pending,
                waited: timeout,
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Prints a query's result as an aligned table.
fn print_query(
    conn: &Connection,
    sql: &str,
    out: &mut (dyn Write + Send),
) -> Result<(), DemoError> {
    let mut stmt = conn.prepare(sql)?;
    let names: Vec<String> = stmt.column_names().map(str::to_owned).collect();
    let rows: Vec<Vec<String>> = stmt
        .query_map([], |r| {
            (0..names.len())
                .map(|i| {
                    Ok(match r.get_ref(i)? {
                        rusqlite::types::ValueRef::Null => "NULL".to_owned(),
                        rusqlite::types::ValueRef::Integer(n) => n.to_string(),
                        rusqlite::types::ValueRef::Real(x) => format!("{x:.3}"),
                        rusqlite::types::ValueRef::Text(t) | rusqlite::types::ValueRef::Blob(t) => {
                            String::from_utf8_lossy(t).into_owned()
                        }
                    })
                })
                .collect()
        })?
        .collect::<Result<_, _>>()?;
    let widths: Vec<usize> = (0..names.len())
        .map(|i| {
            rows.iter()
                .map(|r| r[i].len())
                .chain([names[i].len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cells: &[String]| {
        cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
    };
    writeln!(out, "{}", line(&names))?;
    for row in &rows {
        writeln!(out, "{}", line(row))?;
    }
    Ok(())
}
