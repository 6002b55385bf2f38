//! Reaching PostgreSQL: `store.reporting_url` read as libpq reads it (`sslmode` with libpq's five
//! values, `sslrootcert`), the password from the URL or the configured secret, TLS through rustls
//! with the ring provider, and a bounded deadpool pool whose connections give up promptly.
//!
//! It must never put a password in an error, a log line or [`describe`](Target::describe), never
//! load OpenSSL, and never skip certificate checks in `verify-ca`/`verify-full`.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use secrecy::{ExposeSecret, SecretString};
use tokio_postgres::config::SslMode;
use tokio_postgres_rustls::MakeRustlsConnect;

use super::PgError;
use crate::config::{DatabaseUrl, StoreSettings};

/// How long opening a connection (TCP, TLS, authentication) may take.
pub(super) const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The server cancels any one statement running longer (migrations lift it).
pub(super) const STATEMENT_TIMEOUT: Duration = Duration::from_secs(30);

/// What `store.*` says about the PostgreSQL store.
pub struct Target {
    pub url: DatabaseUrl,
    /// `store.reporting_password_file` or the `reporting-db-password` credential; the URL's own
    /// password wins.
    pub password: Option<SecretString>,
    /// Trust anchors instead of the system's (`store.reporting_ca_file`).
    pub ca_file: Option<PathBuf>,
    pub pool_size: usize,
}

impl Target {
    /// The PostgreSQL store `store.*` names, if `store.reporting_url` is set.
    pub fn of(store: &StoreSettings) -> Option<Target> {
        Some(Target {
            url: store.reporting_url.clone()?,
            password: store.reporting_password.clone(),
            ca_file: store.reporting_ca_file.clone(),
            pool_size: store.reporting_pool_size,
        })
    }

    /// The URL without its password, for logs and `fenx-sync status`.
    pub fn describe(&self) -> String {
        self.url.redacted()
    }
}

/// `url` with any password replaced, for errors.
fn redact(url: &str) -> String {
    DatabaseUrl::from(url.to_owned()).redacted()
}

/// libpq's `sslmode` values. `prefer` and `require` encrypt without checking who answers (as
/// libpq does); `verify-ca` checks the chain, `verify-full` the chain and the host name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TlsMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl FromStr for TlsMode {
    type Err = PgError;

    fn from_str(text: &str) -> Result<TlsMode, PgError> {
        Ok(match text {
            "disable" => TlsMode::Disable,
            "allow" | "prefer" => TlsMode::Prefer,
            "require" => TlsMode::Require,
            "verify-ca" => TlsMode::VerifyCa,
            "verify-full" => TlsMode::VerifyFull,
            other => {
                return Err(PgError::Url(format!(
                    "sslmode={other} is not one of disable, prefer, require, verify-ca, verify-full"
                )));
            }
        })
    }
}

/// The pool for `target`. No connection is opened yet: the first use (the migration) does.
pub(super) fn pool(target: &Target) -> Result<Pool, PgError> {
    let (mut config, mode, root_cert) = parse(target.url.expose())?;
    if config.get_password().is_none()
        && let Some(password) = &target.password
    {
        config.password(password.expose_secret());
    }
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(CONNECT_TIMEOUT);
    }
    // A server that vanishes without closing the socket is noticed in seconds, not hours.
    config.keepalives_idle(Duration::from_secs(15));
    config.tcp_user_timeout(Duration::from_secs(20));
    let options = format!(
        "{} -c statement_timeout={}",
        config.get_options().unwrap_or_default(),
        STATEMENT_TIMEOUT.as_millis()
    );
    config.options(options.trim());
    config.ssl_mode(match mode {
        TlsMode::Disable => SslMode::Disable,
        TlsMode::Prefer => SslMode::Prefer,
        TlsMode::Require | TlsMode::VerifyCa | TlsMode::VerifyFull => SslMode::Require,
    });
    let ca_file = target.ca_file.as_deref().or(root_cert.as_deref());
    let tls = MakeRustlsConnect::new(tls_config(mode, ca_file)?);
    let manager = Manager::from_config(
        config,
        tls,
        ManagerConfig {
            // A connection broken by a server restart fails this check and is replaced.
            recycling_method: RecyclingMethod::Verified,
        },
    );
    Pool::builder(manager)
        .max_size(target.pool_size.max(1))
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(CONNECT_TIMEOUT))
        .create_timeout(Some(CONNECT_TIMEOUT))
        .recycle_timeout(Some(CONNECT_TIMEOUT))
        .build()
        .map_err(|e| PgError::Url(e.to_string()))
}

/// The URL as tokio-postgres reads it, once the libpq parameters it does not know (`sslmode`'s
/// verify values, `sslrootcert`) are taken out.
fn parse(url: &str) -> Result<(tokio_postgres::Config, TlsMode, Option<PathBuf>), PgError> {
    let mut parsed =
        url::Url::parse(url).map_err(|e| PgError::Url(format!("{}: {e}", redact(url))))?;
    if !["postgres", "postgresql"].contains(&parsed.scheme()) {
        return Err(PgError::Url(format!(
            "{}: the scheme must be postgresql://",
            redact(url)
        )));
    }
    let mut mode = TlsMode::Prefer;
    let mut root_cert = None;
    // Raw segments are kept as written: tokio-postgres percent-decodes but reads '+' as itself.
    let mut kept = Vec::new();
    for segment in parsed.query().unwrap_or_default().split('&') {
        let Some((key, value)) = url::form_urlencoded::parse(segment.as_bytes()).next() else {
            continue;
        };
        match key.as_ref() {
            "sslmode" => mode = value.parse()?,
            "sslrootcert" => root_cert = Some(PathBuf::from(value.as_ref())),
            _ => kept.push(segment.to_owned()),
        }
    }
    parsed.set_query(
        Some(&kept.join("&"))
            .filter(|q| !q.is_empty())
            .map(String::as_str),
    );
    let config = tokio_postgres::Config::from_str(parsed.as_str())
        .map_err(|e| PgError::Url(format!("{}: {e}", redact(url))))?;
    Ok((config, mode, root_cert))
}

fn tls_config(mode: TlsMode, ca_file: Option<&Path>) -> Result<ClientConfig, PgError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| PgError::Tls(e.to_string()))?;
    let algorithms = provider.signature_verification_algorithms;
    let lenient = |chain| Arc::new(Lenient { chain, algorithms });
    let config = match mode {
        TlsMode::Disable | TlsMode::Prefer | TlsMode::Require => builder
            .dangerous()
            .with_custom_certificate_verifier(lenient(None)),
        TlsMode::VerifyCa | TlsMode::VerifyFull => {
            let roots = Arc::new(roots(ca_file)?);
            let webpki = WebPkiServerVerifier::builder_with_provider(roots, provider)
                .build()
                .map_err(|e| PgError::Tls(e.to_string()))?;
            if mode == TlsMode::VerifyFull {
                builder.with_webpki_verifier(webpki)
            } else {
                builder
                    .dangerous()
                    .with_custom_certificate_verifier(lenient(Some(webpki)))
            }
        }
    };
    Ok(config.with_no_client_auth())
}

/// The CA file's certificates, else the system's trust store.
fn roots(ca_file: Option<&Path>) -> Result<RootCertStore, PgError> {
    let mut roots = RootCertStore::empty();
    let certificates: Vec<CertificateDer<'static>> = match ca_file {
        Some(path) => CertificateDer::pem_file_iter(path)
            .and_then(|certs| certs.collect())
            .map_err(|e| {
                PgError::Tls(format!("cannot read the CA file {}: {e}", path.display()))
            })?,
        None => {
            let found = rustls_native_certs::load_native_certs();
            if let Some(error) = found.errors.first() {
                tracing::warn!(%error, "some of the system's CA certificates could not be read");
            }
            found.certs
        }
    };
    let (added, _ignored) = roots.add_parsable_certificates(certificates);
    if added == 0 {
        return Err(PgError::Tls(match ca_file {
            Some(path) => format!("{} holds no usable CA certificate", path.display()),
            None => "the system trust store holds no CA certificate; set store.reporting_ca_file"
                .to_owned(),
        }));
    }
    Ok(roots)
}

/// The certificate checks of `prefer`/`require` (none: encrypted, but whoever answers is
/// trusted, as in libpq) and `verify-ca` (`chain`: the chain must lead to a trusted root, but
/// the name in the certificate may differ from the host connected to). The handshake signature
/// is always checked.
#[derive(Debug)]
struct Lenient {
    chain: Option<Arc<WebPkiServerVerifier>>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for Lenient {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(chain) = &self.chain else {
            return Ok(ServerCertVerified::assertion());
        };
        match chain.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForName
                | rustls::CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_redacted_and_libpq_parameters_are_read() {
        let url = "postgresql://fenx:s3cret@db.internal:5432/fenx_reporting?sslmode=verify-full&application_name=fenx";
        let shown = redact(url);
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(
            shown.contains("[redacted]") && shown.contains("db.internal"),
            "{shown}"
        );
        let (config, mode, root) = parse(url).unwrap();
        assert_eq!(mode, TlsMode::VerifyFull);
        assert_eq!(root, None);
        assert_eq!(config.get_dbname(), Some("fenx_reporting"));
        assert_eq!(config.get_password(), Some(&b"s3cret"[..]));
        assert_eq!(config.get_application_name(), Some("fenx"));
        let (_, mode, root) =
            parse("postgres://h/db?sslrootcert=%2Fetc%2Fca.pem&sslmode=verify-ca").unwrap();
        assert_eq!(mode, TlsMode::VerifyCa);
        assert_eq!(root, Some(PathBuf::from("/etc/ca.pem")));
        assert_eq!(parse("postgres://h/db").unwrap().1, TlsMode::Prefer);
    }

    #[test]
    fn bad_urls_are_refused_without_showing_the_password() {
        for url in [
            "mysql://u:pw@h/db",
            "postgresql://u:pw@h/db?sslmode=sometimes",
            "postgresql://u:pw@h/db?no_such_option=1",
        ] {
            let error = parse(url).expect_err(url).to_string();
            assert!(!error.contains(":pw@"), "{error}");
        }
    }
}
