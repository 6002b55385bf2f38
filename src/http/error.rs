//! Why a request was refused, on the webhook or the admin listener, and the one place that maps
//! each reason to an HTTP status, a log/metric outcome label and the short public message.
//!
//! Public messages say what was wrong with the request; they must never echo secrets, bodies or
//! internal error text (SQLite messages and paths stay in the log).

use std::net::IpAddr;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::Full;

use super::body::BodyError;
use crate::notification::ParseError;
use crate::outbox::OutboxError;
use crate::signature::SignatureError;

/// Seconds a client is asked to wait after a 503.
const RETRY_AFTER_SECS: u64 = 5;

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("no such path")]
    NotFound,
    #[error("method not allowed; use {allow}")]
    MethodNotAllowed { allow: &'static str },
    #[error("client address {0} is not in server.allow_networks")]
    Forbidden(IpAddr),
    #[error(transparent)]
    Body(#[from] BodyError),
    #[error(transparent)]
    Signature(#[from] SignatureError),
    #[error(transparent)]
    Parse(#[from] ParseError),
    #[error(transparent)]
    Store(#[from] OutboxError),
}

impl IngestError {
    pub fn status(&self) -> StatusCode {
        match self {
            IngestError::NotFound => StatusCode::NOT_FOUND,
            IngestError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            IngestError::Forbidden(_) => StatusCode::FORBIDDEN,
            IngestError::Body(e) => match e {
                BodyError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
                BodyError::Timeout(_) | BodyError::TooSlow { .. } => StatusCode::REQUEST_TIMEOUT,
                BodyError::BudgetExhausted { .. } => StatusCode::SERVICE_UNAVAILABLE,
                BodyError::Read(_) => StatusCode::BAD_REQUEST,
            },
            IngestError::Parse(_) => StatusCode::BAD_REQUEST,
            IngestError::Signature(_) => StatusCode::UNAUTHORIZED,
            IngestError::Store(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// A stable label for the request log line and metrics.
    pub fn outcome(&self) -> &'static str {
        match self {
            IngestError::NotFound => "not_found",
            IngestError::MethodNotAllowed { .. } => "method_not_allowed",
            IngestError::Forbidden(_) => "forbidden",
            IngestError::Body(e) => match e {
                BodyError::TooLarge { .. } => "too_large",
                BodyError::Timeout(_) => "body_timeout",
                BodyError::TooSlow { .. } => "body_too_slow",
                BodyError::BudgetExhausted { .. } => "body_budget_exhausted",
                BodyError::Read(_) => "body_unreadable",
            },
            IngestError::Signature(e) => match e {
                SignatureError::Missing => "signature_missing",
                SignatureError::Empty => "signature_empty",
                SignatureError::Malformed => "signature_malformed",
                SignatureError::Mismatch => "signature_mismatch",
                SignatureError::Repeated => "signature_repeated",
            },
            IngestError::Parse(_) => "malformed",
            IngestError::Store(_) => "store_unavailable",
        }
    }

    fn public_message(&self) -> String {
        match self {
            IngestError::Store(_) => {
                "the notification could not be stored durably; retry later".into()
            }
            IngestError::Body(BodyError::BudgetExhausted { .. }) => {
                "too many request bodies are being received at once; retry later".into()
            }
            IngestError::Body(BodyError::Read(_)) => "the request body could not be read".into(),
            other => other.to_string(),
        }
    }

    pub fn into_response(self) -> Response<Full<Bytes>> {
        let mut response = super::json_response(
            self.status(),
            serde_json::json!({ "error": self.public_message() }),
        );
        let headers = response.headers_mut();
        match self {
            IngestError::Store(_) | IngestError::Body(BodyError::BudgetExhausted { .. }) => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
            }
            IngestError::MethodNotAllowed { allow } => {
                headers.insert(header::ALLOW, HeaderValue::from_static(allow));
            }
            IngestError::Signature(_) => {
                headers.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("HMAC-SHA256 header=\"x-fenx-signature\""),
                );
            }
            _ => {}
        }
        response
    }
}
