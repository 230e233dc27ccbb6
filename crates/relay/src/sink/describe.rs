//! ClickHouse errors in words: the causes, and for a TLS failure what it means and what to do.

/// A ClickHouse error with its causes (`network error: client error (Connect): ...`) and, for a
/// TLS failure, what it means and what to do.
pub fn describe(error: &clickhouse::error::Error) -> String {
    let mut text = error.to_string();
    let mut hint = None;
    let mut next: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(error);
    // The top error's text already includes its direct source's.
    let mut skip = true;
    while let Some(mut e) = next {
        let line = e.to_string();
        if !skip && !text.contains(&line) {
            text = format!("{text}: {line}");
        }
        skip = false;
        // An io::Error's source() skips the error it wraps (and hyper-rustls wraps tokio-rustls'
        // io::Error in another): look inside. On the way, the server closing the connection in
        // the handshake (tokio-rustls' "tls handshake eof"): a plain port under load does that
        // instead of answering in plain text.
        while let Some(io) = e.downcast_ref::<std::io::Error>() {
            if hint.is_none()
                && io.kind() == std::io::ErrorKind::UnexpectedEof
                && io.to_string().contains("handshake")
            {
                hint = Some(
                    "the server did not answer in TLS (it closed the connection in the \
                     handshake): is this ClickHouse's HTTPS port (8443 by default)? For the \
                     plain HTTP port use http://"
                        .to_string(),
                );
            }
            match io.get_ref() {
                Some(inner) => e = inner,
                None => break,
            }
        }
        if hint.is_none() {
            hint = e.downcast_ref::<rustls::Error>().map(tls_hint);
        }
        next = e.source();
    }
    match hint {
        Some(hint) => format!("{text} ({hint})"),
        None => text,
    }
}

/// What a TLS failure means for an operator, and what to do.
fn tls_hint(error: &rustls::Error) -> String {
    crate::tls::Problem::of(error).explain(&crate::tls::Wording {
        server: "ClickHouse",
        host: None,
        roots: "the system trust store, the built-in roots and clickhouse_ca_file",
        fix_ca: "set clickhouse_ca_file (RELAY_CLICKHOUSE_CA_FILE) to your CA bundle (PEM), or \
                 add the CA to the system trust store",
        fix_host: "use a host name the certificate names in clickhouse_url, or have it reissued",
        fix_client_cert: "set clickhouse_client_cert and clickhouse_client_key to one its CA \
                          signed",
        fix_not_tls: "is this ClickHouse's HTTPS port (8443 by default)? For the plain HTTP port \
                      use http://",
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_handshake_closed_by_the_server_is_named() {
        // hyper-rustls wraps tokio-rustls' io::Error in another one.
        let eof = std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "tls handshake eof");
        let outer = std::io::Error::other(eof);
        let text = super::describe(&clickhouse::error::Error::Network(Box::new(outer)));
        assert!(text.contains("did not answer in TLS"), "{text}");
        let other = std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "body ended early");
        let text = super::describe(&clickhouse::error::Error::Network(Box::new(other)));
        assert!(!text.contains("did not answer in TLS"), "{text}");
    }
}
