"""Publishes the end-to-end scenario (tests/e2e/django.rs in the repository) into the database
the relay streams, and writes a manifest: the events that must reach ClickHouse, each with the
exact event_context text expected there (written out by hand, not by the encoder), and the ids of
the events that were rolled back and must never arrive."""

import datetime
import json
import uuid
from decimal import Decimal
from typing import Any

from django.core.management.base import BaseCommand, CommandParser
from django.db import transaction
from django.test import override_settings
from django.utils.translation import gettext_lazy

from outbox_relay_django import publish_event, publish_events
from testproject.shop.models import Order

try:
    import structlog
except ImportError:
    structlog = None

try:
    import sentry_sdk
    from sentry_sdk.transport import Transport
except ImportError:
    sentry_sdk = None


TYPED_CONTEXT: dict[str, Any] = {
    "decimal": Decimal("12.50"),
    "datetime": datetime.datetime(2024, 2, 29, 23, 59, 58, 123456, tzinfo=datetime.timezone.utc),
    "naive_datetime": datetime.datetime(2024, 1, 2, 3, 4, 5),
    "date": datetime.date(2024, 2, 29),
    "time": datetime.time(13, 14, 15, 500000),
    "timedelta": datetime.timedelta(days=1, hours=2, seconds=3),
    "uuid": uuid.UUID("12345678-1234-5678-1234-567812345678"),
    "lazy": gettext_lazy("Order"),
    "items": [{"sku": "A-1", "price": Decimal("0.10"), "qty": 3}, ("tuple", None, True)],
    "text": 'Zoë "quoted" \\ \n 😀',
    "big": 2**70,
    "float": 1.5,
}
TYPED_TEXT = (
    '{"decimal":"12.50","datetime":"2024-02-29T23:59:58.123Z",'
    '"naive_datetime":"2024-01-02T03:04:05","date":"2024-02-29","time":"13:14:15.500",'
    '"timedelta":"P1DT02H00M03S","uuid":"12345678-1234-5678-1234-567812345678",'
    '"lazy":"Order","items":[{"sku":"A-1","price":"0.10","qty":3},["tuple",null,true]],'
    '"text":"Zoë \\"quoted\\" \\\\ \\n 😀","big":1180591620717411303424,"float":1.5}'
)


class Failed(Exception):
    pass


class Command(BaseCommand):
    help = "Publishes the end-to-end scenario and writes its manifest (JSON) to --manifest."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--manifest", required=True)

    def handle(self, *args: Any, manifest: str, **options: Any) -> None:
        committed: list[dict[str, Any]] = []
        rolled_back: list[str] = []

        def expect(event_id: uuid.UUID, event_type: str, text: str, **extra: Any) -> None:
            row = {"event_id": str(event_id), "event_type": event_type, "context": text}
            row.update({"environment": "staging", "metadata_version": 3, "trace_id": ""})
            row.update(extra)
            committed.append(row)

        # Autocommit: committed on its own.
        expect(publish_event("e2e.autocommit", {"n": 1}), "e2e.autocommit", '{"n":1}')

        # With the business change.
        with transaction.atomic():
            order = Order.objects.create(customer="Zoë", total=Decimal("12.50"))
            event_id = publish_event("e2e.committed", {"order_id": order.pk, "total": order.total})
        expect(event_id, "e2e.committed", f'{{"order_id":{order.pk},"total":"12.50"}}')

        # Rolled back whole.
        try:
            with transaction.atomic():
                rolled_back.append(str(publish_event("e2e.rolled_back", {"n": 2})))
                rolled_back += map(str, publish_events([("e2e.rolled_back", {"n": 3})] * 2))
                raise Failed
        except Failed:
            pass

        # A rolled-back savepoint inside a committed block.
        with transaction.atomic():
            outer = publish_event("e2e.outer", {"n": 4})
            try:
                with transaction.atomic():
                    rolled_back.append(str(publish_event("e2e.savepoint", {"n": 5})))
                    raise Failed
            except Failed:
                pass
            after = publish_event("e2e.after_savepoint", {"n": 6})
        expect(outer, "e2e.outer", '{"n":4}')
        expect(after, "e2e.after_savepoint", '{"n":6}')

        # Every type Django's encoder knows, and settings given per call.
        typed = publish_event("e2e.typed", TYPED_CONTEXT, environment="canary", metadata_version=7)
        expect(typed, "e2e.typed", TYPED_TEXT, environment="canary", metadata_version=7)

        # Many in one INSERT, in a transaction.
        with transaction.atomic():
            batch = publish_events([("e2e.batch", {"i": i}) for i in range(3)])
        for i, event_id in enumerate(batch):
            expect(event_id, "e2e.batch", f'{{"i":{i}}}')

        log_line_event_id = None
        if structlog is not None:
            # The request's bound context travels with the event, and the log line names it.
            structlog.contextvars.bind_contextvars(request_id="req-e2e-1", user_id=42)
            with override_settings(OUTBOX_STRUCTLOG_KEY="log"):
                event_id = publish_event("e2e.structlog", {"n": 7})
            structlog.contextvars.clear_contextvars()
            text = '{"n":7,"log":{"request_id":"req-e2e-1","user_id":42}}'
            expect(event_id, "e2e.structlog", text)
            log_line_event_id = str(event_id)

        if sentry_sdk is not None:

            class Discard(Transport):
                def capture_envelope(self, envelope: Any) -> None:
                    pass

            sentry_sdk.init(
                dsn="http://public@127.0.0.1:9/1", transport=Discard, traces_sample_rate=1.0
            )
            with sentry_sdk.start_transaction(name="e2e") as span:
                event_id = publish_event("e2e.sentry", {"n": 8})
            expect(event_id, "e2e.sentry", '{"n":8}', trace_id=span.trace_id)

        with open(manifest, "w") as out:
            json.dump(
                {
                    "committed": committed,
                    "rolled_back": rolled_back,
                    "log_line_event_id": log_line_event_id,
                },
                out,
            )
