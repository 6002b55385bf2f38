//! Commands that inspect without running anything: `config check` and `signature detect`.
//!
//! They never write a file and never print a secret (configuration is printed redacted).

use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use fenx_sync::config::{Settings, Sources};
use fenx_sync::signature;

/// Prints the effective configuration (stdout, valid TOML) and, on stderr, the file it came from,
/// what `serve` would refuse to start without (exit 1), and what sync or polling lacks.
pub fn config_check(sources: &Sources) -> anyhow::Result<ExitCode> {
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

/// Says which recipe, if any, produced `signature` over the body in `body_file` with the secret
/// in `secret_file`.
pub fn signature_detect(
    secret_file: &Path,
    body_file: &Path,
    signature: &str,
) -> anyhow::Result<ExitCode> {
    let secret = std::fs::read_to_string(secret_file)
        .with_context(|| format!("cannot read --secret-file {}", secret_file.display()))?;
    let secret = secret.trim_end_matches(['\r', '\n']);
    let body = std::fs::read(body_file)
        .with_context(|| format!("cannot read --body-file {}", body_file.display()))?;
    let found = signature::detect(secret, &body, signature);
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
