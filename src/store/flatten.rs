//! Flattening of an EntityDto's `properties` map into the rows of `entity_property` and
//! `entity_collection`, so analysts can filter on property values without JSON functions, and
//! into the [`Summary`] columns of `entity` that `current_entity` shows.
//!
//! Each value is kept as text and, where it reads as one, also as a number, a boolean and a
//! date ([`Typed`]), so analysts compare and sum without CAST.
//!
//! Pure: it never touches the database, never fails, never panics and never discards an entity.
//! Shapes it does not recognise are flattened by what they look like; the full JSON is kept in
//! `entity.json` regardless, so nothing is lost when a guess is imperfect.

use chrono::NaiveDate;
use serde_json::{Map, Value};

/// One `entity_property` row.
#[derive(Debug, Clone, PartialEq)]
pub struct PropertyRow {
    /// Dotted path for properties nested in Custom properties: `registeredAddress.city`.
    pub name: String,
    pub value: Option<String>,
    pub typed: Typed,
    pub value_type: ValueType,
}

/// A value's typed readings (`value_number`, `value_bool`, `value_date`); `None` where the value
/// does not read as that type.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Typed {
    /// A JSON number, or text that is one (`"42"`, `"1.5e3"`; not `"00123"`, which JSON
    /// forbids, so registration numbers stay text).
    pub number: Option<f64>,
    /// A JSON boolean, or the text `true`/`false` in any case (.NET writes `True`).
    pub boolean: Option<bool>,
    /// A date (`1980-03-04`) or a date and time (`1980-03-04T00:00:00Z`): the date as written.
    pub date: Option<NaiveDate>,
}

impl Typed {
    /// The typed readings of a stored text value (see [`text`]).
    pub fn of(text: Option<&str>) -> Typed {
        // ASCII whitespace only, as the view `entity_collection` trims it in PostgreSQL
        // (schema.postgres.sql, migration 5), so both readings of a boolean agree.
        let Some(text) = text.map(|t| t.trim_matches(|c: char| c.is_ascii_whitespace())) else {
            return Typed::default();
        };
        let number = serde_json::from_str::<serde_json::Number>(text)
            .ok()
            .and_then(|n| n.as_f64())
            .filter(|n| n.is_finite());
        let boolean = match text.to_ascii_lowercase().as_str() {
            "true" => Some(true),
            "false" => Some(false),
            _ => None,
        };
        let date = text
            .get(..10)
            .filter(|_| text.len() == 10 || crate::time::parse(text).is_some())
            .and_then(|day| NaiveDate::parse_from_str(day, "%Y-%m-%d").ok());
        Typed {
            number,
            boolean,
            date,
        }
    }
}

/// The most used properties, kept as columns of the entity row so that grouping and filtering on
/// them (companies by country, individuals by date of birth) is an index scan rather than a
/// property lookup per entity.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Summary {
    pub legal_entity_name: Option<String>,
    pub country_of_incorporation: Option<String>,
    pub registration_number: Option<String>,
    pub first_name: Option<String>,
    pub last_name: Option<String>,
    pub date_of_birth: Option<NaiveDate>,
    pub entity_status: Option<String>,
    /// The entity's `risk.riskCategory` and `risk.riskLevel` as the JSON has them (SQLite keeps
    /// their type, as `json_extract` reads it; PostgreSQL their [`text`], as `->>` does).
    pub risk_category: Option<Value>,
    pub risk_level: Option<Value>,
}

impl Summary {
    /// Picks the summary out of an entity's flattened `properties` and its EntityDto `json`.
    pub fn of(properties: &[PropertyRow], json: &Value) -> Summary {
        let find = |name: &str| properties.iter().find(|p| p.name == name);
        let value = |name: &str| find(name).and_then(|p| p.value.clone());
        let risk = |field: &str| {
            json.get("risk")
                .and_then(|r| r.get(field))
                .filter(|v| !v.is_null())
                .cloned()
        };
        Summary {
            legal_entity_name: value("legalEntityName"),
            country_of_incorporation: value("countryOfIncorporation"),
            registration_number: value("registrationNumber"),
            first_name: value("firstName"),
            last_name: value("lastName"),
            date_of_birth: find("dateOfBirth").and_then(|p| p.typed.date),
            entity_status: value("entityStatus"),
            risk_category: risk("riskCategory"),
            risk_level: risk("riskLevel"),
        }
    }
}

/// Which kind of property a `PropertyRow` came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueType {
    Single,
    /// The top-level `value` of a Custom property itself (its children are rows of their own).
    Custom,
}

impl ValueType {
    pub fn as_str(self) -> &'static str {
        match self {
            ValueType::Single => "Single",
            ValueType::Custom => "Custom",
        }
    }
}

/// One `entity_collection` row: one field of one data group row.
#[derive(Debug, Clone, PartialEq)]
pub struct CollectionRow {
    /// The data group property name, dotted when nested in a Custom property.
    pub property: String,
    pub row_id: String,
    pub field: String,
    pub value: Option<String>,
    pub typed: Typed,
}

impl PropertyRow {
    fn new(name: String, value: Option<String>, value_type: ValueType) -> PropertyRow {
        PropertyRow {
            typed: Typed::of(value.as_deref()),
            name,
            value,
            value_type,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Single,
    Custom,
    Collection,
}

/// Flattens an EntityDto `properties` object. Anything that is not an object yields no rows.
pub fn flatten(properties: &Value) -> (Vec<PropertyRow>, Vec<CollectionRow>) {
    let mut rows = (Vec::new(), Vec::new());
    if let Value::Object(map) = properties {
        flatten_into(map, "", &mut rows);
    }
    rows
}

fn flatten_into(
    map: &Map<String, Value>,
    prefix: &str,
    rows: &mut (Vec<PropertyRow>, Vec<CollectionRow>),
) {
    for (key, property) in map {
        let name = format!("{prefix}{key}");
        // A bare value where a PropertyDto was expected is still the property's value.
        let Value::Object(dto) = property else {
            rows.0
                .push(PropertyRow::new(name, text(property), ValueType::Single));
            continue;
        };
        match kind(dto) {
            Kind::Single => rows.0.push(PropertyRow::new(
                name,
                dto.get("value").and_then(text),
                ValueType::Single,
            )),
            Kind::Custom => {
                // Custom properties usually carry `"value": null` next to their children; a row
                // for every such null would only be noise.
                if let Some(value) = dto.get("value").and_then(text) {
                    rows.0.push(PropertyRow::new(
                        name.clone(),
                        Some(value),
                        ValueType::Custom,
                    ));
                }
                if let Some(Value::Object(children)) = dto.get("properties") {
                    flatten_into(children, &format!("{name}."), rows);
                }
            }
            Kind::Collection => collection_rows(&name, dto.get("collections"), &mut rows.1),
        }
    }
}

/// The declared kind (`type`, else `discriminator`), or the one the shape suggests.
fn kind(dto: &Map<String, Value>) -> Kind {
    let declared = ["type", "discriminator"].iter().find_map(|key| {
        let name = dto.get(*key)?.as_str()?;
        [
            ("Single", Kind::Single),
            ("Custom", Kind::Custom),
            ("Collection", Kind::Collection),
        ]
        .into_iter()
        .find(|(known, _)| name.eq_ignore_ascii_case(known))
        .map(|(_, kind)| kind)
    });
    declared.unwrap_or(if dto.contains_key("collections") {
        Kind::Collection
    } else if dto.contains_key("properties") {
        Kind::Custom
    } else {
        Kind::Single
    })
}

/// Data group rows are a map keyed by row id; an array is accepted too, keyed by position.
fn collection_rows(property: &str, collections: Option<&Value>, out: &mut Vec<CollectionRow>) {
    let rows: Vec<(String, &Value)> = match collections {
        Some(Value::Object(map)) => map.iter().map(|(id, row)| (id.clone(), row)).collect(),
        Some(Value::Array(list)) => list
            .iter()
            .enumerate()
            .map(|(i, row)| (i.to_string(), row))
            .collect(),
        _ => return,
    };
    for (row_id, row) in rows {
        let Value::Object(row) = row else { continue };
        // The contract nests fields under `properties`; a row without it is taken as the fields.
        let fields = match row.get("properties") {
            Some(Value::Object(fields)) => fields,
            _ => row,
        };
        out.extend(fields.iter().map(|(field, value)| {
            let value = text(value);
            CollectionRow {
                property: property.to_owned(),
                row_id: row_id.clone(),
                field: field.clone(),
                typed: Typed::of(value.as_deref()),
                value,
            }
        }));
    }
}

/// Strings as they are, null as NULL, anything else as its JSON text.
pub fn text(value: &Value) -> Option<String> {
    match value {
        Value::Null => None,
        Value::String(s) => Some(s.clone()),
        other => Some(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn values_are_also_read_as_numbers_booleans_and_dates_where_they_parse() {
        let date = |d: &str| NaiveDate::parse_from_str(d, "%Y-%m-%d").ok();
        let cases = [
            ("42", Some(42.0), None, None),
            (" -1.5e3 ", Some(-1500.0), None, None),
            ("00123", None, None, None),
            ("True", None, Some(true), None),
            ("false", None, Some(false), None),
            ("1980-03-04", None, None, date("1980-03-04")),
            ("1980-03-04T00:00:00+02:00", None, None, date("1980-03-04")),
            ("1980-03-04 is a date", None, None, None),
            ("1980-02-30", None, None, None),
            ("GB", None, None, None),
        ];
        for (text, number, boolean, day) in cases {
            let typed = Typed::of(Some(text));
            assert_eq!(
                (typed.number, typed.boolean, typed.date),
                (number, boolean, day),
                "{text}"
            );
        }
        assert_eq!(Typed::of(None), Typed::default());
    }

    fn prop(name: &str, value: Option<&str>, value_type: ValueType) -> PropertyRow {
        PropertyRow::new(name.into(), value.map(str::to_owned), value_type)
    }

    fn cell(property: &str, row_id: &str, field: &str, value: Option<&str>) -> CollectionRow {
        CollectionRow {
            property: property.into(),
            row_id: row_id.into(),
            field: field.into(),
            value: value.map(str::to_owned),
            typed: Typed::of(value),
        }
    }

    #[test]
    fn single_properties_with_and_without_discriminator() {
        let (props, cells) = flatten(&json!({
            "firstName": {"type": "Single", "value": "Luis"},
            "lastName": {"type": "Single", "discriminator": "Single", "value": "Ruiz"},
        }));
        assert_eq!(
            props,
            [
                prop("firstName", Some("Luis"), ValueType::Single),
                prop("lastName", Some("Ruiz"), ValueType::Single),
            ]
        );
        assert!(cells.is_empty());
    }

    #[test]
    fn nulls_are_null_and_other_scalars_are_json_text() {
        let (props, _) = flatten(&json!({
            "a": {"type": "Single", "value": null},
            "b": {"type": "Single"},
            "c": {"type": "Single", "value": 42},
            "d": {"type": "Single", "value": true},
            "e": {"type": "Single", "value": 1.5},
            "f": {"type": "Single", "value": ["x", 1]},
        }));
        let values: Vec<_> = props.iter().map(|p| p.value.as_deref()).collect();
        assert_eq!(
            values,
            [
                None,
                None,
                Some("42"),
                Some("true"),
                Some("1.5"),
                Some(r#"["x",1]"#)
            ]
        );
    }

    #[test]
    fn a_collection_becomes_one_row_per_field_of_each_data_group_row() {
        let (props, cells) = flatten(&json!({
            "addresses": {
                "type": "Collection",
                "dataGroupId": "dg-1",
                "dataGroupVersionNumber": 2,
                "collections": {
                    "r1": {"properties": {"city": "Dublin", "country": "IE"}},
                    "r2": {"properties": {"city": "Cork", "zip": null}},
                },
            },
        }));
        assert!(props.is_empty());
        assert_eq!(
            cells,
            [
                cell("addresses", "r1", "city", Some("Dublin")),
                cell("addresses", "r1", "country", Some("IE")),
                cell("addresses", "r2", "city", Some("Cork")),
                cell("addresses", "r2", "zip", None),
            ]
        );
    }

    #[test]
    fn custom_properties_nest_as_dotted_names_two_levels_deep() {
        let (props, cells) = flatten(&json!({
            "registeredAddress": {
                "type": "Custom",
                "discriminator": "Custom",
                "customTypeId": "ct-1",
                "value": "primary",
                "properties": {
                    "city": {"type": "Single", "value": "Dublin"},
                    "geo": {
                        "type": "Custom",
                        "value": null,
                        "properties": {"lat": {"type": "Single", "value": 53.35}},
                    },
                    "owners": {
                        "type": "Collection",
                        "collections": {"o1": {"properties": {"name": "Ann"}}},
                    },
                },
            },
        }));
        assert_eq!(
            props,
            [
                prop("registeredAddress", Some("primary"), ValueType::Custom),
                prop("registeredAddress.city", Some("Dublin"), ValueType::Single),
                prop(
                    "registeredAddress.geo.lat",
                    Some("53.35"),
                    ValueType::Single
                ),
            ]
        );
        assert_eq!(
            cells,
            [cell("registeredAddress.owners", "o1", "name", Some("Ann"))]
        );
    }

    #[test]
    fn unknown_or_missing_types_are_inferred_from_the_shape() {
        let (props, cells) = flatten(&json!({
            "a": {"type": "SomethingNew", "value": "x"},
            "b": {"collections": {"r": {"properties": {"f": "v"}}}},
            "c": {"type": 7, "properties": {"d": {"value": "y"}}},
            "e": {"discriminator": "collection", "collections": [{"properties": {"g": "w"}}]},
        }));
        assert_eq!(
            props,
            [
                prop("a", Some("x"), ValueType::Single),
                prop("c.d", Some("y"), ValueType::Single),
            ]
        );
        assert_eq!(
            cells,
            [
                cell("b", "r", "f", Some("v")),
                cell("e", "0", "g", Some("w")),
            ]
        );
    }

    #[test]
    fn properties_that_are_not_objects_are_kept_as_values() {
        let (props, _) = flatten(&json!({
            "list": [1, 2],
            "nothing": null,
            "number": 3,
            "plain": "text",
        }));
        assert_eq!(
            props,
            [
                prop("list", Some("[1,2]"), ValueType::Single),
                prop("nothing", None, ValueType::Single),
                prop("number", Some("3"), ValueType::Single),
                prop("plain", Some("text"), ValueType::Single),
            ]
        );
    }

    #[test]
    fn malformed_containers_yield_what_they_can_without_panicking() {
        let (props, cells) = flatten(&json!({
            "badRows": {"type": "Collection", "collections": "oops"},
            "mixedRows": {"type": "Collection", "collections": {
                "r1": "not a row",
                "r2": {"f": "bare fields"},
            }},
            "badChildren": {"type": "Custom", "properties": [1, 2]},
        }));
        assert!(props.is_empty());
        assert_eq!(cells, [cell("mixedRows", "r2", "f", Some("bare fields"))]);
        for not_a_map in [json!(null), json!([]), json!("x")] {
            assert_eq!(flatten(&not_a_map), (vec![], vec![]));
        }
    }

    #[test]
    fn the_summary_takes_the_current_entity_columns_from_properties_and_risk() {
        let json = json!({
            "risk": {"riskCategory": "High", "riskLevel": 3},
            "properties": {
                "legalEntityName": {"type": "Single", "value": "Acme Ltd"},
                "countryOfIncorporation": {"type": "Single", "value": "Ireland"},
                "dateOfBirth": {"type": "Single", "value": "1960-05-01T00:00:00"},
                "registeredAddress": {"type": "Custom", "properties": {
                    "firstName": {"type": "Single", "value": "nested, not the entity's"},
                }},
            },
        });
        let (props, _) = flatten(&json["properties"]);
        let summary = Summary::of(&props, &json);
        assert_eq!(
            summary,
            Summary {
                legal_entity_name: Some("Acme Ltd".into()),
                country_of_incorporation: Some("Ireland".into()),
                date_of_birth: NaiveDate::from_ymd_opt(1960, 5, 1),
                risk_category: Some(json!("High")),
                risk_level: Some(json!(3)),
                ..Summary::default()
            }
        );
        assert_eq!(Summary::of(&[], &json!(null)), Summary::default());
    }
}
