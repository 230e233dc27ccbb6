"""Publish events to outbox-relay's transactional outbox from Django.

    from django.db import transaction
    from outbox_relay_django import publish_event

    with transaction.atomic():
        order = Order.objects.create(customer=customer, total=total)
        publish_event("order.created", {"order_id": order.pk, "total": order.total})

Add ``"outbox_relay_django"`` to INSTALLED_APPS and run ``manage.py migrate``: the app's
migration creates the outbox table (as ``outbox-relay setup`` does). Documentation:
docs/publishing.md in the outbox-relay repository.
"""

from .publish import publish_event, publish_events

__all__ = ["publish_event", "publish_events"]
__version__ = "0.1.0"
