"""The system check: the outbox table and its columns are there."""

import io

import pytest
from django.core.checks import Error, Warning
from django.core.management import call_command
from django.core.management.base import SystemCheckError
from django.db import connection
from django.test.utils import override_settings

from outbox_relay_django.checks import check_outbox_published, check_outbox_table

pytestmark = pytest.mark.django_db


def ids(messages):
    return [(type(m), m.id) for m in messages]


def test_the_migrated_table_passes():
    assert check_outbox_table() == []
    call_command("check")  # raises SystemCheckError on an error


def test_a_missing_table_is_an_error_once_migrated():
    with override_settings(OUTBOX_TABLE="no_such_outbox"):
        assert ids(check_outbox_table()) == [(Error, "outbox_relay.E001")]
        with pytest.raises(SystemCheckError, match=r"outbox_relay\.E001.*no_such_outbox"):
            call_command("check")


def test_a_missing_table_before_the_migration_is_a_warning():
    with connection.cursor() as cursor:
        cursor.execute("DELETE FROM django_migrations WHERE app = 'outbox_relay'")
    with override_settings(OUTBOX_TABLE="no_such_outbox"):
        assert ids(check_outbox_table()) == [(Warning, "outbox_relay.W002")]


def test_missing_and_changed_columns():
    with connection.cursor() as cursor:
        cursor.execute("ALTER TABLE event_outbox DROP COLUMN sentry_trace")
        cursor.execute("ALTER TABLE event_outbox ALTER COLUMN metadata_version TYPE integer")
    messages = check_outbox_table()
    assert ids(messages) == [(Error, "outbox_relay.E002"), (Error, "outbox_relay.E003")]
    assert "sentry_trace" in messages[0].msg
    assert "metadata_version is integer, not bigint" in messages[1].msg


def test_other_databases_are_not_its_business():
    assert check_outbox_table(databases=["other"]) == []


def test_deploy_warns_without_a_publication():
    # The test database never saw `outbox-relay setup`.
    assert ids(check_outbox_published()) == [(Warning, "outbox_relay.W003")]
    out, err = io.StringIO(), io.StringIO()
    call_command("check", deploy=True, stdout=out, stderr=err)
    assert "outbox_relay.W003" in out.getvalue() + err.getvalue()
    call_command("check", stdout=out, stderr=err)  # not without --deploy
    assert (out.getvalue() + err.getvalue()).count("outbox_relay.W003") == 1
    with connection.cursor() as cursor:
        cursor.execute("CREATE PUBLICATION test_outbox_pub FOR TABLE event_outbox")
    assert check_outbox_published() == []
