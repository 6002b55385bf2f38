//! Fenergo's JSON shapes as the simulator writes them: the `{"data", "messages"}` envelope, the
//! EntityDto (contract §6, field order as in Fenergo's generated client), a page of the entity
//! list and its opaque cursor, the notification in its PascalCase webhook shape and camelCase
//! polling v2 shape (§3), a polling batch (§5), Fenergo's 7-digit timestamps, and realistic
//! sample entities.
//!
//! Everything here is a pure function of its arguments (seeded randomness included), so a seed
//! and an index always give the same entity. It must never touch the simulator's shared state,
//! do I/O, or read the clock except where a timestamp is the point.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::{Map, Value, json};

/// The suffix Fenergo writes on notification `When` values.
pub(super) const OFFSET_SUFFIX: &str = "+00:00";
/// The suffix Fenergo writes on `X-Rate-Limit-Reset` values.
pub(super) const ZULU_SUFFIX: &str = "Z";

/// Data group and custom type ids identify a tenant's configuration, so they are the same on
/// every entity (unlike row ids).
const ADDRESS_DATA_GROUP_ID: &str = "8c3f4a52-6f0e-4d59-9a5e-2b7d1c0e9f41";
const REGULATORY_STATUS_TYPE_ID: &str = "0f6d2c8e-3b1a-4e7f-8c5d-9a2b4e6f1d30";
const SUPERVISION_TYPE_ID: &str = "5a9e7c1d-2f4b-4a8e-b6c3-1d0f8e2a7b95";
const PEP_STATUS_TYPE_ID: &str = "c2b8e4f6-7a1d-4c3e-9f5b-8e0a6d2c4b17";
const SCREENING_RESULT_TYPE_ID: &str = "e7a3d9b1-4c6f-4e2a-8d0b-3f5c7a9e1b62";

const COMPANY_WORDS: [&str; 10] = [
    "Atlantic",
    "Harbour",
    "Meridian",
    "Northwind",
    "Silverline",
    "Kestrel",
    "Bluewater",
    "Granite",
    "Liffey",
    "Zürich Alpine",
];
const COMPANY_TRADES: [&str; 8] = [
    "Holdings",
    "Capital",
    "Trading",
    "Logistics",
    "Partners",
    "Asset Management",
    "Shipping",
    "Technologies",
];
const LEGAL_FORMS: [&str; 6] = ["Ltd", "PLC", "GmbH", "S.A.", "LLC", "DAC"];
const FIRST_NAMES: [&str; 10] = [
    "Aoife", "Liam", "Sofia", "Mateo", "Chloé", "Jonas", "Priya", "Kenji", "Fatima", "Seán",
];
const LAST_NAMES: [&str; 10] = [
    "Murphy",
    "O'Brien",
    "Müller",
    "García",
    "Nakamura",
    "Okafor",
    "Rossi",
    "Dubois",
    "Kowalski",
    "Ní Bhriain",
];
/// (country, city, postal code, street, regulator)
const PLACES: [(&str, &str, &str, &str, &str); 7] = [
    (
        "Ireland",
        "Dublin",
        "D02 X285",
        "Harcourt Street",
        "Central Bank of Ireland",
    ),
    (
        "United Kingdom",
        "London",
        "EC2V 7HH",
        "King William Street",
        "Financial Conduct Authority",
    ),
    (
        "Germany",
        "Frankfurt am Main",
        "60311",
        "Neue Mainzer Straße",
        "BaFin",
    ),
    ("Switzerland", "Zürich", "8001", "Bahnhofstrasse", "FINMA"),
    (
        "Luxembourg",
        "Luxembourg",
        "L-1855",
        "Boulevard Royal",
        "CSSF",
    ),
    ("United States", "New York", "10005", "Wall Street", "SEC"),
    (
        "Singapore",
        "Singapore",
        "048583",
        "Raffles Place",
        "Monetary Authority of Singapore",
    ),
];
const RISK_CATEGORIES: [(&str, u8); 4] =
    [("Low", 1), ("Medium", 2), ("High", 3), ("Unacceptable", 4)];
const JOURNEY_TYPES: [&str; 3] = [
    "Client Onboarding",
    "Periodic Review",
    "Maintenance Request",
];
const BUSINESS_LAYERS: [&str; 3] = ["Corporate Banking", "Wealth Management", "Markets"];

/// A sample entity: what to store, before the store gives it a version.
pub(super) struct Sample {
    pub id: String,
    pub entity_type: &'static str,
    pub properties: Value,
}

/// What the store knows about one version of an entity.
pub(super) struct Snapshot<'a> {
    pub id: &'a str,
    pub entity_type: &'a str,
    pub version: i64,
    pub created: DateTime<Utc>,
    pub properties: &'a Value,
}

/// What comes before and after already-serialised `data` in a success envelope.
const DATA_OPEN: &[u8] = b"{\"data\":";
const DATA_CLOSE: &[u8] = b",\"messages\":[]}";

/// One entity version, serialised once when it is stored: the body a GET serves, and the
/// EntityDto inside it, which list pages splice in without serialising it again.
#[derive(Clone)]
pub(super) struct EntityJson {
    pub envelope: Bytes,
    /// A slice of `envelope` (the buffer is shared, not copied).
    pub dto: Bytes,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct EntityDto<'a> {
    id: &'a str,
    #[serde(rename = "type")]
    entity_type: &'a str,
    properties: &'a Value,
    risk: Value,
    role: Value,
    /// Fenergo's `EntityStatus` enum is serialised as a number; 1 is what verified entities
    /// carry in the examples we have.
    status: u8,
    created: String,
    alternate_id: String,
    journeys: Value,
    access_layers: Value,
    in_scope_jurisdictions: Value,
    offboarded_jurisdictions: Vec<Value>,
    version: i64,
}

/// One event notification. Serialised as it is, it has the polling v2 shape: camelCase keys in
/// the schema's order (contract §3).
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct Notification {
    pub id: String,
    pub event_type: String,
    when: String,
    tenant_id: String,
    causation_id: String,
    correlation_id: String,
    relative_url: String,
    payload: Map<String, Value>,
}

/// The webhook body's view of a [`Notification`]: PascalCase keys in the documented order.
#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct WebhookNotification<'a> {
    id: &'a str,
    tenant_id: &'a str,
    event_type: &'a str,
    relative_url: &'a str,
    payload: &'a Map<String, Value>,
    when: &'a str,
    correlation_id: &'a str,
    causation_id: &'a str,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Batch<'a> {
    batch_id: &'a str,
    notifications: Vec<&'a Notification>,
    more_available: bool,
}

/// The 200 body for one entity version, `{"data": EntityDto, "messages": []}`, and its DTO.
pub(super) fn entity_json(snapshot: &Snapshot<'_>) -> EntityJson {
    // Risk, role and the other metadata are stable per entity id, as they would be across
    // versions of a real entity.
    let mut rng = fastrand::Rng::with_seed(hash_of(snapshot.id));
    let (risk_category, risk_level) = pick(&mut rng, &RISK_CATEGORIES);
    let (country, ..) = pick(&mut rng, &PLACES);
    let role = if snapshot.entity_type == "Individual" {
        "Related Party"
    } else {
        "Client"
    };
    let dto = EntityDto {
        id: snapshot.id,
        entity_type: snapshot.entity_type,
        properties: snapshot.properties,
        risk: json!({ "riskCategory": risk_category, "riskLevel": risk_level }),
        role: json!({ "name": role }),
        status: 1,
        created: fenergo_timestamp(snapshot.created, ZULU_SUFFIX),
        alternate_id: format!("CRM-{:08}", rng.u32(..100_000_000)),
        journeys: json!([{
            "journeyType": pick(&mut rng, &JOURNEY_TYPES),
            "journeyId": uuid_v4(&mut rng),
            "journeyStatus": "Completed",
        }]),
        access_layers: json!({
            "geographic": [country],
            "businessRelated": [pick(&mut rng, &BUSINESS_LAYERS)],
        }),
        in_scope_jurisdictions: json!([
            { "jurisdiction": "Global", "versionId": uuid_v4(&mut rng) },
            { "jurisdiction": country, "versionId": uuid_v4(&mut rng) },
        ]),
        offboarded_jurisdictions: Vec::new(),
        version: snapshot.version,
    };
    let dto = serde_json::to_vec(&dto).expect("an EntityDto has only string keys");
    let envelope = success_envelope(&dto);
    let dto = envelope.slice(DATA_OPEN.len()..DATA_OPEN.len() + dto.len());
    EntityJson { envelope, dto }
}

/// A page of the entity list: `{"data": {"items", "totalItems", "searchAfter"}, "messages": []}`,
/// where `searchAfter` is the cursor after `last_id`, or null when this was the last page.
/// Fenergo's shape is not documented (contract §6); this is the project's assumption.
/// The answer of the bulk read by id: `{"data": [EntityDto, …], "messages": []}`.
pub(super) fn entity_list_body(items: &[Bytes]) -> Bytes {
    [
        b"{\"data\":[".as_slice(),
        &items.join(b",".as_slice()),
        b"],\"messages\":[]}",
    ]
    .concat()
    .into()
}

pub(super) fn entity_page_body(
    items: &[Bytes],
    total_items: usize,
    last_id: Option<&str>,
) -> Bytes {
    let cursor =
        serde_json::to_string(&last_id.map(cursor_after)).expect("a cursor is a plain string");
    let data = [
        b"{\"items\":[".as_slice(),
        &items.join(b",".as_slice()),
        format!("],\"totalItems\":{total_items},\"searchAfter\":{cursor}}}").as_bytes(),
    ]
    .concat();
    success_envelope(&data)
}

/// The opaque `searchAfter` cursor for the page after entity `id`. Base64 keeps clients from
/// building cursors themselves, which Fenergo's would not allow either.
pub(super) fn cursor_after(id: &str) -> String {
    URL_SAFE_NO_PAD.encode(id)
}

/// The entity id a cursor from [`cursor_after`] stands for; `None` for anything else.
pub(super) fn cursor_position(cursor: &str) -> Option<String> {
    let bytes = URL_SAFE_NO_PAD.decode(cursor).ok()?;
    String::from_utf8(bytes).ok()
}

/// `{"data": <data>, "messages": []}` around JSON that is already serialised.
fn success_envelope(data: &[u8]) -> Bytes {
    Bytes::from([DATA_OPEN, data, DATA_CLOSE].concat())
}

/// An error body in Fenergo's envelope: `{"data": null, "messages": [{message, type}]}`, where
/// `kind` is one of Info, Warning, Error, Forbidden.
pub(super) fn error_envelope(message: &str, kind: &str) -> Value {
    json!({ "data": null, "messages": [{ "message": message, "type": kind }] })
}

impl Notification {
    /// A fresh notification (new id, correlation and causation ids) about `entity_id`, saying
    /// it happened `when`.
    pub(super) fn new(
        rng: &mut fastrand::Rng,
        tenant_id: &str,
        event_type: &str,
        entity_id: &str,
        when: DateTime<Utc>,
    ) -> Notification {
        Notification {
            id: uuid_v4(rng),
            event_type: event_type.to_owned(),
            when: fenergo_timestamp(when, OFFSET_SUFFIX),
            tenant_id: tenant_id.to_owned(),
            correlation_id: uuid_v4(rng),
            causation_id: uuid_v4(rng),
            relative_url: format!("entitydataquery/api/entity/{entity_id}"),
            payload: Map::new(),
        }
    }

    /// The webhook body: Fenergo's PascalCase shape, keys in the documented order.
    pub(super) fn webhook_body(&self) -> String {
        let body = WebhookNotification {
            id: &self.id,
            tenant_id: &self.tenant_id,
            event_type: &self.event_type,
            relative_url: &self.relative_url,
            payload: &self.payload,
            when: &self.when,
            correlation_id: &self.correlation_id,
            causation_id: &self.causation_id,
        };
        serde_json::to_string(&body).expect("a notification has only string keys")
    }
}

/// A polling v2 batch: `{"batchId", "notifications": [...], "moreAvailable"}`.
pub(super) fn batch_body(
    batch_id: &str,
    notifications: &[Arc<Notification>],
    more_available: bool,
) -> Bytes {
    let batch = Batch {
        batch_id,
        notifications: notifications.iter().map(Arc::as_ref).collect(),
        more_available,
    };
    Bytes::from(serde_json::to_vec(&batch).expect("a batch has only string keys"))
}

/// `2021-05-05T10:19:17.3157953` plus `suffix`: Fenergo writes 7 fractional digits, which
/// chrono's format strings cannot.
pub(super) fn fenergo_timestamp(at: DateTime<Utc>, suffix: &str) -> String {
    let ticks = at.timestamp_subsec_nanos().min(999_999_999) / 100;
    format!("{}.{ticks:07}{suffix}", at.format("%Y-%m-%dT%H:%M:%S"))
}

/// A random RFC 4122 version-4 UUID string, the shape of every Fenergo id.
pub(super) fn uuid_v4(rng: &mut fastrand::Rng) -> String {
    let mut bytes = [0u8; 16];
    rng.fill(&mut bytes);
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    let hex = hex::encode(bytes);
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

/// The sample entity for `(seed, index)`: a Company, or an Individual for every odd index, with
/// Single, Collection (two address rows) and nested Custom properties.
pub(super) fn sample(seed: u64, index: usize) -> Sample {
    let mut rng =
        fastrand::Rng::with_seed(seed ^ (index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let id = uuid_v4(&mut rng);
    let mut props = Properties::default();
    let entity_type = if index.is_multiple_of(2) {
        company(&mut rng, &mut props);
        "Company"
    } else {
        individual(&mut rng, &mut props);
        "Individual"
    };
    Sample {
        id,
        entity_type,
        properties: Value::Object(props.into_map()),
    }
}

fn company(rng: &mut fastrand::Rng, props: &mut Properties) {
    let name = format!(
        "{} {} {}",
        pick(rng, &COMPANY_WORDS),
        pick(rng, &COMPANY_TRADES),
        pick(rng, &LEGAL_FORMS)
    );
    let (country, city, postcode, street, regulator) = pick(rng, &PLACES);
    props.single("legalEntityName", &name);
    props.single("countryOfIncorporation", country);
    props.single("registrationNumber", &rng.u32(100_000..999_999).to_string());
    props.single("dateOfIncorporation", &past_date(rng));
    props.single("lei", &lei(rng));
    let addresses = [
        address_row("Registered Address", rng, street, city, postcode, country),
        address_row(
            "Principal Place of Business",
            rng,
            street,
            city,
            postcode,
            country,
        ),
    ];
    props.collection("addresses", rng, &addresses);
    let supervision = Properties::default()
        .with_single("supervisedSince", &past_date(rng))
        .with_single("supervisionType", "Prudential");
    let regulatory = Properties::default()
        .with_single("regulator", regulator)
        .with_single("licenceNumber", &format!("C{}", rng.u32(10_000..99_999)))
        .with_custom(
            "supervision",
            SUPERVISION_TYPE_ID,
            "Prudential",
            supervision,
        );
    props.custom(
        "regulatoryStatus",
        REGULATORY_STATUS_TYPE_ID,
        "Regulated",
        regulatory,
    );
}

fn individual(rng: &mut fastrand::Rng, props: &mut Properties) {
    let (country, city, postcode, street, _) = pick(rng, &PLACES);
    props.single("firstName", pick(rng, &FIRST_NAMES));
    props.single("lastName", pick(rng, &LAST_NAMES));
    props.single("dateOfBirth", &past_date(rng));
    props.single("nationality", pick(rng, &PLACES).0);
    props.single("countryOfResidence", country);
    let addresses = [
        address_row("Residential", rng, street, city, postcode, country),
        address_row("Correspondence", rng, street, city, postcode, country),
    ];
    props.collection("addresses", rng, &addresses);
    let result = Properties::default()
        .with_single("matches", "0")
        .with_single("outcome", "Clear");
    let pep = Properties::default()
        .with_single("screenedOn", &past_date(rng))
        .with_single("screeningProvider", "World-Check")
        .with_custom("screeningResult", SCREENING_RESULT_TYPE_ID, "Clear", result);
    props.custom("pepStatus", PEP_STATUS_TYPE_ID, "Not a PEP", pep);
}

fn address_row(
    kind: &str,
    rng: &mut fastrand::Rng,
    street: &str,
    city: &str,
    postcode: &str,
    country: &str,
) -> Map<String, Value> {
    [
        ("addressType", kind.to_owned()),
        ("addressLine1", format!("{} {street}", rng.u8(1..200))),
        ("city", city.to_owned()),
        ("postalCode", postcode.to_owned()),
        ("country", country.to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), Value::String(v)))
    .collect()
}

/// Builds a PropertyDto map. Real responses carry a `discriminator` key on some properties and
/// not on others, so it is put on every other property this builder makes.
#[derive(Default)]
struct Properties {
    map: Map<String, Value>,
    tagged: bool,
}

impl Properties {
    fn single(&mut self, name: &str, value: &str) {
        self.insert(name, "Single", json!({ "type": "Single", "value": value }));
    }

    fn collection(&mut self, name: &str, rng: &mut fastrand::Rng, rows: &[Map<String, Value>]) {
        let collections: Map<String, Value> = rows
            .iter()
            .map(|row| (uuid_v4(rng), json!({ "properties": row })))
            .collect();
        let dto = json!({
            "type": "Collection",
            "dataGroupId": ADDRESS_DATA_GROUP_ID,
            "dataGroupVersionNumber": 3,
            "collections": collections,
        });
        self.insert(name, "Collection", dto);
    }

    fn custom(&mut self, name: &str, type_id: &str, value: &str, nested: Properties) {
        let dto = json!({
            "type": "Custom",
            "customTypeId": type_id,
            "value": value,
            "properties": nested.into_map(),
        });
        self.insert(name, "Custom", dto);
    }

    fn with_single(mut self, name: &str, value: &str) -> Properties {
        self.single(name, value);
        self
    }

    fn with_custom(
        mut self,
        name: &str,
        type_id: &str,
        value: &str,
        nested: Properties,
    ) -> Properties {
        self.custom(name, type_id, value, nested);
        self
    }

    fn insert(&mut self, name: &str, kind: &str, mut dto: Value) {
        if self.tagged
            && let Some(object) = dto.as_object_mut()
        {
            object.insert("discriminator".to_owned(), Value::from(kind));
        }
        self.tagged = !self.tagged;
        self.map.insert(name.to_owned(), dto);
    }

    fn into_map(self) -> Map<String, Value> {
        self.map
    }
}

fn pick<T: Copy>(rng: &mut fastrand::Rng, items: &[T]) -> T {
    items[rng.usize(..items.len())]
}

fn past_date(rng: &mut fastrand::Rng) -> String {
    format!(
        "{}-{:02}-{:02}",
        rng.u16(1950..2020),
        rng.u8(1..=12),
        rng.u8(1..=28)
    )
}

/// A 20-character LEI-shaped code (ISO 17442 layout; the check digits are not computed).
fn lei(rng: &mut fastrand::Rng) -> String {
    let body: String = (0..16)
        .map(|_| rng.alphanumeric().to_ascii_uppercase())
        .collect();
    format!("5493{body}")
}

fn hash_of(text: &str) -> u64 {
    let mut hasher = DefaultHasher::new();
    text.hash(&mut hasher);
    hasher.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kinds(properties: &Value) -> Vec<&str> {
        properties
            .as_object()
            .unwrap()
            .values()
            .map(|p| p["type"].as_str().unwrap())
            .collect()
    }

    #[test]
    fn samples_are_deterministic_per_seed_and_index() {
        let a = sample(7, 3);
        let b = sample(7, 3);
        assert_eq!(
            (a.id.as_str(), &a.properties),
            (b.id.as_str(), &b.properties)
        );
        assert_ne!(sample(7, 4).id, a.id);
        assert_ne!(sample(8, 3).id, a.id);
    }

    #[test]
    fn samples_have_every_property_shape_with_and_without_discriminator() {
        for (index, entity_type) in [(0, "Company"), (1, "Individual")] {
            let s = sample(1, index);
            assert_eq!(s.entity_type, entity_type);
            let kinds = kinds(&s.properties);
            for kind in ["Single", "Collection", "Custom"] {
                assert!(kinds.contains(&kind), "{entity_type} lacks {kind}");
            }
            let props = s.properties.as_object().unwrap();
            let tagged = props
                .values()
                .filter(|p| p.get("discriminator").is_some())
                .count();
            assert!(
                tagged > 0 && tagged < props.len(),
                "{tagged} of {}",
                props.len()
            );
            let addresses = &props["addresses"]["collections"];
            assert_eq!(addresses.as_object().unwrap().len(), 2);
            for row in addresses.as_object().unwrap().values() {
                assert!(row["properties"]["city"].is_string());
            }
            let custom = props.values().find(|p| p["type"] == "Custom").unwrap();
            let nested = custom["properties"].as_object().unwrap();
            assert!(
                nested.values().any(|p| p["type"] == "Custom"),
                "nested Custom"
            );
        }
    }

    #[test]
    fn timestamps_have_seven_fractional_digits() {
        let at: DateTime<Utc> = "2021-05-05T10:19:17.315795312Z".parse().unwrap();
        assert_eq!(
            fenergo_timestamp(at, OFFSET_SUFFIX),
            "2021-05-05T10:19:17.3157953+00:00"
        );
        let whole: DateTime<Utc> = "2024-04-09T10:55:30Z".parse().unwrap();
        assert_eq!(
            fenergo_timestamp(whole, ZULU_SUFFIX),
            "2024-04-09T10:55:30.0000000Z"
        );
    }

    #[test]
    fn uuids_have_the_version_4_layout() {
        let mut rng = fastrand::Rng::with_seed(1);
        let id = uuid_v4(&mut rng);
        let groups: Vec<usize> = id.split('-').map(str::len).collect();
        assert_eq!(groups, [8, 4, 4, 4, 12]);
        assert_eq!(&id[14..15], "4");
        assert!("89ab".contains(&id[19..20]));
        assert_ne!(uuid_v4(&mut rng), id);
    }

    /// The top-level keys of a JSON object, in the order they were written.
    fn keys_in_order(body: &str) -> Vec<&str> {
        body.split('"')
            .collect::<Vec<_>>()
            .windows(2)
            .filter(|w| w[1].starts_with(':'))
            .map(|w| w[0])
            .collect()
    }

    fn new_notification(rng: &mut fastrand::Rng, event_type: &str, entity: &str) -> Notification {
        Notification::new(rng, "tenant-1", event_type, entity, Utc::now())
    }

    #[test]
    fn webhook_notifications_are_pascal_case_in_the_documented_order() {
        let mut rng = fastrand::Rng::with_seed(1);
        let body = new_notification(&mut rng, "entitydata:created", "e-1").webhook_body();
        assert_eq!(
            keys_in_order(&body),
            [
                "Id",
                "TenantId",
                "EventType",
                "RelativeUrl",
                "Payload",
                "When",
                "CorrelationId",
                "CausationId"
            ]
        );
        let parsed: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(parsed["RelativeUrl"], "entitydataquery/api/entity/e-1");
        assert_eq!(parsed["Payload"], json!({}));
        let when = parsed["When"].as_str().unwrap();
        assert!(when.ends_with("+00:00") && when.len() == 33, "{when}");
        assert!(DateTime::parse_from_rfc3339(when).is_ok());
        let again = new_notification(&mut rng, "entitydata:created", "e-1").webhook_body();
        let again: Value = serde_json::from_str(&again).unwrap();
        assert_ne!(again["Id"], parsed["Id"]);
    }

    #[test]
    fn polled_notifications_are_the_same_notification_in_camel_case() {
        let mut rng = fastrand::Rng::with_seed(1);
        let notification = new_notification(&mut rng, "journey:taskcompleted", "e-2");
        let polled = serde_json::to_string(&notification).unwrap();
        assert_eq!(
            keys_in_order(&polled),
            [
                "id",
                "eventType",
                "when",
                "tenantId",
                "causationId",
                "correlationId",
                "relativeUrl",
                "payload"
            ]
        );
        let polled: Value = serde_json::from_str(&polled).unwrap();
        let webhook: Value = serde_json::from_str(&notification.webhook_body()).unwrap();
        for (camel, pascal) in [
            ("id", "Id"),
            ("when", "When"),
            ("tenantId", "TenantId"),
            ("causationId", "CausationId"),
            ("correlationId", "CorrelationId"),
            ("relativeUrl", "RelativeUrl"),
            ("payload", "Payload"),
        ] {
            assert_eq!(polled[camel], webhook[pascal], "{camel}");
        }
    }

    #[test]
    fn a_batch_has_the_walkthroughs_shape() {
        let mut rng = fastrand::Rng::with_seed(4);
        let notification = Arc::new(new_notification(&mut rng, "entitydata:created", "e"));
        let body = batch_body("1642925639481", &[notification], false);
        let text = std::str::from_utf8(&body).unwrap();
        assert_eq!(
            keys_in_order(text)[..2],
            ["batchId", "notifications"],
            "{text}"
        );
        let parsed: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(parsed["batchId"], "1642925639481");
        assert_eq!(parsed["moreAvailable"], false);
        assert_eq!(
            parsed["notifications"][0]["eventType"],
            "entitydata:created"
        );
    }

    #[test]
    fn entity_json_is_one_serialisation_shared_by_the_get_body_and_list_pages() {
        let s = sample(5, 1);
        let entity = entity_json(&Snapshot {
            id: &s.id,
            entity_type: s.entity_type,
            version: 2,
            created: Utc::now(),
            properties: &s.properties,
        });
        let envelope: Value = serde_json::from_slice(&entity.envelope).unwrap();
        let dto: Value = serde_json::from_slice(&entity.dto).unwrap();
        assert_eq!(envelope, json!({ "data": dto, "messages": [] }));

        let page = entity_page_body(&[entity.dto.clone(), entity.dto], 7, Some(&s.id));
        let page: Value = serde_json::from_slice(&page).unwrap();
        assert_eq!(page["messages"], json!([]));
        assert_eq!(page["data"]["items"], json!([dto, dto]));
        assert_eq!(page["data"]["totalItems"], 7);
        let cursor = page["data"]["searchAfter"].as_str().unwrap();
        assert_ne!(cursor, s.id, "opaque");
        assert_eq!(cursor_position(cursor), Some(s.id));

        let last: Value = serde_json::from_slice(&entity_page_body(&[], 0, None)).unwrap();
        assert_eq!(
            last,
            json!({ "data": { "items": [], "totalItems": 0, "searchAfter": null }, "messages": [] })
        );
        for bad in ["not base64!", "/w", "_w"] {
            assert_eq!(cursor_position(bad), None, "{bad}");
        }
    }
}
