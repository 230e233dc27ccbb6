//! What is wrong with the TLS parameters of `postgres_url`, found before connecting.

use std::io;
use std::path::Path;

use crate::tls::PemError;

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
    #[error(
        "channel_binding=require needs TLS but sslmode=disable never uses it: set \
         sslmode=verify-full (or require) with channel_binding=require, or channel_binding=prefer"
    )]
    ChannelBindingWithoutTls,
    #[error("{0} is not supported by outbox-relay: remove it from postgres_url")]
    Unsupported(String),
    #[error("{0}")]
    Syntax(String),
    #[error("{0}")]
    Invalid(#[source] tokio_postgres::Error),
    #[error("cannot build the TLS configuration: {0}")]
    Rustls(#[source] rustls::Error),
}

impl TlsParamError {
    /// The file `param` = `path` cannot be used.
    pub(super) fn file(param: &'static str, path: &Path) -> impl FnOnce(PemError) -> Self {
        let path = path.display().to_string();
        move |e| match e {
            PemError::Unreadable(source) => TlsParamError::Unreadable {
                param,
                path,
                source,
            },
            PemError::Bad(problem) => TlsParamError::BadFile {
                param,
                path,
                problem,
            },
        }
    }
}
