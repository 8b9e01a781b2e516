#!/usr/bin/env bash
# Start a throw-away PostgreSQL server for the fleet tests and benchmarks (or a quick trial of fleet tuning).
#
#   bash scripts/start_postgres.sh            # prints the URL, e.g. postgresql://torchtune@127.0.0.1:PORT/postgres
#   bash scripts/start_postgres.sh --env      # prints TEST_POSTGRES_URL=... and TEST_POSTGRES_DIR=... (for eval)
#   bash scripts/start_postgres.sh --stop DIR # stops the server whose data directory is DIR and removes DIR
#
# The server listens on 127.0.0.1 only, on a free port, with its data and socket in a new temporary
# directory, and trusts loopback connections (no password): for tests, never for a shared server. Debian's
# `postgresql` package is installed with apt-get when no initdb is found (needs root). initdb refuses to
# run as root, so as root the server runs as the `postgres` user (created by the package) or `nobody`.
set -euo pipefail

find_bindir() {
  local d
  if command -v pg_config >/dev/null 2>&1 && [ -x "$(pg_config --bindir)/initdb" ]; then
    pg_config --bindir; return 0
  fi
  for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
    if [ -x "$d/initdb" ]; then echo "$d"; return 0; fi
  done
  if command -v initdb >/dev/null 2>&1; then dirname "$(command -v initdb)"; return 0; fi
  return 1
}

as_server_user() {  # run a command as the unprivileged user that owns the server
  if [ "$(id -u)" -ne 0 ]; then "$@"; return; fi
  if command -v runuser >/dev/null 2>&1; then runuser -u "$PGUSER_OS" -- "$@"
  else su -s /bin/sh "$PGUSER_OS" -c "$(printf '%q ' "$@")"; fi
}

if [ "$(id -u)" -eq 0 ]; then
  if id postgres >/dev/null 2>&1; then PGUSER_OS=postgres; else PGUSER_OS=nobody; fi
fi

if [ "${1:-}" = "--stop" ]; then
  dir=${2:?usage: start_postgres.sh --stop DIR}
  bindir=$(find_bindir)
  as_server_user "$bindir/pg_ctl" -D "$dir/data" -m immediate stop >/dev/null 2>&1 || true
  rm -rf "$dir"
  exit 0
fi

if ! bindir=$(find_bindir); then
  echo "start_postgres: no PostgreSQL found; installing Debian's postgresql package" >&2
  if [ "$(id -u)" -eq 0 ]; then SUDO=""; elif command -v sudo >/dev/null 2>&1; then SUDO="sudo -n"; else
    echo "start_postgres: need root (or sudo) to install postgresql" >&2; exit 1; fi
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq >&2
  $SUDO apt-get install -y -qq postgresql >&2
  bindir=$(find_bindir) || { echo "start_postgres: postgresql installed but no initdb found" >&2; exit 1; }
  if [ "$(id -u)" -eq 0 ] && id postgres >/dev/null 2>&1; then PGUSER_OS=postgres; fi
fi

dir=$(mktemp -d "${TMPDIR:-/tmp}/torchtune-pg.XXXXXX")
chmod 755 "$dir"
if [ "$(id -u)" -eq 0 ]; then chown "$PGUSER_OS" "$dir"; fi
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')

if ! as_server_user "$bindir/initdb" -D "$dir/data" -U torchtune --auth=trust -E UTF8 --no-sync \
    >"$dir/initdb.log" 2>&1; then
  cat "$dir/initdb.log" >&2; echo "start_postgres: initdb failed" >&2; exit 1
fi
opts="-c listen_addresses=127.0.0.1 -p $port -k $dir -c fsync=off -c max_connections=200"
if ! as_server_user "$bindir/pg_ctl" -D "$dir/data" -o "$opts" -l "$dir/server.log" -w -t 60 start \
    >/dev/null 2>&1; then
  cat "$dir/server.log" >&2 || true; echo "start_postgres: the server did not start" >&2; exit 1
fi

url="postgresql://torchtune@127.0.0.1:$port/postgres"
if [ "${1:-}" = "--env" ]; then
  echo "TEST_POSTGRES_URL=$url"
  echo "TEST_POSTGRES_DIR=$dir"
else
  echo "$url"
  echo "start_postgres: data in $dir; stop with: bash $0 --stop $dir" >&2
fi
