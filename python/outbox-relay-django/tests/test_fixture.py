"""The outbox_events fixture (the package's pytest plugin, loaded by its entry point) catches a
view's events, with no ClickHouse and no relay."""

from decimal import Decimal

import pytest
from django.db import transaction

from outbox_relay_django import publish_event, publish_events
from testproject.shop.models import Order

pytestmark = pytest.mark.django_db


def test_a_views_events(client, outbox_events):
    response = client.post("/orders/", {"customer": "Zoë", "total": "12.50"})
    assert response.status_code == 201
    assert outbox_events.types == ["order.created"]
    event = outbox_events[0]
    assert event.context == {
        "order_id": response.json()["order_id"],
        "customer": "Zoë",
        "total": "12.50",
    }
    assert Order.objects.get().total == Decimal("12.50")


def test_a_view_that_rolls_back_published_nothing(client, outbox_events):
    assert client.post("/orders/failing/", {"customer": "x"}).status_code == 402
    assert list(outbox_events) == []
    assert not Order.objects.exists()


def test_order_and_what_was_rolled_back(outbox_events):
    publish_event("first", {"n": 1})
    with transaction.atomic():
        publish_events([("second", {"n": 2}), ("third", {"n": 3})])
        try:
            with transaction.atomic():
                publish_event("rolled.back", {})
                raise RuntimeError
        except RuntimeError:
            pass
    publish_event("fourth", {"n": 4}, environment="canary", metadata_version=2)
    assert outbox_events.types == ["first", "second", "third", "fourth"]
    assert [e.context["n"] for e in outbox_events] == [1, 2, 3, 4]
    assert (outbox_events[-1].environment, outbox_events[-1].metadata_version) == ("canary", 2)
    assert [e.event_type for e in outbox_events.of_type("second")] == ["second"]
    outbox_events.clear()
    assert len(outbox_events) == 0


def test_events_before_the_fixture_are_not_its_own(request):
    publish_event("before", {})
    events = request.getfixturevalue("outbox_events")
    publish_event("after", {})
    assert events.types == ["after"]


@pytest.mark.django_db(transaction=True)
def test_in_a_transactional_test(client, outbox_events):
    client.post("/orders/", {"customer": "Ann", "total": "1"})
    client.post("/orders/failing/", {"customer": "Bob"})
    assert outbox_events.types == ["order.created"]
    assert outbox_events[0].context["customer"] == "Ann"
