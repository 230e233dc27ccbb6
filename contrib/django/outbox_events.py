"""Publish events to the transactional outbox from Django, without a model.

Copy this file into your project. Call ``publish_event`` inside ``transaction.atomic()``: the event
is committed or rolled back with the business change, and outbox-relay ships it to ClickHouse.

    from django.db import transaction
    from outbox_events import publish_event

    with transaction.atomic():
        order = Order.objects.create(customer=customer, total=total)
        publish_event("order.created", {"order_id": order.pk, "total": str(total)})
"""

from __future__ import annotations

import json
from typing import Any, Mapping, Optional

from django.db import DEFAULT_DB_ALIAS, connections

try:  # The publishing request's trace, when the Sentry SDK is in use.
    from sentry_sdk import get_traceparent
except ImportError:  # pragma: no cover - Sentry is optional
    def get_traceparent() -> Optional[str]:
        return None


def publish_event(
    event_type: str,
    context: Mapping[str, Any],
    *,
    using: str = DEFAULT_DB_ALIAS,
    table: str = "event_outbox",
) -> str:
    """Insert one event into the outbox on the current connection; returns its event_id.

    ``context`` must serialize to a JSON object. The insert joins the surrounding transaction;
    outside ``transaction.atomic()`` (autocommit) the event is committed on its own.
    """
    quoted_table = '"' + table.replace('"', '""') + '"'
    with connections[using].cursor() as cursor:
        cursor.execute(
            f"INSERT INTO {quoted_table} (event_type, event_context, sentry_trace) "
            "VALUES (%s, %s, %s) RETURNING event_id",
            [event_type, json.dumps(context, ensure_ascii=False), get_traceparent()],
        )
        return str(cursor.fetchone()[0])
