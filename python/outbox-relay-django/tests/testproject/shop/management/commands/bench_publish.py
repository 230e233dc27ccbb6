"""The cost of publishing (docs/publishing.md, "Cost"): microseconds per publish_event, per event
with publish_events, and per bare INSERT of the same event through the same connection, each
inside one transaction that is rolled back (so commits, which cost the same either way, are not
counted). The rounds alternate between the ways, and each way's median round is reported.
With structlog installed, the log line is rendered as JSON (a production configuration) into
/dev/null, and measured once more with INFO filtered out."""

import datetime
import json
import logging
import os
import statistics
import time
import uuid
from collections.abc import Callable
from decimal import Decimal
from typing import Any

from django.core.management.base import BaseCommand, CommandParser
from django.db import connection, transaction

from outbox_relay_django import publish, publish_event, publish_events

try:
    import structlog
except ImportError:
    structlog = None


class Rollback(Exception):
    pass


class StubCursor:
    def __enter__(self) -> "StubCursor":
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def execute(self, sql: str, params: list[Any]) -> None:
        pass


class StubConnection:
    vendor = "postgresql"
    in_atomic_block = True

    def cursor(self) -> StubCursor:
        return StubCursor()


def context(n: int) -> dict[str, Any]:
    return {
        "order_id": n,
        "customer": "Zoë",
        "total": Decimal("12.50"),
        "at": datetime.datetime(2024, 2, 29, 12, 0, tzinfo=datetime.timezone.utc),
        "items": [{"sku": "A-1", "qty": 2}],
    }


class Command(BaseCommand):
    help = "Measures publish_event, publish_events and a bare INSERT (microseconds per event)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--events", type=int, default=2000)
        parser.add_argument("--rounds", type=int, default=5)

    def handle(self, *args: Any, events: int, rounds: int, **options: Any) -> None:
        texts = [json.dumps(context(n), default=str) for n in range(events)]

        def bare() -> None:
            # publish_event's statement, with the JSON text made beforehand.
            for text in texts:
                with connection.cursor() as cursor:
                    cursor.execute(
                        'INSERT INTO "public"."event_outbox" (event_id, event_type, '
                        "event_context, sentry_trace) VALUES (%s, %s, %s, %s)",
                        [uuid.uuid4(), "bench", text, None],
                    )

        def one_by_one() -> None:
            for n in range(events):
                publish_event("bench", context(n))

        def batch() -> None:
            publish_events([("bench", context(n)) for n in range(events)])

        def without_database() -> None:
            # publish_event's own work: the database connection replaced by a stub.
            real = publish.connections
            publish.connections = {"default": StubConnection()}  # type: ignore[assignment]
            try:
                one_by_one()
            finally:
                publish.connections = real

        ways: list[tuple[str, Callable[[], None], int]] = [
            ("bare INSERT, same statement", bare, logging.INFO),
            ("publish_event", one_by_one, logging.INFO),
            ("publish_events, one call", batch, logging.INFO),
            ("publish_event, no database (stub cursor)", without_database, logging.INFO),
        ]
        if structlog is not None:
            ways.insert(2, ("publish_event, INFO filtered out", one_by_one, logging.WARNING))
        times: dict[str, list[float]] = {name: [] for name, _, _ in ways}
        devnull = open(os.devnull, "w")  # noqa: SIM115
        for _ in range(rounds):
            for name, work, level in ways:
                if structlog is not None:
                    structlog.configure(
                        processors=[
                            structlog.contextvars.merge_contextvars,
                            structlog.processors.add_log_level,
                            structlog.processors.TimeStamper(fmt="iso"),
                            structlog.processors.JSONRenderer(),
                        ],
                        wrapper_class=structlog.make_filtering_bound_logger(level),
                        logger_factory=structlog.PrintLoggerFactory(devnull),
                        cache_logger_on_first_use=False,
                    )
                try:
                    with transaction.atomic():
                        started = time.perf_counter()
                        work()
                        times[name].append(time.perf_counter() - started)
                        raise Rollback
                except Rollback:
                    pass
        driver = connection.Database.__name__
        logs = "structlog JSON" if structlog is not None else "no structlog"
        self.stdout.write(f"{events} events x {rounds} rounds, {driver}, {logs}; per event:")
        for name, _, _ in ways:
            micros = statistics.median(times[name]) / events * 1e6
            self.stdout.write(f"  {name:42} {micros:8.1f} us")
