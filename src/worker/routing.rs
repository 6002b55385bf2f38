//! Which action an event type gets: exact names (any casing) first, then `domain:*` patterns,
//! then a bare `*`; anything else is ignored. Pure; never an error for an unknown type.

use std::collections::BTreeMap;

use crate::config::RouteAction;
use crate::notification::RESYNC_EVENT_TYPE;

#[derive(Debug, Clone)]
pub struct Router {
    exact: BTreeMap<String, RouteAction>,
    domains: BTreeMap<String, RouteAction>,
    everything: Option<RouteAction>,
}

impl Router {
    pub fn new(routes: &BTreeMap<String, RouteAction>) -> Router {
        let mut router = Router {
            exact: BTreeMap::new(),
            domains: BTreeMap::new(),
            everything: None,
        };
        for (pattern, &action) in routes {
            let pattern = pattern.trim().to_ascii_lowercase();
            if pattern == "*" {
                router.everything = Some(action);
            } else if let Some(domain) = pattern.strip_suffix(":*") {
                router.domains.insert(domain.to_owned(), action);
            } else {
                router.exact.insert(pattern, action);
            }
        }
        router
    }

    /// The action for `event_type`; a notification without one is ignored, an operator's
    /// `resync` is always fetched.
    pub fn route(&self, event_type: Option<&str>) -> RouteAction {
        let Some(event_type) = event_type.map(|t| t.trim().to_ascii_lowercase()) else {
            return RouteAction::Ignore;
        };
        if event_type == RESYNC_EVENT_TYPE {
            return RouteAction::FetchEntity;
        }
        let domain = event_type.split(':').next().unwrap_or_default();
        self.exact
            .get(&event_type)
            .or_else(|| self.domains.get(domain))
            .or(self.everything.as_ref())
            .copied()
            .unwrap_or(RouteAction::Ignore)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SyncSettings;
    use RouteAction::{FetchEntity, Ignore};

    #[test]
    fn default_routes_fetch_whole_entity_events_and_ignore_the_rest() {
        let router = Router::new(&SyncSettings::default().routes);
        for t in [
            "entitydata:draftverified",
            "entitydata:created",
            "ENTITYDATA:DataPublished",
            "entitydata:migrated",
        ] {
            assert_eq!(router.route(Some(t)), FetchEntity, "{t}");
        }
        for t in [
            "entitydata:draftcreated",
            "journey:taskcompleted",
            "brandnew:thing",
            "",
            "nocolon",
        ] {
            assert_eq!(router.route(Some(t)), Ignore, "{t}");
        }
        assert_eq!(router.route(None), Ignore);
        assert_eq!(router.route(Some(RESYNC_EVENT_TYPE)), FetchEntity);
    }

    #[test]
    fn exact_beats_domain_beats_everything() {
        let routes: BTreeMap<String, RouteAction> = [
            ("*", FetchEntity),
            ("journey:*", Ignore),
            ("journey:taskCompleted", FetchEntity),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        let router = Router::new(&routes);
        assert_eq!(router.route(Some("journey:taskcompleted")), FetchEntity);
        assert_eq!(router.route(Some("journey:taskstarted")), Ignore);
        assert_eq!(router.route(Some("screening:searchcompleted")), FetchEntity);
    }
}
