//! The simulator's shared state and every decision made from it: which tokens are live, which
//! version of an entity a read or a list page sees (eventual-consistency lag), which request is
//! throttled or failed on purpose, what the polling feeds hand out, and the statistics tests
//! assert on.
//!
//! It knows nothing of HTTP beyond status codes: `routes` turns its answers into responses. It
//! must never hold its lock across an `.await` or while doing I/O, and never panic on anything
//! a request carries.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ops::Bound;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use http::StatusCode;
use serde_json::Value;
use tokio::time::Instant;

use super::entities::{self, Notification, Snapshot};
use super::faults::{FaultState, Throttle, next_second};
use super::feeds::{Feeds, Missing, Served};
use super::lag::{Pending, Record};
use super::stats::{CORRELATION_IDS_KEPT, SimStats};
use super::{Faults, Lag, PollingKnobs, SimConfig, TokenRefusal};

/// Injected server errors cycle through these, so a client sees every 5xx Fenergo's gateway
/// and services produce.
const SERVER_ERRORS: [StatusCode; 3] = [
    StatusCode::INTERNAL_SERVER_ERROR,
    StatusCode::BAD_GATEWAY,
    StatusCode::SERVICE_UNAVAILABLE,
];

/// The scope a token carries when the request names none.
const DEFAULT_SCOPE: &str = "fenx.all";

/// The headers of an API request that the simulator judges.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct ApiHeaders<'a> {
    pub bearer: Option<&'a str>,
    pub tenant: Option<&'a str>,
    pub correlation_id: Option<&'a str>,
}

/// An API request in flight; dropping it ends it.
pub(super) struct Call<'a> {
    state: &'a State,
    /// How many requests were in flight when this one arrived, itself included.
    position: u32,
}

impl Drop for Call<'_> {
    fn drop(&mut self) {
        let mut inner = self.state.lock();
        inner.in_flight = inner.in_flight.saturating_sub(1);
    }
}

/// Why the gateway refused an API request before it reached the entity service.
#[derive(Debug)]
pub(super) enum Refusal {
    Unauthorized,
    MissingTenant,
    WrongTenant,
    Throttled(Throttle),
}

/// One page of the entity list, as the lag lets it be seen.
pub(super) struct EntityPage {
    /// EntityDtos, in id order.
    pub items: Vec<Bytes>,
    /// Entities a read would see now.
    pub total_items: usize,
    /// The id the next page starts after; `None` when nothing visible follows.
    pub next_after: Option<String>,
}

/// The fields of a token request.
#[derive(Debug)]
pub(super) struct TokenRequest<'a> {
    pub grant_type: Option<&'a str>,
    pub client_id: Option<&'a str>,
    pub client_secret: Option<&'a str>,
    pub scope: Option<&'a str>,
}

/// Why a token request was refused.
#[derive(Debug)]
pub(super) enum TokenRefused {
    Knob(TokenRefusal),
    InvalidRequest,
    InvalidClient,
    UnsupportedGrantType,
}

/// A token just issued.
pub(super) struct Issued {
    pub access_token: String,
    pub expires_in: u64,
    pub scope: String,
}

pub(super) struct State {
    pub config: SimConfig,
    inner: Mutex<Inner>,
}

struct Inner {
    rng: fastrand::Rng,
    /// Live tokens and when each expires.
    tokens: HashMap<String, Instant>,
    /// Ordered by id, which is the entity list's order.
    entities: BTreeMap<String, Record>,
    /// Entities created under a lag, which the list may still hide: counting only these keeps
    /// `totalItems` cheap on a list of a million.
    maybe_hidden: HashSet<String>,
    lag: Lag,
    lag_overrides: HashMap<String, Lag>,
    faults: FaultState,
    /// The current 1-second window of the real rate limit: (UNIX second, requests in it).
    window: (i64, u32),
    in_flight: u32,
    feeds: Feeds,
    stats: SimStats,
}

impl State {
    pub fn new(config: SimConfig) -> State {
        let inner = Inner {
            rng: fastrand::Rng::with_seed(config.seed),
            tokens: HashMap::new(),
            entities: BTreeMap::new(),
            maybe_hidden: HashSet::new(),
            lag: Lag::None,
            lag_overrides: HashMap::new(),
            faults: FaultState::new(Faults::default()),
            window: (0, 0),
            in_flight: 0,
            feeds: Feeds::new(
                PollingKnobs::default(),
                u64::try_from(Utc::now().timestamp_millis()).unwrap_or(1),
            ),
            stats: SimStats::default(),
        };
        State {
            config,
            inner: Mutex::new(inner),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // The lock is never held across code that can panic halfway through an update, so a
        // poisoned lock still guards consistent data.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn issue_token(&self, request: &TokenRequest<'_>) -> Result<Issued, TokenRefused> {
        let mut inner = self.lock();
        inner.stats.token_requests += 1;
        let knob = inner.faults.faults.refuse_tokens;
        if let Err(refused) = judge_token_request(&self.config, knob, request) {
            inner.stats.tokens_refused += 1;
            return Err(refused);
        }
        let mut secret = [0u8; 32];
        inner.rng.fill(&mut secret);
        let access_token = hex::encode(secret);
        let now = Instant::now();
        inner.tokens.retain(|_, expires| *expires > now);
        inner
            .tokens
            .insert(access_token.clone(), now + self.config.token_ttl);
        inner.stats.tokens_issued += 1;
        let scope = request
            .scope
            .filter(|s| !s.trim().is_empty())
            .unwrap_or(DEFAULT_SCOPE);
        Ok(Issued {
            access_token,
            expires_in: self.config.token_ttl.as_secs(),
            scope: scope.to_owned(),
        })
    }

    /// Counts a token request whose body could not even be read.
    pub fn count_unreadable_token_request(&self) {
        let mut inner = self.lock();
        inner.stats.token_requests += 1;
        inner.stats.tokens_refused += 1;
    }

    pub fn expire_tokens(&self) {
        self.lock().tokens.clear();
    }

    /// Starts an API call: counts it and what its headers lack, and tracks it as in flight
    /// until the returned guard drops.
    pub fn begin_call(&self, headers: &ApiHeaders<'_>) -> Call<'_> {
        let mut inner = self.lock();
        inner.in_flight += 1;
        let position = inner.in_flight;
        let stats = &mut inner.stats;
        stats.api_calls += 1;
        stats.max_in_flight = stats.max_in_flight.max(position);
        match headers.correlation_id {
            Some(id) => {
                if stats.correlation_ids.len() == CORRELATION_IDS_KEPT {
                    stats.correlation_ids.pop_front();
                }
                stats.correlation_ids.push_back(id.to_owned());
            }
            None => stats.requests_missing_correlation_id += 1,
        }
        if headers.tenant.is_none() {
            stats.requests_missing_tenant += 1;
        }
        Call {
            state: self,
            position,
        }
    }

    /// The API gateway's checks, in its order: token, tenant, then rate limits (which apply to
    /// authenticated traffic only).
    pub fn gateway(&self, call: &Call<'_>, headers: &ApiHeaders<'_>) -> Result<(), Refusal> {
        let mut inner = self.lock();
        let live = headers
            .bearer
            .and_then(|token| inner.tokens.get(token))
            .is_some_and(|expires| Instant::now() < *expires);
        if !live {
            return Err(Refusal::Unauthorized);
        }
        match headers.tenant {
            None => return Err(Refusal::MissingTenant),
            Some(tenant) if !tenant.trim().eq_ignore_ascii_case(&self.config.tenant_id) => {
                inner.stats.requests_wrong_tenant += 1;
                return Err(Refusal::WrongTenant);
            }
            Some(_) => {}
        }
        let throttle = inner.throttle(&self.config, call.position, Utc::now());
        match throttle {
            Some(throttle) => {
                inner.stats.rate_limited += 1;
                Err(Refusal::Throttled(throttle))
            }
            None => Ok(()),
        }
    }

    /// The added latency of every request the simulator serves past its gateway.
    pub fn latency(&self) -> Duration {
        self.config.latency + self.lock().faults.faults.latency
    }

    /// The 5xx the fault knobs give this request past the gateway, if any.
    pub fn injected_server_error(&self) -> Option<StatusCode> {
        let mut inner = self.lock();
        if !inner.faults.server_error() {
            return None;
        }
        let status = SERVER_ERRORS[(inner.stats.server_errors % 3) as usize];
        inner.stats.server_errors += 1;
        Some(status)
    }

    /// The body of the version the lag lets this read of `id` see; `None`: not found.
    pub fn read_entity(&self, id: &str) -> Option<Bytes> {
        let mut inner = self.lock();
        let entity = inner.entities.get_mut(id)?.read(Instant::now())?;
        Some(entity.envelope)
    }

    /// Whether the bulk read by id answers 404 ([`super::Faults::no_bulk_read`]).
    pub fn bulk_read_unsupported(&self) -> bool {
        self.lock().faults.faults.no_bulk_read
    }

    /// The bulk read by id: each id's EntityDto as a GET of it would see it now (using up a
    /// lagging read as a GET does); ids not found, or hidden by the lag, are omitted.
    pub fn read_entities(&self, ids: &[String]) -> Vec<Bytes> {
        let mut inner = self.lock();
        let now = Instant::now();
        inner.stats.bulk_reads += 1;
        inner.stats.bulk_read_ids += ids.len() as u64;
        ids.iter()
            .filter_map(|id| inner.entities.get_mut(id)?.read(now))
            .map(|entity| entity.dto)
            .collect()
    }

    /// Removes an entity: reads get 404 and the list no longer returns it.
    pub fn delete_entity(&self, id: &str) -> bool {
        let mut inner = self.lock();
        inner.maybe_hidden.remove(id);
        inner.entities.remove(id).is_some()
    }

    /// Up to `size` entities after id `after` (from the first without), each as a read of it
    /// would see it now: an entity the lag still hides is skipped, a stale one is listed at
    /// the version reads see. Every entity the page passes uses up a lagging read, as a GET
    /// does, so a walk of the list makes progress under [`Lag::Reads`].
    pub fn list_entities(&self, after: Option<&str>, size: usize) -> EntityPage {
        let mut guard = self.lock();
        let inner = &mut *guard;
        let now = Instant::now();
        // Counted before this page's reads, so the total describes the same moment as the items.
        let entities = &inner.entities;
        inner
            .maybe_hidden
            .retain(|id| entities.get(id).is_some_and(|r| r.peek(now).is_none()));
        let total_items = inner.entities.len() - inner.maybe_hidden.len();
        let start = after.map_or(Bound::Unbounded, Bound::Excluded);
        let mut items = Vec::with_capacity(size.min(inner.entities.len()));
        let mut rest = inner
            .entities
            .range_mut::<str, _>((start, Bound::Unbounded));
        let mut last = None;
        for (id, record) in rest.by_ref() {
            if let Some(entity) = record.read(now) {
                items.push(entity.dto);
                last = Some(id);
                if items.len() >= size {
                    break;
                }
            }
        }
        let more = rest.any(|(_, record)| record.peek(now).is_some());
        let next_after = last.filter(|_| more).cloned();
        inner.stats.list_pages += 1;
        EntityPage {
            items,
            total_items,
            next_after,
        }
    }

    pub fn record_entity_response(&self, id: &str, status: StatusCode) {
        let mut inner = self.lock();
        *inner
            .stats
            .entity_responses
            .entry(status.as_u16())
            .or_default() += 1;
        *inner
            .stats
            .fetches_by_entity
            .entry(id.to_owned())
            .or_default() += 1;
    }

    /// Creates or replaces an entity; returns its new version (1 for a new entity). The lag in
    /// force now decides how long reads keep seeing the previous version (or nothing).
    pub fn put_entity(&self, id: &str, entity_type: &str, properties: &Value) -> i64 {
        let mut inner = self.lock();
        let now = Instant::now();
        let lag = inner.lag_overrides.get(id).copied().unwrap_or(inner.lag);
        let pending = Pending::start(lag, now);
        let (version, created, visible) = match inner.entities.get(id) {
            Some(old) => {
                // While the previous update is still pending, readers keep the version before
                // it: a projection catching up never shows a version it has not reached.
                let visible = if old.lagging(now) {
                    old.visible.clone()
                } else {
                    Some(old.current.clone())
                };
                (old.version + 1, old.created, visible)
            }
            None => {
                if pending.is_some() {
                    inner.maybe_hidden.insert(id.to_owned());
                }
                (1, Utc::now(), None)
            }
        };
        let current = entities::entity_json(&Snapshot {
            id,
            entity_type,
            version,
            created,
            properties,
        });
        inner.entities.insert(
            id.to_owned(),
            Record {
                version,
                created,
                current,
                visible,
                pending,
            },
        );
        version
    }

    /// The latest version of a stored entity, whether or not reads see it yet.
    pub fn latest_version(&self, id: &str) -> Option<i64> {
        self.lock().entities.get(id).map(|r| r.version)
    }

    pub fn notification(&self, event_type: &str, entity_id: &str, when: DateTime<Utc>) -> String {
        self.new_notification(&mut self.lock(), event_type, entity_id, when)
            .webhook_body()
    }

    /// Raises a notification on the polling feeds; returns its id.
    pub fn publish(&self, event_type: &str, entity_id: &str) -> String {
        let mut inner = self.lock();
        let notification = self.new_notification(&mut inner, event_type, entity_id, Utc::now());
        let id = notification.id.clone();
        inner.feeds.publish(notification);
        id
    }

    fn new_notification(
        &self,
        inner: &mut Inner,
        event_type: &str,
        entity_id: &str,
        when: DateTime<Utc>,
    ) -> Notification {
        Notification::new(
            &mut inner.rng,
            &self.config.tenant_id,
            event_type,
            entity_id,
            when,
        )
    }

    /// The polling API's answer to `next` on `feed_id`: a batch, or `None` for 204.
    pub fn next_batch(&self, feed_id: &str) -> Result<Option<Served>, Missing> {
        let mut guard = self.lock();
        let inner = &mut *guard;
        inner.stats.polls += 1;
        let served = inner.feeds.next(feed_id, Instant::now())?;
        match &served {
            None => inner.stats.empty_polls += 1,
            Some(batch) => {
                inner.stats.batches_served += 1;
                inner.stats.batches_redelivered += u64::from(batch.redelivered);
            }
        }
        Ok(served)
    }

    pub fn complete_batch(&self, feed_id: &str, batch_id: &str) -> Result<(), Missing> {
        let mut inner = self.lock();
        inner.feeds.complete(feed_id, batch_id)?;
        inner.stats.batches_completed += 1;
        Ok(())
    }

    pub fn expire_batches(&self) {
        self.lock().feeds.expire_in_flight(Instant::now());
    }

    pub fn set_polling(&self, knobs: PollingKnobs) {
        self.lock().feeds.set_knobs(knobs);
    }

    pub fn set_lag(&self, lag: Lag) {
        self.lock().lag = lag;
    }

    pub fn set_lag_for(&self, entity_id: &str, lag: Lag) {
        self.lock().lag_overrides.insert(entity_id.to_owned(), lag);
    }

    pub fn set_faults(&self, faults: Faults) {
        self.lock().faults = FaultState::new(faults);
    }

    pub fn stats(&self) -> SimStats {
        let inner = self.lock();
        SimStats {
            feed_depth: inner.feeds.depth(),
            ..inner.stats.clone()
        }
    }
}

impl Inner {
    /// A 429 for this request: forced by the knobs first (deterministic), then the real limit
    /// (requests in the current UNIX second, requests in flight).
    fn throttle(
        &mut self,
        config: &SimConfig,
        position: u32,
        now: DateTime<Utc>,
    ) -> Option<Throttle> {
        if let Some(forced) = self.faults.forced_throttle(now) {
            return Some(forced);
        }
        let second = now.timestamp();
        if self.window.0 != second {
            self.window = (second, 0);
        }
        self.window.1 += 1;
        let over_rate = config
            .requests_per_second
            .is_some_and(|limit| self.window.1 > limit);
        let over_concurrency = config.max_concurrent.is_some_and(|limit| position > limit);
        (over_rate || over_concurrency).then(|| Throttle {
            reset: next_second(now),
            retry_after: None,
        })
    }
}

fn judge_token_request(
    config: &SimConfig,
    knob: Option<TokenRefusal>,
    request: &TokenRequest<'_>,
) -> Result<(), TokenRefused> {
    if let Some(refusal) = knob {
        return Err(TokenRefused::Knob(refusal));
    }
    let grant_type = request.grant_type.ok_or(TokenRefused::InvalidRequest)?;
    if request.client_id != Some(config.client_id.as_str())
        || request.client_secret != Some(config.client_secret.as_str())
    {
        return Err(TokenRefused::InvalidClient);
    }
    if grant_type != "client_credentials" {
        return Err(TokenRefused::UnsupportedGrantType);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use chrono::DateTime;
    use serde_json::{Value, json};

    use super::{ApiHeaders, Refusal, State, TokenRequest};
    use crate::testkit::Api;
    use crate::{Faults, Lag, SimConfig, Simulator};

    fn issue_token(state: &State) -> String {
        let config = &state.config;
        let request = TokenRequest {
            grant_type: Some("client_credentials"),
            client_id: Some(&config.client_id),
            client_secret: Some(&config.client_secret),
            scope: None,
        };
        state.issue_token(&request).unwrap().access_token
    }

    fn version_seen(state: &State, id: &str) -> Option<i64> {
        let body = state.read_entity(id)?;
        serde_json::from_slice::<Value>(&body).unwrap()["data"]["version"].as_i64()
    }

    #[tokio::test(start_paused = true)]
    async fn a_token_lives_exactly_its_ttl() {
        let ttl = Duration::from_secs(900);
        let state = State::new(SimConfig {
            token_ttl: ttl,
            ..SimConfig::default()
        });
        let token = issue_token(&state);
        let headers = ApiHeaders {
            bearer: Some(&token),
            tenant: Some(&state.config.tenant_id),
            correlation_id: None,
        };
        let live = |state: &State| {
            let call = state.begin_call(&headers);
            !matches!(state.gateway(&call, &headers), Err(Refusal::Unauthorized))
        };
        assert!(live(&state));
        tokio::time::advance(ttl - Duration::from_millis(1)).await;
        assert!(live(&state));
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(!live(&state), "expired by its TTL");
    }

    #[tokio::test(start_paused = true)]
    async fn the_list_total_leaves_out_entities_the_lag_still_hides() {
        let lag = Duration::from_millis(150);
        let state = State::new(SimConfig::default());
        state.put_entity("a", "Company", &json!({}));
        state.set_lag(Lag::For(lag));
        state.put_entity("b", "Company", &json!({}));
        state.put_entity("a", "Company", &json!({}));
        state.put_entity("c", "Company", &json!({}));
        let total = |state: &State| state.list_entities(None, 10).total_items;
        assert_eq!(total(&state), 1, "b and c are new and hidden; a is stale");
        state.delete_entity("c");
        tokio::time::advance(lag).await;
        assert_eq!(total(&state), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn lag_in_time_hides_an_update_for_exactly_that_long() {
        let lag = Duration::from_millis(150);
        let state = State::new(SimConfig::default());
        state.set_lag(Lag::For(lag));
        let v1 = state.put_entity("e-1", "Company", &json!({}));
        assert_eq!(version_seen(&state, "e-1"), None, "new, so missing");
        tokio::time::advance(lag).await;
        assert_eq!(version_seen(&state, "e-1"), Some(v1));
        let v2 = state.put_entity("e-1", "Company", &json!({}));
        tokio::time::advance(lag - Duration::from_millis(1)).await;
        assert_eq!(version_seen(&state, "e-1"), Some(v1), "stale");
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(version_seen(&state, "e-1"), Some(v2), "fresh");
    }

    #[test]
    fn the_real_limits_count_requests_per_unix_second_and_in_flight() {
        let state = State::new(SimConfig {
            requests_per_second: Some(5),
            max_concurrent: Some(2),
            ..SimConfig::default()
        });
        let second = DateTime::from_timestamp(1_700_000_000, 0).unwrap();
        let at = |ms: i64| second + chrono::Duration::milliseconds(ms);
        let mut inner = state.lock();
        let refused: Vec<bool> = (0..7)
            .map(|i| inner.throttle(&state.config, 1, at(100 * i)).is_some())
            .collect();
        assert_eq!(refused, [false, false, false, false, false, true, true]);
        let throttle = inner.throttle(&state.config, 1, at(900)).unwrap();
        assert_eq!(throttle.reset, at(1000), "the next window");
        assert_eq!(throttle.retry_after, None);
        assert!(inner.throttle(&state.config, 1, at(1000)).is_none());
        assert!(inner.throttle(&state.config, 2, at(1001)).is_none());
        assert!(
            inner.throttle(&state.config, 3, at(1002)).is_some(),
            "3 in flight"
        );
    }

    fn page_request(size: Option<i64>, cursor: &Value) -> String {
        json!({ "data": {
            "pager": { "size": size, "sortBy": "id", "sortOrder": "asc" },
            "searchAfter": cursor,
            "attributes": [],
        }})
        .to_string()
    }

    /// One page: its items' ids and versions, `totalItems`, and `searchAfter`.
    async fn page(api: &Api, size: i64, cursor: &Value) -> (Vec<(String, i64)>, u64, Value) {
        let (status, body) = api.entity_page(page_request(Some(size), cursor)).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["messages"], json!([]));
        let data = &body["data"];
        let items = data["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|dto| {
                let id = dto["id"].as_str().unwrap().to_owned();
                (id, dto["version"].as_i64().unwrap())
            })
            .collect();
        let total = data["totalItems"].as_u64().unwrap();
        (items, total, data["searchAfter"].clone())
    }

    #[tokio::test]
    async fn the_cursor_walks_every_entity_once_in_id_order() {
        let sim = Simulator::start(SimConfig::default()).await;
        let api = Api::new(&sim).await;
        let mut expected = sim.sample_entities(0..25);
        expected.sort();

        let mut walked = Vec::new();
        let mut cursor = Value::Null;
        let mut pages = 0;
        loop {
            let (items, total, next) = page(&api, 10, &cursor).await;
            assert_eq!(total, 25);
            walked.extend(items);
            pages += 1;
            if next.is_null() {
                break;
            }
            assert!(next.as_str().is_some_and(|c| !c.is_empty()), "{next}");
            cursor = next;
        }
        assert_eq!(pages, 3);
        assert_eq!(walked, expected);

        let (exact, _, next) = page(&api, 25, &Value::Null).await;
        assert_eq!(
            (exact.len(), next),
            (25, Value::Null),
            "no cursor past the end"
        );
        assert_eq!(sim.stats().list_pages, 4);
    }

    #[tokio::test]
    async fn items_are_what_a_get_of_each_entity_serves() {
        let sim = Simulator::start(SimConfig::default()).await;
        let api = Api::new(&sim).await;
        sim.sample_entities(0..3);
        let (status, body) = api.entity_page(page_request(None, &Value::Null)).await;
        assert_eq!(status, 200);
        for dto in body["data"]["items"].as_array().unwrap() {
            let (status, one) = api.entity_json(dto["id"].as_str().unwrap()).await;
            assert_eq!(status, 200);
            assert_eq!(&one["data"], dto);
        }
    }

    #[tokio::test]
    async fn pages_follow_the_lag_rules_of_reads() {
        let sim = Simulator::start(SimConfig::default()).await;
        let api = Api::new(&sim).await;
        sim.put_entity("a", "Company", json!({}));
        sim.put_entity("b", "Company", json!({}));
        sim.set_lag(Lag::Reads(1));
        sim.put_entity("b", "Company", json!({}));
        sim.put_entity("c", "Company", json!({}));

        let (items, total, next) = page(&api, 10, &Value::Null).await;
        assert_eq!(
            items,
            [("a".to_owned(), 1), ("b".to_owned(), 1)],
            "c is still missing, b is stale"
        );
        assert_eq!((total, next), (2, Value::Null));
        let (items, total, _) = page(&api, 10, &Value::Null).await;
        assert_eq!(
            items,
            [
                ("a".to_owned(), 1),
                ("b".to_owned(), 2),
                ("c".to_owned(), 1)
            ],
            "a list page used up the lagging read, as a GET does"
        );
        assert_eq!(total, 3);

        sim.set_lag(Lag::Reads(1));
        sim.put_entity("d", "Company", json!({}));
        let (first, total, cursor) = page(&api, 1, &Value::Null).await;
        assert_eq!((first[0].0.as_str(), total), ("a", 3));
        let (_, _, cursor) = page(&api, 2, &cursor).await;
        assert!(cursor.is_null(), "nothing visible after c yet");
        let after_c = json!(crate::entities::cursor_after("c"));
        let (hidden, total, _) = page(&api, 10, &after_c).await;
        assert_eq!(
            (hidden, total),
            (vec![], 3),
            "this page used up d's lagging read"
        );
        let (last, total, _) = page(&api, 10, &after_c).await;
        assert_eq!((last, total), (vec![("d".to_owned(), 1)], 4));
    }

    #[tokio::test]
    async fn sizes_are_clamped_and_default_to_100() {
        let sim = Simulator::start(SimConfig::default()).await;
        let api = Api::new(&sim).await;
        sim.sample_entities(0..102);
        for (size, expected) in [(Some(0), 1), (Some(-5), 1), (Some(5000), 102), (None, 100)] {
            let (status, body) = api.entity_page(page_request(size, &Value::Null)).await;
            assert_eq!(status, 200, "{size:?}");
            let items = body["data"]["items"].as_array().unwrap().len();
            assert_eq!(items, expected, "{size:?}");
        }
        let (status, body) = api.entity_page(r#"{"data":{}}"#).await;
        assert_eq!(status, 200, "pager and cursor are optional");
        assert_eq!(body["data"]["items"].as_array().unwrap().len(), 100);
    }

    #[tokio::test]
    async fn a_bad_query_is_400_in_the_envelope() {
        let sim = Simulator::start(SimConfig::default()).await;
        let api = Api::new(&sim).await;
        sim.sample_entities(0..2);
        let with_pager = |pager: Value| json!({ "data": { "pager": pager } }).to_string();
        for body in [
            String::new(),
            "not json".to_owned(),
            "[]".to_owned(),
            r#"{"pager":{"size":10}}"#.to_owned(),
            with_pager(json!({ "size": "ten" })),
            with_pager(json!({ "size": 1.5 })),
            with_pager(json!({ "sortBy": "name" })),
            with_pager(json!({ "sortOrder": "desc" })),
            json!({ "data": { "searchAfter": "not a cursor!" } }).to_string(),
            json!({ "data": { "searchAfter": 7 } }).to_string(),
            "x".repeat(crate::routes::MAX_QUERY_BYTES + 1),
        ] {
            let (status, answer) = api.entity_page(body.clone()).await;
            assert_eq!(status, 400, "{body:.80}");
            assert_eq!(answer["data"], Value::Null);
            assert_eq!(answer["messages"][0]["type"], "Error");
        }
        assert_eq!(sim.stats().list_pages, 0);
    }

    #[tokio::test]
    async fn the_list_goes_through_the_gateway_and_the_fault_knobs() {
        let sim = Simulator::start(SimConfig::default()).await;
        let api = Api::new(&sim).await;
        let url = format!(
            "{}/entitydataquery/api/v2/entity/getentitiespagedlist",
            api.base
        );
        let anonymous = api.http.post(&url).header("X-TENANT-ID", &api.tenant);
        assert_eq!(anonymous.body("{}").send().await.unwrap().status(), 401);
        sim.expire_tokens();
        assert_eq!(api.entity_page(r#"{"data":{}}"#).await.0, 401);
        let api = Api::new(&sim).await;
        assert_eq!(api.get(&url).send().await.unwrap().status(), 405);
        sim.set_faults(Faults {
            rate_limited_requests: 1,
            server_errors: 1,
            ..Faults::default()
        });
        assert_eq!(api.entity_page(r#"{"data":{}}"#).await.0, 429);
        assert_eq!(api.entity_page(r#"{"data":{}}"#).await.0, 500);
        assert_eq!(api.entity_page(r#"{"data":{}}"#).await.0, 200);
        assert_eq!(sim.stats().list_pages, 1);
    }
}
