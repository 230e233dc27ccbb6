//! TLS to PostgreSQL with libpq's `sslmode` meaning, against Debian's PostgreSQL 15 with
//! `ssl = on` (the embedded PostgreSQL 18 is built without OpenSSL): which modes connect, whether
//! the SQL connection and the walsender of `outbox-relay run` are encrypted (`pg_stat_ssl`), and
//! what the relay says when it must refuse.

mod common;

use std::time::Duration;

use common::{Fixture, RelayProcess, stderr, wait_until};
use harness::tls::{TestCa, TlsTerminator};
use harness::{HBA_TLS_ONLY, PgOptions, PgServer, PgVersion, TestCerts};

const LONG: Duration = Duration::from_secs(60);

/// The application_name of the relay's SQL connection (its walsender is `outbox-relay`).
const SQL_APP: &str = "relay_tls_sql";

/// A certificate authority and server certificate, or `None` (with a message) when PostgreSQL
/// 15's binaries or the `openssl` CLI are absent.
fn prerequisites(test: &str) -> Option<TestCerts> {
    if !PgVersion::available().contains(&PgVersion::V15) {
        eprintln!("SKIP {test}: PostgreSQL 15's binaries (/usr/lib/postgresql/15/bin) are absent");
        return None;
    }
    match TestCerts::generate().expect("generate test certificates") {
        Some(certs) => Some(certs),
        None => {
            eprintln!("SKIP {test}: the openssl CLI is absent");
            None
        }
    }
}

/// A PG15 server with TLS (`hba`: `None` allows plaintext too) and ClickHouse, set up through a
/// verify-full connection.
fn fixture(certs: &TestCerts, hba: Option<&str>) -> Fixture {
    let options = PgOptions::tls(certs, hba).expect("TLS options");
    let pg = PgServer::start_with(PgVersion::V15, options).expect("start PostgreSQL 15 with TLS");
    let params = format!("sslmode=verify-full&sslrootcert={}", ca(certs));
    fixture_on(pg, &params)
}

/// ClickHouse and setup through `params` (to localhost) on a PG15 server the test started.
fn fixture_on(pg: PgServer, params: &str) -> Fixture {
    let url = url(&pg, "localhost", params);
    Fixture::start_on(
        pg,
        &[
            ("RELAY_POSTGRES_URL", &url),
            // No ~/.postgresql/root.crt of the machine's user changes the modes under test.
            ("HOME", "/nonexistent/outbox-relay-test-home"),
        ],
    )
}

fn ca(certs: &TestCerts) -> String {
    certs.ca_cert.display().to_string()
}

/// The relay's URL to `host` with `params` (`{db}` is filled in by the fixture or `set_url`).
fn url(pg: &PgServer, host: &str, params: &str) -> String {
    let sep = if params.is_empty() { "" } else { "&" };
    format!(
        "postgres://postgres@{host}:{}/{{db}}?application_name={SQL_APP}{sep}{params}",
        pg.port()
    )
}

fn set_url(f: &mut Fixture, host: &str, params: &str) {
    let url = url(&f.pg, host, params).replace("{db}", &f.db);
    f.set_env("RELAY_POSTGRES_URL", &url);
}

/// Runs `outbox-relay run` until both of its connections are up; returns whether the SQL
/// connection and the walsender use TLS, as pg_stat_ssl says, then stops it.
fn encryption_of_run(f: &Fixture) -> (bool, bool) {
    let relay = f.spawn_relay();
    let query = format!(
        "SELECT coalesce((SELECT s.ssl::text FROM pg_stat_ssl s JOIN pg_stat_activity a \
                            USING (pid) WHERE a.application_name = '{SQL_APP}' LIMIT 1), '-')
             || ' ' ||
                coalesce((SELECT s.ssl::text FROM pg_stat_ssl s JOIN pg_stat_replication r \
                            USING (pid) WHERE r.application_name = 'outbox-relay' LIMIT 1), '-')"
    );
    let mut seen = String::new();
    let up = wait_until(LONG, || {
        seen = f.sql(&query).trim().to_string();
        !seen.contains('-')
    });
    assert!(
        up,
        "relay connections not seen ({seen}); log:\n{}",
        relay.log()
    );
    stop(f, relay);
    let (sql, walsender) = seen.split_once(' ').expect("two values");
    (sql == "true", walsender == "true")
}

fn stop(f: &Fixture, relay: RelayProcess) {
    let log = relay.log();
    assert!(relay.terminate().success(), "relay failed; log:\n{log}");
    let slot_free = wait_until(LONG, || {
        f.sql(&format!(
            "SELECT active FROM pg_replication_slots WHERE slot_name = '{}'",
            f.slot
        ))
        .trim()
            == "f"
    });
    assert!(slot_free, "the slot stayed active after the relay stopped");
}

/// `status` fails, and so does `run`, by itself and without retrying forever; returns the
/// status error.
fn refused(f: &Fixture) -> String {
    let out = f.relay(&["status"]);
    assert!(!out.status.success(), "status succeeded");
    let status_error = stderr(&out);
    let mut relay = f.spawn_relay();
    let exited = wait_until(LONG, || !relay.is_running());
    assert!(exited, "run kept retrying; log:\n{}", relay.log());
    assert!(!relay.child.wait().expect("wait").success());
    status_error
}

#[test]
fn tls_only_server() {
    let Some(certs) = prerequisites("tls_only_server") else {
        return;
    };
    let mut f = fixture(&certs, Some(HBA_TLS_ONLY));

    set_url(&mut f, "127.0.0.1", "sslmode=disable");
    let error = refused(&f);
    assert!(
        error.contains("the server requires TLS") && error.contains("sslmode=require"),
        "{error}"
    );
    assert!(!error.contains("password"), "{error}");

    let ca = ca(&certs);
    for (host, params) in [
        ("127.0.0.1", "sslmode=allow".to_string()),
        ("127.0.0.1", "sslmode=prefer".to_string()),
        ("127.0.0.1", "sslmode=require".to_string()),
        ("localhost", format!("sslmode=verify-ca&sslrootcert={ca}")),
        ("localhost", format!("sslmode=verify-full&sslrootcert={ca}")),
    ] {
        set_url(&mut f, host, &params);
        assert_eq!(encryption_of_run(&f), (true, true), "{host} {params}");
    }
}

#[test]
fn tls_optional_server() {
    let Some(certs) = prerequisites("tls_optional_server") else {
        return;
    };
    let mut f = fixture(&certs, None);
    for (params, encrypted) in [
        ("sslmode=disable", false),
        ("sslmode=allow", false),
        ("", true),
        ("sslmode=prefer", true),
        ("sslmode=require", true),
    ] {
        set_url(&mut f, "127.0.0.1", params);
        let expected = (encrypted, encrypted);
        assert_eq!(encryption_of_run(&f), expected, "{params:?}");
    }
}

#[test]
fn certificate_problems_are_refused_by_name() {
    let Some(certs) = prerequisites("certificate_problems_are_refused_by_name") else {
        return;
    };
    let mut f = fixture(&certs, Some(HBA_TLS_ONLY));
    let other = certs.other_ca_cert.display().to_string();
    for params in [
        format!("sslmode=verify-ca&sslrootcert={other}"),
        format!("sslmode=verify-full&sslrootcert={other}"),
        // libpq: require with a root certificate file verifies the CA.
        format!("sslmode=require&sslrootcert={other}"),
    ] {
        set_url(&mut f, "localhost", &params);
        let error = refused(&f);
        assert!(
            error.contains("unknown CA") && error.contains("set sslrootcert"),
            "{params}: {error}"
        );
    }

    // The certificate names only localhost.
    let ca = ca(&certs);
    set_url(
        &mut f,
        "127.0.0.1",
        &format!("sslmode=verify-full&sslrootcert={ca}"),
    );
    let error = refused(&f);
    assert!(
        error.contains("hostname mismatch") && error.contains("\"127.0.0.1\""),
        "{error}"
    );
    set_url(
        &mut f,
        "127.0.0.1",
        &format!("sslmode=verify-ca&sslrootcert={ca}"),
    );
    assert_eq!(encryption_of_run(&f), (true, true));
}

#[test]
fn expired_certificate_is_refused() {
    let Some(certs) = prerequisites("expired_certificate_is_refused") else {
        return;
    };
    let options = PgOptions::tls(&certs, Some(HBA_TLS_ONLY))
        .and_then(|o| o.server_cert(&certs.expired_server_cert))
        .expect("TLS options");
    let pg = PgServer::start_with(PgVersion::V15, options).expect("start PostgreSQL 15 with TLS");
    // require without a root certificate does not look at the certificate.
    let mut f = fixture_on(pg, "sslmode=require");
    let ca = ca(&certs);
    for mode in ["verify-ca", "verify-full"] {
        set_url(
            &mut f,
            "localhost",
            &format!("sslmode={mode}&sslrootcert={ca}"),
        );
        let error = refused(&f);
        assert!(
            error.contains("certificate has expired") && error.contains("renew"),
            "{mode}: {error}"
        );
    }
}

#[test]
fn client_certificate() {
    let Some(certs) = prerequisites("client_certificate") else {
        return;
    };
    // relay_cert must show a certificate; everyone else (the harness' psql) needs only TLS.
    let hba = format!("hostssl all relay_cert 127.0.0.1/32 cert\n{HBA_TLS_ONLY}");
    let options = PgOptions::tls(&certs, Some(&hba))
        .and_then(|o| o.client_ca(&certs))
        .expect("TLS options");
    let pg = PgServer::start_with(PgVersion::V15, options).expect("start PostgreSQL 15 with TLS");
    pg.psql(
        "postgres",
        "CREATE ROLE relay_cert LOGIN SUPERUSER REPLICATION",
    )
    .expect("create role");
    let with_cert = format!(
        "sslmode=verify-full&sslrootcert={}&sslcert={}&sslkey={}",
        ca(&certs),
        certs.client_cert.display(),
        certs.client_key.display()
    );
    let mut f = fixture_on(pg, &with_cert);
    let user = |f: &mut Fixture, params: &str| {
        let url = f.env_value("RELAY_POSTGRES_URL");
        let url = url.replacen("postgres://postgres@", "postgres://relay_cert@", 1);
        let url = match url.split_once("&ssl") {
            Some((base, _)) => format!("{base}&{params}"),
            None => url,
        };
        f.set_env("RELAY_POSTGRES_URL", &url);
    };
    user(&mut f, &with_cert);
    assert_eq!(encryption_of_run(&f), (true, true));

    user(
        &mut f,
        &format!("sslmode=verify-full&sslrootcert={}", ca(&certs)),
    );
    let out = f.relay(&["status"]);
    let error = stderr(&out);
    assert!(!out.status.success());
    assert!(
        error.contains("requires a client certificate") && error.contains("set sslcert and sslkey"),
        "{error}"
    );
}

#[test]
fn events_arrive_over_tls() {
    let Some(certs) = prerequisites("events_arrive_over_tls") else {
        return;
    };
    let f = fixture(&certs, Some(HBA_TLS_ONLY));
    let relay = f.spawn_relay();
    f.publish(500, 50, "tls");
    f.wait_for_rows(500, LONG, Some(&relay));
    assert_eq!(f.ch_unique(), 500);
    let encrypted = f.sql(
        "SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_replication r USING (pid) \
          WHERE r.application_name = 'outbox-relay'",
    );
    assert_eq!(encrypted.trim(), "t");
    stop(&f, relay);
}

/// A role that must authenticate with scram-sha-256 on hostssl lines (everyone else: as
/// HBA_TLS_ONLY says), and its password.
const SCRAM_USER: &str = "relay_scram";
const SCRAM_PASSWORD: &str = "scram-sekrit";

fn scram_hba(host: &str) -> String {
    format!(
        "{host} all {SCRAM_USER} 127.0.0.1/32 scram-sha-256\n\
         {host} replication {SCRAM_USER} 127.0.0.1/32 scram-sha-256\n"
    )
}

fn create_scram_user(pg: &PgServer) {
    // password_encryption is scram-sha-256 by default (PostgreSQL 14+): a SCRAM verifier.
    pg.psql(
        "postgres",
        &format!(
            "CREATE ROLE {SCRAM_USER} LOGIN SUPERUSER REPLICATION PASSWORD '{SCRAM_PASSWORD}'"
        ),
    )
    .expect("create role");
}

/// The relay's URL as the SCRAM user, to `host` with `params`.
fn scram_url(pg: &PgServer, host: &str, params: &str) -> String {
    url(pg, host, params).replacen(
        "postgres://postgres@",
        &format!("postgres://{SCRAM_USER}:{SCRAM_PASSWORD}@"),
        1,
    )
}

/// scram-sha-256 over hostssl with `channel_binding=require`: `setup`, `status` and `run` (its
/// SQL connection and its walsender, both bound to the server's certificate:
/// SCRAM-SHA-256-PLUS) work and ship events.
#[test]
fn channel_binding_required_over_tls() {
    let Some(certs) = prerequisites("channel_binding_required_over_tls") else {
        return;
    };
    let hba = format!("{}{HBA_TLS_ONLY}", scram_hba("hostssl"));
    let options = PgOptions::tls(&certs, Some(&hba)).expect("TLS options");
    let pg = PgServer::start_with(PgVersion::V15, options).expect("start PostgreSQL 15 with TLS");
    create_scram_user(&pg);
    let params = format!(
        "sslmode=verify-full&sslrootcert={}&channel_binding=require",
        ca(&certs)
    );
    let url = scram_url(&pg, "localhost", &params);
    // `setup` runs here, over a bound connection.
    let mut f = Fixture::start_on(
        pg,
        &[
            ("RELAY_POSTGRES_URL", &url),
            ("HOME", "/nonexistent/outbox-relay-test-home"),
        ],
    );
    let out = f.relay(&["status"]);
    assert_eq!(out.status.code(), Some(0), "status: {}", stderr(&out));

    let relay = f.spawn_relay();
    f.publish(200, 20, "bound");
    f.wait_for_rows(200, LONG, Some(&relay));
    assert_eq!(f.ch_unique(), 200);
    // Both of run's connections are the SCRAM user's, over TLS.
    let query = format!(
        "SELECT string_agg(DISTINCT a.application_name || '=' || s.ssl::text, ',' \
                           ORDER BY a.application_name || '=' || s.ssl::text) \
           FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) \
          WHERE a.usename = '{SCRAM_USER}' \
            AND a.application_name IN ('{SQL_APP}', 'outbox-relay')"
    );
    let expected = format!("outbox-relay=true,{SQL_APP}=true");
    let mut seen = String::new();
    let both = wait_until(LONG, || {
        seen = f.sql(&query).trim().to_string();
        seen == expected
    });
    assert!(both, "{seen}; log:\n{}", relay.log());
    stop(&f, relay);

    // require (no certificate check) binds too: what protects it from a man in the middle.
    set_scram_url(
        &mut f,
        "127.0.0.1",
        "sslmode=require&channel_binding=require",
    );
    let relay = f.spawn_relay();
    f.publish(10, 10, "bound_require");
    f.wait_for_rows(210, LONG, Some(&relay));
    stop(&f, relay);
}

/// A man in the middle that terminates TLS with a certificate of its own and relays everything
/// inside: scram-sha-256 alone does not notice it (`channel_binding=disable`: `status` works
/// through it), channel binding does (the server finds the certificate hash the relay signed is
/// not its own and refuses): the relay stops, naming the problem.
#[test]
fn channel_binding_exposes_a_man_in_the_middle() {
    let Some(certs) = prerequisites("channel_binding_exposes_a_man_in_the_middle") else {
        return;
    };
    let hba = format!("{}{HBA_TLS_ONLY}", scram_hba("hostssl"));
    let options = PgOptions::tls(&certs, Some(&hba)).expect("TLS options");
    let pg = PgServer::start_with(PgVersion::V15, options).expect("start PostgreSQL 15 with TLS");
    create_scram_user(&pg);
    let upstream = format!("127.0.0.1:{}", pg.port()).parse().expect("address");
    let url = scram_url(&pg, "127.0.0.1", "sslmode=require");
    let mut f = Fixture::start_on(
        pg,
        &[
            ("RELAY_POSTGRES_URL", &url),
            ("HOME", "/nonexistent/outbox-relay-test-home"),
        ],
    );
    let ca = TestCa::new().expect("the man in the middle's CA");
    let own = ca.issue(&["IP:127.0.0.1"]).expect("its certificate");
    let mitm = TlsTerminator::postgres_in_the_middle(&own, upstream, &certs.ca_cert)
        .expect("man in the middle");
    let through = |f: &mut Fixture, params: &str| {
        let url = scram_url(&f.pg, "127.0.0.1", params)
            .replace(&format!(":{}/", f.pg.port()), &format!(":{}/", mitm.port()))
            .replace("{db}", &f.db);
        f.set_env("RELAY_POSTGRES_URL", &url);
    };
    through(&mut f, "sslmode=require&channel_binding=disable");
    let out = f.relay(&["status"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    for params in ["sslmode=require", "sslmode=require&channel_binding=require"] {
        through(&mut f, params);
        let error = refused(&f);
        println!("{error}");
        assert!(
            error.contains("SCRAM channel binding check failed")
                && error.contains("man in the middle"),
            "{params}: {error}"
        );
    }
}

fn set_scram_url(f: &mut Fixture, host: &str, params: &str) {
    let url = scram_url(&f.pg, host, params).replace("{db}", &f.db);
    f.set_env("RELAY_POSTGRES_URL", &url);
}

/// `channel_binding=require` to a server without TLS: `status` and `run` fail by themselves,
/// saying the connection is not encrypted and what to change; with sslmode=disable it is a
/// configuration error.
#[test]
fn channel_binding_required_without_tls_is_refused() {
    let Some(version) = PgVersion::available().first().copied() else {
        eprintln!("SKIP channel_binding_required_without_tls_is_refused: no PostgreSQL");
        return;
    };
    // ssl off; scram-sha-256 for the relay's role, trust for the harness.
    let hba = format!(
        "local all all trust\n{}host all all 127.0.0.1/32 trust\n\
         host replication all 127.0.0.1/32 trust\n",
        scram_hba("host")
    );
    let options = PgOptions {
        hba: Some(hba),
        ..PgOptions::default()
    };
    let pg = PgServer::start_with(version, options).expect("start PostgreSQL");
    create_scram_user(&pg);
    // Without binding (the default, prefer), SCRAM works.
    let url = scram_url(&pg, "127.0.0.1", "");
    let mut f = Fixture::start_on(
        pg,
        &[
            ("RELAY_POSTGRES_URL", &url),
            ("HOME", "/nonexistent/outbox-relay-test-home"),
        ],
    );
    set_scram_url(&mut f, "127.0.0.1", "channel_binding=require");
    let out = f.relay(&["status"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let error = refused(&f);
    println!("{error}");
    assert!(
        error.contains("channel_binding=require")
            && error.contains("not encrypted")
            && error.contains("sslmode=verify-full")
            && error.contains("channel_binding=prefer"),
        "{error}"
    );
    assert!(!error.contains(SCRAM_PASSWORD), "{error}");

    set_scram_url(
        &mut f,
        "127.0.0.1",
        "sslmode=disable&channel_binding=require",
    );
    let out = f.relay(&["status"]);
    let error = stderr(&out);
    println!("{error}");
    assert_eq!(out.status.code(), Some(2), "{error}");
    assert!(
        error.contains("channel_binding=require needs TLS") && error.contains("sslmode=disable"),
        "{error}"
    );
}

#[test]
fn tls_parameters_are_checked_at_start() {
    for (params, expected) in [
        (
            "sslmode=verify-everything",
            "sslmode=\"verify-everything\" is not a valid sslmode",
        ),
        (
            "sslmode=verify-ca&sslrootcert=/nonexistent/ca.pem",
            "sslrootcert=/nonexistent/ca.pem: cannot read the file",
        ),
        ("sslmode=verify-full", "set sslrootcert"),
        ("sslcrl=/x.crl", "sslcrl is not supported"),
    ] {
        let out = std::process::Command::new(common::relay_bin())
            .arg("status")
            .env_clear()
            .env("HOME", "/nonexistent/outbox-relay-test-home")
            .env(
                "RELAY_POSTGRES_URL",
                format!("postgres://relay:sekrit@127.0.0.1:1/app?{params}"),
            )
            .env(
                "RELAY_CLICKHOUSE_URL",
                "http://default:@127.0.0.1:1/analytics",
            )
            .output()
            .expect("run outbox-relay");
        let error = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{params}: {error}");
        assert!(
            error.contains("postgres_url") && error.contains(expected),
            "{params}: {error}"
        );
        assert!(!error.contains("sekrit"), "{error}");
    }
}
