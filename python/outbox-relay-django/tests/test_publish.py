"""publish_event and publish_events against the test database that the app's migration made."""

import uuid

import pytest
from django.db import connection, transaction
from django.test.utils import CaptureQueriesContext, override_settings

from outbox_relay_django import publish_event, publish_events

pytestmark = pytest.mark.django_db


def outbox_row(event_id):
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT event_type, event_context::text, environment, metadata_version, sentry_trace "
            "FROM event_outbox WHERE event_id = %s",
            [event_id],
        )
        return cursor.fetchone()


def outbox_count():
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM event_outbox")
        return cursor.fetchone()[0]


def test_one_event_with_the_columns_defaults(monkeypatch):
    monkeypatch.delenv("OUTBOX_ENVIRONMENT", raising=False)
    monkeypatch.delenv("OUTBOX_METADATA_VERSION", raising=False)
    event_id = publish_event("order.created", {"order_id": 1, "customer": "Zoë"})
    assert isinstance(event_id, uuid.UUID)
    assert outbox_row(event_id) == (
        "order.created",
        '{"order_id":1,"customer":"Zoë"}',
        "production",
        1,
        None,
    )


def test_settings_then_environment_variables_then_arguments(monkeypatch):
    monkeypatch.setenv("OUTBOX_ENVIRONMENT", "from-env")
    monkeypatch.setenv("OUTBOX_METADATA_VERSION", "4")
    assert outbox_row(publish_event("t", {}))[2:4] == ("from-env", 4)
    with override_settings(OUTBOX_ENVIRONMENT="staging", OUTBOX_METADATA_VERSION=5):
        assert outbox_row(publish_event("t", {}))[2:4] == ("staging", 5)
        event_id = publish_event("t", {}, environment="canary", metadata_version=0)
        assert outbox_row(event_id)[2:4] == ("canary", 0)


def test_a_rolled_back_savepoint_takes_its_event():
    with transaction.atomic():
        kept = publish_event("kept", {})
        try:
            with transaction.atomic():
                gone = publish_event("gone", {})
                raise RuntimeError
        except RuntimeError:
            pass
    assert outbox_row(kept) is not None
    assert outbox_row(gone) is None


def test_many_events_in_one_insert():
    with CaptureQueriesContext(connection) as queries:
        ids = publish_events([("a", {"i": 1}), ("b", {"i": 2}), ("a", {"i": 3})])
    assert len(queries) == 1
    assert queries[0]["sql"].count("INSERT") == 1
    assert [outbox_row(i)[:2] for i in ids] == [
        ("a", '{"i":1}'),
        ("b", '{"i":2}'),
        ("a", '{"i":3}'),
    ]
    assert publish_events([]) == []


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda: publish_event("", {}), ValueError, "event_type must not be empty"),
        (lambda: publish_event("a\x00b", {}), ValueError, "NUL character"),
        (lambda: publish_event(b"t", {}), TypeError, "event_type must be a str"),
        (lambda: publish_event("t", [1]), TypeError, "context must be a mapping"),
        (lambda: publish_event("t", {"x": float("nan")}), ValueError, r'context\["x"\] is nan'),
        (lambda: publish_event("t", {}, metadata_version=-1), ValueError, "metadata_version"),
        (lambda: publish_event("t", {}, metadata_version=2**63), ValueError, "metadata_version"),
        (lambda: publish_event("t", {}, metadata_version=True), ValueError, "metadata_version"),
        (lambda: publish_event("t", {}, environment="a\x00"), ValueError, "environment"),
        (
            lambda: publish_events([("ok", {}), ("t", {"p": [object()]})]),
            TypeError,
            r'events\[1\] context\["p"\]\[0\]: object',
        ),
    ],
)
def test_what_postgresql_would_refuse_fails_before_the_insert(call, error, message):
    before = outbox_count()
    with transaction.atomic():
        with CaptureQueriesContext(connection) as queries, pytest.raises(error, match=message):
            call()
        assert len(queries) == 0
        # The transaction is still usable: nothing reached PostgreSQL.
        assert outbox_count() == before


def test_a_bad_setting_is_named(monkeypatch):
    monkeypatch.setenv("OUTBOX_METADATA_VERSION", "two")
    with pytest.raises(Exception, match="OUTBOX_METADATA_VERSION must be an integer"):
        publish_event("t", {})


@pytest.mark.django_db(transaction=True)
def test_autocommit_commits_on_its_own():
    assert not connection.in_atomic_block
    event_id = publish_event("autocommit", {})
    connection.close()  # a new session sees it: it was committed
    assert outbox_row(event_id)[0] == "autocommit"
