//! systemd's notify protocol as the real binary speaks it: READY=1 once it can take webhooks,
//! watchdog pings while the outbox is writable, STOPPING=1 on SIGTERM.

use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::helpers::SECRET;

#[test]
fn ready_watchdog_and_stopping_are_sent_to_notify_socket() {
    let dir = tempfile::tempdir().unwrap();
    let socket_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_fenx-sync"))
        .arg("serve")
        .current_dir(dir.path())
        .env_remove("FENX_CONFIG")
        .env("FENX_SERVER__LISTEN", "127.0.0.1:0")
        .env("FENX_ADMIN__LISTEN", "127.0.0.1:0")
        .env("FENX_WEBHOOK__SECRETS", SECRET)
        .env("FENX_STORE__DIR", dir.path())
        .env("NOTIFY_SOCKET", &socket_path)
        .env("WATCHDOG_USEC", "200000")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 512];
    let deadline = Instant::now() + Duration::from_secs(10);
    while !seen.iter().any(|m: &String| m.contains("WATCHDOG=1")) && Instant::now() < deadline {
        let n = socket.recv(&mut buf).expect("a notification within 10 s");
        seen.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    assert!(seen[0].contains("READY=1"), "{seen:?}");
    assert!(seen.iter().any(|m| m.contains("WATCHDOG=1")), "{seen:?}");

    sigterm(child.id());
    let stopping = (0..20).find_map(|_| {
        let n = socket.recv(&mut buf).ok()?;
        let message = String::from_utf8_lossy(&buf[..n]).into_owned();
        message.contains("STOPPING=1").then_some(message)
    });
    assert!(stopping.is_some(), "no STOPPING=1 after SIGTERM");
    let status = child.wait().unwrap();
    assert!(status.success(), "exit after SIGTERM: {status:?}");
}

/// Sends SIGTERM through the `kill` command (no libc binding needed).
fn sigterm(pid: u32) {
    let ok = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
}
