//! The admin listener (default loopback only): `GET /metrics` (Prometheus text format, or
//! OpenMetrics when `Accept` asks for it), `GET /healthz` and `GET /readyz`.
//!
//! It must never be the webhook listener: metrics stay off the address Fenergo can reach. A
//! scrape never opens SQLite or runs a query: the outbox gauges are refreshed by the outbox
//! maintenance thread, the counters as events happen.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, header};
use http_body_util::Full;

use super::error::IngestError;
use super::{RequestBody, Routes, probes};
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
    async fn route<B: RequestBody>(
        self: Arc<Self>,
        request: Request<B>,
        _peer: SocketAddr,
    ) -> Response<Full<Bytes>> {
        if request.method() != Method::GET {
            return IngestError::MethodNotAllowed { allow: "GET" }.into_response();
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
            _ => IngestError::NotFound.into_response(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::HealthRules;
    use http::StatusCode;
    use http_body_util::BodyExt;

    async fn answer(
        method: Method,
        path: &str,
        accept: Option<&str>,
    ) -> (StatusCode, http::HeaderMap, String) {
        let admin = Arc::new(Admin::new(
            Arc::new(Metrics::new()),
            Arc::new(StoreHealth::new(HealthRules::default())),
        ));
        let mut request = Request::builder().method(method).uri(path);
        if let Some(accept) = accept {
            request = request.header(header::ACCEPT, accept);
        }
        let response = admin
            .route(
                request.body(Full::<Bytes>::default()).unwrap(),
                "127.0.0.1:1".parse().unwrap(),
            )
            .await;
        let (parts, body) = response.into_parts();
        let bytes = body.collect().await.unwrap().to_bytes();
        (
            parts.status,
            parts.headers,
            String::from_utf8(bytes.to_vec()).unwrap(),
        )
    }

    #[tokio::test]
    async fn metrics_are_served_in_the_format_the_scraper_asks_for() {
        let openmetrics = Some("application/openmetrics-text; version=1.0.0");
        for (accept, content_type, ends_with_eof) in [
            (None, "text/plain", false),
            (openmetrics, "application/openmetrics-text", true),
        ] {
            let (status, headers, text) = answer(Method::GET, "/metrics", accept).await;
            assert_eq!(status, StatusCode::OK);
            let served = headers[header::CONTENT_TYPE].to_str().unwrap();
            assert!(served.starts_with(content_type), "{accept:?}: {served}");
            assert!(text.contains("fenx_ready 0"), "{text}");
            assert_eq!(
                text.ends_with("# EOF\n"),
                ends_with_eof,
                "{accept:?}: {text}"
            );
        }
    }

    #[tokio::test]
    async fn other_methods_get_405_with_allow_and_other_paths_404() {
        for path in ["/metrics", "/healthz", "/nowhere"] {
            let (status, headers, _) = answer(Method::POST, path, None).await;
            assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED, "{path}");
            assert_eq!(headers[header::ALLOW], "GET", "{path}");
        }
        let (status, _, text) = answer(Method::GET, "/nowhere", None).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert!(text.contains("no such path"), "{text}");
    }

    #[tokio::test]
    async fn probes_answer_from_the_cached_store_health() {
        assert_eq!(
            answer(Method::GET, "/healthz", None).await.0,
            StatusCode::OK
        );
        // No durable write has been proven yet.
        assert_eq!(
            answer(Method::GET, "/readyz", None).await.0,
            StatusCode::SERVICE_UNAVAILABLE
        );
    }
}
