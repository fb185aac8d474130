#!/usr/bin/env bash
# Runs a program against a throwaway PostgreSQL 15 cluster:
#   examples/pg/run_with_postgres.sh PROGRAM [ARGS...]
# runs `PROGRAM --postgres "<conninfo>" ARGS...`. The cluster lives in a new temporary directory,
# listens on a Unix socket in that directory only (listen_addresses=''), keeps the default
# durability settings (fsync and synchronous_commit on), and is stopped and removed when this
# script exits, whether the program passed, failed or the script was interrupted. initdb and the
# server refuse to run as root, so as root they run as the `postgres` user (runuser). A missing
# PostgreSQL installation is a failure, never a skip.
set -euo pipefail

program=${1:?usage: run_with_postgres.sh PROGRAM [ARGS...]}
shift

pgbin=""
for candidate in "${SLUICE_PG_BINDIR:-}" /usr/lib/postgresql/15/bin; do
  if [[ -n "$candidate" && -x "$candidate/initdb" && -x "$candidate/pg_ctl" ]]; then pgbin=$candidate; break; fi
done
if [[ -z "$pgbin" ]]; then
  echo "FAIL: PostgreSQL 15 server binaries not found (Debian package postgresql-15; scripts/install-deps.sh installs it)" >&2
  exit 1
fi

as_pg=()
if [[ $(id -u) -eq 0 ]]; then
  if ! id postgres >/dev/null 2>&1; then
    echo "FAIL: running as root but there is no 'postgres' user to run the server as" >&2
    exit 1
  fi
  as_pg=(runuser -u postgres --)
fi

dir=$(mktemp -d "${TMPDIR:-/tmp}/sluice-pg.XXXXXX")
data="$dir/data"
sock="$dir/sock"
mkdir -p "$sock"
if [[ ${#as_pg[@]} -ne 0 ]]; then
  chown -R postgres "$dir"
  chmod 755 "$dir"
fi

cleanup() {
  local status=$?
  if [[ -f "$data/postmaster.pid" ]]; then
    "${as_pg[@]}" "$pgbin/pg_ctl" -D "$data" -m immediate -w stop >/dev/null 2>&1 || true
  fi
  if [[ $status -ne 0 && -f "$dir/server.log" ]]; then
    echo "---- PostgreSQL server log (last 30 lines)" >&2
    tail -n 30 "$dir/server.log" >&2 || true
  fi
  rm -rf "$dir"
  exit $status
}
trap cleanup EXIT
trap 'exit 130' INT TERM

echo "postgres: initdb in $data"
"${as_pg[@]}" "$pgbin/initdb" -D "$data" -U sluice -A trust --no-instructions >"$dir/initdb.log" 2>&1 ||
  { cat "$dir/initdb.log" >&2; exit 1; }
"${as_pg[@]}" "$pgbin/pg_ctl" -D "$data" -l "$dir/server.log" -w -t 60 \
  -o "-c listen_addresses='' -c unix_socket_directories='$sock' -c port=5432" start >/dev/null
conninfo="host=$sock port=5432 user=sluice dbname=postgres"
echo "postgres: server up (socket in $sock; fsync and synchronous_commit left at their defaults)"

"$program" --postgres "$conninfo" "$@"
