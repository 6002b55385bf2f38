//! What platform teams import and audit: `/metrics` in a format promtool accepts, the
//! freshness and reconciliation metrics the alert rules use, the two-command trial
//! (`simulator` + `serve`), and backfill's interrupt message.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use fenx_sim::Simulator;

use crate::helpers::{TestApp, entity_rows, notification, wait_for};
use crate::sync::{sim_config, sync_settings};

async fn scrape(app: &TestApp, accept: Option<&str>) -> (String, String) {
    let mut request = app.client.get(format!("http://{}/metrics", app.admin_addr));
    if let Some(accept) = accept {
        request = request.header("accept", accept);
    }
    let response = request.send().await.unwrap();
    let content_type = response.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_owned();
    (content_type, response.text().await.unwrap())
}

/// The checks `promtool check metrics` makes that matter here: every sample belongs to a family
/// with HELP and TYPE, counters are named `_total`, nothing OpenMetrics-only.
fn assert_prometheus_text(text: &str) {
    let mut types = BTreeMap::new();
    let mut helps = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            types.insert(name.to_owned(), kind.to_owned());
        } else if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap();
            assert!(!help.trim().is_empty(), "empty HELP for {name}");
            helps.insert(name.to_owned(), help.to_owned());
        } else {
            assert!(!line.starts_with('#'), "not Prometheus text: {line:?}");
        }
    }
    assert_eq!(
        types.keys().collect::<Vec<_>>(),
        helps.keys().collect::<Vec<_>>(),
        "HELP and TYPE name different families"
    );
    for (name, kind) in &types {
        if kind == "counter" {
            assert!(name.ends_with("_total"), "counter family {name}");
        }
    }
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let name = line.split(['{', ' ']).next().unwrap();
        let family = [name]
            .into_iter()
            .chain(
                ["_bucket", "_sum", "_count"]
                    .iter()
                    .filter_map(|suffix| name.strip_suffix(suffix)),
            )
            .find(|family| types.contains_key(*family));
        assert!(family.is_some(), "{name} has no HELP/TYPE in\n{text}");
    }
}

fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[tokio::test]
async fn metrics_are_prometheus_text_unless_openmetrics_is_asked_for() {
    let app = TestApp::spawn().await;
    app.post_signed(&notification("p-1", "entitydata:created"))
        .await;
    app.post_with_signature(
        &notification("p-2", "entitydata:created"),
        Some("sha256=00"),
    )
    .await;

    let (content_type, text) = scrape(&app, None).await;
    assert_eq!(content_type, "text/plain; version=0.0.4; charset=utf-8");
    assert_prometheus_text(&text);
    assert_eq!(
        sample(&text, "fenx_webhook_request_duration_seconds_count"),
        Some(2.0),
        "{text}"
    );
    let version = format!(
        "fenx_build_info{{version=\"{}\"}}",
        env!("CARGO_PKG_VERSION")
    );
    assert_eq!(sample(&text, &version), Some(1.0), "{text}");
    assert!(text.contains("# TYPE fenx_freshness_seconds histogram"));

    // What Prometheus itself sends: OpenMetrics preferred.
    let prometheus_accept =
        "application/openmetrics-text;version=1.0.0;q=0.5,text/plain;version=0.0.4;q=0.4,*/*;q=0.1";
    let (content_type, text) = scrape(&app, Some(prometheus_accept)).await;
    assert!(
        content_type.starts_with("application/openmetrics-text; version=1.0.0"),
        "{content_type}"
    );
    assert!(text.ends_with("# EOF\n"), "{text}");
    assert!(text.contains("# TYPE fenx_webhook_requests counter"));

    let (content_type, _) = scrape(&app, Some("text/plain")).await;
    assert!(content_type.starts_with("text/plain; version=0.0.4"));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn freshness_and_reconciliation_progress_reach_metrics() {
    let sim = Simulator::start(sim_config()).await;
    let entities: Vec<String> = (0..30).map(|i| sim.sample_entity(i).0).collect();
    let app = TestApp::spawn_with(|s| {
        sync_settings(s, &sim);
        // Long enough that a finished run's gauges can be read before the next one starts.
        s.reconcile.every = Some(Duration::from_secs(1));
        s.reconcile.page_size = 7;
    })
    .await;
    let (content_type, before) = scrape(&app, None).await;
    assert!(content_type.starts_with("text/plain"));
    assert_eq!(
        sample(
            &before,
            "fenx_reconcile_last_success_timestamp_seconds{kind=\"reconcile\"}"
        ),
        Some(0.0),
        "the series exists at 0 before any run:\n{before}"
    );
    let body = sim.notification("entitydata:draftverified", &entities[3]);
    assert_eq!(app.post_signed(&body).await.status(), 200);
    wait_for(
        &app.dir.path().join("outbox.db"),
        "SELECT count(*) FROM notification WHERE status = 'done'",
        1,
    )
    .await;

    let deadline = Instant::now() + Duration::from_secs(10);
    let text = loop {
        let (_, text) = scrape(&app, None).await;
        let finished = sample(
            &text,
            "fenx_reconcile_last_success_timestamp_seconds{kind=\"reconcile\"}",
        )
        .is_some_and(|t| t > 0.0);
        // Between runs, so the progress gauges are the finished run's.
        let idle = sample(&text, "fenx_reconcile_running{kind=\"reconcile\"}") == Some(0.0);
        if (finished && idle) || Instant::now() > deadline {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_prometheus_text(&text);
    assert_eq!(
        sample(&text, "fenx_freshness_seconds_count"),
        Some(1.0),
        "{text}"
    );
    let finished = sample(
        &text,
        "fenx_reconcile_last_success_timestamp_seconds{kind=\"reconcile\"}",
    )
    .unwrap();
    let started = sample(&text, "fenx_process_start_time_seconds").unwrap();
    assert!(finished >= started, "{finished} < {started}");
    assert_eq!(
        sample(&text, "fenx_reconcile_entities_listed{kind=\"reconcile\"}"),
        Some(30.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "fenx_reconcile_entities_seen{kind=\"reconcile\"}"),
        Some(30.0),
        "{text}"
    );
    app.stop().await;
}

/// A child process whose stderr lines arrive on a channel.
struct Logging {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Logging {
    fn spawn(args: &[&str], env: &[(&str, &str)]) -> Logging {
        let mut command = Command::new(env!("CARGO_BIN_EXE_fenx-sync"));
        command
            .args(args)
            .env_remove("FENX_CONFIG")
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (key, value) in env {
            command.env(key, value);
        }
        let mut child = command.spawn().unwrap();
        let stderr = BufReader::new(child.stderr.take().unwrap());
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in stderr.lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        Logging {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// The first line containing `needle`, waiting up to 20 s.
    fn wait_for_line(&mut self, needle: &str) -> String {
        if let Some(line) = self.seen.iter().find(|l| l.contains(needle)) {
            return line.clone();
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let wait = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(wait) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(_) => {
                    let _ = self.child.kill();
                    panic!(
                        "no line with {needle:?} within 20 s; saw:\n{}",
                        self.seen.join("\n")
                    );
                }
            }
        }
    }

    /// Every line until the process exits (at most 20 s), and its exit code.
    fn finish(mut self) -> (Vec<String>, Option<i32>) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while let Ok(line) = self
            .lines
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            self.seen.push(line);
        }
        let _ = self.child.kill();
        let status = self.child.wait().unwrap();
        (self.seen, status.code())
    }

    fn stop(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn json_field(line: &str, field: &str) -> String {
    let value: serde_json::Value = serde_json::from_str(line).unwrap();
    value[field].as_str().unwrap().to_owned()
}

/// `fenx-sync simulator` on an ephemeral port, once it has written its `serve` configuration.
fn simulator(entities: usize, config: &str, more: &[&str]) -> Logging {
    let entities = entities.to_string();
    let mut args = vec![
        "simulator",
        "--listen",
        "127.0.0.1:0",
        "--entities",
        &entities,
        "--write-config",
        config,
    ];
    args.extend_from_slice(more);
    let mut simulator = Logging::spawn(&args, &[]);
    simulator.wait_for_line("configuration for `fenx-sync serve --config` written");
    simulator
}

/// A loopback port that was free a moment ago: the simulator must know where to send before
/// `serve` binds it.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn simulator_and_serve_are_the_whole_trial_in_two_commands() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("serve.toml");
    let port = free_port();
    let target = format!("http://127.0.0.1:{port}/webhooks/fenergo");
    let config_arg = config.to_str().unwrap();
    // Human-format logs into a pipe: no colour codes.
    let mut simulator = simulator(5, config_arg, &["--send-to", &target, "--rate", "20"]);
    let written = std::fs::read_to_string(&config).unwrap();
    assert!(written.contains("[fenergo]") && written.contains("client_secret"));

    let store = dir.path().join("data");
    let listen = format!("127.0.0.1:{port}");
    let mut service = Logging::spawn(
        &["--config", config_arg, "serve"],
        &[
            ("FENX_SERVER__LISTEN", &listen),
            ("FENX_ADMIN__ENABLED", "false"),
            ("FENX_STORE__DIR", store.to_str().unwrap()),
            ("FENX_LOG__FORMAT", "json"),
        ],
    );
    let synced = service.wait_for_line("\"entity synced\"");
    let entity = json_field(&synced, "entity");
    assert_eq!(entity_rows(&store, &entity), 1, "{entity} not in the store");
    simulator.wait_for_line("webhooks sent so far");
    assert!(
        simulator.seen.iter().all(|l| !l.contains('\u{1b}')),
        "ANSI codes in piped logs: {:?}",
        simulator.seen
    );
    service.stop();
    simulator.stop();
}

#[test]
fn backfill_interrupted_says_how_to_resume_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("serve.toml");
    let config_arg = config.to_str().unwrap();
    let simulator = simulator(3000, config_arg, &[]);
    let store = dir.path().join("data");
    let env = [
        ("FENX_STORE__DIR", store.to_str().unwrap()),
        ("FENX_LOG__FORMAT", "json"),
    ];
    let args = ["--config", config_arg, "backfill", "--page-size", "1"];
    let mut backfill = Logging::spawn(&args, &env);
    backfill.wait_for_line("backfill page stored");
    let pid = backfill.child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-INT", &pid])
            .status()
            .unwrap()
            .success()
    );
    let (lines, code) = backfill.finish();
    assert_eq!(code, Some(130), "{lines:?}");
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("backfill stopped; run again to resume")),
        "{lines:?}"
    );

    let resumed = Logging::spawn(&["--config", config_arg, "backfill"], &env);
    let (lines, code) = resumed.finish();
    assert_eq!(code, Some(0), "{lines:?}");
    assert!(
        lines.iter().any(|l| l.contains("from its saved cursor")),
        "{lines:?}"
    );
    let reporting = rusqlite::Connection::open(store.join("reporting.db")).unwrap();
    let stored: i64 = reporting
        .query_row("SELECT count(*) FROM entity", [], |r| r.get(0))
        .unwrap();
    assert_eq!(stored, 3000);
    simulator.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_request_line_brackets_the_batch_with_rounded_latency() {
    let dir = tempfile::tempdir().unwrap();
    let mut service = Logging::spawn(
        &["serve", "--ingest-only"],
        &[
            ("FENX_SERVER__LISTEN", "127.0.0.1:0"),
            ("FENX_ADMIN__ENABLED", "false"),
            ("FENX_WEBHOOK__SECRETS", crate::helpers::SECRET),
            ("FENX_STORE__DIR", dir.path().to_str().unwrap()),
            ("FENX_LOG__FORMAT", "json"),
            ("FENX_LOG__LEVEL", "debug"),
        ],
    );
    let listen = json_field(&service.wait_for_line("\"listen\""), "listen");
    let ids = ["batch-first", "batch-middle", "batch-last"];
    let body = format!(
        "[{}]",
        ids.map(|id| notification(id, "entitydata:created"))
            .join(",")
    );
    let client = fenx_sync::fenergo::client_builder().build().unwrap();
    let response = crate::helpers::post_signed_to(&client, &listen, body).await;
    assert_eq!(response.status(), 200);
    let line: serde_json::Value =
        serde_json::from_str(&service.wait_for_line("webhook accepted")).unwrap();
    service.stop();
    assert_eq!(line["notification_id"], "batch-first");
    assert_eq!(line["last_notification_id"], "batch-last");
    assert_eq!(line["notifications"], 3);
    let latency = line["latency_ms"].as_f64().unwrap();
    assert_eq!((latency * 1000.0).round() / 1000.0, latency, "{line}");
}
