//! The polling API's feeds (contract §5): an `all` feed plus one per source domain, each a FIFO
//! of waiting notifications, and the batches served but not yet completed, which come back
//! whole under a new batch id once their visibility timeout has passed.
//!
//! A plain data structure: `state` keeps it under its lock and counts what it does. It must
//! never read the clock (callers pass `now`, and the first batch id), know about HTTP, or drop
//! a notification that was not completed. Redelivery after a timeout is the project's
//! assumption: the contract found it only in a secondary source.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use tokio::time::Instant;

use super::PollingKnobs;
use super::entities::Notification;

/// The feed that carries every notification.
pub(super) const ALL_FEED: &str = "all";

/// The source domains of Fenergo's event registry (contract §4). Their feeds exist before
/// anything is published on them, as a tenant's do, so a poller can start on an idle one.
const REGISTRY_DOMAINS: [&str; 15] = [
    "entitydata",
    "journey",
    "association",
    "document",
    "screening",
    "product",
    "deals",
    "digitalidv",
    "lookup",
    "comments",
    "batchtransaction",
    "eventingress",
    "businessrule",
    "rulesession",
    "transaction",
];

/// Why a feed could not answer.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Missing {
    Feed,
    /// Never served, already completed, or redelivered under another id.
    Batch,
}

/// A batch handed to a poller.
pub(super) struct Served {
    pub batch_id: String,
    pub notifications: Vec<Arc<Notification>>,
    pub more_available: bool,
    /// Whether it is an expired batch served again.
    pub redelivered: bool,
}

pub(super) struct Feeds {
    knobs: PollingKnobs,
    feeds: BTreeMap<String, Feed>,
    /// Notifications published since the knobs were set, for "every Nth is duplicated".
    published: u64,
    /// Batch ids only grow, so a completed or redelivered batch's id never names another.
    last_batch_id: u64,
}

#[derive(Default)]
struct Feed {
    waiting: VecDeque<Arc<Notification>>,
    /// By batch id, so the first expired one is the oldest.
    in_flight: BTreeMap<u64, InFlight>,
}

struct InFlight {
    notifications: Vec<Arc<Notification>>,
    expires: Instant,
}

impl Feeds {
    /// `first_batch_id` makes batch ids look like Fenergo's (a millisecond timestamp).
    pub fn new(knobs: PollingKnobs, first_batch_id: u64) -> Feeds {
        let feeds = std::iter::once(ALL_FEED)
            .chain(REGISTRY_DOMAINS)
            .map(|name| (name.to_owned(), Feed::default()))
            .collect();
        Feeds {
            knobs,
            feeds,
            published: 0,
            last_batch_id: first_batch_id.saturating_sub(1),
        }
    }

    /// Replaces the knobs for batches served from now on, and restarts the duplicate count.
    pub fn set_knobs(&mut self, knobs: PollingKnobs) {
        self.knobs = knobs;
        self.published = 0;
    }

    /// Enqueues `notification` on `all` and on its domain's feed (the event type before `:`),
    /// twice in a row when the duplicate knob picks it. A domain outside the registry gets a
    /// feed of its own, since the registry grows.
    pub fn publish(&mut self, notification: Notification) {
        self.published += 1;
        let every = u64::from(self.knobs.duplicate_every);
        let copies = if every > 0 && self.published.is_multiple_of(every) {
            2
        } else {
            1
        };
        let domain = notification
            .event_type
            .split_once(':')
            .map(|(domain, _)| domain.to_owned())
            .filter(|domain| !domain.is_empty() && domain != ALL_FEED);
        let notification = Arc::new(notification);
        for name in std::iter::once(ALL_FEED.to_owned()).chain(domain) {
            let feed = self.feeds.entry(name).or_default();
            for _ in 0..copies {
                feed.waiting.push_back(notification.clone());
            }
        }
    }

    /// The next batch of `feed_id`: the oldest expired batch again if there is one, else up to
    /// `batch_size` waiting notifications; `None` when neither is there.
    pub fn next(&mut self, feed_id: &str, now: Instant) -> Result<Option<Served>, Missing> {
        let feed = self.feeds.get_mut(feed_id).ok_or(Missing::Feed)?;
        let expired = feed
            .in_flight
            .iter()
            .find(|(_, batch)| batch.expires <= now)
            .map(|(id, _)| *id);
        let (notifications, redelivered) = match expired.and_then(|id| feed.in_flight.remove(&id)) {
            Some(batch) => (batch.notifications, true),
            None if feed.waiting.is_empty() => return Ok(None),
            None => {
                let size = self.knobs.batch_size.clamp(1, feed.waiting.len());
                (feed.waiting.drain(..size).collect(), false)
            }
        };
        self.last_batch_id += 1;
        feed.in_flight.insert(
            self.last_batch_id,
            InFlight {
                notifications: notifications.clone(),
                expires: now + self.knobs.visibility_timeout,
            },
        );
        let more_available =
            !feed.waiting.is_empty() || feed.in_flight.values().any(|b| b.expires <= now);
        Ok(Some(Served {
            batch_id: self.last_batch_id.to_string(),
            notifications,
            more_available,
            redelivered,
        }))
    }

    /// Removes an in-flight batch for good. A batch past its timeout but not yet redelivered
    /// can still be completed: nobody else has seen it again.
    pub fn complete(&mut self, feed_id: &str, batch_id: &str) -> Result<(), Missing> {
        let feed = self.feeds.get_mut(feed_id).ok_or(Missing::Feed)?;
        // Byte-exact: "+17…" or "017…" parse to the same number but are not the id served.
        let id = batch_id
            .parse::<u64>()
            .ok()
            .filter(|id| id.to_string() == batch_id);
        match id.and_then(|id| feed.in_flight.remove(&id)) {
            Some(_) => Ok(()),
            None => Err(Missing::Batch),
        }
    }

    /// Ends the visibility timeout of every batch in flight on every feed: the next `next`
    /// serves them again, as if the timeout had passed by `now`.
    pub fn expire_in_flight(&mut self, now: Instant) {
        for batch in self
            .feeds
            .values_mut()
            .flat_map(|f| f.in_flight.values_mut())
        {
            batch.expires = batch.expires.min(now);
        }
    }

    /// Notifications not yet completed (waiting or in flight), per feed.
    pub fn depth(&self) -> BTreeMap<String, usize> {
        self.feeds
            .iter()
            .map(|(name, feed)| {
                let in_flight: usize = feed.in_flight.values().map(|b| b.notifications.len()).sum();
                (name.clone(), feed.waiting.len() + in_flight)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use serde_json::Value;

    use super::*;
    use crate::testkit::Api;
    use crate::{Faults, SimConfig, Simulator};

    const ENTITY_CREATED: &str = "entitydata:created";

    async fn started(knobs: PollingKnobs) -> (Simulator, Api) {
        let sim = Simulator::start(SimConfig::default()).await;
        sim.set_polling(knobs);
        let api = Api::new(&sim).await;
        (sim, api)
    }

    fn batch_of(size: usize) -> PollingKnobs {
        PollingKnobs {
            batch_size: size,
            ..PollingKnobs::default()
        }
    }

    fn publish_n(sim: &Simulator, n: usize) -> Vec<String> {
        (0..n)
            .map(|i| sim.publish(ENTITY_CREATED, &format!("e-{i}")))
            .collect()
    }

    fn ids(batch: &Value) -> Vec<&str> {
        batch["notifications"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["id"].as_str().unwrap())
            .collect()
    }

    fn batch_id(batch: &Value) -> &str {
        batch["batchId"].as_str().unwrap()
    }

    /// Takes the next batch of `feed`, which must be there.
    async fn take(api: &Api, feed: &str) -> Value {
        let (status, batch) = api.next_batch(feed).await;
        assert_eq!(status, 200, "{batch}");
        batch
    }

    #[tokio::test]
    async fn an_empty_feed_answers_204_and_an_unknown_feed_404() {
        let (sim, api) = started(PollingKnobs::default()).await;
        for feed in ["all", "entitydata", "journey"] {
            assert_eq!(api.next_batch(feed).await, (204, Value::Null), "{feed}");
        }
        let (status, body) = api.next_batch("nonsense").await;
        assert_eq!(status, 404);
        assert_eq!(body["data"], Value::Null);
        assert_eq!(body["messages"][0]["type"], "Error");
        let stats = sim.stats();
        assert_eq!((stats.polls, stats.empty_polls), (4, 3));
        assert_eq!(stats.batches_served, 0);
        assert!(stats.feed_depth.values().all(|depth| *depth == 0));
    }

    #[tokio::test]
    async fn batches_are_fifo_in_fenergos_shape_and_say_when_more_wait() {
        let (sim, api) = started(batch_of(3)).await;
        let published = publish_n(&sim, 5);

        let first = take(&api, "all").await;
        assert_eq!(ids(&first), published[..3]);
        assert_eq!(first["moreAvailable"], true);
        assert!(batch_id(&first).bytes().all(|b| b.is_ascii_digit()));
        let notification = &first["notifications"][0];
        assert_eq!(notification["eventType"], ENTITY_CREATED);
        assert_eq!(notification["tenantId"], sim.config().tenant_id.as_str());
        assert_eq!(
            notification["relativeUrl"],
            "entitydataquery/api/entity/e-0"
        );
        assert_eq!(notification["payload"], serde_json::json!({}));
        let when = notification["when"].as_str().unwrap();
        assert!(when.len() == 33 && when.ends_with("+00:00"), "{when}");
        for key in ["causationId", "correlationId"] {
            assert!(notification[key].is_string(), "{key}");
        }

        let second = take(&api, "all").await;
        assert_eq!(
            ids(&second),
            published[3..],
            "the rest, while the first is in flight"
        );
        assert_eq!(second["moreAvailable"], false);
        assert_ne!(batch_id(&first), batch_id(&second));
        assert_eq!(api.next_batch("all").await.0, 204);
        let stats = sim.stats();
        assert_eq!(stats.batches_served, 2);
        assert_eq!(stats.feed_depth["all"], 5, "in flight is not completed");
    }

    #[tokio::test]
    async fn complete_removes_a_batch_for_good_and_unknown_batches_are_404() {
        let (sim, api) = started(batch_of(2)).await;
        publish_n(&sim, 3);
        let batch = take(&api, "all").await;
        let id = batch_id(&batch);
        for wrong in [
            "12345",
            "not-a-number",
            &format!("+{id}"),
            &format!("0{id}"),
        ] {
            assert_eq!(api.complete("all", wrong).await.0, 404, "{wrong}");
        }
        assert_eq!(
            api.complete("entitydata", id).await.0,
            404,
            "another feed's batch"
        );
        assert_eq!(api.complete("nonsense", id).await.0, 404);
        assert_eq!(api.complete("all", id).await, (200, Value::Null), "no body");
        let (status, body) = api.complete("all", id).await;
        assert_eq!(status, 404, "already completed");
        assert_eq!(body["data"], Value::Null);

        let stats = sim.stats();
        assert_eq!(stats.batches_completed, 1);
        assert_eq!(stats.feed_depth["all"], 1);
        assert_eq!(stats.feed_depth["entitydata"], 3, "feeds are independent");
    }

    #[tokio::test]
    async fn a_batch_not_completed_in_time_is_redelivered_with_a_new_batch_id() {
        let (sim, api) = started(PollingKnobs {
            batch_size: 2,
            ..PollingKnobs::default()
        })
        .await;
        let published = publish_n(&sim, 3);
        let first = take(&api, "all").await;
        let second = take(&api, "all").await;
        assert_eq!(api.next_batch("all").await.0, 204, "both in flight");
        sim.expire_batches();

        let again = take(&api, "all").await;
        assert_eq!(ids(&again), ids(&first), "the oldest batch first, whole");
        assert_ne!(batch_id(&again), batch_id(&first));
        assert_eq!(again["moreAvailable"], true, "the second batch expired too");
        let again_second = take(&api, "all").await;
        assert_eq!(ids(&again_second), [published[2].as_str()]);
        assert_eq!(again_second["moreAvailable"], false);

        assert_eq!(
            api.complete("all", batch_id(&first)).await.0,
            404,
            "superseded"
        );
        assert_eq!(api.complete("all", batch_id(&again)).await.0, 200);
        assert_eq!(api.complete("all", batch_id(&again_second)).await.0, 200);
        assert_eq!(api.complete("all", batch_id(&second)).await.0, 404);
        sim.expire_batches();
        assert_eq!(api.next_batch("all").await.0, 204, "completed is gone");
        let stats = sim.stats();
        assert_eq!((stats.batches_served, stats.batches_redelivered), (4, 2));
        assert_eq!(stats.feed_depth["all"], 0);
    }

    #[tokio::test]
    async fn a_late_completion_before_redelivery_still_counts() {
        let (sim, api) = started(PollingKnobs::default()).await;
        publish_n(&sim, 1);
        let batch = take(&api, "all").await;
        sim.expire_batches();
        assert_eq!(api.complete("all", batch_id(&batch)).await.0, 200);
        assert_eq!(api.next_batch("all").await.0, 204);
    }

    #[test]
    fn a_batch_comes_back_exactly_when_its_visibility_timeout_ends() {
        let timeout = Duration::from_secs(30);
        let mut feeds = Feeds::new(
            PollingKnobs {
                visibility_timeout: timeout,
                ..PollingKnobs::default()
            },
            1,
        );
        let mut rng = fastrand::Rng::with_seed(1);
        feeds.publish(Notification::new(
            &mut rng,
            "tenant-1",
            ENTITY_CREATED,
            "e",
            chrono::Utc::now(),
        ));
        let served_at = Instant::now();
        let first = feeds.next(ALL_FEED, served_at).unwrap().unwrap();
        let just_before = served_at + timeout - Duration::from_millis(1);
        assert!(feeds.next(ALL_FEED, just_before).unwrap().is_none());
        let again = feeds.next(ALL_FEED, served_at + timeout).unwrap().unwrap();
        assert!(again.redelivered);
        assert_ne!(again.batch_id, first.batch_id);
        assert_eq!(again.notifications[0].id, first.notifications[0].id);
    }

    #[tokio::test]
    async fn every_domain_has_its_own_feed() {
        let (sim, api) = started(PollingKnobs::default()).await;
        let created = sim.publish(ENTITY_CREATED, "e-1");
        let task = sim.publish("journey:taskcompleted", "e-2");
        let custom = sim.publish("custom:thing", "e-3");
        let untyped = sim.publish("nodomain", "e-4");

        let everything = take(&api, "all").await;
        assert_eq!(ids(&everything), [&created, &task, &custom, &untyped]);
        assert_eq!(api.complete("all", batch_id(&everything)).await.0, 200);
        for (feed, id) in [
            ("entitydata", &created),
            ("journey", &task),
            ("custom", &custom),
        ] {
            let batch = take(&api, feed).await;
            assert_eq!(ids(&batch), [id.as_str()], "{feed}");
        }
        assert_eq!(api.next_batch("document").await.0, 204);
        assert_eq!(api.next_batch("nodomain").await.0, 404);
        let depth = sim.stats().feed_depth;
        assert_eq!(
            (
                depth["all"],
                depth["entitydata"],
                depth["journey"],
                depth["custom"]
            ),
            (0, 1, 1, 1)
        );
    }

    #[tokio::test]
    async fn the_duplicate_knob_enqueues_every_nth_notification_twice() {
        let (sim, api) = started(PollingKnobs {
            duplicate_every: 2,
            ..PollingKnobs::default()
        })
        .await;
        let published = publish_n(&sim, 4);
        let batch = take(&api, "all").await;
        let [a, b, c, d] = [0, 1, 2, 3].map(|i| published[i].as_str());
        assert_eq!(ids(&batch), [a, b, b, c, d, d]);
        let domain = take(&api, "entitydata").await;
        assert_eq!(ids(&domain), ids(&batch));
    }

    #[tokio::test]
    async fn polling_goes_through_the_gateway_and_the_fault_knobs() {
        let (sim, api) = started(PollingKnobs::default()).await;
        publish_n(&sim, 1);
        let next = format!("{}/eventnotifications/v2/all/next", api.base);
        let anonymous = api.http.get(&next).header("X-TENANT-ID", &api.tenant);
        assert_eq!(anonymous.send().await.unwrap().status(), 401);
        let complete = format!("{}/eventnotifications/v2/all/1/complete", api.base);
        let anonymous = api.http.post(&complete).header("X-TENANT-ID", &api.tenant);
        assert_eq!(anonymous.send().await.unwrap().status(), 401);
        let other_tenant = api.get_with(&next, Some("another-tenant"), None);
        assert_eq!(other_tenant.send().await.unwrap().status(), 403);
        assert_eq!(api.post(&next).send().await.unwrap().status(), 405);
        assert_eq!(api.get(&complete).send().await.unwrap().status(), 405);

        sim.set_faults(Faults {
            rate_limited_requests: 1,
            server_errors: 1,
            ..Faults::default()
        });
        assert_eq!(api.next_batch("all").await.0, 429);
        assert_eq!(api.next_batch("all").await.0, 500);
        assert_eq!(api.next_batch("all").await.0, 200);
        let stats = sim.stats();
        assert_eq!(stats.polls, 1, "only the poll the feed answered");
        assert_eq!(stats.entity_requests(), 0, "polls are not entity reads");
    }
}
