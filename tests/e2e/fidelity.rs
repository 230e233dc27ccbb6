//! Audit fidelity (issue 12): ClickHouse gives back exactly the `event_context` text that was
//! published, for every corner of JSON PostgreSQL's `json` column accepts, and none of them
//! becomes a dead letter. Also the upgrade of a 0.1 `event_log` (event_context JSON) by `setup`.

mod common;

use std::time::Duration;

use common::{Fixture, stderr, wait_until};
use harness::PgVersion;

scenarios!(
    each_postgres: [
        corpus_comes_back_byte_for_byte,
    ],
);

#[test]
fn upgrade_of_a_0_1_table_keeps_text_from_then_on() {
    upgrade_of_a_0_1_table(PgVersion::V18)
}

/// Nested `depth` levels deep: objects `{"a":{"a":...{}}}` or arrays `[[...[]]]`.
fn nested(depth: usize, open: &str, close: &str, inner: &str) -> String {
    format!("{}{inner}{}", open.repeat(depth), close.repeat(depth))
}

/// The corners of JSON (issue 12), each a document PostgreSQL's `json` column accepts, as
/// (name, exact text).
fn corpus() -> Vec<(&'static str, String)> {
    // Empty objects and arrays, and nulls, at every depth down to 12.
    let mut empties = String::from(r#"{"o": {}, "a": [], "n": null}"#);
    for level in 0..12 {
        empties = format!(
            r#"{{"o{level}": {{}}, "a{level}": [], "aa": [[], [{{}}], {{}}, [[]], null], "n": null, "next": {empties}}}"#
        );
    }
    // About 5 MB: an array of objects with strings, numbers and nested objects.
    let mut big = String::from(r#"{"items": ["#);
    let mut i = 0;
    while big.len() < 5_000_000 {
        if i > 0 {
            big.push_str(", ");
        }
        big.push_str(&format!(
            r#"{{"i": {i}, "s": "item-{i}-\u00e9\n", "f": {i}.{i:03}e-3, "o": {{"k.{i}": null, "e": {{}}}}}}"#
        ));
        i += 1;
    }
    big.push_str("]}");
    vec![
        ("null_value", r#"{"a": null}"#.into()),
        ("only_nulls", r#"{"a": null, "b": {"c": null}, "d": [null, null]}"#.into()),
        ("empty_top", "{}".into()),
        ("empties_every_depth", empties),
        ("dotted_keys", r#"{"a.b": 1, "a": {"c": 2}, "x.y.z": {"": 0}}"#.into()),
        ("dotted_conflict", r#"{"a.b": 1, "a": {"b": 2}}"#.into()),
        ("empty_keys", r#"{"": 1, "e": {"": {"": ""}}, " ": 2}"#.into()),
        ("duplicate_keys", r#"{"a": 1, "a": 2, "a": {"x": 1}, "b": [1], "b": "1"}"#.into()),
        ("duplicate_empty_keys", r#"{"": 1, "": 2}"#.into()),
        (
            "integers_past_2_64",
            r#"{"u": 18446744073709551616, "n": -18446744073709551617, "h": 123456789012345678901234567890123456789012}"#
                .into(),
        ),
        (
            "decimal_40_digits",
            r#"{"pi": 3.141592653589793238462643383279502884197, "x": 0.1000000000000000000000000000000000000001}"#
                .into(),
        ),
        ("tiny_and_huge", r#"{"tiny": 1e-400, "huge": 1E+400, "e": 1.0e0, "E": 2E-2}"#.into()),
        ("minus_zero", r#"{"z": -0, "zf": -0.0, "ze": -0e0, "a": [-0]}"#.into()),
        ("number_spelling", r#"{"a": 1.50, "b": 100e-2, "c": 0.1000, "d": 1e5}"#.into()),
        (
            "escaped_unicode",
            r#"{"esc": "\u00e9\u4e2d\ud83d\ude00\n\t\r\b\f\"\\\/", "\u006b": "\u0041"}"#.into(),
        ),
        ("raw_unicode", "{\"raw\": \"é中😀\u{2028}\u{7f}\", \"ключ\": \"значение\"}".into()),
        ("escaped_nul", r#"{"nul": "\u0000", "k\u0000": "a\u0000b"}"#.into()),
        ("five_megabytes", big),
        ("depth_500_objects", nested(500, r#"{"a": "#, "}", "{}")),
        (
            "depth_500_arrays",
            format!(r#"{{"a": {}}}"#, nested(499, "[", "]", "[]")),
        ),
        ("key_order", r#"{"z": 1, "a": 2, "m": {"y": 1, "b": 2}}"#.into()),
        (
            "white_space",
            " \n\t{ \"b\" :1 ,\r\n  \"a\":[ 1 , 2 ,{ } ] ,\"c\"\t:\t{\"d\" : null }\n}\n ".into(),
        ),
        ("no_white_space", r#"{"a":{"b":[1,{"c":"d"}]},"e":true,"f":false}"#.into()),
        ("booleans_strings", r#"{"t": true, "f": false, "s": "true", "n": "null", "q": "{\"a\": 1}"}"#.into()),
    ]
}

/// Publishes every document of [`corpus`] (each its own transaction, through a bound parameter
/// cast to json as an application would), ships them, and checks every one: the text read back
/// from ClickHouse equals `event_context::text` in PostgreSQL, byte for byte; no dead letters.
fn publish_corpus_and_check(f: &Fixture) {
    let corpus = corpus();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let url = f.env_value("RELAY_POSTGRES_URL");
    let pg_texts: Vec<(String, String, String)> = runtime.block_on(async {
        let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .expect("connect to PostgreSQL");
        tokio::spawn(connection);
        for (name, doc) in &corpus {
            client
                .execute(
                    "INSERT INTO event_outbox (event_type, event_context) VALUES ($1, $2::text::json)",
                    &[name, doc],
                )
                .await
                .unwrap_or_else(|e| panic!("PostgreSQL refused corner {name}: {e}"));
        }
        client
            .query(
                "SELECT event_id::text, event_type, event_context::text FROM event_outbox",
                &[],
            )
            .await
            .expect("read the outbox")
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect()
    });
    assert_eq!(pg_texts.len(), corpus.len());
    let relay = f.spawn_relay();
    // Every event is either in ClickHouse or a dead letter (which the checks below report).
    let dead_letters = || -> u64 {
        f.sql("SELECT count(*) FROM event_outbox_dead_letters WHERE shipped_at IS NULL")
            .trim()
            .parse()
            .unwrap()
    };
    let n = corpus.len() as u64;
    assert!(
        wait_until(Duration::from_secs(120), || f.ch_count() + dead_letters()
            >= n),
        "{} of {n} events shipped, {} dead letters\nrelay log:\n{}",
        f.ch_count(),
        dead_letters(),
        relay.log()
    );
    let mut wrong = Vec::new();
    for (id, name, pg_text) in &pg_texts {
        // The published text itself, what PostgreSQL holds.
        let published = &corpus.iter().find(|(n, _)| n == name).unwrap().1;
        assert_eq!(
            pg_text, published,
            "{name}: PostgreSQL's json keeps the text"
        );
        let dead = f.sql(&format!(
            "SELECT error FROM event_outbox_dead_letters WHERE event_id = '{id}'"
        ));
        if !dead.trim().is_empty() {
            wrong.push(format!("{name}: a dead letter: {}", dead.trim()));
            continue;
        }
        let back = f.ch(&format!(
            "SELECT toString(event_context) FROM {{db}}.event_log WHERE event_id = toUUID('{id}') FORMAT RawBLOB"
        ));
        if &back != pg_text {
            let at = back
                .bytes()
                .zip(pg_text.bytes())
                .position(|(a, b)| a != b)
                .unwrap_or(back.len().min(pg_text.len()));
            let show = |s: &str| {
                s.get(at.saturating_sub(20)..(at + 40).min(s.len()))
                    .unwrap_or("")
                    .to_string()
            };
            wrong.push(format!(
                "{name}: {} bytes back for {} published, first difference at byte {at}: {:?} != {:?}",
                back.len(),
                pg_text.len(),
                show(&back),
                show(pg_text)
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "ClickHouse changed {} of {} documents:\n{}",
        wrong.len(),
        corpus.len(),
        wrong.join("\n")
    );
    // Each event exactly once.
    assert_eq!(f.ch_count(), corpus.len() as u64);
    assert_eq!(f.ch_unique(), corpus.len() as u64);
    // Paths are still queryable on the text.
    assert_eq!(
        f.ch("SELECT JSONExtractString(event_context, 'raw') FROM {db}.event_log WHERE event_type = 'raw_unicode'")
            .trim_end(),
        "é中😀\u{2028}\u{7f}"
    );
}

fn corpus_comes_back_byte_for_byte(v: PgVersion) {
    let f = Fixture::start(v, &[]);
    assert_eq!(
        f.ch("SELECT type FROM system.columns WHERE database = '{db}' AND table = 'event_log' AND name = 'event_context'")
            .trim(),
        "String"
    );
    publish_corpus_and_check(&f);
}

/// The event table as outbox-relay 0.1 created it (migrations/clickhouse/0001_event_log.sql
/// before 0.2: event_context JSON, no source column).
const EVENT_LOG_0_1: &str = "CREATE TABLE {db}.event_log
(
    event_id         UUID,
    event_type       LowCardinality(String),
    event_date_time  DateTime64(6, 'UTC'),
    environment      LowCardinality(String),
    event_context    JSON,
    metadata_version UInt64,
    commit_lsn       UInt64,
    tx_seq           UInt32,
    trace_id         String
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(event_date_time)
ORDER BY (event_type, event_date_time, event_id)
SETTINGS non_replicated_deduplication_window = 1000";

/// A 0.1 table holding a row, `outbox-relay setup` (the documented upgrade), then the corpus
/// shipped into it: the old row is kept (as ClickHouse rendered it), every new one is the
/// published text.
fn upgrade_of_a_0_1_table(v: PgVersion) {
    let f = Fixture::start(v, &[]);
    f.ch("DROP TABLE {db}.event_log SYNC");
    f.ch(EVENT_LOG_0_1);
    f.ch("ALTER TABLE {db}.event_log ADD INDEX IF NOT EXISTS commit_lsn_minmax commit_lsn TYPE minmax GRANULARITY 1");
    f.ch(
        "INSERT INTO {db}.event_log (event_id, event_type, event_date_time, environment, event_context, commit_lsn)
         VALUES ('00000000-0000-0000-0000-000000000001', 'old', now64(6), 'test', '{\"b\": {\"c\": 1}, \"a\": null}', 1)",
    );
    let out = f.relay(&["setup"]);
    assert!(
        out.status.success(),
        "setup on a 0.1 table: {}",
        stderr(&out)
    );
    let columns = f.ch(
        "SELECT name, type FROM system.columns WHERE database = '{db}' AND table = 'event_log' \
           AND name IN ('event_context', 'source') ORDER BY name FORMAT TSV",
    );
    assert_eq!(
        columns,
        "event_context\tString\nsource\tLowCardinality(String)\n"
    );
    // The old row is still there, as ClickHouse's JSON type had rendered it.
    assert_eq!(
        f.ch(
            "SELECT event_context, source FROM {db}.event_log WHERE event_type = 'old' FORMAT TSV"
        ),
        "{\"b\":{\"c\":1}}\t\n"
    );
    // setup again changes nothing (no new mutation).
    let mutations = || {
        f.ch("SELECT count() FROM system.mutations WHERE database = '{db}' AND table = 'event_log'")
    };
    let before = mutations();
    let out = f.relay(&["setup"]);
    assert!(out.status.success(), "second setup: {}", stderr(&out));
    assert_eq!(mutations(), before);
    f.ch("DELETE FROM {db}.event_log WHERE event_type = 'old'");
    publish_corpus_and_check(&f);
}
