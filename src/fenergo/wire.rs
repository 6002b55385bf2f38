//! Fenergo's wire format for the entity query API: the `{"data": …, "messages": …}` envelope
//! and the few EntityDto fields the sync worker needs to reason about.
//!
//! These are Fenergo's types, kept apart from what we store (`crate::store`), and this is where
//! one becomes the other; the full `data` object is carried along untouched so nothing Fenergo
//! sends is lost.

use serde::Deserialize;
use serde_json::Value;

use crate::store::EntitySnapshot;

#[derive(Debug, Deserialize)]
pub struct Envelope {
    #[serde(default)]
    pub data: Option<Value>,
    #[serde(default)]
    pub messages: Option<Value>,
}

/// An entity as returned by `GET entitydataquery/api/entity/{id}`.
#[derive(Debug, Clone)]
pub struct Entity {
    pub id: String,
    pub entity_type: Option<String>,
    pub version: i64,
    pub status: Option<String>,
    pub created: Option<String>,
    /// The whole `data` object as received.
    pub data: Value,
}

impl From<&Entity> for EntitySnapshot {
    fn from(entity: &Entity) -> EntitySnapshot {
        EntitySnapshot {
            entity_id: entity.id.clone(),
            entity_type: entity.entity_type.clone(),
            version: entity.version,
            status: entity.status.clone(),
            created: entity.created.as_deref().and_then(crate::time::parse),
            json: entity.data.clone(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("response is not JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("response envelope has no data object")]
    NoData,
    #[error("entity has no {0}")]
    Missing(&'static str),
}

impl Entity {
    pub fn from_body(body: &[u8]) -> Result<Entity, WireError> {
        let envelope: Envelope = serde_json::from_slice(body)?;
        Entity::from_data(envelope.data.ok_or(WireError::NoData)?)
    }

    /// An entity from an EntityDto object (a response's `data`, or an item of a list).
    pub fn from_data(data: Value) -> Result<Entity, WireError> {
        if !data.is_object() {
            return Err(WireError::NoData);
        }
        let text = |key: &str| match data.get(key) {
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Number(n)) => Some(n.to_string()),
            _ => None,
        };
        let id = text("id").ok_or(WireError::Missing("id"))?;
        let version = match data.get("version") {
            Some(Value::Number(n)) => n.as_i64(),
            Some(Value::String(s)) => s.parse().ok(),
            _ => None,
        }
        .ok_or(WireError::Missing("integer version"))?;
        Ok(Entity {
            id,
            entity_type: text("type"),
            version,
            status: text("status"),
            created: text("created"),
            data,
        })
    }
}

/// One page of `getentitiespagedlist`. Fenergo's response shape is not documented, so this
/// reads what the sources suggest: `data` as an array of EntityDto (v1) or as an object holding
/// the array under `items`, `entities` or `results` (v2), and the next cursor as `searchAfter`
/// inside `data` or beside it.
#[derive(Debug)]
pub struct Page {
    pub entities: Vec<Entity>,
    /// Items that were not usable entities (logged, skipped).
    pub unusable: Vec<String>,
    pub total_items: Option<i64>,
    /// The cursor for the next page; `None` on the last page.
    pub search_after: Option<String>,
    /// How many items the page held, usable or not (a short page ends offset paging).
    pub len: usize,
}

impl Page {
    pub fn from_body(body: &[u8]) -> Result<Page, WireError> {
        let root: Value = serde_json::from_slice(body)?;
        let data = root.get("data").ok_or(WireError::NoData)?;
        let items = list_items(data)?;
        let cursor = data
            .get("searchAfter")
            .or_else(|| root.get("searchAfter"))
            .and_then(|c| match c {
                Value::Null => None,
                Value::String(s) if s.is_empty() => None,
                Value::String(s) => Some(s.clone()),
                other => Some(other.to_string()),
            });
        let total_items = ["totalItems", "total"].iter().find_map(|k| {
            data.get(*k)
                .or_else(|| root.get(*k))
                .and_then(Value::as_i64)
        });
        let len = items.len();
        let (entities, unusable) = read_items(items);
        Ok(Page {
            entities,
            unusable,
            total_items,
            search_after: cursor,
            len,
        })
    }
}

/// The answer of the bulk read by id (`getentitieslist`, contract §6): EntityDtos in `data` (an
/// array, or an object holding it under `items` or `entities`); ids it omits are not in it.
#[derive(Debug)]
pub struct EntityList {
    pub entities: Vec<Entity>,
    /// Items that were not usable entities (logged, skipped; their ids are read singly).
    pub unusable: Vec<String>,
}

impl EntityList {
    pub fn from_body(body: &[u8]) -> Result<EntityList, WireError> {
        let envelope: Envelope = serde_json::from_slice(body)?;
        let items = list_items(&envelope.data.ok_or(WireError::NoData)?)?;
        let (entities, unusable) = read_items(items);
        Ok(EntityList { entities, unusable })
    }
}

/// A list response's items: `data` itself when it is an array, else its `items`, `entities` or
/// `results` array.
fn list_items(data: &Value) -> Result<Vec<Value>, WireError> {
    match data {
        Value::Array(items) => Ok(items.clone()),
        Value::Object(fields) => ["items", "entities", "results"]
            .iter()
            .find_map(|k| fields.get(*k).and_then(Value::as_array))
            .cloned()
            .ok_or(WireError::NoData),
        _ => Err(WireError::NoData),
    }
}

/// Usable entities, and why the other items were not.
fn read_items(items: Vec<Value>) -> (Vec<Entity>, Vec<String>) {
    let mut entities = Vec::with_capacity(items.len());
    let mut unusable = Vec::new();
    for item in items {
        match Entity::from_data(item) {
            Ok(entity) => entities.push(entity),
            Err(e) => unusable.push(e.to_string()),
        }
    }
    (entities, unusable)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_envelope_and_keeps_the_whole_data_object() {
        let body = br#"{"data":{"id":"e-1","type":"Company","version":3,"status":1,"created":"2024-01-01T00:00:00Z","properties":{"a":{"type":"Single","value":"x"}},"future":true},"messages":[]}"#;
        let e = Entity::from_body(body).unwrap();
        assert_eq!((e.id.as_str(), e.version), ("e-1", 3));
        assert_eq!(e.entity_type.as_deref(), Some("Company"));
        assert_eq!(e.status.as_deref(), Some("1"));
        assert_eq!(e.data["future"], true);
    }

    #[test]
    fn pages_are_read_in_every_plausible_shape() {
        let v2 = br#"{"data":{"items":[{"id":"a","version":1},{"id":"b","version":2},{"nope":1}],"totalItems":3,"searchAfter":"Yg=="},"messages":[]}"#;
        let page = Page::from_body(v2).unwrap();
        let ids: Vec<&str> = page.entities.iter().map(|e| e.id.as_str()).collect();
        assert_eq!((ids, page.unusable.len(), page.len), (vec!["a", "b"], 1, 3));
        assert_eq!(
            (page.total_items, page.search_after.as_deref()),
            (Some(3), Some("Yg=="))
        );
        let v1 = br#"{"data":[{"id":"a","version":1}],"searchAfter":["a",17]}"#;
        let page = Page::from_body(v1).unwrap();
        assert_eq!(page.search_after.as_deref(), Some(r#"["a",17]"#));
        let last = Page::from_body(br#"{"data":{"items":[],"searchAfter":null}}"#).unwrap();
        assert_eq!((last.len, last.search_after), (0, None));
        assert!(Page::from_body(br#"{"data":"x"}"#).is_err());
    }

    #[test]
    fn bulk_reads_are_read_as_an_array_or_under_items_or_entities() {
        for body in [
            &br#"{"data":[{"id":"a","version":1},{"id":"b","version":2}],"messages":[]}"#[..],
            br#"{"data":{"items":[{"id":"a","version":1},{"id":"b","version":2}]}}"#,
            br#"{"data":{"entities":[{"id":"a","version":1},{"id":"b","version":2},{"x":1}]}}"#,
        ] {
            let list = EntityList::from_body(body).unwrap();
            let ids: Vec<&str> = list.entities.iter().map(|e| e.id.as_str()).collect();
            assert_eq!(ids, ["a", "b"]);
        }
        assert!(EntityList::from_body(br#"{"data":null}"#).is_err());
    }

    #[test]
    fn bodies_without_what_we_need_are_clear_errors() {
        for (body, want) in [
            (&b"nope"[..], "not JSON"),
            (br#"{"data":null,"messages":[{"message":"x"}]}"#, "no data"),
            (br#"{"data":{"version":1}}"#, "no id"),
            (br#"{"data":{"id":"x","version":"v2"}}"#, "integer version"),
        ] {
            let err = Entity::from_body(body).unwrap_err().to_string();
            assert!(err.contains(want), "{err}");
        }
    }
}
