"""A minimal Django project: the app in INSTALLED_APPS, a PostgreSQL database from
OUTBOX_TEST_DATABASE_URL (postgres://user[:password]@host:port/db)."""

import os
from urllib.parse import unquote, urlparse

_url = urlparse(os.environ.get("OUTBOX_TEST_DATABASE_URL", "postgres://postgres@127.0.0.1/app"))

SECRET_KEY = "test only"
DEBUG = False
ALLOWED_HOSTS = ["testserver"]
USE_TZ = True
TIME_ZONE = "UTC"
INSTALLED_APPS = ["outbox_relay_django", "testproject.shop"]
MIDDLEWARE: list[str] = []
ROOT_URLCONF = "testproject.urls"
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": _url.path.lstrip("/"),
        "USER": unquote(_url.username or "postgres"),
        "PASSWORD": unquote(_url.password or ""),
        "HOST": _url.hostname or "127.0.0.1",
        "PORT": str(_url.port or 5432),
    }
}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
LOGGING_CONFIG = None
