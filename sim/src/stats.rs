//! What the simulator has seen ([`SimStats`]), for tests and benchmarks to assert on. `state`
//! counts into it under its lock; this module only defines the counters and the questions asked
//! of them, and must never hold anything that grows without bound.

use std::collections::{BTreeMap, HashMap, VecDeque};

/// How many correlation ids the statistics keep (the most recent ones), so a long-running
/// standalone simulator does not grow without bound.
pub const CORRELATION_IDS_KEPT: usize = 10_000;

/// What the simulator has seen, as of [`crate::Simulator::stats`].
#[derive(Debug, Clone, Default)]
pub struct SimStats {
    /// Every request to the token endpoint.
    pub token_requests: u64,
    pub tokens_issued: u64,
    /// Token requests answered with an error (bad client, bad grant, or the refusal knob).
    pub tokens_refused: u64,
    /// Every request to the API (anything but the token endpoint), whatever its answer.
    pub api_calls: u64,
    /// Entity query answers by HTTP status.
    pub entity_responses: BTreeMap<u16, u64>,
    /// Entity query requests per requested entity id, whatever their answer.
    pub fetches_by_entity: HashMap<String, u64>,
    /// 429s served, forced or from the real limit.
    pub rate_limited: u64,
    /// 5xx served by the fault knobs.
    pub server_errors: u64,
    /// The most API requests in flight at once (429s included: it measures the client).
    pub max_in_flight: u32,
    /// The `x-correlation-id` of API requests, oldest first (the last
    /// [`CORRELATION_IDS_KEPT`]).
    pub correlation_ids: VecDeque<String>,
    pub requests_missing_correlation_id: u64,
    pub requests_missing_tenant: u64,
    pub requests_wrong_tenant: u64,
    /// `next` requests the polling API answered (past the gateway and the fault knobs),
    /// whatever the answer.
    pub polls: u64,
    /// `next` answered 204.
    pub empty_polls: u64,
    /// Batches handed out, redeliveries included.
    pub batches_served: u64,
    pub batches_completed: u64,
    /// Batches handed out again after their visibility timeout.
    pub batches_redelivered: u64,
    /// Notifications not yet completed (waiting or in flight) per feed, every feed listed.
    pub feed_depth: BTreeMap<String, usize>,
    /// Entity list pages served (200s).
    pub list_pages: u64,
    /// Bulk reads by id served (200s), and the ids they were asked for.
    pub bulk_reads: u64,
    pub bulk_read_ids: u64,
}

impl SimStats {
    /// Entity query requests, whatever their answer.
    pub fn entity_requests(&self) -> u64 {
        self.entity_responses.values().sum()
    }

    /// Entity query answers with this status.
    pub fn responses_with(&self, status: u16) -> u64 {
        self.entity_responses.get(&status).copied().unwrap_or(0)
    }

    /// Entity query requests for this entity id.
    pub fn fetches(&self, entity_id: &str) -> u64 {
        self.fetches_by_entity.get(entity_id).copied().unwrap_or(0)
    }
}
