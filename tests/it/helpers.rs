//! Starting the service in-process on port 0 with a temp store, signing bodies, and reading the
//! outbox back the way an operator would (plain SQL).

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use fenx_sync::config::Settings;
use fenx_sync::signature::Recipe;
use rusqlite::Connection;
use tempfile::TempDir;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub const SECRET: &str = "test-webhook-secret";

/// A running service with its own temp store.
pub struct TestApp {
    pub addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub dir: TempDir,
    pub client: reqwest::Client,
    shutdown: Option<oneshot::Sender<()>>,
    handle: Option<JoinHandle<()>>,
}

/// Settings for a test: loopback port 0, a temp store, one secret, short timeouts.
pub fn test_settings(dir: &Path) -> Settings {
    let mut s = Settings::default();
    s.server.listen = "127.0.0.1:0".parse().unwrap();
    s.store.dir = dir.to_owned();
    s.store.busy_timeout = Duration::from_millis(300);
    s.webhook.secrets = vec![SECRET.into()];
    s.server.shutdown_grace = Duration::from_secs(5);
    s.store.probe_interval = Duration::from_millis(200);
    s
}

impl TestApp {
    pub async fn spawn() -> TestApp {
        Self::spawn_with(|_| {}).await
    }

    pub async fn spawn_with(customise: impl FnOnce(&mut Settings)) -> TestApp {
        let app = Self::start_in(tempfile::tempdir().unwrap(), customise).await;
        app.wait_ready().await;
        app
    }

    /// Starts the service with its store in `dir`, without waiting for it to be ready.
    pub async fn start_in(dir: TempDir, customise: impl FnOnce(&mut Settings)) -> TestApp {
        let mut settings = test_settings(dir.path());
        customise(&mut settings);
        let listener = tokio::net::TcpListener::bind(settings.server.listen)
            .await
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin_addr = admin.local_addr().unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let handle = tokio::spawn(async move {
            let listeners = fenx_sync::Listeners {
                webhook: Some(listener),
                admin: Some(admin),
            };
            fenx_sync::run(settings, listeners, async {
                let _ = rx.await;
            })
            .await
            .expect("service runs");
        });
        TestApp {
            addr,
            admin_addr,
            dir,
            client: fenx_sync::fenergo::client_builder().build().unwrap(),
            shutdown: Some(tx),
            handle: Some(handle),
        }
    }

    /// Waits until `/readyz` says the outbox is open and writable.
    async fn wait_ready(&self) {
        for _ in 0..100 {
            if let Ok(r) = self.client.get(self.url("/readyz")).send().await
                && r.status() == 200
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("service at {} never became ready", self.addr);
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Posts `body` signed with the default secret and recipe `secret/hex`.
    pub async fn post_signed(&self, body: &str) -> reqwest::Response {
        self.post_with_signature(body, Some(&sign(SECRET, "sha256-hex/hex", body)))
            .await
    }

    pub async fn post_with_signature(
        &self,
        body: &str,
        signature: Option<&str>,
    ) -> reqwest::Response {
        let mut request = self
            .client
            .post(self.url("/webhooks/fenergo"))
            .header("content-type", "application/json")
            .body(body.to_owned());
        if let Some(signature) = signature {
            request = request.header("x-fenx-signature", signature);
        }
        request.send().await.expect("request reaches the server")
    }

    /// Asks the service to stop and waits until it has drained; hands back the store.
    pub async fn stop(mut self) -> TempDir {
        self.shutdown.take().unwrap().send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(15), self.handle.take().unwrap())
            .await
            .expect("service stops within 15 s")
            .unwrap();
        self.dir
    }

    /// `GET path` on the webhook listener: status and body.
    pub async fn probe(&self, path: &str) -> (u16, String) {
        let response = self.client.get(self.url(path)).send().await.unwrap();
        let status = response.status().as_u16();
        (status, response.text().await.unwrap())
    }

    /// The Prometheus text from the admin listener.
    pub async fn metrics(&self) -> String {
        let url = format!("http://{}/metrics", self.admin_addr);
        self.client
            .get(url)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    pub fn outbox(&self) -> Connection {
        Connection::open(self.dir.path().join("outbox.db")).unwrap()
    }

    /// Every stored row, oldest first.
    pub fn stored(&self) -> Vec<StoredRow> {
        read_outbox(&self.dir.path().join("outbox.db"))
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct StoredRow {
    pub id: String,
    pub event_type: Option<String>,
    pub raw: Vec<u8>,
    pub recipe: Option<String>,
    pub duplicates: i64,
}

pub fn read_outbox(path: &Path) -> Vec<StoredRow> {
    let conn = Connection::open(path).unwrap();
    let mut stmt = conn
        .prepare("SELECT id, event_type, raw, signature_recipe, duplicates FROM notification ORDER BY seq")
        .unwrap();
    stmt.query_map([], |r| {
        Ok(StoredRow {
            id: r.get(0)?,
            event_type: r.get(1)?,
            raw: r.get(2)?,
            recipe: r.get(3)?,
            duplicates: r.get(4)?,
        })
    })
    .unwrap()
    .map(Result::unwrap)
    .collect()
}

pub fn sign(secret: &str, recipe: &str, body: &str) -> String {
    recipe
        .parse::<Recipe>()
        .unwrap()
        .sign(secret, body.as_bytes())
}

/// A webhook body as Fenergo documents it.
pub fn notification(id: &str, event_type: &str) -> String {
    format!(
        r#"{{"Id":"{id}","TenantId":"45bf62ac-e4b1-4c16-ae32-d774cd18db6d","EventType":"{event_type}","RelativeUrl":"entitydataquery/api/entity/9b22ae41-3f0a-4c68-a332-8669705ee3ec","Payload":{{}},"When":"2023-11-12T17:18:55+00:00","CorrelationId":"c","CausationId":"d"}}"#
    )
}

/// Waits (bounded) until `sql` counts at least `want`.
pub async fn wait_for(path: &std::path::Path, sql: &str, want: i64) {
    for _ in 0..500 {
        if path.exists()
            && Connection::open(path)
                .unwrap()
                .query_row(sql, [], |r| r.get::<_, i64>(0))
                .unwrap()
                >= want
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{sql} never reached {want} within 10 s");
}

/// How many `entity` rows `reporting.db` under `store_dir` holds for `entity_id`.
pub fn entity_rows(store_dir: &Path, entity_id: &str) -> i64 {
    Connection::open(store_dir.join("reporting.db"))
        .unwrap()
        .query_row(
            "SELECT count(*) FROM entity WHERE entity_id = ?1",
            [entity_id],
            |r| r.get(0),
        )
        .unwrap()
}

/// Waits (bounded: 10 s) until `check` gives `Some`, and returns it; panics naming `what`.
pub async fn eventually<T, Fut>(what: &str, mut check: impl FnMut() -> Fut) -> T
where
    Fut: std::future::Future<Output = Option<T>>,
{
    for _ in 0..500 {
        if let Some(value) = check().await {
            return value;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{what} did not happen within 10 s");
}

/// Posts `body`, signed with [`SECRET`] (recipe `sha256-hex/hex`), to the webhook path of a
/// service listening at `listen` (a separate process), and returns the answer.
pub async fn post_signed_to(
    client: &reqwest::Client,
    listen: &str,
    body: String,
) -> reqwest::Response {
    let signature = sign(SECRET, "sha256-hex/hex", &body);
    client
        .post(format!("http://{listen}/webhooks/fenergo"))
        .header("x-fenx-signature", signature)
        .body(body)
        .send()
        .await
        .unwrap()
}
