//! The command line: every subcommand and flag, as clap parses them. Pure declarations; what a
//! command does is in the module that runs it.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

#[derive(Parser)]
#[command(version, about = "Fenergo webhook receiver and data-sync sidecar")]
pub(crate) struct Cli {
    /// Configuration file (default: $FENX_CONFIG, else config/fenx-sync.toml if present).
    #[arg(long, global = true, value_name = "PATH")]
    pub(crate) config: Option<PathBuf>,
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Subcommand)]
pub(crate) enum Command {
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
pub(crate) struct ServeArgs {
    /// Receive webhooks only; run no sync worker.
    #[arg(long, conflicts_with = "sync_only")]
    pub(crate) ingest_only: bool,
    /// Run the sync worker only; open no webhook listener.
    #[arg(long)]
    pub(crate) sync_only: bool,
}

#[cfg(feature = "simulator")]
#[derive(Args)]
pub(crate) struct SimulatorArgs {
    #[arg(long, default_value = "127.0.0.1:8089")]
    pub(crate) listen: std::net::SocketAddr,
    /// Sample entities to create.
    #[arg(long, default_value_t = 100)]
    pub(crate) entities: usize,
    /// Write the configuration for `fenx-sync serve --config` here instead of printing it.
    #[arg(long, value_name = "PATH")]
    pub(crate) write_config: Option<PathBuf>,
    /// Send signed webhooks (one entity update each) to this URL, e.g.
    /// http://127.0.0.1:8080/webhooks/fenergo.
    #[arg(long, value_name = "URL")]
    pub(crate) send_to: Option<String>,
    /// Webhooks per second for --send-to.
    #[arg(long, default_value_t = 1.0, requires = "send_to")]
    pub(crate) rate: f64,
    /// Stop after this many webhooks (default: until stopped).
    #[arg(long, requires = "send_to")]
    pub(crate) count: Option<u64>,
    /// The webhook secret to sign with (and to write into the configuration).
    #[arg(long, default_value = fenx_sim::STANDALONE_WEBHOOK_SECRET)]
    pub(crate) webhook_secret: String,
}

#[derive(Subcommand)]
pub(crate) enum DeadLetterCommand {
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
pub(crate) enum ConfigCommand {
    /// Load and validate the configuration, then print it with secrets redacted.
    Check,
}

#[derive(Subcommand)]
pub(crate) enum SignatureCommand {
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
