"""pytest plugin (entry point ``pytest11``): the ``outbox_events`` fixture.

    def test_checkout(client, outbox_events):
        client.post("/orders/", {"sku": "A-1"})
        assert outbox_events.types == ["order.created"]
        assert outbox_events[0].context["total"] == "12.50"

The events are read from the test's database (the test needs database access, e.g.
``@pytest.mark.django_db``); ClickHouse and the relay play no part.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from .testing import PublishedEvents


@pytest.fixture
def outbox_events() -> Iterator[PublishedEvents]:
    """The events the test published, in order, without those rolled back."""
    from .testing import PublishedEvents

    recorder = PublishedEvents()
    recorder.start()
    try:
        yield recorder
    finally:
        recorder.stop()
