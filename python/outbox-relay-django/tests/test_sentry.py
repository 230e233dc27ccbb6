"""The Sentry trace of the publishing request, when the SDK is in use."""

import pytest
from django.db import connection

from outbox_relay_django import publish_event

sentry_sdk = pytest.importorskip("sentry_sdk")
from sentry_sdk.transport import Transport  # noqa: E402

pytestmark = pytest.mark.django_db


class Discard(Transport):
    def capture_envelope(self, envelope):
        pass


def sentry_trace(event_id):
    with connection.cursor() as cursor:
        cursor.execute("SELECT sentry_trace FROM event_outbox WHERE event_id = %s", [event_id])
        return cursor.fetchone()[0]


def test_no_trace_without_a_client():
    assert sentry_trace(publish_event("t", {})) is None


def test_the_current_trace():
    client = sentry_sdk.Client(
        dsn="http://public@127.0.0.1:9/1", transport=Discard, traces_sample_rate=1.0
    )
    with sentry_sdk.isolation_scope() as scope:
        scope.set_client(client)
        with sentry_sdk.start_transaction(name="view") as transaction:
            event_id = publish_event("t", {})
            expected = sentry_sdk.get_traceparent()
    assert expected.startswith(transaction.trace_id)
    assert sentry_trace(event_id) == expected
