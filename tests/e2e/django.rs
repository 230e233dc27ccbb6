//! The Django snippet (contrib/django) against a real PostgreSQL, with pytest-django; the events
//! its tests commit then reach ClickHouse through the relay, and the rolled-back one does not.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{Fixture, stderr};
use harness::PgVersion;

#[test]
fn django_snippet_publishes_inside_transaction_atomic() {
    let f = Fixture::start(PgVersion::V15, &[]);
    let relay = f.spawn_relay();
    let root = harness::workspace_root();
    let out = Command::new(root.join(".venv/bin/python"))
        .args(["-m", "pytest", "-q", "-p", "no:cacheprovider"])
        .arg(root.join("contrib/django/tests"))
        .env("OUTBOX_TEST_DATABASE_URL", f.pg.url(&f.db))
        .env("DJANGO_SETTINGS_MODULE", "")
        .output()
        .expect("run pytest (bash tools/bootstrap.sh installs it)");
    assert!(
        out.status.success(),
        "pytest failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        stderr(&out)
    );
    f.wait_for_rows(1, Duration::from_secs(120), Some(&relay));
    // Give the relay every chance to ship a wrong row: wait for the slot to catch up.
    assert!(common::wait_until(Duration::from_secs(120), || f.status()
        ["caught_up"]
        == true));
    assert_eq!(
        f.ch("SELECT event_type, JSONExtractString(event_context, 'customer') FROM {db}.event_log FORMAT TSV"),
        "django.committed\tZoë\n"
    );
}
