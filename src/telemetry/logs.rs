//! The log subscriber: readable lines on a terminal, or one JSON object per line whose arrays
//! stay arrays. Installed once, at the binary's edge.
//!
//! It must never format a secret or a request body.

use std::io::IsTerminal;

use tracing::field::{Field, Visit};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

use crate::config::{LogFormat, LogSettings};

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("invalid log filter {filter:?} (log.level or RUST_LOG): {source}")]
    Filter {
        filter: String,
        #[source]
        source: tracing_subscriber::filter::ParseError,
    },
}

/// Installs the global subscriber. Call once, at the binary's edge.
pub fn init(settings: &LogSettings) -> Result<(), TelemetryError> {
    let filter_text = std::env::var("RUST_LOG")
        .ok()
        .filter(|f| !f.trim().is_empty())
        .unwrap_or_else(|| settings.level.clone());
    let filter = EnvFilter::try_new(&filter_text).map_err(|source| TelemetryError::Filter {
        filter: filter_text,
        source,
    })?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    // A second init (tests, embedding) keeps the first subscriber; that is fine.
    let _ = match settings.format {
        LogFormat::Json => builder.event_format(JsonLines).try_init(),
        LogFormat::Human => builder.try_init(),
    };
    Ok(())
}

/// One JSON object per event: `timestamp`, `level`, `target`, `message` and the event's fields.
/// Unlike tracing-subscriber's JSON format, a field whose `Debug` text is a JSON array (a
/// `Vec<String>` logged with `?`) stays an array instead of a string holding JSON.
struct JsonLines;

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let metadata = event.metadata();
        let mut fields = JsonFields::default();
        event.record(&mut fields);
        let mut line = serde_json::Map::new();
        line.insert(
            "timestamp".into(),
            chrono::Utc::now()
                .to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
                .into(),
        );
        line.insert("level".into(), metadata.level().as_str().into());
        line.insert("target".into(), metadata.target().into());
        line.extend(fields.0);
        writeln!(writer, "{}", serde_json::Value::Object(line))
    }
}

#[derive(Default)]
struct JsonFields(serde_json::Map<String, serde_json::Value>);

impl JsonFields {
    fn put(&mut self, field: &Field, value: serde_json::Value) {
        self.0.insert(field.name().to_owned(), value);
    }
}

impl Visit for JsonFields {
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.put(field, value.into());
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.put(field, value.into());
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.put(field, value.into());
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.put(field, value.into());
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, value.into());
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        let text = format!("{value:?}");
        let array = text
            .starts_with('[')
            .then(|| serde_json::from_str::<Vec<serde_json::Value>>(&text).ok())
            .flatten();
        self.put(field, array.map_or(text.into(), serde_json::Value::Array));
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::telemetry::millis;

    #[test]
    fn json_fields_keep_arrays_as_arrays() {
        #[derive(Default)]
        struct Capture(std::sync::Mutex<Option<serde_json::Value>>);
        impl tracing::Subscriber for Capture {
            fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
                true
            }
            fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
                tracing::span::Id::from_u64(1)
            }
            fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
            fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
            fn event(&self, event: &tracing::Event<'_>) {
                let mut fields = JsonFields::default();
                event.record(&mut fields);
                *self.0.lock().unwrap() = Some(serde_json::Value::Object(fields.0));
            }
            fn enter(&self, _: &tracing::span::Id) {}
            fn exit(&self, _: &tracing::span::Id) {}
        }
        let capture = std::sync::Arc::new(Capture::default());
        let feeds = vec!["all".to_owned(), "kyc".to_owned()];
        tracing::subscriber::with_default(capture.clone(), || {
            tracing::info!(
                feeds = ?feeds,
                latency_ms = millis(Duration::from_nanos(15_314_157_999)),
                note = "[not json",
                "polling"
            );
        });
        let line = capture.0.lock().unwrap().take().unwrap();
        assert_eq!(line["feeds"], serde_json::json!(["all", "kyc"]));
        assert_eq!(line["latency_ms"], serde_json::json!(15314.158));
        assert_eq!(line["note"], "[not json");
        assert_eq!(line["message"], "polling");
    }
}
