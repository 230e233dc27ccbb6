from __future__ import annotations

from django.apps import AppConfig
from django.core import checks


class OutboxRelayConfig(AppConfig):
    """The app: its migration creates the outbox table; its check looks for it."""

    name = "outbox_relay_django"
    label = "outbox_relay"
    verbose_name = "outbox-relay"

    def ready(self) -> None:
        from .checks import check_outbox_published, check_outbox_table

        checks.register(check_outbox_table, "outbox_relay")
        checks.register(check_outbox_published, "outbox_relay", deploy=True)
