"""structlog: the request's bound context (contextvars) travels with the event under one key,
and each publish logs one line with the event id."""

import pytest
from django.db import connection
from django.test.utils import override_settings

from outbox_relay_django import publish_event, publish_events

structlog = pytest.importorskip("structlog")
from structlog.testing import capture_logs  # noqa: E402

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def _clean_contextvars():
    structlog.contextvars.clear_contextvars()
    yield
    structlog.contextvars.clear_contextvars()


def context_text(event_id):
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT event_context::text FROM event_outbox WHERE event_id = %s", [event_id]
        )
        return cursor.fetchone()[0]


class User:
    def __str__(self) -> str:
        return "user:42"


def test_the_bound_context_under_one_key():
    structlog.contextvars.bind_contextvars(request_id="r-1", user=User())
    with override_settings(OUTBOX_STRUCTLOG_KEY="log"):
        event_id = publish_event("t", {"n": 1})
        empty = publish_event("t", {})
    # What Django's encoder cannot encode in the log context becomes its str().
    assert context_text(event_id) == '{"n":1,"log":{"request_id":"r-1","user":"user:42"}}'
    assert context_text(empty) == '{"log":{"request_id":"r-1","user":"user:42"}}'


def test_not_attached_unless_asked():
    structlog.contextvars.bind_contextvars(request_id="r-1")
    assert context_text(publish_event("t", {"n": 1})) == '{"n":1}'


def test_the_key_is_reserved():
    with (
        override_settings(OUTBOX_STRUCTLOG_KEY="log"),
        pytest.raises(ValueError, match="OUTBOX_STRUCTLOG_KEY reserves"),
    ):
        publish_event("t", {"log": 1})


def test_one_log_line_with_the_event_id():
    structlog.contextvars.bind_contextvars(request_id="r-2")
    with capture_logs() as logs:
        event_id = publish_event("order.created", {})
        ids = publish_events([("a", {}), ("b", {})])
    assert logs == [
        {
            "event": "outbox event published",
            "log_level": "info",
            "event_id": str(event_id),
            "event_type": "order.created",
            "database": "default",
            "in_transaction": True,
        },
        {
            "event": "outbox events published",
            "log_level": "info",
            "event_ids": [str(i) for i in ids],
            "event_types": ["a", "b"],
            "count": 2,
            "database": "default",
            "in_transaction": True,
        },
    ]
