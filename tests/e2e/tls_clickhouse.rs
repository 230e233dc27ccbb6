//! ClickHouse over https, against real servers: the harness's ClickHouse behind a TLS
//! terminator whose certificate a private test CA signed. With `clickhouse_ca_file` the relay's
//! `setup` and `run` work over https; without it, or with a certificate for another host, the
//! relay refuses and says why and what to do.

mod common;

use std::time::Duration;

use common::{Fixture, stderr, wait_until};
use harness::PgVersion;
use harness::tls::{Issued, TestCa, TlsTerminator};

const LONG: Duration = Duration::from_secs(120);

/// The fixture (set up over plain http), a test CA and a terminator in front of ClickHouse;
/// None (the test skips, saying why) without the openssl CLI or with an external ClickHouse.
fn tls_fixture(server_names: &[&str], client_ca: bool) -> Option<(Fixture, TestCa, TlsTerminator)> {
    if !harness::tls::openssl_available() {
        println!("SKIP: the openssl command is not installed");
        return None;
    }
    let f = Fixture::start(PgVersion::V15, &[]);
    if f.ch.is_external() {
        println!("SKIP: an external ClickHouse (RELAY_TEST_CLICKHOUSE_URL) has no port to front");
        return None;
    }
    let ca = TestCa::new().expect("test CA");
    let server = ca.issue(server_names).expect("server certificate");
    let upstream = format!("127.0.0.1:{}", f.ch.http_port()).parse().unwrap();
    let ca_cert = ca.cert();
    let tls = TlsTerminator::start(&server, client_ca.then_some(ca_cert.as_path()), upstream)
        .expect("TLS terminator");
    Some((f, ca, tls))
}

fn https_url(f: &Fixture, host: &str, tls: &TlsTerminator) -> String {
    format!("https://default:@{host}:{}/{}", tls.port(), f.ch_db)
}

#[test]
fn ships_over_https_with_a_private_ca() {
    let Some((mut f, ca, tls)) = tls_fixture(&["DNS:localhost", "IP:127.0.0.1"], false) else {
        return;
    };
    f.set_env("RELAY_CLICKHOUSE_URL", &https_url(&f, "127.0.0.1", &tls));
    f.set_env("RELAY_CLICKHOUSE_CA_FILE", ca.cert().to_str().unwrap());
    let out = f.relay(&["setup"]);
    assert!(out.status.success(), "setup over https: {}", stderr(&out));
    let relay = f.spawn_relay();
    f.publish(500, 50, "over_tls");
    f.wait_for_rows(500, LONG, Some(&relay));
    assert_eq!(f.ch_unique(), 500);
    let status = f.status();
    assert_eq!(status["clickhouse_reachable"], true, "{status}");
    drop(relay);

    // By host name too (the certificate names localhost).
    f.set_env("RELAY_CLICKHOUSE_URL", &https_url(&f, "localhost", &tls));
    let status = f.status();
    assert_eq!(status["clickhouse_reachable"], true, "{status}");
    // The system trust store as curl users set it: SSL_CERT_FILE instead of clickhouse_ca_file.
    f.set_env("RELAY_CLICKHOUSE_CA_FILE", "");
    let out = f.relay(&["status", "--json"]);
    assert_eq!(
        out.status.code(),
        Some(4),
        "status exits 4 when ClickHouse does not answer"
    );
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status --json");
    assert_eq!(status["clickhouse_reachable"], false, "{status}");
    f.set_env("SSL_CERT_FILE", ca.cert().to_str().unwrap());
    let status = f.status();
    assert_eq!(status["clickhouse_reachable"], true, "{status}");
}

#[test]
fn unknown_ca_is_named() {
    let Some((mut f, _ca, tls)) = tls_fixture(&["DNS:localhost", "IP:127.0.0.1"], false) else {
        return;
    };
    f.set_env("RELAY_CLICKHOUSE_URL", &https_url(&f, "127.0.0.1", &tls));
    let out = f.relay(&["setup"]);
    assert!(!out.status.success());
    let err = stderr(&out);
    println!("{err}");
    assert!(
        err.contains("signed by an unknown CA") && err.contains("clickhouse_ca_file"),
        "{err}"
    );
    // The running relay says the same while it retries, and counts no insert.
    let relay = f.spawn_relay();
    f.publish(10, 10, "refused");
    assert!(
        wait_until(LONG, || relay.log().contains("signed by an unknown CA")),
        "{}",
        relay.log()
    );
    assert_eq!(f.ch_count(), 0);
    drop(relay);

    // https:// to the plain HTTP port.
    let plain = format!(
        "https://default:@127.0.0.1:{}/{}",
        f.ch.http_port(),
        f.ch_db
    );
    f.set_env("RELAY_CLICKHOUSE_URL", &plain);
    let out = f.relay(&["setup"]);
    assert!(!out.status.success());
    let err = stderr(&out);
    println!("{err}");
    assert!(err.contains("did not answer in TLS"), "{err}");
}

#[test]
fn hostname_mismatch_is_named() {
    let Some((mut f, ca, tls)) = tls_fixture(&["DNS:clickhouse.example"], false) else {
        return;
    };
    f.set_env("RELAY_CLICKHOUSE_URL", &https_url(&f, "127.0.0.1", &tls));
    f.set_env("RELAY_CLICKHOUSE_CA_FILE", ca.cert().to_str().unwrap());
    let out = f.relay(&["setup"]);
    assert!(!out.status.success());
    let err = stderr(&out);
    println!("{err}");
    assert!(
        err.contains("not valid for host 127.0.0.1") && err.contains("clickhouse.example"),
        "{err}"
    );
}

#[test]
fn client_certificates() {
    let Some((mut f, ca, tls)) = tls_fixture(&["IP:127.0.0.1"], true) else {
        return;
    };
    f.set_env("RELAY_CLICKHOUSE_URL", &https_url(&f, "127.0.0.1", &tls));
    f.set_env("RELAY_CLICKHOUSE_CA_FILE", ca.cert().to_str().unwrap());
    let out = f.relay(&["setup"]);
    assert!(!out.status.success(), "setup without a client certificate");
    let err = stderr(&out);
    println!("{err}");
    assert!(err.contains("clickhouse_client_cert"), "{err}");

    let Issued { cert, key } = ca.issue(&["DNS:relay"]).expect("client certificate");
    f.set_env("RELAY_CLICKHOUSE_CLIENT_CERT", cert.to_str().unwrap());
    f.set_env("RELAY_CLICKHOUSE_CLIENT_KEY", key.to_str().unwrap());
    let out = f.relay(&["setup"]);
    assert!(
        out.status.success(),
        "setup with a client certificate: {}",
        stderr(&out)
    );
    let relay = f.spawn_relay();
    f.publish(100, 10, "mutual_tls");
    f.wait_for_rows(100, LONG, Some(&relay));
}

#[test]
fn unreadable_tls_files_stop_the_relay_at_start() {
    let Some((mut f, _ca, tls)) = tls_fixture(&["IP:127.0.0.1"], false) else {
        return;
    };
    f.set_env("RELAY_CLICKHOUSE_URL", &https_url(&f, "127.0.0.1", &tls));
    f.set_env("RELAY_CLICKHOUSE_CA_FILE", "/nonexistent/ca.pem");
    let out = f.relay(&["run"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let err = stderr(&out);
    println!("{err}");
    assert!(
        err.contains("clickhouse_ca_file") && err.contains("RELAY_CLICKHOUSE_CA_FILE"),
        "{err}"
    );
    let not_pem = std::env::temp_dir().join(harness::unique_name("not_pem"));
    std::fs::write(&not_pem, "not a certificate\n").unwrap();
    f.set_env("RELAY_CLICKHOUSE_CA_FILE", not_pem.to_str().unwrap());
    let out = f.relay(&["run"]);
    let _ = std::fs::remove_file(&not_pem);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("no PEM certificate"),
        "{}",
        stderr(&out)
    );
}
