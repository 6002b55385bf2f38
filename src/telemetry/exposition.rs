//! Which text format a scrape gets: Prometheus text (0.0.4) unless `Accept` names OpenMetrics,
//! and the rewrite of prometheus-client's OpenMetrics output into it.
//!
//! Pure text handling; it must never read or change a metric's value.

/// Which exposition format a scrape gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exposition {
    /// `text/plain; version=0.0.4`, what promtool and most scrapers expect.
    Prometheus,
    /// `application/openmetrics-text; version=1.0.0`, when the scraper's `Accept` asks for it.
    OpenMetrics,
}

impl Exposition {
    /// OpenMetrics only when `Accept` names it (Prometheus itself asks for both and prefers it).
    pub fn negotiate(accept: Option<&str>) -> Exposition {
        match accept {
            Some(accept) if accept.contains("application/openmetrics-text") => {
                Exposition::OpenMetrics
            }
            _ => Exposition::Prometheus,
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Exposition::Prometheus => "text/plain; version=0.0.4; charset=utf-8",
            Exposition::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }
}

/// Rewrites prometheus-client's OpenMetrics text as the Prometheus text format (0.0.4): a
/// counter's family is named after its `_total` samples (so HELP and TYPE describe them), and
/// the OpenMetrics-only `# UNIT` and `# EOF` lines go.
pub(super) fn openmetrics_to_prometheus(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    let mut help: Option<(&str, &str)> = None;
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            help = Some(rest.split_once(' ').unwrap_or((rest, "")));
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "untyped"));
            let family = if kind == "counter" {
                format!("{name}_total")
            } else {
                name.to_owned()
            };
            if let Some((_, text)) = help.take() {
                out.push_str(&format!("# HELP {family} {text}\n"));
            }
            out.push_str(&format!("# TYPE {family} {kind}\n"));
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openmetrics_only_when_accept_names_it() {
        assert_eq!(Exposition::negotiate(None), Exposition::Prometheus);
        assert_eq!(
            Exposition::negotiate(Some("text/plain;version=0.0.4")),
            Exposition::Prometheus
        );
        assert_eq!(
            Exposition::negotiate(Some(
                "application/openmetrics-text;version=1.0.0;q=0.5,text/plain;q=0.4"
            )),
            Exposition::OpenMetrics
        );
    }
}
