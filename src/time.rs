//! The one text form of a time in fenx-sync's stores, and the one reader of the times Fenergo
//! sends.
//!
//! Every time fenx-sync stores as text (both SQLite files) is [`format`]ed: RFC 3339 in UTC with
//! exactly three fractional digits and `Z` (`2026-11-23T15:16:59.123Z`), so times sort and compare
//! as text. Fenergo's times arrive in several shapes (seven fractional digits, `+00:00`, no
//! offset at all, a lower-case `t`); [`parse`] reads them all. It must never guess a time zone
//! other than UTC, and never fail loudly: an unreadable time is `None` and the original text is
//! kept wherever it came from (the outbox row, the entity's JSON).

use chrono::{DateTime, NaiveDateTime, SecondsFormat, Utc};

/// The stored form: RFC 3339 UTC with milliseconds, sortable as text.
pub fn format(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// [`format`] of the current time.
pub fn now() -> String {
    format(Utc::now())
}

/// Reads an RFC 3339 / ISO 8601 time as Fenergo or fenx-sync wrote it: any number of
/// fractional digits, `Z` or an offset (in either case), surrounding spaces, and a time without
/// an offset taken as UTC (Fenergo's own times are UTC).
pub fn parse(text: &str) -> Option<DateTime<Utc>> {
    let text = text.trim();
    if let Ok(t) = DateTime::parse_from_rfc3339(text) {
        return Some(t.with_timezone(&Utc));
    }
    let upper = text.to_ascii_uppercase();
    if let Ok(t) = DateTime::parse_from_rfc3339(&upper) {
        return Some(t.with_timezone(&Utc));
    }
    NaiveDateTime::parse_from_str(&upper, "%Y-%m-%dT%H:%M:%S%.f")
        .ok()
        .map(|t| t.and_utc())
}

/// Serialises a time in the stored form (`#[serde(serialize_with = "crate::time::serialize")]`),
/// so JSON output shows the same text as the database.
pub fn serialize<S: serde::Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format(*t))
}

/// [`serialize`] for an optional time (`None` is `null`).
pub fn serialize_option<S: serde::Serializer>(
    t: &Option<DateTime<Utc>>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match t {
        Some(t) => serialize(t, s),
        None => s.serialize_none(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_times_have_one_width_and_sort_as_text() {
        let a = format(DateTime::from_timestamp_millis(999).unwrap());
        let b = format(DateTime::from_timestamp_millis(1_000).unwrap());
        assert_eq!(a, "1970-01-01T00:00:00.999Z");
        assert_eq!(b, "1970-01-01T00:00:01.000Z");
        assert!(a < b);
    }

    #[test]
    fn fenergo_shapes_are_read_as_utc() {
        let want = DateTime::from_timestamp_millis(1_620_209_957_500).unwrap();
        for text in [
            "2021-05-05T10:19:17.5Z",
            "2021-05-05T10:19:17.5000000+00:00",
            "2021-05-05T11:19:17.500+01:00",
            " 2021-05-05t10:19:17.500z ",
            "2021-05-05T10:19:17.5000000",
        ] {
            assert_eq!(parse(text), Some(want), "{text}");
        }
        assert_eq!(
            format(parse("2021-05-05T10:19:17.5000001+00:00").unwrap()),
            "2021-05-05T10:19:17.500Z"
        );
    }

    #[test]
    fn unreadable_times_are_none() {
        for text in ["", "garbage", "2021-13-05T10:19:17Z", "1620209957"] {
            assert_eq!(parse(text), None, "{text}");
        }
    }
}
