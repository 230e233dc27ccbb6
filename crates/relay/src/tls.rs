//! TLS pieces both servers' connections share: PEM files read into rustls' types, and a TLS
//! failure explained (what is wrong and which setting fixes it), worded for PostgreSQL
//! ([`crate::pgtls`]) or ClickHouse ([`crate::sink`]) by a [`Wording`].

use std::io;
use std::path::Path;
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{AlertDescription, CertificateError, RootCertStore};

/// The relay's one crypto provider (ring), for every TLS configuration it builds.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A PEM file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum PemError {
    #[error("cannot read the file: {0}")]
    Unreadable(#[source] io::Error),
    #[error("{0}")]
    Bad(String),
}

/// The contents of a file, for the functions below that take them (`*_in`).
pub fn read(path: &Path) -> Result<Vec<u8>, PemError> {
    std::fs::read(path).map_err(PemError::Unreadable)
}

/// The certificates of a PEM file (a chain, or a CA bundle); at least one.
pub fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, PemError> {
    certificates_in(&read(path)?)
}

/// The certificates of PEM contents (a chain, or a CA bundle); at least one.
pub fn certificates_in(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, PemError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| PemError::Bad(format!("is not a PEM certificate file: {e}")))?;
    if certs.is_empty() {
        return Err(PemError::Bad(
            "holds no PEM certificate (-----BEGIN CERTIFICATE-----)".into(),
        ));
    }
    Ok(certs)
}

/// The trusted roots of a PEM bundle: the certificates that can be roots (others are skipped,
/// as OpenSSL skips them); at least one.
pub fn roots(path: &Path) -> Result<RootCertStore, PemError> {
    roots_in(&read(path)?)
}

/// The trusted roots of PEM contents, as [`roots`].
pub fn roots_in(pem: &[u8]) -> Result<RootCertStore, PemError> {
    let mut roots = RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(certificates_in(pem)?);
    if added == 0 {
        return Err(PemError::Bad(
            "holds no certificate usable as a root (CA) certificate".into(),
        ));
    }
    Ok(roots)
}

/// The private key of a PEM file (PKCS#8, PKCS#1 or SEC1).
pub fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, PemError> {
    private_key_in(&read(path)?)
}

/// The private key of PEM contents, as [`private_key`].
pub fn private_key_in(pem: &[u8]) -> Result<PrivateKeyDer<'static>, PemError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| {
        PemError::Bad(format!(
            "holds no PEM private key (PKCS#8, PKCS#1 or SEC1): {e}"
        ))
    })
}

/// The rustls error somewhere in `e`'s chain of sources, also inside `io::Error`s (whose
/// `source()` skips the error they wrap).
pub fn rustls_error<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    let mut cur = Some(e);
    while let Some(mut err) = cur {
        while let Some(inner) = err
            .downcast_ref::<io::Error>()
            .and_then(|io| io.get_ref())
            .map(|i| i as &(dyn std::error::Error + 'static))
        {
            err = inner;
        }
        if let Some(r) = err.downcast_ref::<rustls::Error>() {
            return Some(r);
        }
        cur = err.source();
    }
    None
}

/// What went wrong in a TLS handshake, as an operator fixes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    /// The certificate is not signed by a trusted CA.
    UnknownCa,
    /// The certificate does not name the host (`expected`, if known); `presented`: the names it
    /// holds, if known.
    HostnameMismatch {
        expected: Option<String>,
        presented: Vec<String>,
    },
    Expired,
    NotYetValid,
    /// Another certificate problem (revoked, wrong purpose, ...), in rustls' words.
    OtherCertificate(String),
    /// The server refused our side of the handshake (an alert): typically the client
    /// certificate it wants.
    Refused(String),
    /// The server did not answer in TLS.
    NotTls,
    /// Anything else, in rustls' words.
    Other(String),
}

impl Problem {
    pub fn of(e: &rustls::Error) -> Problem {
        use CertificateError as Cert;
        match e {
            rustls::Error::InvalidCertificate(c) => match c {
                Cert::UnknownIssuer => Problem::UnknownCa,
                Cert::NotValidForNameContext {
                    expected,
                    presented,
                } => Problem::HostnameMismatch {
                    expected: Some(expected.to_str().into_owned()),
                    presented: presented
                        .iter()
                        .map(|p| presented_name(p).to_string())
                        .collect(),
                },
                Cert::NotValidForName => Problem::HostnameMismatch {
                    expected: None,
                    presented: vec![],
                },
                Cert::Expired | Cert::ExpiredContext { .. } => Problem::Expired,
                Cert::NotValidYet | Cert::NotValidYetContext { .. } => Problem::NotYetValid,
                other => Problem::OtherCertificate(format!("{other:?}")),
            },
            rustls::Error::AlertReceived(
                alert @ (AlertDescription::CertificateRequired
                | AlertDescription::BadCertificate
                | AlertDescription::UnknownCA
                | AlertDescription::HandshakeFailure
                | AlertDescription::AccessDenied),
            ) => Problem::Refused(format!("{alert:?}")),
            rustls::Error::InvalidMessage(_) => Problem::NotTls,
            other => Problem::Other(other.to_string()),
        }
    }

    /// A certificate problem from a rustls error's text (the replication library reports its
    /// TLS errors as text); `None` when the text is not about the certificate.
    pub fn of_certificate_text(text: &str) -> Option<Problem> {
        if !text.contains("invalid peer certificate") {
            return None;
        }
        Some(if text.contains("UnknownIssuer") {
            Problem::UnknownCa
        } else if text.contains("not valid for name") || text.contains("NotValidForName") {
            Problem::HostnameMismatch {
                expected: None,
                presented: vec![],
            }
        } else if text.contains("expired") || text.contains("Expired") {
            Problem::Expired
        } else if text.contains("not valid yet") || text.contains("NotValidYet") {
            Problem::NotYetValid
        } else {
            Problem::OtherCertificate(text.to_string())
        })
    }

    /// The operator's message: what is wrong and what to change.
    pub fn explain(&self, w: &Wording) -> String {
        let server = w.server;
        match self {
            Problem::UnknownCa => format!(
                "{server}'s certificate is signed by an unknown CA (not one in {}): {}",
                w.roots, w.fix_ca
            ),
            Problem::HostnameMismatch {
                expected,
                presented,
            } => format!(
                "{server}'s certificate is not valid for host {} (hostname mismatch; it names \
                 {}): {}",
                w.host.or(expected.as_deref()).unwrap_or("connected to"),
                match presented.as_slice() {
                    [] => "other hosts".to_string(),
                    names => names.join(", "),
                },
                w.fix_host
            ),
            Problem::Expired => format!(
                "{server}'s certificate has expired: renew it on the server (or check the \
                 clocks of the server and of this machine)"
            ),
            Problem::NotYetValid => format!(
                "{server}'s certificate is not valid yet: check the clocks of the server and of \
                 this machine"
            ),
            Problem::OtherCertificate(what) => format!(
                "{server}'s certificate was refused ({what}): check it, and {}",
                w.roots
            ),
            Problem::Refused(alert) => format!(
                "{server} refused the TLS handshake ({alert}): if it requires a client \
                 certificate, {}",
                w.fix_client_cert
            ),
            Problem::NotTls => format!("the server did not answer in TLS: {}", w.fix_not_tls),
            Problem::Other(what) => format!(
                "the TLS handshake with {server} failed ({what}): if it requires a client \
                 certificate, {}; otherwise check {server}'s TLS settings",
                w.fix_client_cert
            ),
        }
    }
}

/// How one kind of connection names things in [`Problem::explain`].
#[derive(Debug, Clone)]
pub struct Wording<'a> {
    /// The server: `PostgreSQL`, `ClickHouse`.
    pub server: &'a str,
    /// The host connected to, as the message shows it; `None`: the one in the error.
    pub host: Option<&'a str>,
    /// Where the trusted roots come from.
    pub roots: &'a str,
    /// How to trust the server's CA.
    pub fix_ca: &'a str,
    /// What to do when the certificate does not name the host.
    pub fix_host: &'a str,
    /// How to present a client certificate.
    pub fix_client_cert: &'a str,
    /// What to check when the server does not answer in TLS or the handshake fails otherwise.
    pub fix_not_tls: &'a str,
}

/// `db.example` for rustls' `DnsName("db.example")`, `10.0.0.1` for `IpAddress(10.0.0.1)`
/// (the names a certificate holds, in `NotValidForNameContext`); anything else unchanged.
pub fn presented_name(presented: &str) -> &str {
    presented
        .strip_prefix("DnsName(\"")
        .and_then(|n| n.strip_suffix("\")"))
        .or_else(|| {
            presented
                .strip_prefix("IpAddress(")
                .and_then(|n| n.strip_suffix(')'))
        })
        .unwrap_or(presented)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_from_rustls() {
        assert_eq!(presented_name("DnsName(\"localhost\")"), "localhost");
        assert_eq!(presented_name("IpAddress(127.0.0.1)"), "127.0.0.1");
        assert_eq!(presented_name("DirectoryName"), "DirectoryName");
    }

    #[test]
    fn certificate_problems_from_text() {
        let text = "TLS handshake failed: invalid peer certificate: UnknownIssuer";
        assert_eq!(Problem::of_certificate_text(text), Some(Problem::UnknownCa));
        let text = "TLS handshake failed: invalid peer certificate: certificate not valid for \
                    name \"127.0.0.1\"; certificate is only valid for DnsName(\"localhost\")";
        assert_eq!(
            Problem::of_certificate_text(text),
            Some(Problem::HostnameMismatch {
                expected: None,
                presented: vec![]
            })
        );
        assert_eq!(Problem::of_certificate_text("connection reset"), None);
    }

    #[test]
    fn the_rustls_error_inside_io_errors() {
        let rustls = rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer);
        let outer = io::Error::other(io::Error::other(rustls.clone()));
        assert_eq!(rustls_error(&outer), Some(&rustls));
        assert_eq!(rustls_error(&io::Error::other("plain")), None);
    }

    #[test]
    fn pem_files_are_checked() {
        let dir = std::env::temp_dir().join(format!("relay-pem-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let not_pem = dir.join("not.pem");
        std::fs::write(&not_pem, "not a certificate\n").unwrap();
        let err = certificates(&not_pem).unwrap_err().to_string();
        assert!(err.contains("no PEM certificate"), "{err}");
        assert!(private_key(&not_pem).is_err());
        let err = roots(&dir.join("missing.pem")).unwrap_err();
        assert!(matches!(err, PemError::Unreadable(_)), "{err}");
        let ca = concat!(env!("CARGO_MANIFEST_DIR"), "/src/testdata/ca.pem");
        assert_eq!(roots(Path::new(ca)).unwrap().len(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
