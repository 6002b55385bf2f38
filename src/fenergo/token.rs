//! OAuth2 client-credentials tokens for Fenergo's API, cached until shortly before they expire.
//!
//! However many workers ask at once, at most one token request is in flight (the identity
//! service allows about 100 token requests per 5 minutes per IP), and a token is reused for most
//! of its life whatever its `expires_in`. A refusal of the credentials is loud (one ERROR line
//! naming the client id and the reason, repeated at most once a minute, and the
//! `fenx_fenergo_credentials_refused` gauge) and retried with back-off, never once per call. It
//! must never log the client secret or a token.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use chrono::{DateTime, Utc};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use tokio::sync::Mutex;
use tokio::time::Instant;

/// Tokens Fenergo issues live 900 s; used when a response omits `expires_in`.
const DEFAULT_TTL: Duration = Duration::from_secs(900);
/// Refused credentials are tried again after this, doubling up to [`REFUSED_RETRY_MAX`]: an
/// operator's fix is picked up soon, and the identity service's budget is not spent.
const REFUSED_RETRY_MIN: Duration = Duration::from_secs(1);
const REFUSED_RETRY_MAX: Duration = Duration::from_secs(60);
/// The ERROR line for refused credentials repeats at most this often.
const REFUSED_LOG_EVERY: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, thiserror::Error)]
pub enum TokenError {
    /// The identity service refused the credentials or the request (400/401/403, e.g.
    /// `invalid_client`): retrying will not help until the configuration changes.
    #[error(
        "Fenergo refused the credentials of client id {client_id} with HTTP {status}: {reason}"
    )]
    Refused {
        status: u16,
        client_id: String,
        /// The OAuth `error` code (with its description), or the start of the body.
        reason: String,
    },
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

/// Since when, and why, the identity service refuses our credentials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CredentialsRefusal {
    pub since: DateTime<Utc>,
    pub client_id: String,
    pub status: u16,
    pub reason: String,
}

struct Refused {
    refusal: CredentialsRefusal,
    retry_at: Instant,
    backoff: Duration,
    logged_at: Instant,
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
    refused: std::sync::Mutex<Option<Refused>>,
    /// Whether a refusal is logged here (a one-shot command reports it itself).
    log_refusals: std::sync::atomic::AtomicBool,
    issued: Counter,
    refused_gauge: Gauge,
}

impl TokenCache {
    /// `issued` counts the tokens fetched (the `fenx_token_refreshes` metric); `refused` is the
    /// `fenx_fenergo_credentials_refused` gauge.
    pub fn new(
        http: reqwest::Client,
        request: TokenRequest,
        issued: Counter,
        refused: Gauge,
    ) -> TokenCache {
        TokenCache {
            http,
            request,
            current: RwLock::new(None),
            refreshing: Mutex::new(()),
            refused: std::sync::Mutex::new(None),
            log_refusals: std::sync::atomic::AtomicBool::new(true),
            issued,
            refused_gauge: refused,
        }
    }

    /// A valid bearer token, from the cache or from one (shared) token request. While the
    /// credentials are refused, callers get the refusal without a request until its back-off
    /// has passed.
    pub async fn bearer(&self) -> Result<Arc<str>, TokenError> {
        if let Some(bearer) = self.cached() {
            return Ok(bearer);
        }
        self.refused_until_retry()?;
        let _only_one_request = self.refreshing.lock().await;
        if let Some(bearer) = self.cached() {
            return Ok(bearer);
        }
        self.refused_until_retry()?;
        let (bearer, ttl) = match self.request_token().await {
            Ok(token) => token,
            Err(error) => {
                if let TokenError::Refused { status, reason, .. } = &error {
                    self.note_refusal(*status, reason);
                }
                return Err(error);
            }
        };
        let renew_at = Instant::now() + renew_after(ttl, self.request.refresh_margin);
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Some(Cached {
            bearer: bearer.clone(),
            renew_at,
        });
        self.issued.inc();
        self.note_accepted();
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

    /// Turns the ERROR line for refused credentials off (`false`) or on.
    pub fn log_refusals(&self, on: bool) {
        self.log_refusals
            .store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// The current refusal of our credentials, if the last token request was refused.
    pub fn refusal(&self) -> Option<CredentialsRefusal> {
        self.refused_state().as_ref().map(|r| r.refusal.clone())
    }

    /// Whether a caller should try Fenergo now: the credentials are not refused, or their
    /// back-off has passed (the next token request tries them again).
    pub fn usable(&self) -> bool {
        self.refused_state()
            .as_ref()
            .is_none_or(|r| Instant::now() >= r.retry_at)
    }

    fn refused_state(&self) -> std::sync::MutexGuard<'_, Option<Refused>> {
        self.refused.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn refused_until_retry(&self) -> Result<(), TokenError> {
        match self.refused_state().as_ref() {
            Some(r) if Instant::now() < r.retry_at => Err(TokenError::Refused {
                status: r.refusal.status,
                client_id: r.refusal.client_id.clone(),
                reason: r.refusal.reason.clone(),
            }),
            _ => Ok(()),
        }
    }

    fn note_refusal(&self, status: u16, reason: &str) {
        let now = Instant::now();
        let mut state = self.refused_state();
        let log = match state.as_mut() {
            Some(r) => {
                r.backoff = (r.backoff * 2).min(REFUSED_RETRY_MAX);
                r.retry_at = now + r.backoff;
                r.refusal.status = status;
                r.refusal.reason = reason.to_owned();
                let due = now.duration_since(r.logged_at) >= REFUSED_LOG_EVERY;
                if due {
                    r.logged_at = now;
                }
                due
            }
            None => {
                *state = Some(Refused {
                    refusal: CredentialsRefusal {
                        since: Utc::now(),
                        client_id: self.request.client_id.clone(),
                        status,
                        reason: reason.to_owned(),
                    },
                    retry_at: now + REFUSED_RETRY_MIN,
                    backoff: REFUSED_RETRY_MIN,
                    logged_at: now,
                });
                true
            }
        };
        self.refused_gauge.set(1);
        let log = log && self.log_refusals.load(std::sync::atomic::Ordering::Relaxed);
        if let (true, Some(r)) = (log, state.as_ref()) {
            tracing::error!(
                client_id = %r.refusal.client_id,
                status,
                reason = %r.refusal.reason,
                since = %r.refusal.since.to_rfc3339(),
                "Fenergo refused the client credentials of client id {}: {}; syncing is paused \
                 (webhooks are still stored, nothing is dead-lettered) and the credentials are \
                 retried with back-off",
                r.refusal.client_id,
                r.refusal.reason,
            );
        }
    }

    fn note_accepted(&self) {
        if let Some(r) = self.refused_state().take() {
            self.refused_gauge.set(0);
            tracing::info!(
                client_id = %r.refusal.client_id,
                refused_since = %r.refusal.since.to_rfc3339(),
                "Fenergo accepts the client credentials again; syncing resumes"
            );
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
                client_id: self.request.client_id.clone(),
                reason: oauth_reason(&body),
            });
        }
        let token: TokenResponse = serde_json::from_slice(&body).map_err(|e| {
            TokenError::Unavailable(format!("unreadable token response (HTTP {status}): {e}"))
        })?;
        let ttl = token
            .expires_in
            .map(Duration::from_secs)
            .unwrap_or(DEFAULT_TTL);
        Ok((Arc::from(token.access_token), ttl))
    }
}

/// How long a token is used before it is renewed: until `refresh_margin` before it expires, but
/// at least half its life, so a token shorter-lived than the margin is still reused.
fn renew_after(ttl: Duration, refresh_margin: Duration) -> Duration {
    ttl.saturating_sub(refresh_margin).max(ttl / 2)
}

/// The OAuth error of a refusal (`invalid_client`, with its description when sent), else the
/// start of the body.
fn oauth_reason(body: &[u8]) -> String {
    #[derive(Deserialize)]
    struct OAuthError {
        error: String,
        error_description: Option<String>,
    }
    match serde_json::from_slice::<OAuthError>(body) {
        Ok(OAuthError {
            error,
            error_description: Some(description),
        }) if !description.trim().is_empty() => format!("{error} ({})", description.trim()),
        Ok(e) => e.error,
        Err(_) if body.is_empty() => "no reason given".into(),
        Err(_) => super::excerpt(body),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_reused_for_most_of_their_life_whatever_expires_in_is() {
        let margin = Duration::from_secs(60);
        assert_eq!(
            renew_after(Duration::from_secs(900), margin),
            Duration::from_secs(840)
        );
        assert_eq!(
            renew_after(Duration::from_secs(20), margin),
            Duration::from_secs(10)
        );
        assert_eq!(
            renew_after(Duration::from_secs(100), margin),
            Duration::from_secs(50)
        );
        assert_eq!(renew_after(Duration::ZERO, margin), Duration::ZERO);
    }

    #[test]
    fn refusal_reasons_name_the_oauth_error() {
        assert_eq!(
            oauth_reason(br#"{"error":"invalid_client"}"#),
            "invalid_client"
        );
        assert_eq!(
            oauth_reason(br#"{"error":"invalid_scope","error_description":"no fenx.all"}"#),
            "invalid_scope (no fenx.all)"
        );
        assert_eq!(oauth_reason(b""), "no reason given");
        assert_eq!(oauth_reason(b"<html>denied</html>"), "<html>denied</html>");
    }
}
