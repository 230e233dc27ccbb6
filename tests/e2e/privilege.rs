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
