//! Existing ClickHouse tables whose engine would merge, drop or change rows (issue 24, point 5):
//! `setup` and `run` refuse each kind ClickHouse (chdb-core) can create, saying why and what to
//! do, before writing a row or altering the table; the relay's own table, created beforehand
//! from `migrations/clickhouse/0001_event_log.sql`, and a ReplacingMergeTree keyed by event_id
//! are accepted and hold every event exactly once. (ReplicatedMergeTree and SharedMergeTree
//! cannot run here: `crates/relay/src/sink/engine.rs` tests them on ClickHouse's own output.)

mod common;

use std::time::Duration;

use common::{Fixture, stderr, wait_until};
use harness::PgVersion;

const LONG: Duration = Duration::from_secs(120);

/// The relay's columns, for tables the tests create.
const COLUMNS: &str = "event_id UUID, event_type LowCardinality(String), \
    event_date_time DateTime64(6, 'UTC'), environment LowCardinality(String), \
    event_context String, metadata_version UInt64, commit_lsn UInt64, tx_seq UInt32, xid UInt64, \
    trace_id String, source LowCardinality(String)";

/// (table, what follows the column list in CREATE TABLE, words the refusal must contain).
fn refused_tables() -> Vec<(&'static str, String, &'static str)> {
    let table = |tail: &str| format!("({COLUMNS}) {tail}");
    vec![
        (
            "replacing_by_type",
            table("ENGINE = ReplacingMergeTree ORDER BY (event_type)"),
            "engine ReplacingMergeTree with sorting key ((event_type))",
        ),
        (
            "collapsing",
            format!(
                "({COLUMNS}, sign Int8 DEFAULT 1) ENGINE = CollapsingMergeTree(sign) \
                 ORDER BY (event_type, event_date_time, event_id)"
            ),
            "engine CollapsingMergeTree",
        ),
        (
            "summing",
            table("ENGINE = SummingMergeTree ORDER BY (event_type, event_date_time)"),
            "engine SummingMergeTree",
        ),
        (
            "aggregating",
            table("ENGINE = AggregatingMergeTree ORDER BY (event_type, event_date_time)"),
            "engine AggregatingMergeTree",
        ),
        (
            "ttl_delete",
            table(
                "ENGINE = MergeTree ORDER BY (event_type, event_date_time, event_id) \
                 TTL toDateTime(event_date_time) + INTERVAL 30 DAY",
            ),
            "table TTL toDateTime(event_date_time) + toIntervalDay(30)",
        ),
        (
            "column_ttl",
            "(event_id UUID, event_type LowCardinality(String), \
              event_date_time DateTime64(6, 'UTC'), environment LowCardinality(String), \
              event_context String TTL toDateTime(event_date_time) + INTERVAL 1 DAY, \
              metadata_version UInt64, commit_lsn UInt64, tx_seq UInt32, xid UInt64, trace_id String, \
              source LowCardinality(String)) \
              ENGINE = MergeTree ORDER BY (event_type, event_date_time, event_id)"
                .to_string(),
            "column event_context has TTL",
        ),
        ("null", table("ENGINE = Null"), "engine Null"),
        ("memory", table("ENGINE = Memory"), "engine Memory"),
        (
            "buffer",
            table(
                "ENGINE = Buffer({db}, event_log, 1, 10, 100, 10000, 1000000, 10000000, 100000000)",
            ),
            "Point clickhouse_table at {db}.event_log",
        ),
        ("log", table("ENGINE = Log"), "engine Log"),
        ("tiny_log", table("ENGINE = TinyLog"), "engine TinyLog"),
        (
            "merge",
            table("ENGINE = Merge({db}, '^event_log$')"),
            "engine Merge",
        ),
        (
            "join",
            table("ENGINE = Join(ANY, LEFT, event_id)"),
            "engine Join",
        ),
        ("file", table("ENGINE = File(RowBinary)"), "engine File"),
    ]
}

#[test]
fn engines_that_merge_or_drop_rows_are_refused_by_setup_and_run() {
    let mut f = Fixture::start(PgVersion::V18, &[]);
    // Events waiting in the outbox: a session that got past the check would ship them.
    f.publish(1_000, 100, "engine_check");
    let confirmed = f.confirmed_lsn();
    let mut tables = refused_tables();
    f.ch("CREATE VIEW {db}.a_view AS SELECT * FROM {db}.event_log");
    f.ch("CREATE MATERIALIZED VIEW {db}.a_materialized_view TO {db}.event_log AS SELECT * FROM {db}.event_log");
    tables.push(("a_view", String::new(), "engine View"));
    tables.push((
        "a_materialized_view",
        String::new(),
        "engine MaterializedView",
    ));
    for (name, definition, says) in tables {
        if !definition.is_empty() {
            f.ch(&format!("CREATE TABLE {{db}}.{name} {definition}"));
        }
        let says = says.replace("{db}", &f.ch_db);
        f.set_env("RELAY_CLICKHOUSE_TABLE", name);
        let engine_before = f.ch(&format!(
            "SELECT engine_full, create_table_query FROM system.tables
              WHERE database = '{{db}}' AND name = '{name}'"
        ));

        let out = f.relay(&["setup"]);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "setup on {name}: {err}");
        assert!(
            err.contains("does not match what the relay writes") && err.contains(&says),
            "setup on {name} should say {says:?}:\n{err}"
        );
        assert_eq!(
            err.matches("does not match what the relay writes").count(),
            1,
            "printed once:\n{err}"
        );
        // Refused before setup's ALTERs touched it.
        let engine_after = f.ch(&format!(
            "SELECT engine_full, create_table_query FROM system.tables
              WHERE database = '{{db}}' AND name = '{name}'"
        ));
        assert_eq!(engine_after, engine_before, "setup altered {name}");

        let mut relay = f.spawn_relay();
        let stopped = wait_until(LONG, || !relay.is_running());
        let log = relay.log();
        assert!(stopped, "run on {name} did not stop:\n{log}");
        assert_eq!(
            relay.child.wait().ok().and_then(|s| s.code()),
            Some(1),
            "{log}"
        );
        assert!(
            log.contains("does not match what the relay writes") && log.contains(&says),
            "run on {name} should say {says:?}:\n{log}"
        );
        assert_eq!(
            f.confirmed_lsn(),
            confirmed,
            "run on {name} confirmed events"
        );
    }
    // Nothing reached the relay's own table either (the views and Buffer point at it).
    assert_eq!(f.ch_count(), 0);
}

#[test]
fn the_relays_own_table_and_an_event_id_keyed_replacing_table_are_accepted() {
    let f = Fixture::start(PgVersion::V18, &[]);
    let migration = std::fs::read_to_string(
        harness::workspace_root().join("migrations/clickhouse/0001_event_log.sql"),
    )
    .expect("migrations/clickhouse/0001_event_log.sql");
    for statement in migration.split(";\n") {
        if statement
            .lines()
            .any(|l| !l.trim().is_empty() && !l.starts_with("--"))
        {
            f.ch(&statement.replace("`event_log`", "{db}.`premade`"));
        }
    }
    f.ch(&format!(
        "CREATE TABLE {{db}}.replacing_by_id ({COLUMNS}) ENGINE = ReplacingMergeTree \
         ORDER BY (event_type, event_id)"
    ));
    // A slot of its own per table, created by setup before the events: each ships them all.
    let tables = ["premade", "replacing_by_id"];
    let slot = |name: &str| format!("{}_{name}", f.slot);
    for name in tables {
        let out = f.relay_with(
            &["setup"],
            &[
                ("RELAY_CLICKHOUSE_TABLE", name),
                ("RELAY_SLOT", &slot(name)),
            ],
        );
        assert!(out.status.success(), "setup on {name}: {}", stderr(&out));
    }
    f.publish(1_000, 100, "engine_check");
    let expected = f.pg_ids();
    for name in tables {
        let relay = f.spawn_relay_with(&[
            ("RELAY_CLICKHOUSE_TABLE", name),
            ("RELAY_SLOT", &slot(name)),
        ]);
        let count = || {
            f.ch(&format!("SELECT count() FROM {{db}}.{name}"))
                .trim()
                .parse::<usize>()
                .unwrap_or(0)
        };
        assert!(
            wait_until(LONG, || count() >= expected.len()),
            "{name}: {} rows\n{}",
            count(),
            relay.log()
        );
        f.ch(&format!("OPTIMIZE TABLE {{db}}.{name} FINAL"));
        let ids: std::collections::HashSet<String> = f
            .ch(&format!("SELECT toString(event_id) FROM {{db}}.{name}"))
            .lines()
            .map(str::to_string)
            .collect();
        assert_eq!(ids, expected, "{name}");
        assert_eq!(count(), expected.len(), "{name}: rows after the merge");
        assert_eq!(relay.terminate().code(), Some(0));
    }
}
