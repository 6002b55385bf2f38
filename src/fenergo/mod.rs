//! The Fenergo query API client: joins `relativeUrl` to the API base, sends the bearer token,
//! `X-TENANT-ID` and an `x-correlation-id` on every call, honours the client-side limiter, and
//! classifies every answer into what the sync worker should do next ([`FetchError`]).
//!
//! HTTPS is rustls with the ring provider (no OpenSSL). It must never log a token or secret. An
//! entity read is never retried here beyond one token refresh on 401 (retry schedules live in
//! the outbox); only a token request is retried briefly in-process while the identity service
//! is unavailable ([`token`]).

pub mod limiter;
pub mod token;
pub mod wire;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use chrono::{DateTime, Utc};
use http::{HeaderMap, Method};
use secrecy::SecretString;

use crate::config::FenergoSettings;
use crate::telemetry::{Metrics, StatusLabel};
use limiter::Limiter;
pub use token::CredentialsRefusal;
use token::{TokenCache, TokenError, TokenRequest};
pub use wire::{Entity, EntityList, Page};

/// The path of one entity's read, relative to the API base.
pub fn entity_path(entity_id: &str) -> String {
    format!("entitydataquery/api/entity/{entity_id}")
}

/// The bulk read by id (contract §6).
pub const BULK_READ_PATH: &str = "entitydataquery/api/entity/getentitieslist";

/// The longest response excerpt kept for a dead letter.
const EXCERPT_LEN: usize = 300;
/// Wait after a 429 that carried no usable header (Fenergo's tenant window is one second).
const DEFAULT_429_WAIT: Duration = Duration::from_secs(1);

/// Why a fetch did not produce an entity, grouped by what to do about it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum FetchError {
    /// 404: right after an event this is usually eventual consistency.
    #[error("HTTP 404: entity not found")]
    NotFound,
    /// 429: wait at least `retry_after`.
    #[error("HTTP 429: rate limited")]
    RateLimited { retry_after: Duration },
    /// 400, 403, 410 and other 4xx (and 401 after a token refresh): retrying will not help.
    #[error("HTTP {status}: {excerpt}")]
    Rejected { status: u16, excerpt: String },
    /// 5xx, timeouts, connection errors, unreadable bodies: retry with back-off.
    #[error("{reason}")]
    Transient { status: Option<u16>, reason: String },
    #[error(transparent)]
    Token(#[from] TokenError),
}

impl FetchError {
    /// The HTTP status Fenergo answered, where there was one.
    pub fn status(&self) -> Option<u16> {
        match self {
            FetchError::NotFound => Some(404),
            FetchError::RateLimited { .. } => Some(429),
            FetchError::Rejected { status, .. } => Some(*status),
            FetchError::Transient { status, .. } => *status,
            FetchError::Token(TokenError::Refused { status, .. }) => Some(*status),
            FetchError::Token(TokenError::Unavailable(_)) => None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot build the HTTPS client: {0}")]
    Build(#[from] reqwest::Error),
    #[error("cannot start the Fenergo client: {0} not set")]
    NotConfigured(String),
}

pub struct FenergoClient {
    http: reqwest::Client,
    metrics: Arc<Metrics>,
    api_base: String,
    tenant_id: String,
    tokens: TokenCache,
    limiter: Limiter,
}

impl FenergoClient {
    pub fn new(
        settings: &FenergoSettings,
        metrics: Arc<Metrics>,
    ) -> Result<FenergoClient, ClientError> {
        let missing = settings.missing();
        if !missing.is_empty() {
            return Err(ClientError::NotConfigured(missing.join(", ")));
        }
        let http = client_builder()
            .connect_timeout(settings.connect_timeout)
            .timeout(settings.request_timeout)
            .user_agent(concat!("fenx-sync/", env!("CARGO_PKG_VERSION")))
            .build()?;
        let secret = settings
            .client_secret
            .clone()
            .unwrap_or_else(|| SecretString::from(String::new()));
        let tokens = TokenCache::new(
            http.clone(),
            TokenRequest {
                token_url: settings.token_url.clone(),
                client_id: settings.client_id.clone(),
                client_secret: secret,
                scope: settings.scope.clone(),
                refresh_margin: settings.token_refresh_margin,
            },
            metrics.token_refreshes.clone(),
            metrics.credentials_refused.clone(),
        );
        Ok(FenergoClient {
            http,
            metrics,
            api_base: settings.api_base.trim_end_matches('/').to_owned(),
            tenant_id: settings.tenant_id.clone(),
            tokens,
            limiter: Limiter::new(
                settings.requests_per_second,
                settings.max_concurrent_requests,
            ),
        })
    }

    /// `api_base` + `/` + `relative_url`, whether or not the relative URL has a leading slash.
    pub fn url_for(&self, relative_url: &str) -> String {
        format!("{}/{}", self.api_base, relative_url.trim_start_matches('/'))
    }

    /// Fetches an entity. A 401 refreshes the token once and retries; everything else is
    /// returned classified for the caller's retry schedule.
    pub async fn get_entity(
        &self,
        relative_url: &str,
        correlation_id: &str,
    ) -> Result<Entity, FetchError> {
        let (status, body) = self
            .request(Method::GET, relative_url, None, correlation_id)
            .await?;
        Entity::from_body(&body).map_err(|e| FetchError::Transient {
            status: Some(status),
            reason: format!("HTTP {status} with an unusable body: {e}"),
        })
    }

    /// Reads up to 100 entities by id in one call (`getentitieslist`). `Ok(None)`: this
    /// Fenergo does not serve the bulk read (404/405), read them singly.
    pub async fn get_entities(
        &self,
        ids: &[String],
        correlation_id: &str,
    ) -> Result<Option<EntityList>, FetchError> {
        let body = serde_json::json!({"data": {"ids": ids}});
        match self
            .request(Method::POST, BULK_READ_PATH, Some(&body), correlation_id)
            .await
        {
            Ok((status, bytes)) => {
                EntityList::from_body(&bytes)
                    .map(Some)
                    .map_err(|e| FetchError::Transient {
                        status: Some(status),
                        reason: format!("HTTP {status} with an unusable entity list: {e}"),
                    })
            }
            Err(FetchError::NotFound | FetchError::Rejected { status: 405, .. }) => Ok(None),
            Err(error) => Err(error),
        }
    }

    /// Turns the ERROR line for refused credentials off (`false`, for a one-shot command that
    /// reports the refusal itself) or on (the default).
    pub fn log_refusals(&self, on: bool) {
        self.tokens.log_refusals(on);
    }

    /// Since when and why the identity service refuses our credentials, if it does.
    pub fn credentials_refusal(&self) -> Option<CredentialsRefusal> {
        self.tokens.refusal()
    }

    /// Whether calling Fenergo now makes sense: the credentials are not refused, or their
    /// back-off has passed. Callers that would only burn an attempt wait instead.
    pub fn credentials_usable(&self) -> bool {
        self.tokens.usable()
    }

    /// One page of the entity list (`getentitiespagedlist`, v2), after `search_after`.
    pub async fn list_entities(
        &self,
        search_after: Option<&str>,
        size: usize,
        correlation_id: &str,
    ) -> Result<Page, FetchError> {
        let body = serde_json::json!({
            "data": {
                "pager": {"size": size, "sortBy": "id", "sortOrder": "asc"},
                "searchAfter": search_after,
                "attributes": [],
            }
        });
        let (status, bytes) = self
            .request(
                Method::POST,
                "entitydataquery/api/v2/entity/getentitiespagedlist",
                Some(&body),
                correlation_id,
            )
            .await?;
        Page::from_body(&bytes).map_err(|e| FetchError::Transient {
            status: Some(status),
            reason: format!("HTTP {status} with an unusable entity list: {e}"),
        })
    }

    /// One API call with the bearer token, tenant and correlation headers, under the limiter.
    /// Returns the status and body of a 2xx; classifies everything else. A 401 refreshes the
    /// token once and retries.
    pub async fn request(
        &self,
        method: Method,
        relative_url: &str,
        json: Option<&serde_json::Value>,
        correlation_id: &str,
    ) -> Result<(u16, Bytes), FetchError> {
        let url = self.url_for(relative_url);
        let mut refreshed = false;
        loop {
            let bearer = self.tokens.bearer().await?;
            let (status, headers, body) = {
                let _permit = self.limiter.acquire().await;
                let started = Instant::now();
                let answer = self
                    .call(method.clone(), &url, &bearer, json, correlation_id)
                    .await;
                self.metrics
                    .fetch_seconds
                    .observe(started.elapsed().as_secs_f64());
                let status = answer
                    .as_ref()
                    .map_or("error".to_owned(), |(s, _, _)| s.to_string());
                self.metrics
                    .api_responses
                    .get_or_create(&StatusLabel { status })
                    .inc();
                answer.map_err(transient)?
            };
            match status {
                200..=299 => return Ok((status, body)),
                401 if !refreshed => {
                    tracing::info!("Fenergo answered 401; refreshing the access token once");
                    self.tokens.invalidate(&bearer);
                    refreshed = true;
                }
                404 => return Err(FetchError::NotFound),
                429 => {
                    self.metrics.rate_limited.inc();
                    let retry_after = retry_after(&headers, Utc::now());
                    self.limiter.pause(retry_after);
                    return Err(FetchError::RateLimited { retry_after });
                }
                500..=599 => {
                    return Err(FetchError::Transient {
                        status: Some(status),
                        reason: format!("HTTP {status}: {}", excerpt(&body)),
                    });
                }
                _ => {
                    return Err(FetchError::Rejected {
                        status,
                        excerpt: excerpt(&body),
                    });
                }
            }
        }
    }

    async fn call(
        &self,
        method: Method,
        url: &str,
        bearer: &str,
        json: Option<&serde_json::Value>,
        correlation_id: &str,
    ) -> Result<(u16, HeaderMap, Bytes), reqwest::Error> {
        let mut request = self
            .http
            .request(method, url)
            .bearer_auth(bearer)
            .header("X-TENANT-ID", &self.tenant_id)
            .header("x-correlation-id", correlation_id);
        if let Some(json) = json {
            request = request.json(json);
        }
        let response = request.send().await?;
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        Ok((status, headers, response.bytes().await?))
    }
}

/// A reqwest builder on rustls with the ring provider: every HTTP client in the process (ours,
/// the simulator's, the tests') is built from here, because reqwest is compiled without a
/// default crypto provider to keep aws-lc (a C build) out of the tree.
pub fn client_builder() -> reqwest::ClientBuilder {
    // A second install (another client in the same process) is refused harmlessly.
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
}

/// How long a 429 asks us to wait: `Retry-After` (seconds or an HTTP date), else
/// `X-Rate-Limit-Reset` (an ISO-8601 instant), else one second.
fn retry_after(headers: &HeaderMap, now: DateTime<Utc>) -> Duration {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
    };
    let until = |instant: DateTime<Utc>| (instant - now).to_std().unwrap_or(Duration::ZERO);
    if let Some(value) = header("retry-after") {
        if let Ok(seconds) = value.parse::<u64>() {
            return Duration::from_secs(seconds);
        }
        if let Ok(date) = DateTime::parse_from_rfc2822(value) {
            return until(date.with_timezone(&Utc));
        }
    }
    header("x-rate-limit-reset")
        .and_then(crate::time::parse)
        .map(until)
        .unwrap_or(DEFAULT_429_WAIT)
}

fn transient(error: reqwest::Error) -> FetchError {
    FetchError::Transient {
        status: None,
        reason: describe_reqwest(&error),
    }
}

/// A reqwest error with its cause chain, without the URL's query (which could carry data).
pub(crate) fn describe_reqwest(error: &reqwest::Error) -> String {
    let kind = if error.is_timeout() {
        "timed out"
    } else if error.is_connect() {
        "connection failed"
    } else {
        "request failed"
    };
    let mut text = kind.to_owned();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// The start of a response body, as text, for dead letters and logs.
pub(crate) fn excerpt(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let mut cut: String = text.chars().take(EXCERPT_LEN).collect();
    if text.chars().count() > EXCERPT_LEN {
        cut.push('…');
    }
    cut
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn retry_after_reads_every_header_fenergo_may_send() {
        let now: DateTime<Utc> = "2024-04-09T10:55:00Z".parse().unwrap();
        assert_eq!(
            retry_after(&headers(&[("retry-after", "7")]), now),
            Duration::from_secs(7)
        );
        assert_eq!(
            retry_after(
                &headers(&[("retry-after", "Tue, 09 Apr 2024 10:55:03 GMT")]),
                now
            ),
            Duration::from_secs(3)
        );
        let reset = headers(&[("x-rate-limit-reset", "2024-04-09T10:55:30.0705512Z")]);
        assert_eq!(retry_after(&reset, now).as_secs(), 30);
        let past = headers(&[("x-rate-limit-reset", "2024-04-09T10:54:00Z")]);
        assert_eq!(retry_after(&past, now), Duration::ZERO);
        assert_eq!(
            retry_after(&headers(&[("retry-after", "soon")]), now),
            DEFAULT_429_WAIT
        );
        assert_eq!(retry_after(&HeaderMap::new(), now), DEFAULT_429_WAIT);
    }

    #[test]
    fn relative_urls_join_with_or_without_a_leading_slash() {
        let mut settings = FenergoSettings {
            api_base: "https://api.example.test/".into(),
            tenant_id: "t".into(),
            client_id: "c".into(),
            client_secret: Some("s".into()),
            ..FenergoSettings::default()
        };
        let client = FenergoClient::new(&settings, Arc::default()).unwrap();
        for relative in [
            "entitydataquery/api/entity/1",
            "/entitydataquery/api/entity/1",
        ] {
            assert_eq!(
                client.url_for(relative),
                "https://api.example.test/entitydataquery/api/entity/1"
            );
        }
        settings.client_secret = None;
        let err = FenergoClient::new(&settings, Arc::default())
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("fenergo.client_secret"), "{err}");
    }

    #[test]
    fn excerpts_are_bounded() {
        assert_eq!(excerpt(b"short"), "short");
        let long = excerpt("é".repeat(1000).as_bytes());
        assert_eq!(long.chars().count(), EXCERPT_LEN + 1);
    }
}
