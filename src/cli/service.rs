//! Commands that run the service or talk to it: `serve`, `backfill`, `health`, and with the
//! simulator feature `demo` and `simulator`; the async runtime and signal handling they share.
//!
//! It must never start work before the configuration has loaded and been checked.

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use fenx_sync::config::Settings;
use fenx_sync::telemetry;

use super::args::ServeArgs;
#[cfg(feature = "simulator")]
use super::args::SimulatorArgs;

pub fn serve(settings: Settings, args: ServeArgs) -> anyhow::Result<ExitCode> {
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

pub fn backfill(
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

/// The async runtime, with one core fewer than the machine has (at least one), unless
/// `TOKIO_WORKER_THREADS` says otherwise: the outbox writer thread, which every webhook's 200
/// waits on, then has a core to itself instead of being preempted by the threads feeding it
/// (on 2 cores, 15-20% more requests per second at 1 and 16 connections; README, Benchmarks).
pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    // Read here rather than by tokio, which panics on a value it cannot use.
    let threads = match std::env::var("TOKIO_WORKER_THREADS") {
        Ok(value) => value
            .trim()
            .parse::<std::num::NonZeroUsize>()
            .map(usize::from)
            .with_context(|| {
                format!(
                    "TOKIO_WORKER_THREADS={value:?}: expected a whole number of threads, 1 or more"
                )
            })?,
        Err(_) => async_worker_threads(std::thread::available_parallelism().map_or(1, usize::from)),
    };
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

fn async_worker_threads(cores: usize) -> usize {
    cores.saturating_sub(1).max(1)
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

pub fn health(
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

/// `demo`: exit 0 only when the run settled with entities stored and nothing dead.
#[cfg(feature = "simulator")]
pub fn demo(keep: bool) -> anyhow::Result<ExitCode> {
    let report = runtime()?.block_on(fenx_sync::demo::run(keep, &mut std::io::stdout()))?;
    let settled = report.dead == 0 && report.entities > 0;
    Ok(if settled {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// `simulator`: serves the stand-alone simulator until SIGTERM or Ctrl-C.
#[cfg(feature = "simulator")]
pub fn simulator(settings: &Settings, args: SimulatorArgs) -> anyhow::Result<ExitCode> {
    telemetry::init(&settings.log)?;
    let options = fenx_sim::StandaloneOptions {
        listen: args.listen,
        entities: args.entities,
        webhook_secret: args.webhook_secret,
        write_config: args.write_config,
        send_to: args.send_to,
        rate: args.rate,
        count: args.count,
        ..Default::default()
    };
    runtime()?.block_on(fenx_sim::run_standalone(options, shutdown_signal()))?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_runtime_leaves_one_core_to_the_outbox_writer_but_never_has_none() {
        let threads: Vec<usize> = [1, 2, 8].map(super::async_worker_threads).into();
        assert_eq!(threads, [1, 1, 7]);
    }
}
