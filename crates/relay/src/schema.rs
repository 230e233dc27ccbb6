//! The DDL of both sides, rendered from the configuration. `migrations/` holds the same DDL
//! rendered with the default names (a test keeps them equal), for teams that apply schema changes
//! with their own migration tool; `outbox-relay setup` applies it idempotently.

use crate::config::Config;
use crate::sink::quote_ch_ident;

/// `"name"` with inner quotes doubled, for PostgreSQL identifiers.
pub fn quote_pg_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// `'text'` with inner quotes doubled, for PostgreSQL string literals.
pub fn quote_pg_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// `"schema"."table"` of the outbox table.
pub fn outbox_table(config: &Config) -> String {
    format!(
        "{}.{}",
        quote_pg_ident(&config.outbox_schema),
        quote_pg_ident(&config.outbox_table)
    )
}

/// `"schema"."<outbox>_checkpoints"`: one row per shipped batch, for operators and replay.
pub fn checkpoints_table(config: &Config) -> String {
    format!(
        "{}.{}",
        quote_pg_ident(&config.outbox_schema),
        quote_pg_ident(&format!("{}_checkpoints", config.outbox_table))
    )
}

/// `"schema"."<outbox>_dead_letters"`: events ClickHouse refused, with the reason.
pub fn dead_letters_table(config: &Config) -> String {
    format!(
        "{}.{}",
        quote_pg_ident(&config.outbox_schema),
        quote_pg_ident(&format!("{}_dead_letters", config.outbox_table))
    )
}

/// The outbox table, its purge index, its publication, the checkpoint and dead-letter tables
/// (PostgreSQL).
pub fn postgres_ddl(config: &Config) -> String {
    let table = outbox_table(config);
    let checkpoints = checkpoints_table(config);
    let dead_letters = dead_letters_table(config);
    let checkpoints_index = quote_pg_ident(&format!(
        "{}_checkpoints_slot_snapshot_lsn",
        config.outbox_table
    ));
    let name = &config.outbox_table;
    let index = quote_pg_ident(&format!("{name}_event_date_time_brin"));
    let check = |what: &str| quote_pg_ident(&format!("{name}_{what}_check"));
    let publication = quote_pg_ident(&config.publication);
    let publication_literal = quote_pg_literal(&config.publication);
    let environment = quote_pg_literal(&config.environment);
    let (type_check, context_check, version_check, time_check) = (
        check("event_type"),
        check("event_context"),
        check("metadata_version"),
        check("event_date_time"),
    );
    format!(
        r#"-- The transactional outbox. Publish an event inside the application's own transaction:
--   INSERT INTO {table} (event_type, event_context) VALUES ($1, $2);
-- Column choices (docs/design.md): event_context is json, not jsonb, so the exact text that was
-- published (key order, spacing, duplicate keys, number spelling) is what ClickHouse receives.
CREATE TABLE IF NOT EXISTS {table} (
    event_id         uuid        NOT NULL DEFAULT gen_random_uuid() PRIMARY KEY,
    event_type       text        NOT NULL,
    event_date_time  timestamptz NOT NULL DEFAULT clock_timestamp(),
    environment      text        NOT NULL DEFAULT {environment},
    event_context    json        NOT NULL,
    metadata_version bigint      NOT NULL DEFAULT 1,
    sentry_trace     text,
    CONSTRAINT {type_check} CHECK (event_type <> ''),
    CONSTRAINT {context_check} CHECK (json_typeof(event_context) = 'object'),
    CONSTRAINT {version_check} CHECK (metadata_version >= 0),
    CONSTRAINT {time_check}
        CHECK (event_date_time >= '1900-01-01 00:00:00+00' AND event_date_time < '2300-01-01 00:00:00+00')
);

-- Optional: the publisher's trace (sentry_sdk.get_traceparent(), or a W3C traceparent), so a
-- ClickHouse row (trace_id) and the relay's Sentry transaction lead back to the request.
ALTER TABLE {table} ADD COLUMN IF NOT EXISTS sentry_trace text;

-- The environment default follows the relay's `environment` setting.
ALTER TABLE {table} ALTER COLUMN environment SET DEFAULT {environment};

-- Shipped rows are deleted by the relay once older than `outbox_retention_hours`; a BRIN index
-- keeps that cheap on an append-only table.
CREATE INDEX IF NOT EXISTS {index} ON {table} USING brin (event_date_time);

-- Only inserts are published: the relay's purge deletes never travel.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = {publication_literal}) THEN
        CREATE PUBLICATION {publication} FOR TABLE {table} WITH (publish = 'insert');
    END IF;
END
$$;

-- The relay's checkpoints, one row per batch ClickHouse accepted (docs/operations.md). snapshot
-- is a PostgreSQL snapshot taken before WAL position snapshot_lsn: a transaction it does not
-- see committed after snapshot_lsn, which is how `outbox-relay replay` finds what to re-ship.
-- Kept as long as the outbox rows (`outbox_retention_hours`); the newest row is always kept.
CREATE TABLE IF NOT EXISTS {checkpoints} (
    slot          text        NOT NULL,
    confirmed_lsn pg_lsn      NOT NULL,
    rows          bigint      NOT NULL,
    recorded_at   timestamptz NOT NULL DEFAULT now(),
    snapshot      pg_snapshot NOT NULL,
    snapshot_lsn  pg_lsn      NOT NULL
);
CREATE INDEX IF NOT EXISTS {checkpoints_index} ON {checkpoints} (slot, snapshot_lsn);
-- Which publication and table the batch was streamed under (their oids): a later session that
-- finds another (the publication dropped and created again, the table swapped) knows the WAL in
-- between may have been skipped by PostgreSQL and re-ships that window from the outbox.
ALTER TABLE {checkpoints} ADD COLUMN IF NOT EXISTS coverage text;

-- Events ClickHouse refused on their own (a value its column cannot hold), with its error; the
-- rest of their batch shipped. `outbox-relay dead-letters list|retry|purge` manages them; fix a
-- row with UPDATE before `retry`. event_context is the published text, byte for byte.
CREATE TABLE IF NOT EXISTS {dead_letters} (
    event_id         uuid        PRIMARY KEY,
    commit_lsn       pg_lsn      NOT NULL,
    tx_seq           integer     NOT NULL,
    event_type       text        NOT NULL,
    event_date_time  timestamptz NOT NULL,
    environment      text        NOT NULL,
    event_context    text        NOT NULL,
    metadata_version bigint      NOT NULL,
    sentry_trace     text,
    error            text        NOT NULL,
    failed_at        timestamptz NOT NULL DEFAULT now(),
    attempts         integer     NOT NULL DEFAULT 1
);
"#
    )
}

/// The event table (ClickHouse).
pub fn clickhouse_ddl(config: &Config) -> String {
    let table = quote_ch_ident(&config.clickhouse_table);
    format!(
        r#"-- The "one big table" of events. One row per outbox row, exactly as published.
-- commit_lsn and tx_seq say where the event came from in PostgreSQL's WAL; trace_id is the
-- publisher's trace (empty when none was recorded); source names the outbox (PostgreSQL system
-- identifier, database, schema.table), so several relays can write into one table.
-- event_context is the published text, byte for byte (docs/design.md): query it with JSON
-- functions (JSONExtractString(event_context, 'user', 'id')), or add a typed MATERIALIZED
-- column for a path you filter on often (docs/publishing.md).
CREATE TABLE IF NOT EXISTS {table}
(
    event_id         UUID,
    event_type       LowCardinality(String),
    event_date_time  DateTime64(6, 'UTC'),
    environment      LowCardinality(String),
    event_context    String CODEC(ZSTD(3)),
    metadata_version UInt64,
    commit_lsn       UInt64,
    tx_seq           UInt32,
    trace_id         String,
    source           LowCardinality(String)
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(event_date_time)
ORDER BY (event_type, event_date_time, event_id)
SETTINGS non_replicated_deduplication_window = 1000;

-- The relay's restart check reads the rows past the slot's confirmed LSN; parts are written in
-- commit order, so a minmax index lets it skip all older parts.
ALTER TABLE {table} ADD INDEX IF NOT EXISTS commit_lsn_minmax commit_lsn TYPE minmax GRANULARITY 1;

-- Tables made before 0.2 lack the source column; their rows keep '' (one relay wrote them).
ALTER TABLE {table} ADD COLUMN IF NOT EXISTS source LowCardinality(String) DEFAULT '';

-- Tables made before 0.2 hold event_context as JSON, which loses text (null values, empty
-- objects, dotted keys, big numbers) and refuses some documents. This turns the column into the
-- text (a mutation that rewrites the column of existing parts: their rows read back as ClickHouse
-- rendered them, the exact text of those is gone); on a String column it changes nothing.
ALTER TABLE {table} MODIFY COLUMN event_context String CODEC(ZSTD(3));
"#
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn default_config() -> Config {
        Config::default()
    }

    /// `migrations/` is the default rendering, so it never drifts from what `setup` applies.
    #[test]
    fn migrations_match_setup() {
        let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../../migrations");
        for (path, rendered) in [
            (
                "postgres/0001_event_outbox.sql",
                postgres_ddl(&default_config()),
            ),
            (
                "clickhouse/0001_event_log.sql",
                clickhouse_ddl(&default_config()),
            ),
        ] {
            let file = std::fs::read_to_string(format!("{root}/{path}"))
                .unwrap_or_else(|e| panic!("migrations/{path}: {e}"));
            assert_eq!(
                file, rendered,
                "migrations/{path} differs from what setup renders; regenerate it with \
                 `cargo run -p outbox-relay -- setup --print-sql`"
            );
        }
    }

    #[test]
    fn quoting() {
        assert_eq!(quote_pg_ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(quote_pg_literal("it's"), "'it''s'");
        assert_eq!(quote_ch_ident("a`b"), "`a\\`b`");
    }
}
