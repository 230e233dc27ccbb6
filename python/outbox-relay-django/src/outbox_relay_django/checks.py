"""``manage.py check``: the outbox table and the columns publishing needs are there; with
``--deploy``, also that a publication covers it (``outbox-relay setup`` ran)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from django.apps import AppConfig
from django.core.checks import CheckMessage, Error, Warning
from django.db import DatabaseError, connections
from django.db.migrations.recorder import MigrationRecorder

from . import conf
from .ddl import qualified_table

#: The outbox's columns and their types (``format_type``), as ``outbox-relay setup`` makes them.
COLUMNS = {
    "event_id": "uuid",
    "event_type": "text",
    "event_date_time": "timestamp with time zone",
    "environment": "text",
    "event_context": "json",
    "metadata_version": "bigint",
    "sentry_trace": "text",
}

APP_LABEL = "outbox_relay"
MIGRATION = "0001_event_outbox"


def check_outbox_table(
    app_configs: Sequence[AppConfig] | None = None,
    databases: Iterable[str] | None = None,
    **kwargs: Any,
) -> list[CheckMessage]:
    """Runs on ``manage.py check`` (and ``migrate``, ``runserver``, Django's test runner) against
    the outbox database. Before the migration ran the table may not exist yet: a warning then,
    so that ``migrate`` itself is not stopped; once it ran, a missing table is an error."""
    if app_configs is not None and not any(c.label == APP_LABEL for c in app_configs):
        return []
    alias = conf.database()
    if databases is not None and alias not in databases:
        return []
    connection = connections[alias]
    table = qualified_table(conf.schema(), conf.table())
    if connection.vendor != "postgresql":
        return [
            Error(
                f"the outbox needs PostgreSQL; database {alias!r} is {connection.vendor}",
                hint="set OUTBOX_DATABASE to the alias of the PostgreSQL database",
                id="outbox_relay.E004",
            )
        ]
    try:
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT a.attname, format_type(a.atttypid, a.atttypmod) FROM pg_attribute a "
                "WHERE a.attrelid = to_regclass(%s) AND a.attnum > 0 AND NOT a.attisdropped",
                [table],
            )
            found = dict(cursor.fetchall())
            migrated = (APP_LABEL, MIGRATION) in MigrationRecorder(connection).applied_migrations()
    except DatabaseError as exc:
        return [
            Warning(
                f"could not check the outbox table {table} in database {alias!r}: {exc}",
                id="outbox_relay.W001",
            )
        ]
    if not found:
        message = f"the outbox table {table} does not exist in database {alias!r}"
        hint = "run `manage.py migrate outbox_relay` (or `outbox-relay setup`)"
        if migrated:
            return [Error(message, hint=hint, id="outbox_relay.E001")]
        return [Warning(message, hint=hint, id="outbox_relay.W002")]
    messages: list[CheckMessage] = []
    missing = [name for name in COLUMNS if name not in found]
    if missing:
        messages.append(
            Error(
                f"the outbox table {table} lacks the column(s) {', '.join(missing)}",
                hint="run `outbox-relay setup` (it adds the columns of its version)",
                id="outbox_relay.E002",
            )
        )
    for name, expected in COLUMNS.items():
        if name in found and found[name] != expected:
            messages.append(
                Error(
                    f"the outbox column {name} is {found[name]}, not {expected}",
                    hint="the outbox's columns are those of `outbox-relay setup --print-sql`",
                    id="outbox_relay.E003",
                )
            )
    return messages


def check_outbox_published(
    app_configs: Sequence[AppConfig] | None = None,
    databases: Iterable[str] | None = None,
    **kwargs: Any,
) -> list[CheckMessage]:
    """``manage.py check --deploy``: a publication covers the outbox table. Without one,
    ``outbox-relay setup`` has not run against this database, no slot streams the outbox, and
    events published now are never shipped."""
    if app_configs is not None and not any(c.label == APP_LABEL for c in app_configs):
        return []
    alias = conf.database()
    if databases is not None and alias not in databases:
        return []
    connection = connections[alias]
    if connection.vendor != "postgresql":
        return []  # check_outbox_table says so
    table = qualified_table(conf.schema(), conf.table())
    try:
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT to_regclass(%s) IS NOT NULL, EXISTS (SELECT 1 FROM pg_publication_tables "
                "WHERE schemaname = %s AND tablename = %s)",
                [table, conf.schema(), conf.table()],
            )
            exists, published = cursor.fetchone()
    except DatabaseError:
        return []  # check_outbox_table says so
    if not exists or published:
        return []
    return [
        Warning(
            f"no publication covers the outbox table {table} in database {alias!r}: "
            "`outbox-relay setup` has not run there, and events published now are never shipped",
            hint="run `outbox-relay setup` before the application publishes (docs/publishing.md)",
            id="outbox_relay.W003",
        )
    ]
