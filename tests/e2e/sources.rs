//! Configurations that lost events while the relay looked healthy (issue "no silent loss"):
//! several sources sharing one ClickHouse table, a publication dropped and created again or a
//! swapped outbox table while the relay runs, an existing ClickHouse table of other types.
//! Each ends in exact per-source set equality without FINAL, or in a stop naming the cause.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use common::{Fixture, RelayProcess, stderr, wait_until};
use harness::{PgServer, PgVersion};
use rand::{Rng, SeedableRng};

scenarios!(
    each_postgres: [
        sources_sharing_a_table_survive_kills,
        publication_recreated_while_running_loses_nothing,
        swapped_outbox_table_stops_then_recovers,
        changes_undone_between_two_checks_lose_nothing,
        rows_that_cannot_become_events_are_dead_letters_not_a_wedge,
    ],
);

/// `source -> (rows, distinct ids)` in ClickHouse, and the ids per source.
fn ch_by_source(f: &Fixture) -> HashMap<String, (u64, HashSet<String>)> {
    let mut by = HashMap::<String, (u64, HashSet<String>)>::new();
    for line in f
        .ch("SELECT source, toString(event_id) FROM {db}.event_log FORMAT TSV")
        .lines()
    {
        let (source, id) = line.split_once('\t').expect("two columns");
        let entry = by.entry(source.to_string()).or_default();
        entry.0 += 1;
        entry.1.insert(id.to_string());
    }
    by
}

fn ids(pg: &PgServer, db: &str, table: &str) -> HashSet<String> {
    pg.psql(db, &format!("SELECT event_id FROM {table}"))
        .expect("read outbox ids")
        .lines()
        .map(str::to_string)
        .collect()
}

/// Rounds of kill -9 per relay: RELAY_TEST_KILL_ROUNDS (default 3).
fn kill_rounds() -> usize {
    std::env::var("RELAY_TEST_KILL_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3)
}

/// Three sources into one ClickHouse table: two outboxes of one database written in the same
/// transactions (same commit LSNs, same positions in them) and a second server with the default
/// names. Each relay is killed at random moments while publishers run; at the end each source's
/// rows are exactly its outbox's events.
fn sources_sharing_a_table_survive_kills(v: PgVersion) {
    let seed: u64 = std::env::var("RELAY_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    println!("seed {seed} (RELAY_TEST_SEED={seed} repeats it)");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let f = Fixture::start(v, &[("RELAY_BATCH_MAX_WAIT_MS", "50")]);
    let second_outbox = [
        ("RELAY_OUTBOX_TABLE", "second_outbox"),
        ("RELAY_PUBLICATION", "second_pub"),
        ("RELAY_SLOT", "second_slot"),
    ];
    let out = f.relay_with(&["setup"], &second_outbox);
    assert!(out.status.success(), "setup: {}", stderr(&out));
    let other = PgServer::start(v).expect("second PostgreSQL");
    other.create_database("app").unwrap();
    let other_url = other.url("app");
    let other_server = [("RELAY_POSTGRES_URL", other_url.as_str())];
    let out = f.relay_with(&["setup"], &other_server);
    assert!(out.status.success(), "setup: {}", stderr(&out));

    let publish = |round: usize, n: usize| {
        // Both outboxes of the first server in the same transactions, each event its own
        // position 0..n in both; the second server alike.
        let both = format!(
            "DO $$ BEGIN FOR t IN 1..20 LOOP
               INSERT INTO event_outbox (event_type, event_context)
                 SELECT 'first', json_build_object('r', {round}, 't', t, 'i', g) FROM generate_series(1, {n}) g;
               INSERT INTO second_outbox (event_type, event_context)
                 SELECT 'second', json_build_object('r', {round}, 't', t, 'i', g) FROM generate_series(1, {n}) g;
               COMMIT; END LOOP; END $$;"
        );
        f.sql(&both);
        other
            .psql(
                "app",
                &format!(
                    "DO $$ BEGIN FOR t IN 1..20 LOOP
                       INSERT INTO event_outbox (event_type, event_context)
                         SELECT 'other', json_build_object('r', {round}, 'i', g) FROM generate_series(1, {n}) g;
                       COMMIT; END LOOP; END $$;"
                ),
            )
            .unwrap();
    };
    let envs: [&[(&str, &str)]; 3] = [&[], &second_outbox, &other_server];
    let mut relays: Vec<RelayProcess> = envs.iter().map(|e| f.spawn_relay_with(e)).collect();
    let mut published = 0;
    for round in 0..kill_rounds() {
        // The second outbox's relay is down while the first ships this round's transactions:
        // when it comes back, ClickHouse holds rows at the very commit LSNs and positions its
        // own events have, which only the source tells apart.
        relays[1].kill_now();
        let n = rng.random_range(1..=40);
        publish(round, n);
        published += 20 * n as u64;
        let first = || {
            f.ch("SELECT count() FROM {db}.event_log WHERE event_type = 'first'")
                .trim()
                .parse::<u64>()
                .unwrap()
        };
        assert!(
            wait_until(Duration::from_secs(60), || first() >= published),
            "seed {seed}: the first outbox's events did not arrive\n{}",
            relays[0].log()
        );
        relays[1] = f.spawn_relay_with(envs[1]);
        // Then each relay is killed at a random moment of its stream: some mid-insert, some
        // just after an insert before its confirm, some idle.
        let n = rng.random_range(1..=40);
        publish(round + 1000, n);
        published += 20 * n as u64;
        for (i, env) in envs.iter().enumerate() {
            let wait_ms = rng.random_range(0..400);
            let deadline = std::time::Instant::now() + Duration::from_millis(wait_ms);
            wait_until(Duration::from_millis(wait_ms + 50), || {
                std::time::Instant::now() >= deadline
            });
            relays[i].kill_now();
            relays[i] = f.spawn_relay_with(env);
        }
    }
    publish(kill_rounds(), 5);
    let expected = [
        ids(&f.pg, &f.db, "event_outbox"),
        ids(&f.pg, &f.db, "second_outbox"),
        ids(&other, "app", "event_outbox"),
    ];
    let total: usize = expected.iter().map(HashSet::len).sum();
    let arrived = wait_until(Duration::from_secs(120), || {
        f.ch_count() >= total as u64 && ch_by_source(&f).len() == 3
    });
    // Everything the relays could still send is in: now compare, per source.
    let by = ch_by_source(&f);
    let logs: Vec<String> = relays.iter().map(RelayProcess::log).collect();
    assert!(arrived, "seed {seed}: {by:?}\n{}", logs.join("\n----\n"));
    assert_eq!(
        by.len(),
        3,
        "seed {seed}: three sources expected: {:?}",
        by.keys()
    );
    for exp in &expected {
        let (source, (rows, got)) = by
            .iter()
            .find(|(_, (_, got))| got.iter().any(|id| exp.contains(id)))
            .unwrap_or_else(|| panic!("seed {seed}: no source holds these events"));
        assert_eq!(
            got, exp,
            "seed {seed}: source {source}: other events than its outbox's"
        );
        assert_eq!(
            *rows as usize,
            exp.len(),
            "seed {seed}: source {source}: duplicates"
        );
    }
    println!(
        "seed {seed}: {} rounds, {total} events from 3 sources, each exactly once",
        kill_rounds()
    );
}

/// Publishes `n` single-event transactions from a thread while `during` runs.
fn publishing_during(f: &Fixture, n: usize, during: impl FnOnce()) {
    let url = f.pg.url(&f.db);
    let publisher = std::thread::spawn(move || {
        let mut client = postgres_client(&url);
        for i in 0..n {
            client
                .execute(
                    "INSERT INTO event_outbox (event_type, event_context) VALUES ('during', json_build_object('i', $1::int))",
                    &[&(i as i32)],
                )
                .expect("publish");
        }
    });
    during();
    publisher.join().expect("publisher");
}

fn postgres_client(url: &str) -> SyncClient {
    SyncClient::connect(url)
}

/// A blocking wrapper over tokio-postgres for a publisher thread.
struct SyncClient {
    runtime: tokio::runtime::Runtime,
    client: tokio_postgres::Client,
}

impl SyncClient {
    fn connect(url: &str) -> SyncClient {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let client = runtime.block_on(async {
            let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
                .await
                .expect("connect");
            tokio::spawn(conn);
            client
        });
        SyncClient { runtime, client }
    }

    fn execute(
        &mut self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<u64, tokio_postgres::Error> {
        self.runtime.block_on(self.client.execute(sql, params))
    }
}

/// `DROP PUBLICATION` and `CREATE PUBLICATION` while events are published and the relay runs:
/// PostgreSQL skips the inserts committed in between; the relay sees the new publication, re-ships
/// that window from the outbox, and every event arrives exactly once.
fn publication_recreated_while_running_loses_nothing(v: PgVersion) {
    let f = Fixture::start(v, &[]);
    let relay = f.spawn_relay();
    f.publish(200, 10, "before");
    f.wait_for_rows(200, Duration::from_secs(60), Some(&relay));
    publishing_during(&f, 1_000, || {
        f.sql("DROP PUBLICATION event_outbox_pub");
        f.publish(100, 1, "while_missing");
        f.sql(
            "CREATE PUBLICATION event_outbox_pub FOR TABLE event_outbox WITH (publish = 'insert')",
        );
    });
    f.publish(100, 1, "after");
    let expected = f.pg_ids();
    let ok = wait_until(Duration::from_secs(120), || {
        f.ch_count() >= expected.len() as u64
    });
    let (got, rows) = f.ch_ids();
    assert!(
        ok,
        "{} of {} arrived\n{}",
        got.len(),
        expected.len(),
        relay.log()
    );
    assert_eq!(got, expected, "{}", relay.log());
    assert_eq!(rows, expected.len() as u64, "duplicates");
    let log = relay.log();
    assert!(
        log.contains("re-shipping them from the outbox table"),
        "{log}"
    );
    for line in log.lines().filter(|l| l.contains("WARN")) {
        println!("{line}");
    }
    println!("{} events, each once", expected.len());
}

/// The outbox table replaced by a rename swap: its successor is not in the publication, so the
/// relay stops streaming and says so (not ready, a log line naming the cause). Once the new
/// table is added to the publication, the relay re-ships what was committed meanwhile.
fn swapped_outbox_table_stops_then_recovers(v: PgVersion) {
    let f = Fixture::start(v, &[]);
    let relay = f.spawn_relay();
    f.publish(50, 10, "old_table");
    f.wait_for_rows(50, Duration::from_secs(60), Some(&relay));
    let old = f.pg_ids();
    f.sql(
        "BEGIN;
         ALTER TABLE event_outbox RENAME TO event_outbox_old;
         CREATE TABLE event_outbox (LIKE event_outbox_old INCLUDING ALL);
         COMMIT;",
    );
    f.publish(30, 3, "new_table");
    assert!(
        wait_until(Duration::from_secs(60), || relay
            .log()
            .contains("is not in the publication")),
        "{}",
        relay.log()
    );
    assert_eq!(
        f.ch_count(),
        50,
        "nothing of the new table can have shipped"
    );
    // Never "caught up" while PostgreSQL skips the outbox: status says why, exit 6.
    let out = f.relay(&["status", "--json"]);
    assert_eq!(out.status.code(), Some(6), "{}", stderr(&out));
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["caught_up"], false, "{status}");
    assert!(
        status["publication_problem"]
            .as_str()
            .is_some_and(|p| p.contains("not in the publication")),
        "{status}"
    );
    f.sql("ALTER PUBLICATION event_outbox_pub ADD TABLE event_outbox");
    f.publish(20, 1, "after_fix");
    let expected: HashSet<String> = old.union(&f.pg_ids()).cloned().collect();
    let ok = wait_until(Duration::from_secs(120), || {
        f.ch_count() >= expected.len() as u64
    });
    let (got, rows) = f.ch_ids();
    assert!(ok, "{} of {}\n{}", got.len(), expected.len(), relay.log());
    assert_eq!(got, expected);
    assert_eq!(rows, expected.len() as u64, "duplicates");
}

/// Coverage changed and changed back faster than the relay's checks (every 5 s): a table swapped
/// in, written while not in the publication and swapped out again, then inserts unpublished
/// for a moment, then a row filter for a moment. The coverage watch (an event trigger) logged both; the relay re-ships the
/// window from every table that had the outbox's name, and every event arrives exactly once.
fn changes_undone_between_two_checks_lose_nothing(v: PgVersion) {
    let f = Fixture::start(v, &[]);
    let relay = f.spawn_relay();
    f.publish(50, 10, "before");
    f.wait_for_rows(50, Duration::from_secs(60), Some(&relay));
    f.sql(
        "BEGIN;
         ALTER TABLE event_outbox RENAME TO event_outbox_away;
         CREATE TABLE event_outbox (LIKE event_outbox_away INCLUDING ALL);
         COMMIT;",
    );
    f.publish(30, 3, "swapped_in");
    let stray = f.pg_ids();
    f.sql(
        "BEGIN;
         ALTER TABLE event_outbox RENAME TO event_outbox_stray;
         ALTER TABLE event_outbox_away RENAME TO event_outbox;
         COMMIT;",
    );
    f.sql("ALTER PUBLICATION event_outbox_pub SET (publish = 'update')");
    f.publish(20, 2, "unpublished");
    f.sql("ALTER PUBLICATION event_outbox_pub SET (publish = 'insert')");
    // A row filter for a moment: the rows it filtered out are re-shipped too.
    f.sql(
        "ALTER PUBLICATION event_outbox_pub SET TABLE event_outbox WHERE (event_type <> 'hidden')",
    );
    f.publish(10, 1, "hidden");
    f.sql("ALTER PUBLICATION event_outbox_pub SET TABLE event_outbox");
    f.publish(20, 1, "after");
    let expected: HashSet<String> = f.pg_ids().union(&stray).cloned().collect();
    assert_eq!(expected.len(), 130);
    let ok = wait_until(Duration::from_secs(120), || {
        f.ch_count() >= expected.len() as u64
    });
    let (got, rows) = f.ch_ids();
    assert!(ok, "{} of {}\n{}", got.len(), expected.len(), relay.log());
    assert_eq!(got, expected, "{}", relay.log());
    assert_eq!(rows, expected.len() as u64, "duplicates");
    let logged = f.sql(
        "SELECT count(*) FROM event_outbox_coverage_log
          WHERE table_oid = 'event_outbox_stray'::regclass",
    );
    assert_ne!(logged.trim(), "0", "the watch logged the swapped-in table");
    let out = f.relay(&["status", "--json"]);
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["coverage_watch"], true, "{status}");
}

/// An existing ClickHouse table whose columns the relay's rows do not fit: setup and run refuse
/// it, one line per column, instead of writing misread values.
#[test]
fn existing_table_of_other_types_is_refused() {
    let f = Fixture::start(PgVersion::V18, &[]);
    f.ch("DROP TABLE {db}.event_log");
    f.ch(
        "CREATE TABLE {db}.event_log (event_id UUID, event_type String,
           event_date_time DateTime64(3, 'UTC'), environment String, event_context String,
           metadata_version Int32, commit_lsn UInt64, tx_seq UInt32, trace_id String,
           source String, extra String DEFAULT 'x')
         ENGINE = MergeTree ORDER BY event_id",
    );
    let out = f.relay(&["setup"]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("column event_date_time: expected DateTime64(6, 'UTC')")
            && err.contains("found DateTime64(3, 'UTC')")
            && err.contains("column metadata_version: expected UInt64, found Int32"),
        "{err}"
    );
    assert!(
        !err.contains("column extra"),
        "extra columns are fine: {err}"
    );
    f.publish(5, 5, "never_misread");
    let mut relay = f.spawn_relay();
    assert!(
        wait_until(Duration::from_secs(60), || !relay.is_running()),
        "the relay keeps running on a table it cannot write: {}",
        relay.log()
    );
    assert!(
        relay.log().contains("found DateTime64(3, 'UTC')"),
        "{}",
        relay.log()
    );
    assert_eq!(f.ch_count(), 0);
}

/// Every outbox row, whatever DDL did to the table, either arrives once or waits as a dead letter
/// with its values; the stream never stops for good. A column renamed away and back (the old
/// Relation message stays in the WAL a restarted relay reads again), a NULL in a required column,
/// a changed column type; then the rows are fixed and `dead-letters retry` ships them, and a
/// replay after ClickHouse lost the table reads every column type the live path does.
fn rows_that_cannot_become_events_are_dead_letters_not_a_wedge(v: PgVersion) {
    let f = Fixture::start(v, &[]);
    let mut relay = f.spawn_relay();
    f.publish(10, 5, "before");
    f.wait_for_rows(10, Duration::from_secs(60), Some(&relay));
    f.sql("ALTER TABLE event_outbox RENAME COLUMN environment TO env_renamed");
    f.publish(3, 3, "renamed_away");
    f.sql("ALTER TABLE event_outbox RENAME COLUMN env_renamed TO environment");
    f.sql("ALTER TABLE event_outbox ALTER COLUMN environment DROP NOT NULL");
    f.sql(
        "INSERT INTO event_outbox (event_type, event_context, environment)
         VALUES ('null_environment', '{}', NULL)",
    );
    f.sql("ALTER TABLE event_outbox ALTER COLUMN metadata_version TYPE integer");
    f.publish(10, 2, "after");
    f.wait_for_rows(20, Duration::from_secs(60), Some(&relay));
    // A restart reads the stale Relation message again: no wedge.
    relay.kill_now();
    let relay = f.spawn_relay();
    f.publish(5, 5, "after_restart");
    f.wait_for_rows(25, Duration::from_secs(60), Some(&relay));
    let letters: serde_json::Value = {
        let out = f.relay(&["dead-letters", "list", "--json"]);
        assert!(out.status.success(), "{}", stderr(&out));
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let letters = letters.as_array().unwrap();
    assert_eq!(letters.len(), 4, "{letters:#?}\n{}", relay.log());
    for letter in letters {
        assert!(letter["raw"].is_object(), "values kept: {letter}");
        assert!(letter["commit_lsn"].as_str().unwrap() != "0/0", "{letter}");
    }
    assert!(
        letters.iter().any(|l| l["raw"]["env_renamed"] == "test"
            && l["error"].as_str().unwrap().contains("environment")),
        "{letters:#?}"
    );
    // Fixed: every row is readable again (the NULL gets a value); retry ships them once.
    f.sql("UPDATE event_outbox SET environment = 'fixed' WHERE environment IS NULL");
    let out = f.relay(&["dead-letters", "retry"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let expected = f.pg_ids();
    let (got, rows) = f.ch_ids();
    assert_eq!(got, expected);
    assert_eq!(rows, expected.len() as u64);
    assert_eq!(
        f.ch("SELECT environment FROM {db}.event_log WHERE event_type = 'null_environment'"),
        "fixed\n"
    );
    // ClickHouse loses everything; a replay re-reads the outbox with the same mapping
    // (metadata_version is an integer now).
    f.ch("TRUNCATE TABLE {db}.event_log");
    let out = f.relay(&["replay", "--from-lsn", "0/0", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let (got, rows) = f.ch_ids();
    assert_eq!(got, expected);
    assert_eq!(rows, expected.len() as u64);
    assert_eq!(relay.terminate().code(), Some(0));
}
