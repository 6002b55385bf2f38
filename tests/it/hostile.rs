//! Hostile and greedy clients at the webhook listener: slow bodies, bodies that together would
//! exhaust memory, one address holding many connections, peers outside the allow-list, and a
//! second signature header. Each test checks what the client sees and what was stored.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use crate::helpers::{SECRET, TestApp, notification, sign};
use crate::ingest::{error_of, read_answer, start_signed_post};

/// A TCP connection to `addr` from the loopback address `source` (e.g. 127.0.0.2).
async fn connect_from(source: &str, addr: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
    socket.connect(addr).await.unwrap()
}

/// A complete signed webhook request.
fn signed_request(body: &str) -> String {
    format!(
        "POST /webhooks/fenergo HTTP/1.1\r\nhost: x\r\nx-fenx-signature: {}\r\ncontent-length: {}\r\n\r\n{body}",
        sign(SECRET, "sha256-hex/hex", body),
        body.len()
    )
}

/// Whether the server closed `stream` without sending a single byte (bounded wait).
async fn closed_unanswered(stream: &mut TcpStream) -> bool {
    let mut buf = [0u8; 256];
    match tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await {
        Ok(Ok(0)) => true,
        Ok(Err(error)) => error.kind() == std::io::ErrorKind::ConnectionReset,
        Ok(Ok(_)) | Err(_) => false,
    }
}

/// A signed notification padded to exactly `len` bytes.
fn padded_notification(id: &str, len: usize) -> String {
    let head = format!(r#"{{"Id":"{id}","EventType":"entitydata:created","Pad":""#);
    let pad = len - head.len() - 2;
    format!("{head}{}\"}}", "x".repeat(pad))
}

#[tokio::test]
async fn a_body_slower_than_the_minimum_rate_gets_408_and_a_normal_one_is_unaffected() {
    let app = TestApp::spawn_with(|s| {
        s.server.min_body_rate = 1000;
        s.server.min_body_rate_grace = Duration::from_millis(200);
    })
    .await;
    let body = notification("trickled", "entitydata:created");
    let stream = start_signed_post(&app, &body, 10).await;
    let (mut reader, mut writer) = stream.into_split();
    let trickle_body = body.clone();
    let trickle = tokio::spawn(async move {
        // 20 bytes a second, well below the minimum; stops when the server hangs up.
        for byte in trickle_body.as_bytes()[10..].chunks(1) {
            tokio::time::sleep(Duration::from_millis(50)).await;
            if writer.write_all(byte).await.is_err() {
                break;
            }
        }
    });
    let mut answer = vec![0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(5), reader.read(&mut answer))
        .await
        .expect("an answer within 5 s")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer[..n]);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(
        answer.contains("slower than 1000 bytes per second"),
        "{answer}"
    );
    trickle.abort();
    assert!(app.stored().is_empty());

    let normal = notification("normal", "entitydata:created");
    assert_eq!(app.post_signed(&normal).await.status(), 200);
    assert_eq!(app.stored().len(), 1);
    let metrics = app.metrics().await;
    assert!(
        metrics.contains(r#"fenx_webhook_requests_total{outcome="body_too_slow"} 1"#),
        "{metrics}"
    );
    app.stop().await;
}

/// How the first part of a body is framed.
#[derive(Debug, Clone, Copy)]
enum Framing {
    Declared,
    Chunked,
}

/// Starts a signed post of `body` and sends its first `sent` bytes.
async fn start_framed_post(app: &TestApp, body: &str, sent: usize, framing: Framing) -> TcpStream {
    let signature = sign(SECRET, "sha256-hex/hex", body);
    let mut stream = TcpStream::connect(app.addr).await.unwrap();
    let framing_header = match framing {
        Framing::Declared => format!("content-length: {}", body.len()),
        Framing::Chunked => "transfer-encoding: chunked".to_owned(),
    };
    let head = format!(
        "POST /webhooks/fenergo HTTP/1.1\r\nhost: x\r\nx-fenx-signature: {signature}\r\n{framing_header}\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream
        .write_all(&frame(&body.as_bytes()[..sent], framing, false))
        .await
        .unwrap();
    stream
}

/// `bytes` as the next part of a body; `last` ends a chunked body.
fn frame(bytes: &[u8], framing: Framing, last: bool) -> Vec<u8> {
    match framing {
        Framing::Declared => bytes.to_vec(),
        Framing::Chunked => [
            format!("{:x}\r\n", bytes.len()).as_bytes(),
            bytes,
            if last { b"\r\n0\r\n\r\n" } else { b"\r\n" },
        ]
        .concat(),
    }
}

#[tokio::test]
async fn bodies_in_flight_share_one_memory_budget_then_503_with_retry_after() {
    for framing in [Framing::Declared, Framing::Chunked] {
        let app = TestApp::spawn_with(|s| {
            s.server.max_body_bytes = 16 * 1024;
            s.server.max_inflight_body_bytes = 16 * 1024;
            s.server.min_body_rate = 0;
        })
        .await;
        // A holds most of the budget: 15,500 of its 16,000 bytes sent, the rest withheld.
        let held = padded_notification("held", 16_000);
        let mut holder = start_framed_post(&app, &held, 15_500, framing).await;

        // Another 1,000-byte body now finds no room (once the server has read A's bytes).
        let other = padded_notification("other", 1_000);
        let refused = loop_until_status(&app, &other, 503).await;
        assert_eq!(refused.headers()["retry-after"], "5", "{framing:?}");
        assert!(error_of(refused).await.contains("retry later"));
        assert!(app.stored().is_empty());

        // A completes and is stored; its memory is released, so the next body fits again.
        holder
            .write_all(&frame(&held.as_bytes()[15_500..], framing, true))
            .await
            .unwrap();
        let answer = read_answer(&mut holder).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{framing:?}: {answer}");
        assert_eq!(app.post_signed(&other).await.status(), 200, "{framing:?}");
        assert_eq!(app.stored().len(), 2);
        app.stop().await;
    }
}

/// Posts `body` with a wrong signature until the server answers `want` (bounded): a wrong
/// signature costs a body read but can never be stored.
async fn loop_until_status(app: &TestApp, body: &str, want: u16) -> reqwest::Response {
    let forged = "0".repeat(64);
    for _ in 0..250 {
        let response = app.post_with_signature(body, Some(&forged)).await;
        if response.status() == want {
            return response;
        }
        assert_eq!(response.status(), 401);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("never answered {want} within 5 s");
}

#[tokio::test]
async fn a_client_over_its_connection_cap_is_refused_while_another_address_is_served() {
    let app = TestApp::spawn_with(|s| s.server.max_connections_per_client = 2).await;
    // 127.0.0.2 holds its two connections idle (a slowloris needs no more).
    let held = [
        connect_from("127.0.0.2", app.addr).await,
        connect_from("127.0.0.2", app.addr).await,
    ];
    let body = notification("from-greedy", "entitydata:created");
    let mut third = connect_from("127.0.0.2", app.addr).await;
    let _ = third.write_all(signed_request(&body).as_bytes()).await;
    assert!(closed_unanswered(&mut third).await);

    // Fenergo, at another address, is served at once.
    let fenergo = notification("from-fenergo", "entitydata:created");
    assert_eq!(app.post_signed(&fenergo).await.status(), 200);
    let ids: Vec<String> = app.stored().into_iter().map(|r| r.id).collect();
    assert_eq!(ids, ["from-fenergo"]);

    // Once 127.0.0.2 lets a connection go, it may open another.
    drop(held);
    let mut served = false;
    for _ in 0..250 {
        let mut retry = connect_from("127.0.0.2", app.addr).await;
        let _ = retry.write_all(signed_request(&body).as_bytes()).await;
        let mut buf = [0u8; 64];
        if let Ok(Ok(n)) = tokio::time::timeout(Duration::from_secs(5), retry.read(&mut buf)).await
            && buf[..n].starts_with(b"HTTP/1.1 200")
        {
            served = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(served, "127.0.0.2 was never served again");
    assert_eq!(app.stored().len(), 2);
    app.stop().await;
}

#[tokio::test]
async fn a_trusted_proxy_is_exempt_from_the_per_client_cap() {
    // Behind a proxy every connection comes from the proxy's address: capping it would cap all.
    let app = TestApp::spawn_with(|s| {
        s.server.max_connections_per_client = 1;
        s.server.trusted_proxies = vec!["127.0.0.1/32".parse().unwrap()];
    })
    .await;
    let _held = connect_from("127.0.0.1", app.addr).await;
    let body = notification("via-proxy", "entitydata:created");
    let mut second = connect_from("127.0.0.1", app.addr).await;
    second
        .write_all(signed_request(&body).as_bytes())
        .await
        .unwrap();
    let answer = read_answer(&mut second).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(app.stored().len(), 1);
    app.stop().await;
}

#[tokio::test]
async fn a_peer_outside_the_allow_list_is_closed_before_a_byte_is_read() {
    let app =
        TestApp::spawn_with(|s| s.server.allow_networks = vec!["127.0.0.1/32".parse().unwrap()])
            .await;
    // A whole signed request from outside: no status line, no 403 body, nothing stored.
    let body = notification("outsider", "entitydata:created");
    let mut outsider = connect_from("127.0.0.2", app.addr).await;
    let _ = outsider.write_all(signed_request(&body).as_bytes()).await;
    assert!(closed_unanswered(&mut outsider).await);
    assert!(app.stored().is_empty());

    // An allowed peer sending the same request is served.
    assert_eq!(app.post_signed(&body).await.status(), 200);
    let ids: Vec<String> = app.stored().into_iter().map(|r| r.id).collect();
    assert_eq!(ids, ["outsider"]);
    app.stop().await;
}

#[tokio::test]
async fn two_signature_headers_get_401_in_either_order() {
    let app = TestApp::spawn().await;
    let body = notification("twice-signed", "entitydata:created");
    let good = sign(SECRET, "sha256-hex/hex", &body);
    let bad = sign("forger", "sha256-hex/hex", &body);
    for pair in [[&good, &bad], [&bad, &good], [&good, &good]] {
        let response = app
            .client
            .post(app.url("/webhooks/fenergo"))
            .header("x-fenx-signature", pair[0].as_str())
            .header("x-fenx-signature", pair[1].as_str())
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 401);
        assert!(error_of(response).await.contains("more than one"));
    }
    assert!(app.stored().is_empty());
    assert_eq!(app.post_signed(&body).await.status(), 200);
    let metrics = app.metrics().await;
    assert!(
        metrics.contains(r#"fenx_signature_failures_total{reason="repeated"} 3"#),
        "{metrics}"
    );
    app.stop().await;
}
