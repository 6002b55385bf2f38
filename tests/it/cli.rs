//! The command line as an operator uses it: exit codes and what is printed.

use std::process::{Command, Output};

use crate::helpers::{TestApp, eventually, notification};

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
        status["signature_recipes"],
        serde_json::json!({ "sha256-hex/hex": 3 })
    );
    assert_eq!(
        status["by_status"],
        serde_json::json!({ "dead": 1, "ignored": 2 })
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
    // Readiness is cached: the next probe commit meets the held lock and fails.
    let busy = eventually("health to fail while the outbox is locked", || async {
        let busy = fenx(&["health", "--addr", &addr, "--timeout", "5s"], &[]);
        (busy.status.code() == Some(1)).then_some(busy)
    })
    .await;
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
    for (file, current) in [("outbox.db", 3), ("reporting.db", 5)] {
        let conn = rusqlite::Connection::open(dir.path().join(file)).unwrap();
        let version: i64 = conn
            .query_row("SELECT max(version) FROM schema_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(version, current, "{file}");
    }
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

/// A long-running subcommand whose log lines (stderr) are collected as they come.
struct Logged {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
    seen: Vec<String>,
    args: Vec<String>,
}

impl Logged {
    fn spawn(args: &[&str], env: &[(&str, String)]) -> Logged {
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
        // Read on a thread so a process that never logs what a test waits for fails the test
        // instead of hanging it.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        Logged {
            child,
            lines: rx,
            seen: Vec::new(),
            args: args.iter().map(|a| (*a).to_owned()).collect(),
        }
    }

    /// The first log line (seen before or within 10 s) that `matches`.
    fn wait_for_line(&mut self, what: &str, matches: impl Fn(&str) -> bool) -> String {
        if let Some(line) = self.seen.iter().find(|l| matches(l)) {
            return line.clone();
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let wait = deadline.saturating_duration_since(std::time::Instant::now());
            let Ok(line) = self.lines.recv_timeout(wait) else {
                let _ = self.child.kill();
                panic!("{:?} did not log {what} within 10 s", self.args);
            };
            self.seen.push(line.clone());
            if matches(&line) {
                return line;
            }
        }
    }

    /// The first value of JSON log field `field`.
    fn field(&mut self, field: &str) -> String {
        let pattern = format!("\"{field}\":\"");
        let line = self.wait_for_line(field, |l| l.contains(&pattern));
        let rest = &line[line.find(&pattern).unwrap() + pattern.len()..];
        rest[..rest.find('"').unwrap()].to_owned()
    }

    /// Every line logged so far.
    fn drain(&mut self) -> &[String] {
        self.seen.extend(self.lines.try_iter());
        &self.seen
    }
}

/// `serve`'s environment for a store in `dir` and a Fenergo at `api_base` with the simulator's
/// default tenant and client.
fn serve_env(dir: &str, api_base: &str) -> Vec<(&'static str, String)> {
    let sim = fenx_sim::SimConfig::default();
    vec![
        ("FENX_SERVER__LISTEN", "127.0.0.1:0".to_owned()),
        ("FENX_ADMIN__ENABLED", "false".to_owned()),
        ("FENX_WEBHOOK__SECRETS", crate::helpers::SECRET.to_owned()),
        ("FENX_STORE__DIR", dir.to_owned()),
        ("FENX_LOG__FORMAT", "json".to_owned()),
        ("FENX_FENERGO__API_BASE", api_base.to_owned()),
        (
            "FENX_FENERGO__TOKEN_URL",
            format!("{api_base}/connect/token"),
        ),
        ("FENX_FENERGO__TENANT_ID", sim.tenant_id),
        ("FENX_FENERGO__CLIENT_ID", sim.client_id),
        ("FENX_FENERGO__CLIENT_SECRET", sim.client_secret),
    ]
}

/// Posts a signed `draftverified` notification for `entity` to the service at `listen`.
async fn post_verified(
    client: &reqwest::Client,
    listen: &str,
    sim: &fenx_sim::Simulator,
    entity: &str,
) {
    let body = sim.notification("entitydata:draftverified", entity);
    let response = crate::helpers::post_signed_to(client, listen, body).await;
    assert_eq!(response.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_syncs_against_the_simulator_subcommand_as_a_user_would_run_them() {
    let mut simulator = Logged::spawn(
        &["simulator", "--listen", "127.0.0.1:0", "--entities", "3"],
        &[("FENX_LOG__FORMAT", "json".into())],
    );
    let api_base = simulator.field("api_base");
    let store = tempfile::tempdir().unwrap();
    let dir = store.path().to_str().unwrap().to_owned();
    let mut service = Logged::spawn(&["serve"], &serve_env(&dir, &api_base));
    let listen = service.field("listen");

    // The simulator's first sample entity, by the seed both processes share.
    let sim = fenx_sim::Simulator::start(fenx_sim::SimConfig::default()).await;
    let (entity, _) = sim.sample_entity(0);
    let client = fenx_sync::fenergo::client_builder().build().unwrap();
    post_verified(&client, &listen, &sim, &entity).await;

    let mut done = false;
    for _ in 0..100 {
        let out = fenx(&["status", "--json"], &[("FENX_STORE__DIR", dir.as_str())]);
        let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        if status["by_status"] == serde_json::json!({ "done": 1 }) {
            done = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    service.child.kill().unwrap();
    simulator.child.kill().unwrap();
    let _ = (service.child.wait(), simulator.child.wait());
    assert!(done, "the notification was not synced within 5 s");
    assert_eq!(crate::helpers::entity_rows(store.path(), &entity), 1);
}

/// Polls `check` every 50 ms for up to 30 s.
async fn until_true(what: &str, mut check: impl FnMut() -> bool) {
    for _ in 0..600 {
        if check() {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("{what} did not happen within 30 s");
}

/// A simulator whose token endpoint answers 401 `invalid_client`, and an empty store (with its
/// path as text).
async fn refusing_simulator() -> (fenx_sim::Simulator, tempfile::TempDir, String) {
    use fenx_sim::{Faults, SimConfig, Simulator, TokenRefusal};
    let sim = Simulator::start(SimConfig::default()).await;
    sim.set_faults(Faults {
        refuse_tokens: Some(TokenRefusal::Unauthorized),
        ..Faults::default()
    });
    let store = tempfile::tempdir().unwrap();
    let dir = store.path().to_str().unwrap().to_owned();
    (sim, store, dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_credentials_are_loud_lose_nothing_and_sync_resumes_once_fixed() {
    let (sim, store, dir) = refusing_simulator().await;
    let mut env = serve_env(&dir, &sim.api_base());
    env.push(("FENX_SYNC__IDLE_POLL", "50ms".to_owned()));
    env.push(("FENX_ADMIN__ENABLED", "true".to_owned()));
    env.push(("FENX_ADMIN__LISTEN", "127.0.0.1:0".to_owned()));
    let mut service = Logged::spawn(&["serve"], &env);
    let listen = service.field("listen");
    let admin = service.field("admin");
    let client = fenx_sync::fenergo::client_builder().build().unwrap();
    let entities: Vec<String> = (0..3).map(|i| sim.sample_entity(i).0).collect();
    for entity in &entities {
        post_verified(&client, &listen, &sim, entity).await;
    }
    let client_id = fenx_sim::SimConfig::default().client_id;
    let refused = |l: &str| l.contains("\"ERROR\"") && l.contains("invalid_client");
    let error = service.wait_for_line("the refusal at ERROR", refused);
    assert!(error.contains(&client_id), "{error}");

    let status = || text(&fenx(&["status"], &[("FENX_STORE__DIR", dir.as_str())]).stdout);
    until_true("status showing the refusal", || {
        status().contains("Fenergo credentials refused since")
    })
    .await;
    assert!(status().contains("invalid_client"), "{}", status());
    let metrics = || {
        let url = format!("http://{admin}/metrics");
        let client = client.clone();
        async move { client.get(url).send().await.unwrap().text().await.unwrap() }
    };
    assert!(
        metrics()
            .await
            .contains("fenx_fenergo_credentials_refused 1")
    );
    let ready = client
        .get(format!("http://{listen}/readyz"))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 200, "ingest keeps storing webhooks");
    let outbox = rusqlite::Connection::open(store.path().join("outbox.db")).unwrap();
    let rows = |sql: &str| -> i64 { outbox.query_row(sql, [], |r| r.get(0)).unwrap() };
    assert_eq!(
        rows("SELECT count(*) FROM notification WHERE status = 'pending' AND attempts = 0"),
        3
    );

    sim.set_faults(fenx_sim::Faults::default());
    until_true("sync resuming", || {
        rows("SELECT count(*) FROM notification WHERE status = 'done'") == 3
    })
    .await;
    until_true("status clearing the refusal", || {
        !status().contains("credentials refused")
    })
    .await;
    assert!(
        metrics()
            .await
            .contains("fenx_fenergo_credentials_refused 0")
    );
    assert_eq!(
        rows("SELECT count(*) FROM notification WHERE status = 'dead'"),
        0
    );
    let logged_errors = service.drain().iter().filter(|l| refused(l)).count();
    assert_eq!(logged_errors, 1, "one ERROR line, not one per retry");
    service.child.kill().unwrap();
    let _ = service.child.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backfill_with_refused_credentials_stops_at_once_with_one_line() {
    let (sim, _store, dir) = refusing_simulator().await;
    let env = serve_env(&dir, &sim.api_base());
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let out = fenx(&["backfill"], &env);
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("invalid_client"))
        .collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(lines[0].contains("backfill stopped"), "{stderr}");
    assert_eq!(sim.stats().token_requests, 1, "a refusal is not retried");
}

#[test]
fn config_check_fails_when_serve_would_refuse_and_names_its_file_and_missing_sync_keys() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("fenx-sync.toml");
    std::fs::write(&file, "[sync]\nworkers = 2\n").unwrap();
    let out = fenx(
        &["--config", file.to_str().unwrap(), "config", "check"],
        &[],
    );
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(stderr.contains(&file.display().to_string()), "{stderr}");
    assert!(stderr.contains("would refuse to start"), "{stderr}");
    assert!(stderr.contains("no webhook secret configured"), "{stderr}");
    assert!(
        stderr.contains("fenergo.tenant_id, fenergo.client_id, fenergo.client_secret"),
        "{stderr}"
    );
}

#[tokio::test]
async fn status_names_the_indexes_a_backfill_deferred() {
    let store = tempfile::tempdir().unwrap();
    let dir = store.path().to_str().unwrap().to_owned();
    let env = [("FENX_STORE__DIR", dir.as_str())];
    assert!(fenx(&["migrate"], &env).status.success());
    let reporting =
        fenx_sync::store::SqliteStore::open(&store.path().join("reporting.db"), "").unwrap();
    fenx_sync::store::ReportingStore::defer_indexes(&reporting)
        .await
        .unwrap();

    let table = text(&fenx(&["status"], &env).stdout);
    assert!(
        table.contains(
            "indexes DEFERRED until the backfill finishes: entity_by_date_of_birth, entity_property_by_number"
        ),
        "{table}"
    );
    let json: serde_json::Value =
        serde_json::from_slice(&fenx(&["status", "--json"], &env).stdout).unwrap();
    let deferred = json
        .as_object()
        .and_then(|o| o.values().find_map(|v| v.get("deferred_indexes")))
        .cloned();
    assert_eq!(
        deferred,
        Some(serde_json::json!([
            "entity_by_date_of_birth",
            "entity_property_by_number"
        ])),
        "{json}"
    );
}
