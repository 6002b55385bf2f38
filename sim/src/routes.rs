//! The simulator's HTTP surface, with Fenergo's status codes, bodies and rate-limit headers:
//! `POST /connect/token` (identity service); `GET /entitydataquery/api/entity/{id}` and
//! `POST /entitydataquery/api/entity/getentitieslist` (bulk read by id) and
//! `POST /entitydataquery/api/v2/entity/getentitiespagedlist` (entity data query API);
//! `GET /eventnotifications/v2/{feedId}/next` and
//! `POST /eventnotifications/v2/{feedId}/{batchId}/complete` (polling API). Every API route
//! goes through the same gateway checks, latency and fault knobs.
//!
//! It parses requests and renders `state`'s decisions; it decides nothing itself. It must never
//! panic on a request (a malformed one gets a 4xx), never read a body without a size and time
//! limit, and never hold the state's lock across an `.await`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use serde::Deserialize;
use serde_json::json;

use super::TokenRefusal;
use super::entities::{
    ZULU_SUFFIX, batch_body, cursor_position, entity_list_body, entity_page_body, error_envelope,
    fenergo_timestamp,
};
use super::faults::Throttle;
use super::feeds::Missing;
use super::state::{ApiHeaders, Refusal, State, TokenRefused, TokenRequest};
use crate::server::{self, Handler};

/// Token requests are a few short form fields.
const MAX_FORM_BYTES: usize = 16 * 1024;
/// A list query is a pager, a cursor and a list of attribute names.
pub(super) const MAX_QUERY_BYTES: usize = 64 * 1024;
const BODY_TIMEOUT: Duration = Duration::from_secs(5);
const NOT_FOUND_ENTITY: &str = "Not Found. Entity with given id does not exist";
const NOT_FOUND_FEED: &str = "Not Found. Feed with given id does not exist";
const NOT_FOUND_BATCH: &str = "Not Found. Batch with given id is not in flight on this feed";
/// The most ids one bulk read takes.
const MAX_BULK_IDS: usize = 100;
/// List page sizes; Fenergo documents neither a default nor a maximum (contract §6).
const DEFAULT_PAGE_SIZE: usize = 100;
const MAX_PAGE_SIZE: usize = 1000;

/// Why a request body could not be read.
#[derive(Debug, thiserror::Error)]
enum BodyError {
    #[error("body is larger than {0} bytes")]
    TooLarge(usize),
    #[error("body was not received within {BODY_TIMEOUT:?}")]
    Timeout,
    #[error("body could not be read")]
    Read,
}

/// Why a token request body could not be used; every case is a 400 `invalid_request`.
#[derive(Debug, thiserror::Error)]
enum FormError {
    #[error("content type must be application/x-www-form-urlencoded")]
    NotForm,
    #[error(transparent)]
    Body(#[from] BodyError),
    #[error("body is not valid form encoding")]
    Encoding,
}

/// What an API request asks for, from its method and path.
enum Operation {
    Entity(String),
    /// The bulk read by id.
    EntityList,
    EntityPage,
    NextBatch {
        feed: String,
    },
    CompleteBatch {
        feed: String,
        batch: String,
    },
}

/// Why a request names nothing the API serves.
enum NotServed {
    /// 404.
    Path,
    /// 405, with the method the path takes.
    Method(&'static str),
}

impl Operation {
    fn parse(method: &Method, segments: &[&str]) -> Result<Operation, NotServed> {
        let (operation, allowed) = match segments {
            ["entitydataquery", "api", "entity", "getentitieslist"] => {
                (Operation::EntityList, "POST")
            }
            ["entitydataquery", "api", "entity", id] => (Operation::Entity(decoded(id)), "GET"),
            [
                "entitydataquery",
                "api",
                "v2",
                "entity",
                "getentitiespagedlist",
            ] => (Operation::EntityPage, "POST"),
            ["eventnotifications", "v2", feed, "next"] => (
                Operation::NextBatch {
                    feed: decoded(feed),
                },
                "GET",
            ),
            ["eventnotifications", "v2", feed, batch, "complete"] => (
                Operation::CompleteBatch {
                    feed: decoded(feed),
                    batch: decoded(batch),
                },
                "POST",
            ),
            _ => return Err(NotServed::Path),
        };
        if method.as_str() != allowed {
            return Err(NotServed::Method(allowed));
        }
        Ok(operation)
    }
}

/// What `getentitiespagedlist` was asked (contract §6). `pager.from` and `attributes` are
/// accepted and ignored: the cursor replaces offsets, and items are always whole EntityDtos.
#[derive(Deserialize)]
struct PageRequest {
    data: PageRequestData,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct PageRequestData {
    #[serde(default)]
    pager: Option<Pager>,
    #[serde(default)]
    search_after: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct Pager {
    size: Option<i64>,
    sort_by: Option<String>,
    sort_order: Option<String>,
}

/// What `getentitieslist` was asked: `{"data": {"ids": [...]}}`.
#[derive(Deserialize)]
struct BulkRequest {
    data: BulkRequestData,
}

#[derive(Deserialize)]
struct BulkRequestData {
    ids: Vec<String>,
}

/// A list query the simulator can answer.
struct PageQuery {
    size: usize,
    after: Option<String>,
}

pub(super) struct SimRoutes {
    state: Arc<State>,
}

impl SimRoutes {
    pub fn new(state: Arc<State>) -> SimRoutes {
        SimRoutes { state }
    }

    async fn token(&self, request: Request<Incoming>) -> Response<Full<Bytes>> {
        let form = match read_form(request).await {
            Ok(form) => form,
            Err(error) => {
                self.state.count_unreadable_token_request();
                return oauth_error(StatusCode::BAD_REQUEST, "invalid_request", Some(&error));
            }
        };
        let field = |name: &str| form.get(name).map(String::as_str);
        let outcome = self.state.issue_token(&TokenRequest {
            grant_type: field("grant_type"),
            client_id: field("client_id"),
            client_secret: field("client_secret"),
            scope: field("scope"),
        });
        sleep(self.state.latency()).await;
        match outcome {
            Ok(issued) => server::json(
                StatusCode::OK,
                json!({
                    "access_token": issued.access_token,
                    "expires_in": issued.expires_in,
                    "token_type": "Bearer",
                    "scope": issued.scope,
                }),
            ),
            Err(TokenRefused::Knob(TokenRefusal::Unavailable)) => oauth_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "temporarily_unavailable",
                None,
            ),
            Err(TokenRefused::Knob(TokenRefusal::Unauthorized) | TokenRefused::InvalidClient) => {
                oauth_error(StatusCode::UNAUTHORIZED, "invalid_client", None)
            }
            Err(TokenRefused::UnsupportedGrantType) => {
                oauth_error(StatusCode::BAD_REQUEST, "unsupported_grant_type", None)
            }
            Err(TokenRefused::InvalidRequest) => {
                oauth_error(StatusCode::BAD_REQUEST, "invalid_request", None)
            }
        }
    }

    async fn api(&self, request: Request<Incoming>, segments: &[&str]) -> Response<Full<Bytes>> {
        let headers = request.headers();
        let api_headers = ApiHeaders {
            bearer: bearer(headers),
            tenant: text_header(headers, "x-tenant-id"),
            correlation_id: text_header(headers, "x-correlation-id"),
        };
        let call = self.state.begin_call(&api_headers);
        let operation = match Operation::parse(request.method(), segments) {
            Ok(Operation::EntityList) if self.state.bulk_read_unsupported() => {
                return envelope(StatusCode::NOT_FOUND, "Not Found", "Error");
            }
            Ok(operation) => operation,
            Err(NotServed::Path) => return envelope(StatusCode::NOT_FOUND, "Not Found", "Error"),
            Err(NotServed::Method(allow)) => return method_not_allowed(allow),
        };
        let response = match self.state.gateway(&call, &api_headers) {
            Err(refusal) => refusal_response(refusal),
            Ok(()) => {
                sleep(self.state.latency()).await;
                match self.state.injected_server_error() {
                    Some(status) => envelope(
                        status,
                        status.canonical_reason().unwrap_or("Server Error"),
                        "Error",
                    ),
                    None => self.serve(&operation, request).await,
                }
            }
        };
        if let Operation::Entity(id) = &operation {
            self.state.record_entity_response(id, response.status());
        }
        response
    }

    /// The answer of the service behind the gateway.
    async fn serve(
        &self,
        operation: &Operation,
        request: Request<Incoming>,
    ) -> Response<Full<Bytes>> {
        match operation {
            Operation::Entity(id) => match self.state.read_entity(id) {
                Some(body) => json_bytes(StatusCode::OK, body),
                None => envelope(StatusCode::NOT_FOUND, NOT_FOUND_ENTITY, "Error"),
            },
            Operation::EntityList => {
                let ids = match read_body(request, MAX_QUERY_BYTES).await {
                    Ok(body) => parse_bulk_query(&body),
                    Err(error) => Err(error.to_string()),
                };
                match ids {
                    Ok(ids) => json_bytes(
                        StatusCode::OK,
                        entity_list_body(&self.state.read_entities(&ids)),
                    ),
                    Err(reason) => envelope(StatusCode::BAD_REQUEST, &reason, "Error"),
                }
            }
            Operation::EntityPage => {
                let query = match read_body(request, MAX_QUERY_BYTES).await {
                    Ok(body) => parse_page_query(&body),
                    Err(error) => Err(error.to_string()),
                };
                match query {
                    Ok(query) => {
                        let page = self.state.list_entities(query.after.as_deref(), query.size);
                        let body = entity_page_body(
                            &page.items,
                            page.total_items,
                            page.next_after.as_deref(),
                        );
                        json_bytes(StatusCode::OK, body)
                    }
                    Err(reason) => envelope(StatusCode::BAD_REQUEST, &reason, "Error"),
                }
            }
            Operation::NextBatch { feed } => match self.state.next_batch(feed) {
                Ok(Some(batch)) => json_bytes(
                    StatusCode::OK,
                    batch_body(&batch.batch_id, &batch.notifications, batch.more_available),
                ),
                Ok(None) => empty(StatusCode::NO_CONTENT),
                Err(missing) => not_found(missing),
            },
            Operation::CompleteBatch { feed, batch } => {
                match self.state.complete_batch(feed, batch) {
                    Ok(()) => empty(StatusCode::OK),
                    Err(missing) => not_found(missing),
                }
            }
        }
    }
}

impl Handler for SimRoutes {
    async fn handle(self: Arc<Self>, request: Request<Incoming>) -> Response<Full<Bytes>> {
        // Splitting on '/' and dropping empty segments tolerates the `//` a careless join of
        // base URL and relativeUrl produces, and a trailing slash.
        let path = request.uri().path().to_owned();
        let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
        match segments.as_slice() {
            ["connect", "token"] if request.method() == Method::POST => self.token(request).await,
            ["connect", "token"] => method_not_allowed("POST"),
            _ => self.api(request, &segments).await,
        }
    }
}

async fn sleep(latency: Duration) {
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
}

async fn read_form(request: Request<Incoming>) -> Result<HashMap<String, String>, FormError> {
    let is_form = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| {
            v.trim()
                .eq_ignore_ascii_case("application/x-www-form-urlencoded")
        });
    if !is_form {
        return Err(FormError::NotForm);
    }
    parse_form(&read_body(request, MAX_FORM_BYTES).await?)
}

async fn read_body(request: Request<Incoming>, max_bytes: usize) -> Result<Bytes, BodyError> {
    let limited = Limited::new(request.into_body(), max_bytes);
    match tokio::time::timeout(BODY_TIMEOUT, limited.collect()).await {
        Err(_) => Err(BodyError::Timeout),
        Ok(Err(error)) if error.is::<LengthLimitError>() => Err(BodyError::TooLarge(max_bytes)),
        Ok(Err(_)) => Err(BodyError::Read),
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
    }
}

/// A `getentitiespagedlist` body → the page to serve, or why it is a 400. The size is clamped
/// rather than refused, as search APIs commonly do; an order the simulator cannot give is
/// refused rather than silently ignored.
fn parse_page_query(body: &[u8]) -> Result<PageQuery, String> {
    let request: PageRequest =
        serde_json::from_slice(body).map_err(|e| format!("body is not a paged-list query: {e}"))?;
    let pager = request.data.pager.unwrap_or_default();
    let supported =
        |given: Option<&str>, only: &str| given.is_none_or(|g| g.eq_ignore_ascii_case(only));
    if !supported(pager.sort_by.as_deref(), "id") {
        return Err("pager.sortBy: only \"id\" is supported".to_owned());
    }
    if !supported(pager.sort_order.as_deref(), "asc") {
        return Err("pager.sortOrder: only \"asc\" is supported".to_owned());
    }
    // Only a size beyond usize (on a 32-bit target) fails the conversion; it is over the cap.
    let size = pager.size.map_or(DEFAULT_PAGE_SIZE, |size| {
        usize::try_from(size.max(1)).map_or(MAX_PAGE_SIZE, |size| size.min(MAX_PAGE_SIZE))
    });
    let after = match request.data.search_after {
        Some(cursor) => Some(
            cursor_position(&cursor)
                .ok_or_else(|| "searchAfter is not a cursor this API issued".to_owned())?,
        ),
        None => None,
    };
    Ok(PageQuery { size, after })
}

/// A `getentitieslist` body → the ids to read, or why it is a 400.
fn parse_bulk_query(body: &[u8]) -> Result<Vec<String>, String> {
    let request: BulkRequest =
        serde_json::from_slice(body).map_err(|e| format!("body is not a bulk read: {e}"))?;
    let ids = request.data.ids;
    if ids.len() > MAX_BULK_IDS {
        return Err(format!("data.ids: at most {MAX_BULK_IDS} ids per request"));
    }
    Ok(ids)
}

/// `application/x-www-form-urlencoded` → fields (a repeated field keeps its last value).
fn parse_form(body: &[u8]) -> Result<HashMap<String, String>, FormError> {
    let text = std::str::from_utf8(body).map_err(|_| FormError::Encoding)?;
    text.split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            match (percent_decode(name, true), percent_decode(value, true)) {
                (Some(name), Some(value)) => Ok((name, value)),
                _ => Err(FormError::Encoding),
            }
        })
        .collect()
}

/// Decodes `%XX` escapes (and `+` as space in form fields); `None` for a broken escape or
/// bytes that are not UTF-8.
fn percent_decode(text: &str, plus_is_space: bool) -> Option<String> {
    let bytes = text.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let mut byte = [0u8; 1];
                hex::decode_to_slice(bytes.get(i + 1..i + 3)?, &mut byte).ok()?;
                decoded.push(byte[0]);
                i += 3;
            }
            b'+' if plus_is_space => {
                decoded.push(b' ');
                i += 1;
            }
            other => {
                decoded.push(other);
                i += 1;
            }
        }
    }
    String::from_utf8(decoded).ok()
}

/// A path segment, percent-decoded. A segment with broken percent-encoding cannot name
/// anything stored; it is looked up as sent and answered 404.
fn decoded(segment: &str) -> String {
    percent_decode(segment, false).unwrap_or_else(|| segment.to_owned())
}

fn text_header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
}

/// The token of `Authorization: Bearer <token>` (scheme case-insensitive).
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let (scheme, token) = text_header(headers, "authorization")?.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

fn refusal_response(refusal: Refusal) -> Response<Full<Bytes>> {
    match refusal {
        Refusal::Unauthorized => {
            let mut response = envelope(StatusCode::UNAUTHORIZED, "Unauthorized", "Error");
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer error=\"invalid_token\""),
            );
            response
        }
        Refusal::MissingTenant => server::json(
            StatusCode::BAD_REQUEST,
            json!({ "ErrorCode": "MissingTenantHeader" }),
        ),
        Refusal::WrongTenant => envelope(
            StatusCode::FORBIDDEN,
            "Access to resource is forbidden",
            "Forbidden",
        ),
        Refusal::Throttled(throttle) => too_many_requests(&throttle),
    }
}

fn too_many_requests(throttle: &Throttle) -> Response<Full<Bytes>> {
    let mut response = envelope(StatusCode::TOO_MANY_REQUESTS, "Too Many Requests", "Error");
    let headers = response.headers_mut();
    headers.insert("x-rate-limit-remaining", HeaderValue::from_static("0"));
    let reset = fenergo_timestamp(throttle.reset, ZULU_SUFFIX);
    if let Ok(value) = HeaderValue::from_str(&reset) {
        headers.insert("x-rate-limit-reset", value);
    }
    if let Some(wait) = throttle.retry_after {
        let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
        headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
    }
    response
}

fn envelope(status: StatusCode, message: &str, kind: &str) -> Response<Full<Bytes>> {
    server::json(status, error_envelope(message, kind))
}

fn oauth_error(
    status: StatusCode,
    error: &str,
    description: Option<&FormError>,
) -> Response<Full<Bytes>> {
    let body = match description {
        Some(description) => {
            json!({ "error": error, "error_description": description.to_string() })
        }
        None => json!({ "error": error }),
    };
    server::json(status, body)
}

fn not_found(missing: Missing) -> Response<Full<Bytes>> {
    let message = match missing {
        Missing::Feed => NOT_FOUND_FEED,
        Missing::Batch => NOT_FOUND_BATCH,
    };
    envelope(StatusCode::NOT_FOUND, message, "Error")
}

/// A response without a body (204 for an empty feed, 200 for a completed batch).
fn empty(status: StatusCode) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = status;
    response
}

fn method_not_allowed(allow: &'static str) -> Response<Full<Bytes>> {
    let mut response = envelope(
        StatusCode::METHOD_NOT_ALLOWED,
        "Method Not Allowed",
        "Error",
    );
    response
        .headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static(allow));
    response
}

/// A pre-serialised JSON body (entities are serialised once per version, not per read).
fn json_bytes(status: StatusCode, body: Bytes) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

#[cfg(test)]
mod tests {
    use chrono::DateTime;
    use serde_json::{Value, json};

    use super::*;
    use crate::testkit::{Api, form};
    use crate::{Faults, SimConfig, Simulator};

    fn with(
        fields: &[(&'static str, String)],
        name: &'static str,
        value: &str,
    ) -> Vec<(&'static str, String)> {
        let mut fields: Vec<_> = fields.iter().filter(|(n, _)| *n != name).cloned().collect();
        fields.push((name, value.to_owned()));
        fields
    }

    #[tokio::test]
    async fn the_token_endpoint_answers_like_an_oauth_server() {
        let sim = Simulator::start(SimConfig::default()).await;
        let api = Api::new(&sim).await;
        let good = form(&sim);
        let response = api.token_request(&sim, &good).await;
        assert_eq!(response.status(), 200);
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["expires_in"], 900);
        assert_eq!(body["token_type"], "Bearer");
        assert_eq!(body["scope"], "fenx.entitydata.read");
        let token = body["access_token"].as_str().unwrap();
        assert!(
            token.len() >= 32 && token != api.token,
            "fresh opaque token"
        );

        for (fields, status, error) in [
            (with(&good, "client_secret", "wrong"), 401, "invalid_client"),
            (with(&good, "client_id", "stranger"), 401, "invalid_client"),
            (
                with(&good, "grant_type", "password"),
                400,
                "unsupported_grant_type",
            ),
            (good[1..].to_vec(), 400, "invalid_request"),
        ] {
            let response = api.token_request(&sim, &fields).await;
            assert_eq!(response.status(), status, "{fields:?}");
            let body: Value = response.json().await.unwrap();
            assert_eq!(body["error"], error);
        }
        let stats = sim.stats();
        assert_eq!(
            (
                stats.token_requests,
                stats.tokens_issued,
                stats.tokens_refused
            ),
            (6, 2, 4)
        );
        assert_eq!(stats.api_calls, 0, "token requests are not API calls");
    }

    #[tokio::test]
    async fn the_token_refusal_knob_answers_503_or_401_until_cleared() {
        let sim = Simulator::start(SimConfig::default()).await;
        let api = Api::new(&sim).await;
        for (refusal, status, error) in [
            (TokenRefusal::Unavailable, 503, "temporarily_unavailable"),
            (TokenRefusal::Unauthorized, 401, "invalid_client"),
        ] {
            sim.set_faults(Faults {
                refuse_tokens: Some(refusal),
                ..Faults::default()
            });
            let response = api.token_request(&sim, &form(&sim)).await;
            assert_eq!(response.status(), status);
            let body: Value = response.json().await.unwrap();
            assert_eq!(body["error"], error);
        }
        sim.set_faults(Faults::default());
        assert_eq!(api.token_request(&sim, &form(&sim)).await.status(), 200);
        assert_eq!(sim.stats().tokens_refused, 2);
    }

    #[tokio::test]
    async fn malformed_token_requests_get_400_and_never_panic() {
        let sim = Simulator::start(SimConfig::default()).await;
        let http = crate::client_builder().build().unwrap();
        let form_type = "application/x-www-form-urlencoded";
        for (content_type, body) in [
            (
                "application/json",
                br#"{"grant_type":"client_credentials"}"#.to_vec(),
            ),
            (
                form_type,
                b"grant_type=client_credentials&client_id=%ZZ".to_vec(),
            ),
            (
                form_type,
                b"grant_type=client_credentials&client_id=%4".to_vec(),
            ),
            (form_type, vec![0xff, 0xfe, b'=', b'x']),
            (form_type, b"client_id=%ff".to_vec()),
            (form_type, vec![b'a'; MAX_FORM_BYTES + 1]),
        ] {
            let response = http
                .post(sim.token_url())
                .header("content-type", content_type)
                .body(body)
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 400);
            let body: Value = response.json().await.unwrap();
            assert_eq!(body["error"], "invalid_request");
        }
        let response = http.get(sim.token_url()).send().await.unwrap();
        assert_eq!(response.status(), 405);
        assert_eq!(response.headers()["allow"], "POST");
        assert_eq!(sim.stats().tokens_refused, 6);
    }

    #[tokio::test]
    async fn entity_reads_need_a_live_token_the_simulator_issued() {
        // Expiry by the TTL is tested on the state with paused time (`state::tests`).
        let sim = Simulator::start(SimConfig::default()).await;
        let (id, _) = sim.sample_entity(0);
        let api = Api::new(&sim).await;
        let url = format!("{}/entitydataquery/api/entity/{id}", sim.api_base());
        assert_eq!(api.entity(&id).await.status(), 200);
        let lower_case_scheme = format!("bearer  {} ", api.token);
        for (authorization, status) in [
            (Some(lower_case_scheme.as_str()), 200),
            (None, 401),
            (Some("Bearer not-a-token"), 401),
            (Some("Basic abc"), 401),
            (Some("Bearer"), 401),
        ] {
            let mut request = api.http.get(&url).header("X-TENANT-ID", &api.tenant);
            if let Some(value) = authorization {
                request = request.header("authorization", value);
            }
            let response = request.send().await.unwrap();
            assert_eq!(response.status(), status, "{authorization:?}");
            if status == 200 {
                continue;
            }
            assert!(response.headers().contains_key("www-authenticate"));
            let body: Value = response.json().await.unwrap();
            assert_eq!(body["data"], Value::Null);
            assert_eq!(body["messages"][0]["type"], "Error");
        }
        let fresh = Api::new(&sim).await;
        assert_eq!(fresh.entity(&id).await.status(), 200);
        sim.expire_tokens();
        assert_eq!(fresh.entity(&id).await.status(), 401, "expired by the knob");
        assert_eq!(Api::new(&sim).await.entity(&id).await.status(), 200);
        assert_eq!(sim.stats().responses_with(401), 5);
    }

    #[tokio::test]
    async fn the_tenant_header_is_required_and_must_match() {
        let sim = Simulator::start(SimConfig::default()).await;
        let (id, _) = sim.sample_entity(0);
        let api = Api::new(&sim).await;
        let url = format!("{}/entitydataquery/api/entity/{id}", sim.api_base());
        let missing = api.get_with(&url, None, None).send().await.unwrap();
        assert_eq!(missing.status(), 400);
        let body: Value = missing.json().await.unwrap();
        assert_eq!(body, json!({ "ErrorCode": "MissingTenantHeader" }));

        let other = api
            .get_with(&url, Some("another-tenant"), None)
            .send()
            .await
            .unwrap();
        assert_eq!(other.status(), 403);
        let body: Value = other.json().await.unwrap();
        assert_eq!(body["messages"][0]["type"], "Forbidden");

        let upper_case = api.get_with(&url, Some(&api.tenant.to_uppercase()), None);
        assert_eq!(
            upper_case.send().await.unwrap().status(),
            200,
            "GUIDs compare case-insensitively"
        );
        let stats = sim.stats();
        assert_eq!(
            (stats.requests_missing_tenant, stats.requests_wrong_tenant),
            (1, 1)
        );
    }

    #[tokio::test]
    async fn entities_come_in_fenergos_envelope_with_every_property_shape() {
        let sim = Simulator::start(SimConfig::default()).await;
        let api = Api::new(&sim).await;
        for (index, entity_type) in [(0, "Company"), (1, "Individual")] {
            let (id, version) = sim.sample_entity(index);
            let (status, body) = api.entity_json(&id).await;
            assert_eq!(status, 200);
            assert_eq!(body["messages"], json!([]));
            let data = &body["data"];
            assert_eq!(
                (data["id"].as_str(), data["type"].as_str()),
                (Some(id.as_str()), Some(entity_type))
            );
            assert_eq!(data["version"], version);
            assert_eq!(data["status"], 1);
            assert!(DateTime::parse_from_rfc3339(data["created"].as_str().unwrap()).is_ok());
            assert!(data["risk"]["riskLevel"].is_u64() && data["risk"]["riskCategory"].is_string());
            assert!(data["role"]["name"].is_string());
            assert!(data["alternateId"].is_string());
            assert!(data["journeys"][0]["journeyId"].is_string());
            assert!(data["accessLayers"]["geographic"].is_array());
            assert!(data["inScopeJurisdictions"][0]["versionId"].is_string());
            let properties = data["properties"].as_object().unwrap();
            let single = properties.values().find(|p| p["type"] == "Single").unwrap();
            assert!(single["value"].is_string());
            let collection = properties
                .values()
                .find(|p| p["type"] == "Collection")
                .unwrap();
            assert!(
                collection["dataGroupId"].is_string()
                    && collection["dataGroupVersionNumber"].is_u64()
            );
            assert_eq!(collection["collections"].as_object().unwrap().len(), 2);
            let custom = properties.values().find(|p| p["type"] == "Custom").unwrap();
            assert!(custom["customTypeId"].is_string() && custom["value"].is_string());
            assert!(
                custom["properties"]
                    .as_object()
                    .unwrap()
                    .values()
                    .all(|p| p["type"].is_string())
            );
            assert!(
                properties
                    .values()
                    .any(|p| p.get("discriminator").is_some())
            );
            assert!(
                properties
                    .values()
                    .any(|p| p.get("discriminator").is_none())
            );
        }
        let (status, body) = api.entity_json("no-such-entity").await;
        assert_eq!(status, 404);
        assert_eq!(body["data"], Value::Null);
        assert_eq!(body["messages"][0]["message"], NOT_FOUND_ENTITY);
    }

    #[tokio::test]
    async fn sloppy_paths_are_tolerated_and_unknown_ones_are_404() {
        let sim = Simulator::start(SimConfig::default()).await;
        let (id, _) = sim.sample_entity(0);
        let api = Api::new(&sim).await;
        let base = sim.api_base();
        for url in [
            format!("{base}//entitydataquery/api/entity/{id}"),
            format!("{base}/entitydataquery//api/entity/{id}/"),
            format!(
                "{base}/entitydataquery/api/entity/{}",
                id.replace('-', "%2D")
            ),
        ] {
            assert_eq!(api.get(&url).send().await.unwrap().status(), 200, "{url}");
        }
        let posted = api
            .http
            .post(format!("{base}/entitydataquery/api/entity/{id}"))
            .send()
            .await
            .unwrap();
        assert_eq!(posted.status(), 405);
        for path in [
            "/",
            "/entitydataquery/api/entity",
            "/entitydataquery/api/v2/entity/x",
            "/%ff",
        ] {
            let response = api.get(&format!("{base}{path}")).send().await.unwrap();
            assert_eq!(response.status(), 404, "{path}");
        }
        let broken_escape = api
            .get(&format!("{base}/entitydataquery/api/entity/%E2%28"))
            .send()
            .await
            .unwrap();
        assert_eq!(broken_escape.status(), 404);
        assert_eq!(sim.stats().fetches(&id), 3);
    }

    #[test]
    fn form_decoding_follows_the_urlencoded_rules() {
        let form = parse_form(b"a=1&b=x+y&c=%26%3D%2B&d&&e=caf%C3%A9").unwrap();
        let get = |k: &str| form.get(k).map(String::as_str);
        assert_eq!(
            [get("a"), get("b"), get("c"), get("d"), get("e")],
            [Some("1"), Some("x y"), Some("&=+"), Some(""), Some("café")]
        );
        assert_eq!(percent_decode("a+b", false).as_deref(), Some("a+b"));
        for broken in ["%", "%4", "%G0", "%+1", "%C3"] {
            assert_eq!(percent_decode(broken, true), None, "{broken}");
        }
    }
}
