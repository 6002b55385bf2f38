//! The admin listener (default loopback only): `GET /metrics` (Prometheus text format, or
//! OpenMetrics when `Accept` asks for it) with the outbox gauges read at scrape time, and
//! `GET /healthz`.
//!
//! It must never be the webhook listener: metrics stay off the address Fenergo can reach.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;

use super::{Routes, json_response};
use crate::outbox::admin::OutboxAdmin;
use crate::telemetry::{Exposition, Metrics, StatusLabel};

pub struct Admin {
    metrics: Arc<Metrics>,
    store_dir: PathBuf,
}

impl Admin {
    pub fn new(metrics: Arc<Metrics>, store_dir: PathBuf) -> Admin {
        Admin { metrics, store_dir }
    }

    /// Reads outbox depth and the oldest pending age into their gauges. A failure (file busy or
    /// not yet created) leaves the previous values and is logged, never fails the scrape.
    async fn refresh_outbox_gauges(&self) {
        let dir = self.store_dir.clone();
        let status = tokio::task::spawn_blocking(move || {
            OutboxAdmin::open(&dir, Duration::from_millis(500)).and_then(|admin| admin.status())
        })
        .await;
        match status {
            Ok(Ok(status)) => {
                for status_name in ["pending", "done", "ignored", "dead"] {
                    let count = status
                        .by_status
                        .iter()
                        .find(|(s, _)| s == status_name)
                        .map_or(0, |(_, n)| *n);
                    self.metrics
                        .outbox_rows
                        .get_or_create(&StatusLabel {
                            status: status_name.to_owned(),
                        })
                        .set(count);
                }
                self.metrics
                    .oldest_pending_seconds
                    .set(status.oldest_pending_age_secs.unwrap_or(0));
            }
            Ok(Err(error)) => tracing::debug!(%error, "outbox gauges not refreshed"),
            Err(error) => tracing::warn!(%error, "outbox gauge task failed"),
        }
    }
}

impl Routes for Admin {
    async fn route(
        self: Arc<Self>,
        request: Request<Incoming>,
        _peer: SocketAddr,
    ) -> Response<Full<Bytes>> {
        if request.method() != Method::GET {
            return json_response(
                StatusCode::METHOD_NOT_ALLOWED,
                serde_json::json!({ "error": "use GET" }),
            );
        }
        match request.uri().path() {
            "/metrics" => {
                let exposition = Exposition::negotiate(
                    request
                        .headers()
                        .get(header::ACCEPT)
                        .and_then(|a| a.to_str().ok()),
                );
                self.refresh_outbox_gauges().await;
                let body = self.metrics.encode(exposition);
                let mut response = Response::new(Full::new(Bytes::from(body)));
                response.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static(exposition.content_type()),
                );
                response
            }
            "/healthz" => json_response(StatusCode::OK, serde_json::json!({ "status": "ok" })),
            _ => json_response(
                StatusCode::NOT_FOUND,
                serde_json::json!({ "error": "no such path" }),
            ),
        }
    }
}
