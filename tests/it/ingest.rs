//! The webhook front door, seen from Fenergo's side: what each kind of request gets back, and
//! what ends up in the outbox.

use std::time::Duration;

use fenx_sync::signature::Recipe;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::helpers::{SECRET, TestApp, eventually, notification, sign};

/// Sends the headers of a signed webhook and only the first `sent` bytes of its body.
pub(crate) async fn start_signed_post(app: &TestApp, body: &str, sent: usize) -> TcpStream {
    let signature = sign(SECRET, "sha256-hex/hex", body);
    let mut stream = TcpStream::connect(app.addr).await.unwrap();
    let head = format!(
        "POST /webhooks/fenergo HTTP/1.1\r\nhost: x\r\nx-fenx-signature: {signature}\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(&body.as_bytes()[..sent]).await.unwrap();
    stream
}

/// The start of whatever the server answers on a raw connection (bounded wait).
pub(crate) async fn read_answer(stream: &mut TcpStream) -> String {
    let mut buf = vec![0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
        .await
        .expect("an answer within 5 s")
        .unwrap();
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

pub(crate) async fn error_of(response: reqwest::Response) -> String {
    let body: serde_json::Value = response.json().await.unwrap();
    body["error"].as_str().unwrap_or_default().to_owned()
}

#[tokio::test]
async fn every_candidate_recipe_is_accepted_in_auto_mode_and_recorded() {
    let app = TestApp::spawn().await;
    let recipes: Vec<Recipe> = Recipe::all().collect();
    for (i, recipe) in recipes.iter().enumerate() {
        let body = notification(&format!("n-{i}"), "entitydata:draftverified");
        let signature = format!("sha256={}", recipe.sign(SECRET, body.as_bytes()));
        let response = app.post_with_signature(&body, Some(&signature)).await;
        assert_eq!(response.status(), 200, "recipe {recipe}");
        let answer: serde_json::Value = response.json().await.unwrap();
        assert_eq!(answer, serde_json::json!({"stored": 1, "duplicates": 0}));
    }
    let stored = app.stored();
    assert_eq!(stored.len(), recipes.len());
    for (row, recipe) in stored.iter().zip(&recipes) {
        assert_eq!(row.recipe.as_deref(), Some(recipe.to_string().as_str()));
    }
    app.stop().await;
}

#[tokio::test]
async fn a_pinned_recipe_accepts_only_itself() {
    let app = TestApp::spawn_with(|s| {
        s.webhook.signature.recipe = "sha256-bytes/base64".parse().unwrap()
    })
    .await;
    let body = notification("pinned", "entitydata:created");
    let other = app
        .post_with_signature(&body, Some(&sign(SECRET, "secret/hex", &body)))
        .await;
    assert_eq!(other.status(), 401);
    let pinned = app
        .post_with_signature(&body, Some(&sign(SECRET, "sha256-bytes/base64", &body)))
        .await;
    assert_eq!(pinned.status(), 200);
    assert_eq!(app.stored().len(), 1);
    app.stop().await;
}

#[tokio::test]
async fn during_rotation_both_secrets_are_accepted() {
    let app = TestApp::spawn_with(|s| s.webhook.secrets = vec!["old".into(), "new".into()]).await;
    for (id, secret) in [("a", "old"), ("b", "new")] {
        let body = notification(id, "entitydata:created");
        let response = app
            .post_with_signature(&body, Some(&sign(secret, "sha256-hex/hex", &body)))
            .await;
        assert_eq!(response.status(), 200, "secret {secret}");
    }
    let body = notification("c", "entitydata:created");
    let response = app
        .post_with_signature(&body, Some(&sign("retired", "sha256-hex/hex", &body)))
        .await;
    assert_eq!(response.status(), 401);
    assert_eq!(app.stored().len(), 2);
    app.stop().await;
}

#[tokio::test]
async fn bad_signatures_get_401_with_a_reason_and_nothing_is_stored() {
    let app = TestApp::spawn().await;
    let body = notification("forged", "entitydata:created");
    let good = sign(SECRET, "sha256-hex/hex", &body);
    let cases: Vec<(Option<String>, &str)> = vec![
        (None, "missing"),
        (Some(String::new()), "empty"),
        (Some("sha256=".into()), "empty"),
        (Some(good[..40].to_owned()), "not a hex or base64"),
        (Some(format!("{good}ab")), "not a hex or base64"),
        (Some("zz".repeat(32)), "not a hex or base64"),
        (
            Some(sign("wrong-secret", "sha256-hex/hex", &body)),
            "does not match",
        ),
        (Some("0".repeat(5000)), "not a hex or base64"),
    ];
    for (signature, want) in cases {
        let response = app.post_with_signature(&body, signature.as_deref()).await;
        assert_eq!(response.status(), 401, "{signature:?}");
        let error = error_of(response).await;
        assert!(error.contains(want), "{signature:?}: {error}");
    }
    let tampered = body.replace("forged", "forgeD");
    assert_eq!(
        app.post_with_signature(&tampered, Some(&good))
            .await
            .status(),
        401
    );
    assert!(app.stored().is_empty());
    app.stop().await;
}

#[tokio::test]
async fn oversized_bodies_get_413_whether_declared_or_streamed() {
    let app = TestApp::spawn_with(|s| s.server.max_body_bytes = 1024).await;
    let big = format!(r#"{{"Id":"big","Pad":"{}"}}"#, "x".repeat(2000));
    let response = app.post_signed(&big).await;
    assert_eq!(response.status(), 413);
    assert!(error_of(response).await.contains("1024"));

    // Chunked, so no Content-Length tells the size up front.
    let mut stream = TcpStream::connect(app.addr).await.unwrap();
    let head = "POST /webhooks/fenergo HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n";
    stream.write_all(head.as_bytes()).await.unwrap();
    for _ in 0..3 {
        let chunk = "y".repeat(500);
        stream
            .write_all(format!("{:x}\r\n{chunk}\r\n", chunk.len()).as_bytes())
            .await
            .unwrap();
    }
    let _ = stream.write_all(b"0\r\n\r\n").await;
    assert!(read_answer(&mut stream).await.starts_with("HTTP/1.1 413"));

    let fits = notification("fits", "entitydata:created");
    assert_eq!(app.post_signed(&fits).await.status(), 200);
    assert_eq!(app.stored().len(), 1);
    app.stop().await;
}

#[tokio::test]
async fn signed_but_malformed_json_gets_400_and_is_not_stored() {
    let app = TestApp::spawn().await;
    for body in [
        "{\"Id\":",
        "not json",
        "\"just a string\"",
        "[{\"Id\":\"1\"}, 2]",
    ] {
        let response = app.post_signed(body).await;
        assert_eq!(response.status(), 400, "{body}");
        assert!(!error_of(response).await.is_empty());
    }
    assert!(app.stored().is_empty());
    app.stop().await;
}

#[tokio::test]
async fn batch_bodies_store_every_notification_with_its_exact_bytes() {
    let app = TestApp::spawn().await;
    let (a, b) = (
        notification("b-1", "entitydata:created"),
        notification("b-2", "journey:taskcompleted"),
    );
    let array = format!("[{a},\n {b}]");
    let response = app.post_signed(&array).await;
    assert_eq!(response.status(), 200);
    let answer: serde_json::Value = response.json().await.unwrap();
    assert_eq!(answer["stored"], 2);

    let wrapped = format!(
        r#"{{"batchId":"1642925639481","notifications":[{}],"moreAvailable":false}}"#,
        notification("b-3", "x:y")
    );
    assert_eq!(app.post_signed(&wrapped).await.status(), 200);

    let stored = app.stored();
    let ids: Vec<&str> = stored.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(ids, ["b-1", "b-2", "b-3"]);
    assert_eq!(stored[0].raw, a.as_bytes());
    assert_eq!(stored[1].raw, b.as_bytes());
    assert_eq!(
        stored[1].event_type.as_deref(),
        Some("journey:taskcompleted")
    );
    app.stop().await;
}

#[tokio::test]
async fn duplicates_get_200_are_counted_and_stored_once() {
    let app = TestApp::spawn().await;
    let body = notification("dup", "entitydata:created");
    for _ in 0..3 {
        assert_eq!(app.post_signed(&body).await.status(), 200);
    }
    // The same id inside a later batch, next to a new one.
    let batch = format!("[{body},{}]", notification("fresh", "entitydata:created"));
    let answer: serde_json::Value = app.post_signed(&batch).await.json().await.unwrap();
    assert_eq!(answer, serde_json::json!({"stored": 1, "duplicates": 1}));
    let stored = app.stored();
    assert_eq!(stored.len(), 2);
    assert_eq!((stored[0].id.as_str(), stored[0].duplicates), ("dup", 3));
    app.stop().await;
}

#[tokio::test]
async fn odd_casing_unknown_fields_and_missing_ids_are_stored_never_refused() {
    let app = TestApp::spawn().await;
    let bodies = [
        r#"{"id":"camel","eventType":"entitydata:created","relativeUrl":"x","future":{"a":1}}"#,
        r#"{"ID":"UPPER","EVENTTYPE":"SomeNew:Event"}"#,
        r#"{"Id":"upper"}"#,
        r#"{"EventType":"entitydata:created","Payload":{}}"#,
    ];
    for body in bodies {
        assert_eq!(app.post_signed(body).await.status(), 200, "{body}");
    }
    let stored = app.stored();
    assert_eq!(
        stored.len(),
        4,
        "ids differing in case are different notifications"
    );
    assert_eq!(stored[0].event_type.as_deref(), Some("entitydata:created"));
    assert_eq!(stored[1].event_type.as_deref(), Some("SomeNew:Event"));
    assert_eq!(stored[2].event_type, None);
    assert!(stored[3].id.starts_with("sha256:"));
    assert_eq!(stored[0].raw, bodies[0].as_bytes());
    // The derived id is stable: a retry of the id-less notification is a duplicate.
    assert_eq!(app.post_signed(bodies[3]).await.status(), 200);
    assert_eq!(app.stored().len(), 4);
    app.stop().await;
}

#[tokio::test]
async fn clients_named_by_a_trusted_proxy_outside_the_allow_list_get_403() {
    // The proxy (this test, on 127.0.0.1) is admitted at accept; the client it names is checked
    // per request.
    let app = TestApp::spawn_with(|s| {
        s.server.allow_networks = vec!["192.0.2.0/24".parse().unwrap()];
        s.server.trusted_proxies = vec!["127.0.0.1/32".parse().unwrap()];
    })
    .await;
    let post_as = |client: &'static str, id: &'static str| {
        let body = notification(id, "entitydata:created");
        app.client
            .post(app.url("/webhooks/fenergo"))
            .header("x-fenx-signature", sign(SECRET, "sha256-hex/hex", &body))
            .header("x-forwarded-for", client)
            .body(body)
            .send()
    };
    assert_eq!(
        post_as("198.51.100.7", "blocked").await.unwrap().status(),
        403
    );
    assert!(app.stored().is_empty());
    assert_eq!(
        post_as("192.0.2.10", "allowed").await.unwrap().status(),
        200
    );
    assert_eq!(app.stored().len(), 1);
    app.stop().await;
}

#[tokio::test]
async fn an_unwritable_store_gets_503_with_retry_after_then_recovers() {
    let app = TestApp::spawn().await;
    let blocker = app.outbox();
    blocker.execute_batch("BEGIN IMMEDIATE").unwrap();
    let body = notification("while-locked", "entitydata:created");
    let response = app.post_signed(&body).await;
    assert_eq!(response.status(), 503);
    assert_eq!(response.headers()["retry-after"], "5");
    let error = error_of(response).await;
    assert!(
        error.contains("retry later") && !error.contains("database"),
        "{error}"
    );
    let ready = app.client.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 503);

    blocker.execute_batch("ROLLBACK").unwrap();
    assert_eq!(app.post_signed(&body).await.status(), 200);
    assert_eq!(
        app.client
            .get(app.url("/readyz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(app.stored().len(), 1);
    app.stop().await;
}

#[tokio::test]
async fn routing_health_and_methods() {
    let app = TestApp::spawn().await;
    let get = |path: &str| app.client.get(app.url(path)).send();
    assert_eq!(get("/healthz").await.unwrap().status(), 200);
    assert_eq!(get("/readyz").await.unwrap().status(), 200);
    let wrong_method = get("/webhooks/fenergo").await.unwrap();
    assert_eq!(wrong_method.status(), 405);
    assert_eq!(wrong_method.headers()["allow"], "POST");
    assert_eq!(get("/nope").await.unwrap().status(), 404);
    for (method, path) in [
        (reqwest::Method::POST, "/healthz"),
        (reqwest::Method::DELETE, "/healthz"),
        (reqwest::Method::PUT, "/readyz"),
    ] {
        let response = app
            .client
            .request(method, app.url(path))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 405, "{path}");
        assert_eq!(response.headers()["allow"], "GET, HEAD", "{path}");
    }
    let delete_webhook = app
        .client
        .delete(app.url("/webhooks/fenergo"))
        .send()
        .await
        .unwrap();
    assert_eq!(delete_webhook.status(), 405);
    assert_eq!(delete_webhook.headers()["allow"], "POST");
    let post_metrics = app
        .client
        .post(format!("http://{}/metrics", app.admin_addr))
        .send()
        .await
        .unwrap();
    assert_eq!(post_metrics.status(), 405);
    assert_eq!(post_metrics.headers()["allow"], "GET");
    app.stop().await;
}

#[tokio::test]
async fn slow_clients_are_cut_off() {
    let app = TestApp::spawn_with(|s| {
        s.server.header_read_timeout = Duration::from_millis(300);
        s.server.body_read_timeout = Duration::from_millis(300);
    })
    .await;

    // Headers never finished: the connection is closed without a stored row.
    let mut stream = TcpStream::connect(app.addr).await.unwrap();
    stream
        .write_all(b"POST /webhooks/fenergo HTTP/1.1\r\nhost: x\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 256];
    let read = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await;
    assert!(
        matches!(read, Ok(Ok(_))),
        "connection was not closed: {read:?}"
    );

    // Headers complete, body trickles: 408.
    let body = notification("slow", "entitydata:created");
    let mut stream = start_signed_post(&app, &body, 10).await;
    assert!(read_answer(&mut stream).await.starts_with("HTTP/1.1 408"));
    assert!(app.stored().is_empty());
    app.stop().await;
}

#[tokio::test]
async fn shutdown_finishes_requests_in_flight_and_their_commits() {
    let app = TestApp::spawn().await;
    let body = notification("in-flight", "entitydata:created");
    let signature = sign(SECRET, "sha256-hex/hex", &body);
    let mut stream = TcpStream::connect(app.addr).await.unwrap();
    // With `expect: 100-continue` the server says when its handler starts reading the body:
    // from then on the request is in flight, whatever the machine's speed.
    let head = format!(
        "POST /webhooks/fenergo HTTP/1.1\r\nhost: x\r\nexpect: 100-continue\r\nx-fenx-signature: {signature}\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let interim = read_answer(&mut stream).await;
    assert!(interim.starts_with("HTTP/1.1 100"), "{interim}");
    stream.write_all(&body.as_bytes()[..20]).await.unwrap();

    let addr = app.addr;
    let stopping = tokio::spawn(app.stop());
    eventually("the listener closing once shutdown began", || async {
        TcpStream::connect(addr).await.is_err().then_some(())
    })
    .await;

    stream.write_all(&body.as_bytes()[20..]).await.unwrap();
    let answer = read_answer(&mut stream).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let dir = stopping.await.unwrap();
    let stored = crate::helpers::read_outbox(&dir.path().join("outbox.db"));
    assert_eq!(stored.len(), 1);
}

#[tokio::test]
async fn metrics_count_what_happened_at_the_front_door() {
    let app = TestApp::spawn().await;
    app.post_signed(&notification("m-1", "entitydata:created"))
        .await;
    app.post_signed(&notification("m-1", "entitydata:created"))
        .await;
    app.post_signed(&notification("m-2", "journey:taskcompleted"))
        .await;
    app.post_with_signature(&notification("m-3", "x:y"), Some("bad"))
        .await;
    app.post_with_signature(&notification("m-3", "x:y"), None)
        .await;
    // The outbox gauges are refreshed in the background (a scrape runs no query).
    let text = eventually("the pending gauge to count 2", || async {
        let text = app.metrics().await;
        text.lines()
            .any(|l| l == r#"fenx_outbox_rows{status="pending"} 2"#)
            .then_some(text)
    })
    .await;
    for line in [
        r#"fenx_webhook_requests_total{outcome="stored"} 2"#,
        r#"fenx_webhook_requests_total{outcome="duplicate"} 1"#,
        r#"fenx_webhook_requests_total{outcome="signature_malformed"} 1"#,
        r#"fenx_signature_failures_total{reason="missing"} 1"#,
        r#"fenx_signature_recipe_matches_total{recipe="sha256-hex/hex"} 3"#,
        r#"fenx_notifications_received_total{event_type="entitydata:created",outcome="stored"} 1"#,
        r#"fenx_notifications_received_total{event_type="entitydata:created",outcome="duplicate"} 1"#,
        r#"fenx_outbox_rows{status="pending"} 2"#,
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing {line:?} in\n{text}"
        );
    }
    assert!(text.contains("fenx_oldest_pending_seconds "));
    app.stop().await;
}
