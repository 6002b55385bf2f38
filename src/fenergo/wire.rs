//! Fenergo's wire format for the entity query API: the `{"data": …, "messages": …}` envelope
//! and the few EntityDto fields the sync worker needs to reason about.
//!
//! These are Fenergo's types, kept apart from what we store (`crate::store`); the full `data`
//! object is carried along untouched so nothing Fenergo sends is lost.

use serde::Deserialize;
use serde_json::Value;

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
        let data = envelope
            .data
            .filter(Value::is_object)
            .ok_or(WireError::NoData)?;
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
