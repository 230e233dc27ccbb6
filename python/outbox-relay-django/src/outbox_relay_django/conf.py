"""Settings: each is read from Django's settings, else from the environment variable of the same
name (12-factor), else its default. Django's settings are cached until ``setting_changed`` (which
``override_settings`` sends); the environment is read at every call."""

from __future__ import annotations

import os
from typing import Any

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.core.signals import setting_changed

#: The database alias the outbox lives in, when ``publish_event(using=...)`` does not say.
DATABASE = "OUTBOX_DATABASE"
#: The outbox table's schema and name: the relay's ``outbox_schema`` and ``outbox_table``.
SCHEMA = "OUTBOX_SCHEMA"
TABLE = "OUTBOX_TABLE"
#: The ``environment`` column; unset: the column's default, the relay's ``environment`` setting.
ENVIRONMENT = "OUTBOX_ENVIRONMENT"
#: The ``metadata_version`` column; unset: the column's default, 1.
METADATA_VERSION = "OUTBOX_METADATA_VERSION"
#: The key under which structlog's bound context (contextvars) is added to each event's
#: context; unset: not added.
STRUCTLOG_KEY = "OUTBOX_STRUCTLOG_KEY"

BIGINT_MAX = 2**63 - 1


# A missing setting costs an AttributeError inside Django's LazySettings at each lookup.
_cache: dict[str, object] = {}


def _clear_cache(**kwargs: Any) -> None:
    _cache.clear()


setting_changed.connect(_clear_cache, dispatch_uid="outbox_relay_django.conf")


def _raw(name: str) -> object:
    try:
        value = _cache[name]
    except KeyError:
        value = _cache[name] = getattr(settings, name, None)
    if value is None:
        value = os.environ.get(name) or None
    return value


def text_setting(name: str, default: str | None = None) -> str | None:
    value = _raw(name)
    if value is None:
        return default
    if not isinstance(value, str):
        raise ImproperlyConfigured(f"{name} must be a string, not {type(value).__name__}")
    return value


def int_setting(name: str) -> int | None:
    value = _raw(name)
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = int(value)
        except ValueError:
            raise ImproperlyConfigured(f"{name} must be an integer, not {value!r}") from None
    if not isinstance(value, int) or isinstance(value, bool):
        raise ImproperlyConfigured(f"{name} must be an integer, not {type(value).__name__}")
    return value


def database() -> str:
    return text_setting(DATABASE, "default") or "default"


def schema() -> str:
    return text_setting(SCHEMA, "public") or "public"


def table() -> str:
    return text_setting(TABLE, "event_outbox") or "event_outbox"
