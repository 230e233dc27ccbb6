"""The outbox table's DDL, as ``outbox-relay setup`` applies it (``migrations/postgres/`` in the
outbox-relay repository, rendered by ``crates/relay/src/store/schema.rs``): the same columns,
types, defaults, constraints (with the same names) and BRIN index. The repository's tests create
the table both ways and compare PostgreSQL's catalogs, so the two cannot drift apart.

Only the table and its index: the publication, the relay's checkpoint, dead-letter and coverage
tables, the slot and ClickHouse stay ``outbox-relay setup``'s job. Every statement is idempotent
(``IF NOT EXISTS``), so the migration and ``setup`` work in either order.
"""

from __future__ import annotations

from typing import Any

from django.db import NotSupportedError, router
from django.db.backends.base.schema import BaseDatabaseSchemaEditor
from django.db.migrations.operations.base import Operation
from django.db.migrations.state import ProjectState

from . import conf

#: PostgreSQL's longest identifier (NAMEDATALEN - 1 bytes).
PG_MAX_IDENT = 63


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def quote_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _fnv1a(data: bytes) -> int:
    h = 0xCBF29CE484222325
    for byte in data:
        h = ((h ^ byte) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def derived_name(outbox_table: str, suffix: str) -> str:
    """``<outbox>_<suffix>`` within 63 bytes, as the relay derives it: a name too long is cut
    (at a character boundary) and tagged with a hash of the whole outbox name."""
    plain = f"{outbox_table}_{suffix}"
    if len(plain.encode()) <= PG_MAX_IDENT:
        return plain
    raw = outbox_table.encode()
    h = _fnv1a(raw)
    tag = f"{(h ^ (h >> 32)) & 0xFFFFFFFF:08x}"
    cut = min(max(PG_MAX_IDENT - (len(suffix) + len(tag) + 2), 0), len(raw))
    while cut < len(raw) and (raw[cut] & 0xC0) == 0x80:
        cut -= 1
    return f"{raw[:cut].decode()}_{tag}_{suffix}"


def qualified_table(schema: str, table: str) -> str:
    return f"{quote_ident(schema)}.{quote_ident(table)}"


def outbox_ddl(schema: str = "public", table: str = "event_outbox") -> str:
    """The outbox table and its BRIN index, idempotent."""
    qualified = qualified_table(schema, table)
    dollar = next(
        tag
        for tag in ["$$", *(f"$relay{n}$" for n in range(100))]
        if tag not in schema and tag not in table
    )

    def check(what: str) -> str:
        return quote_ident(derived_name(table, f"{what}_check"))

    index = quote_ident(derived_name(table, "event_date_time_brin"))
    return f"""\
DO {dollar}
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = {quote_literal(schema)}) THEN
        CREATE SCHEMA {quote_ident(schema)};
    END IF;
END
{dollar};
CREATE TABLE IF NOT EXISTS {qualified} (
    event_id         uuid        NOT NULL DEFAULT gen_random_uuid() PRIMARY KEY,
    event_type       text        NOT NULL,
    event_date_time  timestamptz NOT NULL DEFAULT clock_timestamp(),
    environment      text        NOT NULL DEFAULT 'production',
    event_context    json        NOT NULL,
    metadata_version bigint      NOT NULL DEFAULT 1,
    sentry_trace     text,
    CONSTRAINT {check("event_type")} CHECK (event_type <> ''),
    CONSTRAINT {check("event_context")} CHECK (json_typeof(event_context) = 'object'),
    CONSTRAINT {check("metadata_version")} CHECK (metadata_version >= 0),
    CONSTRAINT {check("event_date_time")}
        CHECK (event_date_time >= '1900-01-01 00:00:00+00' AND event_date_time < '2300-01-01 00:00:00+00')
);
ALTER TABLE {qualified} ADD COLUMN IF NOT EXISTS sentry_trace text;
CREATE INDEX IF NOT EXISTS {index} ON {qualified} USING brin (event_date_time);
"""


class CreateOutboxTable(Operation):
    """Creates the outbox table named by ``OUTBOX_SCHEMA`` / ``OUTBOX_TABLE`` (read when the
    migration runs), unless it exists. Unapplying it leaves the table alone: it may hold events
    the relay has not shipped yet (drop it by hand once it is no longer streamed)."""

    reduces_to_sql = True
    reversible = True

    def state_forwards(self, app_label: str, state: ProjectState) -> None:
        """No model: events are published with ``publish_event``, not through the ORM."""

    def database_forwards(
        self,
        app_label: str,
        schema_editor: BaseDatabaseSchemaEditor,
        from_state: ProjectState,
        to_state: ProjectState,
    ) -> None:
        connection = schema_editor.connection
        if not router.allow_migrate(connection.alias, app_label):
            return
        if connection.vendor != "postgresql":
            raise NotSupportedError(
                f"the outbox needs PostgreSQL; database {connection.alias!r} is "
                f"{connection.vendor} (route outbox_relay's migrations elsewhere with a router)"
            )
        schema_editor.execute(outbox_ddl(conf.schema(), conf.table()), params=None)

    def database_backwards(
        self,
        app_label: str,
        schema_editor: BaseDatabaseSchemaEditor,
        from_state: ProjectState,
        to_state: ProjectState,
    ) -> None:
        """Leaves the table: it may hold events not shipped yet."""

    def describe(self) -> str:
        return "Create the outbox table (if it does not exist)"

    def deconstruct(self) -> tuple[str, list[Any], dict[str, Any]]:
        return (self.__class__.__qualname__, [], {})
