"""Names derived as the relay derives them (values from `outbox-relay setup --print-sql`), and
the migration's SQL."""

import pytest
from django.core.management import call_command

from outbox_relay_django.ddl import derived_name, outbox_ddl


@pytest.mark.parametrize(
    ("table", "suffix", "expected"),
    [
        ("event_outbox", "event_type_check", "event_outbox_event_type_check"),
        # From RELAY_OUTBOX_TABLE=<these> outbox-relay setup --print-sql:
        ("a" * 63, "event_type_check", "a" * 37 + "_7b2f701d_event_type_check"),
        ("a" * 63, "event_date_time_brin", "a" * 33 + "_7b2f701d_event_date_time_brin"),
        ("é" * 31, "event_context_check", "é" * 17 + "_85b2f855_event_context_check"),
        ("é" * 31, "event_date_time_brin", "é" * 16 + "_85b2f855_event_date_time_brin"),
    ],
)
def test_derived_names(table, suffix, expected):
    assert derived_name(table, suffix) == expected
    assert len(expected.encode()) <= 63


def test_the_ddl_is_idempotent_and_quotes_names():
    sql = outbox_ddl("my schema", 'out"box')
    assert 'CREATE TABLE IF NOT EXISTS "my schema"."out""box" (' in sql
    assert 'CREATE INDEX IF NOT EXISTS "out""box_event_date_time_brin"' in sql
    assert "SET DEFAULT" not in sql  # the environment default is the relay's setting


@pytest.mark.django_db
def test_sqlmigrate_shows_the_sql(capsys):
    call_command("sqlmigrate", "outbox_relay", "0001")
    assert 'CREATE TABLE IF NOT EXISTS "public"."event_outbox"' in capsys.readouterr().out
