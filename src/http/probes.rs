//! The answers of `/readyz` and `/healthz`, shared by the webhook and admin listeners.
//!
//! Both read cached facts from [`StoreHealth`]: they never open SQLite, never wait for the
//! writer, and cost the same whatever the store holds.

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::Full;

use super::json_response;
use crate::health::StoreHealth;

/// `/readyz`: 200 while webhooks can be stored durably, else 503 with the reason.
pub fn readiness(health: &StoreHealth) -> Response<Full<Bytes>> {
    match health.readiness() {
        Ok(()) => json_response(StatusCode::OK, serde_json::json!({ "status": "ready" })),
        Err(reason) => json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            serde_json::json!({ "status": "not ready", "error": reason.to_string() }),
        ),
    }
}

/// `/healthz`: 200 unless an outbox write has been stuck past `store.wedged_after`, so that a
/// liveness check restarts a wedged process.
pub fn liveness(health: &StoreHealth) -> Response<Full<Bytes>> {
    match health.liveness() {
        Ok(()) => json_response(StatusCode::OK, serde_json::json!({ "status": "ok" })),
        Err(wedged) => json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            serde_json::json!({ "status": "wedged", "error": wedged.to_string() }),
        ),
    }
}
