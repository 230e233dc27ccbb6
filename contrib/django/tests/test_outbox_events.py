import json

import pytest
from django.db import connection, transaction

from outbox_events import publish_event


def outbox_row(event_id):
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT event_type, event_context::text FROM event_outbox WHERE event_id = %s",
            [event_id],
        )
        return cursor.fetchone()


@pytest.mark.django_db(transaction=True)
def test_event_commits_with_the_transaction():
    context = {"order_id": 1, "customer": "Zoë", "items": [1, 2]}
    with transaction.atomic():
        event_id = publish_event("django.committed", context)
    assert outbox_row(event_id) == ("django.committed", json.dumps(context, ensure_ascii=False))


@pytest.mark.django_db(transaction=True)
def test_event_rolls_back_with_the_transaction():
    with pytest.raises(RuntimeError):
        with transaction.atomic():
            event_id = publish_event("django.rolled_back", {"order_id": 2})
            raise RuntimeError("the business step failed")
    assert outbox_row(event_id) is None


@pytest.mark.django_db(transaction=True)
def test_a_context_that_is_not_an_object_is_refused():
    with pytest.raises(Exception, match="event_context_check"):
        with transaction.atomic():
            publish_event("django.bad", [1, 2, 3])
