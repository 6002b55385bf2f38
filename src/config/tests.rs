use std::path::Path;
use std::time::Duration;

use secrecy::ExposeSecret;

use super::*;
use crate::signature::RecipeChoice;
use figment::Jail;

fn load_in(jail: &Jail, file: Option<&str>) -> Result<Settings, ConfigError> {
    let file = file.map(|f| jail.directory().join(f));
    Settings::load(&Sources { file })
}

#[test]
fn defaults_apply_without_any_file() {
    Jail::expect_with(|jail| {
        let s = load_in(jail, None).unwrap();
        assert_eq!(s.server.listen.to_string(), "0.0.0.0:8080");
        assert_eq!(s.webhook.path, "/webhooks/fenergo");
        assert_eq!(s.store.dir, PathBuf::from("./data"));
        assert_eq!(s.webhook.signature.recipe, RecipeChoice::Auto);
        assert!(s.require_webhook_secrets().is_err());
        Ok(())
    });
}

#[test]
fn environment_overrides_the_file_and_takes_secrets_as_csv_verbatim() {
    Jail::expect_with(|jail| {
        jail.create_file(
            "c.toml",
            "[server]\nlisten = \"127.0.0.1:1\"\n[webhook]\nsecrets = [\"from-file\"]\n",
        )?;
        jail.set_env("FENX_SERVER__LISTEN", "127.0.0.1:9000");
        jail.set_env("FENX_WEBHOOK__SECRETS", "0123, \"quoted\",s3");
        jail.set_env("FENX_STORE__DIR", "/tmp/x");
        jail.set_env("FENX_WEBHOOK__SIGNATURE__RECIPE", "sha256-hex/hex");
        let s = load_in(jail, Some("c.toml")).unwrap();
        assert_eq!(s.server.listen.to_string(), "127.0.0.1:9000");
        let secrets: Vec<&str> = s
            .webhook
            .secrets
            .iter()
            .map(|s| s.expose_secret())
            .collect();
        assert_eq!(secrets, ["0123", "\"quoted\"", "s3"]);
        assert_eq!(s.store.dir, PathBuf::from("/tmp/x"));
        assert_eq!(s.webhook.signature.recipe.to_string(), "sha256-hex/hex");
        Ok(())
    });
}

#[test]
fn unrelated_fenx_variables_are_not_configuration() {
    Jail::expect_with(|jail| {
        jail.set_env("FENX_SYNC_SERVICE_HOST", "10.0.0.1");
        jail.set_env("FENX_SYNC_PORT", "tcp://10.0.0.1:8080");
        jail.set_env("FENX_TEST_POSTGRES_URL", "postgres://x");
        load_in(jail, None).unwrap();
        jail.set_env("FENX_SERVR__LISTEN", "127.0.0.1:1");
        let err = load_in(jail, None).unwrap_err().to_string();
        assert!(
            err.contains("servr"),
            "a typo in a section is still an error: {err}"
        );
        Ok(())
    });
}

#[test]
fn a_bad_value_names_the_key_and_its_source() {
    Jail::expect_with(|jail| {
        jail.set_env("FENX_SERVER__LISTEN", "not-an-address");
        let err = load_in(jail, None).unwrap_err().to_string();
        assert!(
            err.contains("listen") && err.contains("FENX_SERVER__LISTEN"),
            "{err}"
        );
        Ok(())
    });
    Jail::expect_with(|jail| {
        jail.create_file("c.toml", "[webhook.signature]\nrecipe = \"md5\"\n")?;
        let err = load_in(jail, Some("c.toml")).unwrap_err().to_string();
        assert!(
            err.contains("recipe") && err.contains("c.toml") && err.contains("sha256-hex/hex"),
            "{err}"
        );
        Ok(())
    });
    Jail::expect_with(|jail| {
        jail.create_file("c.toml", "[server]\nlisen = \"x\"\n")?;
        let err = load_in(jail, Some("c.toml")).unwrap_err().to_string();
        assert!(err.contains("lisen"), "{err}");
        Ok(())
    });
    Jail::expect_with(|jail| {
        let err = load_in(jail, Some("missing.toml")).unwrap_err().to_string();
        assert!(
            err.contains("missing.toml") && err.contains("does not exist"),
            "{err}"
        );
        Ok(())
    });
}

#[test]
fn limits_that_could_never_admit_a_request_are_refused() {
    Jail::expect_with(|jail| {
        jail.set_env("FENX_SERVER__MAX_INFLIGHT_BODY_BYTES", "1000");
        let err = load_in(jail, None).unwrap_err().to_string();
        assert!(err.contains("server.max_inflight_body_bytes"), "{err}");
        jail.set_env("FENX_SERVER__MAX_INFLIGHT_BODY_BYTES", "2000000");
        jail.set_env("FENX_SERVER__MAX_CONNECTIONS_PER_CLIENT", "0");
        let err = load_in(jail, None).unwrap_err().to_string();
        assert!(err.contains("server.max_connections_per_client"), "{err}");
        Ok(())
    });
}

#[test]
fn store_health_keys_have_defaults_and_refuse_unsafe_values() {
    Jail::expect_with(|jail| {
        let s = load_in(jail, None).unwrap();
        assert_eq!(s.store.min_free_bytes, 64 * 1024 * 1024);
        assert_eq!(s.store.retention, Duration::from_secs(90 * 24 * 3600));
        for (var, bad, key, good) in [
            (
                "FENX_STORE__WEDGED_AFTER",
                "5s",
                "store.wedged_after",
                "30s",
            ),
            (
                "FENX_STORE__RETENTION",
                "7days",
                "store.retention",
                "90days",
            ),
            (
                "FENX_STORE__PROBE_INTERVAL",
                "0s",
                "store.probe_interval",
                "2s",
            ),
        ] {
            jail.set_env(var, bad);
            let err = load_in(jail, None).unwrap_err().to_string();
            assert!(err.contains(key), "{var}={bad}: {err}");
            jail.set_env(var, good);
        }
        jail.set_env("FENX_STORE__MIN_FREE_BYTES", "1048576");
        jail.set_env("FENX_STORE__RETENTION", "40days");
        let s = load_in(jail, None).unwrap();
        assert_eq!(s.store.min_free_bytes, 1 << 20);
        assert_eq!(s.store.retention, Duration::from_secs(40 * 24 * 3600));
        Ok(())
    });
}

#[test]
fn secrets_come_from_files_and_systemd_credentials() {
    Jail::expect_with(|jail| {
        jail.create_file("secrets.txt", "# rotated 2026-11\nfirst\n\n second \n")?;
        jail.create_dir("creds")?;
        jail.create_file("creds/webhook-secrets", "third\n")?;
        jail.set_env(
            "FENX_WEBHOOK__SECRETS_FILE",
            jail.directory().join("secrets.txt").display(),
        );
        jail.set_env(
            "CREDENTIALS_DIRECTORY",
            jail.directory().join("creds").display(),
        );
        let s = load_in(jail, None).unwrap();
        let secrets: Vec<&str> = s
            .webhook
            .secrets
            .iter()
            .map(|s| s.expose_secret())
            .collect();
        assert_eq!(secrets, ["first", "second", "third"]);
        jail.set_env("FENX_WEBHOOK__SECRETS_FILE", "/nonexistent/secret");
        let err = load_in(jail, None).unwrap_err().to_string();
        assert!(err.contains("/nonexistent/secret"), "{err}");
        Ok(())
    });
}

#[test]
fn the_reporting_password_comes_from_the_url_then_the_file_then_the_credential() {
    Jail::expect_with(|jail| {
        jail.create_file("pw.txt", "from-file\n")?;
        jail.create_dir("creds")?;
        jail.create_file("creds/reporting-db-password", "from-credential\n")?;
        let dir = jail.directory().to_owned();
        jail.set_env("CREDENTIALS_DIRECTORY", dir.join("creds").display());
        let password = |jail: &Jail| {
            load_in(jail, None)
                .unwrap()
                .store
                .reporting_password
                .map(|p| p.expose_secret().to_owned())
        };
        jail.set_env("FENX_STORE__REPORTING_URL", "postgresql://fenx@db/r");
        assert_eq!(password(jail).as_deref(), Some("from-credential"));
        jail.set_env(
            "FENX_STORE__REPORTING_PASSWORD_FILE",
            dir.join("pw.txt").display(),
        );
        assert_eq!(password(jail).as_deref(), Some("from-file"));
        jail.set_env("FENX_STORE__REPORTING_URL", "postgresql://fenx:in-url@db/r");
        assert_eq!(password(jail), None);
        let s = load_in(jail, None).unwrap();
        for shown in [s.to_redacted_toml(), format!("{s:?}")] {
            assert!(
                !shown.contains("in-url") && !shown.contains("from-"),
                "{shown}"
            );
            assert!(
                shown.contains("postgresql://fenx:[redacted]@db/r"),
                "{shown}"
            );
        }
        Ok(())
    });
}

#[test]
fn redacted_output_never_contains_a_secret() {
    Jail::expect_with(|jail| {
        jail.set_env("FENX_WEBHOOK__SECRETS", "super-secret-value");
        let s = load_in(jail, None).unwrap();
        let text = s.to_redacted_toml();
        assert!(!text.contains("super-secret-value"), "{text}");
        assert!(
            text.contains("[redacted]") && text.contains("listen"),
            "{text}"
        );
        assert!(!format!("{s:?}").contains("super-secret-value"));
        Ok(())
    });
}

#[test]
fn the_shipped_config_file_is_valid_and_documents_every_key() {
    Jail::expect_with(|_jail| {
        let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join(DEFAULT_CONFIG_FILE);
        let loaded = Settings::load(&Sources {
            file: Some(shipped.clone()),
        })
        .unwrap();
        assert_eq!(loaded.sync.routes, SyncSettings::default().routes);
        let text = std::fs::read_to_string(&shipped).unwrap();
        let effective: toml::Table =
            toml::from_str(&Settings::default().to_redacted_toml()).unwrap();
        assert_documented(&text, "", &effective);
        Ok(())
    });
}

fn assert_documented(text: &str, prefix: &str, table: &toml::Table) {
    for (key, value) in table {
        match value.as_table() {
            Some(inner) => {
                let path = format!("{prefix}{key}");
                assert!(
                    text.contains(&format!("[{path}]")),
                    "[{path}] is not in {DEFAULT_CONFIG_FILE}"
                );
                assert_documented(text, &format!("{path}."), inner);
            }
            None => assert!(
                text.contains(&format!("{key} =")) || text.contains(&format!("\"{key}\" =")),
                "{prefix}{key} is not documented in {DEFAULT_CONFIG_FILE}"
            ),
        }
    }
}
