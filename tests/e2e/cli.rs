//! The command line's edges (issue 24, points 4 and 7), each with its documented exit code
//! (docs/operations.md, "Exit codes"): a WAL position the server cannot have (2), a publication
//! that exists without the outbox at `setup` (6), dead letters refused again by `retry` (7), a
//! stdout closed early (the command's own code, no panic), and a fatal error reported once.

mod common;

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{Fixture, relay_bin, stderr, wait_until};
use harness::PgVersion;

const LONG: Duration = Duration::from_secs(120);

/// `outbox-relay ARGS` with the fixture's settings (and `env`), stdout into a pipe whose read
/// end is closed before the command writes anything: (exit code, stderr).
fn with_stdout_closed(f: &Fixture, args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String) {
    let mut cmd = Command::new(relay_bin());
    cmd.args(args).env_clear();
    for key in ["PATH", "HOME"] {
        if let Ok(v) = std::env::var(key) {
            cmd.env(key, v);
        }
    }
    cmd.envs(f.env.iter().map(|(k, v)| (k, v)))
        .envs(env.iter().copied());
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn outbox-relay");
    // The only read end: every write of the command fails with EPIPE from its first byte.
    drop(child.stdout.take());
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    let status = child.wait().expect("wait for outbox-relay");
    (status.code(), err)
}

#[test]
fn a_closed_stdout_ends_the_output_quietly_with_the_commands_own_exit_code() {
    let f = Fixture::start(PgVersion::V18, &[]);
    let relay = f.spawn_relay();
    f.publish(2_000, 100, "closed_pipe");
    f.wait_for_rows(2_000, LONG, Some(&relay));
    // Enough dead letters that `list` writes far more than a pipe buffer holds.
    f.sql(
        "INSERT INTO event_outbox_dead_letters (event_id, commit_lsn, tx_seq, event_type,
                event_date_time, environment, event_context, metadata_version, error)
         SELECT gen_random_uuid(), '0/1', g, 'listed', now(), 'test', '{}', 1,
                'Code: 469. a refusal long enough to fill lines: ' || repeat('x', 200)
           FROM generate_series(1, 2000) g",
    );
    for args in [
        &["status"][..],
        &["status", "--json"],
        &["dead-letters", "list"],
        &["dead-letters", "list", "--json"],
        &["verify"],
        &["verify", "--json"],
        &["verify", "--help"],
        &["setup", "--print-sql"],
        &["replay", "--from-lsn", "0/0", "--dry-run"],
        &["replay", "--from-lsn", "0/0", "--dry-run", "--json"],
    ] {
        let expected = f.relay(args).status.code();
        assert_eq!(expected, Some(0), "{args:?} with a reader: exit code");
        let (code, err) = with_stdout_closed(&f, args, &[]);
        assert_eq!(code, expected, "{args:?} into a closed pipe:\n{err}");
        assert!(
            !err.contains("panicked") && !err.contains("Broken pipe"),
            "{args:?} into a closed pipe:\n{err}"
        );
    }
    // A failing command keeps its code too: `status` of a missing slot exits 3.
    let (code, err) = with_stdout_closed(&f, &["status"], &[("RELAY_SLOT", "no_such_slot")]);
    assert_eq!(code, Some(3), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(relay.terminate().code(), Some(0));
}

#[test]
fn a_fatal_error_is_reported_once_in_either_log_format() {
    let f = Fixture::start(PgVersion::V18, &[]);
    // `run` on a slot that does not exist stops at once, naming the fix.
    let says = "does not exist: run `outbox-relay setup`";
    let out = f.relay_with(&["run"], &[("RELAY_SLOT", "no_such_slot")]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.matches(says).count(), 1, "reported once:\n{err}");
    assert!(err.contains("outbox-relay: the relay stopped: "), "{err}");
    // As JSON: one ERROR record, nothing else on stderr repeats it.
    let out = f.relay_with(
        &["run"],
        &[("RELAY_SLOT", "no_such_slot"), ("RELAY_LOG_FORMAT", "json")],
    );
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.matches(says).count(), 1, "reported once:\n{err}");
    let record = err
        .lines()
        .find(|l| l.contains(says))
        .and_then(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .unwrap_or_default();
    assert_eq!(record["level"], "ERROR", "{err}");
    // A one-shot command too (replay's position check, exit 2).
    let out = f.relay(&["replay", "--from-lsn", "FF/0"]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert_eq!(err.matches("is past the end").count(), 1, "{err}");
}

#[test]
fn replay_refuses_a_position_past_the_wal_or_before_the_checkpoints_with_exit_2() {
    let f = Fixture::start(PgVersion::V18, &[]);
    let relay = f.spawn_relay();
    f.publish(300, 10, "positions");
    f.wait_for_rows(300, LONG, Some(&relay));
    // Past the server's WAL (the typo of issue 24: FF/0), with and without --dry-run.
    for args in [
        &["replay", "--from-lsn", "FF/0"][..],
        &["replay", "--from-lsn", "FF/0", "--dry-run"],
    ] {
        let out = f.relay(args);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        let current = f.current_lsn();
        assert!(
            err.contains("WAL position FF/0 is past the end of this server's WAL (")
                && err.contains("pg_current_wal_lsn()"),
            "{err}"
        );
        // The position named is the server's (at most the one read right after).
        let named = err
            .split("server's WAL (")
            .nth(1)
            .and_then(|rest| rest.split(',').next())
            .map(common::parse_lsn)
            .unwrap_or(u64::MAX);
        assert!(named <= current && named > 0, "{err}");
        assert!(out.stdout.is_empty(), "nothing reported as done");
    }
    // Before the oldest checkpoint (setup recorded the first one after the slot's creation).
    let oldest = f.sql(&format!(
        "SELECT min(snapshot_lsn) FROM event_outbox_checkpoints WHERE slot = '{}'",
        f.slot
    ));
    let out = f.relay(&["replay", "--from-lsn", "0/10"]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("WAL position 0/10 is before the oldest checkpoint")
            && err.contains(&format!("({};", oldest.trim()))
            && err.contains("0/0 for everything"),
        "{err}"
    );
    // verify --from-lsn: the same positions refused the same way, "could not check" (exit 2),
    // never a "nothing to verify" success.
    for (from, says) in [
        (
            "FF/0",
            "WAL position FF/0 is past the end of this server's WAL (",
        ),
        ("0/10", "WAL position 0/10 is before the oldest checkpoint"),
    ] {
        let out = f.relay(&["verify", "--from-lsn", from, "--wait-s", "30"]);
        let err = stderr(&out);
        assert_eq!(
            out.status.code(),
            Some(2),
            "verify --from-lsn {from}: {err}"
        );
        assert!(err.contains(says), "{err}");
    }
    // 0/0 (the whole outbox) and a position the relay confirmed are fine.
    for from in ["0/0".to_string(), oldest.trim().to_string()] {
        let out = f.relay(&["replay", "--from-lsn", &from, "--json"]);
        assert_eq!(out.status.code(), Some(0), "{from}: {}", stderr(&out));
        let out = f.relay(&["verify", "--from-lsn", &from, "--wait-s", "30"]);
        assert_eq!(
            out.status.code(),
            Some(0),
            "verify {from}: {}",
            stderr(&out)
        );
    }
    assert_eq!(f.ch_count(), 300, "replay doubled nothing");
    assert_eq!(relay.terminate().code(), Some(0));
}

#[test]
fn setup_stops_with_exit_6_naming_the_fix_when_the_publication_exists_without_the_outbox() {
    let mut f = Fixture::start(PgVersion::V18, &[]);
    // Three publications that exist without streaming the outbox: another table only, no
    // inserts, a row filter.
    f.sql(
        "CREATE PUBLICATION other_tables FOR TABLE event_outbox_checkpoints;
         CREATE PUBLICATION no_inserts FOR TABLE event_outbox WITH (publish = 'update, delete');
         CREATE PUBLICATION filtered FOR TABLE event_outbox WHERE (event_type <> 'secret')
             WITH (publish = 'insert');",
    );
    for (publication, fix) in [
        (
            "other_tables",
            r#"ALTER PUBLICATION "other_tables" ADD TABLE "public"."event_outbox";"#,
        ),
        (
            "no_inserts",
            r#"ALTER PUBLICATION "no_inserts" SET (publish = 'insert, update, delete');"#,
        ),
        (
            "filtered",
            r#"ALTER PUBLICATION "filtered" DROP TABLE "public"."event_outbox"; ALTER PUBLICATION "filtered" ADD TABLE "public"."event_outbox";"#,
        ),
    ] {
        f.set_env("RELAY_PUBLICATION", publication);
        let out = f.relay(&["setup"]);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(6), "{publication}: {err}");
        assert!(
            err.contains("setup stopped: ") && err.contains(&format!("\n  {fix}\n")),
            "{publication}: setup should name {fix:?}:\n{err}"
        );
        assert!(!err.contains("setup complete"), "{err}");
        // `status` agrees (6); the statement setup named fixes it.
        assert_eq!(f.relay(&["status"]).status.code(), Some(6));
        f.sql(fix);
        let out = f.relay(&["setup"]);
        assert!(out.status.success(), "{publication}: {}", stderr(&out));
        assert_eq!(f.relay(&["status"]).status.code(), Some(0));
    }
    // Streamed through the fixed publication.
    let relay = f.spawn_relay();
    f.publish(100, 10, "after_the_fix");
    f.wait_for_rows(100, LONG, Some(&relay));
    assert_eq!(relay.terminate().code(), Some(0));
}

#[test]
fn dead_letters_retry_exits_7_while_clickhouse_refuses_letters_again() {
    let f = Fixture::start(PgVersion::V18, &[]);
    f.ch("ALTER TABLE {db}.event_log ADD CONSTRAINT readable_context CHECK isValidJSON(event_context)");
    f.sql(
        r#"INSERT INTO event_outbox_dead_letters (event_id, commit_lsn, tx_seq, event_type,
                event_date_time, environment, event_context, metadata_version, error)
           VALUES ('00000000-0000-4000-8000-00000000dead', '0/1', 0, 'poison', now(), 'test',
                   '{"k": 1E+400}', 1, 'refused'),
                  ('00000000-0000-4000-8000-00000000beef', '0/1', 1, 'poison', now(), 'test',
                   '{"k": 1E+400}', 1, 'refused')"#,
    );
    let out = f.relay(&["dead-letters", "retry"]);
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(7), "{said}{}", stderr(&out));
    assert!(
        said.starts_with("0 shipped, 0 were already in ClickHouse, 2 refused again"),
        "{said}"
    );
    // One fixed, one still refused: still 7.
    f.sql(
        r#"UPDATE event_outbox_dead_letters SET event_context = '{"k": 2}'
            WHERE event_id = '00000000-0000-4000-8000-00000000dead'"#,
    );
    let out = f.relay(&["dead-letters", "retry"]);
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(7), "{said}");
    assert!(
        said.starts_with("1 shipped, 0 were already in ClickHouse, 1 refused again"),
        "{said}"
    );
    // Both fixed: 0.
    f.sql(r#"UPDATE event_outbox_dead_letters SET event_context = '{"k": 3}'"#);
    let out = f.relay(&["dead-letters", "retry"]);
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(0), "{said}{}", stderr(&out));
    assert!(
        said.starts_with("1 shipped, 0 were already in ClickHouse, 0 refused again"),
        "{said}"
    );
    assert!(wait_until(LONG, || f.ch_count() == 2));
}
