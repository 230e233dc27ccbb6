from django.db import migrations

from outbox_relay_django.ddl import CreateOutboxTable


class Migration(migrations.Migration):
    """The outbox table, as ``outbox-relay setup`` creates it; a no-op where it exists."""

    initial = True
    dependencies = []
    operations = [CreateOutboxTable()]
