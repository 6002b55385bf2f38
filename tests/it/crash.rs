//! Kill -9 mid-burst: every notification that got a 2xx must be in the outbox after a restart.
//! Runs the real binary, so it tests what operators run (WAL + synchronous=FULL, group commit).

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::helpers::{SECRET, notification, read_outbox, sign};

const CYCLES: usize = 3;
const CLIENTS: usize = 16;

/// Starts `fenx-sync serve` on 127.0.0.1:0 (admin listener too: the default 127.0.0.1:9090 may
/// be taken) and returns it with the address it bound (read from its JSON start-up log line).
pub fn start_binary(store: &Path) -> (Child, SocketAddr) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_fenx-sync"))
        .arg("serve")
        .env("FENX_SERVER__LISTEN", "127.0.0.1:0")
        .env("FENX_ADMIN__LISTEN", "127.0.0.1:0")
        .env("FENX_WEBHOOK__SECRETS", SECRET)
        .env("FENX_STORE__DIR", store)
        .env("FENX_LOG__FORMAT", "json")
        .env_remove("FENX_CONFIG")
        .current_dir(store)
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the fenx-sync binary starts");
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let addr = loop {
        let line = lines
            .next()
            .expect("fenx-sync exited before logging its address")
            .unwrap();
        let Ok(event) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        if let Some(listen) = event["listen"].as_str() {
            break listen.parse().unwrap();
        }
    };
    // Keep draining stderr so the child never blocks on a full pipe.
    std::thread::spawn(move || lines.for_each(drop));
    (child, addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_burst_loses_no_acknowledged_notification() {
    let store = tempfile::tempdir().unwrap();
    let acknowledged = Arc::new(Mutex::new(HashSet::new()));
    let mut sent_total = 0;
    for cycle in 0..CYCLES {
        let (mut child, addr) = start_binary(store.path());
        let client = fenx_sync::fenergo::client_builder()
            .timeout(Duration::from_secs(5))
            .build()
            .unwrap();
        let senders: Vec<_> = (0..CLIENTS)
            .map(|c| {
                let client = client.clone();
                let acknowledged = acknowledged.clone();
                tokio::spawn(async move {
                    let mut sent = 0;
                    for i in 0..2_000 {
                        let id = format!("crash-{cycle}-{c}-{i}");
                        let body = notification(&id, "entitydata:draftverified");
                        sent += 1;
                        let response = client
                            .post(format!("http://{addr}/webhooks/fenergo"))
                            .header("x-fenx-signature", sign(SECRET, "sha256-hex/hex", &body))
                            .body(body)
                            .send()
                            .await;
                        match response {
                            Ok(r) if r.status().is_success() => {
                                acknowledged.lock().unwrap().insert(id);
                            }
                            _ => break,
                        }
                    }
                    sent
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(400)).await;
        child.kill().unwrap();
        child.wait().unwrap();
        for s in senders {
            sent_total += s.await.unwrap();
        }
    }
    // A restart recovers the WAL; then every acknowledged id must be there.
    let (mut child, _) = start_binary(store.path());
    child.kill().unwrap();
    child.wait().unwrap();
    let stored: HashSet<String> = read_outbox(&store.path().join("outbox.db"))
        .into_iter()
        .map(|r| r.id)
        .collect();
    let acknowledged = acknowledged.lock().unwrap();
    assert!(
        acknowledged.len() > 100,
        "too few requests acknowledged ({}) to test anything",
        acknowledged.len()
    );
    let lost: Vec<&String> = acknowledged.difference(&stored).collect();
    assert!(
        lost.is_empty(),
        "{} acknowledged notifications lost, e.g. {:?}",
        lost.len(),
        lost.first()
    );
    eprintln!(
        "crash test: {CYCLES} SIGKILLs, {sent_total} sent, {} acknowledged, {} stored, 0 lost",
        acknowledged.len(),
        stored.len()
    );
}
