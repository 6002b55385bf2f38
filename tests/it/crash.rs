//! Kill -9 mid-burst: every notification that got a 2xx must be in the outbox after a restart.
//! Runs the real binary, so it tests what operators run (WAL + synchronous=FULL, group commit).

use std::collections::HashSet;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fenx_sim::testkit::service::{AfterStart, Service, serve_command};

use crate::helpers::{SECRET, eventually, notification, read_outbox, sign};

const CYCLES: usize = 3;
const CLIENTS: usize = 16;

/// `fenx-sync serve` on 127.0.0.1:0 (both listeners) over `store`, its log read and dropped.
fn start_binary(store: &Path) -> Service {
    let command = serve_command(Path::new(env!("CARGO_BIN_EXE_fenx-sync")), store, SECRET);
    Service::spawn(command, AfterStart::Discard)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_burst_loses_no_acknowledged_notification() {
    let store = tempfile::tempdir().unwrap();
    let acknowledged = Arc::new(Mutex::new(HashSet::new()));
    let mut sent_total = 0;
    for cycle in 0..CYCLES {
        let Service {
            mut child, addr, ..
        } = start_binary(store.path());
        let before = acknowledged.lock().unwrap().len();
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
        // Killed once the clients have had a few group commits answered, while they are all
        // still sending: however slow the machine, the kill lands mid-burst.
        eventually("eight acknowledgements per client", || async {
            (acknowledged.lock().unwrap().len() >= before + 8 * CLIENTS).then_some(())
        })
        .await;
        child.kill().unwrap();
        child.wait().unwrap();
        for s in senders {
            sent_total += s.await.unwrap();
        }
    }
    // A restart recovers the WAL; then every acknowledged id must be there.
    let mut child = start_binary(store.path()).child;
    child.kill().unwrap();
    child.wait().unwrap();
    let stored: HashSet<String> = read_outbox(&store.path().join("outbox.db"))
        .into_iter()
        .map(|r| r.id)
        .collect();
    let acknowledged = acknowledged.lock().unwrap();
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
