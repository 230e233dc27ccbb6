-- The "one big table" of events. One row per outbox row, exactly as published.
-- commit_lsn and tx_seq say where the event came from in PostgreSQL's WAL, xid in which
-- transaction (its 64-bit id: `outbox-relay verify` tells with it which rows a PostgreSQL
-- snapshot sees); trace_id is the publisher's trace (empty when none was recorded); source
-- names the outbox (PostgreSQL system identifier, database, schema.table), so several relays
-- can write into one table.
-- event_context is the published text, byte for byte (docs/design.md): query it with JSON
-- functions (JSONExtractString(event_context, 'user', 'id')), or add a typed MATERIALIZED
-- column for a path you filter on often (docs/publishing.md).
CREATE TABLE IF NOT EXISTS `event_log`
(
    event_id         UUID,
    event_type       LowCardinality(String),
    event_date_time  DateTime64(6, 'UTC'),
    environment      LowCardinality(String),
    event_context    String CODEC(ZSTD(3)),
    metadata_version UInt64,
    commit_lsn       UInt64,
    tx_seq           UInt32,
    xid              UInt64,
    trace_id         String,
    source           LowCardinality(String)
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(event_date_time)
ORDER BY (event_type, event_date_time, event_id)
SETTINGS non_replicated_deduplication_window = 1000;

-- The relay's restart check reads the rows past the slot's confirmed LSN; parts are written in
-- commit order, so a minmax index lets it skip all older parts.
ALTER TABLE `event_log` ADD INDEX IF NOT EXISTS commit_lsn_minmax commit_lsn TYPE minmax GRANULARITY 1;

-- Tables made before 0.2 lack the source column; their rows keep '' (one relay wrote them).
ALTER TABLE `event_log` ADD COLUMN IF NOT EXISTS source LowCardinality(String) DEFAULT '';

-- Tables made before 0.3 lack the xid column; their rows keep 0 (not known): `verify` proves
-- the events shipped since (docs/guarantees.md, "What `verify` proves").
ALTER TABLE `event_log` ADD COLUMN IF NOT EXISTS xid UInt64 DEFAULT 0 AFTER tx_seq;

-- verify reads the rows of transactions its snapshots see or not: a minmax index lets it skip
-- the parts older than the outbox's retention.
ALTER TABLE `event_log` ADD INDEX IF NOT EXISTS xid_minmax xid TYPE minmax GRANULARITY 1;

-- Tables made before 0.2 hold event_context as JSON, which loses text (null values, empty
-- objects, dotted keys, big numbers) and refuses some documents. This turns the column into the
-- text (a mutation that rewrites the column of existing parts: their rows read back as ClickHouse
-- rendered them, the exact text of those is gone); on a String column it changes nothing.
ALTER TABLE `event_log` MODIFY COLUMN event_context String CODEC(ZSTD(3));
