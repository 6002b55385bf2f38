//! A faithful Fenergo simulator for tests, benchmarks and local runs: the identity service's
//! token endpoint, the entity data query API (one entity, the bulk read by id, and the paged
//! list), the polling API (event notifications v2), eventual-consistency lag, fault and
//! rate-limit knobs, statistics, and a webhook sender that re-delivers the way Fenergo does.
//!
//! This file owns the handle ([`Simulator`]), its configuration and knobs, and the standalone
//! entry point. What Fenergo's JSON looks like lives in `entities`, the decisions in `state`
//! (with the fault knobs in `faults`, read lag in `lag`, counters in `stats`), the polling
//! feeds in `feeds`, HTTP in `routes` (served by `server`), webhook delivery and
//! signing in `webhook`; `testkit` (feature `testkit`) holds what tests and benchmarks share.
//! The simulator must never be used by the production data path (only tests, benchmarks and
//! fenx-sync's `simulator` and `demo` subcommands start one), it binds only the address it is
//! given (`127.0.0.1:0` from [`Simulator::start`]), and it must never depend on fenx-sync: it
//! stands for the outside world, so it shares none of the code it is testing.
//!
//! Fenergo behaviour the contract could not confirm (the 2-4-8-16 minute re-delivery, the
//! meaning of entity `status`, `Retry-After` on tenant-limit 429s, the redelivery of batches
//! never completed, the paged list's and the bulk read's response shapes) is modelled as the
//! project assumes it, and
//! said so where it is modelled.

mod entities;
mod faults;
mod feeds;
mod lag;
mod routes;
mod server;
mod state;
mod stats;
#[cfg(any(test, feature = "testkit"))]
pub mod testkit;
mod webhook;

use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::ops::Range;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub use stats::{CORRELATION_IDS_KEPT, SimStats};
pub use webhook::{
    Attempt, DeliveryItemStatus, DeliveryReport, REDELIVERY_MINUTES, Redelivery, SIGNATURE_HEADER,
    WebhookError, WebhookSender, WebhookStatus, sign,
};

/// The documented example tenant (contract §3), so logs and notifications look real.
const DEFAULT_TENANT: &str = "45bf62ac-e4b1-4c16-ae32-d774cd18db6d";

/// A reqwest builder on rustls with the ring provider (reqwest is built without a default
/// provider, to keep aws-lc out of the tree), for every client the simulator's side opens.
pub(crate) fn client_builder() -> reqwest::ClientBuilder {
    // A second install (another client in the same process) is refused harmlessly.
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
}

/// What the simulated tenant accepts.
#[derive(Debug, Clone)]
pub struct SimConfig {
    pub tenant_id: String,
    pub client_id: String,
    pub client_secret: String,
    /// Lifetime of issued tokens (`expires_in` is its whole seconds). Fenergo: 15 minutes.
    pub token_ttl: Duration,
    /// The tenant's request limit per 1-second window (Fenergo: 200 prod, 50 SDLC).
    pub requests_per_second: Option<u32>,
    /// The tenant's limit on concurrent requests (Fenergo: 50 prod, 10 SDLC).
    pub max_concurrent: Option<u32>,
    /// Added to every request served past the gateway checks.
    pub latency: Duration,
    /// Seeds tokens, notification ids and sample entities.
    pub seed: u64,
}

impl Default for SimConfig {
    fn default() -> SimConfig {
        SimConfig {
            tenant_id: DEFAULT_TENANT.to_owned(),
            client_id: "fenx-sync-sim".to_owned(),
            client_secret: "sim-client-secret".to_owned(),
            token_ttl: Duration::from_secs(900),
            requests_per_second: None,
            max_concurrent: None,
            latency: Duration::ZERO,
            seed: 0x5EED_F3E5,
        }
    }
}

/// How long an update stays invisible to reads (CQRS projection lag). A new entity is missing
/// (404) meanwhile; an updated one is stale (its previous version is served).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Lag {
    #[default]
    None,
    /// For this long after the update.
    For(Duration),
    /// For the next this-many reads of that entity: GETs, and list pages that reach it (reads
    /// refused earlier, e.g. 401 or an injected 5xx, do not count).
    Reads(u32),
}

/// How the token endpoint refuses while [`Faults::refuse_tokens`] is set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenRefusal {
    /// 401 `{"error":"invalid_client"}`, as for revoked credentials.
    Unauthorized,
    /// 503 `{"error":"temporarily_unavailable"}`, as for an identity-service outage.
    Unavailable,
}

/// Fault knobs, replaced as a whole by [`Simulator::set_faults`] (which restarts their
/// counters). All are deterministic. The 5xx and 429 knobs apply to the API only, never to
/// the token endpoint.
#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// The next this-many API requests past the gateway (entity reads, list pages, polls and
    /// completions alike) fail with 500, 502, 503, 500, …
    pub server_errors: u32,
    /// After those, every this-many-th such request fails the same way (0: never).
    pub server_error_every: u32,
    /// The next this-many authenticated API requests get 429.
    pub rate_limited_requests: u32,
    /// Every authenticated API request gets 429 for this long after the knobs are set.
    pub rate_limited_for: Option<Duration>,
    /// Sent as `Retry-After` (whole seconds, rounded up) on forced 429s, and then also moves
    /// `X-Rate-Limit-Reset` to now + this.
    pub retry_after: Option<Duration>,
    /// Added to [`SimConfig::latency`].
    pub latency: Duration,
    pub refuse_tokens: Option<TokenRefusal>,
    /// The bulk read by id (`getentitieslist`) answers 404, as on a Fenergo without it.
    pub no_bulk_read: bool,
}

/// How the polling API hands out batches, replaced as a whole by [`Simulator::set_polling`].
/// Fenergo documents none of these values (contract §5), so the defaults are guesses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PollingKnobs {
    /// The most notifications in one batch (0 is taken as 1).
    pub batch_size: usize,
    /// How long a served batch waits for its `complete` before it is served again, whole,
    /// under a new batch id. Applies to batches served after it is set.
    pub visibility_timeout: Duration,
    /// Every this-many-th notification published from now on is enqueued twice in a row, with
    /// the same id, as at-least-once delivery allows (0: never).
    pub duplicate_every: u32,
}

impl Default for PollingKnobs {
    fn default() -> PollingKnobs {
        PollingKnobs {
            batch_size: 10,
            visibility_timeout: Duration::from_secs(30),
            duplicate_every: 0,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// A running simulator. Clones share it; it stops when [`Simulator::shutdown`] is called or the
/// last clone is dropped.
#[derive(Clone)]
pub struct Simulator {
    shared: Arc<Shared>,
}

struct Shared {
    state: Arc<state::State>,
    addr: SocketAddr,
    /// Dropping the sender (with the last clone) stops the server too.
    stop: Mutex<Option<oneshot::Sender<()>>>,
    server: Mutex<Option<JoinHandle<()>>>,
}

impl Simulator {
    /// Starts a simulator on `127.0.0.1:0`.
    ///
    /// # Panics
    /// If the loopback interface cannot be bound, which means the test machine is broken.
    pub async fn start(config: SimConfig) -> Simulator {
        let loopback = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
        match Simulator::bind(config, loopback).await {
            Ok(sim) => sim,
            Err(error) => panic!("cannot start the Fenergo simulator: {error}"),
        }
    }

    /// Starts a simulator on `addr`.
    pub async fn bind(config: SimConfig, addr: SocketAddr) -> Result<Simulator, SimError> {
        let bind_error = |source| SimError::Bind { addr, source };
        let listener = TcpListener::bind(addr).await.map_err(bind_error)?;
        let local = listener.local_addr().map_err(bind_error)?;
        let state = Arc::new(state::State::new(config));
        let routes = Arc::new(routes::SimRoutes::new(state.clone()));
        let (stop, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn(server::serve(listener, routes, async {
            // Either a send or the sender's drop means stop.
            let _ = stopped.await;
        }));
        Ok(Simulator {
            shared: Arc::new(Shared {
                state,
                addr: local,
                stop: Mutex::new(Some(stop)),
                server: Mutex::new(Some(server)),
            }),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.shared.addr
    }

    /// The API base a client joins `relativeUrl` to, e.g. `http://127.0.0.1:PORT`.
    pub fn api_base(&self) -> String {
        let mut addr = self.shared.addr;
        if addr.ip().is_unspecified() {
            // Listening on every interface; loopback is one a local client can dial.
            addr.set_ip(Ipv4Addr::LOCALHOST.into());
        }
        format!("http://{addr}")
    }

    /// The token endpoint, e.g. `http://127.0.0.1:PORT/connect/token`.
    pub fn token_url(&self) -> String {
        format!("{}/connect/token", self.api_base())
    }

    pub fn config(&self) -> &SimConfig {
        &self.state().config
    }

    /// Creates or replaces entity `id` with exactly these properties (a map of PropertyDto);
    /// returns its new version, 1 for a new entity. The lag in force applies to this update.
    pub fn put_entity(&self, id: &str, entity_type: &str, properties: serde_json::Value) -> i64 {
        self.state().put_entity(id, entity_type, &properties)
    }

    /// Creates the realistic sample entity for `index` (a Company for even indexes, an
    /// Individual for odd ones; the same id and properties for the same seed and index) and
    /// returns its id and version. Calling it again for an index stores a new version.
    pub fn sample_entity(&self, index: usize) -> (String, i64) {
        let sample = entities::sample(self.state().config.seed, index);
        let version = self.put_entity(&sample.id, sample.entity_type, sample.properties);
        (sample.id, version)
    }

    /// [`Simulator::sample_entity`] for every index in `indexes`, in order.
    pub fn sample_entities(&self, indexes: Range<usize>) -> Vec<(String, i64)> {
        indexes.map(|index| self.sample_entity(index)).collect()
    }

    /// Deletes entity `id`: reads get 404 and the entity list no longer returns it. Returns
    /// whether it existed.
    pub fn delete_entity(&self, id: &str) -> bool {
        self.state().delete_entity(id)
    }

    /// The latest version of an entity, whether or not the lag lets reads see it yet.
    pub fn latest_version(&self, id: &str) -> Option<i64> {
        self.state().latest_version(id)
    }

    /// A webhook body for `entity_id` in Fenergo's PascalCase shape, with a fresh `Id`.
    pub fn notification(&self, event_type: &str, entity_id: &str) -> String {
        self.notification_at(event_type, entity_id, chrono::Utc::now())
    }

    /// [`Simulator::notification`] saying the event happened `when`, for tests that need an
    /// event known to come before or after something else.
    pub fn notification_at(
        &self,
        event_type: &str,
        entity_id: &str,
        when: chrono::DateTime<chrono::Utc>,
    ) -> String {
        self.state().notification(event_type, entity_id, when)
    }

    /// Raises a notification for `entity_id` (built as [`Simulator::notification`] builds one)
    /// on the polling feeds `all` and the event type's domain (the part before `:`); returns
    /// its id.
    pub fn publish(&self, event_type: &str, entity_id: &str) -> String {
        self.state().publish(event_type, entity_id)
    }

    /// Ends the visibility timeout of every batch served and not completed: each is served
    /// again, whole and under a new id, by the next poll of its feed. Tests use it instead of
    /// waiting out a short timeout.
    pub fn expire_batches(&self) {
        self.state().expire_batches();
    }

    pub fn set_polling(&self, knobs: PollingKnobs) {
        self.state().set_polling(knobs);
    }

    /// The lag for updates made from now on (entities with their own lag excepted).
    pub fn set_lag(&self, lag: Lag) {
        self.state().set_lag(lag);
    }

    /// The lag for updates of one entity from now on, overriding [`Simulator::set_lag`].
    pub fn set_lag_for(&self, entity_id: &str, lag: Lag) {
        self.state().set_lag_for(entity_id, lag);
    }

    pub fn set_faults(&self, faults: Faults) {
        self.state().set_faults(faults);
    }

    /// Invalidates every token issued so far: the next API call with one gets 401.
    pub fn expire_tokens(&self) {
        self.state().expire_tokens();
    }

    pub fn stats(&self) -> SimStats {
        self.state().stats()
    }

    /// Stops accepting connections and waits (up to a second) for requests in flight.
    pub async fn shutdown(self) {
        let stop = self
            .shared
            .stop
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(stop) = stop {
            let _ = stop.send(());
        }
        let server = self
            .shared
            .server
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(server) = server
            && let Err(error) = server.await
        {
            tracing::warn!(%error, "the simulator's server task failed");
        }
    }

    fn state(&self) -> &state::State {
        &self.shared.state
    }
}

/// What `fenx-sync simulator` runs.
#[derive(Debug, Clone)]
pub struct StandaloneOptions {
    pub listen: SocketAddr,
    /// How many sample entities to create before serving.
    pub entities: usize,
    pub config: SimConfig,
    /// The webhook secret the sender signs with, and the one the printed configuration lists.
    pub webhook_secret: String,
    /// Where to write the configuration for `fenx-sync serve` (printed on stdout when unset).
    pub write_config: Option<PathBuf>,
    /// Signed webhooks go to this URL (fenx-sync's webhook path), one entity update each.
    pub send_to: Option<String>,
    /// Webhooks per second for `send_to`.
    pub rate: f64,
    /// Stop sending after this many webhooks (unset: until shut down).
    pub count: Option<u64>,
}

/// The secret `fenx-sync simulator` signs with unless told otherwise.
pub const STANDALONE_WEBHOOK_SECRET: &str = "sim-webhook-secret";

/// Deliveries in flight at once; past it the sender waits, so the rate drops instead of memory
/// growing while the target is down (failed deliveries wait out Fenergo's re-delivery schedule).
const STANDALONE_IN_FLIGHT: usize = 64;

impl Default for StandaloneOptions {
    fn default() -> StandaloneOptions {
        StandaloneOptions {
            listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 8089)),
            entities: 100,
            config: SimConfig::default(),
            webhook_secret: STANDALONE_WEBHOOK_SECRET.to_owned(),
            write_config: None,
            send_to: None,
            rate: 1.0,
            count: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StandaloneError {
    #[error(transparent)]
    Sim(#[from] SimError),
    #[error(transparent)]
    Webhook(#[from] WebhookError),
    #[error("cannot write the configuration to {path}: {source}")]
    WriteConfig {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("--rate must be a positive number of webhooks per second, not {0}")]
    Rate(f64),
}

/// Serves a simulator with `options.entities` sample entities until `shutdown` completes,
/// writes (or prints) a configuration that points `fenx-sync serve` at it, and, with
/// `send_to`, updates sample entities and sends a signed webhook for each at `rate`. The
/// credentials are the simulator's own invented ones.
pub async fn run_standalone(
    options: StandaloneOptions,
    shutdown: impl Future<Output = ()>,
) -> Result<(), StandaloneError> {
    if !(options.rate.is_finite() && options.rate > 0.0) {
        return Err(StandaloneError::Rate(options.rate));
    }
    let sim = Simulator::bind(options.config.clone(), options.listen).await?;
    let example = match sim.sample_entities(0..options.entities).pop() {
        Some((id, _)) => format!("entitydataquery/api/entity/{id}"),
        None => String::new(),
    };
    let config = sim.config();
    tracing::info!(
        api_base = %sim.api_base(),
        token_url = %sim.token_url(),
        client_id = %config.client_id,
        tenant_id = %config.tenant_id,
        entities = options.entities,
        example_relative_url = %example,
        "Fenergo simulator listening"
    );
    let serve_config = serve_config(&sim, &options.webhook_secret);
    match &options.write_config {
        Some(path) => {
            std::fs::write(path, &serve_config).map_err(|source| StandaloneError::WriteConfig {
                path: path.clone(),
                source,
            })?;
            tracing::info!(path = %path.display(), "configuration for `fenx-sync serve --config` written");
        }
        None => print!("{serve_config}"),
    }
    let sender = match &options.send_to {
        Some(url) => {
            let sender = WebhookSender::new(url, &options.webhook_secret, Redelivery::default())?;
            tracing::info!(url = %url, rate = options.rate, count = options.count, "sending signed webhooks");
            Some(tokio::spawn(send_traffic(sim.clone(), sender, options)))
        }
        None => None,
    };
    shutdown.await;
    if let Some(sender) = sender {
        sender.abort();
    }
    sim.shutdown().await;
    tracing::info!("Fenergo simulator stopped");
    Ok(())
}

/// A TOML configuration for `fenx-sync serve` that trusts `secret` and reads from `sim`.
fn serve_config(sim: &Simulator, secret: &str) -> String {
    let quoted = |s: &str| toml::Value::from(s).to_string();
    let config = sim.config();
    format!(
        "# fenx-sync configuration for the Fenergo simulator at {api_base}\n\
         # (written by `fenx-sync simulator`). Run: fenx-sync serve --config THIS_FILE\n\
         \n\
         [server]\n\
         listen = \"127.0.0.1:8080\"\n\
         \n\
         [store]\n\
         dir = \"./data-simulator\"\n\
         \n\
         [webhook]\n\
         secrets = [{secret}]\n\
         \n\
         [fenergo]\n\
         api_base = {api_base_value}\n\
         token_url = {token_url}\n\
         tenant_id = {tenant_id}\n\
         client_id = {client_id}\n\
         client_secret = {client_secret}\n",
        api_base = sim.api_base(),
        secret = quoted(secret),
        api_base_value = quoted(&sim.api_base()),
        token_url = quoted(&sim.token_url()),
        tenant_id = quoted(&config.tenant_id),
        client_id = quoted(&config.client_id),
        client_secret = quoted(&config.client_secret),
    )
}

/// Updates sample entities in turn and delivers one signed notification per update, at
/// `options.rate` per second, logging a summary every few seconds.
async fn send_traffic(sim: Simulator, sender: WebhookSender, options: StandaloneOptions) {
    let permits = Arc::new(tokio::sync::Semaphore::new(STANDALONE_IN_FLIGHT));
    let delivered = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut ticks = tokio::time::interval(Duration::from_secs_f64(1.0 / options.rate));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut report = tokio::time::interval(Duration::from_secs(5));
    let entities = options.entities.max(1);
    let mut sent: u64 = 0;
    while options.count.is_none_or(|count| sent < count) {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = report.tick() => {
                let delivered = delivered.load(std::sync::atomic::Ordering::Relaxed);
                tracing::info!(sent, delivered, "webhooks sent so far");
                continue;
            }
        }
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let index = usize::try_from(sent).unwrap_or(0) % entities;
        let (entity_id, _) = sim.sample_entity(index);
        let body = sim.notification("entitydata:draftverified", &entity_id);
        let (sender, delivered) = (sender.clone(), delivered.clone());
        tokio::spawn(async move {
            let report = sender.deliver(body).await;
            if report.delivered() {
                delivered.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            drop(permit);
        });
        sent += 1;
    }
    tracing::info!(sent, "all requested webhooks sent");
}

#[cfg(test)]
mod tests {
    use chrono::{DateTime, Utc};
    use serde_json::{Value, json};
    use tokio::task::JoinSet;

    use super::*;
    use crate::testkit::Api;

    async fn version_read(api: &Api, id: &str) -> Option<i64> {
        let (status, body) = api.entity_json(id).await;
        match status {
            200 => body["data"]["version"].as_i64(),
            404 => None,
            other => panic!("unexpected HTTP {other}: {body}"),
        }
    }

    fn renamed(name: &str) -> Value {
        json!({ "legalEntityName": { "type": "Single", "value": name } })
    }

    #[tokio::test]
    async fn put_entity_bumps_the_version_and_replaces_the_properties() {
        let sim = Simulator::start(SimConfig::default()).await;
        let api = Api::new(&sim).await;
        assert_eq!(sim.put_entity("e-1", "Company", renamed("First Ltd")), 1);
        assert_eq!(sim.put_entity("e-1", "Company", renamed("Second Ltd")), 2);
        assert_eq!(sim.latest_version("e-1"), Some(2));
        let (status, body) = api.entity_json("e-1").await;
        assert_eq!(status, 200);
        assert_eq!(body["data"]["version"], 2);
        assert_eq!(body["data"]["properties"], renamed("Second Ltd"));
        let (id, v1) = sim.sample_entity(5);
        assert_eq!(
            sim.sample_entity(5),
            (id, v1 + 1),
            "same index, same entity, next version"
        );
        assert_eq!(sim.latest_version("never"), None);
    }

    #[tokio::test]
    async fn lag_in_reads_hides_new_entities_then_serves_stale_versions() {
        let sim = Simulator::start(SimConfig::default()).await;
        let api = Api::new(&sim).await;
        sim.set_lag(Lag::Reads(2));
        let (id, v1) = sim.sample_entity(0);
        assert_eq!(version_read(&api, &id).await, None);
        assert_eq!(version_read(&api, &id).await, None);
        assert_eq!(version_read(&api, &id).await, Some(v1));

        sim.set_lag(Lag::Reads(1));
        let v2 = sim.put_entity(&id, "Company", renamed("Renamed Ltd"));
        assert_eq!(version_read(&api, &id).await, Some(v1), "stale");
        assert_eq!(version_read(&api, &id).await, Some(v2), "fresh");

        // A refused read does not use up a lagging read.
        let v3 = sim.put_entity(&id, "Company", renamed("Again Ltd"));
        sim.expire_tokens();
        assert_eq!(api.entity(&id).await.status(), 401);
        let api = Api::new(&sim).await;
        assert_eq!(version_read(&api, &id).await, Some(v2));
        assert_eq!(version_read(&api, &id).await, Some(v3));

        // An update during a pending lag keeps readers on the version before both.
        sim.set_lag(Lag::Reads(2));
        let v4 = sim.put_entity(&id, "Company", renamed("Four Ltd"));
        let v5 = sim.put_entity(&id, "Company", renamed("Five Ltd"));
        assert_eq!(v5, v4 + 1);
        assert_eq!(version_read(&api, &id).await, Some(v3));
        assert_eq!(version_read(&api, &id).await, Some(v3));
        assert_eq!(version_read(&api, &id).await, Some(v5));
        assert_eq!(sim.stats().fetches(&id), 11);
    }

    /// Lag in time is tested on the state with paused time (`state::tests`).
    #[tokio::test]
    async fn lag_per_entity_overrides_the_default() {
        let sim = Simulator::start(SimConfig::default()).await;
        let api = Api::new(&sim).await;
        sim.set_lag(Lag::For(Duration::from_secs(3600)));
        let (id, _) = sim.sample_entity(0);
        assert_eq!(version_read(&api, &id).await, None);

        sim.set_lag(Lag::None);
        sim.set_lag_for("slow", Lag::Reads(1));
        sim.put_entity("slow", "Individual", json!({}));
        sim.put_entity("fast", "Individual", json!({}));
        assert_eq!(version_read(&api, "fast").await, Some(1));
        assert_eq!(version_read(&api, "slow").await, None);
        assert_eq!(version_read(&api, "slow").await, Some(1));
    }

    #[tokio::test]
    async fn server_error_knobs_fail_the_next_n_then_every_nth() {
        let sim = Simulator::start(SimConfig::default()).await;
        let (id, _) = sim.sample_entity(0);
        let api = Api::new(&sim).await;
        sim.set_faults(Faults {
            server_errors: 2,
            server_error_every: 3,
            ..Faults::default()
        });
        let mut statuses = Vec::new();
        for _ in 0..8 {
            let (status, body) = api.entity_json(&id).await;
            if status >= 500 {
                assert_eq!(body["data"], Value::Null);
            }
            statuses.push(status);
        }
        assert_eq!(statuses, [500, 502, 503, 200, 200, 500, 200, 200]);
        sim.set_faults(Faults::default());
        assert_eq!(api.entity(&id).await.status(), 200);
        let stats = sim.stats();
        assert_eq!(stats.server_errors, 4);
        assert_eq!(
            (stats.responses_with(200), stats.responses_with(500)),
            (5, 2)
        );
    }

    fn reset_header(response: &reqwest::Response) -> DateTime<Utc> {
        let reset = response.headers()["x-rate-limit-reset"].to_str().unwrap();
        assert!(reset.len() == 28 && reset.ends_with('Z'), "{reset}");
        reset.parse().unwrap()
    }

    #[tokio::test]
    async fn forced_429s_carry_fenergos_headers() {
        let sim = Simulator::start(SimConfig::default()).await;
        let (id, _) = sim.sample_entity(0);
        let api = Api::new(&sim).await;
        sim.set_faults(Faults {
            rate_limited_requests: 2,
            retry_after: Some(Duration::from_secs(30)),
            ..Faults::default()
        });
        for _ in 0..2 {
            let response = api.entity(&id).await;
            assert_eq!(response.status(), 429);
            assert_eq!(response.headers()["x-rate-limit-remaining"], "0");
            assert_eq!(response.headers()["retry-after"], "30");
            let wait = reset_header(&response) - Utc::now();
            assert!((28..=30).contains(&wait.num_seconds()), "{wait}");
        }
        assert_eq!(api.entity(&id).await.status(), 200);

        // When the window ends is tested on the knobs with explicit times (`faults::tests`).
        let window = Duration::from_secs(3600);
        sim.set_faults(Faults {
            rate_limited_for: Some(window),
            ..Faults::default()
        });
        let response = api.entity(&id).await;
        assert_eq!(response.status(), 429);
        assert!(!response.headers().contains_key("retry-after"));
        assert!(reset_header(&response) <= Utc::now() + window);
        sim.set_faults(Faults::default());
        assert_eq!(api.entity(&id).await.status(), 200);
        assert_eq!(sim.stats().rate_limited, 3);
    }

    /// How requests are counted per second is tested on the state with explicit times
    /// (`state::tests`); this is what a client sees.
    #[tokio::test]
    async fn the_real_rate_limit_answers_429_with_the_next_window() {
        let sim = Simulator::start(SimConfig {
            requests_per_second: Some(1),
            ..SimConfig::default()
        })
        .await;
        let (id, _) = sim.sample_entity(0);
        let api = Api::new(&sim).await;
        let mut limited = None;
        // Two of these land in one UNIX second unless every request takes a second.
        for _ in 0..10 {
            let response = api.entity(&id).await;
            match response.status().as_u16() {
                200 => {}
                429 => {
                    limited = Some(response);
                    break;
                }
                other => panic!("HTTP {other}"),
            }
        }
        let response = limited.expect("a 429 within ten requests");
        assert_eq!(sim.stats().rate_limited, 1);
        assert!(!response.headers().contains_key("retry-after"));
        let wait = reset_header(&response) - Utc::now();
        assert!(wait <= chrono::Duration::seconds(1), "{wait}");
    }

    #[tokio::test]
    async fn the_real_concurrency_limit_refuses_requests_beyond_c_in_flight() {
        let sim = Simulator::start(SimConfig {
            max_concurrent: Some(2),
            ..SimConfig::default()
        })
        .await;
        let (id, _) = sim.sample_entity(0);
        let api = Api::new(&sim).await;
        assert_eq!(api.entity(&id).await.status(), 200, "under the limit");
        // Served requests are held far longer than the test runs, so which requests are in
        // flight together does not depend on how fast the machine is.
        sim.set_faults(Faults {
            latency: Duration::from_secs(3600),
            ..Faults::default()
        });
        let mut held = JoinSet::new();
        for _ in 0..2 {
            let request = api.get(&format!("{}/entitydataquery/api/entity/{id}", api.base));
            held.spawn(async move { request.send().await.map(|r| r.status()) });
        }
        let mut both_in = false;
        for _ in 0..500 {
            if sim.stats().max_in_flight >= 2 {
                both_in = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(both_in, "two requests were not in flight within 10 s");
        for _ in 0..4 {
            assert_eq!(api.entity(&id).await.status(), 429);
        }
        let stats = sim.stats();
        assert_eq!(stats.max_in_flight, 3);
        assert_eq!(stats.rate_limited, 4);
        held.abort_all();
    }

    #[tokio::test]
    async fn latency_is_added_to_served_requests() {
        let sim = Simulator::start(SimConfig::default()).await;
        let (id, _) = sim.sample_entity(0);
        let api = Api::new(&sim).await;
        sim.set_faults(Faults {
            latency: Duration::from_millis(200),
            ..Faults::default()
        });
        let started = std::time::Instant::now();
        assert_eq!(api.entity(&id).await.status(), 200);
        assert!(started.elapsed() >= Duration::from_millis(200));
    }

    #[tokio::test]
    async fn statistics_count_correlation_ids_and_fetches() {
        let sim = Simulator::start(SimConfig::default()).await;
        let (id, _) = sim.sample_entity(0);
        let api = Api::new(&sim).await;
        let url = format!("{}/entitydataquery/api/entity/{id}", api.base);
        assert_eq!(api.entity(&id).await.status(), 200);
        let other = api.get_with(&url, Some(&api.tenant), Some("second"));
        assert_eq!(other.send().await.unwrap().status(), 200);
        let bare = api.get_with(&url, Some(&api.tenant), None);
        assert_eq!(bare.send().await.unwrap().status(), 200);
        assert_eq!(api.entity("missing").await.status(), 404);
        let stats = sim.stats();
        assert_eq!(
            stats.correlation_ids,
            ["test-correlation", "second", "test-correlation"]
        );
        assert_eq!(stats.requests_missing_correlation_id, 1);
        assert_eq!((stats.api_calls, stats.entity_requests()), (4, 4));
        assert_eq!((stats.fetches(&id), stats.fetches("missing")), (3, 1));
        assert_eq!(
            (stats.responses_with(200), stats.responses_with(404)),
            (3, 1)
        );
        assert_eq!(stats.max_in_flight, 1);
        assert_eq!(stats.token_requests, 1);
    }

    #[tokio::test]
    async fn notifications_point_at_the_entity_for_the_configured_tenant() {
        let sim = Simulator::start(SimConfig::default()).await;
        let first: Value =
            serde_json::from_str(&sim.notification("entitydata:created", "e-9")).unwrap();
        let second: Value =
            serde_json::from_str(&sim.notification("entitydata:created", "e-9")).unwrap();
        assert_eq!(first["TenantId"], sim.config().tenant_id.as_str());
        assert_eq!(first["EventType"], "entitydata:created");
        assert_eq!(first["RelativeUrl"], "entitydataquery/api/entity/e-9");
        assert_ne!(first["Id"], second["Id"]);
        assert_ne!(first["CorrelationId"], second["CorrelationId"]);
    }

    #[tokio::test]
    async fn shutdown_or_dropping_the_last_handle_stops_the_server() {
        for explicit in [true, false] {
            let sim = Simulator::start(SimConfig::default()).await;
            let addr = sim.addr();
            let clone = sim.clone();
            assert!(tokio::net::TcpStream::connect(addr).await.is_ok());
            if explicit {
                clone.shutdown().await;
                drop(sim);
            } else {
                drop(sim);
                drop(clone);
            }
            let mut refused = false;
            for _ in 0..100 {
                if tokio::net::TcpStream::connect(addr).await.is_err() {
                    refused = true;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            assert!(refused, "still listening (explicit shutdown: {explicit})");
        }
    }

    #[tokio::test]
    async fn standalone_runs_until_shutdown_and_reports_bind_errors() {
        let options = StandaloneOptions {
            listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            entities: 3,
            ..StandaloneOptions::default()
        };
        let run = run_standalone(
            options.clone(),
            tokio::time::sleep(Duration::from_millis(50)),
        );
        assert!(
            tokio::time::timeout(Duration::from_secs(5), run)
                .await
                .unwrap()
                .is_ok()
        );

        let taken = Simulator::start(SimConfig::default()).await;
        let options = StandaloneOptions {
            listen: taken.addr(),
            ..options
        };
        let err = run_standalone(options, async {}).await.unwrap_err();
        assert!(err.to_string().contains(&taken.addr().to_string()), "{err}");
    }
}
