//! The admin listener (default loopback only): `GET /metrics` (Prometheus text format, or
//! OpenMetrics when `Accept` asks for it), `GET /healthz` and `GET /readyz`.
//!
//! It must never be the webhook listener: metrics stay off the address Fenergo can reach. A
//! scrape never opens SQLite or runs a query: the outbox gauges are refreshed by the outbox
//! maintenance thread, the counters as events happen.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;

use super::{Routes, json_response, probes};
use crate::health::StoreHealth;
use crate::telemetry::{Exposition, Metrics};

pub struct Admin {
    metrics: Arc<Metrics>,
    health: Arc<StoreHealth>,
}

impl Admin {
    pub fn new(metrics: Arc<Metrics>, health: Arc<StoreHealth>) -> Admin {
        Admin { metrics, health }
    }
}

impl Routes for Admin {
    async fn route(
        self: Arc<Self>,
        request: Request<Incoming>,
        _peer: SocketAddr,
    ) -> Response<Full<Bytes>> {
        if request.method() != Method::GET {
            let mut response = json_response(
                StatusCode::METHOD_NOT_ALLOWED,
                serde_json::json!({ "error": "use GET" }),
            );
            response
                .headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("GET"));
            return response;
        }
        match request.uri().path() {
            "/metrics" => {
                let exposition = Exposition::negotiate(
                    request
                        .headers()
                        .get(header::ACCEPT)
                        .and_then(|a| a.to_str().ok()),
                );
                // `fenx_ready` says what /readyz would say now; every other value was recorded
                // as it happened, so a scrape costs the same however large the outbox grows.
                self.metrics
                    .ready
                    .set(i64::from(self.health.readiness().is_ok()));
                let body = self.metrics.encode(exposition);
                let mut response = Response::new(Full::new(Bytes::from(body)));
                response.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static(exposition.content_type()),
                );
                response
            }
            "/healthz" => probes::liveness(&self.health),
            "/readyz" => probes::readiness(&self.health),
            _ => json_response(
                StatusCode::NOT_FOUND,
                serde_json::json!({ "error": "no such path" }),
            ),
        }
    }
}
