//! Whether an existing ClickHouse table keeps every row the relay writes, read from its engine,
//! sorting key and TTLs (`system.tables`): the check [`super::ClickHouseSink::check_engine`]
//! runs in `setup` and at the start of every relay session.
//!
//! The relay confirms a batch to PostgreSQL once ClickHouse accepted it; after that, the only
//! copy of an event that is not in the outbox (purged after `outbox_retention_hours`) is its
//! ClickHouse row. A table that merges, collapses, aggregates or deletes rows by itself would
//! lose events after "batch shipped", with nothing in the relay's power to notice. Accepted:
//!
//! - `MergeTree`, `ReplicatedMergeTree`, `SharedMergeTree`: they never merge rows, whatever the
//!   sorting key (the key only orders them).
//! - `ReplacingMergeTree`, `SummingMergeTree`, `AggregatingMergeTree`, `CoalescingMergeTree`
//!   (and their `Replicated*`/`Shared*` forms) only when the sorting key holds `event_id` as a
//!   column of its own. These engines merge only rows whose sorting keys are equal; with
//!   `event_id` in the key, two rows are equal only when they are the same event, and the relay
//!   writes each event once (docs/guarantees.md), so no row ever has a partner to be merged
//!   with and every row stays as written.
//!
//! Refused, with the reason and the fix: those engines with a key that can join distinct events;
//! `CollapsingMergeTree` and `VersionedCollapsingMergeTree` whatever the key (their sign column
//! is one the relay does not write: every row gets its default, and ClickHouse refuses a sign
//! of 0); `GraphiteMergeTree` (rolls rows up); a table TTL that deletes or groups rows, and a TTL
//! on a column the relay writes (it resets the value); every engine outside the MergeTree family
//! (Null, Buffer, Memory, the Log family, Set, Join, Merge, views, Kafka, URL, File, S3, ...),
//! which drop rows, keep them only in memory, or do not store them at all; `Distributed` for now,
//! naming the local table to point the relay at.

use crate::sink::COLUMN_TYPES;

/// What makes an existing table lose or change the relay's rows, one line per problem, each
/// with its fix; empty when the table keeps every row as written. The arguments are the
/// table's columns of `system.tables`: `engine`, `engine_full`, `sorting_key` and
/// `create_table_query` (for column TTLs, which no other column of `system.tables` shows).
pub fn engine_problems(
    engine: &str,
    engine_full: &str,
    sorting_key: &str,
    create_table_query: &str,
) -> Vec<String> {
    let mut problems = Vec::new();
    let family = merge_tree_family(engine);
    match family {
        Some("MergeTree") => {}
        Some(
            merging @ ("ReplacingMergeTree"
            | "SummingMergeTree"
            | "AggregatingMergeTree"
            | "CoalescingMergeTree"),
        ) => {
            if !key_columns(sorting_key).iter().any(|c| c == "event_id") {
                let what = match merging {
                    "ReplacingMergeTree" => "keeps one row of those",
                    "SummingMergeTree" => "sums those into one row",
                    "AggregatingMergeTree" => "aggregates those into one row",
                    _ => "coalesces those into one row",
                };
                problems.push(format!(
                    "engine {engine} with sorting key ({sorting_key}): in background merges it \
                     {what} that share a sorting key, so distinct events with the same \
                     ({sorting_key}) become one row after they were confirmed. Use MergeTree \
                     (the relay's table: `outbox-relay setup --print-sql`), or put event_id in \
                     the sorting key (ORDER BY (..., event_id)): rows then merge only with \
                     copies of the same event, and the relay writes each event once"
                ));
            }
        }
        Some(collapsing @ ("CollapsingMergeTree" | "VersionedCollapsingMergeTree")) => {
            problems.push(format!(
                "engine {engine}: {collapsing} cancels rows out by a sign column the relay does \
                 not write (every row gets the column's default; ClickHouse refuses a sign of 0 \
                 and a -1 deletes its partner). Use MergeTree (the relay's table: \
                 `outbox-relay setup --print-sql`)"
            ));
        }
        Some(other) => {
            problems.push(format!(
                "engine {engine}: {other} rolls rows up in background merges, so events \
                 disappear into aggregates after they were confirmed. Use MergeTree (the \
                 relay's table: `outbox-relay setup --print-sql`)"
            ));
        }
        None => problems.push(non_merge_tree(engine, engine_full)),
    }
    if family.is_some() {
        if let Some(ttl) = deleting_table_ttl(engine_full) {
            problems.push(format!(
                "table TTL {ttl}: it deletes (or groups) rows once the expression is reached, \
                 while the relay counts every confirmed event as kept (an event published with \
                 an old event_date_time, a backfill, is deleted at the next merge). Remove it \
                 with ALTER TABLE ... REMOVE TTL (a TTL that only moves parts, TO DISK or TO \
                 VOLUME, or RECOMPRESS is fine)"
            ));
        }
        for (column, ttl) in column_ttls(create_table_query) {
            problems.push(format!(
                "column {column} has TTL {ttl}: past it ClickHouse replaces the value the relay \
                 wrote with the column's default. Remove it with ALTER TABLE ... MODIFY COLUMN \
                 {column} REMOVE TTL"
            ));
        }
    }
    problems
}

/// The MergeTree engine an engine name is a form of (`ReplicatedReplacingMergeTree` and
/// `SharedReplacingMergeTree` are `ReplacingMergeTree`), or `None` outside the family.
fn merge_tree_family(engine: &str) -> Option<&str> {
    let base = engine
        .strip_prefix("Replicated")
        .or_else(|| engine.strip_prefix("Shared"))
        .unwrap_or(engine);
    let known = [
        "MergeTree",
        "ReplacingMergeTree",
        "SummingMergeTree",
        "AggregatingMergeTree",
        "CoalescingMergeTree",
        "CollapsingMergeTree",
        "VersionedCollapsingMergeTree",
        "GraphiteMergeTree",
    ];
    if let Some(found) = known.iter().find(|k| **k == base) {
        return Some(found);
    }
    // Some documents spell the cloud engines `ReplacingSharedMergeTree`.
    let unshared = base.strip_suffix("SharedMergeTree")?;
    known
        .iter()
        .find(|k| k.strip_suffix("MergeTree") == Some(unshared))
        .copied()
}

/// Why an engine outside the MergeTree family cannot hold the relay's rows, and what to do.
fn non_merge_tree(engine: &str, engine_full: &str) -> String {
    let args = engine_args(engine_full);
    let arg = |i: usize| args.get(i).map(|a| unquote(a)).unwrap_or_default();
    let use_merge_tree = "Use a MergeTree table (the relay's table: `outbox-relay setup \
                          --print-sql`)";
    match engine {
        "Distributed" => format!(
            "engine Distributed: the relay does not write through Distributed tables yet (an \
             insert into one is accepted before it reaches the shards, so the relay would \
             confirm events no shard holds). Point clickhouse_table at the local table it \
             sends to, {}.{} (a ReplicatedMergeTree on each shard), and run one relay per \
             outbox",
            arg(1),
            arg(2)
        ),
        "Buffer" => format!(
            "engine Buffer: rows wait in memory before reaching {}.{}, and a ClickHouse \
             restart loses them after the relay confirmed them. Point clickhouse_table at {}.{} \
             itself (the relay already writes large batches)",
            arg(0),
            arg(1),
            arg(0),
            arg(1)
        ),
        "Null" | "BlackHole" => {
            format!(
                "engine {engine}: it stores nothing, every event would be dropped. {use_merge_tree}"
            )
        }
        "Memory" | "Set" | "Join" | "KeeperMap" => format!(
            "engine {engine}: its rows live in memory (or are not readable as a table), so a \
             ClickHouse restart loses events the relay confirmed. {use_merge_tree}"
        ),
        "Log" | "TinyLog" | "StripeLog" => format!(
            "engine {engine}: the Log family has no deduplication and no crash safety for \
             inserts cut halfway, which the relay's exactly-once relies on. {use_merge_tree}"
        ),
        "View" | "MaterializedView" | "LiveView" | "WindowView" => format!(
            "engine {engine}: a view, not a table the relay can keep its rows in (a \
             materialized view's own table may merge or drop them). Point clickhouse_table at \
             a MergeTree table (the relay's table: `outbox-relay setup --print-sql`)"
        ),
        "Merge" => "engine Merge: it reads other tables and stores nothing itself. Point \
                    clickhouse_table at one MergeTree table (the relay's table: `outbox-relay \
                    setup --print-sql`)"
            .to_string(),
        _ => format!(
            "engine {engine}: not a MergeTree table, so the relay cannot count on it keeping \
             every row exactly once (external engines such as Kafka, URL, File or S3 pass rows \
             on or keep them elsewhere). {use_merge_tree}"
        ),
    }
}

/// The arguments of `Engine(a, b, ...)` at the start of `engine_full`.
fn engine_args(engine_full: &str) -> Vec<String> {
    let Some(open) = engine_full.find('(') else {
        return Vec::new();
    };
    let Some(close) = matching_paren(engine_full, open) else {
        return Vec::new();
    };
    split_top_level(&engine_full[open + 1..close])
        .into_iter()
        .map(|a| a.trim().to_string())
        .collect()
}

/// `'name'` or `` `name` `` without its quotes.
fn unquote(s: &str) -> String {
    let s = s.trim();
    for q in ['\'', '`', '"'] {
        if let Some(inner) = s.strip_prefix(q).and_then(|r| r.strip_suffix(q)) {
            return inner.replace(&format!("\\{q}"), &q.to_string());
        }
    }
    s.to_string()
}

/// The columns of a sorting key as `system.tables` prints it (`event_type, event_date_time,
/// event_id`, `(event_type)`, `(event_type), ver`), with parentheses around a single column
/// and backquotes removed. An expression stays as written (`cityHash64(event_id)` is not
/// `event_id`: it can join distinct events).
pub fn key_columns(sorting_key: &str) -> Vec<String> {
    let mut columns = Vec::new();
    for part in split_top_level(sorting_key) {
        let part = part.trim();
        if part.is_empty() {
            continue;
        }
        match part
            .strip_prefix('(')
            .filter(|_| matching_paren(part, 0) == Some(part.len() - 1))
        {
            Some(inner) => columns.extend(key_columns(&inner[..inner.len() - 1])),
            None => columns.push(unquote(part)),
        }
    }
    columns
}

/// The table TTL of `engine_full` (`... TTL expr [DELETE|WHERE ...|GROUP BY ...|TO DISK ...],
/// ... SETTINGS ...`) when one of its rules deletes or groups rows; `None` when there is none or
/// every rule only moves or recompresses parts.
fn deleting_table_ttl(engine_full: &str) -> Option<String> {
    let start = find_keyword(engine_full, "TTL")?;
    let rest = &engine_full[start + "TTL".len()..];
    let end = find_keyword(rest, "SETTINGS").unwrap_or(rest.len());
    let ttl = rest[..end].trim();
    let keeps_rows = |rule: &str| {
        ["TO DISK", "TO VOLUME", "RECOMPRESS"]
            .iter()
            .any(|k| find_keyword(rule, k).is_some())
    };
    if split_top_level(ttl).iter().all(|rule| keeps_rows(rule)) {
        None
    } else {
        Some(ttl.to_string())
    }
}

/// The relay's columns that have a TTL in `create_table_query`, with the TTL expression.
fn column_ttls(create_table_query: &str) -> Vec<(String, String)> {
    let Some(open) = create_table_query.find('(') else {
        return Vec::new();
    };
    // The column list comes before ENGINE; a CREATE ... AS SELECT or a view has none.
    let engine_at = find_keyword(create_table_query, "ENGINE").unwrap_or(create_table_query.len());
    if open > engine_at {
        return Vec::new();
    }
    let Some(close) = matching_paren(create_table_query, open) else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for definition in split_top_level(&create_table_query[open + 1..close]) {
        let definition = definition.trim();
        let name_end = if definition.starts_with('`') {
            quoted_end(definition, 0).map(|e| e + 1)
        } else {
            definition.find(char::is_whitespace)
        };
        let Some(name_end) = name_end else { continue };
        let name = unquote(&definition[..name_end]);
        if !COLUMN_TYPES.iter().any(|(column, _)| *column == name) {
            continue;
        }
        let body = &definition[name_end..];
        if let Some(at) = find_keyword(body, "TTL") {
            found.push((name, body[at + "TTL".len()..].trim().to_string()));
        }
    }
    found
}

/// The bytes of `s` from `start` on that lie outside quotes, each with the depth of
/// parentheses and brackets after it; ends at the end of `s` or at a quote never closed.
fn unquoted(s: &str, start: usize) -> impl Iterator<Item = (usize, i32)> + '_ {
    let bytes = s.as_bytes();
    let (mut i, mut depth) = (start, 0i32);
    std::iter::from_fn(move || {
        loop {
            let b = *bytes.get(i)?;
            if matches!(b, b'\'' | b'`' | b'"') {
                i = quoted_end(s, i)? + 1;
                continue;
            }
            match b {
                b'(' | b'[' => depth += 1,
                b')' | b']' => depth -= 1,
                _ => {}
            }
            i += 1;
            return Some((i - 1, depth));
        }
    })
}

/// Where `keyword` (one or more words, upper case) occurs in `s` as whole words, outside
/// quotes and parentheses.
fn find_keyword(s: &str, keyword: &str) -> Option<usize> {
    let bytes = s.as_bytes();
    unquoted(s, 0)
        .find(|&(i, depth)| {
            depth == 0
                && bytes[i..].starts_with(keyword.as_bytes())
                && (i == 0 || !is_word(bytes[i - 1]))
                && bytes.get(i + keyword.len()).is_none_or(|b| !is_word(*b))
        })
        .map(|(i, _)| i)
}

fn is_word(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

/// The index of the quote closing the one at `start` (a backslash escapes the next byte).
fn quoted_end(s: &str, start: usize) -> Option<usize> {
    let bytes = s.as_bytes();
    let quote = bytes[start];
    let mut i = start + 1;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' => i += 2,
            b if b == quote => return Some(i),
            _ => i += 1,
        }
    }
    None
}

/// The index of the parenthesis closing the one at `open`.
fn matching_paren(s: &str, open: usize) -> Option<usize> {
    unquoted(s, open)
        .find(|&(i, depth)| depth == 0 && matches!(s.as_bytes()[i], b')' | b']'))
        .map(|(i, _)| i)
}

/// `s` split at the commas outside quotes, parentheses and brackets.
fn split_top_level(s: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut from = 0;
    for (i, depth) in unquoted(s, 0) {
        if depth == 0 && s.as_bytes()[i] == b',' {
            parts.push(&s[from..i]);
            from = i + 1;
        }
    }
    parts.push(&s[from..]);
    parts
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `system.tables` rows (engine, engine_full, sorting_key, create_table_query) as ClickHouse
    /// 26.9 (chdb-core) printed them for tables with the relay's columns; the Replicated rows
    /// from a server with a (test) Keeper, where such tables can be created; the Shared rows as
    /// ClickHouse Cloud prints them (`SHOW CREATE TABLE` in its documentation).
    const COLUMNS: &str = "(`event_id` UUID, `event_type` LowCardinality(String), \
        `event_date_time` DateTime64(6, 'UTC'), `environment` LowCardinality(String), \
        `event_context` String, `metadata_version` UInt64, `commit_lsn` UInt64, `tx_seq` UInt32, \
        `trace_id` String, `source` LowCardinality(String))";

    fn create(engine_full: &str) -> String {
        format!("CREATE TABLE analytics.event_log {COLUMNS} ENGINE = {engine_full}")
    }

    fn problems(engine: &str, engine_full: &str, sorting_key: &str) -> Vec<String> {
        engine_problems(engine, engine_full, sorting_key, &create(engine_full))
    }

    fn accepted(engine: &str, engine_full: &str, sorting_key: &str) {
        let found = problems(engine, engine_full, sorting_key);
        assert!(found.is_empty(), "{engine_full}: {found:#?}");
    }

    fn refused(engine: &str, engine_full: &str, sorting_key: &str, says: &str) {
        let found = problems(engine, engine_full, sorting_key);
        assert!(
            found.len() == 1 && found[0].contains(says),
            "{engine_full}: expected one problem saying {says:?}: {found:#?}"
        );
    }

    #[test]
    fn the_relays_own_table_and_its_replicated_and_shared_forms_are_accepted() {
        accepted(
            "MergeTree",
            "MergeTree PARTITION BY toYYYYMM(event_date_time) ORDER BY (event_type, \
             event_date_time, event_id) SETTINGS non_replicated_deduplication_window = 1000, \
             index_granularity = 8192",
            "event_type, event_date_time, event_id",
        );
        accepted(
            "ReplicatedMergeTree",
            "ReplicatedMergeTree('/clickhouse/tables/{shard}/e/rmt2', '{replica}') PARTITION BY \
             toYYYYMM(event_date_time) ORDER BY (event_type, event_date_time, event_id) SETTINGS \
             non_replicated_deduplication_window = 1000, index_granularity = 8192",
            "event_type, event_date_time, event_id",
        );
        accepted(
            "SharedMergeTree",
            "SharedMergeTree('/clickhouse/tables/{uuid}/{shard}', '{replica}') PARTITION BY \
             toYYYYMM(event_date_time) ORDER BY (event_type, event_date_time, event_id) SETTINGS \
             index_granularity = 8192",
            "event_type, event_date_time, event_id",
        );
        // A plain MergeTree never merges rows, whatever its key.
        accepted(
            "MergeTree",
            "MergeTree ORDER BY (event_type) SETTINGS index_granularity = 8192",
            "(event_type)",
        );
        // A TTL that only recompresses or moves parts keeps every row.
        accepted(
            "MergeTree",
            "MergeTree ORDER BY (event_type, event_date_time, event_id) TTL \
             toDateTime(event_date_time) + toIntervalDay(30) RECOMPRESS CODEC(ZSTD(9)), \
             toDateTime(event_date_time) + toIntervalDay(90) TO VOLUME 'cold' SETTINGS \
             index_granularity = 8192",
            "event_type, event_date_time, event_id",
        );
    }

    #[test]
    fn merging_engines_are_accepted_only_with_event_id_in_the_sorting_key() {
        accepted(
            "ReplacingMergeTree",
            "ReplacingMergeTree(metadata_version) ORDER BY (event_type, event_id) SETTINGS \
             index_granularity = 8192",
            "event_type, event_id",
        );
        accepted(
            "SharedReplacingMergeTree",
            "SharedReplacingMergeTree('/clickhouse/tables/{uuid}/{shard}', '{replica}') ORDER BY \
             event_id SETTINGS index_granularity = 8192",
            "event_id",
        );
        accepted(
            "AggregatingMergeTree",
            "AggregatingMergeTree ORDER BY (event_id) SETTINGS index_granularity = 8192",
            "(event_id)",
        );
    }

    #[test]
    fn engines_that_merge_rows_without_event_id_in_the_key_or_collapse_are_refused() {
        for (engine, full, key, why) in [
            (
                "ReplacingMergeTree",
                "ReplacingMergeTree ORDER BY (event_type) SETTINGS index_granularity = 8192",
                "(event_type)",
                "become one row",
            ),
            (
                "ReplicatedReplacingMergeTree",
                "ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/e/rrmt', '{replica}', \
                 metadata_version) ORDER BY (event_type) SETTINGS index_granularity = 8192",
                "(event_type)",
                "become one row",
            ),
            (
                "SharedReplacingMergeTree",
                "SharedReplacingMergeTree('/clickhouse/tables/{uuid}/{shard}', '{replica}') \
                 ORDER BY (event_type, event_date_time) SETTINGS index_granularity = 8192",
                "event_type, event_date_time",
                "become one row",
            ),
            (
                "SummingMergeTree",
                "SummingMergeTree ORDER BY (event_type, event_date_time) SETTINGS \
                 index_granularity = 8192",
                "event_type, event_date_time",
                "become one row",
            ),
            (
                "AggregatingMergeTree",
                "AggregatingMergeTree ORDER BY (event_type, event_date_time) SETTINGS \
                 index_granularity = 8192",
                "event_type, event_date_time",
                "become one row",
            ),
            (
                "CoalescingMergeTree",
                "CoalescingMergeTree ORDER BY (event_type) SETTINGS index_granularity = 8192",
                "(event_type)",
                "become one row",
            ),
            // A hash of event_id can join distinct events.
            (
                "ReplacingMergeTree",
                "ReplacingMergeTree ORDER BY cityHash64(event_id) SETTINGS index_granularity = 8192",
                "cityHash64(event_id)",
                "become one row",
            ),
            (
                "CollapsingMergeTree",
                "CollapsingMergeTree(sign) ORDER BY (event_id) SETTINGS index_granularity = 8192",
                "(event_id)",
                "sign column",
            ),
            (
                "ReplicatedCollapsingMergeTree",
                "ReplicatedCollapsingMergeTree('/clickhouse/tables/{shard}/e/rcmt', '{replica}', \
                 sign) ORDER BY (event_type, event_date_time) SETTINGS index_granularity = 8192",
                "event_type, event_date_time",
                "sign column",
            ),
            (
                "VersionedCollapsingMergeTree",
                "VersionedCollapsingMergeTree(sign, ver) ORDER BY (event_type) SETTINGS \
                 index_granularity = 8192",
                "(event_type), ver",
                "sign column",
            ),
        ] {
            refused(engine, full, key, why);
        }
        refused(
            "GraphiteMergeTree",
            "GraphiteMergeTree('graphite_rollup') ORDER BY event_id",
            "event_id",
            "rolls rows up",
        );
    }

    #[test]
    fn ttls_that_delete_rows_or_reset_values_are_refused() {
        let key = "event_type, event_date_time, event_id";
        for full in [
            "MergeTree ORDER BY (event_type, event_date_time, event_id) TTL \
             toDateTime(event_date_time) + toIntervalDay(30) SETTINGS index_granularity = 8192",
            "MergeTree ORDER BY (event_type, event_date_time, event_id) TTL \
             toDateTime(event_date_time) + toIntervalDay(30) WHERE event_type = 'x', \
             toDateTime(event_date_time) + toIntervalDay(1) RECOMPRESS CODEC(ZSTD(9)) SETTINGS \
             index_granularity = 8192",
            "MergeTree ORDER BY (event_type, event_date_time) TTL toDateTime(event_date_time) + \
             toIntervalDay(30) GROUP BY event_type, event_date_time SET event_context = \
             any(event_context) SETTINGS index_granularity = 8192",
            "ReplicatedMergeTree('/clickhouse/tables/{shard}/e/t', '{replica}') ORDER BY \
             (event_type, event_date_time, event_id) TTL toDateTime(event_date_time) + \
             toIntervalDay(30) DELETE SETTINGS index_granularity = 8192",
        ] {
            let engine = full.split([' ', '(']).next().unwrap_or_default();
            refused(engine, full, key, "table TTL toDateTime(event_date_time)");
        }
        // A column TTL shows only in create_table_query.
        let query = "CREATE TABLE e.colttl (`event_id` UUID, `event_type` LowCardinality(String), \
            `event_date_time` DateTime64(6, 'UTC'), `environment` LowCardinality(String), \
            `event_context` String TTL toDateTime(event_date_time) + toIntervalDay(1), \
            `metadata_version` UInt64, `commit_lsn` UInt64, `tx_seq` UInt32, `trace_id` String, \
            `source` LowCardinality(String)) ENGINE = MergeTree ORDER BY (event_type, \
            event_date_time, event_id) SETTINGS index_granularity = 8192";
        let found = engine_problems(
            "MergeTree",
            "MergeTree ORDER BY (event_type, event_date_time, event_id) SETTINGS \
             index_granularity = 8192",
            key,
            query,
        );
        assert_eq!(found.len(), 1, "{found:#?}");
        assert!(
            found[0].contains("column event_context has TTL toDateTime(event_date_time)"),
            "{found:#?}"
        );
        // Quotes, defaults with commas, indexes and constraints mentioning TTL; a TTL on a
        // column of the team's own is none of the relay's business.
        let query = "CREATE TABLE e.colttl2 (`event_id` UUID, `event_type` LowCardinality(String) \
            DEFAULT 'a,b' TTL toDateTime(event_date_time) + toIntervalDay(1), `event_date_time` \
            DateTime64(6, 'UTC'), `we\\`ird, TTL` String, `note` String TTL \
            toDateTime(event_date_time) + toIntervalDay(1), INDEX i event_id TYPE minmax \
            GRANULARITY 1, CONSTRAINT c CHECK event_type != 'TTL') ENGINE = MergeTree ORDER BY \
            (event_id) SETTINGS index_granularity = 8192";
        let found = engine_problems(
            "MergeTree",
            "MergeTree ORDER BY (event_id)",
            "(event_id)",
            query,
        );
        assert_eq!(found.len(), 1, "{found:#?}");
        assert!(found[0].contains("column event_type has TTL"), "{found:#?}");
    }

    #[test]
    fn engines_outside_the_merge_tree_family_are_refused_with_the_fix() {
        for (engine, full, says) in [
            ("Null", "`Null`", "stores nothing"),
            ("Memory", "Memory", "in memory"),
            ("Set", "Set", "in memory"),
            ("Join", "Join(ANY, LEFT, event_id)", "in memory"),
            ("Log", "Log", "Log family"),
            ("TinyLog", "TinyLog", "Log family"),
            ("StripeLog", "StripeLog", "Log family"),
            ("Merge", "Merge('e', '^plain')", "stores nothing itself"),
            ("View", "", "a view"),
            ("MaterializedView", "", "a view"),
            ("File", "File('TSV')", "not a MergeTree table"),
            (
                "Kafka",
                "Kafka('localhost:9092', 'events', 'g', 'JSONEachRow')",
                "not a MergeTree table",
            ),
            (
                "Buffer",
                "Buffer('e', 'plain', 1, 10, 100, 10000, 1000000, 10000000, 100000000)",
                "Point clickhouse_table at e.plain",
            ),
            (
                "Distributed",
                "Distributed('local', 'e', 'rmt', rand())",
                "the local table it sends to, e.rmt",
            ),
        ] {
            let found = engine_problems(engine, full, "", "");
            assert!(
                found.len() == 1 && found[0].contains(says) && found[0].contains(engine),
                "{engine}: expected one problem saying {says:?}: {found:#?}"
            );
        }
    }

    #[test]
    fn sorting_keys_as_clickhouse_prints_them() {
        assert_eq!(
            key_columns("event_type, event_date_time, event_id"),
            ["event_type", "event_date_time", "event_id"]
        );
        assert_eq!(key_columns("(event_type), ver"), ["event_type", "ver"]);
        assert_eq!(key_columns("(event_id)"), ["event_id"]);
        assert_eq!(key_columns("`event_id`"), ["event_id"]);
        assert_eq!(
            key_columns("toStartOfHour(event_date_time), cityHash64(event_id)"),
            ["toStartOfHour(event_date_time)", "cityHash64(event_id)"]
        );
        assert!(key_columns("").is_empty());
        assert!(key_columns("tuple()").iter().all(|c| c != "event_id"));
    }
}
