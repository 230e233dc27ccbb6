//! The TLS parameters of `postgres_url` resolved as libpq resolves them ([`PgTls`]), and the TLS
//! configurations of both connections built from them.
//!
//! The SQL connections use the ecosystem's tokio-postgres connector, tokio-postgres-rustls
//! (which also gives tokio-postgres the server certificate's hash for SCRAM channel binding),
//! over a rustls configuration of ours: its verifier takes libpq's modes where rustls' own has
//! only verify-full. `verify-ca` checks the chain but not the host name, and `allow`, `prefer`
//! and `require` check nothing; the verifier also records what the handshake saw ([`Seen`]), which
//! the replication connection of the same session follows.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use pgwire_replication::{PemContents, TlsConfig};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use tokio_postgres_rustls::MakeRustlsConnect;

use super::error::TlsParamError;
use crate::tls as files;

/// Where the OS keeps its trusted roots as one PEM bundle (`sslrootcert=system`), after
/// `SSL_CERT_FILE`.
const SYSTEM_BUNDLES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/ssl/cert.pem",
];

/// libpq's `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Allow,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    pub fn parse(s: &str) -> Result<SslMode, TlsParamError> {
        Ok(match s {
            "disable" => SslMode::Disable,
            "allow" => SslMode::Allow,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => return Err(TlsParamError::UnknownSslMode(other.into())),
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Allow => "allow",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }

    fn verifies(self) -> bool {
        matches!(self, SslMode::VerifyCa | SslMode::VerifyFull)
    }
}

/// The TLS parameters of `postgres_url` as written, before defaults.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct TlsParams {
    pub sslmode: Option<String>,
    pub sslrootcert: Option<String>,
    pub sslcert: Option<String>,
    pub sslkey: Option<String>,
}

/// The TLS settings of `postgres_url`, resolved as libpq resolves them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgTls {
    /// The mode as written (default `prefer`).
    pub requested: SslMode,
    /// The mode in effect: `require` with an existing root certificate file is `verify-ca`.
    pub mode: SslMode,
    /// CA file the server's certificate is verified against (for `system`, the OS bundle).
    pub root_cert: Option<PathBuf>,
    /// `sslrootcert=system`.
    pub system_roots: bool,
    /// Client certificate and key.
    pub client_cert: Option<(PathBuf, PathBuf)>,
    /// The contents of `root_cert` and `client_cert`, read once by [`PgTls::resolve`]: every
    /// connection (SQL and replication) uses them, so a rotated certificate takes a restart.
    pub pem: PemContents,
}

/// What a SQL connection's handshake saw.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Seen {
    /// The connection is encrypted (the server's certificate reached the verifier).
    pub encrypted: bool,
    /// Under verify-ca, the names of a certificate that does not name the host.
    pub cert_names: Vec<String>,
}

impl PgTls {
    /// libpq's resolution of the parameters; `home` holds `.postgresql/root.crt` and the default
    /// client certificate.
    pub fn resolve(params: &TlsParams, home: Option<&Path>) -> Result<PgTls, TlsParamError> {
        let requested = match params.sslmode.as_deref() {
            Some(m) => SslMode::parse(m)?,
            None => SslMode::Prefer,
        };
        let default_dir = home.map(|h| h.join(".postgresql"));
        let mut system_roots = false;
        let root_cert = match params.sslrootcert.as_deref() {
            Some("system") => {
                system_roots = true;
                if requested != SslMode::VerifyFull && params.sslmode.is_some() {
                    return Err(TlsParamError::WeakModeWithSystemRoots(requested.as_str()));
                }
                Some(system_bundle().ok_or(TlsParamError::NoSystemRoots)?)
            }
            Some(path) => Some(PathBuf::from(path)),
            None => default_dir
                .as_ref()
                .map(|d| d.join("root.crt"))
                .filter(|p| p.exists()),
        };
        // libpq: sslrootcert=system without sslmode means verify-full.
        let requested = if system_roots && params.sslmode.is_none() {
            SslMode::VerifyFull
        } else {
            requested
        };
        if requested == SslMode::Disable {
            return Ok(PgTls {
                requested,
                mode: requested,
                root_cert: None,
                system_roots: false,
                client_cert: None,
                pem: PemContents::default(),
            });
        }
        let mut pem = PemContents::default();
        if let Some(path) = &root_cert {
            pem.ca = Some(read("sslrootcert", path, files::roots_in)?);
        } else if requested.verifies() {
            return Err(TlsParamError::NoRootCert {
                mode: requested.as_str(),
                default: default_dir
                    .map(|d| d.join("root.crt").display().to_string())
                    .unwrap_or_else(|| "~/.postgresql/root.crt".into()),
            });
        }
        // libpq: "if a root CA file exists, the behavior of sslmode=require will be the same as
        // that of verify-ca".
        let mode = if requested == SslMode::Require && root_cert.is_some() {
            SslMode::VerifyCa
        } else {
            requested
        };
        let client_cert = match (params.sslcert.as_deref(), params.sslkey.as_deref()) {
            (Some(c), Some(k)) => Some((PathBuf::from(c), PathBuf::from(k))),
            (Some(_), None) => return Err(TlsParamError::HalfClientCert("sslcert", "sslkey")),
            (None, Some(_)) => return Err(TlsParamError::HalfClientCert("sslkey", "sslcert")),
            (None, None) => default_dir.and_then(|d| {
                let (c, k) = (d.join("postgresql.crt"), d.join("postgresql.key"));
                (c.exists() && k.exists()).then_some((c, k))
            }),
        };
        if let Some((cert, key)) = &client_cert {
            pem.client_cert = Some(read("sslcert", cert, files::certificates_in)?);
            pem.client_key = Some(read("sslkey", key, files::private_key_in)?);
        }
        Ok(PgTls {
            requested,
            mode,
            root_cert,
            system_roots,
            client_cert,
            pem,
        })
    }

    /// Where the roots come from, for messages.
    pub fn roots_description(&self) -> String {
        match (&self.root_cert, self.system_roots) {
            (Some(p), true) => format!("the OS trust store ({}, sslrootcert=system)", p.display()),
            (Some(p), false) => format!("sslrootcert={}", p.display()),
            (None, _) => "no root certificate".into(),
        }
    }

    /// tokio-postgres' TLS connector for a SQL connection; what the handshake saw goes to
    /// `seen`.
    pub fn connector(&self, seen: Arc<Mutex<Seen>>) -> Result<MakeRustlsConnect, TlsParamError> {
        Ok(MakeRustlsConnect::new(self.client_config(seen)?))
    }

    /// The rustls configuration of a SQL connection; what the handshake saw goes to `seen`.
    pub fn client_config(&self, seen: Arc<Mutex<Seen>>) -> Result<ClientConfig, TlsParamError> {
        let provider = files::provider();
        let inner = match (&self.root_cert, self.mode.verifies()) {
            (_, false) => None,
            (Some(path), true) => {
                let roots = files::roots_in(held(&self.pem.ca))
                    .map_err(TlsParamError::file("sslrootcert", path))?;
                Some(self.webpki(roots, provider.clone())?)
            }
            // Not from `resolve`; refused by the verifier's builder (no roots).
            (None, true) => Some(self.webpki(RootCertStore::empty(), provider.clone())?),
        };
        let verifier = Arc::new(Verifier {
            inner,
            hostname: self.mode == SslMode::VerifyFull,
            provider: provider.clone(),
            seen,
        });
        let builder = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(TlsParamError::Rustls)?
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let mut config = match &self.client_cert {
            Some((cert, key)) => builder
                .with_client_auth_cert(
                    files::certificates_in(held(&self.pem.client_cert))
                        .map_err(TlsParamError::file("sslcert", cert))?,
                    files::private_key_in(held(&self.pem.client_key))
                        .map_err(TlsParamError::file("sslkey", key))?,
                )
                .map_err(|e| TlsParamError::BadFile {
                    param: "sslkey",
                    path: key.display().to_string(),
                    problem: format!("does not match sslcert={}: {e}", cert.display()),
                })?,
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![b"postgresql".to_vec()];
        // Every handshake shows the verifier the certificate (a resumed session would not), so
        // that `seen` tells whether this connection is encrypted.
        config.resumption = rustls::client::Resumption::disabled();
        Ok(config)
    }

    fn webpki(
        &self,
        roots: RootCertStore,
        provider: Arc<CryptoProvider>,
    ) -> Result<Arc<rustls::client::WebPkiServerVerifier>, TlsParamError> {
        rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .map_err(|e| TlsParamError::BadFile {
                param: "sslrootcert",
                path: self.roots_description(),
                problem: e.to_string(),
            })
    }

    /// The replication connection's TLS. `sql` is what the SQL connection of the same session
    /// saw: it settles `allow` (TLS only if the server refused plaintext) and, for `verify-ca`
    /// against a certificate that does not name `host`, gives a name the certificate holds (the
    /// replication library checks the chain against that name, so the chain is still verified).
    pub fn replication(&self, host: &str, sql: &Seen) -> TlsConfig {
        if is_unix_socket(host) {
            return TlsConfig::disabled();
        }
        let mut tls = match self.mode {
            SslMode::Disable => TlsConfig::disabled(),
            SslMode::Allow if sql.encrypted => TlsConfig::require(),
            SslMode::Allow => TlsConfig::disabled(),
            SslMode::Prefer => TlsConfig {
                mode: pgwire_replication::SslMode::Prefer,
                ..TlsConfig::require()
            },
            SslMode::Require => TlsConfig::require(),
            SslMode::VerifyCa => TlsConfig::verify_ca(self.root_cert.clone()),
            SslMode::VerifyFull => TlsConfig::verify_full(self.root_cert.clone()),
        };
        if let Some((cert, key)) = &self.client_cert {
            tls = tls.with_client_cert(cert.clone(), key.clone());
        }
        // What `resolve` read: the replication connection reads no file.
        tls = tls.with_pem_contents(self.pem.clone());
        match self.mode {
            SslMode::VerifyCa => {
                if let Some(name) = sql.cert_names.first() {
                    tls = tls.with_sni_hostname(name.clone());
                }
            }
            // The library refuses verify-full with an IP address unless the name is given;
            // rustls then checks the certificate's IP address entries, as libpq does.
            SslMode::VerifyFull if host.parse::<std::net::IpAddr>().is_ok() => {
                tls = tls.with_sni_hostname(host.to_string());
            }
            _ => {}
        }
        tls
    }
}

/// The contents of the file `param` = `path`, once `check` (which parses them) accepts them.
fn read<T>(
    param: &'static str,
    path: &Path,
    check: fn(&[u8]) -> Result<T, files::PemError>,
) -> Result<Arc<[u8]>, TlsParamError> {
    let pem = files::read(path).map_err(TlsParamError::file(param, path))?;
    check(&pem).map_err(TlsParamError::file(param, path))?;
    Ok(pem.into())
}

/// PEM contents `resolve` read (empty if it read none: then nothing parses).
fn held(pem: &Option<Arc<[u8]>>) -> &[u8] {
    pem.as_deref().unwrap_or_default()
}

/// A Unix-domain socket directory: as libpq, no TLS there (the kernel carries the bytes).
pub fn is_unix_socket(host: &str) -> bool {
    host.starts_with('/') || host.starts_with('@')
}

fn system_bundle() -> Option<PathBuf> {
    std::env::var_os("SSL_CERT_FILE")
        .filter(|f| !f.is_empty())
        .map(PathBuf::from)
        .into_iter()
        .chain(SYSTEM_BUNDLES.iter().map(PathBuf::from))
        .find(|p| p.is_file())
}

/// Checks the server's certificate as the mode asks: nothing (`allow`, `prefer`, `require`),
/// the chain (`verify-ca`) or the chain and the host name (`verify-full`); says what it saw.
///
/// Our own, because rustls' verifiers (and so tokio-postgres-rustls, which takes a rustls
/// configuration) know only verify-full; libpq's other modes are written here, on top of
/// rustls' `WebPkiServerVerifier`.
#[derive(Debug)]
struct Verifier {
    inner: Option<Arc<rustls::client::WebPkiServerVerifier>>,
    hostname: bool,
    provider: Arc<CryptoProvider>,
    seen: Arc<Mutex<Seen>>,
}

impl Verifier {
    fn saw(&self, f: impl FnOnce(&mut Seen)) {
        if let Ok(mut seen) = self.seen.lock() {
            f(&mut seen);
        }
    }
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.saw(|seen| seen.encrypted = true);
        let Some(inner) = &self.inner else {
            return Ok(ServerCertVerified::assertion());
        };
        match inner.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
            Err(rustls::Error::InvalidCertificate(CertificateError::NotValidForNameContext {
                presented,
                ..
            })) if !self.hostname => {
                // The chain is verified before the name, so only the name is wrong here.
                self.saw(|seen| {
                    seen.cert_names = presented.iter().filter_map(|p| usable_name(p)).collect();
                });
                Ok(ServerCertVerified::assertion())
            }
            Err(rustls::Error::InvalidCertificate(CertificateError::NotValidForName))
                if !self.hostname =>
            {
                Ok(ServerCertVerified::assertion())
            }
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A name from rustls' list of the names a certificate holds (`DnsName("db.example")`,
/// `IpAddress(10.0.0.1)`), usable as a server name; wildcards are not.
fn usable_name(presented: &str) -> Option<String> {
    let name = files::presented_name(presented);
    (name != presented && !name.contains('*') && ServerName::try_from(name).is_ok())
        .then(|| name.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_resolve_as_libpq_does() {
        let home = std::env::temp_dir().join(format!("pgtls-test-{}", std::process::id()));
        let resolve = |mode: Option<&str>, root: Option<&str>| {
            PgTls::resolve(
                &TlsParams {
                    sslmode: mode.map(Into::into),
                    sslrootcert: root.map(Into::into),
                    ..TlsParams::default()
                },
                Some(&home),
            )
        };
        for (written, mode) in [
            (None, SslMode::Prefer),
            (Some("disable"), SslMode::Disable),
            (Some("allow"), SslMode::Allow),
            (Some("prefer"), SslMode::Prefer),
            (Some("require"), SslMode::Require),
        ] {
            let tls = resolve(written, None).unwrap();
            assert_eq!((tls.requested, tls.mode), (mode, mode), "{written:?}");
        }
        let err = resolve(Some("verify-full"), None).unwrap_err().to_string();
        assert!(
            err.contains("sslrootcert") && err.contains("root.crt"),
            "{err}"
        );
        let err = resolve(Some("verify-everything"), None).unwrap_err();
        assert!(
            err.to_string().contains("sslmode=\"verify-everything\""),
            "{err}"
        );
        let err = resolve(Some("require"), Some("/nonexistent/ca.pem")).unwrap_err();
        assert!(
            matches!(
                err,
                TlsParamError::Unreadable {
                    param: "sslrootcert",
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("/nonexistent/ca.pem"), "{err}");
        let err = resolve(Some("require"), Some("system")).unwrap_err();
        assert!(
            matches!(err, TlsParamError::WeakModeWithSystemRoots("require")),
            "{err}"
        );
    }

    #[test]
    fn require_with_a_root_certificate_is_verify_ca() {
        let home = std::env::temp_dir().join(format!("pgtls-root-{}", std::process::id()));
        let dir = home.join(".postgresql");
        std::fs::create_dir_all(&dir).unwrap();
        let ca = concat!(env!("CARGO_MANIFEST_DIR"), "/src/testdata/ca.pem");
        let resolve = |mode: &str, root: Option<&str>| {
            let params = TlsParams {
                sslmode: Some(mode.into()),
                sslrootcert: root.map(Into::into),
                ..TlsParams::default()
            };
            PgTls::resolve(&params, Some(&home)).unwrap()
        };
        let explicit = resolve("require", Some(ca));
        assert_eq!(
            (explicit.requested, explicit.mode),
            (SslMode::Require, SslMode::VerifyCa)
        );
        assert_eq!(resolve("require", None).mode, SslMode::Require);
        // ~/.postgresql/root.crt, once it exists, is the default root certificate.
        std::fs::copy(ca, dir.join("root.crt")).unwrap();
        let default = resolve("require", None);
        assert_eq!(default.mode, SslMode::VerifyCa);
        assert_eq!(default.root_cert, Some(dir.join("root.crt")));
        assert_eq!(resolve("verify-full", None).mode, SslMode::VerifyFull);
        assert_eq!(resolve("prefer", None).mode, SslMode::Prefer);
        std::fs::remove_dir_all(&home).unwrap();
        // The file was read by `resolve`: connections no longer need it (a rotated file takes
        // a restart).
        let seen = Arc::new(Mutex::new(Seen::default()));
        default.client_config(seen).expect("what resolve read");
    }

    #[test]
    fn replication_tls_follows_the_mode_and_the_sql_connection() {
        use pgwire_replication::SslMode as Wire;
        let tls = |mode| PgTls {
            requested: mode,
            mode,
            root_cert: Some("/ca.pem".into()),
            system_roots: false,
            client_cert: Some(("/c.pem".into(), "/k.pem".into())),
            pem: PemContents {
                ca: Some(b"ca".to_vec().into()),
                client_cert: Some(b"cert".to_vec().into()),
                client_key: Some(b"key".to_vec().into()),
            },
        };
        let plain = Seen::default();
        let encrypted = Seen {
            encrypted: true,
            cert_names: vec![],
        };
        let wire = |mode, host: &str, seen: &Seen| tls(mode).replication(host, seen);
        assert_eq!(wire(SslMode::Disable, "db", &plain).mode, Wire::Disable);
        assert_eq!(wire(SslMode::Allow, "db", &plain).mode, Wire::Disable);
        assert_eq!(wire(SslMode::Allow, "db", &encrypted).mode, Wire::Require);
        assert_eq!(wire(SslMode::Prefer, "db", &plain).mode, Wire::Prefer);
        assert_eq!(wire(SslMode::Require, "db", &plain).mode, Wire::Require);
        let full = wire(SslMode::VerifyFull, "db", &plain);
        assert_eq!(
            (full.mode, full.sni_hostname, full.ca_pem_path),
            (Wire::VerifyFull, None, Some("/ca.pem".into()))
        );
        assert!(full.client_cert_pem_path.is_some() && full.client_key_pem_path.is_some());
        // The contents read at start travel with the paths: the library reads no file.
        assert_eq!(full.pem.client_key.as_deref(), Some(&b"key"[..]));
        assert_eq!(full.pem.ca.as_deref(), Some(&b"ca"[..]));
        let full_ip = wire(SslMode::VerifyFull, "10.0.0.5", &plain);
        assert_eq!(full_ip.sni_hostname.as_deref(), Some("10.0.0.5"));
        let named = Seen {
            encrypted: true,
            cert_names: vec!["db.internal".into()],
        };
        let ca = wire(SslMode::VerifyCa, "10.0.0.5", &named);
        assert_eq!(
            (ca.mode, ca.sni_hostname.as_deref()),
            (Wire::VerifyCa, Some("db.internal"))
        );
        assert_eq!(
            wire(SslMode::VerifyFull, "/run/postgresql", &plain).mode,
            Wire::Disable
        );
    }

    #[test]
    fn certificate_names_from_rustls() {
        assert_eq!(
            usable_name("DnsName(\"localhost\")").as_deref(),
            Some("localhost")
        );
        assert_eq!(
            usable_name("IpAddress(127.0.0.1)").as_deref(),
            Some("127.0.0.1")
        );
        assert_eq!(usable_name("DnsName(\"*.example.com\")"), None);
        assert_eq!(usable_name("DirectoryName"), None);
    }
}
