//! Least privilege: an admin runs `setup`; the relay runs as a role with only the grants
//! docs/operations.md ("Least privilege") lists, survives kill -9 with every event exactly once,
//! and a missing grant is named.

mod common;

use std::time::Duration;

use common::{Fixture, stderr};
use harness::PgVersion;

#[test]
fn relay_role_with_documented_grants_only_pg15() {
    relay_role_with_documented_grants_only(PgVersion::V15);
}

#[test]
fn relay_role_with_documented_grants_only_pg18() {
    relay_role_with_documented_grants_only(PgVersion::V18);
}

/// The grants of docs/operations.md, "Least privilege", for the default names.
const GRANTS: &str = "
CREATE ROLE relay LOGIN REPLICATION;
GRANT USAGE ON SCHEMA public TO relay;
GRANT SELECT, DELETE ON event_outbox TO relay;
GRANT SELECT, INSERT, DELETE ON event_outbox_checkpoints TO relay;
GRANT SELECT, INSERT, UPDATE, DELETE ON event_outbox_dead_letters TO relay;
";

fn relay_role_with_documented_grants_only(v: PgVersion) {
    let mut f = Fixture::start(v, &[]);
    let docs = std::fs::read_to_string(harness::workspace_root().join("docs/operations.md"))
        .expect("docs/operations.md");
    for grant in GRANTS.lines().filter(|l| l.starts_with("GRANT")) {
        assert!(docs.contains(grant), "docs/operations.md lacks {grant:?}");
    }
    f.sql(GRANTS);
    let url = f.pg.url(&f.db).replacen("postgres@", "relay@", 1);
    f.set_env("RELAY_POSTGRES_URL", &url);
    // setup as the relay role: the objects are the admin's, only the slot and ClickHouse are
    // checked.
    let out = f.relay(&["setup"]);
    assert!(out.status.success(), "setup as relay: {}", stderr(&out));
    let mut relay = f.spawn_relay();
    f.publish(2_000, 50, "least_privilege");
    f.wait_for_rows(200, Duration::from_secs(60), Some(&relay));
    relay.kill_now();
    let relay = f.spawn_relay();
    f.publish(500, 1, "after_restart");
    let expected = f.pg_ids();
    f.wait_for_rows(
        expected.len() as u64,
        Duration::from_secs(120),
        Some(&relay),
    );
    let (got, rows) = f.ch_ids();
    assert_eq!(got, expected, "{}", relay.log());
    assert_eq!(rows, expected.len() as u64, "duplicates");
    assert!(
        !relay.log().contains("permission denied"),
        "{}",
        relay.log()
    );
    let out = f.relay(&["status"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    // verify: its lock on the outbox, its watchdog and its look-ups with these grants only.
    let out = f.relay(&["verify", "--wait-s", "60"]);
    assert_eq!(out.status.code(), Some(0), "verify: {}", stderr(&out));
    // A missing grant is named, with the way to the list of grants.
    f.pg.psql(&f.db, "REVOKE SELECT ON event_outbox FROM relay")
        .unwrap();
    let out = f.relay(&["replay", "--from-lsn", "0/0", "--dry-run"]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("permission denied for table event_outbox") && err.contains("Least privilege"),
        "{err}"
    );
    assert_eq!(relay.terminate().code(), Some(0));
}

/// The ClickHouse grants of docs/operations.md, "Least privilege" (the lines after `--
/// ClickHouse: the relay's user`), for the database `db`, as users.xml grant queries.
fn documented_clickhouse_grants(db: &str) -> Vec<String> {
    let docs = std::fs::read_to_string(harness::workspace_root().join("docs/operations.md"))
        .expect("docs/operations.md");
    let block = docs
        .split("-- ClickHouse: the relay's user\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("docs/operations.md lists the ClickHouse grants");
    let grants: Vec<String> = block
        .lines()
        .filter(|l| l.starts_with("GRANT "))
        .map(|l| {
            l.trim_end_matches(';')
                .trim_end_matches(" TO relay")
                .replace("analytics.", &format!("{db}."))
        })
        .collect();
    assert!(!grants.is_empty(), "no GRANT lines in:\n{block}");
    grants
}

/// A ClickHouse user of users.xml with these grants (chDB has no storage for CREATE USER).
fn clickhouse_user(name: &str, password: &str, grants: &[String]) -> String {
    let queries: String = grants
        .iter()
        .map(|g| format!("<query>{g}</query>"))
        .collect();
    format!(
        "<{name}><password>{password}</password><networks><ip>::/0</ip></networks>\
         <profile>default</profile><quota>default</quota><grants>{queries}</grants></{name}>"
    )
}

/// The relay's ClickHouse user with only the grants docs/operations.md lists: `run` (killed
/// with -9 and restarted: the restart check's KILL QUERY runs), `status`, `replay` and
/// `dead-letters retry` work, every event exactly once; without the grant on system.processes
/// the restart check is refused, as the docs say.
#[test]
fn clickhouse_user_with_documented_grants_only() {
    let ch_db = harness::unique_name("analytics");
    let grants = documented_clickhouse_grants(&ch_db);
    let without_processes: Vec<String> = grants
        .iter()
        .filter(|g| !g.contains("system.processes"))
        .cloned()
        .collect();
    assert_ne!(without_processes, grants, "the docs grant system.processes");
    let users = clickhouse_user("relay_ch", "pw", &grants)
        + &clickhouse_user("relay_ch_no_processes", "pw", &without_processes);
    let Some(ch) = harness::ClickHouseServer::start_with_users(&users).expect("start ClickHouse")
    else {
        println!("SKIP: an external ClickHouse (RELAY_TEST_CLICKHOUSE_URL) has its own users");
        return;
    };
    let port = ch.http_port();
    // setup as ClickHouse's admin (`default`), everything else as the restricted user.
    let mut f = Fixture::start_on_servers(
        harness::PgServer::start(PgVersion::V18).expect("start PostgreSQL"),
        ch,
        ch_db.clone(),
        &[],
    );
    let restricted = format!("http://relay_ch:pw@127.0.0.1:{port}/{ch_db}");
    f.set_env("RELAY_CLICKHOUSE_URL", &restricted);
    // The user really is restricted.
    let denied = f.relay_with(&["setup"], &[("RELAY_CLICKHOUSE_TABLE", "another_table")]);
    assert_eq!(denied.status.code(), Some(1));
    assert!(
        stderr(&denied).contains("Not enough privileges"),
        "{}",
        stderr(&denied)
    );

    let mut relay = f.spawn_relay();
    f.publish(2_000, 50, "ch_least_privilege");
    f.wait_for_rows(200, Duration::from_secs(60), Some(&relay));
    relay.kill_now();
    let first_log = relay.log();
    let relay = f.spawn_relay();
    f.publish(500, 1, "after_restart");
    let expected = f.pg_ids();
    f.wait_for_rows(
        expected.len() as u64,
        Duration::from_secs(120),
        Some(&relay),
    );
    let (got, rows) = f.ch_ids();
    assert_eq!(got, expected, "{}", relay.log());
    assert_eq!(rows, expected.len() as u64, "duplicates");
    let out = f.relay(&["status"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("clickhouse           reachable"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    // replay: ClickHouse lost everything (an admin's TRUNCATE); re-shipped exactly once.
    f.ch("TRUNCATE TABLE {db}.event_log");
    let out = f.relay(&["replay", "--from-lsn", "0/0"]);
    assert_eq!(out.status.code(), Some(0), "replay: {}", stderr(&out));
    let (got, rows) = f.ch_ids();
    assert_eq!(got, expected);
    assert_eq!(rows, expected.len() as u64, "duplicates after replay");
    // verify: complete, with the same grants.
    let out = f.relay(&["verify", "--wait-s", "60"]);
    assert_eq!(out.status.code(), Some(0), "verify: {}", stderr(&out));

    // dead-letters retry ships a (fixed) dead letter.
    f.sql(
        r#"INSERT INTO event_outbox_dead_letters (event_id, commit_lsn, tx_seq, event_type,
                event_date_time, environment, event_context, metadata_version, error)
           VALUES ('00000000-0000-4000-8000-0000000000aa', '0/1', 0, 'retried', now(), 'test',
                   '{"k": 1}', 1, 'refused')"#,
    );
    let out = f.relay(&["dead-letters", "retry"]);
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(0), "{said}{}", stderr(&out));
    assert!(said.starts_with("1 shipped"), "{said}");
    assert_eq!(f.ch_count(), expected.len() as u64 + 1);

    for log in [first_log, relay.log()] {
        assert!(
            !log.contains("Not enough privileges") && !log.contains("ACCESS_DENIED"),
            "{log}"
        );
    }
    assert_eq!(relay.terminate().code(), Some(0));

    // Without SELECT on system.processes, the restart check (KILL QUERY) is refused.
    let no_processes = format!("http://relay_ch_no_processes:pw@127.0.0.1:{port}/{ch_db}");
    let relay = f.spawn_relay_with(&[("RELAY_CLICKHOUSE_URL", &no_processes)]);
    assert!(
        common::wait_until(Duration::from_secs(60), || relay
            .log()
            .contains("SELECT ON system.processes")),
        "{}",
        relay.log()
    );
}
