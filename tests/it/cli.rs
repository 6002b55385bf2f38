//! The command line as an operator uses it: exit codes and what is printed.

use std::process::{Command, Output};

use crate::helpers::{TestApp, notification};

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

/// Runs the binary with the store of a running in-process service.
fn fenx_on(app: &TestApp, args: &[&str]) -> Output {
    let dir = app.dir.path().to_str().unwrap().to_owned();
    fenx(args, &[("FENX_STORE__DIR", dir.as_str())])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_dead_letters_replay_and_resync_work_against_a_running_service() {
    let app = TestApp::spawn().await;
    for (id, event_type) in [
        ("a", "entitydata:created"),
        ("b", "journey:taskcompleted"),
        ("c", "journey:taskcompleted"),
    ] {
        assert_eq!(
            app.post_signed(&notification(id, event_type))
                .await
                .status(),
            200
        );
    }
    app.post_signed(&notification("a", "entitydata:created"))
        .await;
    // Settle rows the way the worker would, so there is something to inspect.
    app.outbox()
        .execute_batch(
            "UPDATE notification SET status = 'dead', last_status = 403, last_error = 'HTTP 403: forbidden',
                    processed_at = '2026-01-01T00:00:00.000Z' WHERE id = 'a';
             UPDATE notification SET status = 'ignored' WHERE event_type = 'journey:taskcompleted';",
        )
        .unwrap();

    let out = fenx_on(&app, &["status", "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["dead_letters"], 1);
    assert_eq!(status["duplicates_received"], 1);
    assert_eq!(
        status["signature_recipes"][0],
        serde_json::json!(["sha256-hex/hex", 3])
    );
    let table = text(&fenx_on(&app, &["status"]).stdout);
    assert!(
        table.contains("journey:taskcompleted") && table.contains("dead letters:        1"),
        "{table}"
    );

    let list = text(&fenx_on(&app, &["dead-letters", "list"]).stdout);
    assert!(
        list.contains("HTTP 403: forbidden") && list.contains("entitydata:created"),
        "{list}"
    );
    let shown: serde_json::Value =
        serde_json::from_slice(&fenx_on(&app, &["dead-letters", "show", "a"]).stdout).unwrap();
    assert_eq!(shown["raw"], notification("a", "entitydata:created"));
    let missing = fenx_on(&app, &["dead-letters", "show", "nope"]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(text(&missing.stderr).contains("no notification with id \"nope\""));

    let retried = fenx_on(&app, &["dead-letters", "retry", "--all"]);
    assert!(text(&retried.stdout).starts_with("1 dead letter(s) queued again"));
    let replayed = fenx_on(&app, &["replay", "--event-type", "JOURNEY:TaskCompleted"]);
    assert!(
        text(&replayed.stdout).starts_with("2 ignored notification(s)"),
        "{}",
        text(&replayed.stdout)
    );
    let pending: i64 = app
        .outbox()
        .query_row(
            "SELECT count(*) FROM notification WHERE status = 'pending'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(pending, 3);

    let resync = fenx_on(&app, &["resync", "E-1", "E-2"]);
    assert!(text(&resync.stdout).starts_with("queued 2 entity fetch(es)"));
    let queued: i64 = app
        .outbox()
        .query_row("SELECT count(*) FROM notification WHERE source = 'resync' AND entity_key IN ('E-1','E-2')", [], |r| r.get(0))
        .unwrap();
    assert_eq!(queued, 2);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_exits_0_only_when_the_service_is_ready() {
    let app = TestApp::spawn().await;
    let addr = app.addr.to_string();
    let ok = fenx(&["health", "--addr", &addr], &[]);
    assert_eq!(ok.status.code(), Some(0), "{}", text(&ok.stdout));
    let blocker = app.outbox();
    blocker.execute_batch("BEGIN IMMEDIATE").unwrap();
    let busy = fenx(&["health", "--addr", &addr, "--timeout", "5s"], &[]);
    assert_eq!(busy.status.code(), Some(1));
    assert!(text(&busy.stdout).contains("503"), "{}", text(&busy.stdout));
    blocker.execute_batch("ROLLBACK").unwrap();
    app.stop().await;
    let down = fenx(&["health", "--addr", &addr, "--timeout", "1s"], &[]);
    assert_eq!(down.status.code(), Some(1));
}

#[test]
fn admin_commands_say_clearly_when_there_is_no_outbox() {
    let out = fenx(&["status"], &[("FENX_STORE__DIR", "/nonexistent/fenx")]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("no outbox at /nonexistent/fenx/outbox.db"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"));
}

#[test]
fn migrate_creates_the_schema_and_is_idempotent() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().to_str().unwrap();
    for _ in 0..2 {
        let out = fenx(&["migrate"], &[("FENX_STORE__DIR", store)]);
        assert!(out.status.success(), "{}", text(&out.stderr));
    }
    let conn = rusqlite::Connection::open(dir.path().join("outbox.db")).unwrap();
    let version: i64 = conn
        .query_row("SELECT max(version) FROM schema_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(version, 2);
}

#[test]
fn backfill_without_fenergo_credentials_says_which_keys_are_missing() {
    let dir = tempfile::tempdir().unwrap();
    let out = fenx(
        &["backfill"],
        &[("FENX_STORE__DIR", dir.path().to_str().unwrap())],
    );
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("fenergo.tenant_id, fenergo.client_id, fenergo.client_secret not set"),
        "{stderr}"
    );
}

/// Starts a long-running subcommand and returns it with the first value of `field=` in its log.
fn spawn_logging(
    args: &[&str],
    env: &[(&str, String)],
    field: &str,
) -> (std::process::Child, String) {
    use std::io::{BufRead, BufReader};
    let mut command = Command::new(env!("CARGO_BIN_EXE_fenx-sync"));
    command
        .args(args)
        .env_remove("FENX_CONFIG")
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    for (key, value) in env {
        command.env(key, value);
    }
    let mut child = command.spawn().unwrap();
    let lines = BufReader::new(child.stderr.take().unwrap()).lines();
    // Read on a thread so a process that never logs the field fails the test instead of hanging it.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let pattern = format!("\"{field}\":\"");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let value = loop {
        let wait = deadline.saturating_duration_since(std::time::Instant::now());
        let Ok(line) = rx.recv_timeout(wait) else {
            let _ = child.kill();
            panic!("{args:?} did not log {field} within 10 s");
        };
        if let Some(start) = line.find(&pattern) {
            let rest = &line[start + pattern.len()..];
            break rest[..rest.find('"').unwrap()].to_owned();
        }
    };
    (child, value)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_syncs_against_the_simulator_subcommand_as_a_user_would_run_them() {
    let (mut simulator, api_base) = spawn_logging(
        &["simulator", "--listen", "127.0.0.1:0", "--entities", "3"],
        &[("FENX_LOG__FORMAT", "json".into())],
        "api_base",
    );
    let store = tempfile::tempdir().unwrap();
    let dir = store.path().to_str().unwrap().to_owned();
    let env = vec![
        ("FENX_SERVER__LISTEN", "127.0.0.1:0".to_owned()),
        ("FENX_ADMIN__ENABLED", "false".to_owned()),
        ("FENX_WEBHOOK__SECRETS", crate::helpers::SECRET.to_owned()),
        ("FENX_STORE__DIR", dir.clone()),
        ("FENX_LOG__FORMAT", "json".to_owned()),
        ("FENX_FENERGO__API_BASE", api_base.clone()),
        (
            "FENX_FENERGO__TOKEN_URL",
            format!("{api_base}/connect/token"),
        ),
        (
            "FENX_FENERGO__TENANT_ID",
            fenx_sync::sim::SimConfig::default().tenant_id,
        ),
        (
            "FENX_FENERGO__CLIENT_ID",
            fenx_sync::sim::SimConfig::default().client_id,
        ),
        (
            "FENX_FENERGO__CLIENT_SECRET",
            fenx_sync::sim::SimConfig::default().client_secret,
        ),
    ];
    let (mut service, listen) = spawn_logging(&["serve"], &env, "listen");

    // The simulator's first sample entity, by the seed both processes share.
    let sim = fenx_sync::sim::Simulator::start(fenx_sync::sim::SimConfig::default()).await;
    let (entity, _) = sim.sample_entity(0);
    let body = sim.notification("entitydata:draftverified", &entity);
    let signature = crate::helpers::sign(crate::helpers::SECRET, "sha256-hex/hex", &body);
    let client = fenx_sync::fenergo::client_builder().build().unwrap();
    let response = client
        .post(format!("http://{listen}/webhooks/fenergo"))
        .header("x-fenx-signature", signature)
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);

    let mut done = false;
    for _ in 0..100 {
        let out = fenx(&["status", "--json"], &[("FENX_STORE__DIR", dir.as_str())]);
        let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        if status["by_status"] == serde_json::json!([["done", 1]]) {
            done = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    service.kill().unwrap();
    simulator.kill().unwrap();
    let _ = (service.wait(), simulator.wait());
    assert!(done, "the notification was not synced within 5 s");
    let reporting = rusqlite::Connection::open(store.path().join("reporting.db")).unwrap();
    let stored: i64 = reporting
        .query_row(
            "SELECT count(*) FROM entity WHERE entity_id = ?1",
            [&entity],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(stored, 1);
}
