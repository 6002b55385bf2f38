//! Fields that are not plain serde values: secrets (read from a list or one comma-separated
//! string, written as `[redacted]`), a database URL (written with its password redacted), and
//! values read with `FromStr` and written with `Display`.
//!
//! It must never write a secret's value anywhere.

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A PostgreSQL URL, which may carry a password: `Debug` and serialisation show it redacted.
#[derive(Clone, Deserialize)]
#[serde(from = "String")]
pub struct DatabaseUrl(SecretString);

impl DatabaseUrl {
    pub fn expose(&self) -> &str {
        self.0.expose_secret()
    }

    /// Whether the URL itself carries a password.
    pub(super) fn has_password(&self) -> bool {
        url::Url::parse(self.expose()).is_ok_and(|u| u.password().is_some())
    }

    /// The URL with its password replaced by `[redacted]`; text that is no URL is withheld.
    pub fn redacted(&self) -> String {
        match url::Url::parse(self.expose()) {
            Ok(mut url) => {
                if url.password().is_some() {
                    let _ = url.set_password(Some("REDACTED"));
                }
                url.to_string().replacen(":REDACTED@", ":[redacted]@", 1)
            }
            Err(_) => "[not a URL: withheld]".to_owned(),
        }
    }
}

impl From<String> for DatabaseUrl {
    fn from(url: String) -> DatabaseUrl {
        DatabaseUrl(SecretString::from(url))
    }
}

impl std::fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl Serialize for DatabaseUrl {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.redacted())
    }
}

/// Accepts a TOML list of strings or one comma-separated string (the environment's form).
pub(super) fn secrets_from_list_or_csv<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Vec<SecretString>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum ListOrCsv {
        List(Vec<String>),
        Csv(String),
    }
    let items = match ListOrCsv::deserialize(d)? {
        ListOrCsv::List(list) => list,
        ListOrCsv::Csv(csv) => csv
            .split(',')
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .collect(),
    };
    Ok(items.into_iter().map(SecretString::from).collect())
}

pub(super) fn optional_secret<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<SecretString>, D::Error> {
    Ok(Option::<String>::deserialize(d)?
        .filter(|s| !s.is_empty())
        .map(SecretString::from))
}

pub(super) fn redact_optional_secret<S: Serializer>(
    secret: &Option<SecretString>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match secret {
        Some(_) => s.serialize_str("[redacted]"),
        None => s.serialize_none(),
    }
}

pub(super) fn redact_secrets<S: Serializer>(
    secrets: &[SecretString],
    s: S,
) -> Result<S::Ok, S::Error> {
    s.collect_seq(secrets.iter().map(|_| "[redacted]"))
}

pub(super) fn from_str<'de, D: Deserializer<'de>, T: std::str::FromStr<Err = String>>(
    d: D,
) -> Result<T, D::Error> {
    String::deserialize(d)?
        .parse()
        .map_err(serde::de::Error::custom)
}

pub(super) fn to_string<S: Serializer, T: std::fmt::Display>(
    value: &T,
    s: S,
) -> Result<S::Ok, S::Error> {
    s.collect_str(value)
}
