"""``publish_event`` and ``publish_events``: INSERTs into the outbox on the current connection,
so an event joins the surrounding ``transaction.atomic()`` block (in autocommit, it is committed
on its own)."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from django.db import NotSupportedError, connections

from . import conf
from .ddl import qualified_table
from .encoding import check_text, encode_context, encode_log_context

try:
    import structlog
    from structlog.contextvars import get_contextvars
except ImportError:  # structlog is optional
    structlog = None  # type: ignore[assignment]

    def get_contextvars() -> dict[str, Any]:
        return {}


try:
    import sentry_sdk
except ImportError:  # the Sentry SDK is optional
    sentry_sdk = None  # type: ignore[assignment]

__all__ = ["publish_event", "publish_events"]

#: Events per INSERT statement in ``publish_events`` (well within PostgreSQL's 65,535
#: parameters when a driver binds them on the server).
ROWS_PER_INSERT = 5000

# Who is told of published event ids: the pytest fixture (outbox_relay_django.testing).
Listener = Callable[[str, Sequence[uuid.UUID]], None]
_listeners: list[Listener] = []

_stdlib_log = logging.getLogger("outbox_relay_django")
_structlog_log: Any = structlog.get_logger("outbox_relay_django") if structlog else None


def publish_event(
    event_type: str,
    context: Mapping[str, Any],
    *,
    environment: str | None = None,
    metadata_version: int | None = None,
    using: str | None = None,
) -> uuid.UUID:
    """Publishes one event into the outbox on database ``using``; returns its event id.

    ``context`` becomes the event's ``event_context`` (a JSON object) through Django's JSON
    encoder. ``environment``, ``metadata_version`` and ``using`` default to the settings
    ``OUTBOX_ENVIRONMENT``, ``OUTBOX_METADATA_VERSION`` and ``OUTBOX_DATABASE`` (Django settings,
    else environment variables); without them the columns' defaults apply. The INSERT joins the
    current transaction: the event is committed or rolled back with it.

    Raises TypeError or ValueError, before any SQL is sent, for what PostgreSQL would refuse:
    a context that cannot be encoded (naming its path), an empty event_type, NUL characters.
    """
    return _publish([(event_type, context)], environment, metadata_version, using)[0]


def publish_events(
    events: Iterable[tuple[str, Mapping[str, Any]]],
    *,
    environment: str | None = None,
    metadata_version: int | None = None,
    using: str | None = None,
) -> list[uuid.UUID]:
    """Publishes ``(event_type, context)`` pairs in one INSERT (one per 5,000 events); returns
    their event ids in order. All or none: an event that cannot be encoded fails the call before
    any SQL is sent. Otherwise as :func:`publish_event`."""
    return _publish(list(events), environment, metadata_version, using)


def _publish(
    events: list[tuple[str, Mapping[str, Any]]],
    environment: str | None,
    metadata_version: int | None,
    using: str | None,
) -> list[uuid.UUID]:
    alias = using if using is not None else conf.database()
    if environment is None:
        environment = conf.text_setting(conf.ENVIRONMENT)
    if environment is not None:
        if not isinstance(environment, str):
            raise TypeError(f"environment must be a str, not {type(environment).__name__}")
        check_text(environment, "environment")
    if metadata_version is None:
        metadata_version = conf.int_setting(conf.METADATA_VERSION)
    if metadata_version is not None and (
        not isinstance(metadata_version, int)
        or isinstance(metadata_version, bool)
        or not 0 <= metadata_version <= conf.BIGINT_MAX
    ):
        raise ValueError(
            f"metadata_version must be an int from 0 to 2**63-1, not {metadata_version!r}"
        )
    log_key = conf.text_setting(conf.STRUCTLOG_KEY)
    log_member = None
    if log_key:
        # structlog's bound context, spliced into each context's text under log_key.
        log_member = (
            encode_context({log_key: None})[1:-5]
            + encode_log_context(get_contextvars(), f"structlog context ({log_key})")
            + "}"
        )
    trace = _traceparent()

    columns = ["event_id", "event_type", "event_context", "sentry_trace"]
    fixed: list[Any] = [trace]
    if environment is not None:
        columns.append("environment")
        fixed.append(environment)
    if metadata_version is not None:
        columns.append("metadata_version")
        fixed.append(metadata_version)

    ids: list[uuid.UUID] = []
    rows: list[list[Any]] = []
    for position, (event_type, context) in enumerate(events):
        name = "context" if len(events) == 1 else f"events[{position}] context"
        _check_event_type(event_type, name)
        text = encode_context(context, name)
        if log_member is not None:
            if log_key in context:
                raise ValueError(
                    f"{name} has the key {log_key!r}, which OUTBOX_STRUCTLOG_KEY reserves for "
                    "structlog's bound context"
                )
            text = text[:-1] + ("," if len(text) > 2 else "") + log_member
        event_id = uuid.uuid4()
        ids.append(event_id)
        rows.append([event_id, event_type, text, *fixed])
    if not rows:
        return ids

    connection = connections[alias]
    if connection.vendor != "postgresql":
        raise NotSupportedError(
            f"the outbox needs PostgreSQL; database {alias!r} is {connection.vendor}"
        )
    table = qualified_table(conf.schema(), conf.table())
    placeholders = "(" + ", ".join(["%s"] * len(columns)) + ")"
    with connection.cursor() as cursor:
        for start in range(0, len(rows), ROWS_PER_INSERT):
            chunk = rows[start : start + ROWS_PER_INSERT]
            cursor.execute(
                f"INSERT INTO {table} ({', '.join(columns)}) VALUES "
                + ", ".join([placeholders] * len(chunk)),
                [value for row in chunk for value in row],
            )
    _log_published(alias, events, ids, in_transaction=connection.in_atomic_block)
    for listener in list(_listeners):
        listener(alias, ids)
    return ids


def _check_event_type(event_type: object, name: str) -> None:
    if not isinstance(event_type, str):
        raise TypeError(f"event_type must be a str, not {type(event_type).__name__} ({name})")
    if not event_type:
        raise ValueError(f"event_type must not be empty ({name})")
    check_text(event_type, f"event_type {event_type!r}")


def _traceparent() -> str | None:
    """The current Sentry trace (``sentry-trace`` header value), when the SDK is in use."""
    if sentry_sdk is None or not sentry_sdk.get_client().is_active():
        return None
    return sentry_sdk.get_traceparent()


def _log_published(
    alias: str,
    events: list[tuple[str, Mapping[str, Any]]],
    ids: list[uuid.UUID],
    *,
    in_transaction: bool,
) -> None:
    """One structured line per call: the event id(s), so a log line leads to its events."""
    if len(ids) == 1:
        fields: dict[str, Any] = {"event_id": str(ids[0]), "event_type": events[0][0]}
        message = "outbox event published"
    else:
        fields = {
            "event_ids": [str(i) for i in ids],
            "event_types": sorted({event_type for event_type, _ in events}),
            "count": len(ids),
        }
        message = "outbox events published"
    fields["database"] = alias
    fields["in_transaction"] = in_transaction
    if _structlog_log is not None:
        _structlog_log.info(message, **fields)
    elif _stdlib_log.isEnabledFor(logging.INFO):
        _stdlib_log.info("%s: %s", message, fields, extra={"outbox": fields})
