//! The `fenx-sync` binary: parses the command line, loads configuration, installs logging and
//! hands over to the library. `anyhow` lives here and nowhere else.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

use fenx_sync::config::{Settings, Sources};
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
    /// Receive webhooks and store them in the outbox.
    Serve,
    /// Inspect the configuration.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Work with webhook signatures.
    #[command(subcommand)]
    Signature(SignatureCommand),
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
        Command::Serve => serve(Settings::load(&sources)?),
        Command::Config(ConfigCommand::Check) => {
            let settings = Settings::load(&sources)?;
            print!("{}", settings.to_redacted_toml());
            if let Err(warning) = settings.require_webhook_secrets() {
                eprintln!("fenx-sync: warning: {warning}");
            }
            Ok(ExitCode::SUCCESS)
        }
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

fn serve(settings: Settings) -> anyhow::Result<ExitCode> {
    settings.require_webhook_secrets()?;
    telemetry::init(&settings.log)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(settings.server.listen)
            .await
            .with_context(|| {
                format!(
                    "cannot listen on server.listen = {}",
                    settings.server.listen
                )
            })?;
        fenx_sync::run(settings, listener, shutdown_signal()).await?;
        Ok(ExitCode::SUCCESS)
    })
}

/// Completes on SIGTERM (Docker, systemd, Kubernetes) or SIGINT (Ctrl-C).
async fn shutdown_signal() {
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
    tracing::info!("shutdown requested; draining in-flight requests");
}
