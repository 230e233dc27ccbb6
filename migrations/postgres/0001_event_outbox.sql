-- The transactional outbox. Publish an event inside the application's own transaction:
--   INSERT INTO "public"."event_outbox" (event_type, event_context) VALUES ($1, $2);
-- Column choices (docs/design.md): event_context is json, not jsonb, so the exact text that was
-- published (key order, spacing, duplicate keys, number spelling) is what ClickHouse receives.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = 'public') THEN
        CREATE SCHEMA "public";
    END IF;
END
$$;
CREATE TABLE IF NOT EXISTS "public"."event_outbox" (
    event_id         uuid        NOT NULL DEFAULT gen_random_uuid() PRIMARY KEY,
    event_type       text        NOT NULL,
    event_date_time  timestamptz NOT NULL DEFAULT clock_timestamp(),
    environment      text        NOT NULL DEFAULT 'production',
    event_context    json        NOT NULL,
    metadata_version bigint      NOT NULL DEFAULT 1,
    sentry_trace     text,
    CONSTRAINT "event_outbox_event_type_check" CHECK (event_type <> ''),
    CONSTRAINT "event_outbox_event_context_check" CHECK (json_typeof(event_context) = 'object'),
    CONSTRAINT "event_outbox_metadata_version_check" CHECK (metadata_version >= 0),
    CONSTRAINT "event_outbox_event_date_time_check"
        CHECK (event_date_time >= '1900-01-01 00:00:00+00' AND event_date_time < '2300-01-01 00:00:00+00')
);

-- Optional: the publisher's trace (sentry_sdk.get_traceparent(), or a W3C traceparent), so a
-- ClickHouse row (trace_id) and the relay's Sentry transaction lead back to the request.
ALTER TABLE "public"."event_outbox" ADD COLUMN IF NOT EXISTS sentry_trace text;

-- The environment default follows the relay's `environment` setting.
ALTER TABLE "public"."event_outbox" ALTER COLUMN environment SET DEFAULT 'production';

-- Rows are deleted by the relay once their transaction committed more than
-- `outbox_retention_hours` ago (known from the relay's checkpoints, never from event_date_time,
-- which the publisher sets). The BRIN index serves queries by event time.
CREATE INDEX IF NOT EXISTS "event_outbox_event_date_time_brin" ON "public"."event_outbox" USING brin (event_date_time);

-- Only inserts are published: the relay's purge deletes never travel.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = 'event_outbox_pub') THEN
        CREATE PUBLICATION "event_outbox_pub" FOR TABLE "public"."event_outbox" WITH (publish = 'insert');
    END IF;
END
$$;

-- The relay's checkpoints, one row per batch ClickHouse accepted (docs/operations.md). snapshot
-- is a PostgreSQL snapshot taken before WAL position snapshot_lsn: a transaction it does not
-- see committed after snapshot_lsn, which is how `outbox-relay replay` finds what to re-ship.
-- Kept as long as the outbox rows (`outbox_retention_hours`); the newest row is always kept.
CREATE TABLE IF NOT EXISTS "public"."event_outbox_checkpoints" (
    slot          text        NOT NULL,
    confirmed_lsn pg_lsn      NOT NULL,
    rows          bigint      NOT NULL,
    recorded_at   timestamptz NOT NULL DEFAULT now(),
    snapshot      pg_snapshot NOT NULL,
    snapshot_lsn  pg_lsn      NOT NULL
);
CREATE INDEX IF NOT EXISTS "event_outbox_checkpoints_slot_snapshot_lsn" ON "public"."event_outbox_checkpoints" (slot, snapshot_lsn);
-- Which publication and table the batch was streamed under (their oids): a later session that
-- finds another (the publication dropped and created again, the table swapped) knows the WAL in
-- between may have been skipped by PostgreSQL and re-ships that window from the outbox.
ALTER TABLE "public"."event_outbox_checkpoints" ADD COLUMN IF NOT EXISTS coverage text;

-- Events ClickHouse refused on their own (a value its column cannot hold), with its error; the
-- rest of their batch shipped. `outbox-relay dead-letters list|retry|purge` manages them; fix a
-- row with UPDATE before `retry`. event_context is the published text, byte for byte.
CREATE TABLE IF NOT EXISTS "public"."event_outbox_dead_letters" (
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
ALTER TABLE "public"."event_outbox_dead_letters" ADD COLUMN IF NOT EXISTS raw jsonb;
-- A retried letter is kept, marked shipped, until the outbox purge: the stream, read again after
-- a restart, then never makes it a dead letter anew.
ALTER TABLE "public"."event_outbox_dead_letters" ADD COLUMN IF NOT EXISTS shipped_at timestamptz;
ALTER TABLE "public"."event_outbox_dead_letters" ALTER COLUMN event_type DROP NOT NULL,
    ALTER COLUMN event_date_time DROP NOT NULL, ALTER COLUMN environment DROP NOT NULL,
    ALTER COLUMN event_context DROP NOT NULL, ALTER COLUMN metadata_version DROP NOT NULL;

-- The coverage watch (docs/guarantees.md): an event trigger logs every change of the
-- publication's coverage of the outbox table (publication, table, membership, publish =
-- 'insert'), with the table that had the outbox's name, in the DDL's own transaction. The relay
-- compares the log's newest id with the one its checkpoints were recorded under, so even a table
-- swapped in and out again between two of its checks is seen and re-shipped from. Event
-- triggers need a superuser (or a managed service's equivalent, such as rds_superuser): without
-- one the watch is not installed (setup says so) and the relay relies on its checks every 5 s.
CREATE TABLE IF NOT EXISTS "public"."event_outbox_coverage_log" (
    id          bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    coverage    text        NOT NULL,
    table_oid   oid,
    recorded_at timestamptz NOT NULL DEFAULT now()
);
GRANT SELECT ON "public"."event_outbox_coverage_log" TO PUBLIC;
DO $$
BEGIN
    BEGIN
        CREATE OR REPLACE FUNCTION "public"."event_outbox_coverage_watch"() RETURNS event_trigger
            LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $watch0$
        DECLARE
            now_coverage text := coalesce((SELECT p.oid::text || '/' || c.oid::text || '/' || coalesce(
                     (SELECT r.oid::text FROM pg_publication_rel r
                       WHERE r.prpubid = p.oid AND r.prrelid = c.oid),
                     (SELECT pn.oid::text FROM pg_publication_namespace pn
                       WHERE pn.pnpubid = p.oid AND pn.pnnspid = c.relnamespace),
                     CASE WHEN p.puballtables THEN 'all' END)
                     || CASE WHEN EXISTS (SELECT 1 FROM pg_publication_rel r
                                           WHERE r.prpubid = p.oid AND r.prrelid = c.oid
                                             AND r.prqual IS NOT NULL) THEN '/filtered' ELSE '' END
                     FROM pg_publication p, pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                    WHERE p.pubname = 'event_outbox_pub' AND n.nspname = 'public'
                      AND c.relname = 'event_outbox' AND p.pubinsert), 'none');
            now_table oid := (SELECT c.oid FROM pg_class c
                                JOIN pg_namespace n ON n.oid = c.relnamespace
                               WHERE n.nspname = 'public' AND c.relname = 'event_outbox');
            last_coverage text;
            last_table oid;
        BEGIN
            SELECT coverage, table_oid INTO last_coverage, last_table
              FROM "public"."event_outbox_coverage_log" ORDER BY id DESC LIMIT 1;
            IF NOT FOUND OR now_coverage IS DISTINCT FROM last_coverage
               OR now_table IS DISTINCT FROM last_table THEN
                INSERT INTO "public"."event_outbox_coverage_log" (coverage, table_oid) VALUES (now_coverage, now_table);
            END IF;
        EXCEPTION WHEN OTHERS THEN
            RAISE WARNING 'outbox-relay coverage watch: %', SQLERRM;
        END
        $watch0$;
        IF NOT EXISTS (SELECT 1 FROM pg_event_trigger WHERE evtname = 'public_event_outbox_coverage_watch') THEN
            CREATE EVENT TRIGGER "public_event_outbox_coverage_watch" ON ddl_command_end
                WHEN TAG IN ('CREATE TABLE', 'CREATE TABLE AS', 'SELECT INTO', 'ALTER TABLE',
                             'DROP TABLE', 'CREATE PUBLICATION', 'ALTER PUBLICATION',
                             'DROP PUBLICATION', 'CREATE SCHEMA', 'ALTER SCHEMA', 'DROP SCHEMA')
                EXECUTE FUNCTION "public"."event_outbox_coverage_watch"();
        END IF;
        -- The coverage now, so that the log's newest row is always the current one.
        INSERT INTO "public"."event_outbox_coverage_log" (coverage, table_oid)
        SELECT w.coverage, w.table_oid
          FROM (SELECT coalesce((SELECT p.oid::text || '/' || c.oid::text || '/' || coalesce(
                     (SELECT r.oid::text FROM pg_publication_rel r
                       WHERE r.prpubid = p.oid AND r.prrelid = c.oid),
                     (SELECT pn.oid::text FROM pg_publication_namespace pn
                       WHERE pn.pnpubid = p.oid AND pn.pnnspid = c.relnamespace),
                     CASE WHEN p.puballtables THEN 'all' END)
                     || CASE WHEN EXISTS (SELECT 1 FROM pg_publication_rel r
                                           WHERE r.prpubid = p.oid AND r.prrelid = c.oid
                                             AND r.prqual IS NOT NULL) THEN '/filtered' ELSE '' END
                     FROM pg_publication p, pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                    WHERE p.pubname = 'event_outbox_pub' AND n.nspname = 'public'
                      AND c.relname = 'event_outbox' AND p.pubinsert), 'none') AS coverage,
                       (SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                         WHERE n.nspname = 'public' AND c.relname = 'event_outbox') AS table_oid) w
         WHERE NOT EXISTS (SELECT 1 FROM (SELECT coverage, table_oid FROM "public"."event_outbox_coverage_log"
                                           ORDER BY id DESC LIMIT 1) l
                            WHERE l.coverage = w.coverage
                              AND l.table_oid IS NOT DISTINCT FROM w.table_oid);
    EXCEPTION WHEN insufficient_privilege THEN
        RAISE WARNING 'the coverage watch (an event trigger) needs a superuser and was not installed: a table swapped in as the outbox and out again between two of the relay''s checks (5 s) would not be seen (docs/guarantees.md)';
    END;
END
$$;
