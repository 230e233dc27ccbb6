//! `make bench-json`: how each candidate layout of `event_context` in ClickHouse stores, takes and
//! answers 1,000,000 realistic events (issue 12, docs/design.md "event_context in ClickHouse").
//!
//! Starts its own ClickHouse (chdb-core) on 127.0.0.1, and for each layout: creates the event
//! table, inserts the same events through the relay's sink (`BatchInsert`, 100,000-row inserts,
//! as `clickhouse_insert_limit_events_per_s` of `make bench`), merges the parts (`OPTIMIZE
//! FINAL`), reads the compressed size from `system.parts`, and times three typical queries
//! (median of `BENCH_QUERY_RUNS`, 5 by default, warm cache). Prints a table and writes
//! bench/json_layouts.json. `BENCH_EVENTS` (1,000,000) and `BENCH_RUNS` (insert repeats, 1)
//! make it smaller or steadier. Figures, never test assertions.

use std::collections::BTreeMap;
use std::time::Instant;

use anyhow::{Context, Result};
use harness::ClickHouseServer;
use relay::config::ClickHouseTarget;
use relay::event::EventRow;
use relay::sink::ClickHouseSink;

/// A candidate layout: its `event_context` column(s) and how the three queries read the paths.
struct Layout {
    name: &'static str,
    what: &'static str,
    /// Column definitions replacing `event_context` in the table.
    columns: &'static str,
    /// `user.country` as a String expression.
    country: &'static str,
    /// `user.id` as a String expression.
    user_id: &'static str,
    /// `order.total` as a Float64 expression.
    total: &'static str,
}

const LAYOUTS: &[Layout] = &[
    Layout {
        name: "json",
        what: "0.1: event_context JSON (lossy)",
        columns: "event_context JSON",
        country: "event_context.user.country::String",
        user_id: "event_context.user.id::String",
        total: "event_context.order.total::Float64",
    },
    Layout {
        name: "string",
        what: "event_context String, JSON functions on the text",
        columns: "event_context String",
        country: "JSONExtractString(event_context, 'user', 'country')",
        user_id: "JSONExtractString(event_context, 'user', 'id')",
        total: "JSONExtractFloat(event_context, 'order', 'total')",
    },
    Layout {
        name: "string_zstd",
        what: "event_context String CODEC(ZSTD(3)), JSON functions",
        columns: "event_context String CODEC(ZSTD(3))",
        country: "JSONExtractString(event_context, 'user', 'country')",
        user_id: "JSONExtractString(event_context, 'user', 'id')",
        total: "JSONExtractFloat(event_context, 'order', 'total')",
    },
    Layout {
        name: "string_json",
        what: "String + event_context_json JSON MATERIALIZED (never-failing cast)",
        columns: "event_context String CODEC(ZSTD(3)), \
                  event_context_json JSON MATERIALIZED accurateCastOrDefault(event_context, 'JSON')",
        country: "event_context_json.user.country::String",
        user_id: "event_context_json.user.id::String",
        total: "event_context_json.order.total::Float64",
    },
    Layout {
        name: "string_typed",
        what: "String ZSTD(3) + 2 typed MATERIALIZED columns of hot paths",
        columns: "event_context String CODEC(ZSTD(3)), \
                  user_country LowCardinality(String) MATERIALIZED JSONExtractString(event_context, 'user', 'country'), \
                  user_id String MATERIALIZED JSONExtractString(event_context, 'user', 'id')",
        country: "user_country",
        user_id: "user_id",
        total: "JSONExtractFloat(event_context, 'order', 'total')",
    },
];

const EVENT_TYPES: [&str; 8] = [
    "user.login",
    "user.logout",
    "order.created",
    "order.shipped",
    "payment.failed",
    "payment.captured",
    "audit.export",
    "cart.updated",
];
const COUNTRIES: [&str; 12] = [
    "DE", "FR", "US", "GB", "NL", "ES", "IT", "PL", "SE", "BR", "JP", "IN",
];
const CURRENCIES: [&str; 4] = ["EUR", "USD", "GBP", "JPY"];
const PLANS: [&str; 3] = ["free", "pro", "team"];

/// A small deterministic generator (xorshift), so every layout gets the same events.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// An application's event context: nested objects, an array of objects, a few hundred distinct
/// paths overall (8 per-type objects of their own, 240 attribute keys), about 300 bytes.
fn context(rng: &mut Rng, kind: usize) -> String {
    let country = COUNTRIES[rng.below(COUNTRIES.len() as u64) as usize];
    let user = rng.below(50_000);
    let plan = PLANS[rng.below(3) as usize];
    let items: Vec<String> = (0..1 + rng.below(3))
        .map(|_| {
            format!(
                r#"{{"sku": "sku-{}", "qty": {}}}"#,
                rng.below(5000),
                1 + rng.below(4)
            )
        })
        .collect();
    let total = rng.below(100_000) as f64 / 100.0;
    let currency = CURRENCIES[rng.below(4) as usize];
    let first = rng.below(80);
    let attrs: Vec<String> = (0..3)
        .map(|n| {
            let key = first + n * 80;
            if key.is_multiple_of(2) {
                format!(r#""a{key}": "v{}""#, rng.below(100))
            } else {
                format!(r#""a{key}": {}"#, rng.below(1000))
            }
        })
        .collect();
    let kind_name = EVENT_TYPES[kind].replace('.', "_");
    format!(
        r#"{{"user": {{"id": "u{user}", "country": "{country}", "plan": "{plan}"}}, "order": {{"id": "o{}", "total": {total:.2}, "currency": "{currency}", "items": [{}]}}, "req": {{"ip": "10.{}.{}.{}", "path": "/{kind_name}"}}, "{kind_name}": {{"step": {}, "ok": {}}}, "attrs": {{{}}}}}"#,
        rng.below(10_000_000),
        items.join(", "),
        rng.below(256),
        rng.below(256),
        rng.below(256),
        rng.below(10),
        rng.below(2) == 0,
        attrs.join(", ")
    )
}

fn row<'a>(i: u64, kind: usize, context: &'a str) -> EventRow<'a> {
    let mut id = [0u8; 16];
    id[8..].copy_from_slice(&i.to_be_bytes());
    EventRow {
        event_id: id,
        event_type: EVENT_TYPES[kind].as_bytes(),
        event_date_time_us: 1_795_000_000_000_000 + i as i64 * 1000,
        environment: b"production",
        event_context: context.as_bytes(),
        metadata_version: 1,
        commit_lsn: 0,
        tx_seq: i as u32,
        xid: 0,
        sentry_trace: None,
    }
}

fn main() -> Result<()> {
    let events: u64 = env_or("BENCH_EVENTS", 1_000_000);
    let runs: usize = env_or("BENCH_RUNS", 1);
    let query_runs: usize = env_or("BENCH_QUERY_RUNS", 5);
    let only = std::env::var("BENCH_LAYOUTS").unwrap_or_default();
    let ch = ClickHouseServer::start()?;
    ch.query("CREATE DATABASE IF NOT EXISTS bench")?;
    let version = ch.query("SELECT version()")?.trim().to_string();
    eprintln!("json-bench: ClickHouse {version}, {events} events, {runs} insert runs");

    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let rows: Vec<(usize, String)> = (0..events)
        .map(|_| {
            let kind = rng.below(EVENT_TYPES.len() as u64) as usize;
            (kind, context(&mut rng, kind))
        })
        .collect();
    let avg_bytes = rows.iter().map(|(_, c)| c.len()).sum::<usize>() as f64 / events as f64;
    let probe = events / 2;
    eprintln!("json-bench: contexts average {avg_bytes:.0} bytes");

    let target = ClickHouseTarget::parse(&ch.url("bench"))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut results: BTreeMap<&str, BTreeMap<&str, f64>> = BTreeMap::new();
    for layout in LAYOUTS {
        if !only.is_empty() && !only.split(',').any(|n| n == layout.name) {
            continue;
        }
        let table = format!("event_log_{}", layout.name);
        let create = format!(
            "CREATE TABLE bench.{table} (
                event_id UUID, event_type LowCardinality(String),
                event_date_time DateTime64(6, 'UTC'), environment LowCardinality(String),
                {}, metadata_version UInt64, commit_lsn UInt64, tx_seq UInt32, xid UInt64,
                trace_id String, source LowCardinality(String))
             ENGINE = MergeTree PARTITION BY toYYYYMM(event_date_time)
             ORDER BY (event_type, event_date_time, event_id)",
            layout.columns
        );
        let sink = ClickHouseSink::new(&target, &table, "json-bench");
        let mut insert_rates = Vec::new();
        for run in 0..runs {
            ch.query(&format!("DROP TABLE IF EXISTS bench.{table} SYNC"))?;
            ch.query(&create)?;
            eprintln!("json-bench: {} insert run {}/{runs}", layout.name, run + 1);
            let started = Instant::now();
            runtime.block_on(async {
                for (n, chunk) in rows.chunks(100_000).enumerate() {
                    let mut insert = sink.begin();
                    for (i, (kind, context)) in chunk.iter().enumerate() {
                        let i = (n * 100_000 + i) as u64;
                        insert.write(&row(i, *kind, context)).await?;
                    }
                    insert.commit().await?;
                }
                anyhow::Ok(())
            })?;
            insert_rates.push(events as f64 / started.elapsed().as_secs_f64());
        }
        // Through the sink's client: a merge may take longer than the harness's 60 s.
        runtime.block_on(sink.execute(&format!("OPTIMIZE TABLE bench.{table} FINAL")))?;
        let number = |sql: &str| -> Result<f64> {
            let out = ch.query(sql)?;
            out.trim()
                .parse::<f64>()
                .with_context(|| format!("{sql}: {out}"))
        };
        let total_bytes = number(&format!(
            "SELECT sum(data_compressed_bytes) FROM system.parts \
             WHERE database = 'bench' AND table = '{table}' AND active"
        ))?;
        let context_bytes = number(&format!(
            "SELECT sum(column_data_compressed_bytes) FROM system.parts_columns \
             WHERE database = 'bench' AND table = '{table}' AND active \
               AND column NOT IN ('event_id', 'event_type', 'event_date_time', 'environment', \
                                  'metadata_version', 'commit_lsn', 'tx_seq', 'trace_id', 'source')"
        ))?;
        let queries = [
            (
                "q1_count_by_nested_value_ms",
                format!(
                    "SELECT count() FROM bench.{table} WHERE {} = 'DE'",
                    layout.country
                ),
            ),
            (
                "q2_top10_of_path_ms",
                format!(
                    "SELECT {} AS v, count() AS c FROM bench.{table} GROUP BY v ORDER BY c DESC LIMIT 10",
                    layout.user_id
                ),
            ),
            (
                "q3_path_of_one_event_ms",
                format!(
                    "SELECT {} FROM bench.{table} WHERE event_id = toUUID('00000000-0000-0000-{:04x}-{:012x}')",
                    layout.total,
                    probe >> 48,
                    probe & 0xffff_ffff_ffff
                ),
            ),
        ];
        let entry = results.entry(layout.name).or_default();
        entry.insert("insert_events_per_s", median(&insert_rates));
        entry.insert("compressed_bytes_per_event", total_bytes / events as f64);
        entry.insert(
            "event_context_compressed_bytes_per_event",
            context_bytes / events as f64,
        );
        let mut answers = Vec::new();
        for (key, sql) in &queries {
            let mut times = Vec::new();
            let mut answer = String::new();
            for _ in 0..query_runs {
                let started = Instant::now();
                answer = ch.query(sql)?;
                times.push(started.elapsed().as_secs_f64() * 1000.0);
            }
            answers.push(answer.lines().next().unwrap_or_default().to_string());
            entry.insert(key, median(&times));
        }
        eprintln!("json-bench: {} answers {answers:?}: {entry:?}", layout.name);
        ch.query(&format!("DROP TABLE bench.{table} SYNC"))?;
        // After each layout, so a failure later keeps the figures measured so far.
        write_results(&results, events, avg_bytes, runs, query_runs, &version)?;
    }

    println!(
        "\n{:<14} {:>10} {:>9} {:>9} {:>8} {:>8} {:>8}",
        "layout", "insert/s", "B/event", "ctx B/ev", "q1 ms", "q2 ms", "q3 ms"
    );
    for layout in LAYOUTS {
        let Some(r) = results.get(layout.name) else {
            continue;
        };
        println!(
            "{:<14} {:>10.0} {:>9.1} {:>9.1} {:>8.1} {:>8.1} {:>8.1}   {}",
            layout.name,
            r["insert_events_per_s"],
            r["compressed_bytes_per_event"],
            r["event_context_compressed_bytes_per_event"],
            r["q1_count_by_nested_value_ms"],
            r["q2_top10_of_path_ms"],
            r["q3_path_of_one_event_ms"],
            layout.what
        );
    }
    let path = write_results(&results, events, avg_bytes, runs, query_runs, &version)?;
    println!("\nwritten to {}", path.display());
    Ok(())
}

fn write_results(
    results: &BTreeMap<&str, BTreeMap<&str, f64>>,
    events: u64,
    avg_bytes: f64,
    runs: usize,
    query_runs: usize,
    version: &str,
) -> Result<std::path::PathBuf> {
    let json = serde_json::json!({
        "results": results,
        "events": events,
        "context_avg_bytes": avg_bytes,
        "insert_runs": runs,
        "query_runs": query_runs,
        "clickhouse": version,
        "commit": git_commit(),
    });
    let path = harness::workspace_root().join("bench/json_layouts.json");
    std::fs::write(&path, serde_json::to_string_pretty(&json)? + "\n")?;
    Ok(path)
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn git_commit() -> String {
    std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}
