//! The DDL of both sides, rendered from the configuration. `migrations/` holds the same DDL
//! rendered with the default names (a test keeps them equal), for teams that apply schema changes
//! with their own migration tool; `outbox-relay setup` applies it idempotently.

use crate::config::Config;
use crate::event::fnv1a;
use crate::pg::{quote_pg_ident, quote_pg_literal};
use crate::sink::quote_ch_ident;

/// PostgreSQL's longest identifier (NAMEDATALEN - 1 bytes); longer ones are truncated silently.
pub const PG_MAX_IDENT: usize = 63;

/// The name of something derived from the outbox table (`<outbox>_<suffix>`), at most
/// [`PG_MAX_IDENT`] bytes and unique per outbox table: when `<outbox>_<suffix>` is too long, the
/// outbox name is cut (at a character boundary) and a hash of the whole name keeps it apart from
/// other outbox tables that share the prefix. Names that fit are unchanged.
pub fn derived_name(outbox_table: &str, suffix: &str) -> String {
    let plain = format!("{outbox_table}_{suffix}");
    if plain.len() <= PG_MAX_IDENT {
        return plain;
    }
    let hash = fnv1a(outbox_table.as_bytes());
    let tag = format!("{:08x}", (hash ^ (hash >> 32)) as u32);
    let room = PG_MAX_IDENT.saturating_sub(suffix.len() + tag.len() + 2);
    let mut cut = room.min(outbox_table.len());
    while !outbox_table.is_char_boundary(cut) {
        cut -= 1;
    }
    let name = format!("{}_{tag}_{suffix}", &outbox_table[..cut]);
    // Suffixes are short constants, so this holds; a longer one would be a bug here.
    debug_assert!(name.len() <= PG_MAX_IDENT, "{name}");
    name
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
        quote_pg_ident(&derived_name(&config.outbox_table, "checkpoints"))
    )
}

/// `"schema"."<outbox>_dead_letters"`: events ClickHouse refused, with the reason.
pub fn dead_letters_table(config: &Config) -> String {
    format!(
        "{}.{}",
        quote_pg_ident(&config.outbox_schema),
        quote_pg_ident(&derived_name(&config.outbox_table, "dead_letters"))
    )
}

/// `"schema"."<outbox>_coverage_log"`: every change of the publication's coverage of the outbox
/// table (and which table had the outbox's name), written by the coverage watch.
pub fn coverage_log_table(config: &Config) -> String {
    format!(
        "{}.{}",
        quote_pg_ident(&config.outbox_schema),
        quote_pg_ident(&derived_name(&config.outbox_table, "coverage_log"))
    )
}

/// The coverage watch's event trigger: one per outbox, and event triggers are named per
/// database, so the name derives from the schema too.
pub fn coverage_watch_trigger(config: &Config) -> String {
    derived_name(
        &format!("{}_{}", config.outbox_schema, config.outbox_table),
        "coverage_watch",
    )
}

/// The names and literals the PostgreSQL DDL uses, computed once from the configuration.
struct DdlNames {
    table: String,
    checkpoints: String,
    dead_letters: String,
    coverage_log: String,
    watch_function: String,
    watch_trigger_ident: String,
    watch_trigger_literal: String,
    watched: String,
    checkpoints_index: String,
    index: String,
    schema: String,
    schema_literal: String,
    name_literal: String,
    publication: String,
    publication_literal: String,
    environment: String,
    inner: String,
    dollar: String,
    type_check: String,
    context_check: String,
    version_check: String,
    time_check: String,
}

impl DdlNames {
    fn new(config: &Config) -> DdlNames {
        let table = outbox_table(config);
        let checkpoints = checkpoints_table(config);
        let dead_letters = dead_letters_table(config);
        let coverage_log = coverage_log_table(config);
        let watch_function = format!(
            "{}.{}",
            quote_pg_ident(&config.outbox_schema),
            quote_pg_ident(&derived_name(&config.outbox_table, "coverage_watch"))
        );
        let watch_trigger = coverage_watch_trigger(config);
        let watch_trigger_ident = quote_pg_ident(&watch_trigger);
        let watch_trigger_literal = quote_pg_literal(&watch_trigger);
        let watched = base_fingerprint_sql(
            &quote_pg_literal(&config.publication),
            &quote_pg_literal(&config.outbox_schema),
            &quote_pg_literal(&config.outbox_table),
        );
        let name = &config.outbox_table;
        let checkpoints_index =
            quote_pg_ident(&derived_name(name, "checkpoints_slot_snapshot_lsn"));
        let index = quote_pg_ident(&derived_name(name, "event_date_time_brin"));
        let check = |what: &str| quote_pg_ident(&derived_name(name, &format!("{what}_check")));
        let schema = quote_pg_ident(&config.outbox_schema);
        let schema_literal = quote_pg_literal(&config.outbox_schema);
        let name_literal = quote_pg_literal(&config.outbox_table);
        let publication = quote_pg_ident(&config.publication);
        let publication_literal = quote_pg_literal(&config.publication);
        let environment = quote_pg_literal(&config.environment);
        // The DO blocks' dollar quote must not occur in a name they hold.
        let names = [
            &config.outbox_schema,
            &config.outbox_table,
            &config.publication,
        ];
        // The coverage watch's body nests inside a DO block: another tag.
        let inner = (0..)
            .map(|n| format!("$watch{n}$"))
            .find(|tag| names.iter().all(|name| !name.contains(tag.as_str())))
            .unwrap_or_default();
        let dollar = std::iter::once("$$".to_string())
            .chain((0..).map(|n| format!("$relay{n}$")))
            .find(|tag| names.iter().all(|name| !name.contains(tag.as_str())))
            .unwrap_or_default();
        let (type_check, context_check, version_check, time_check) = (
            check("event_type"),
            check("event_context"),
            check("metadata_version"),
            check("event_date_time"),
        );
        DdlNames {
            table,
            checkpoints,
            dead_letters,
            coverage_log,
            watch_function,
            watch_trigger_ident,
            watch_trigger_literal,
            watched,
            checkpoints_index,
            index,
            schema,
            schema_literal,
            name_literal,
            publication,
            publication_literal,
            environment,
            inner,
            dollar,
            type_check,
            context_check,
            version_check,
            time_check,
        }
    }
}

/// The outbox table, its purge index, its publication, the checkpoint and dead-letter tables
/// (PostgreSQL).
pub fn postgres_ddl(config: &Config) -> String {
    let names = DdlNames::new(config);
    [
        outbox_ddl(&names),
        relay_tables_ddl(&names),
        coverage_watch_ddl(&names),
    ]
    .concat()
}

/// The outbox table, its purge index and its publication.
fn outbox_ddl(names: &DdlNames) -> String {
    let DdlNames {
        context_check,
        dollar,
        environment,
        index,
        publication,
        publication_literal,
        schema,
        schema_literal,
        table,
        time_check,
        type_check,
        version_check,
        ..
    } = names;
    format!(
        r#"-- The transactional outbox. Publish an event inside the application's own transaction:
--   INSERT INTO {table} (event_type, event_context) VALUES ($1, $2);
-- Column choices (docs/design.md): event_context is json, not jsonb, so the exact text that was
-- published (key order, spacing, duplicate keys, number spelling) is what ClickHouse receives.
DO {dollar}
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = {schema_literal}) THEN
        CREATE SCHEMA {schema};
    END IF;
END
{dollar};
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

-- Rows are deleted by the relay once their transaction committed more than
-- `outbox_retention_hours` ago (known from the relay's checkpoints, never from event_date_time,
-- which the publisher sets). The BRIN index serves queries by event time.
CREATE INDEX IF NOT EXISTS {index} ON {table} USING brin (event_date_time);

-- Only inserts are published: the relay's purge deletes never travel.
DO {dollar}
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = {publication_literal}) THEN
        CREATE PUBLICATION {publication} FOR TABLE {table} WITH (publish = 'insert');
    END IF;
END
{dollar};

"#
    )
}

/// The relay's own tables: checkpoints and dead letters.
fn relay_tables_ddl(names: &DdlNames) -> String {
    let DdlNames {
        checkpoints,
        checkpoints_index,
        dead_letters,
        ..
    } = names;
    format!(
        r#"-- The relay's checkpoints, one row per batch ClickHouse accepted (docs/operations.md). snapshot
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
-- Outbox rows that could not become events at all (a required column NULL or renamed away, a
-- type the relay cannot read) are dead letters too: raw holds their values by column name, the
-- typed columns stay empty; `retry` reads the row from the outbox again once it is fixed.
ALTER TABLE {dead_letters} ADD COLUMN IF NOT EXISTS raw jsonb;
-- A retried letter is kept, marked shipped, until the outbox purge: the stream, read again after
-- a restart, then never makes it a dead letter anew.
ALTER TABLE {dead_letters} ADD COLUMN IF NOT EXISTS shipped_at timestamptz;
ALTER TABLE {dead_letters} ALTER COLUMN event_type DROP NOT NULL,
    ALTER COLUMN event_date_time DROP NOT NULL, ALTER COLUMN environment DROP NOT NULL,
    ALTER COLUMN event_context DROP NOT NULL, ALTER COLUMN metadata_version DROP NOT NULL;

"#
    )
}

/// The coverage watch: an event trigger logging the publication's coverage of the outbox.
fn coverage_watch_ddl(names: &DdlNames) -> String {
    let DdlNames {
        coverage_log,
        dollar,
        inner,
        name_literal,
        schema_literal,
        watch_function,
        watch_trigger_ident,
        watch_trigger_literal,
        watched,
        ..
    } = names;
    format!(
        r#"-- The coverage watch (docs/guarantees.md): an event trigger logs every change of the
-- publication's coverage of the outbox table (publication, table, membership, publish =
-- 'insert'), with the table that had the outbox's name, in the DDL's own transaction. The relay
-- compares the log's newest id with the one its checkpoints were recorded under, so even a table
-- swapped in and out again between two of its checks is seen and re-shipped from. Event
-- triggers need a superuser (or a managed service's equivalent, such as rds_superuser): without
-- one the watch is not installed (setup says so) and the relay relies on its checks every 5 s.
CREATE TABLE IF NOT EXISTS {coverage_log} (
    id          bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    coverage    text        NOT NULL,
    table_oid   oid,
    recorded_at timestamptz NOT NULL DEFAULT now()
);
GRANT SELECT ON {coverage_log} TO PUBLIC;
DO {dollar}
BEGIN
    BEGIN
        CREATE OR REPLACE FUNCTION {watch_function}() RETURNS event_trigger
            LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS {inner}
        DECLARE
            now_coverage text := {watched};
            now_table oid := (SELECT c.oid FROM pg_class c
                                JOIN pg_namespace n ON n.oid = c.relnamespace
                               WHERE n.nspname = {schema_literal} AND c.relname = {name_literal});
            last_coverage text;
            last_table oid;
        BEGIN
            SELECT coverage, table_oid INTO last_coverage, last_table
              FROM {coverage_log} ORDER BY id DESC LIMIT 1;
            IF NOT FOUND OR now_coverage IS DISTINCT FROM last_coverage
               OR now_table IS DISTINCT FROM last_table THEN
                INSERT INTO {coverage_log} (coverage, table_oid) VALUES (now_coverage, now_table);
            END IF;
        EXCEPTION WHEN OTHERS THEN
            RAISE WARNING 'outbox-relay coverage watch: %', SQLERRM;
        END
        {inner};
        IF NOT EXISTS (SELECT 1 FROM pg_event_trigger WHERE evtname = {watch_trigger_literal}) THEN
            CREATE EVENT TRIGGER {watch_trigger_ident} ON ddl_command_end
                WHEN TAG IN ('CREATE TABLE', 'CREATE TABLE AS', 'SELECT INTO', 'ALTER TABLE',
                             'DROP TABLE', 'CREATE PUBLICATION', 'ALTER PUBLICATION',
                             'DROP PUBLICATION', 'CREATE SCHEMA', 'ALTER SCHEMA', 'DROP SCHEMA')
                EXECUTE FUNCTION {watch_function}();
        END IF;
        -- The coverage now, so that the log's newest row is always the current one.
        INSERT INTO {coverage_log} (coverage, table_oid)
        SELECT w.coverage, w.table_oid
          FROM (SELECT {watched} AS coverage,
                       (SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                         WHERE n.nspname = {schema_literal} AND c.relname = {name_literal}) AS table_oid) w
         WHERE NOT EXISTS (SELECT 1 FROM (SELECT coverage, table_oid FROM {coverage_log}
                                           ORDER BY id DESC LIMIT 1) l
                            WHERE l.coverage = w.coverage
                              AND l.table_oid IS NOT DISTINCT FROM w.table_oid);
    EXCEPTION WHEN insufficient_privilege THEN
        RAISE WARNING 'the coverage watch (an event trigger) needs a superuser and was not installed: a table swapped in as the outbox and out again between two of the relay''s checks (5 s) would not be seen (docs/guarantees.md)';
    END;
END
{dollar};
"#
    )
}

/// The coverage (`publication oid/table oid/membership oid`, or `none` when the outbox's
/// inserts are not published) of the publication named by the SQL expression `publication`
/// over the table `schema`.`table`: what the coverage watch logs ([`postgres_ddl`]) and the relay compares ([`crate::store::coverage`]).
pub fn base_fingerprint_sql(publication: &str, schema: &str, table: &str) -> String {
    format!(
        "coalesce((SELECT p.oid::text || '/' || c.oid::text || '/' || coalesce(
                     (SELECT r.oid::text FROM pg_publication_rel r
                       WHERE r.prpubid = p.oid AND r.prrelid = c.oid),
                     (SELECT pn.oid::text FROM pg_publication_namespace pn
                       WHERE pn.pnpubid = p.oid AND pn.pnnspid = c.relnamespace),
                     CASE WHEN p.puballtables THEN 'all' END)
                     || CASE WHEN EXISTS (SELECT 1 FROM pg_publication_rel r
                                           WHERE r.prpubid = p.oid AND r.prrelid = c.oid
                                             AND r.prqual IS NOT NULL) THEN '/filtered' ELSE '' END
                     FROM pg_publication p, pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                    WHERE p.pubname = {publication} AND n.nspname = {schema}
                      AND c.relname = {table} AND p.pubinsert), 'none')"
    )
}

/// Where the ClickHouse DDL is applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClickHouseLayout<'a> {
    /// One server: a plain MergeTree.
    Single,
    /// Every node of a cluster, through `ON CLUSTER`: a ReplicatedMergeTree (`{shard}` and
    /// `{replica}` macros), and the fence in the cluster's Keeper.
    OnCluster(&'a str),
    /// A database that replicates its tables itself (a `Replicated` database, ClickHouse Cloud):
    /// a ReplicatedMergeTree without arguments (SharedMergeTree on Cloud), and the fence.
    ReplicatedDatabase,
}

/// The event table (ClickHouse), for the configuration's layout: one server, or `ON CLUSTER`
/// when `clickhouse_cluster` is set.
pub fn clickhouse_ddl(config: &Config) -> String {
    match config.clickhouse_cluster.as_str() {
        "" => clickhouse_ddl_for(config, ClickHouseLayout::Single),
        cluster => clickhouse_ddl_for(config, ClickHouseLayout::OnCluster(cluster)),
    }
}

/// The event table (ClickHouse) for `layout`.
pub fn clickhouse_ddl_for(config: &Config, layout: ClickHouseLayout<'_>) -> String {
    let table = quote_ch_ident(&config.clickhouse_table);
    let (on_cluster, engine) = match layout {
        ClickHouseLayout::Single => (String::new(), "MergeTree".to_string()),
        ClickHouseLayout::OnCluster(cluster) => (
            format!(" ON CLUSTER {}", crate::sink::quote_ch_literal(cluster)),
            "ReplicatedMergeTree('/clickhouse/tables/{shard}/{database}/{table}', '{replica}')"
                .to_string(),
        ),
        ClickHouseLayout::ReplicatedDatabase => (String::new(), "ReplicatedMergeTree".into()),
    };
    let fence = match layout {
        ClickHouseLayout::Single => String::new(),
        _ => {
            let database = &config.clickhouse().database;
            let name = crate::sink::fence_table(&config.clickhouse_table);
            format!(
                r#"
-- The fence (docs/operations.md, "ClickHouse clusters"): each relay session claims the next
-- epoch of its source here, in the cluster's Keeper, and every insert it makes keeps its rows
-- only while that epoch is the newest, so a relay that lost the slot never writes after another
-- took over. Needs Keeper (KeeperMap); without it setup warns and the relay runs unfenced.
CREATE TABLE IF NOT EXISTS {fence}{on_cluster}
(
    key        String,
    source     String,
    epoch      UInt64,
    holder     String,
    claimed_at DateTime64(3, 'UTC')
)
ENGINE = KeeperMap({path})
PRIMARY KEY key;
"#,
                fence = quote_ch_ident(&name),
                path = crate::sink::quote_ch_literal(&format!("/outbox_relay/{database}/{name}")),
            )
        }
    };
    format!(
        r#"-- The "one big table" of events. One row per outbox row, exactly as published.
-- commit_lsn and tx_seq say where the event came from in PostgreSQL's WAL, xid in which
-- transaction (its 64-bit id: `outbox-relay verify` tells with it which rows a PostgreSQL
-- snapshot sees); trace_id is the publisher's trace (empty when none was recorded); source
-- names the outbox (PostgreSQL system identifier, database, schema.table), so several relays
-- can write into one table.
-- event_context is the published text, byte for byte (docs/design.md): query it with JSON
-- functions (JSONExtractString(event_context, 'user', 'id')), or add a typed MATERIALIZED
-- column for a path you filter on often (docs/publishing.md).
CREATE TABLE IF NOT EXISTS {table}{on_cluster}
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
ENGINE = {engine}
PARTITION BY toYYYYMM(event_date_time)
ORDER BY (event_type, event_date_time, event_id)
SETTINGS non_replicated_deduplication_window = 1000;

-- The relay's restart check reads the rows past the slot's confirmed LSN; parts are written in
-- commit order, so a minmax index lets it skip all older parts.
ALTER TABLE {table}{on_cluster} ADD INDEX IF NOT EXISTS commit_lsn_minmax commit_lsn TYPE minmax GRANULARITY 1;

-- Tables made before 0.2 lack the source column; their rows keep '' (one relay wrote them).
ALTER TABLE {table}{on_cluster} ADD COLUMN IF NOT EXISTS source LowCardinality(String) DEFAULT '';

-- Tables made before 0.3 lack the xid column; their rows keep 0 (not known): `verify` proves
-- the events shipped since (docs/guarantees.md, "What `verify` proves").
ALTER TABLE {table}{on_cluster} ADD COLUMN IF NOT EXISTS xid UInt64 DEFAULT 0 AFTER tx_seq;

-- verify reads the rows of transactions its snapshots see or not: a minmax index lets it skip
-- the parts older than the outbox's retention.
ALTER TABLE {table}{on_cluster} ADD INDEX IF NOT EXISTS xid_minmax xid TYPE minmax GRANULARITY 1;

-- Tables made before 0.2 hold event_context as JSON, which loses text (null values, empty
-- objects, dotted keys, big numbers) and refuses some documents. This turns the column into the
-- text (a mutation that rewrites the column of existing parts: their rows read back as ClickHouse
-- rendered them, the exact text of those is gone); on a String column it changes nothing.
ALTER TABLE {table}{on_cluster} MODIFY COLUMN event_context String CODEC(ZSTD(3));
{fence}"#
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

    /// Every name setup derives stays within PostgreSQL's 63 bytes and apart from the others,
    /// whatever the outbox table is called.
    #[test]
    fn derived_names_fit_and_stay_apart() {
        let suffixes = [
            "checkpoints",
            "dead_letters",
            "checkpoints_slot_snapshot_lsn",
            "event_date_time_brin",
            "event_type_check",
            "event_context_check",
            "metadata_version_check",
            "event_date_time_check",
            "coverage_log",
            "coverage_watch",
        ];
        let long_a = "a".repeat(63);
        let long_b = format!("{}b", "a".repeat(62));
        let unicode = "é".repeat(31); // 62 bytes
        for table in ["event_outbox", "Mixed \"Case\"", &long_a, &long_b, &unicode] {
            let names: Vec<String> = suffixes.iter().map(|s| derived_name(table, s)).collect();
            for name in &names {
                assert!(
                    name.len() <= PG_MAX_IDENT,
                    "{name:?} is {} bytes",
                    name.len()
                );
            }
            let distinct: std::collections::HashSet<_> = names.iter().collect();
            assert_eq!(distinct.len(), names.len(), "{names:?}");
        }
        assert_eq!(
            derived_name("event_outbox", "checkpoints"),
            "event_outbox_checkpoints"
        );
        assert_ne!(
            derived_name(&long_a, "checkpoints"),
            derived_name(&long_b, "checkpoints")
        );
    }

    #[test]
    fn quoting() {
        assert_eq!(quote_pg_ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(quote_pg_literal("it's"), "'it''s'");
        assert_eq!(quote_ch_ident("a`b"), "`a\\`b`");
    }
}
