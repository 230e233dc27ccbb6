"""What a test published: the ``outbox_events`` pytest fixture's object (pytest_plugin)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, overload

from django.db import connections

from . import conf, publish
from .ddl import qualified_table


@dataclass(frozen=True)
class PublishedEvent:
    """An event as the outbox holds it: ``context`` is the JSON published, decoded again (a
    Decimal reads back as its string, a datetime as its ISO 8601 text)."""

    event_id: uuid.UUID
    event_type: str
    context: dict[str, Any]
    environment: str
    metadata_version: int
    sentry_trace: str | None


class PublishedEvents(Sequence[PublishedEvent]):
    """The events published since this recorder started, in the order they were published, as
    the outbox holds them now: an event whose transaction or savepoint was rolled back is not
    there (it never existed). Read from the database at each access; no ClickHouse involved."""

    def __init__(self) -> None:
        self._published: list[tuple[str, uuid.UUID]] = []

    def _record(self, alias: str, ids: Sequence[uuid.UUID]) -> None:
        self._published.extend((alias, event_id) for event_id in ids)

    def start(self) -> None:
        publish._listeners.append(self._record)

    def stop(self) -> None:
        if self._record in publish._listeners:
            publish._listeners.remove(self._record)

    def clear(self) -> None:
        """Forgets what was published so far."""
        self._published.clear()

    @property
    def events(self) -> list[PublishedEvent]:
        found: dict[uuid.UUID, PublishedEvent] = {}
        for alias in dict.fromkeys(alias for alias, _ in self._published):
            ids = [str(event_id) for a, event_id in self._published if a == alias]
            table = qualified_table(conf.schema(), conf.table())
            with connections[alias].cursor() as cursor:
                cursor.execute(
                    "SELECT event_id::text, event_type, event_context::text, environment, "
                    f"metadata_version, sentry_trace FROM {table} WHERE event_id = ANY(%s::uuid[])",
                    [ids],
                )
                for event_id, event_type, context, environment, version, trace in cursor:
                    key = uuid.UUID(event_id)
                    found[key] = PublishedEvent(
                        key, event_type, json.loads(context), environment, version, trace
                    )
        return [found[event_id] for _, event_id in self._published if event_id in found]

    @property
    def types(self) -> list[str]:
        """The event types, in the order published."""
        return [event.event_type for event in self.events]

    def of_type(self, event_type: str) -> list[PublishedEvent]:
        return [event for event in self.events if event.event_type == event_type]

    def __len__(self) -> int:
        return len(self.events)

    def __iter__(self) -> Iterator[PublishedEvent]:
        return iter(self.events)

    @overload
    def __getitem__(self, index: int) -> PublishedEvent: ...

    @overload
    def __getitem__(self, index: slice) -> list[PublishedEvent]: ...

    def __getitem__(self, index: int | slice) -> PublishedEvent | list[PublishedEvent]:
        return self.events[index]

    def __repr__(self) -> str:
        return f"<PublishedEvents {self.types!r}>"
