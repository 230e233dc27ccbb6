//! The connection string: `postgres_url` (URL or key=value form) taken apart into the
//! tokio-postgres settings and libpq's TLS parameters, which tokio-postgres does not know
//! ([`Target::parse`]), and narrowed to one host of a multi-host URL ([`Target::only`]).

use std::path::PathBuf;

use percent_encoding::percent_decode_str;
use tokio_postgres::config::ChannelBinding;

use super::error::TlsParamError;
use super::tls::{PgTls, TlsParams};

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
        // libpq would fail at every connection, after asking the server for a password.
        if config.get_channel_binding() == ChannelBinding::Require
            && tls.mode == super::SslMode::Disable
        {
            return Err(TlsParamError::ChannelBindingWithoutTls);
        }
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
        assert_eq!(crate::pg::describe(&t), "a:6000,b:6000/app");
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
    fn channel_binding_is_read_and_checked() {
        let binding = |url: &str| Target::parse(url).map(|t| t.config.get_channel_binding());
        assert_eq!(
            binding("postgres://db/app?sslmode=require&channel_binding=require").unwrap(),
            ChannelBinding::Require
        );
        assert_eq!(
            binding("host=db channel_binding=disable").unwrap(),
            ChannelBinding::Disable
        );
        assert_eq!(binding("host=db").unwrap(), ChannelBinding::Prefer);
        let err = binding("host=db channel_binding=always").unwrap_err();
        let text = crate::error_chain(&err);
        assert!(text.contains("channel_binding"), "{text}");
        // libpq would fail at each connection: refused before the first.
        let err = binding("host=db sslmode=disable channel_binding=require").unwrap_err();
        assert!(
            matches!(err, TlsParamError::ChannelBindingWithoutTls),
            "{err}"
        );
        assert!(err.to_string().contains("set sslmode=verify-full"), "{err}");
    }
}
