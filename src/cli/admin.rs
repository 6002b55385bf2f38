//! Operator commands on the outbox while the service runs: `status`, `dead-letters`, `replay`,
//! `resync`, and `migrate` (create or upgrade both database files).
//!
//! It never creates an outbox except through `migrate`, and prints times in the stored form.

use std::process::ExitCode;

use anyhow::bail;
use fenx_sync::config::Settings;
use fenx_sync::outbox::NotificationStatus::{Dead, Done, Ignored, Pending};
use fenx_sync::outbox::admin::{NotificationRow, OutboxAdmin, Selection, Status};

use super::args::DeadLetterCommand;
use super::service::runtime;

/// `status`: the outbox counts, free space, the reporting store's size and refused credentials,
/// as a table or JSON.
pub fn status(settings: &Settings, json: bool) -> anyhow::Result<ExitCode> {
    let status = open_admin(settings)?.status()?;
    let reporting = reporting_report(settings)?;
    let refused = match &reporting {
        ReportingReport::Open { refused, .. } => refused.clone(),
        _ => Vec::new(),
    };
    if json {
        let mut value = status_json(&status)?;
        // The configured tenant's refusal, else the first in a store that several share.
        let mine = refused
            .iter()
            .find(|(tenant, _)| *tenant == settings.fenergo.tenant_id)
            .or(refused.first());
        value["fenergo_credentials_refused"] = match mine {
            Some((tenant, r)) => serde_json::json!({
                "since": r.since.to_rfc3339(), "reason": r.value, "tenant_id": tenant
            }),
            None => serde_json::Value::Null,
        };
        value["reporting_store"] = reporting.json();
        println!("{}", serde_json::to_string_pretty(&value)?);
    } else {
        print_status(&status);
        print_store_space(settings);
        println!("reporting store:     {}", reporting.line());
        for (tenant, r) in refused {
            println!(
                "\nFenergo credentials refused since {} (tenant {tenant}): {}",
                r.since.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                r.value
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `replay`: ignored notifications of `event_type` back in the queue.
pub fn replay(settings: &Settings, event_type: &str) -> anyhow::Result<ExitCode> {
    let n = open_admin(settings)?.replay_ignored(event_type)?;
    println!("{n} ignored notification(s) of type {event_type} queued again");
    Ok(ExitCode::SUCCESS)
}

/// `resync`: a fetch of each entity queued now.
pub fn resync(settings: &Settings, entity_ids: &[String]) -> anyhow::Result<ExitCode> {
    let ids = open_admin(settings)?.resync(entity_ids)?;
    println!("queued {} entity fetch(es): {}", ids.len(), ids.join(", "));
    Ok(ExitCode::SUCCESS)
}

/// `migrate`: both database files created or upgraded to the current schema.
pub fn migrate(settings: &Settings, grant_read: Option<&str>) -> anyhow::Result<ExitCode> {
    fenx_sync::outbox::open_connection(
        &settings.store.dir,
        fenx_sync::outbox::Durability::Full,
        settings.store.busy_timeout,
    )?;
    let runtime = runtime()?;
    let reporting = runtime.block_on(fenx_sync::store::open(settings))?;
    if let Some(role) = grant_read {
        runtime.block_on(reporting.grant_read(role))?;
        println!("{role} may now read every reporting table and view");
    }
    println!(
        "{} and the reporting store ({}) are at the current schema",
        settings
            .store
            .dir
            .join(fenx_sync::outbox::FILE_NAME)
            .display(),
        reporting.describe()
    );
    Ok(ExitCode::SUCCESS)
}

fn open_admin(settings: &Settings) -> anyhow::Result<OutboxAdmin> {
    Ok(OutboxAdmin::open(
        &settings.store.dir,
        settings.store.busy_timeout,
    )?)
}

pub fn dead_letters(settings: &Settings, command: DeadLetterCommand) -> anyhow::Result<ExitCode> {
    let mut admin = open_admin(settings)?;
    match command {
        DeadLetterCommand::List { limit, json } => {
            let rows = admin.dead_letters(limit)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else if rows.is_empty() {
                println!("no dead letters");
            } else {
                print_dead_letters(&rows);
            }
        }
        DeadLetterCommand::Show { id } => {
            println!("{}", serde_json::to_string_pretty(&admin.show(&id)?)?);
        }
        DeadLetterCommand::Retry {
            ids,
            event_type,
            all,
        } => {
            let selection = match (event_type, all) {
                (Some(t), _) => Selection::EventType(t),
                (None, true) => Selection::All,
                (None, false) if !ids.is_empty() => Selection::Ids(ids),
                (None, false) => bail!("name notification ids, or use --event-type T or --all"),
            };
            let n = admin.retry_dead(&selection)?;
            println!("{n} dead letter(s) queued again");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `status --json`: the counts keyed by name (`"by_status": {"done": 3}`), not as pairs.
fn status_json(status: &Status) -> anyhow::Result<serde_json::Value> {
    fn object<K: std::fmt::Display>(pairs: &[(K, i64)]) -> serde_json::Value {
        pairs
            .iter()
            .map(|(name, n)| (name.to_string(), serde_json::Value::from(*n)))
            .collect::<serde_json::Map<_, _>>()
            .into()
    }
    let mut json = serde_json::to_value(status)?;
    json["by_status"] = object(&status.by_status);
    json["signature_recipes"] = object(&status.signature_recipes);
    Ok(json)
}

fn print_status(s: &Status) {
    println!("outbox rows by status:");
    for (status, n) in &s.by_status {
        println!("  {status:<10} {n:>10}");
    }
    println!(
        "\n{:<40} {:>9} {:>9} {:>9} {:>9}",
        "event type", Pending, Done, Ignored, Dead
    );
    for e in &s.by_event_type {
        println!(
            "{:<40} {:>9} {:>9} {:>9} {:>9}",
            e.event_type, e.pending, e.done, e.ignored, e.dead
        );
    }
    let oldest = match (s.oldest_pending_received_at, s.oldest_pending_age_secs) {
        (Some(at), Some(age)) => format!("{} ({age} s ago)", fenx_sync::time::format(at)),
        _ => "none".into(),
    };
    println!("\noldest pending:      {oldest}");
    println!("dead letters:        {}", s.dead_letters);
    println!(
        "last successful sync: {}",
        s.last_sync_at
            .map_or_else(|| "never".into(), fenx_sync::time::format)
    );
    println!("duplicates received: {}", s.duplicates_received);
    let recipes: Vec<String> = s
        .signature_recipes
        .iter()
        .map(|(r, n)| format!("{r} ({n})"))
        .collect();
    println!(
        "signature recipes:   {}",
        if recipes.is_empty() {
            "none yet".into()
        } else {
            recipes.join(", ")
        }
    );
}

/// Free space against `store.min_free_bytes`.
fn print_store_space(settings: &Settings) {
    let store = &settings.store;
    let min = store.min_free_bytes;
    match fenx_sync::health::free_bytes(&store.dir) {
        Ok(free) if free < min => println!(
            "free space:          {free} bytes, BELOW store.min_free_bytes ({min}): webhooks get 503"
        ),
        Ok(free) => println!("free space:          {free} bytes (store.min_free_bytes {min})"),
        Err(error) => println!("free space:          unknown ({error})"),
    }
}

/// What `status` found of the reporting store.
enum ReportingReport {
    /// The SQLite file is not there (status never creates it).
    Missing(std::path::PathBuf),
    /// It cannot be opened or read (PostgreSQL down, a refused login, a corrupt file).
    Unavailable { store: String, error: String },
    Open {
        store: String,
        stats: fenx_sync::store::StoreStats,
        /// Every tenant's recorded "credentials refused" state (status may run without a
        /// tenant configured).
        refused: Vec<(String, fenx_sync::store::StateEntry)>,
    },
}

fn reporting_report(settings: &Settings) -> anyhow::Result<ReportingReport> {
    let runtime = runtime()?;
    let describe = match &settings.store.reporting_url {
        Some(url) => format!("PostgreSQL {}", url.redacted()),
        None => settings.store.reporting_path().display().to_string(),
    };
    let opened = match runtime.block_on(fenx_sync::store::open_existing(settings)) {
        Ok(Some(store)) => store,
        Ok(None) => return Ok(ReportingReport::Missing(settings.store.reporting_path())),
        Err(error) => {
            return Ok(ReportingReport::Unavailable {
                store: describe,
                error: error.to_string(),
            });
        }
    };
    let read = runtime.block_on(async {
        let stats = opened.stats().await?;
        let key = fenx_sync::store::StateKey::CredentialsRefused;
        Ok::<_, fenx_sync::store::StoreError>((stats, opened.state_of_every_tenant(key).await?))
    });
    Ok(match read {
        Ok((stats, refused)) => ReportingReport::Open {
            store: opened.describe(),
            stats,
            refused,
        },
        Err(error) => ReportingReport::Unavailable {
            store: opened.describe(),
            error: error.to_string(),
        },
    })
}

impl ReportingReport {
    fn line(&self) -> String {
        match self {
            ReportingReport::Missing(path) => format!(
                "{} MISSING (a running service recreates it and re-syncs)",
                path.display()
            ),
            ReportingReport::Unavailable { store, error } => {
                format!("{store} UNAVAILABLE: {error}")
            }
            ReportingReport::Open { store, stats, .. } => {
                let size = if stats.entities == 0 {
                    format!("{store}: no entities yet; {} bytes", stats.bytes)
                } else {
                    let per = |bytes: i64| bytes / stats.entities;
                    format!(
                        "{store}: {} entities, {} versions; {} bytes per entity ({} without history)",
                        stats.entities,
                        stats.versions,
                        per(stats.bytes),
                        per(stats.bytes_without_history)
                    )
                };
                match stats.deferred_indexes.as_slice() {
                    [] => size,
                    deferred => format!(
                        "{size}; indexes DEFERRED until the backfill finishes: {} (resume an \
                         interrupted one with `fenx-sync backfill`)",
                        deferred.join(", ")
                    ),
                }
            }
        }
    }

    fn json(&self) -> serde_json::Value {
        match self {
            ReportingReport::Missing(path) => {
                serde_json::json!({"store": path.display().to_string(), "missing": true})
            }
            ReportingReport::Unavailable { store, error } => {
                serde_json::json!({"store": store, "error": error})
            }
            ReportingReport::Open { store, stats, .. } => serde_json::json!({
                "store": store,
                "entities": stats.entities,
                "versions": stats.versions,
                "bytes": stats.bytes,
                "bytes_without_history": stats.bytes_without_history,
                "deferred_indexes": stats.deferred_indexes,
            }),
        }
    }
}

fn print_dead_letters(rows: &[NotificationRow]) {
    println!(
        "{:<38} {:<28} {:<14} {:>4} {:>6}  reason",
        "id", "event type", "entity", "try", "status"
    );
    for r in rows {
        println!(
            "{:<38} {:<28} {:<14} {:>4} {:>6}  {}",
            r.id,
            r.event_type.as_deref().unwrap_or("-"),
            r.entity_key.as_deref().unwrap_or("-"),
            r.attempts,
            r.last_status.map_or("-".into(), |s| s.to_string()),
            r.last_error.as_deref().unwrap_or("")
        );
    }
}
