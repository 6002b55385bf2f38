//! fenx-sync's binary as a child process, for the tests and benchmarks that must run what
//! operators run (a SIGKILL, a full disk, a deleted file): the command line every one of them
//! starts it with, reading its address from its JSON start-up log, and its peak memory.
//!
//! It knows the binary only by the path its caller gives (`env!("CARGO_BIN_EXE_fenx-sync")`) and
//! by its documented environment variables, never by linking it. It must never leave a child's
//! stderr unread (a full pipe would stall the child) and never bind a fixed port.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};

/// A child's log lines, as they arrive.
pub type Log = Arc<Mutex<Vec<String>>>;

/// What happens to a child's log after it named its address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterStart {
    /// Collected into [`Service::log`], for tests that look for a line.
    Keep,
    /// Read and dropped, for load that logs a line per request.
    Discard,
}

/// `bin serve` with both listeners on 127.0.0.1:0 (the default admin port may be taken), JSON
/// logs on stderr, `store` as its store and working directory and `secret` as its one webhook
/// secret, ignoring the caller's `FENX_CONFIG` and `RUST_LOG`. Callers add to it, then
/// [`Service::spawn`] it.
pub fn serve_command(bin: &Path, store: &Path, secret: &str) -> Command {
    let mut command = Command::new(bin);
    command
        .arg("serve")
        .current_dir(store)
        .env_remove("FENX_CONFIG")
        .env_remove("RUST_LOG")
        .env("FENX_SERVER__LISTEN", "127.0.0.1:0")
        .env("FENX_ADMIN__LISTEN", "127.0.0.1:0")
        .env("FENX_WEBHOOK__SECRETS", secret)
        .env("FENX_STORE__DIR", store)
        .env("FENX_LOG__FORMAT", "json")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    command
}

/// A running fenx-sync and the webhook address it logged.
pub struct Service {
    pub child: Child,
    pub addr: SocketAddr,
    /// Every line after the address (empty with [`AfterStart::Discard`]).
    pub log: Log,
}

impl Service {
    /// Spawns `command` (its stderr piped, as [`serve_command`] sets it) and reads its JSON log
    /// until a line names the webhook address (`"listen"`).
    ///
    /// # Panics
    /// If the child cannot start or exits before it logs its address.
    pub fn spawn(mut command: Command, after: AfterStart) -> Service {
        let mut child = command.spawn().expect("the fenx-sync binary starts");
        let mut lines = BufReader::new(child.stderr.take().expect("stderr is piped")).lines();
        let addr = loop {
            let line = lines
                .next()
                .expect("fenx-sync exited before logging its address")
                .expect("fenx-sync's log is text");
            let listen = serde_json::from_str::<serde_json::Value>(&line)
                .ok()
                .and_then(|event| event["listen"].as_str().map(str::to_owned));
            if let Some(listen) = listen {
                break listen.parse().expect("the logged address parses");
            }
        };
        let log = Log::default();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                if after == AfterStart::Keep {
                    sink.lock().unwrap_or_else(|p| p.into_inner()).push(line);
                }
            }
        });
        Service { child, addr, log }
    }

    /// The lines logged so far.
    pub fn lines(&self) -> Vec<String> {
        self.log.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The child's peak resident memory so far.
    pub fn peak_rss_kib(&self) -> u64 {
        peak_rss_kib(self.child.id())
    }
}

/// Process `pid`'s peak resident memory (`VmHWM`) in KiB; 0 where /proc does not say.
pub fn peak_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}
