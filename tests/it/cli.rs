//! The command line as an operator uses it: exit codes and what is printed.

use std::process::{Command, Output};

fn fenx(args: &[&str], env: &[(&str, &str)]) -> Output {
    let dir = tempfile::tempdir().unwrap();
    let mut command = Command::new(env!("CARGO_BIN_EXE_fenx-sync"));
    command
        .args(args)
        .current_dir(dir.path())
        .env_remove("FENX_CONFIG");
    for (key, value) in env {
        command.env(key, value);
    }
    command.output().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn config_check_prints_the_effective_config_with_secrets_redacted() {
    let out = fenx(
        &["config", "check"],
        &[
            ("FENX_WEBHOOK__SECRETS", "hunter2,hunter3"),
            ("FENX_SERVER__LISTEN", "127.0.0.1:9000"),
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("listen = \"127.0.0.1:9000\""), "{stdout}");
    assert!(stdout.contains("[redacted]"), "{stdout}");
    assert!(!stdout.contains("hunter2") && !text(&out.stderr).contains("hunter2"));
}

#[test]
fn a_bad_value_stops_start_up_naming_the_key_and_source() {
    let out = fenx(
        &["serve"],
        &[
            ("FENX_WEBHOOK__SECRETS", "s"),
            ("FENX_SERVER__MAX_BODY_BYTES", "lots"),
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("server.max_body_bytes") && stderr.contains("FENX_SERVER__MAX_BODY_BYTES"),
        "{stderr}"
    );

    let out = fenx(&["serve"], &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("no webhook secret configured"));

    let out = fenx(&["--config", "/nonexistent.toml", "config", "check"], &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("/nonexistent.toml does not exist"));
}

#[test]
fn signature_detect_names_the_recipe_of_a_captured_delivery() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret");
    let body = dir.path().join("body");
    std::fs::write(&secret, "secret\n").unwrap();
    std::fs::write(
        &body,
        r#"{"Id":"09916cea-78b8-524c-a6ad-bd7397bcd4e6","EventType":"entitydata:created"}"#,
    )
    .unwrap();
    let (secret, body) = (secret.to_str().unwrap(), body.to_str().unwrap());
    let args = |sig: &'static str| {
        [
            "signature",
            "detect",
            "--secret-file",
            secret,
            "--body-file",
            body,
            "--signature",
            sig,
        ]
    };

    // The contract's candidate for HMAC keyed with the lower-case hex of SHA-256(secret).
    let out = fenx(
        &args("sha256=9cd720da98be240a5d61ac8e5ecafad89e37c3c561c32bec3280579d8c6a5195"),
        &[],
    );
    assert!(out.status.success());
    assert!(
        text(&out.stdout).starts_with("sha256-hex/hex\n"),
        "{}",
        text(&out.stdout)
    );

    let out = fenx(
        &args("0000000000000000000000000000000000000000000000000000000000000000"),
        &[],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stdout).contains("no recipe matches"));
}
