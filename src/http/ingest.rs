//! The webhook endpoint and health probes: the thin layer that wires the pure checks
//! (allow-list, size, signature, parsing) to the outbox in the order the contract demands.
//!
//! Order for `POST {webhook.path}`: allow-list (403) → one signature header (401) → body size
//! (413), budget (503) and rate (408) → signature over the exact raw bytes (401) → JSON (400) →
//! durable group commit → 200. Who may connect at all is its [`PeerPolicy`], applied at accept.
//! Each accepted request is a DEBUG line and counts towards a periodic INFO summary (one line per
//! request costs a tenth of the CPU at full rate, and the outbox keeps every notification
//! anyway); every refusal and failure stays a WARN or ERROR line of its own.
//! It must never answer 2xx before the outbox commit has returned, never open SQLite itself,
//! and never log a secret or a whole body. `/readyz` and `/healthz` read cached store health
//! ([`probes`]); they never wait for the writer.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use ipnet::IpNet;

use super::body::{self, BodyBudget, BodyLimits};
use super::error::IngestError;
use super::{PeerPolicy, RequestBody, Routes, json_response, probes};
use crate::config::Settings;
use crate::notification::{self, Notification};
use crate::outbox::{Appended, NewNotification, Outbox, Source};
use crate::signature::{self, Recipe, RecipeChoice, SignatureError, Verifier};
use crate::telemetry::{Metrics, ReasonLabel, RecipeLabel};

/// The webhook receiver's request handling.
pub struct Ingress {
    path: String,
    verifier: Verifier,
    recipe_choice: RecipeChoice,
    outbox: Outbox,
    body_limits: BodyLimits,
    /// Shared by every webhook connection: the bytes of all bodies held at once.
    body_budget: Arc<BodyBudget>,
    max_connections_per_client: usize,
    allow_networks: Vec<IpNet>,
    trusted_proxies: Vec<IpNet>,
    /// Recipes already announced in the log (auto mode announces each once).
    recipes_seen: Mutex<HashSet<Recipe>>,
    accepted: AcceptedTally,
    metrics: Arc<Metrics>,
}

/// How often the INFO summary of accepted requests is written (when any were).
pub const SUMMARY_EVERY: Duration = Duration::from_secs(10);

impl Ingress {
    pub fn new(settings: &Settings, outbox: Outbox, metrics: Arc<Metrics>) -> Ingress {
        Ingress {
            path: settings.webhook.path.clone(),
            verifier: Verifier::new(&settings.webhook.secrets, settings.webhook.signature.recipe),
            recipe_choice: settings.webhook.signature.recipe,
            outbox,
            body_limits: BodyLimits {
                max_bytes: settings.server.max_body_bytes,
                read_timeout: settings.server.body_read_timeout,
                min_rate: settings.server.min_body_rate,
                rate_grace: settings.server.min_body_rate_grace,
            },
            body_budget: BodyBudget::new(settings.server.max_inflight_body_bytes),
            max_connections_per_client: settings.server.max_connections_per_client,
            allow_networks: settings.server.allow_networks.clone(),
            trusted_proxies: settings.server.trusted_proxies.clone(),
            recipes_seen: Mutex::new(HashSet::new()),
            accepted: AcceptedTally::default(),
            metrics,
        }
    }

    /// Writes the INFO summary of accepted requests every [`SUMMARY_EVERY`] until `stop`
    /// completes, and once more then, so no accepted request goes unmentioned at INFO.
    pub async fn summarize(self: Arc<Self>, stop: impl std::future::Future<Output = ()>) {
        let mut every = tokio::time::interval(SUMMARY_EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        every.tick().await;
        tokio::pin!(stop);
        loop {
            tokio::select! {
                _ = every.tick() => self.accepted.log(),
                () = &mut stop => break,
            }
        }
        self.accepted.log();
    }

    async fn webhook<B: RequestBody>(
        &self,
        request: Request<B>,
        peer: IpAddr,
        log: &mut RequestLog,
    ) -> Result<Accepted, IngestError> {
        let client = client_ip(peer, request.headers(), &self.trusted_proxies);
        log.client = Some(client);
        if !self.allow_networks.is_empty()
            && !self.allow_networks.iter().any(|n| n.contains(&client))
        {
            return Err(IngestError::Forbidden(client));
        }
        let signature_header = signature::single_header(
            request
                .headers()
                .get_all(signature::HEADER)
                .iter()
                .map(HeaderValue::as_bytes),
        )
        .map(|value| value.map(<[u8]>::to_vec))
        .inspect_err(|e| self.count_signature_failure(e))?;
        let declared = request
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        // Held until the response: the notifications share the body's buffer until committed.
        let body = body::read(
            request.into_body(),
            declared,
            &self.body_limits,
            &self.body_budget,
        )
        .await?;
        let verified = self
            .verifier
            .verify(signature_header.as_deref(), &body.bytes)
            .inspect_err(|e| self.count_signature_failure(e))?;
        let recipe = verified.recipe;
        self.metrics
            .signature_recipes
            .get_or_create(&RecipeLabel {
                recipe: recipe.to_string(),
            })
            .inc();
        self.announce_recipe(verified.recipe, verified.secret_index);
        let notifications = notification::parse_body(&body.bytes)?;
        log.describe(&notifications);
        let event_types: Vec<Option<String>> =
            notifications.iter().map(|n| n.event_type.clone()).collect();
        let rows = notifications
            .into_iter()
            .map(|notification| NewNotification {
                notification,
                source: Source::Webhook,
                signature_recipe: Some(recipe),
            })
            .collect();
        let outcomes = self.outbox.append_batch(rows).await?;
        for (event_type, outcome) in event_types.iter().zip(&outcomes) {
            let outcome = if *outcome == Appended::Stored {
                "stored"
            } else {
                "duplicate"
            };
            Metrics::count_event(
                &self.metrics.notifications_received,
                event_type.as_deref(),
                outcome,
            );
        }
        let duplicates = outcomes
            .iter()
            .filter(|o| **o == Appended::Duplicate)
            .count();
        Ok(Accepted {
            stored: outcomes.len() - duplicates,
            duplicates,
        })
    }

    fn count_signature_failure(&self, error: &SignatureError) {
        self.metrics
            .signature_failures
            .get_or_create(&ReasonLabel {
                reason: error.reason().to_owned(),
            })
            .inc();
    }

    /// In auto mode, says once per recipe which one Fenergo's deliveries match, so the operator
    /// can pin it.
    fn announce_recipe(&self, recipe: Recipe, secret_index: usize) {
        if self.recipe_choice != RecipeChoice::Auto {
            return;
        }
        let first_time = self
            .recipes_seen
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert(recipe);
        if first_time {
            tracing::info!(
                %recipe,
                secret_index,
                "webhook signature matched recipe {recipe}; pin it with webhook.signature.recipe = \"{recipe}\""
            );
        }
    }
}

impl Routes for Ingress {
    fn peer_policy(&self) -> PeerPolicy {
        PeerPolicy {
            allow_networks: self.allow_networks.clone(),
            trusted_proxies: self.trusted_proxies.clone(),
            max_connections_per_client: Some(self.max_connections_per_client),
        }
    }

    async fn route<B: RequestBody>(
        self: Arc<Self>,
        request: Request<B>,
        peer: SocketAddr,
    ) -> Response<Full<Bytes>> {
        let is_read = matches!(*request.method(), Method::GET | Method::HEAD);
        match request.uri().path() {
            "/healthz" if is_read => probes::liveness(&self.outbox.health()),
            "/readyz" if is_read => probes::readiness(&self.outbox.health()),
            "/healthz" | "/readyz" => {
                IngestError::MethodNotAllowed { allow: "GET, HEAD" }.into_response()
            }
            path if path == self.path => {
                let started = Instant::now();
                let mut log = RequestLog::default();
                let result = if request.method() == Method::POST {
                    self.webhook(request, peer.ip().to_canonical(), &mut log)
                        .await
                } else {
                    Err(IngestError::MethodNotAllowed { allow: "POST" })
                };
                let elapsed = started.elapsed();
                log.finish(&result, elapsed);
                if let Ok(accepted) = &result {
                    self.accepted.count(accepted);
                }
                self.metrics
                    .webhook_request_duration_seconds
                    .observe(elapsed.as_secs_f64());
                self.metrics.count_webhook(match &result {
                    Ok(accepted) if accepted.stored == 0 => "duplicate",
                    Ok(_) => "stored",
                    Err(error) => error.outcome(),
                });
                match result {
                    Ok(accepted) => json_response(
                        StatusCode::OK,
                        serde_json::json!({ "stored": accepted.stored, "duplicates": accepted.duplicates }),
                    ),
                    Err(error) => error.into_response(),
                }
            }
            _ => IngestError::NotFound.into_response(),
        }
    }
}

struct Accepted {
    stored: usize,
    duplicates: usize,
}

/// What the one log line per webhook request says.
#[derive(Default)]
struct RequestLog {
    client: Option<IpAddr>,
    notification_id: Option<String>,
    /// A batch's last id; with `notification_id` (its first) and the count it brackets the batch.
    last_notification_id: Option<String>,
    event_type: Option<String>,
    notifications: usize,
}

impl RequestLog {
    fn describe(&mut self, notifications: &[Notification]) {
        self.notifications = notifications.len();
        if let Some(first) = notifications.first() {
            self.notification_id = Some(first.id.clone());
            self.last_notification_id = notifications
                .last()
                .filter(|_| notifications.len() > 1)
                .map(|last| last.id.clone());
            self.event_type = first.event_type.clone();
        }
    }

    fn finish(&self, result: &Result<Accepted, IngestError>, elapsed: Duration) {
        let latency_ms = crate::telemetry::millis(elapsed);
        let client = self.client.map(|c| c.to_string());
        let (id, event_type) = (self.notification_id.as_deref(), self.event_type.as_deref());
        let last_id = self.last_notification_id.as_deref();
        match result {
            Ok(a) => tracing::debug!(
                status = 200,
                outcome = if a.stored == 0 { "duplicate" } else { "stored" },
                notification_id = id,
                last_notification_id = last_id,
                event_type,
                notifications = self.notifications,
                duplicates = a.duplicates,
                latency_ms,
                client,
                "webhook accepted"
            ),
            Err(error) if error.status().is_server_error() => tracing::error!(
                status = error.status().as_u16(),
                outcome = error.outcome(),
                notification_id = id,
                last_notification_id = last_id,
                event_type,
                notifications = self.notifications,
                latency_ms,
                client,
                error = %error,
                "webhook not stored"
            ),
            Err(error) => tracing::warn!(
                status = error.status().as_u16(),
                outcome = error.outcome(),
                notification_id = id,
                last_notification_id = last_id,
                event_type,
                latency_ms,
                client,
                error = %error,
                "webhook refused"
            ),
        }
    }
}

/// Accepted requests since the last summary line.
#[derive(Default)]
struct AcceptedTally {
    requests: AtomicU64,
    stored: AtomicU64,
    duplicates: AtomicU64,
}

impl AcceptedTally {
    fn count(&self, accepted: &Accepted) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.stored
            .fetch_add(accepted.stored as u64, Ordering::Relaxed);
        self.duplicates
            .fetch_add(accepted.duplicates as u64, Ordering::Relaxed);
    }

    /// Logs and resets the tally; says nothing when nothing was accepted.
    fn log(&self) {
        let requests = self.requests.swap(0, Ordering::Relaxed);
        let stored = self.stored.swap(0, Ordering::Relaxed);
        let duplicates = self.duplicates.swap(0, Ordering::Relaxed);
        if requests > 0 {
            tracing::info!(
                requests,
                stored,
                duplicates,
                "webhooks accepted since the last summary"
            );
        }
    }
}

/// The address the request really came from: the peer, unless the peer is a trusted proxy, in
/// which case the right-most `X-Forwarded-For` entry that is not itself a trusted proxy.
fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted_proxies: &[IpNet]) -> IpAddr {
    let trusted = |ip: &IpAddr| trusted_proxies.iter().any(|n| n.contains(ip));
    if !trusted(&peer) {
        return peer;
    }
    let forwarded: Vec<&str> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    let mut client = peer;
    for hop in forwarded.join(",").rsplit(',') {
        match hop.trim().parse::<IpAddr>() {
            Ok(ip) => {
                client = ip.to_canonical();
                if !trusted(&client) {
                    break;
                }
            }
            Err(_) => break,
        }
    }
    client
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::{HealthRules, StoreHealth};
    use crate::outbox::OutboxOptions;
    use http_body_util::BodyExt;

    const SECRET: &str = "webhook-secret";
    const MAX_BODY: usize = 1024;
    const PEER: &str = "192.0.2.7:40000";

    /// Routes over a fresh outbox in `dir`, whose health `rules` decide readiness.
    fn ingress(dir: &std::path::Path, rules: HealthRules) -> (Arc<Ingress>, Arc<StoreHealth>) {
        ingress_with(dir, rules, Settings::default())
    }

    fn ingress_with(
        dir: &std::path::Path,
        rules: HealthRules,
        mut settings: Settings,
    ) -> (Arc<Ingress>, Arc<StoreHealth>) {
        settings.webhook.secrets = vec![SECRET.into()];
        settings.server.max_body_bytes = MAX_BODY;
        let options = OutboxOptions {
            busy_timeout: Duration::from_secs(1),
            max_batch: 16,
            queue_capacity: 16,
            enqueue_timeout: Duration::from_secs(1),
        };
        let health = Arc::new(StoreHealth::new(rules));
        // The writer thread stops once the routes (holding the only handle) are dropped.
        let (outbox, _writer) = Outbox::open_with_health(dir, &options, health.clone()).unwrap();
        let routes = Ingress::new(&settings, outbox, Arc::new(Metrics::new()));
        (Arc::new(routes), health)
    }

    const WEBHOOK: &str = "/webhooks/fenergo";

    fn signed(body: &'static str) -> Request<Full<Bytes>> {
        let recipe: Recipe = "sha256-hex/hex".parse().unwrap();
        Request::post(WEBHOOK)
            .header(signature::HEADER, recipe.sign(SECRET, body.as_bytes()))
            .body(Full::new(Bytes::from_static(body.as_bytes())))
            .unwrap()
    }

    async fn answer(
        routes: &Arc<Ingress>,
        request: Request<Full<Bytes>>,
    ) -> (StatusCode, HeaderMap, serde_json::Value) {
        let response = routes.clone().route(request, PEER.parse().unwrap()).await;
        let (parts, body) = response.into_parts();
        let bytes = body.collect().await.unwrap().to_bytes();
        let json = serde_json::from_slice(&bytes).unwrap_or_default();
        (parts.status, parts.headers, json)
    }

    fn empty(method: Method, path: &str) -> Request<Full<Bytes>> {
        Request::builder()
            .method(method)
            .uri(path)
            .body(Full::default())
            .unwrap()
    }

    #[tokio::test]
    async fn a_signed_notification_is_stored_and_a_redelivery_counted() {
        let dir = tempfile::tempdir().unwrap();
        let (routes, _) = ingress(dir.path(), HealthRules::default());
        let body = r#"{"Id":"n1","EventType":"entitydata:draftverified"}"#;
        let (status, _, json) = answer(&routes, signed(body)).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(json, serde_json::json!({ "stored": 1, "duplicates": 0 }));
        let (status, _, json) = answer(&routes, signed(body)).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(json, serde_json::json!({ "stored": 0, "duplicates": 1 }));
    }

    /// Log lines written while the guard lives, on this thread.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[tokio::test(start_paused = true)]
    async fn accepted_requests_are_summed_in_one_info_line_and_refusals_logged_each() {
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::INFO)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        // tracing caches each callsite's interest process-wide, decided on the thread that
        // reaches it first: a sibling test with no subscriber would cache `never` for the
        // refusal's line. With a global default in place no thread decides against a subscriber
        // (once per test binary: a later call finds it set).
        let _ = tracing::subscriber::set_global_default(tracing_subscriber::registry());
        let _guard = tracing::subscriber::set_default(subscriber);
        let dir = tempfile::tempdir().unwrap();
        let (routes, _) = ingress(dir.path(), HealthRules::default());
        let body = r#"{"Id":"n1"}"#;
        for request in [signed(body), signed(body), empty(Method::POST, WEBHOOK)] {
            answer(&routes, request).await;
        }
        let stop = tokio::time::sleep(SUMMARY_EVERY + SUMMARY_EVERY / 2);
        routes.clone().summarize(stop).await;
        let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
        let summaries: Vec<&str> = text
            .lines()
            .filter(|l| l.contains("webhooks accepted since the last summary"))
            .collect();
        assert_eq!(summaries.len(), 1, "{text}");
        assert!(
            summaries[0].contains("requests=2 stored=1 duplicates=1"),
            "{text}"
        );
        assert!(
            !text.contains("status=200"),
            "accepted requests are DEBUG: {text}"
        );
        assert_eq!(text.matches("webhook refused").count(), 1, "{text}");
    }

    #[tokio::test]
    async fn wrong_methods_get_405_naming_the_allowed_ones_and_unknown_paths_404() {
        let dir = tempfile::tempdir().unwrap();
        let (routes, _) = ingress(dir.path(), HealthRules::default());
        for (method, path, allow) in [
            (Method::GET, WEBHOOK, "POST"),
            (Method::DELETE, WEBHOOK, "POST"),
            (Method::POST, "/healthz", "GET, HEAD"),
            (Method::PUT, "/readyz", "GET, HEAD"),
        ] {
            let (status, headers, _) = answer(&routes, empty(method.clone(), path)).await;
            assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED, "{method} {path}");
            assert_eq!(headers[header::ALLOW], allow, "{method} {path}");
        }
        let (status, _, json) = answer(&routes, empty(Method::POST, "/webhooks/other")).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(json["error"], "no such path");
        let (status, _, json) = answer(&routes, empty(Method::HEAD, "/healthz")).await;
        assert_eq!(
            (status, json),
            (StatusCode::OK, serde_json::json!({ "status": "ok" }))
        );
    }

    #[tokio::test]
    async fn clients_outside_the_allow_list_get_403_before_the_signature_is_looked_at() {
        let dir = tempfile::tempdir().unwrap();
        let mut settings = Settings::default();
        settings.server.allow_networks = vec!["198.51.100.0/24".parse().unwrap()];
        let (routes, _) = ingress_with(dir.path(), HealthRules::default(), settings);
        let (status, _, json) = answer(&routes, empty(Method::POST, WEBHOOK)).await;
        assert_eq!(status, StatusCode::FORBIDDEN);
        assert!(
            json["error"].as_str().unwrap().contains("192.0.2.7"),
            "{json}"
        );
    }

    #[tokio::test]
    async fn bad_signatures_get_401_with_the_scheme_named() {
        let dir = tempfile::tempdir().unwrap();
        let (routes, _) = ingress(dir.path(), HealthRules::default());
        let body = r#"{"Id":"n1"}"#;
        let unsigned = Request::post(WEBHOOK)
            .body(Full::new(Bytes::from_static(body.as_bytes())))
            .unwrap();
        let wrong = Request::post(WEBHOOK)
            .header(signature::HEADER, "00".repeat(32))
            .body(Full::new(Bytes::from_static(body.as_bytes())))
            .unwrap();
        let mut tampered = signed(body);
        *tampered.body_mut() = Full::new(Bytes::from_static(br#"{"Id":"n2"}"#));
        for request in [unsigned, wrong, tampered] {
            let (status, headers, _) = answer(&routes, request).await;
            assert_eq!(status, StatusCode::UNAUTHORIZED);
            assert!(headers.contains_key(header::WWW_AUTHENTICATE));
        }
    }

    #[tokio::test]
    async fn bodies_over_the_limit_get_413_declared_or_not() {
        let dir = tempfile::tempdir().unwrap();
        let (routes, _) = ingress(dir.path(), HealthRules::default());
        let big: &'static str = Box::leak(format!(r#"{{"Id":"{}"}}"#, "x".repeat(MAX_BODY)).into());
        let mut declared = signed(big);
        declared
            .headers_mut()
            .insert(header::CONTENT_LENGTH, HeaderValue::from(big.len()));
        for request in [declared, signed(big)] {
            let (status, _, json) = answer(&routes, request).await;
            assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
            assert_eq!(json["error"], format!("body larger than {MAX_BODY} bytes"));
        }
    }

    /// A body whose bytes never come.
    struct Stalled;

    impl hyper::body::Body for Stalled {
        type Data = Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
            std::task::Poll::Pending
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_does_not_arrive_gets_408() {
        let dir = tempfile::tempdir().unwrap();
        let (routes, _) = ingress(dir.path(), HealthRules::default());
        let request = Request::post(WEBHOOK)
            .header(signature::HEADER, "00".repeat(32))
            .body(Stalled)
            .unwrap();
        // Paused time: the read's own limits fire at once, and the outer bound keeps a read
        // without limits from hanging the test.
        let routed = routes.clone().route(request, PEER.parse().unwrap());
        let response = tokio::time::timeout(Duration::from_secs(3600), routed)
            .await
            .expect("the body read has a time limit");
        assert_eq!(response.status(), StatusCode::REQUEST_TIMEOUT);
    }

    #[tokio::test]
    async fn signed_bodies_that_are_not_notifications_get_400() {
        let dir = tempfile::tempdir().unwrap();
        let (routes, _) = ingress(dir.path(), HealthRules::default());
        for body in ["not json", "[1, 2]", r#""a string""#] {
            let (status, _, _) = answer(&routes, signed(body)).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        }
    }

    #[tokio::test]
    async fn a_store_that_cannot_take_the_write_gets_503_and_not_ready() {
        let dir = tempfile::tempdir().unwrap();
        let rules = HealthRules {
            min_free_bytes: 1 << 20,
            ..HealthRules::default()
        };
        let (routes, health) = ingress(dir.path(), rules);
        health.record_free_bytes(1000);
        let (status, headers, json) = answer(&routes, signed(r#"{"Id":"n1"}"#)).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(headers[header::RETRY_AFTER], "5");
        assert!(
            json["error"].as_str().unwrap().contains("retry later"),
            "{json}"
        );
        let (status, _, json) = answer(&routes, empty(Method::GET, "/readyz")).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(json["status"], "not ready");
        health.record_free_bytes(2 << 20);
        assert_eq!(
            answer(&routes, signed(r#"{"Id":"n1"}"#)).await.0,
            StatusCode::OK
        );
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn forwarded(values: &[&str]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for v in values {
            headers.append("x-forwarded-for", v.parse().unwrap());
        }
        headers
    }

    #[test]
    fn forwarded_for_is_believed_only_from_trusted_proxies() {
        let proxies: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let spoofed = forwarded(&["203.0.113.9"]);
        assert_eq!(
            client_ip(ip("198.51.100.1"), &spoofed, &proxies),
            ip("198.51.100.1")
        );
        assert_eq!(
            client_ip(ip("10.1.1.1"), &spoofed, &proxies),
            ip("203.0.113.9")
        );
        let chain = forwarded(&["203.0.113.9, 198.51.100.7", "10.2.2.2"]);
        assert_eq!(
            client_ip(ip("10.1.1.1"), &chain, &proxies),
            ip("198.51.100.7")
        );
        assert_eq!(
            client_ip(ip("10.1.1.1"), &forwarded(&["garbage"]), &proxies),
            ip("10.1.1.1")
        );
        assert_eq!(
            client_ip(ip("10.1.1.1"), &HeaderMap::new(), &proxies),
            ip("10.1.1.1")
        );
        assert_eq!(client_ip(ip("10.1.1.1"), &spoofed, &[]), ip("10.1.1.1"));
    }
}
