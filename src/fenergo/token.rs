//! OAuth2 client-credentials tokens for Fenergo's API, cached until shortly before they expire.
//!
//! However many workers ask at once, at most one token request is in flight (the identity
//! service allows about 100 token requests per 5 minutes per IP). It must never log the client
//! secret or a token.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use prometheus_client::metrics::counter::Counter;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use tokio::sync::Mutex;
use tokio::time::Instant;

/// Tokens Fenergo issues live 900 s; used when a response omits `expires_in`.
const DEFAULT_TTL: Duration = Duration::from_secs(900);

#[derive(Debug, Clone, thiserror::Error)]
pub enum TokenError {
    /// The identity service refused the credentials or the request: retrying will not help
    /// until the configuration changes.
    #[error("token request refused with HTTP {status}: {excerpt}")]
    Refused { status: u16, excerpt: String },
    /// The identity service could not be reached or failed; worth retrying later.
    #[error("token request failed: {0}")]
    Unavailable(String),
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    expires_in: Option<u64>,
}

struct Cached {
    bearer: Arc<str>,
    renew_at: Instant,
}

/// Where and how to ask for tokens.
pub struct TokenRequest {
    pub token_url: String,
    pub client_id: String,
    pub client_secret: SecretString,
    pub scope: String,
    /// Renew this long before expiry.
    pub refresh_margin: Duration,
}

pub struct TokenCache {
    http: reqwest::Client,
    request: TokenRequest,
    current: RwLock<Option<Cached>>,
    /// Held while a token request is in flight, so concurrent callers wait for its answer.
    refreshing: Mutex<()>,
    issued: Counter,
}

impl TokenCache {
    /// `issued` counts the tokens fetched (the `fenx_token_refreshes` metric).
    pub fn new(http: reqwest::Client, request: TokenRequest, issued: Counter) -> TokenCache {
        TokenCache {
            http,
            request,
            current: RwLock::new(None),
            refreshing: Mutex::new(()),
            issued,
        }
    }

    /// A valid bearer token, from the cache or from one (shared) token request.
    pub async fn bearer(&self) -> Result<Arc<str>, TokenError> {
        if let Some(bearer) = self.cached() {
            return Ok(bearer);
        }
        let _only_one_request = self.refreshing.lock().await;
        if let Some(bearer) = self.cached() {
            return Ok(bearer);
        }
        let (bearer, ttl) = self.request_token().await?;
        let renew_at = Instant::now() + ttl.saturating_sub(self.request.refresh_margin);
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Some(Cached {
            bearer: bearer.clone(),
            renew_at,
        });
        self.issued.inc();
        tracing::info!(
            expires_in_secs = ttl.as_secs(),
            "fetched a Fenergo access token"
        );
        Ok(bearer)
    }

    /// Forgets `rejected` (a token the API answered 401 to), unless it was already replaced, so
    /// many workers hitting 401 with the same old token cause one refresh, not many.
    pub fn invalidate(&self, rejected: &str) {
        let mut current = self.current.write().unwrap_or_else(|p| p.into_inner());
        if current.as_ref().is_some_and(|c| &*c.bearer == rejected) {
            *current = None;
        }
    }

    fn cached(&self) -> Option<Arc<str>> {
        let current = self.current.read().unwrap_or_else(|p| p.into_inner());
        current
            .as_ref()
            .filter(|c| Instant::now() < c.renew_at)
            .map(|c| c.bearer.clone())
    }

    /// One token request, retried briefly in-process when the identity service is unavailable
    /// (a refusal is not retried).
    async fn request_token(&self) -> Result<(Arc<str>, Duration), TokenError> {
        (|| self.request_token_once())
            .retry(
                ExponentialBuilder::default()
                    .with_min_delay(Duration::from_millis(200))
                    .with_max_times(2)
                    .with_jitter(),
            )
            .when(|e| matches!(e, TokenError::Unavailable(_)))
            .await
    }

    async fn request_token_once(&self) -> Result<(Arc<str>, Duration), TokenError> {
        let form = [
            ("grant_type", "client_credentials"),
            ("client_id", self.request.client_id.as_str()),
            ("client_secret", self.request.client_secret.expose_secret()),
            ("scope", self.request.scope.as_str()),
        ];
        let response = self
            .http
            .post(&self.request.token_url)
            .form(&form)
            .send()
            .await
            .map_err(|e| TokenError::Unavailable(super::describe_reqwest(&e)))?;
        let status = response.status();
        if status.is_server_error() || status.as_u16() == 429 {
            return Err(TokenError::Unavailable(format!("HTTP {status}")));
        }
        let body = response
            .bytes()
            .await
            .map_err(|e| TokenError::Unavailable(super::describe_reqwest(&e)))?;
        if !status.is_success() {
            return Err(TokenError::Refused {
                status: status.as_u16(),
                excerpt: super::excerpt(&body),
            });
        }
        let token: TokenResponse =
            serde_json::from_slice(&body).map_err(|e| TokenError::Refused {
                status: status.as_u16(),
                excerpt: format!("unreadable token response: {e}"),
            })?;
        let ttl = token
            .expires_in
            .map(Duration::from_secs)
            .unwrap_or(DEFAULT_TTL);
        Ok((Arc::from(token.access_token), ttl))
    }
}
