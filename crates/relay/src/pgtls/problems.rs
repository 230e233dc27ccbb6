//! TLS failures of the PostgreSQL connections, SQL ([`sql_problem`]) and replication
//! ([`replication_problem`]), explained: what is wrong, and what to set in `postgres_url` or on
//! the server. `None` is not about TLS: the caller reports the error as it is.

use pgwire_replication::PgWireError;
use tokio_postgres::error::SqlState;

use super::conninfo::Target;
use super::tls::{PgTls, Seen};
use crate::tls::{Problem, Wording, rustls_error};

/// A certificate or handshake problem with the server at `host`, in `postgres_url`'s terms.
pub fn explain(problem: &Problem, tls: &PgTls, host: &str) -> String {
    let host = format!("{host:?}");
    let roots = tls.roots_description();
    problem.explain(&Wording {
        server: "PostgreSQL",
        host: Some(&host),
        roots: &roots,
        fix_ca: "set sslrootcert in postgres_url to the CA file that signed the server's \
                 certificate",
        fix_host: "connect with a host name the certificate holds, fix the server's \
                   certificate, or use sslmode=verify-ca to check only the CA",
        fix_client_cert: "set sslcert and sslkey in postgres_url to a certificate for this user \
                          signed by a CA in the server's ssl_ca_file",
        fix_not_tls: "check the server's ssl settings, and that host and port are PostgreSQL's",
    })
}

/// Why a SQL connection (tokio-postgres) failed, when TLS settings are the cure; `seen`: what
/// its handshake saw.
pub fn sql_problem(e: &tokio_postgres::Error, target: &Target, seen: &Seen) -> Option<String> {
    if let Some(db) = e.as_db_error() {
        if db.message().contains("channel binding") {
            return Some(binding_mismatch(db.message()));
        }
        return (*db.code() == SqlState::INVALID_AUTHORIZATION_SPECIFICATION)
            .then(|| server_tls_refusal(db.message(), &target.tls))
            .flatten();
    }
    if let Some(r) = rustls_error(e) {
        return Some(explain(&Problem::of(r), &target.tls, &target.host()));
    }
    // With its causes: tokio-postgres' Display leaves them out ("authentication error").
    let text = crate::error_chain(e);
    if text.contains("server does not support TLS") {
        return Some(no_tls_message(&target.tls));
    }
    // tokio-postgres' only words for channel_binding=require unmet (its error kinds are
    // private): "server did not use channel binding".
    if text.contains("channel binding") {
        return Some(channel_binding_refused(&target.tls, seen.encrypted, &text));
    }
    None
}

/// Why the replication connection (pgwire-replication) failed, when TLS settings are the cure.
pub fn replication_problem(target: &Target, source: &PgWireError) -> Option<String> {
    match source {
        PgWireError::Server(message) if message.contains("28000") => {
            server_tls_refusal(message, &target.tls)
        }
        PgWireError::Server(message) if message.contains("channel binding") => {
            Some(binding_mismatch(message))
        }
        PgWireError::ChannelBinding(why) if why.contains("tls-server-end-point") => Some(format!(
            "{source}: give the server a certificate signed with RSA or ECDSA (SHA-256, -384 or \
             -512), or set channel_binding=prefer"
        )),
        PgWireError::ChannelBinding(why) => Some(channel_binding_refused(
            &target.tls,
            !why.contains("not encrypted"),
            &source.to_string(),
        )),
        PgWireError::Tls(text) if text.contains("SSLRequest rejected") => {
            Some(no_tls_message(&target.tls))
        }
        PgWireError::Tls(text) => match Problem::of_certificate_text(text) {
            Some(p) => Some(format!(
                "{} ({text})",
                explain(&p, &target.tls, &target.host())
            )),
            // Settings, or the server's refusal of the handshake; a network error in the middle
            // of a handshake stays a (retried) replication error.
            None if ["TLS config error", "received fatal alert", "invalid SNI"]
                .iter()
                .any(|s| text.contains(s)) =>
            {
                Some(format!(
                    "{text}: check sslmode, sslrootcert, sslcert and sslkey in postgres_url and \
                     the server's ssl settings"
                ))
            }
            None => None,
        },
        _ => None,
    }
}

/// A server's refusal (SQLSTATE 28000) that TLS settings cure, explained: pg_hba.conf has only
/// `hostssl` lines for us, or its `cert` method wants a client certificate.
pub fn server_tls_refusal(server_message: &str, tls: &PgTls) -> Option<String> {
    // PostgreSQL's wording: "..., no encryption" (14+), "..., SSL off" (before).
    if server_message.contains("no encryption") || server_message.contains("SSL off") {
        return Some(format!(
            "the server requires TLS but sslmode={} connects without it (server: \
             {server_message}): set sslmode=require or sslmode=verify-full in postgres_url",
            tls.requested.as_str()
        ));
    }
    if server_message.contains("certificate") {
        let now = match &tls.client_cert {
            Some((cert, _)) => format!("sslcert={} is not accepted", cert.display()),
            None => "none is set".into(),
        };
        return Some(format!(
            "the server requires a client certificate and {now} (server: {server_message}): set \
             sslcert and sslkey in postgres_url to a certificate for this user signed by a CA in \
             the server's ssl_ca_file"
        ));
    }
    None
}

/// The server does not offer TLS (its `ssl` setting is off) and the mode needs it.
pub fn no_tls_message(tls: &PgTls) -> String {
    format!(
        "the server does not offer TLS (its ssl setting is off) and sslmode={} needs it: \
         enable ssl on the server, or use sslmode=prefer to connect without TLS",
        tls.requested.as_str()
    )
}

/// `channel_binding=require` unmet: `encrypted` says whether the connection was; `detail`, the
/// client library's words.
pub fn channel_binding_refused(tls: &PgTls, encrypted: bool, detail: &str) -> String {
    if encrypted {
        format!(
            "channel_binding=require, but the server did not authenticate the relay with \
             SCRAM-SHA-256-PLUS ({detail}): have pg_hba.conf authenticate the relay's role with \
             scram-sha-256 on hostssl lines and store its password as SCRAM \
             (password_encryption = scram-sha-256, then set the password again), or set \
             channel_binding=prefer"
        )
    } else {
        format!(
            "channel_binding=require, but the connection is not encrypted ({detail}): channel \
             binding needs TLS; enable ssl on the server and connect with sslmode=verify-full \
             (now sslmode={}), or set channel_binding=prefer",
            tls.requested.as_str()
        )
    }
}

/// The server found that the certificate the relay bound to is not its own (PostgreSQL:
/// "SCRAM channel binding check failed").
fn binding_mismatch(server_message: &str) -> String {
    format!(
        "the server's certificate is not the one the relay saw ({server_message}): something \
         between the relay and PostgreSQL terminates TLS with a certificate of its own (a man \
         in the middle, or a TLS proxy); connect to PostgreSQL directly"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pgtls::SslMode;

    fn tls(mode: SslMode) -> PgTls {
        PgTls {
            requested: mode,
            mode,
            root_cert: Some("/ca.pem".into()),
            system_roots: false,
            client_cert: None,
            pem: Default::default(),
        }
    }

    #[test]
    fn certificate_problems_name_the_parameter_to_set() {
        let t = tls(SslMode::VerifyFull);
        let unknown = explain(&Problem::UnknownCa, &t, "db");
        assert!(
            unknown.contains("unknown CA") && unknown.contains("set sslrootcert"),
            "{unknown}"
        );
        let mismatch = Problem::HostnameMismatch {
            expected: Some("127.0.0.1".into()),
            presented: vec!["localhost".into()],
        };
        let text = explain(&mismatch, &t, "127.0.0.1");
        assert!(
            text.contains("hostname mismatch")
                && text.contains("\"127.0.0.1\"")
                && text.contains("localhost"),
            "{text}"
        );
    }

    #[test]
    fn channel_binding_failures_say_what_to_change() {
        let prefer = tls(SslMode::Prefer);
        let plain = channel_binding_refused(&prefer, false, "server did not use channel binding");
        assert!(
            plain.contains("not encrypted")
                && plain.contains("sslmode=verify-full")
                && plain.contains("now sslmode=prefer"),
            "{plain}"
        );
        let encrypted = channel_binding_refused(&prefer, true, "x");
        assert!(
            encrypted.contains("SCRAM-SHA-256-PLUS") && encrypted.contains("pg_hba.conf"),
            "{encrypted}"
        );
        let target = Target::parse("host=db sslmode=disable").unwrap();
        let refused = PgWireError::ChannelBinding("the connection is not encrypted: ...".into());
        let text = replication_problem(&target, &refused).unwrap();
        assert!(
            text.contains("not encrypted") && text.contains("channel binding required"),
            "{text}"
        );
        let mismatch = PgWireError::Server("FATAL 08P01 SCRAM channel binding check failed".into());
        let text = replication_problem(&target, &mismatch).unwrap();
        assert!(text.contains("man in the middle"), "{text}");
    }
}
