//! Parsing Fenergo event notifications out of a request body (pure, no I/O).
//!
//! Owns the tolerant reading of the wire format: field names in any casing (webhooks send
//! PascalCase, polling v2 camelCase, polling v1 calls the link `url`), one notification or a batch
//! (a JSON array, or an object wrapping one under `notifications`), ids as opaque case-sensitive
//! strings of any length, and the exact raw bytes of each notification for the outbox.
//!
//! It must never reject a well-formed notification for its content (a missing id or event type is
//! stored as such) and never re-serialise the JSON: the stored bytes are the bytes that were signed.

use std::collections::BTreeMap;

use bytes::Bytes;
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

/// A notification as read off the wire, with the exact bytes it arrived as.
#[derive(Debug, Clone, PartialEq)]
pub struct Notification {
    /// The notification id, or a stable id derived from the raw bytes when none was sent.
    pub id: String,
    /// True when `id` was derived because the notification carried none.
    pub id_derived: bool,
    pub event_type: Option<String>,
    pub tenant_id: Option<String>,
    pub relative_url: Option<String>,
    /// The entity the notification is about (see [`entity_key`]).
    pub entity_key: Option<String>,
    /// `When` as sent (kept as text: Fenergo writes 7 fractional digits).
    pub when: Option<String>,
    pub correlation_id: Option<String>,
    pub causation_id: Option<String>,
    /// The notification's own bytes: the whole body for a single delivery, the element's exact
    /// slice of the body for a batch.
    pub raw: Bytes,
}

/// Why a body is not a notification or a batch of them. Every variant means 400.
#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    #[error("body is not valid JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("body must be a JSON object or an array of objects, found {0}")]
    NotAnObject(&'static str),
    #[error("batch element {index} must be a JSON object, found {found}")]
    BatchElement { index: usize, found: &'static str },
}

/// Event type of the notifications `fenx-sync resync` queues; the worker always fetches them.
pub const RESYNC_EVENT_TYPE: &str = "fenx-sync:resync";

/// Keys that hold a batch when the body is an object wrapping an array (polling v2 uses
/// `notifications`; Fenergo's webhook batch shape is undocumented, so be lenient).
const BATCH_KEYS: [&str; 1] = ["notifications"];

/// Parses a body holding one notification, a JSON array of them, or an object wrapping an array
/// under `notifications` (any casing).
pub fn parse_body(body: &Bytes) -> Result<Vec<Notification>, ParseError> {
    let text = std::str::from_utf8(body)
        .map_err(|_| ParseError::Json(serde::de::Error::custom("body is not UTF-8")))?;
    let root: &RawValue = serde_json::from_str(text)?;
    match root.get().trim_start().as_bytes().first() {
        Some(b'[') => parse_batch(body, root),
        Some(b'{') => {
            let object: Map<String, Value> = serde_json::from_str(root.get())?;
            if let Some(inner) = batch_array(&object) {
                let wrapper: BTreeMap<String, &RawValue> = serde_json::from_str(root.get())?;
                let inner_raw = *wrapper
                    .get(inner)
                    .expect("a key of the parsed object is a key of the raw one");
                parse_batch(body, inner_raw)
            } else {
                Ok(vec![from_object(&object, body.clone())])
            }
        }
        _ => Err(ParseError::NotAnObject(kind(&serde_json::from_str(
            root.get(),
        )?))),
    }
}

fn parse_batch(body: &Bytes, array: &RawValue) -> Result<Vec<Notification>, ParseError> {
    let elements: Vec<&RawValue> = serde_json::from_str(array.get())?;
    elements
        .into_iter()
        .enumerate()
        .map(
            |(index, element)| match serde_json::from_str(element.get())? {
                Value::Object(object) => Ok(from_object(&object, slice_of(body, element))),
                other => Err(ParseError::BatchElement {
                    index,
                    found: kind(&other),
                }),
            },
        )
        .collect()
}

/// The name of the key (as written) holding the batch array, if this object is a batch wrapper.
/// An object that has an id or event type of its own is a notification, whatever else it holds.
fn batch_array(object: &Map<String, Value>) -> Option<&str> {
    if field(object, &["id"]).is_some() || field(object, &["eventtype"]).is_some() {
        return None;
    }
    object
        .iter()
        .find(|(k, v)| v.is_array() && BATCH_KEYS.iter().any(|b| k.eq_ignore_ascii_case(b)))
        .map(|(k, _)| k.as_str())
}

fn from_object(object: &Map<String, Value>, raw: Bytes) -> Notification {
    let text = |names: &[&str]| field(object, names);
    let (id, id_derived) = match text(&["id"]) {
        Some(id) if !id.is_empty() => (id, false),
        _ => (derived_id(&raw), true),
    };
    let relative_url = text(&["relativeurl", "url"]);
    Notification {
        id,
        id_derived,
        event_type: text(&["eventtype"]),
        tenant_id: text(&["tenantid"]),
        entity_key: relative_url.as_deref().and_then(entity_key),
        relative_url,
        when: text(&["when"]),
        correlation_id: text(&["correlationid"]),
        causation_id: text(&["causationid"]),
        raw,
    }
}

/// The entity a `relativeUrl` is about: its [`entity_id`], else the normalised URL itself, so
/// identical links still coalesce.
pub fn entity_key(relative_url: &str) -> Option<String> {
    if let Some(id) = entity_id(relative_url) {
        return Some(id.to_owned());
    }
    let segments = path_segments(relative_url);
    (!segments.is_empty()).then(|| segments.join("/"))
}

/// The id after an `entity/` path segment: `entitydataquery/api/entity/{id}`, also with a
/// leading slash, without the service prefix, in `/api/v2/`, or followed by `/draft/...`.
pub fn entity_id(relative_url: &str) -> Option<&str> {
    path_segments(relative_url)
        .windows(2)
        .find(|pair| pair[0].eq_ignore_ascii_case("entity"))
        .map(|pair| pair[1])
}

fn path_segments(relative_url: &str) -> Vec<&str> {
    let path = relative_url.split(['?', '#']).next().unwrap_or_default();
    path.split('/').filter(|s| !s.is_empty()).collect()
}

/// A stable id for a notification that carried none: the same bytes always give the same id, so
/// Fenergo's retries of it are de-duplicated like any other.
pub fn derived_id(raw: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(raw)))
}

/// The first of `names` present (case-insensitively) with a scalar value, as text. Strings are
/// taken as they are; numbers and booleans as their JSON text; null, objects and arrays as absent.
fn field(object: &Map<String, Value>, names: &[&str]) -> Option<String> {
    names.iter().find_map(|name| {
        object
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .and_then(|(_, v)| match v {
                Value::String(s) => Some(s.clone()),
                Value::Number(n) => Some(n.to_string()),
                Value::Bool(b) => Some(b.to_string()),
                Value::Null | Value::Array(_) | Value::Object(_) => None,
            })
    })
}

/// The exact bytes of `part`, which serde_json borrowed from `body`.
fn slice_of(body: &Bytes, part: &RawValue) -> Bytes {
    body.slice_ref(part.get().as_bytes())
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(body: &str) -> Result<Vec<Notification>, ParseError> {
        parse_body(&Bytes::copy_from_slice(body.as_bytes()))
    }

    const WEBHOOK_DOC_EXAMPLE: &str = r#"{
    "Id": "09916cea-78b8-524c-a6ad-bd7397bcd4e6",
    "TenantId": "45bf62ac-e4b1-4c16-ae32-d774cd18db6d",
    "EventType": "entitydata:created",
    "RelativeUrl": "entitydataquery/api/entity/9b22ae41-3f0a-4c68-a332-8669705ee3ec",
    "Payload": {},
    "When": "2023-11-12T17:18:55+00:00",
    "CorrelationId": "Test-CorrelationId",
    "CausationId": "c780df56-5aa8-4d64-b9fd-3560d75817c8"
  }"#;

    #[test]
    fn webhook_example_from_the_docs_parses_every_field() {
        let n = parse(WEBHOOK_DOC_EXAMPLE).unwrap().remove(0);
        assert_eq!(n.id, "09916cea-78b8-524c-a6ad-bd7397bcd4e6");
        assert!(!n.id_derived);
        assert_eq!(
            n.tenant_id.as_deref(),
            Some("45bf62ac-e4b1-4c16-ae32-d774cd18db6d")
        );
        assert_eq!(n.event_type.as_deref(), Some("entitydata:created"));
        assert_eq!(
            n.relative_url.as_deref(),
            Some("entitydataquery/api/entity/9b22ae41-3f0a-4c68-a332-8669705ee3ec")
        );
        assert_eq!(n.when.as_deref(), Some("2023-11-12T17:18:55+00:00"));
        assert_eq!(n.correlation_id.as_deref(), Some("Test-CorrelationId"));
        assert_eq!(
            n.causation_id.as_deref(),
            Some("c780df56-5aa8-4d64-b9fd-3560d75817c8")
        );
        assert_eq!(n.raw, WEBHOOK_DOC_EXAMPLE.as_bytes());
    }

    #[test]
    fn camel_case_polling_v1_url_and_odd_casing_are_read() {
        let n = parse(r#"{"id":"a","eventType":"x:y","relativeUrl":"r1"}"#).unwrap();
        assert_eq!(
            (n[0].event_type.as_deref(), n[0].relative_url.as_deref()),
            (Some("x:y"), Some("r1"))
        );
        let n = parse(r#"{"ID":"a","EVENTTYPE":"x:y","url":"r2"}"#).unwrap();
        assert_eq!(
            (n[0].event_type.as_deref(), n[0].relative_url.as_deref()),
            (Some("x:y"), Some("r2"))
        );
        let n = parse(r#"{"iD":"a","relativeURL":"r3","Url":"ignored"}"#).unwrap();
        assert_eq!(n[0].relative_url.as_deref(), Some("r3"));
    }

    #[test]
    fn ids_are_opaque_case_sensitive_and_unbounded() {
        let long = "Ab".repeat(300);
        let n = parse(&format!(r#"{{"Id":"{long}"}}"#)).unwrap();
        assert_eq!(n[0].id, long);
        let n = parse(r#"{"Id":12345}"#).unwrap();
        assert_eq!(n[0].id, "12345");
    }

    #[test]
    fn missing_id_gets_a_stable_derived_id_and_missing_type_is_kept() {
        let body = r#"{"EventType":"entitydata:created","Payload":{"x":1}}"#;
        let a = parse(body).unwrap().remove(0);
        let b = parse(body).unwrap().remove(0);
        assert!(a.id_derived);
        assert_eq!(a.id, b.id);
        assert!(a.id.starts_with("sha256:"));
        assert_ne!(
            a.id,
            parse(r#"{"EventType":"entitydata:created"}"#).unwrap()[0].id
        );
        let untyped = parse(r#"{"Id":"x"}"#).unwrap().remove(0);
        assert_eq!(untyped.event_type, None);
        let empty_id = parse(r#"{"Id":"","EventType":"a:b"}"#).unwrap().remove(0);
        assert!(empty_id.id_derived);
    }

    #[test]
    fn arrays_and_wrapped_batches_keep_each_elements_exact_bytes() {
        let body = r#"[ {"Id":"1", "EventType":"a:b"},{"Id":"2"} ]"#;
        let n = parse(body).unwrap();
        assert_eq!(n.len(), 2);
        assert_eq!(n[0].raw, r#"{"Id":"1", "EventType":"a:b"}"#.as_bytes());
        assert_eq!(n[1].raw, r#"{"Id":"2"}"#.as_bytes());

        let wrapped = r#"{"batchId":"1642925639481","Notifications":[{"id":"3"},{"id":"4"}],"moreAvailable":false}"#;
        let ids: Vec<String> = parse(wrapped).unwrap().into_iter().map(|n| n.id).collect();
        assert_eq!(ids, ["3", "4"]);
        assert!(parse("[]").unwrap().is_empty());
    }

    #[test]
    fn a_notification_with_an_array_field_named_notifications_is_not_a_batch() {
        let n = parse(r#"{"Id":"n1","Payload":{},"notifications":[1,2]}"#).unwrap();
        assert_eq!(n.len(), 1);
        assert_eq!(n[0].id, "n1");
    }

    #[test]
    fn unknown_fields_and_non_ascii_escapes_are_kept_in_the_raw_bytes() {
        let body = r#"{"Id":"x","Future":{"a":[1]},"Name":"Caf\u00e9"}"#;
        let n = parse(body).unwrap();
        assert_eq!(n[0].raw, body.as_bytes());
    }

    #[test]
    fn entity_keys_come_from_the_link_in_any_of_its_shapes() {
        for (url, want) in [
            ("entitydataquery/api/entity/9b22ae41", Some("9b22ae41")),
            ("/api/entity/12345", Some("12345")),
            ("entitydataquery/api/entity/AbC/draft/d-1", Some("AbC")),
            ("entitydataquery/api/v2/entity/e-2?x=1", Some("e-2")),
            (
                "screeningquery/api/batch/77",
                Some("screeningquery/api/batch/77"),
            ),
            ("//", None),
            ("", None),
        ] {
            assert_eq!(entity_key(url).as_deref(), want, "{url}");
        }
        let n = parse(r#"{"Id":"1","RelativeUrl":"entitydataquery/api/entity/E-9"}"#).unwrap();
        assert_eq!(n[0].entity_key.as_deref(), Some("E-9"));
    }

    #[test]
    fn arbitrary_bytes_never_panic_and_parsed_raw_bytes_are_slices_of_the_body() {
        let mut rng = fastrand::Rng::with_seed(7);
        let pieces: [&[u8]; 12] = [
            b"{",
            b"}",
            b"[",
            b"]",
            b",",
            b":",
            b"\"Id\"",
            b"\"notifications\"",
            b"\"x\"",
            b"1",
            b"null",
            b"\xff",
        ];
        for _ in 0..20_000 {
            let body: Vec<u8> = (0..rng.usize(0..24))
                .flat_map(|_| pieces[rng.usize(..pieces.len())].iter().copied())
                .collect();
            let body = Bytes::from(body);
            if let Ok(notifications) = parse_body(&body) {
                let whole = body.as_ptr_range();
                for n in notifications {
                    let raw = n.raw.as_ptr_range();
                    assert!(whole.start <= raw.start && raw.end <= whole.end);
                }
            }
        }
    }

    #[test]
    fn malformed_bodies_are_clear_errors() {
        for (body, want) in [
            ("", "not valid JSON"),
            ("{", "not valid JSON"),
            (r#"{"Id":"1"} trailing"#, "not valid JSON"),
            ("\"text\"", "found a string"),
            ("42", "found a number"),
            ("null", "found null"),
            (
                r#"[{"Id":"1"}, 7]"#,
                "batch element 1 must be a JSON object, found a number",
            ),
        ] {
            let err = parse(body).unwrap_err().to_string();
            assert!(err.contains(want), "{body:?}: {err}");
        }
        let err = parse_body(&Bytes::from_static(b"{\"Id\":\"\xff\"}")).unwrap_err();
        assert!(err.to_string().contains("UTF-8"));
    }
}
