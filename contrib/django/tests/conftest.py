"""Django settings for the snippet's tests: an existing database with the outbox table (made by
`outbox-relay setup`), given as OUTBOX_TEST_DATABASE_URL=postgres://user@host:port/db."""

import os
import sys
from pathlib import Path
from urllib.parse import urlparse

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def pytest_configure():
    from django.conf import settings

    url = urlparse(os.environ["OUTBOX_TEST_DATABASE_URL"])
    database = {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": url.path.lstrip("/"),
        "USER": url.username or "postgres",
        "PASSWORD": url.password or "",
        "HOST": url.hostname,
        "PORT": str(url.port or 5432),
    }
    settings.configure(DATABASES={"default": database}, INSTALLED_APPS=[], USE_TZ=True)


@pytest.fixture(scope="session")
def django_db_setup():
    """Use the database as it is: the outbox table already exists there."""
