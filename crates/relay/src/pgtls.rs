//! TLS to PostgreSQL with libpq's meaning of `sslmode`, `sslrootcert`, `sslcert` and `sslkey`,
//! for both the SQL connections (tokio-postgres) and the replication connection
//! (pgwire-replication).
//!
//! [`Target::parse`] is the one place that reads these parameters out of `postgres_url` (URL or
//! key=value form). It yields the tokio-postgres [`Config`](tokio_postgres::Config) without them
//! and a [`PgTls`] that builds the rustls client configuration of the SQL connection
//! ([`MakeRustls`]) and the replication connection's [`TlsConfig`].

use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use percent_encoding::percent_decode_str;
use pgwire_replication::TlsConfig;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect, TlsStream};

/// libpq TLS parameters the relay does not implement: refused by name rather than ignored.
const UNSUPPORTED_KEYS: &[&str] = &[
    "sslpassword",
    "sslcrl",
    "sslcrldir",
    "sslcompression",
    "sslsni",
    "sslcertmode",
    "ssl_min_protocol_version",
    "ssl_max_protocol_version",
    "requiressl",
    "gssencmode",
];

/// Where the OS keeps its trusted roots as one PEM bundle (`sslrootcert=system`), after
/// `SSL_CERT_FILE`.
const SYSTEM_BUNDLES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/ssl/cert.pem",
];

/// A problem with the TLS parameters of `postgres_url`, found before connecting.
#[derive(Debug, thiserror::Error)]
pub enum TlsParamError {
    #[error(
        "sslmode={0:?} is not a valid sslmode: use disable, allow, prefer, require, verify-ca or \
         verify-full"
    )]
    UnknownSslMode(String),
    #[error(
        "{param}={path}: cannot read the file: {source}; fix the path or the file's permissions"
    )]
    Unreadable {
        param: &'static str,
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("{param}={path}: {problem}")]
    BadFile {
        param: &'static str,
        path: String,
        problem: String,
    },
    #[error(
        "sslmode={mode} verifies the server's certificate but there is no root certificate: the \
         default sslrootcert {default} does not exist; set sslrootcert to the CA file that signed \
         the server's certificate (or sslrootcert=system for the OS trust store), or use \
         sslmode=require to encrypt without verifying"
    )]
    NoRootCert { mode: &'static str, default: String },
    #[error(
        "sslrootcert=system needs sslmode=verify-full (libpq refuses the weaker sslmode={0} with \
         the system trust store): set sslmode=verify-full"
    )]
    WeakModeWithSystemRoots(&'static str),
    #[error(
        "sslrootcert=system: no OS trust store found (set SSL_CERT_FILE or install the \
         ca-certificates package)"
    )]
    NoSystemRoots,
    #[error("{0} is set without {1}: a client certificate needs both sslcert and sslkey")]
    HalfClientCert(&'static str, &'static str),
    #[error("{0} is not supported by outbox-relay: remove it from postgres_url")]
    Unsupported(String),
    #[error("{0}")]
    Syntax(String),
    #[error("{0}")]
    Invalid(#[source] tokio_postgres::Error),
    #[error("cannot build the TLS configuration: {0}")]
    Rustls(#[source] rustls::Error),
}

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
}

/// The parameters as written, before defaults.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct TlsParams {
    pub sslmode: Option<String>,
    pub sslrootcert: Option<String>,
    pub sslcert: Option<String>,
    pub sslkey: Option<String>,
}

/// `postgres_url` taken apart: the tokio-postgres settings and the TLS settings.
#[derive(Debug, Clone)]
pub struct Target {
    pub config: tokio_postgres::Config,
    pub tls: PgTls,
}

impl Target {
    /// Parses `postgres_url`; checks the TLS parameters and that their files are readable.
    pub fn parse(url: &str) -> Result<Target, TlsParamError> {
        let (rest, params) = split(url)?;
        let config: tokio_postgres::Config = rest.parse().map_err(TlsParamError::Invalid)?;
        let tls = PgTls::resolve(&params, home().as_deref())?;
        Ok(Target { config, tls })
    }

    /// The first host, for messages and for the replication connection.
    pub fn host(&self) -> String {
        host_of(&self.config)
    }

    /// Whether `postgres_url` lists several hosts (a primary and its standbys).
    pub fn is_multi_host(&self) -> bool {
        self.config.get_hosts().len() > 1
    }

    /// How many hosts `postgres_url` lists (at least one: `localhost` by default).
    pub fn host_count(&self) -> usize {
        self.config.get_hosts().len().max(1)
    }

    /// `host:port` of the `i`th host, for messages.
    pub fn endpoint(&self, i: usize) -> String {
        let only = self.only(i);
        let port = only.config.get_ports().first().copied().unwrap_or(5432);
        format!("{}:{port}", only.host())
    }

    /// This target narrowed to its `i`th host (with that host's port and hostaddr, libpq's
    /// pairing: one port for all hosts or one per host). Every other setting is kept but
    /// `target_session_attrs`: the relay finds the primary itself ([`crate::pg::connect`]).
    pub fn only(&self, i: usize) -> Target {
        let from = &self.config;
        if from.get_hosts().len() <= 1 {
            return self.clone();
        }
        let mut to = tokio_postgres::Config::new();
        match &from.get_hosts()[i.min(from.get_hosts().len() - 1)] {
            tokio_postgres::config::Host::Tcp(h) => to.host(h.as_str()),
            tokio_postgres::config::Host::Unix(p) => to.host_path(p),
        };
        if let Some(addr) = from.get_hostaddrs().get(i) {
            to.hostaddr(*addr);
        }
        let ports = from.get_ports();
        if let Some(port) = ports.get(i).or(ports.first()) {
            to.port(*port);
        }
        if let Some(user) = from.get_user() {
            to.user(user);
        }
        if let Some(password) = from.get_password() {
            to.password(password);
        }
        if let Some(dbname) = from.get_dbname() {
            to.dbname(dbname);
        }
        if let Some(options) = from.get_options() {
            to.options(options);
        }
        if let Some(name) = from.get_application_name() {
            to.application_name(name);
        }
        // A host that is down may not refuse at once (a dead machine): bound each attempt.
        to.connect_timeout(
            from.get_connect_timeout()
                .copied()
                .unwrap_or(MULTI_HOST_CONNECT_TIMEOUT),
        );
        if let Some(t) = from.get_tcp_user_timeout() {
            to.tcp_user_timeout(*t);
        }
        to.keepalives(from.get_keepalives())
            .keepalives_idle(from.get_keepalives_idle());
        if let Some(t) = from.get_keepalives_interval() {
            to.keepalives_interval(t);
        }
        if let Some(n) = from.get_keepalives_retries() {
            to.keepalives_retries(n);
        }
        to.ssl_mode(from.get_ssl_mode())
            .channel_binding(from.get_channel_binding());
        Target {
            config: to,
            tls: self.tls.clone(),
        }
    }
}

/// Connect timeout per host of a multi-host `postgres_url` that sets none (`connect_timeout`).
pub const MULTI_HOST_CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The first host of `config` (`localhost` when none is given).
pub fn host_of(config: &tokio_postgres::Config) -> String {
    nth_host(config, 0)
}

/// The `i`-th host of `config` as text: a name, an address or a socket directory
/// (`localhost` when there is none).
pub fn nth_host(config: &tokio_postgres::Config, i: usize) -> String {
    match config.get_hosts().get(i) {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
        None => "localhost".into(),
    }
}

fn home() -> Option<PathBuf> {
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(PathBuf::from)
}

/// Splits the TLS parameters off `url` (URL or key=value form): the rest, unchanged, and the
/// parameters, decoded.
pub fn split(url: &str) -> Result<(String, TlsParams), TlsParamError> {
    let mut params = TlsParams::default();
    let mut take = |key: &str, value: String| -> Result<bool, TlsParamError> {
        let slot = match key {
            "sslmode" => &mut params.sslmode,
            "sslrootcert" => &mut params.sslrootcert,
            "sslcert" => &mut params.sslcert,
            "sslkey" => &mut params.sslkey,
            // The default, SSLRequest first: the only negotiation both connections know.
            "sslnegotiation" if value == "postgres" => return Ok(true),
            "sslnegotiation" => {
                return Err(TlsParamError::Unsupported(format!(
                    "sslnegotiation={value}"
                )));
            }
            k if UNSUPPORTED_KEYS.contains(&k) => {
                return Err(TlsParamError::Unsupported(k.to_string()));
            }
            _ => return Ok(false),
        };
        *slot = Some(value);
        Ok(true)
    };
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let Some((base, query)) = url.split_once('?') else {
            return Ok((url.to_string(), params));
        };
        let mut kept = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let key = decode(k, "parameter name")?;
            if !take(&key, decode(v, &key)?)? {
                kept.push(pair);
            }
        }
        let rest = if kept.is_empty() {
            base.to_string()
        } else {
            format!("{base}?{}", kept.join("&"))
        };
        return Ok((rest, params));
    }
    let mut kept = Vec::new();
    for (key, value, text) in conninfo_pairs(url)? {
        if !take(&key, value)? {
            kept.push(text);
        }
    }
    Ok((kept.join(" "), params))
}

fn decode(s: &str, what: &str) -> Result<String, TlsParamError> {
    percent_decode_str(s)
        .decode_utf8()
        .map(|c| c.into_owned())
        .map_err(|_| TlsParamError::Syntax(format!("postgres_url: {what} is not valid UTF-8")))
}

/// The `key = value` pairs of a libpq key=value string: key, unquoted value, original text.
fn conninfo_pairs(s: &str) -> Result<Vec<(String, String, &str)>, TlsParamError> {
    let bytes = s.as_bytes();
    let mut pairs = Vec::new();
    let mut i = 0;
    let skip_ws = |i: &mut usize| {
        while *i < bytes.len() && bytes[*i].is_ascii_whitespace() {
            *i += 1;
        }
    };
    loop {
        skip_ws(&mut i);
        if i >= bytes.len() {
            return Ok(pairs);
        }
        let start = i;
        while i < bytes.len() && bytes[i] != b'=' && !bytes[i].is_ascii_whitespace() {
            i += 1;
        }
        let key = s[start..i].to_string();
        skip_ws(&mut i);
        if i >= bytes.len() || bytes[i] != b'=' {
            return Err(TlsParamError::Syntax(format!(
                "postgres_url: expected \"=\" after {key:?} (key=value form: host=db user=relay ...)"
            )));
        }
        i += 1;
        skip_ws(&mut i);
        let mut value = Vec::new();
        if i < bytes.len() && bytes[i] == b'\'' {
            i += 1;
            loop {
                match bytes.get(i) {
                    None => {
                        return Err(TlsParamError::Syntax(format!(
                            "postgres_url: unterminated quoted value of {key:?}"
                        )));
                    }
                    Some(b'\'') => {
                        i += 1;
                        break;
                    }
                    Some(b'\\') if i + 1 < bytes.len() => {
                        value.push(bytes[i + 1]);
                        i += 2;
                    }
                    Some(&b) => {
                        value.push(b);
                        i += 1;
                    }
                }
            }
        } else {
            while i < bytes.len() && !bytes[i].is_ascii_whitespace() {
                if bytes[i] == b'\\' && i + 1 < bytes.len() {
                    i += 1;
                }
                value.push(bytes[i]);
                i += 1;
            }
        }
        let value = String::from_utf8(value).map_err(|_| {
            TlsParamError::Syntax(format!("postgres_url: value of {key:?} is not valid UTF-8"))
        })?;
        pairs.push((key, value, &s[start..i]));
    }
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
            });
        }
        if let Some(path) = &root_cert {
            load_roots(path, "sslrootcert")?;
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
            load_chain(cert)?;
            load_key(key)?;
        }
        Ok(PgTls {
            requested,
            mode,
            root_cert,
            system_roots,
            client_cert,
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

    /// The rustls configuration of a SQL connection; what the handshake saw goes to `seen`.
    pub fn client_config(&self, seen: Arc<Mutex<Seen>>) -> Result<ClientConfig, TlsParamError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = RootCertStore::empty();
        if let Some(path) = &self.root_cert {
            roots = load_roots(path, "sslrootcert")?;
        }
        let verifier: Arc<dyn ServerCertVerifier> = if self.mode.verifies() {
            let webpki = rustls::client::WebPkiServerVerifier::builder_with_provider(
                Arc::new(roots),
                provider.clone(),
            )
            .build()
            .map_err(|e| TlsParamError::BadFile {
                param: "sslrootcert",
                path: self.roots_description(),
                problem: e.to_string(),
            })?;
            Arc::new(Verifier {
                inner: Some(webpki),
                hostname: self.mode == SslMode::VerifyFull,
                provider: provider.clone(),
                seen,
            })
        } else {
            Arc::new(Verifier {
                inner: None,
                hostname: false,
                provider: provider.clone(),
                seen,
            })
        };
        let builder = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(TlsParamError::Rustls)?
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let mut config = match &self.client_cert {
            Some((cert, key)) => builder
                .with_client_auth_cert(load_chain(cert)?, load_key(key)?)
                .map_err(|e| TlsParamError::BadFile {
                    param: "sslkey",
                    path: key.display().to_string(),
                    problem: format!("does not match sslcert={}: {e}", cert.display()),
                })?,
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![b"postgresql".to_vec()];
        Ok(config)
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

fn read(path: &Path, param: &'static str) -> Result<Vec<u8>, TlsParamError> {
    std::fs::read(path).map_err(|source| TlsParamError::Unreadable {
        param,
        path: path.display().to_string(),
        source,
    })
}

fn load_roots(path: &Path, param: &'static str) -> Result<RootCertStore, TlsParamError> {
    let bad = |problem: String| TlsParamError::BadFile {
        param,
        path: path.display().to_string(),
        problem,
    };
    let pem = read(path, param)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(format!("not a PEM certificate file: {e}")))?;
    let mut roots = RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(certs);
    if added == 0 {
        return Err(bad("holds no usable PEM certificate".into()));
    }
    Ok(roots)
}

fn load_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsParamError> {
    let pem = read(path, "sslcert")?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .ok()
        .filter(|c| !c.is_empty())
        .ok_or_else(|| TlsParamError::BadFile {
            param: "sslcert",
            path: path.display().to_string(),
            problem: "holds no PEM certificate".into(),
        })?;
    Ok(certs)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsParamError> {
    let pem = read(path, "sslkey")?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| TlsParamError::BadFile {
        param: "sslkey",
        path: path.display().to_string(),
        problem: format!("holds no PEM private key (PKCS#8, PKCS#1 or SEC1): {e}"),
    })
}

/// What a SQL connection's handshake saw.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Seen {
    /// The connection is encrypted.
    pub encrypted: bool,
    /// Under verify-ca, the names of a certificate that does not name the host.
    pub cert_names: Vec<String>,
}

/// Checks the server's certificate as the mode asks: nothing (`allow`, `prefer`, `require`),
/// the chain (`verify-ca`) or the chain and the host name (`verify-full`).
#[derive(Debug)]
struct Verifier {
    inner: Option<Arc<rustls::client::WebPkiServerVerifier>>,
    hostname: bool,
    provider: Arc<CryptoProvider>,
    seen: Arc<Mutex<Seen>>,
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
        let Some(inner) = &self.inner else {
            return Ok(ServerCertVerified::assertion());
        };
        match inner.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
            Err(rustls::Error::InvalidCertificate(CertificateError::NotValidForNameContext {
                presented,
                ..
            })) if !self.hostname => {
                // The chain is verified before the name, so only the name is wrong here.
                if let Ok(mut seen) = self.seen.lock() {
                    seen.cert_names = presented.iter().filter_map(|p| usable_name(p)).collect();
                }
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
    let name = if let Some(dns) = presented.strip_prefix("DnsName(\"") {
        dns.strip_suffix("\")")?
    } else {
        presented.strip_prefix("IpAddress(")?.strip_suffix(')')?
    };
    (!name.contains('*') && ServerName::try_from(name).is_ok()).then(|| name.to_string())
}

/// What went wrong with a certificate, from a rustls error or its text (the replication library
/// reports its TLS errors as text).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertProblem {
    UnknownCa,
    HostnameMismatch,
    Expired,
    NotYetValid,
    Other,
}

impl CertProblem {
    pub fn of(e: &rustls::Error) -> Option<CertProblem> {
        let rustls::Error::InvalidCertificate(c) = e else {
            return None;
        };
        Some(match c {
            CertificateError::UnknownIssuer => CertProblem::UnknownCa,
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                CertProblem::HostnameMismatch
            }
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                CertProblem::Expired
            }
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                CertProblem::NotYetValid
            }
            _ => CertProblem::Other,
        })
    }

    pub fn of_text(text: &str) -> Option<CertProblem> {
        if !text.contains("invalid peer certificate") {
            return None;
        }
        Some(if text.contains("UnknownIssuer") {
            CertProblem::UnknownCa
        } else if text.contains("not valid for name") || text.contains("NotValidForName") {
            CertProblem::HostnameMismatch
        } else if text.contains("expired") || text.contains("Expired") {
            CertProblem::Expired
        } else if text.contains("not valid yet") || text.contains("NotValidYet") {
            CertProblem::NotYetValid
        } else {
            CertProblem::Other
        })
    }

    /// The operator's message: what is wrong and what to change.
    pub fn explain(self, tls: &PgTls, host: &str, detail: &str) -> String {
        let roots = tls.roots_description();
        match self {
            CertProblem::UnknownCa => format!(
                "the server's certificate is not signed by a CA in {roots} (unknown CA): set \
                 sslrootcert in postgres_url to the CA file that signed the server's certificate"
            ),
            CertProblem::HostnameMismatch => format!(
                "the server's certificate does not name host {host:?} (hostname mismatch; \
                 {detail}): connect with a host name the certificate holds, fix the server's \
                 certificate, or use sslmode=verify-ca to check only the CA"
            ),
            CertProblem::Expired => format!(
                "the server's certificate has expired ({detail}): renew the certificate on the \
                 server (sslrootcert={} is checked against it)",
                tls.root_cert
                    .as_deref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default()
            ),
            CertProblem::NotYetValid => format!(
                "the server's certificate is not valid yet ({detail}): check the clocks of the \
                 server and of this host"
            ),
            CertProblem::Other => format!(
                "the server's certificate failed verification against {roots} ({detail}): check \
                 sslrootcert and the server's certificate"
            ),
        }
    }
}

/// tokio-postgres' TLS connector over rustls.
#[derive(Clone)]
pub struct MakeRustls {
    config: Arc<ClientConfig>,
    seen: Arc<Mutex<Seen>>,
}

impl MakeRustls {
    pub fn new(config: ClientConfig, seen: Arc<Mutex<Seen>>) -> MakeRustls {
        MakeRustls {
            config: Arc::new(config),
            seen,
        }
    }
}

impl<S> MakeTlsConnect<S> for MakeRustls
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type TlsConnect = RustlsConnect;
    type Error = rustls::pki_types::InvalidDnsNameError;

    fn make_tls_connect(&mut self, domain: &str) -> Result<RustlsConnect, Self::Error> {
        Ok(RustlsConnect {
            name: ServerName::try_from(domain.to_string())?,
            config: self.config.clone(),
            seen: self.seen.clone(),
        })
    }
}

pub struct RustlsConnect {
    name: ServerName<'static>,
    config: Arc<ClientConfig>,
    seen: Arc<Mutex<Seen>>,
}

type ConnectFuture<S> = Pin<Box<dyn Future<Output = io::Result<RustlsStream<S>>> + Send>>;

impl<S> TlsConnect<S> for RustlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type Error = io::Error;
    type Future = ConnectFuture<S>;

    fn connect(self, stream: S) -> ConnectFuture<S> {
        Box::pin(async move {
            let connector = tokio_rustls::TlsConnector::from(self.config);
            let stream = connector.connect(self.name, stream).await?;
            if let Ok(mut seen) = self.seen.lock() {
                seen.encrypted = true;
            }
            Ok(RustlsStream(Box::new(stream)))
        })
    }
}

pub struct RustlsStream<S>(Box<tokio_rustls::client::TlsStream<S>>);

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for RustlsStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for RustlsStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_shutdown(cx)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> TlsStream for RustlsStream<S> {
    fn channel_binding(&self) -> ChannelBinding {
        ChannelBinding::none()
    }
}

/// The rustls error somewhere in `e`'s chain of sources.
pub fn rustls_error<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(r) = err.downcast_ref::<rustls::Error>() {
            return Some(r);
        }
        if let Some(io) = err.downcast_ref::<io::Error>()
            && let Some(r) = io.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>())
        {
            return Some(r);
        }
        cur = err.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(url: &str) -> (String, TlsParams) {
        split(url).unwrap()
    }

    #[test]
    fn a_multi_host_url_narrows_to_each_host_with_its_port() {
        let t = Target::parse(
            "postgres://relay:pw@db1:5433,db2:5434/app?application_name=x&sslmode=disable\
             &target_session_attrs=read-write",
        )
        .unwrap();
        assert!(t.is_multi_host());
        assert_eq!(
            (t.endpoint(0), t.endpoint(1)),
            ("db1:5433".into(), "db2:5434".into())
        );
        let second = t.only(1);
        assert!(!second.is_multi_host());
        assert_eq!(second.host(), "db2");
        assert_eq!(second.config.get_ports(), &[5434]);
        assert_eq!(second.config.get_user(), Some("relay"));
        assert_eq!(second.config.get_password(), Some(&b"pw"[..]));
        assert_eq!(second.config.get_dbname(), Some("app"));
        assert_eq!(second.config.get_application_name(), Some("x"));
        assert_eq!(
            second.config.get_connect_timeout(),
            Some(&MULTI_HOST_CONNECT_TIMEOUT)
        );
        // One port for all hosts (libpq), key=value form.
        let t = Target::parse("host=a,b port=6000 dbname=app user=u").unwrap();
        assert_eq!(
            (t.endpoint(0), t.endpoint(1)),
            ("a:6000".into(), "b:6000".into())
        );
        assert_eq!(
            crate::pg::describe("host=a,b port=6000 dbname=app"),
            "a:6000,b:6000/app"
        );
    }

    #[test]
    fn url_form_strips_the_tls_parameters_and_decodes_them() {
        let (rest, p) = params(
            "postgres://relay:p%40ss@db:5432/app?application_name=x&sslmode=verify-full\
             &sslrootcert=%2Fetc%2Fca%20certs%2Froot.pem&connect_timeout=5",
        );
        assert_eq!(
            rest,
            "postgres://relay:p%40ss@db:5432/app?application_name=x&connect_timeout=5"
        );
        assert_eq!(p.sslmode.as_deref(), Some("verify-full"));
        assert_eq!(p.sslrootcert.as_deref(), Some("/etc/ca certs/root.pem"));
        let (rest, p) = params("postgresql://db/app?sslmode=require");
        assert_eq!(rest, "postgresql://db/app");
        assert_eq!(p.sslmode.as_deref(), Some("require"));
        let (rest, p) = params("postgres://db/app");
        assert_eq!(
            (rest.as_str(), p),
            ("postgres://db/app", TlsParams::default())
        );
    }

    #[test]
    fn key_value_form_strips_the_tls_parameters_and_unquotes_them() {
        let (rest, p) = params(
            r"host=db user=relay password='it\'s' sslmode = verify-ca sslrootcert='/tmp/my ca\'s.pem' dbname=app sslcert=/c\ d.pem sslkey=/k.pem",
        );
        assert_eq!(rest, r"host=db user=relay password='it\'s' dbname=app");
        assert_eq!(p.sslmode.as_deref(), Some("verify-ca"));
        assert_eq!(p.sslrootcert.as_deref(), Some("/tmp/my ca's.pem"));
        assert_eq!(p.sslcert.as_deref(), Some("/c d.pem"));
        assert_eq!(p.sslkey.as_deref(), Some("/k.pem"));
        assert!(matches!(
            split("host=db sslmode"),
            Err(TlsParamError::Syntax(_))
        ));
        assert!(matches!(split("host='db"), Err(TlsParamError::Syntax(_))));
    }

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
    }

    #[test]
    fn unsupported_libpq_parameters_are_named() {
        let err = split("host=db sslnegotiation=direct").unwrap_err();
        assert!(
            err.to_string()
                .starts_with("sslnegotiation=direct is not supported"),
            "{err}"
        );
        let (rest, _) = split("host=db sslnegotiation=postgres").unwrap();
        assert_eq!(rest, "host=db");
        let err = split("postgres://db/app?sslcrl=/x.crl").unwrap_err();
        assert_eq!(
            err.to_string(),
            "sslcrl is not supported by outbox-relay: remove it from postgres_url"
        );
        let err = Target::parse("postgres://db/app?sslmode=bogus").unwrap_err();
        assert!(err.to_string().starts_with("sslmode=\"bogus\""), "{err}");
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

    #[test]
    fn certificate_problems_from_text() {
        let text = "TLS handshake failed: invalid peer certificate: UnknownIssuer";
        assert_eq!(CertProblem::of_text(text), Some(CertProblem::UnknownCa));
        let text = "TLS handshake failed: invalid peer certificate: certificate not valid for \
                    name \"127.0.0.1\"; certificate is only valid for DnsName(\"localhost\")";
        assert_eq!(
            CertProblem::of_text(text),
            Some(CertProblem::HostnameMismatch)
        );
        assert_eq!(CertProblem::of_text("connection reset"), None);
    }
}
