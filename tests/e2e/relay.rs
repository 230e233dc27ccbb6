//! End to end, against real servers: PostgreSQL (logical replication) -> outbox-relay ->
//! ClickHouse. Each scenario runs on PostgreSQL 15 and 18.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::{Fixture, http_get, metric, parse_lsn, scrape_as, stderr, wait_until};
use harness::PgVersion;

const LONG: Duration = Duration::from_secs(120);

scenarios!(
    each_postgres: [
        columns_arrive_intact,
        rollbacks_never_arrive,
        confirmed_lsn_never_passes_clickhouse,
        restart_resumes_without_loss,
        kill9_mid_stream_loses_nothing,
        idle_relay_advances_slot_past_unrelated_wal,
        purge_keeps_the_outbox_bounded,
    ],
    clickhouse_only: [
        clickhouse_down_holds_the_slot,
        inserts_are_rows_over_max_rows,
        metrics_match_clickhouse_and_the_slot,
        batches_and_inserts,
    ],
);

/// A ClickHouse user whose password has `+` in it (tools/clickhouse_server.py creates it), in
/// the URL both as a plain `+` and as `%2B`: RFC 3986 decoding keeps `+` a `+`.
#[test]
fn clickhouse_password_with_plus() {
    let mut f = Fixture::start(PgVersion::V15, &[]);
    if f.ch.is_external() {
        println!("SKIP: an external ClickHouse has no relay_plus user");
        return;
    }
    let url = format!(
        "http://relay_plus:p+w%2Bx@127.0.0.1:{}/{}",
        f.ch.http_port(),
        f.ch_db
    );
    f.set_env("RELAY_CLICKHOUSE_URL", &url);
    let out = f.relay(&["setup"]);
    assert!(
        out.status.success(),
        "setup as relay_plus: {}",
        stderr(&out)
    );
    let relay = f.spawn_relay();
    f.publish(50, 10, "plus");
    f.wait_for_rows(50, LONG, Some(&relay));
    drop(relay);
    // The password the old form decoding produced (`p w+x`) is refused: the one above was used.
    f.set_env("RELAY_CLICKHOUSE_URL", &url.replace("p+w", "p%20w"));
    let out = f.relay(&["setup"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("AUTHENTICATION_FAILED"),
        "{}",
        stderr(&out)
    );
}

fn columns_arrive_intact(v: PgVersion) {
    let f = Fixture::start(v, &[]);
    let relay = f.spawn_relay();
    f.sql(
        r#"INSERT INTO event_outbox (event_id, event_type, event_date_time, environment, event_context, metadata_version)
           VALUES ('8c1e7f7e-2f6b-4a43-9d5e-0a1b2c3d4e5f', 'user.login', '2026-11-25 10:11:12.345678+03', 'staging',
                   '{"user": {"id": 42, "name": "Zoë ✓"}, "ip": "10.0.0.1", "tags": ["a", "b"], "ok": true}', 7);
           INSERT INTO event_outbox (event_type, event_context) VALUES ('defaults', '{"k": "v"}');"#,
    );
    f.wait_for_rows(2, LONG, Some(&relay));
    let row = f.ch(
        "SELECT toString(event_id), event_type, toString(event_date_time), environment, \
                event_context, metadata_version \
           FROM {db}.event_log WHERE event_type = 'user.login' FORMAT TSV",
    );
    let cols: Vec<&str> = row.trim_end().split('\t').collect();
    assert_eq!(cols[0], "8c1e7f7e-2f6b-4a43-9d5e-0a1b2c3d4e5f");
    assert_eq!(cols[1], "user.login");
    assert_eq!(cols[2], "2026-11-25 07:11:12.345678");
    assert_eq!(cols[3], "staging");
    // The published text, spelling included (tests/e2e/fidelity.rs covers JSON's corners).
    assert_eq!(
        cols[4],
        r#"{"user": {"id": 42, "name": "Zoë ✓"}, "ip": "10.0.0.1", "tags": ["a", "b"], "ok": true}"#
    );
    assert_eq!(cols[5], "7");

    // Defaults: a uuid, the publishing time to the microsecond, the configured environment, 1.
    let pg = f.sql(
        "SELECT event_id, to_char(event_date_time AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US'), environment, metadata_version \
           FROM event_outbox WHERE event_type = 'defaults'",
    );
    let pg: Vec<&str> = pg.trim().split('|').collect();
    let ch = f.ch(
        "SELECT toString(event_id), toString(event_date_time), environment, metadata_version \
           FROM {db}.event_log WHERE event_type = 'defaults' FORMAT TSV",
    );
    let ch: Vec<&str> = ch.trim_end().split('\t').collect();
    assert_eq!(pg, ch);
    assert_eq!(ch[2], "test");
    assert_eq!(ch[3], "1");

    // Columns added to (and dropped from) the outbox are picked up from the next Relation
    // message.
    f.sql(
        "ALTER TABLE event_outbox ADD COLUMN trace_id text;
         INSERT INTO event_outbox (event_type, event_context, trace_id) VALUES ('after_alter', '{\"a\": 1}', 'abc');
         ALTER TABLE event_outbox ADD COLUMN first_col int, DROP COLUMN trace_id;
         INSERT INTO event_outbox (event_type, event_context, first_col) VALUES ('after_alter', '{\"a\": 2}', 5);",
    );
    f.wait_for_rows(4, LONG, Some(&relay));
    let after = f.ch("SELECT event_context FROM {db}.event_log WHERE event_type = 'after_alter' ORDER BY commit_lsn FORMAT TSV");
    assert_eq!(after, "{\"a\": 1}\n{\"a\": 2}\n");
    drop(relay);
}

fn rollbacks_never_arrive(v: PgVersion) {
    let f = Fixture::start(v, &[]);
    let relay = f.spawn_relay();
    f.sql(
        "BEGIN;
         INSERT INTO event_outbox (event_type, event_context) VALUES ('rolled_back', '{}');
         ROLLBACK;
         BEGIN;
         INSERT INTO event_outbox (event_type, event_context) VALUES ('kept', '{\"i\": 1}');
         SAVEPOINT s;
         INSERT INTO event_outbox (event_type, event_context) VALUES ('rolled_back_savepoint', '{}');
         ROLLBACK TO SAVEPOINT s;
         INSERT INTO event_outbox (event_type, event_context) VALUES ('kept', '{\"i\": 2}');
         COMMIT;
         INSERT INTO event_outbox (event_type, event_context) VALUES ('marker', '{}');",
    );
    f.wait_for_rows(3, LONG, Some(&relay));
    let types = f.ch("SELECT event_type, count() FROM {db}.event_log GROUP BY event_type ORDER BY event_type FORMAT TSV");
    assert_eq!(types, "kept\t2\nmarker\t1\n");
    // The two kept events of one transaction: one commit LSN, positions 0 and 1.
    let kept = f.ch(
        "SELECT uniqExact(commit_lsn), groupArray(tx_seq) FROM (SELECT * FROM {db}.event_log WHERE event_type = 'kept' ORDER BY tx_seq) FORMAT TSV",
    );
    assert_eq!(kept, "1\t[0,1]\n");
    drop(relay);
}

/// 25,000 events in one transaction plus 25,000 single-event transactions, at most 10,000 rows
/// per batch: exactly 50,000 rows, each once, from at most 6 inserts; the slot catches up.
fn batches_and_inserts(v: PgVersion) {
    // A generous wait limit, so that the row limit decides the cuts even on a loaded machine.
    let f = Fixture::start(
        v,
        &[
            ("RELAY_BATCH_MAX_ROWS", "10000"),
            ("RELAY_BATCH_MAX_WAIT_MS", "2000"),
        ],
    );
    // Without merges, every insert stays its own part, with its own block number.
    f.ch("SYSTEM STOP MERGES {db}.event_log");
    // The backlog is written while the relay is stopped, so batching is decided by the sizes.
    f.publish(25_000, 25_000, "big_tx");
    f.publish(25_000, 1, "single");
    let relay = f.spawn_relay();
    f.wait_for_rows(50_000, LONG, Some(&relay));
    let (ids, rows) = f.ch_ids();
    assert_eq!(rows, 50_000);
    assert_eq!(ids.len(), 50_000);
    assert_eq!(ids, f.pg_ids());
    let inserts = insert_count(&f);
    println!("50,000 events shipped in {inserts} inserts");
    assert!(inserts <= 6, "{inserts} inserts");
    // The big transaction is one batch: all its rows in one insert.
    let blocks = f.ch(
        "SELECT uniqExact(_block_number) FROM {db}.event_log WHERE event_type = 'big_tx' FORMAT TSV",
    );
    assert_eq!(blocks.trim(), "1");
    assert!(
        wait_until(LONG, || f.status()["caught_up"] == true),
        "slot did not catch up: {}",
        f.status()
    );
    assert_eq!(relay.terminate().code(), Some(0));
}

/// N single-event transactions become ceil(N / batch_max_rows) inserts when the wait limit does
/// not cut batches first.
fn inserts_are_rows_over_max_rows(v: PgVersion) {
    let f = Fixture::start(
        v,
        &[
            ("RELAY_BATCH_MAX_ROWS", "4000"),
            ("RELAY_BATCH_MAX_WAIT_MS", "5000"),
        ],
    );
    f.publish(10_000, 1, "single");
    let relay = f.spawn_relay();
    f.wait_for_rows(10_000, LONG, Some(&relay));
    assert_eq!(insert_count(&f), 3, "10,000 rows / 4,000 per batch");
    assert_eq!(f.ch_count(), 10_000);
}

/// Rows older than the retention are deleted from the outbox; deleting them loses no event,
/// shipped or not, because the relay ships from the WAL.
fn purge_keeps_the_outbox_bounded(v: PgVersion) {
    let f = Fixture::start(
        v,
        &[
            ("RELAY_OUTBOX_RETENTION_HOURS", "1"),
            ("RELAY_PURGE_INTERVAL_S", "1"),
        ],
    );
    // The purge goes by commit time, which the relay knows from its checkpoints: these rows
    // are shipped, then their checkpoints are made two hours old.
    f.sql(
        "INSERT INTO event_outbox (event_type, event_context)
         SELECT 'old', json_build_object('n', g) FROM generate_series(1, 25000) g;",
    );
    let relay = f.spawn_relay();
    f.wait_for_rows(25_000, LONG, Some(&relay));
    assert!(wait_until(LONG, || {
        f.sql("SELECT count(*) FROM event_outbox_checkpoints")
            .trim()
            != "0"
    }));
    f.sql("UPDATE event_outbox_checkpoints SET recorded_at = recorded_at - interval '2 hours'");
    // Committed now, dated two hours ago by the publisher: kept.
    f.sql(
        "INSERT INTO event_outbox (event_type, event_date_time, event_context)
         SELECT 'new', now() - interval '2 hours', json_build_object('n', g) FROM generate_series(1, 100) g;",
    );
    let purged = wait_until(LONG, || {
        f.sql("SELECT count(*) FROM event_outbox WHERE event_type = 'old'")
            .trim()
            == "0"
    });
    assert!(purged, "old rows not purged; relay log:\n{}", relay.log());
    assert_eq!(f.sql("SELECT count(*) FROM event_outbox").trim(), "100");
    f.wait_for_rows(25_100, LONG, Some(&relay));
    let types = f.ch("SELECT event_type, count(), uniqExact(event_id) FROM {db}.event_log GROUP BY 1 ORDER BY 1 FORMAT TSV");
    assert_eq!(types, "new\t100\t100\nold\t25000\t25000\n");
    assert!(relay.log().contains("outbox purged"), "{}", relay.log());
}

/// After a scripted run, /metrics agrees with ClickHouse and pg_replication_slots; /healthz and
/// /readyz answer, and /readyz turns 503 when ClickHouse is gone.
fn metrics_match_clickhouse_and_the_slot(v: PgVersion) {
    let addr = common::free_addr();
    let mut f = Fixture::start(v, &[("RELAY_METRICS_ADDR", &addr)]);
    let relay = f.spawn_relay();
    f.publish(3_000, 30, "metered");
    f.wait_for_rows(3_000, LONG, Some(&relay));
    // Wait until the relay has confirmed everything and PostgreSQL shows it.
    let settled = wait_until(LONG, || {
        let text = http_get(&addr, "/metrics").1;
        f.status()["caught_up"] == true
            && metric(&text, "outbox_relay_confirmed_lsn") as u64 == f.confirmed_lsn()
    });
    let text = http_get(&addr, "/metrics").1;
    assert!(
        settled,
        "metrics never matched the slot:\n{text}\n{}",
        f.status()
    );
    assert_eq!(
        metric(&text, "outbox_relay_events_shipped_total") as u64,
        f.ch_count()
    );
    assert_eq!(
        metric(&text, "outbox_relay_batches_shipped_total") as u64,
        insert_count(&f)
    );
    assert_eq!(
        metric(&text, "outbox_relay_batch_rows_count") as u64,
        insert_count(&f)
    );
    assert_eq!(metric(&text, "outbox_relay_batch_rows_sum") as u64, 3_000);
    assert_eq!(metric(&text, "outbox_relay_slot_active"), 1.0);
    assert_eq!(metric(&text, "outbox_relay_lag_seconds"), 0.0);
    // Prometheus asks for OpenMetrics (its default Accept header) and gets it, with the same
    // counts; anything else gets the Prometheus text format.
    let (content_type, open) = scrape_as(
        &addr,
        "application/openmetrics-text;version=1.0.0;q=0.5,application/openmetrics-text;\
         version=0.0.1;q=0.4,text/plain;version=0.0.4;q=0.2,*/*;q=0.1",
    );
    assert_eq!(
        content_type,
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    );
    assert!(open.ends_with("\n# EOF\n"), "{open}");
    assert!(
        open.contains("\n# TYPE outbox_relay_events_shipped counter\n"),
        "{open}"
    );
    for name in [
        "outbox_relay_events_shipped_total",
        "outbox_relay_batch_rows_count",
        "outbox_relay_confirmed_lsn",
    ] {
        assert_eq!(metric(&open, name), metric(&text, name), "{name}");
    }
    let (content_type, plain) = scrape_as(&addr, "*/*");
    assert_eq!(content_type, "text/plain; version=0.0.4; charset=utf-8");
    assert!(!plain.contains("# EOF"), "{plain}");
    assert_eq!(
        f.sql(&format!(
            "SELECT active FROM pg_replication_slots WHERE slot_name = '{}'",
            f.slot
        ))
        .trim(),
        "t",
        "the slot is active while the relay reports it so"
    );
    assert_eq!(http_get(&addr, "/healthz"), (200, "ok\n".into()));
    assert_eq!(http_get(&addr, "/readyz").0, 200);
    let health = f.relay(&["health"]);
    assert!(health.status.success(), "{}", stderr(&health));

    f.ch.kill().unwrap();
    // /readyz answers from memory: it turns 503 once the relay's next check of ClickHouse
    // (every few seconds) fails.
    assert!(
        wait_until(LONG, || http_get(&addr, "/readyz").0 == 503),
        "{:?}",
        http_get(&addr, "/readyz")
    );
    let (code, body) = http_get(&addr, "/readyz");
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("ClickHouse"), "{body}");
    let health = f.relay(&["health"]);
    assert_eq!(health.status.code(), Some(1));
    assert!(stderr(&health).contains("not ready"), "{}", stderr(&health));
    f.publish(10, 10, "during_outage");
    assert!(
        wait_until(LONG, || {
            let text = http_get(&addr, "/metrics").1;
            text.lines().any(|l| {
                l.starts_with("outbox_relay_clickhouse_errors_total{kind=\"network\"}")
                    && !l.ends_with(" 0")
            })
        }),
        "{}",
        http_get(&addr, "/metrics").1
    );
    assert_eq!(
        http_get(&addr, "/healthz").0,
        200,
        "alive while ClickHouse is down"
    );
}

/// How many inserts ClickHouse received for the events table, counted by ClickHouse itself: each
/// insert allocates the next block number (an aborted one may burn one too, which only counts more).
fn insert_count(f: &Fixture) -> u64 {
    f.ch("SELECT max(max_block_number) FROM system.parts WHERE database = '{db}' AND table = 'event_log' FORMAT TSV")
        .trim()
        .parse()
        .unwrap()
}

/// While events stream, every transaction whose commit the slot has confirmed is in ClickHouse.
fn confirmed_lsn_never_passes_clickhouse(v: PgVersion) {
    let f = Fixture::start(v, &[("RELAY_BATCH_MAX_WAIT_MS", "50")]);
    let relay = f.spawn_relay();
    // Each transaction records the WAL position after its commit: its commit ends at or before.
    f.sql("CREATE TABLE tx_end (tx int PRIMARY KEY, end_lsn pg_lsn)");
    let mut checks = 0;
    for tx in 0..60 {
        f.sql(&format!(
            "INSERT INTO event_outbox (event_type, event_context)
               SELECT 'tx{tx}', json_build_object('n', g) FROM generate_series(1, 50) g;
             INSERT INTO tx_end VALUES ({tx}, pg_current_wal_insert_lsn());"
        ));
        // Read the slot first, then ClickHouse (which only grows).
        let confirmed = f.confirmed_lsn();
        let counts: HashSet<String> = f
            .ch("SELECT event_type FROM {db}.event_log GROUP BY event_type HAVING count() = 50 FORMAT TSV")
            .lines()
            .map(str::to_string)
            .collect();
        for line in f.sql("SELECT tx, end_lsn FROM tx_end").lines() {
            let (t, lsn) = line.split_once('|').unwrap();
            if parse_lsn(lsn) <= confirmed {
                checks += 1;
                assert!(
                    counts.contains(&format!("tx{t}")),
                    "slot confirmed {confirmed:X} past transaction tx{t} (ends before {lsn}) which ClickHouse does not have"
                );
            }
        }
    }
    assert!(
        checks > 0,
        "the slot never confirmed anything while publishing"
    );
    f.wait_for_rows(3_000, LONG, Some(&relay));
}

fn restart_resumes_without_loss(v: PgVersion) {
    let f = Fixture::start(v, &[]);
    let relay = f.spawn_relay();
    f.publish(1_000, 10, "before");
    f.wait_for_rows(1_000, LONG, Some(&relay));
    let log = relay.log();
    assert_eq!(
        relay.terminate().code(),
        Some(0),
        "SIGTERM exits 0; log:\n{log}"
    );
    f.publish(1_000, 10, "while_stopped");
    let relay = f.spawn_relay();
    f.publish(1_000, 10, "after");
    f.wait_for_rows(3_000, LONG, Some(&relay));
    let (ids, rows) = f.ch_ids();
    assert_eq!(ids, f.pg_ids());
    assert_eq!(rows, 3_000, "no duplicates after a clean stop");
    assert_eq!(relay.terminate().code(), Some(0));
}

/// ClickHouse killed: the slot does not move past what ClickHouse has; once ClickHouse is back,
/// everything arrives.
fn clickhouse_down_holds_the_slot(v: PgVersion) {
    let mut f = Fixture::start(v, &[]);
    let relay = f.spawn_relay();
    f.publish(100, 10, "before");
    f.wait_for_rows(100, LONG, Some(&relay));
    f.ch.kill().expect("kill ClickHouse");
    let before = parse_lsn(f.sql("SELECT pg_current_wal_insert_lsn()").trim());
    f.publish(500, 10, "during");
    // The relay fails to flush, then waits for ClickHouse; nothing moves the slot meanwhile.
    assert!(
        wait_until(LONG, || relay.log().contains("retrying")),
        "relay log:\n{}",
        relay.log()
    );
    let moved = wait_until(Duration::from_secs(3), || f.confirmed_lsn() > before);
    assert!(
        !moved,
        "confirmed while ClickHouse was down\n{}",
        relay.log()
    );
    assert!(
        f.confirmed_lsn() <= before,
        "slot confirmed {:X} past {before:X} while ClickHouse was down",
        f.confirmed_lsn()
    );
    f.ch.restart().expect("restart ClickHouse");
    f.wait_for_rows(600, LONG, Some(&relay));
    let (ids, _) = f.ch_ids();
    assert_eq!(ids, f.pg_ids());
    assert!(relay.log().contains("retrying"), "the outage is logged");
}

/// kill -9 in the middle of a 100,000-event stream, then a restart: every committed event_id
/// is in ClickHouse.
fn kill9_mid_stream_loses_nothing(v: PgVersion) {
    let f = Fixture::start(v, &[("RELAY_BATCH_MAX_ROWS", "5000")]);
    let relay = f.spawn_relay();
    f.publish(100_000, 100, "stream");
    let started = wait_until(LONG, || f.ch_count() >= 10_000);
    assert!(started, "relay log:\n{}", relay.log());
    relay.kill9();
    let at_kill = f.ch_count();
    let relay = f.spawn_relay();
    let ok = wait_until(LONG, || {
        let (ids, _) = f.ch_ids();
        ids.len() == 100_000
    });
    assert!(ok, "relay log:\n{}", relay.log());
    let (ids, rows) = f.ch_ids();
    assert_eq!(ids, f.pg_ids());
    println!(
        "kill -9 at {at_kill} rows: {} rows for 100000 events ({} duplicates)",
        rows,
        rows - 100_000
    );
}

/// With the relay stopped, 256 MB of WAL on an unrelated table; restarted and idle, the slot's
/// restart_lsn catches up with the server.
fn idle_relay_advances_slot_past_unrelated_wal(v: PgVersion) {
    let f = Fixture::start(v, &[]);
    f.sql("CREATE TABLE unrelated (id bigint, pad text)");
    let start = f.current_lsn();
    while f.current_lsn() - start < 256 * 1024 * 1024 {
        f.sql("INSERT INTO unrelated SELECT g, repeat('x', 1000) FROM generate_series(1, 50000) g");
    }
    let written = f.current_lsn() - start;
    let relay = f.spawn_relay();
    let caught_up = wait_until(LONG, || {
        // A checkpoint logs the running transactions, which lets the slot move restart_lsn.
        f.sql("CHECKPOINT");
        let row = f.sql(&format!(
            "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint FROM pg_replication_slots WHERE slot_name = '{}'",
            f.slot
        ));
        row.trim().parse::<i64>().unwrap() < 1024 * 1024
    });
    let status = f.status();
    assert!(
        caught_up,
        "restart_lsn still behind after {written} bytes of WAL: {status}\n{}",
        relay.log()
    );
    println!("{written} bytes of unrelated WAL; slot now: {status}");
    assert_eq!(relay.terminate().code(), Some(0));
}

#[test]
fn configuration_errors_are_clear() {
    let bin = common::relay_bin();
    let run = |env: &[(&str, &str)]| {
        let out = std::process::Command::new(&bin)
            .arg("status")
            .env_clear()
            .envs(env.iter().copied())
            .output()
            .unwrap();
        (out.status.code(), stderr(&out))
    };
    let (code, err) = run(&[]);
    assert_eq!(code, Some(2));
    assert!(err.contains("RELAY_POSTGRES_URL"), "{err}");
    let base = [
        ("RELAY_POSTGRES_URL", "postgres://u@127.0.0.1:1/db"),
        ("RELAY_CLICKHOUSE_URL", "http://127.0.0.1:1/db"),
    ];
    let (code, err) = run(&[base[0], base[1], ("RELAY_BATCH_MAX_ROWS", "lots")]);
    assert_eq!(code, Some(2));
    assert!(err.contains("batch_max_rows"), "{err}");
    let (code, err) = run(&[base[0], ("RELAY_CLICKHOUSE_URL", "clickhouse://x:9000")]);
    assert_eq!(code, Some(2));
    assert!(err.contains("RELAY_CLICKHOUSE_URL"), "{err}");
    let (code, err) = run(&[
        base[0],
        base[1],
        ("RELAY_CONFIG", "/nonexistent/relay.toml"),
    ]);
    assert_eq!(code, Some(2));
    assert!(err.contains("/nonexistent/relay.toml"), "{err}");
    // A server that is not there: exit 1, saying which server.
    let (code, err) = run(&base);
    assert_eq!(code, Some(1));
    assert!(err.contains("127.0.0.1:1"), "{err}");
}

/// `status` shows the newest checkpoint after restarts and after the WAL position grew a hex
/// digit (0/FFFFFFF to 0/10000000): compared as text, '0/FFBB780' comes after '0/4842B770', which
/// is how a soak saw `last_checkpoint_lsn` stuck 18 minutes back (issue 27).
#[test]
fn status_shows_the_newest_checkpoint() {
    let f = Fixture::start(PgVersion::V18, &[]);
    let pad_to = |target: u64| {
        while f.current_lsn() < target {
            f.sql("SELECT pg_logical_emit_message(false, 'pad', 'x'); SELECT pg_switch_wal()");
        }
    };
    // Checkpoints at 0/Fxxxxxx, then at 0/1xxxxxxx, with a kill -9 and a restart between.
    pad_to(0x0f00_0000);
    let mut relay = f.spawn_relay();
    let mut published = 0;
    for round in 0..2 {
        f.publish(300, 30, &format!("round{round}"));
        published += 300;
        f.wait_for_rows(published, Duration::from_secs(60), Some(&relay));
        relay.kill_now();
        pad_to(0x1000_0000);
        relay = f.spawn_relay();
    }
    f.publish(10, 1, "last");
    f.wait_for_rows(published + 10, Duration::from_secs(60), Some(&relay));
    let newest = |order: &str| {
        f.sql(&format!(
            "SELECT confirmed_lsn || ' ' || recorded_at FROM event_outbox_checkpoints
              ORDER BY {order} DESC LIMIT 1"
        ))
    };
    // Both ways of telling the newest agree here: the relay only moves forward.
    let by_lsn = newest("confirmed_lsn::pg_lsn");
    assert_eq!(by_lsn, newest("recorded_at"));
    let status = f.status();
    assert_eq!(
        format!(
            "{} {}",
            status["last_checkpoint_lsn"].as_str().unwrap(),
            status["last_checkpoint_at"].as_str().unwrap()
        ),
        by_lsn.trim(),
        "{status}"
    );
}
