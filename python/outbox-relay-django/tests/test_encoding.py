"""Contexts to JSON text with Django's encoder; what cannot be encoded is named by its path."""

import datetime
import types
import uuid
from decimal import Decimal

import pytest
from django.utils.translation import gettext_lazy

from outbox_relay_django.encoding import encode_context


def test_every_type_djangos_encoder_knows():
    context = {
        "decimal": Decimal("12.50"),
        "datetime": datetime.datetime(
            2024, 2, 29, 23, 59, 58, 123456, tzinfo=datetime.timezone.utc
        ),
        "date": datetime.date(2024, 2, 29),
        "time": datetime.time(13, 14, 15),
        "timedelta": datetime.timedelta(minutes=90),
        "uuid": uuid.UUID(int=1),
        "lazy": gettext_lazy("Order"),
        "nested": [{"a": (1, None, False)}],
        "text": "Zoë\x01",
    }
    assert encode_context(context) == (
        '{"decimal":"12.50","datetime":"2024-02-29T23:59:58.123Z","date":"2024-02-29",'
        '"time":"13:14:15","timedelta":"P0DT01H30M00S",'
        '"uuid":"00000000-0000-0000-0000-000000000001","lazy":"Order",'
        '"nested":[{"a":[1,null,false]}],"text":"Zoë\\u0001"}'
    )


def test_a_mapping_that_is_not_a_dict():
    assert encode_context(types.MappingProxyType({"a": 1})) == '{"a":1}'


class Price:
    def __repr__(self) -> str:
        return "<Price>"


def test_unencodable_value_is_named_by_its_path():
    context = {"items": [{"price": 1}, {"price": 2}, {"price": Price()}]}
    with pytest.raises(TypeError, match=r'^context\["items"\]\[2\]\["price"\]: Price <Price>'):
        encode_context(context)


def test_a_set_is_named_by_its_path():
    with pytest.raises(TypeError, match=r'^context\["tags"\]: set'):
        encode_context({"ok": 1, "tags": {"a"}})


def test_a_key_that_is_not_a_string():
    with pytest.raises(TypeError, match=r'^context\["by_pair"\] has a key of type tuple'):
        encode_context({"by_pair": {(1, 2): "x"}})


@pytest.mark.parametrize("number", [float("nan"), float("inf"), float("-inf")])
def test_numbers_json_cannot_hold(number):
    with pytest.raises(ValueError, match=r'^context\["m"\]\[1\] is (nan|inf|-inf), which JSON'):
        encode_context({"m": [1.0, number]})


def test_unpaired_surrogates_in_values_and_keys():
    with pytest.raises(ValueError, match=r'^context\["name"\] contains an unpaired surrogate'):
        encode_context({"name": "a\ud800"})
    with pytest.raises(ValueError, match=r"^context key 'k\\ud800' contains an unpaired"):
        encode_context({"k\ud800": 1})


def test_a_circular_reference():
    items: list[object] = [1]
    items.append({"back": items})
    with pytest.raises(ValueError, match=r'^context\["items"\]\[1\]\["back"\] contains itself'):
        encode_context({"items": items})


def test_an_aware_time():
    aware = datetime.time(1, 2, tzinfo=datetime.timezone.utc)
    with pytest.raises(ValueError, match=r"^context\[\"at\"\]: JSON can't represent"):
        encode_context({"at": aware})


@pytest.mark.parametrize("context", [[1, 2], "{}", None, 3])
def test_a_context_that_is_not_an_object(context):
    with pytest.raises(TypeError, match="context must be a mapping"):
        encode_context(context)
