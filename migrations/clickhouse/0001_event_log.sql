-- The "one big table" of events. One row per outbox row, exactly as published.
-- commit_lsn and tx_seq say where the event came from in PostgreSQL's WAL; trace_id is the
-- publisher's trace (empty when none was recorded); source names the outbox (PostgreSQL system
-- identifier, database, schema.table), so several relays can write into one table.
CREATE TABLE IF NOT EXISTS `event_log`
(
    event_id         UUID,
    event_type       LowCardinality(String),
    event_date_time  DateTime64(6, 'UTC'),
    environment      LowCardinality(String),
    event_context    JSON,
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
ALTER TABLE `event_log` ADD INDEX IF NOT EXISTS commit_lsn_minmax commit_lsn TYPE minmax GRANULARITY 1;

-- Tables made before 0.2 lack the source column; their rows keep '' (one relay wrote them).
ALTER TABLE `event_log` ADD COLUMN IF NOT EXISTS source LowCardinality(String) DEFAULT '';
