//! `clickhouse_url` and the ClickHouse TLS settings: parsed and read once, at start.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use super::{ClickHouseCompression, Config, ConfigError};

/// How long a step of an insert or a query may take unless configured otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);

/// A ClickHouse HTTP endpoint parsed from `http://user:password@host:8123/database`, with the
/// TLS settings for `https://`.
#[derive(Debug, Clone)]
pub struct ClickHouseTarget {
    /// `scheme://host:port`, without credentials or path.
    pub url: String,
    pub user: String,
    pub password: String,
    pub database: String,
    /// For `https://`: the roots (and client certificate) to use; None: the system trust store
    /// and the built-in roots.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// `clickhouse_compression`.
    pub compression: ClickHouseCompression,
}

impl ClickHouseTarget {
    /// The endpoint `clickhouse_url` names, with the TLS settings (`clickhouse_ca_file`,
    /// `clickhouse_client_cert`, `clickhouse_client_key`) read from their files.
    /// Only configuration loading calls this: everyone else takes [`Config::clickhouse`].
    pub(super) fn from_config(config: &Config) -> Result<ClickHouseTarget, ConfigError> {
        let mut target = ClickHouseTarget::parse(&config.clickhouse_url)?;
        target.compression = config.clickhouse_compression;
        let files = [
            ("clickhouse_ca_file", &config.clickhouse_ca_file),
            ("clickhouse_client_cert", &config.clickhouse_client_cert),
            ("clickhouse_client_key", &config.clickhouse_client_key),
        ];
        let https = target.url.starts_with("https://");
        if let Some((setting, _)) = files.iter().find(|(_, v)| !v.is_empty())
            && !https
        {
            return Err(crate::config::invalid(
                setting,
                "is set but clickhouse_url is http://: use https:// (the ClickHouse HTTPS port, \
                 8443 by default), or leave the setting empty",
            ));
        }
        if https {
            target.tls = Some(Arc::new(tls_config(
                &config.clickhouse_ca_file,
                &config.clickhouse_client_cert,
                &config.clickhouse_client_key,
            )?));
        }
        Ok(target)
    }

    pub fn parse(raw: &str) -> Result<ClickHouseTarget, ConfigError> {
        let bad = |problem: String| ConfigError::Invalid {
            setting: "clickhouse_url".into(),
            env: "RELAY_CLICKHOUSE_URL".into(),
            problem,
        };
        if raw.trim().is_empty() {
            return Err(bad(
                "is required, e.g. http://default:secret@clickhouse:8123/default".into(),
            ));
        }
        let url = url::Url::parse(raw).map_err(|e| bad(format!("is not a URL: {e}")))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(bad(format!(
                "scheme {:?} is not supported: use http:// or https:// (the ClickHouse HTTP interface, port 8123 or 8443)",
                url.scheme()
            )));
        }
        let host = url
            .host_str()
            .ok_or_else(|| bad("has no host".into()))?
            .to_string();
        let port = url.port_or_known_default().unwrap_or(8123);
        // URL parsing drops `.` and `..` path segments (also as %2E): a database of that name
        // would silently become `default`.
        let raw_path = raw.split_once("://").map_or(raw, |(_, rest)| rest);
        let raw_path = raw_path.split(['?', '#']).next().unwrap_or_default();
        if let Some((_, segment)) = raw_path.split_once('/')
            && matches!(
                percent_decode(segment.trim_matches('/')).as_deref(),
                Some(".") | Some("..")
            )
        {
            return Err(bad(format!(
                "database {segment:?}: a URL cannot name a database `.` or `..`; choose another name"
            )));
        }
        let path = url.path().trim_matches('/');
        if path.contains('/') {
            return Err(bad(format!(
                "path {:?} must be a single database name (percent-encode a / in the name as %2F)",
                url.path()
            )));
        }
        let database = percent_decode(path).ok_or_else(|| {
            bad(format!(
                "database {path:?} is not valid percent-encoded UTF-8"
            ))
        })?;
        // RFC 3986 percent-decoding: `%2B` is `+` and `+` stays `+` (a URL's userinfo is not a
        // form, where `+` would mean a space).
        let decode = |what: &str, s: &str| {
            percent_encoding::percent_decode_str(s)
                .decode_utf8()
                .map(|v| v.into_owned())
                .map_err(|_| bad(format!("the {what} is not UTF-8 once percent-decoded")))
        };
        Ok(ClickHouseTarget {
            url: format!("{}://{}:{}", url.scheme(), host, port),
            user: if url.username().is_empty() {
                "default".into()
            } else {
                decode("user name", url.username())?
            },
            password: match url.password() {
                Some(p) => decode("password", p)?,
                None => String::new(),
            },
            database: if database.is_empty() {
                "default".into()
            } else {
                database.to_string()
            },
            tls: None,
            compression: ClickHouseCompression::default(),
        })
    }
}

/// The TLS client configuration: trusted roots are the built-in (webpki) ones, the system's
/// (honouring `SSL_CERT_FILE` and `SSL_CERT_DIR`) and the PEM bundle `ca_file`; with
/// `client_cert` and `client_key`, the certificate the relay presents. Empty paths are unset.
pub fn tls_config(
    ca_file: &str,
    client_cert: &str,
    client_key: &str,
) -> Result<rustls::ClientConfig, ConfigError> {
    use crate::config::invalid;
    use crate::tls::{self, PemError};

    fn file<'a>(setting: &'static str, path: &'a str) -> impl FnOnce(PemError) -> ConfigError + 'a {
        move |e| match e {
            PemError::Unreadable(e) => invalid(setting, format!("cannot read {path:?}: {e}")),
            PemError::Bad(problem) => invalid(setting, format!("{path:?} {problem}")),
        }
    }
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    let native = rustls_native_certs::load_native_certs();
    for error in &native.errors {
        tracing::debug!(%error, "skipping part of the system trust store");
    }
    roots.add_parsable_certificates(native.certs);
    if !ca_file.is_empty() {
        let file_roots =
            tls::roots(Path::new(ca_file)).map_err(file("clickhouse_ca_file", ca_file))?;
        roots.roots.extend(file_roots.roots);
    }
    let builder = rustls::ClientConfig::builder_with_provider(tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| invalid("clickhouse_url", format!("TLS is not available: {e}")))?
        .with_root_certificates(roots);
    match (client_cert.is_empty(), client_key.is_empty()) {
        (true, true) => Ok(builder.with_no_client_auth()),
        (false, true) => Err(invalid(
            "clickhouse_client_key",
            "is required with clickhouse_client_cert: the PEM private key of that certificate",
        )),
        (true, false) => Err(invalid(
            "clickhouse_client_cert",
            "is required with clickhouse_client_key: the PEM certificate of that key",
        )),
        (false, false) => {
            let certs = tls::certificates(Path::new(client_cert))
                .map_err(file("clickhouse_client_cert", client_cert))?;
            let key = tls::private_key(Path::new(client_key))
                .map_err(file("clickhouse_client_key", client_key))?;
            builder.with_client_auth_cert(certs, key).map_err(|e| {
                invalid(
                    "clickhouse_client_key",
                    format!("does not fit clickhouse_client_cert: {e}"),
                )
            })
        }
    }
}

/// `%XX` escapes decoded as RFC 3986 says (a `+` stays `+`); `None` when the result is not UTF-8.
fn percent_decode(text: &str) -> Option<String> {
    percent_encoding::percent_decode_str(text)
        .decode_utf8()
        .ok()
        .map(|c| c.into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_clickhouse_urls() {
        let t = ClickHouseTarget::parse("http://relay:s%40cret@ch.local:8123/analytics").unwrap();
        assert_eq!(t.url, "http://ch.local:8123");
        assert_eq!(t.user, "relay");
        assert_eq!(t.password, "s@cret");
        assert_eq!(t.database, "analytics");
        // RFC 3986: `+` is a plain character in userinfo, `%2B` its encoding, `%20` a space.
        let t = ClickHouseTarget::parse("http://a+b%20c:p+w%2Bx%20y@ch.local/db").unwrap();
        assert_eq!((t.user.as_str(), t.password.as_str()), ("a+b c", "p+w+x y"));
        let t = ClickHouseTarget::parse("https://ch.local").unwrap();
        assert_eq!(
            (t.url.as_str(), t.user.as_str(), t.database.as_str()),
            ("https://ch.local:443", "default", "default")
        );
        for bad in ["", "tcp://ch:9000/db", "http://ch:8123/a/b", "not a url"] {
            let err = ClickHouseTarget::parse(bad).unwrap_err().to_string();
            assert!(err.contains("RELAY_CLICKHOUSE_URL"), "{bad}: {err}");
        }
    }

    #[test]
    fn tls_settings_are_checked_at_start() {
        let config = |url: &str, ca: &str, cert: &str, key: &str| Config {
            clickhouse_url: url.into(),
            clickhouse_ca_file: ca.into(),
            clickhouse_client_cert: cert.into(),
            clickhouse_client_key: key.into(),
            ..Config::default()
        };
        let err = |c: Config| ClickHouseTarget::from_config(&c).unwrap_err().to_string();
        let e = err(config("http://ch:8123", "/etc/ca.pem", "", ""));
        assert!(
            e.contains("clickhouse_ca_file") && e.contains("https://"),
            "{e}"
        );
        let e = err(config("https://ch:8443", "/nonexistent.pem", "", ""));
        assert!(
            e.contains("RELAY_CLICKHOUSE_CA_FILE") && e.contains("cannot read"),
            "{e}"
        );
        let e = err(config("https://ch:8443", "", "/x.pem", ""));
        assert!(e.contains("clickhouse_client_key"), "{e}");
        let e = err(config("https://ch:8443", "", "", "/x.key"));
        assert!(e.contains("clickhouse_client_cert"), "{e}");
        let t = ClickHouseTarget::from_config(&config("https://ch:8443", "", "", "")).unwrap();
        assert!(t.tls.is_some());
    }
}
