"""Event contexts to JSON text with Django's encoder, and errors that name the path of the value
that cannot be encoded (or that PostgreSQL's ``json`` column would refuse)."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

from django.core.serializers.json import DjangoJSONEncoder

# Compact, UTF-8 kept as is, NaN and infinities refused (PostgreSQL's json refuses them).
_ENCODER = DjangoJSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"))

_HINT = (
    "event contexts are encoded with Django's DjangoJSONEncoder: dict, list, tuple, str, int, "
    "float, bool, None, Decimal, datetime, date, time, timedelta, UUID and lazy strings"
)


def encode_context(context: Mapping[str, Any], name: str = "context") -> str:
    """The JSON text of ``context`` (an object). Raises TypeError (a value the encoder cannot
    encode, a key that is not a string) or ValueError (NaN or an infinity, an unpaired surrogate,
    a cycle, an aware ``time``) naming its path, e.g. ``context["items"][2]["price"]``."""
    if not isinstance(context, Mapping):
        raise TypeError(
            f"{name} must be a mapping (a JSON object), not {type(context).__name__}: "
            "the outbox accepts only JSON objects as event_context"
        )
    value = context if isinstance(context, dict) else dict(context)
    try:
        text = _ENCODER.encode(value)
        text.encode("utf-8")  # an unpaired surrogate cannot reach PostgreSQL
    except (TypeError, ValueError, RecursionError) as exc:
        _raise_at_path(value, name, exc)
        raise
    return text


class _LenientEncoder(DjangoJSONEncoder):
    """For structlog's bound context: what Django's encoder cannot encode becomes ``str(value)``,
    so a log field never stops an event from being published; keys sorted (contextvars have no
    order of their own)."""

    def default(self, o: Any) -> Any:
        try:
            return super().default(o)
        except TypeError:
            return str(o)


_LENIENT = _LenientEncoder(
    ensure_ascii=False, allow_nan=False, separators=(",", ":"), sort_keys=True
)


def encode_log_context(log_context: Mapping[str, Any], name: str) -> str:
    """structlog's bound context as JSON text, leniently (see ``_LenientEncoder``)."""
    value = dict(log_context)
    try:
        text = _LENIENT.encode(value)
        text.encode("utf-8")
    except (TypeError, ValueError, RecursionError) as exc:
        _raise_at_path(value, name, exc)
        raise
    return text


def check_text(value: str, what: str) -> None:
    """Text PostgreSQL refuses: a NUL character, an unpaired surrogate."""
    if "\x00" in value:
        raise ValueError(f"{what} contains a NUL character, which PostgreSQL's text cannot hold")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(
            f"{what} contains an unpaired surrogate, which is not valid UTF-8"
        ) from None


def _key_path(key: object) -> str:
    return f"[{json.dumps(key, ensure_ascii=False)}]" if isinstance(key, str) else f"[{key!r}]"


def _raise_at_path(value: Any, name: str, original: BaseException) -> None:
    found = _find(value, name, set())
    if found is not None:
        raise found from original


def _find(value: Any, path: str, ancestors: set[int]) -> Exception | None:
    """The first problem in ``value`` (an exception naming its path), or None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return ValueError(f"{path} contains an unpaired surrogate, which is not valid UTF-8")
        return None
    if value is None or isinstance(value, (bool, int)):
        return None
    if isinstance(value, float):
        if math.isfinite(value):
            return None
        return ValueError(f"{path} is {value!r}, which JSON (and PostgreSQL's json) cannot hold")
    if isinstance(value, (dict, list, tuple)):
        if id(value) in ancestors:
            return ValueError(f"{path} contains itself (a circular reference)")
        ancestors.add(id(value))
        try:
            if isinstance(value, dict):
                return _find_in_dict(value, path, ancestors)
            for index, item in enumerate(value):
                found = _find(item, f"{path}[{index}]", ancestors)
                if found is not None:
                    return found
            return None
        finally:
            ancestors.discard(id(value))
    try:
        converted = _ENCODER.default(value)
    except TypeError:
        return TypeError(f"{path}: {type(value).__name__} {value!r} cannot be encoded ({_HINT})")
    except ValueError as exc:  # e.g. an aware datetime.time
        return ValueError(f"{path}: {exc}")
    return _find(converted, path, ancestors)


def _find_in_dict(value: dict[Any, Any], path: str, ancestors: set[int]) -> Exception | None:
    for key, item in value.items():
        if not (key is None or isinstance(key, (str, int, float, bool))):
            return TypeError(
                f"{path} has a key of type {type(key).__name__} ({key!r}); JSON object keys must "
                "be str (int, float, bool and None are converted)"
            )
        if isinstance(key, (str, float)):
            found = _find(key, f"{path} key {key!r}", ancestors)
            if found is not None:
                return found
        found = _find(item, f"{path}{_key_path(key)}", ancestors)
        if found is not None:
            return found
    return None
