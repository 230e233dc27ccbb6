//! A seeded randomized scenario suite for the "no silent loss" class: two outboxes of one
//! database, written in the same transactions, each with its own relay into one ClickHouse table;
//! between publishes, random DDL on the outboxes and their publications (columns added, dropped,
//! renamed away and back, a NULL in a required column, type changes, TRUNCATE, the publication
//! dropped and created again, the table swapped by rename, swapped in and straight out again,
//! inserts unpublished for a moment) and relays killed with SIGKILL. Every
//! round ends in exact per-source set equality without FINAL, after the documented recoveries
//! (fix the rows, `dead-letters retry`; add a swapped-in table to the publication).
//!
//! `RELAY_TEST_SEED` sets the seed (printed on failure; `random` draws one; 3001 by default, so
//! that `make test` repeats itself), `RELAY_TEST_CHAOS_ROUNDS` the rounds (2 by default; each
//! round uses new databases on the same servers).

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use common::{Fixture, RelayProcess, stderr, wait_until};
use harness::PgVersion;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[test]
fn chaos_pg15() {
    chaos(PgVersion::V15);
}

#[test]
fn chaos_pg18() {
    chaos(PgVersion::V18);
}

/// The seed of `make test`'s rounds.
const DEFAULT_SEED: u64 = 3001;

fn env_number(key: &str, default: u64) -> u64 {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// One outbox, its relay's settings and what the test committed into it.
struct Outbox {
    table: &'static str,
    publication: &'static str,
    slot: String,
    relay: Option<RelayProcess>,
    expected: HashSet<String>,
    /// The step each event was published in (its event_type), for failure messages.
    labels: HashMap<String, String>,
    label: String,
    added_columns: Vec<String>,
    swaps: u32,
}

impl Outbox {
    fn env(&self) -> Vec<(&str, &str)> {
        vec![
            ("RELAY_OUTBOX_TABLE", self.table),
            ("RELAY_PUBLICATION", self.publication),
            ("RELAY_SLOT", self.slot.as_str()),
        ]
    }
}

fn chaos(v: PgVersion) {
    // A fixed seed by default, so `make test` is repeatable; RELAY_TEST_SEED=N or =random for
    // exploration (the acceptance runs use many seeds).
    let seed = match std::env::var("RELAY_TEST_SEED").as_deref() {
        Ok("random") => rand::random::<u64>(),
        Ok(n) => n.parse().expect("RELAY_TEST_SEED is a number or `random`"),
        Err(_) => DEFAULT_SEED,
    };
    let rounds = env_number("RELAY_TEST_CHAOS_ROUNDS", 2);
    println!("{v:?}: seed {seed}, {rounds} rounds (RELAY_TEST_SEED={seed} repeats it)");
    let mut rng = StdRng::seed_from_u64(seed);
    let mut f = Fixture::start(v, &[("RELAY_BATCH_MAX_WAIT_MS", "50")]);
    for round in 0..rounds {
        if round > 0 {
            f.fresh_databases();
        }
        let started = std::time::Instant::now();
        let steps = run_round(&f, &mut rng, seed, round);
        println!(
            "{v:?} seed {seed} round {round}: {steps} in {:?}",
            started.elapsed()
        );
    }
}

fn run_round(f: &Fixture, rng: &mut StdRng, seed: u64, round: u64) -> String {
    let ctx = |what: &str| format!("seed {seed} round {round}: {what}");
    let mut outboxes = [
        Outbox {
            table: "event_outbox",
            publication: "event_outbox_pub",
            slot: f.slot.clone(),
            relay: None,
            expected: HashSet::new(),
            labels: HashMap::new(),
            label: String::new(),
            added_columns: Vec::new(),
            swaps: 0,
        },
        Outbox {
            table: "second_outbox",
            publication: "second_pub",
            slot: format!("{}_b", f.slot),
            relay: None,
            expected: HashSet::new(),
            labels: HashMap::new(),
            label: String::new(),
            added_columns: Vec::new(),
            swaps: 0,
        },
    ];
    let out = f.relay_with(&["setup"], &outboxes[1].env());
    assert!(out.status.success(), "{}", ctx(&stderr(&out)));
    for o in &mut outboxes {
        o.relay = Some(f.spawn_relay_with(&o.env()));
    }
    let system: String = f
        .sql("SELECT system_identifier FROM pg_control_system()")
        .trim()
        .to_string();
    let source = |o: &Outbox| format!("pg:{system}/{}/public.{}", f.db, o.table);
    let mut log = Vec::new();
    for index in 0..8 {
        let which = rng.random_range(0..2usize);
        let step = rng.random_range(0..13);
        let n = rng.random_range(1..=30u32);
        for o in &mut outboxes {
            o.label = format!("step{index}");
        }
        let name = match step {
            0 | 1 => {
                publish_both(f, &mut outboxes, n, rng.random_range(1..=10));
                "publish both"
            }
            2 => {
                let o = &mut outboxes[which];
                let col = format!("extra_{}", o.added_columns.len());
                f.sql(&format!(
                    "ALTER TABLE {} ADD COLUMN {col} text DEFAULT 'x'",
                    o.table
                ));
                o.added_columns.push(col);
                publish(f, o, n, 5, "");
                "add column"
            }
            3 => {
                let o = &mut outboxes[which];
                if let Some(col) = o.added_columns.pop() {
                    f.sql(&format!("ALTER TABLE {} DROP COLUMN {col}", o.table));
                }
                publish(f, o, n, 5, "");
                "drop column"
            }
            4 => {
                // A required column renamed away: its rows become dead letters; renamed back,
                // they are retried from the outbox.
                let o = &mut outboxes[which];
                f.sql(&format!(
                    "ALTER TABLE {} RENAME COLUMN environment TO env_away",
                    o.table
                ));
                let away = publish(f, o, n, 3, "");
                f.sql(&format!(
                    "ALTER TABLE {} RENAME COLUMN env_away TO environment",
                    o.table
                ));
                publish(f, o, 3, 3, "");
                retry_dead_letters(f, o, &source(o), &away, &ctx("rename away"));
                "rename away and back"
            }
            5 => {
                let o = &mut outboxes[which];
                f.sql(&format!(
                    "ALTER TABLE {} ALTER COLUMN environment DROP NOT NULL",
                    o.table
                ));
                let nulls = publish(f, o, n, 2, "NULL");
                f.sql(&format!(
                    "UPDATE {} SET environment = 'fixed' WHERE environment IS NULL",
                    o.table
                ));
                retry_dead_letters(f, o, &source(o), &nulls, &ctx("null environment"));
                "null environment"
            }
            6 => {
                let o = &mut outboxes[which];
                f.sql(&format!(
                    "ALTER TABLE {} ALTER COLUMN metadata_version TYPE integer",
                    o.table
                ));
                publish(f, o, n, 4, "");
                f.sql(&format!(
                    "ALTER TABLE {} ALTER COLUMN metadata_version TYPE bigint",
                    o.table
                ));
                publish(f, o, n, 4, "");
                "type change"
            }
            7 => {
                // Only rows already in ClickHouse: the outbox is what replay re-ships from.
                let o = &mut outboxes[which];
                wait_for(f, o, &source(o), &ctx("before truncate"));
                f.sql(&format!("TRUNCATE {}", o.table));
                publish(f, o, n, 5, "");
                "truncate"
            }
            8 => {
                let o = &mut outboxes[which];
                f.sql(&format!("DROP PUBLICATION {}", o.publication));
                publish(f, o, n, 1, "");
                f.sql(&format!(
                    "CREATE PUBLICATION {} FOR TABLE {} WITH (publish = 'insert')",
                    o.publication, o.table
                ));
                publish(f, o, n, 1, "");
                "publication dropped and created"
            }
            9 => {
                // The documented recovery of a swapped table: add it to the publication.
                let o = &mut outboxes[which];
                o.swaps += 1;
                let old = format!("{}_old_{}", o.table, o.swaps);
                f.sql(&format!(
                    "BEGIN; ALTER TABLE {t} RENAME TO {old};
                     CREATE TABLE {t} (LIKE {old} INCLUDING ALL); COMMIT;",
                    t = o.table
                ));
                publish(f, o, n, 3, "");
                f.sql(&format!(
                    "ALTER PUBLICATION {} ADD TABLE {}",
                    o.publication, o.table
                ));
                publish(f, o, n, 3, "");
                "table swap"
            }
            11 => {
                // A table swapped in, written while not in the publication, and swapped out
                // again at once (a migration rolled back): only the coverage watch sees it.
                let o = &mut outboxes[which];
                o.swaps += 1;
                let (away, stray) = (
                    format!("{}_away_{}", o.table, o.swaps),
                    format!("{}_stray_{}", o.table, o.swaps),
                );
                f.sql(&format!(
                    "BEGIN; ALTER TABLE {t} RENAME TO {away};
                     CREATE TABLE {t} (LIKE {away} INCLUDING ALL); COMMIT;",
                    t = o.table
                ));
                publish(f, o, n, 3, "");
                f.sql(&format!(
                    "BEGIN; ALTER TABLE {t} RENAME TO {stray};
                     ALTER TABLE {away} RENAME TO {t}; COMMIT;",
                    t = o.table
                ));
                "swap in and out"
            }
            12 => {
                let o = &mut outboxes[which];
                f.sql(&format!(
                    "ALTER PUBLICATION {} SET (publish = 'update')",
                    o.publication
                ));
                publish(f, o, n, 2, "");
                f.sql(&format!(
                    "ALTER PUBLICATION {} SET (publish = 'insert')",
                    o.publication
                ));
                "inserts unpublished and published again"
            }
            _ => {
                let o = &mut outboxes[which];
                if let Some(mut relay) = o.relay.take() {
                    relay.kill_now();
                }
                publish(f, o, n, 4, "");
                o.relay = Some(f.spawn_relay_with(&o.env()));
                "kill -9"
            }
        };
        log.push(format!("{name} ({})", outboxes[which].table));
    }
    for o in &outboxes {
        wait_for(f, o, &source(o), &ctx(&log.join(", ")));
    }
    let by = by_source(f);
    for o in &outboxes {
        let (rows, ids) = by.get(&source(o)).cloned().unwrap_or_default();
        assert_eq!(ids, o.expected, "{}", ctx(&log.join(", ")));
        assert_eq!(
            rows,
            o.expected.len() as u64,
            "{}: duplicates",
            ctx(&log.join(", "))
        );
    }
    assert_eq!(by.len(), 2, "{}: foreign sources {:?}", ctx(""), by.keys());
    for o in &mut outboxes {
        if let Some(relay) = o.relay.take() {
            relay.kill9();
        }
    }
    let total: usize = outboxes.iter().map(|o| o.expected.len()).sum();
    format!("{} -> {total} events exactly once", log.join(", "))
}

/// Publishes `n` events into `o` in transactions of `per_tx`, with `environment` NULL when
/// `environment` says so; records their ids and returns them.
fn publish(f: &Fixture, o: &mut Outbox, n: u32, per_tx: u32, environment: &str) -> Vec<String> {
    let (columns, value) = match environment {
        "NULL" => (", environment", ", NULL"),
        _ => ("", ""),
    };
    let mut published = Vec::new();
    let mut done = 0;
    while done < n {
        let k = per_tx.min(n - done);
        let ids = f.sql(&format!(
            "INSERT INTO {} (event_type, event_context{columns})
             SELECT '{}', json_build_object('i', g){value} FROM generate_series(1, {k}) g
             RETURNING event_id",
            o.table, o.label
        ));
        for id in ids.lines() {
            o.expected.insert(id.to_string());
            o.labels.insert(id.to_string(), o.label.clone());
            published.push(id.to_string());
        }
        done += k;
    }
    published
}

/// Publishes into both outboxes in the same transactions: the same commit LSNs and positions.
fn publish_both(f: &Fixture, outboxes: &mut [Outbox; 2], n: u32, per_tx: u32) {
    let mut done = 0;
    while done < n {
        let k = per_tx.min(n - done);
        let rows = f.sql(&format!(
            "WITH a AS (INSERT INTO {a} (event_type, event_context)
                          SELECT '{label}', json_build_object('i', g) FROM generate_series(1, {k}) g
                          RETURNING event_id),
                  b AS (INSERT INTO {b} (event_type, event_context)
                          SELECT '{label}', json_build_object('i', g) FROM generate_series(1, {k}) g
                          RETURNING event_id)
             SELECT 'a', event_id FROM a UNION ALL SELECT 'b', event_id FROM b",
            a = outboxes[0].table,
            b = outboxes[1].table,
            label = format!("{}_both", outboxes[0].label),
        ));
        for line in rows.lines() {
            let (which, id) = line.split_once('|').expect("two columns");
            let o = &mut outboxes[usize::from(which == "b")];
            o.expected.insert(id.to_string());
            o.labels.insert(id.to_string(), format!("{}_both", o.label));
        }
        done += k;
    }
}

/// Waits until each of `ids` is a dead letter of `o`'s relay or in ClickHouse under `source`
/// (the stream has passed them all; a re-ship of a window from the outbox, after a publication
/// change, may have shipped them once they could be mapped again), then retries every letter.
/// Not a count: such a re-ship may add letters of its own, and the stream's last ones may come
/// later.
fn retry_dead_letters(f: &Fixture, o: &Outbox, source: &str, ids: &[String], ctx: &str) {
    let env = o.env();
    let letters = || -> HashSet<String> {
        let out = f.relay_with(&["dead-letters", "list", "--json"], &env);
        serde_json::from_slice::<serde_json::Value>(&out.stdout)
            .ok()
            .and_then(|v| {
                v.as_array().map(|a| {
                    a.iter()
                        .filter_map(|l| l["event_id"].as_str().map(str::to_string))
                        .collect()
                })
            })
            .unwrap_or_default()
    };
    let passed = || {
        let letters = letters();
        let shipped = by_source(f).remove(source).unwrap_or_default().1;
        ids.iter()
            .filter(|id| letters.contains(*id) || shipped.contains(*id))
            .count()
    };
    let listed = || letters().len();
    let relay_log = || o.relay.as_ref().map(RelayProcess::log).unwrap_or_default();
    assert!(
        wait_until(Duration::from_secs(60), || passed() == ids.len()),
        "{ctx}: {} of these {} events are dead letters or shipped\n{}",
        passed(),
        ids.len(),
        relay_log()
    );
    let out = f.relay_with(&["dead-letters", "retry"], &env);
    assert!(out.status.success(), "{ctx}: {}", stderr(&out));
    let left = f.relay_with(&["dead-letters", "list"], &env);
    assert_eq!(
        listed(),
        0,
        "{ctx}: {}\nleft after the retry:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&left.stdout),
        relay_log()
    );
}

/// Waits until ClickHouse holds every id of `o` under its source.
fn wait_for(f: &Fixture, o: &Outbox, source: &str, ctx: &str) {
    let ok = wait_until(Duration::from_secs(120), || {
        o.expected.is_empty()
            || by_source(f)
                .get(source)
                .is_some_and(|(_, ids)| o.expected.is_subset(ids))
    });
    let got = by_source(f)
        .get(source)
        .map(|(_, ids)| ids.clone())
        .unwrap_or_default();
    let mut missing = BTreeMap::<String, usize>::new();
    for id in o.expected.difference(&got) {
        *missing
            .entry(o.labels.get(id).cloned().unwrap_or_default())
            .or_default() += 1;
    }
    if !ok {
        // Where each missing event is now: which table holds it (by oid, also a table that had
        // the outbox's name), its dead letter, and whether ClickHouse has it under any source.
        let mut whereabouts = Vec::new();
        for id in o.expected.difference(&got).take(5) {
            let tables = f.sql(&format!(
                "SELECT string_agg(c.oid::text || ' ' || c.relname, ', ') FROM pg_class c
                  WHERE c.relkind = 'r' AND c.relname LIKE '{}%'
                    AND EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = c.oid
                                 AND a.attname = 'event_id' AND NOT a.attisdropped)",
                o.table
            ));
            let holders: Vec<String> = tables
                .trim()
                .split(", ")
                .filter(|t| !t.is_empty())
                .filter(|t| {
                    let name = t.split_once(' ').map(|(_, n)| n).unwrap_or(t);
                    f.sql(&format!(
                        "SELECT count(*) FROM {name} WHERE event_id = '{id}'"
                    ))
                    .trim()
                        != "0"
                })
                .map(str::to_string)
                .collect();
            let letter = f.sql(&format!(
                "SELECT commit_lsn::text || ' ' || tx_seq || ' shipped_at=' || coalesce(shipped_at::text, '-')
                   || ' raw=' || (raw IS NOT NULL) || ' error=' || left(error, 80)
                   FROM {}_dead_letters WHERE event_id = '{id}'",
                o.table
            ));
            let anywhere = f.ch(&format!(
                "SELECT source, commit_lsn, tx_seq FROM {{db}}.event_log WHERE event_id = '{id}' FORMAT TSV"
            ));
            whereabouts.push(format!(
                "{id}: in {holders:?}; dead letter: {}; ClickHouse: {}",
                letter.trim(),
                anywhere.trim()
            ));
        }
        let log = f.sql(&format!(
            "SELECT string_agg(id || ' ' || coverage || ' ' || coalesce(table_oid::text, '-'), '; ' ORDER BY id)
               FROM {}_coverage_log",
            o.table
        ));
        let checkpoints = f.sql(&format!(
            "SELECT string_agg(confirmed_lsn::text || ' ' || snapshot_lsn::text || ' ' || coalesce(coverage, '-'), '; ' ORDER BY recorded_at)
               FROM (SELECT * FROM {}_checkpoints ORDER BY recorded_at DESC LIMIT 12) c",
            o.table
        ));
        panic!(
            "{ctx}: {} has {} of {} events; missing by step: {missing:?}\n{}\ncoverage log: {}\nnewest checkpoints: {}\n{}",
            o.table,
            got.len(),
            o.expected.len(),
            whereabouts.join("\n"),
            log.trim(),
            checkpoints.trim(),
            o.relay.as_ref().map(RelayProcess::log).unwrap_or_default()
        );
    }
}

fn by_source(f: &Fixture) -> HashMap<String, (u64, HashSet<String>)> {
    let mut by = HashMap::<String, (u64, HashSet<String>)>::new();
    for line in f
        .ch("SELECT source, toString(event_id) FROM {db}.event_log FORMAT TSV")
        .lines()
    {
        if let Some((source, id)) = line.split_once('\t') {
            let entry = by.entry(source.to_string()).or_default();
            entry.0 += 1;
            entry.1.insert(id.to_string());
        }
    }
    by
}
