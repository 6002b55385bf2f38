//! The `fenx-sync` binary: parses the command line, loads configuration, installs logging and
//! hands over to the library. `anyhow` lives here and nowhere else.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};

use fenx_sync::config::{Settings, Sources};
use fenx_sync::outbox::admin::{NotificationRow, OutboxAdmin, Selection, Status};
use fenx_sync::{signature, telemetry};

#[derive(Parser)]
#[command(version, about = "Fenergo webhook receiver and data-sync sidecar")]
struct Cli {
    /// Configuration file (default: $FENX_CONFIG, else config/fenx-sync.toml if present).
    #[arg(long, global = true, value_name = "PATH")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Receive webhooks into the outbox and sync them into the reporting store.
    Serve(ServeArgs),
    /// Outbox counts by status and event type, oldest pending, dead letters, last sync.
    Status {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// List, show and retry notifications the worker gave up on.
    #[command(subcommand, name = "dead-letters")]
    DeadLetters(DeadLetterCommand),
    /// Re-queue notifications that were ignored before a routing rule covered them.
    Replay {
        /// Event type to replay (any casing).
        #[arg(long)]
        event_type: String,
    },
    /// Queue a fetch of these entities now.
    Resync {
        #[arg(required = true, value_name = "ENTITY_ID")]
        entity_ids: Vec<String>,
    },
    /// Pull every entity from Fenergo's paged entity list into the reporting store (resumes an
    /// interrupted run from its saved cursor).
    Backfill {
        /// Start from the beginning even if an earlier backfill was interrupted.
        #[arg(long)]
        restart: bool,
        /// Entities per page (default: reconcile.page_size).
        #[arg(long)]
        page_size: Option<usize>,
    },
    /// Create or upgrade the outbox and the reporting store, then exit.
    Migrate {
        /// Also let this PostgreSQL role read every reporting table and view (analysts' role).
        #[arg(long, value_name = "ROLE")]
        grant_read: Option<String>,
    },
    /// Exit 0 if the running service answers /readyz with 200, else 1 (for container health checks).
    Health {
        /// Address to probe (default: server.listen, with 0.0.0.0 taken as 127.0.0.1).
        #[arg(long)]
        addr: Option<std::net::SocketAddr>,
        #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
    /// Run the simulator and the service on loopback, send a realistic burst, print what happened.
    #[cfg(feature = "simulator")]
    Demo {
        /// Keep the temporary store afterwards, for exploring with sqlite3.
        #[arg(long)]
        keep: bool,
    },
    /// Serve a Fenergo simulator (token, entity query, polling feed, paged list APIs) for local
    /// trials; print a configuration for `serve`, and optionally send it signed webhooks.
    #[cfg(feature = "simulator")]
    Simulator(SimulatorArgs),
    /// Inspect the configuration.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Work with webhook signatures.
    #[command(subcommand)]
    Signature(SignatureCommand),
}

#[derive(Args)]
struct ServeArgs {
    /// Receive webhooks only; run no sync worker.
    #[arg(long, conflicts_with = "sync_only")]
    ingest_only: bool,
    /// Run the sync worker only; open no webhook listener.
    #[arg(long)]
    sync_only: bool,
}

#[cfg(feature = "simulator")]
#[derive(Args)]
struct SimulatorArgs {
    #[arg(long, default_value = "127.0.0.1:8089")]
    listen: std::net::SocketAddr,
    /// Sample entities to create.
    #[arg(long, default_value_t = 100)]
    entities: usize,
    /// Write the configuration for `fenx-sync serve --config` here instead of printing it.
    #[arg(long, value_name = "PATH")]
    write_config: Option<PathBuf>,
    /// Send signed webhooks (one entity update each) to this URL, e.g.
    /// http://127.0.0.1:8080/webhooks/fenergo.
    #[arg(long, value_name = "URL")]
    send_to: Option<String>,
    /// Webhooks per second for --send-to.
    #[arg(long, default_value_t = 1.0, requires = "send_to")]
    rate: f64,
    /// Stop after this many webhooks (default: until stopped).
    #[arg(long, requires = "send_to")]
    count: Option<u64>,
    /// The webhook secret to sign with (and to write into the configuration).
    #[arg(long, default_value = fenx_sync::sim::STANDALONE_WEBHOOK_SECRET)]
    webhook_secret: String,
}

#[derive(Subcommand)]
enum DeadLetterCommand {
    /// The most recent dead letters.
    List {
        #[arg(long, default_value_t = 50)]
        limit: usize,
        #[arg(long)]
        json: bool,
    },
    /// One notification in full, with its raw body.
    Show { id: String },
    /// Put dead letters back in the queue with a fresh attempt count.
    Retry {
        /// Notification ids.
        ids: Vec<String>,
        /// Every dead letter of this event type.
        #[arg(long, conflicts_with_all = ["ids", "all"])]
        event_type: Option<String>,
        /// Every dead letter.
        #[arg(long, conflicts_with = "ids")]
        all: bool,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Load and validate the configuration, then print it with secrets redacted.
    Check,
}

#[derive(Subcommand)]
enum SignatureCommand {
    /// Say which recipe, if any, produced a captured delivery's signature.
    Detect {
        /// File holding the webhook secret as configured in Fenergo (trailing newline ignored).
        #[arg(long, value_name = "FILE")]
        secret_file: PathBuf,
        /// File holding the exact body bytes of the delivery.
        #[arg(long, value_name = "FILE")]
        body_file: PathBuf,
        /// The x-fenx-signature header value.
        #[arg(long)]
        signature: String,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("fenx-sync: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let sources = Sources { file: cli.config };
    match cli.command {
        Command::Serve(args) => serve(Settings::load(&sources)?, args),
        Command::Status { json } => {
            let settings = Settings::load(&sources)?;
            let status = open_admin(&settings)?.status()?;
            let refused = credentials_refused(&settings)?;
            if json {
                let mut value = status_json(&status)?;
                value["fenergo_credentials_refused"] = match &refused {
                    Some(r) => {
                        serde_json::json!({"since": r.since.to_rfc3339(), "reason": r.value})
                    }
                    None => serde_json::Value::Null,
                };
                println!("{}", serde_json::to_string_pretty(&value)?);
            } else {
                print_status(&status);
                print_store_space(&settings);
                if let Some(r) = refused {
                    println!(
                        "\nFenergo credentials refused since {}: {}",
                        r.since.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                        r.value
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::DeadLetters(command) => dead_letters(&Settings::load(&sources)?, command),
        Command::Replay { event_type } => {
            let n = open_admin(&Settings::load(&sources)?)?.replay_ignored(&event_type)?;
            println!("{n} ignored notification(s) of type {event_type} queued again");
            Ok(ExitCode::SUCCESS)
        }
        Command::Resync { entity_ids } => {
            let ids = open_admin(&Settings::load(&sources)?)?.resync(&entity_ids)?;
            println!("queued {} entity fetch(es): {}", ids.len(), ids.join(", "));
            Ok(ExitCode::SUCCESS)
        }
        Command::Migrate { grant_read } => {
            let settings = Settings::load(&sources)?;
            fenx_sync::outbox::open_connection(
                &settings.store.dir,
                fenx_sync::outbox::Durability::Full,
                settings.store.busy_timeout,
            )?;
            let runtime = runtime()?;
            let reporting = runtime.block_on(fenx_sync::store::open(&settings))?;
            if let Some(role) = grant_read {
                runtime.block_on(reporting.grant_read(&role))?;
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
        Command::Backfill { restart, page_size } => {
            backfill(Settings::load(&sources)?, restart, page_size)
        }
        #[cfg(feature = "simulator")]
        Command::Demo { keep } => {
            let runtime = runtime()?;
            let report = runtime.block_on(fenx_sync::demo::run(keep, &mut std::io::stdout()))?;
            let settled = report.dead == 0 && report.entities > 0;
            Ok(if settled {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        #[cfg(feature = "simulator")]
        Command::Simulator(args) => {
            telemetry::init(&Settings::load(&sources)?.log)?;
            let options = fenx_sync::sim::StandaloneOptions {
                listen: args.listen,
                entities: args.entities,
                webhook_secret: args.webhook_secret,
                write_config: args.write_config,
                send_to: args.send_to,
                rate: args.rate,
                count: args.count,
                ..Default::default()
            };
            runtime()?.block_on(fenx_sync::sim::run_standalone(options, shutdown_signal()))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Health { addr, timeout } => health(&Settings::load(&sources)?, addr, timeout),
        Command::Config(ConfigCommand::Check) => config_check(&sources),
        Command::Signature(SignatureCommand::Detect {
            secret_file,
            body_file,
            signature,
        }) => {
            let secret = std::fs::read_to_string(&secret_file)
                .with_context(|| format!("cannot read --secret-file {}", secret_file.display()))?;
            let secret = secret.trim_end_matches(['\r', '\n']);
            let body = std::fs::read(&body_file)
                .with_context(|| format!("cannot read --body-file {}", body_file.display()))?;
            let found = signature::detect(secret, &body, &signature);
            if found.is_empty() {
                println!(
                    "no recipe matches: check the secret, and that the body file holds the exact bytes received"
                );
                return Ok(ExitCode::FAILURE);
            }
            for recipe in &found {
                println!("{recipe}");
            }
            println!("pin it with: webhook.signature.recipe = \"{}\"", found[0]);
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Prints the effective configuration (stdout, valid TOML) and, on stderr, the file it came from,
/// what `serve` would refuse to start without (exit 1), and what sync or polling lacks.
fn config_check(sources: &Sources) -> anyhow::Result<ExitCode> {
    match sources.file_in_use() {
        Some(file) => eprintln!("fenx-sync: configuration loaded from {}", file.display()),
        None => eprintln!(
            "fenx-sync: no configuration file (none given, no FENX_CONFIG, no ./fenx-sync.toml): \
             defaults and FENX_* environment variables only"
        ),
    }
    let settings = Settings::load(sources)?;
    print!("{}", settings.to_redacted_toml());
    let missing = settings.fenergo.missing();
    if (settings.sync.enabled || settings.polling.enabled) && !missing.is_empty() {
        eprintln!(
            "fenx-sync: warning: sync is enabled but these settings are missing, so `serve` would \
             receive webhooks without syncing them: {}",
            missing.join(", ")
        );
    }
    if let Err(error) = settings.require_webhook_secrets() {
        eprintln!("fenx-sync: `serve` would refuse to start: {error}");
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

fn serve(settings: Settings, args: ServeArgs) -> anyhow::Result<ExitCode> {
    let mut settings = settings;
    if args.ingest_only {
        settings.sync.enabled = false;
    }
    if !args.sync_only {
        settings.require_webhook_secrets()?;
    }
    telemetry::init(&settings.log)?;
    runtime()?.block_on(async {
        let webhook = if args.sync_only {
            None
        } else {
            Some(bind(settings.server.listen, "server.listen").await?)
        };
        let admin = if settings.admin.enabled {
            Some(bind(settings.admin.listen, "admin.listen").await?)
        } else {
            None
        };
        let listeners = fenx_sync::Listeners { webhook, admin };
        fenx_sync::run(settings, listeners, shutdown_signal()).await?;
        Ok(ExitCode::SUCCESS)
    })
}

fn backfill(
    settings: Settings,
    restart: bool,
    page_size: Option<usize>,
) -> anyhow::Result<ExitCode> {
    use fenx_sync::store::RunKind;
    use indicatif::{ProgressBar, ProgressStyle};
    telemetry::init(&settings.log)?;
    let metrics = std::sync::Arc::new(telemetry::Metrics::new());
    let client = fenx_sync::fenergo::FenergoClient::new(&settings.fenergo, metrics)?;
    // A refusal ends the backfill with one line (below), not a log line as well.
    client.log_refusals(false);
    let runtime = runtime()?;
    let store = runtime.block_on(fenx_sync::store::open(&settings))?;
    // Entities a resumed run already counted: the rate and ETA cover this run's work only.
    let resumed_from = match runtime.block_on(store.running_reconcile(RunKind::Backfill))? {
        Some(run) if !restart => run.counts.seen,
        _ => 0,
    };
    let reconciler = fenx_sync::reconcile::Reconciler::new(
        std::sync::Arc::new(client),
        store,
        page_size.unwrap_or(settings.reconcile.page_size),
    );
    // A bar on a terminal; one log line per page elsewhere (hidden bar).
    let bar = if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        ProgressBar::new(0)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} entities  {msg}")
            .expect("a valid template"),
    );
    let started = std::time::Instant::now();
    let mut stored_this_run = 0;
    let walk = reconciler.run(RunKind::Backfill, !restart, |run| {
        stored_this_run = run.counts.seen - resumed_from;
        let rate = progress_rate(stored_this_run, started.elapsed());
        let eta = run
            .total_items
            .filter(|_| rate > 0.0)
            .map(|total| Duration::from_secs_f64((total - run.counts.seen).max(0) as f64 / rate));
        if let Some(total) = run.total_items {
            bar.set_length(u64::try_from(total).unwrap_or(0));
        }
        bar.set_position(u64::try_from(run.counts.seen).unwrap_or(0));
        bar.set_message(format!(
            "{:.0}/s  ETA {}  {} new, {} updated",
            rate,
            eta.map_or("-".into(), |d| humantime::format_duration(
                Duration::from_secs(d.as_secs())
            )
            .to_string()),
            run.counts.added,
            run.counts.updated
        ));
        if bar.is_hidden() {
            tracing::info!(
                seen = run.counts.seen,
                total = run.total_items,
                per_second = rate.round(),
                "backfill page stored"
            );
        }
    });
    let run = runtime.block_on(async {
        tokio::select! {
            run = walk => Some(run),
            _ = stop_requested() => None,
        }
    });
    bar.finish_and_clear();
    let Some(run) = run else {
        eprintln!(
            "backfill stopped; run again to resume ({stored_this_run} entities stored in this run)"
        );
        return Ok(ExitCode::from(130));
    };
    let run = match run {
        Err(error @ fenx_sync::reconcile::ReconcileError::CredentialsRefused(_)) => {
            eprintln!(
                "fenx-sync: backfill stopped: {error}; fix fenergo.client_id / fenergo.client_secret \
                 (or fenergo.scope) and run it again"
            );
            return Ok(ExitCode::FAILURE);
        }
        run => run.context("backfill stopped; run again to resume from the last stored page")?,
    };
    let c = run.counts;
    println!(
        "backfill finished: {} entities read, {} added, {} updated, {} already current ({:.0}/s)",
        c.seen,
        c.added,
        c.updated,
        c.unchanged,
        progress_rate(c.seen - resumed_from, started.elapsed())
    );
    Ok(ExitCode::SUCCESS)
}

/// Entities per second over `elapsed`.
fn progress_rate(entities: i64, elapsed: Duration) -> f64 {
    entities as f64 / elapsed.as_secs_f64().max(1e-3)
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

async fn bind(addr: std::net::SocketAddr, key: &str) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {key} = {addr}"))
}

/// Completes on SIGTERM (Docker, systemd, Kubernetes) or SIGINT (Ctrl-C), saying so.
async fn shutdown_signal() {
    stop_requested().await;
    tracing::info!("shutdown requested; draining in-flight requests");
}

/// Completes on SIGTERM or SIGINT.
async fn stop_requested() {
    let mut terminate = match tokio::signal::unix::signal(
        tokio::signal::unix::SignalKind::terminate(),
    ) {
        Ok(signal) => signal,
        Err(error) => {
            tracing::error!(%error, "cannot listen for SIGTERM; only Ctrl-C will stop fenx-sync");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
}

fn open_admin(settings: &Settings) -> anyhow::Result<OutboxAdmin> {
    Ok(OutboxAdmin::open(
        &settings.store.dir,
        settings.store.busy_timeout,
    )?)
}

fn dead_letters(settings: &Settings, command: DeadLetterCommand) -> anyhow::Result<ExitCode> {
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

fn health(
    settings: &Settings,
    addr: Option<std::net::SocketAddr>,
    timeout: Duration,
) -> anyhow::Result<ExitCode> {
    let mut addr = addr.unwrap_or(settings.server.listen);
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    match probe_ready(addr, timeout) {
        Ok(200) => {
            println!("ready");
            Ok(ExitCode::SUCCESS)
        }
        Ok(status) => {
            println!("not ready: /readyz answered {status}");
            Ok(ExitCode::FAILURE)
        }
        Err(error) => {
            println!("not ready: {error}");
            Ok(ExitCode::FAILURE)
        }
    }
}

/// A minimal HTTP/1.1 GET of `/readyz` (the container image has no curl).
fn probe_ready(addr: std::net::SocketAddr, timeout: Duration) -> std::io::Result<u16> {
    use std::io::Read;
    let mut stream = std::net::TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    write!(
        stream,
        "GET /readyz HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut head = [0u8; 64];
    let n = stream.read(&mut head)?;
    std::str::from_utf8(&head[..n])
        .ok()
        .and_then(|text| text.split_whitespace().nth(1))
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| std::io::Error::other("not an HTTP answer"))
}

/// `status --json`: the counts keyed by name (`"by_status": {"done": 3}`), not as pairs.
fn status_json(status: &Status) -> anyhow::Result<serde_json::Value> {
    let object = |pairs: &[(String, i64)]| -> serde_json::Value {
        pairs
            .iter()
            .map(|(name, n)| (name.clone(), serde_json::Value::from(*n)))
            .collect::<serde_json::Map<_, _>>()
            .into()
    };
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
        "event type", "pending", "done", "ignored", "dead"
    );
    for e in &s.by_event_type {
        println!(
            "{:<40} {:>9} {:>9} {:>9} {:>9}",
            e.event_type, e.pending, e.done, e.ignored, e.dead
        );
    }
    let oldest = match (&s.oldest_pending_received_at, s.oldest_pending_age_secs) {
        (Some(at), Some(age)) => format!("{at} ({age} s ago)"),
        _ => "none".into(),
    };
    println!("\noldest pending:      {oldest}");
    println!("dead letters:        {}", s.dead_letters);
    println!(
        "last successful sync: {}",
        s.last_sync_at.as_deref().unwrap_or("never")
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

/// Free space against `store.min_free_bytes`, and whether `reporting.db` is there.
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
    let reporting = store.reporting_path();
    if let Some(url) = &store.reporting_url {
        println!("reporting store:     PostgreSQL {}", url.redacted());
    } else if reporting.exists() {
        println!("reporting store:     {}", reporting.display());
    } else {
        println!(
            "reporting store:     {} MISSING (a running service recreates it and re-syncs)",
            reporting.display()
        );
    }
}

/// The recorded "credentials refused" state, if the reporting store exists (status never
/// creates it).
fn credentials_refused(
    settings: &Settings,
) -> anyhow::Result<Option<fenx_sync::store::StateEntry>> {
    let path = settings.store.reporting_path();
    if settings.store.reporting_url.is_none() && !path.exists() {
        return Ok(None);
    }
    let runtime = runtime()?;
    let store = runtime.block_on(fenx_sync::store::open(settings))?;
    Ok(runtime.block_on(store.state(fenx_sync::store::StateKey::CredentialsRefused))?)
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
