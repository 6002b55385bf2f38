//! The `fenx-sync` binary: parses the command line, loads configuration and hands each
//! subcommand to its module under `cli/`, which installs logging where it runs the service.
//! `anyhow` lives in the binary (here and `cli/`) and nowhere in the library.

mod cli;

use std::process::ExitCode;

use clap::Parser;

use cli::args::{Cli, Command, ConfigCommand, SignatureCommand};
use cli::{admin, check, service};
use fenx_sync::config::{Settings, Sources};

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
    let settings = || Settings::load(&sources);
    match cli.command {
        Command::Serve(args) => service::serve(settings()?, args),
        Command::Status { json } => admin::status(&settings()?, json),
        Command::DeadLetters(command) => admin::dead_letters(&settings()?, command),
        Command::Replay { event_type } => admin::replay(&settings()?, &event_type),
        Command::Resync { entity_ids } => admin::resync(&settings()?, &entity_ids),
        Command::Migrate { grant_read } => admin::migrate(&settings()?, grant_read.as_deref()),
        Command::Backfill { restart, page_size } => {
            service::backfill(settings()?, restart, page_size)
        }
        #[cfg(feature = "simulator")]
        Command::Demo { keep } => service::demo(keep),
        #[cfg(feature = "simulator")]
        Command::Simulator(args) => service::simulator(&settings()?, args),
        Command::Health { addr, timeout } => service::health(&settings()?, addr, timeout),
        Command::Config(ConfigCommand::Check) => check::config_check(&sources),
        Command::Signature(SignatureCommand::Detect {
            secret_file,
            body_file,
            signature,
        }) => check::signature_detect(&secret_file, &body_file, &signature),
    }
}
