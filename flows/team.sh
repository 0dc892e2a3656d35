#!/usr/bin/env bash
# Team mode on loopback (or against the team's PostgreSQL): PostgreSQL -> MLflow server (its backend
# store on PostgreSQL, artifacts in a folder) -> Prefect server (its database on the same PostgreSQL)
# -> a `process` work pool and one worker. Run from the project root:
#
#   bash flows/team.sh up        # start what is not running; writes .team/env
#   source .team/env             # MLFLOW_TRACKING_URI, PREFECT_API_URL, FINGRPO_POOL for this shell
#   bash flows/team.sh status
#   bash flows/team.sh down      # stop the worker, the servers (by process group) and our PostgreSQL
#
# Knobs (environment):
#   FINGRPO_PG_URL        postgresql://USER:PASSWORD@HOST:PORT of the team's server (its databases
#                         `mlflow` and `prefect` are created if missing); unset: a local PostgreSQL is
#                         initialised (initdb) and started on FINGRPO_PG_PORT, its data kept between up/down
#   FINGRPO_PG_PORT       5432        FINGRPO_MLFLOW_PORT 5000        FINGRPO_PREFECT_PORT 4200
#   FINGRPO_POOL          fingrpo-team (the work pool; type process)
#   FINGRPO_TEAM_DIR      .team (logs, pids, env, the MLflow artifact folder)
#   FINGRPO_MLFLOW_URI    what clients use to reach MLflow (default http://127.0.0.1:$FINGRPO_MLFLOW_PORT),
#                         e.g. behind a proxy that wants https://user:token@host
#
# Credentials stay off command lines (`ps`): the database URIs reach the servers through their
# environment (MLFLOW_BACKEND_STORE_URI, PREFECT_SERVER_DATABASE_CONNECTION_URL); .team/env and the
# password file are mode 600. Logs: .team/{postgres,mlflow,prefect,worker}.log.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
BIN=${FINGRPO_BIN:-$ROOT/.venv/bin}
PY=$BIN/python
TEAM=$(realpath -m "${FINGRPO_TEAM_DIR:-$ROOT/.team}")
PG_PORT=${FINGRPO_PG_PORT:-5432}
MLFLOW_PORT=${FINGRPO_MLFLOW_PORT:-5000}
PREFECT_PORT=${FINGRPO_PREFECT_PORT:-4200}
POOL=${FINGRPO_POOL:-fingrpo-team}
PG_BIN=$(dirname "$(ls /usr/lib/postgresql/*/bin/initdb 2>/dev/null | sort -V | tail -1 || true)")
[ -x "$PG_BIN/initdb" ] || PG_BIN=$(dirname "$(command -v initdb || echo /nonexistent/initdb)")
export PATH="$BIN:$PATH" PREFECT_SERVER_ANALYTICS_ENABLED=false MLFLOW_DISABLE_TELEMETRY=true

say() { echo "team: $*"; }
die() { echo "team: error: $*" >&2; exit 1; }

wait_http() {  # URL SECONDS NAME LOG: until GET URL answers 200
  local url=$1 secs=$2 name=$3 log=$4
  for _ in $(seq "$((secs * 2))"); do
    "$PY" - "$url" <<'EOF' 2>/dev/null && return 0
import sys, urllib.request
urllib.request.urlopen(sys.argv[1], timeout=2)
EOF
    sleep 0.5
  done
  tail -20 "$log" >&2 || true
  die "$name is not answering at $url after ${secs} s (log: $log)"
}

running() { [ -f "$TEAM/$1.pid" ] && kill -0 "$(cat "$TEAM/$1.pid")" 2>/dev/null; }

start() {  # NAME LOG CMD...: in its own session (process group = its pid), output to LOG
  local name=$1 log=$2; shift 2
  setsid "$@" >"$log" 2>&1 </dev/null &
  echo $! >"$TEAM/$name.pid"
}

stop_group() {  # NAME: SIGTERM its process group, SIGKILL after 20 s
  local name=$1 pid
  [ -f "$TEAM/$name.pid" ] || return 0
  pid=$(cat "$TEAM/$name.pid")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM -- "-$pid" 2>/dev/null || true
    for _ in $(seq 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -KILL -- "-$pid" 2>/dev/null || true
    say "stopped $name (process group $pid)"
  fi
  rm -f "$TEAM/$name.pid"
}

as_pg() {  # run a PostgreSQL server binary; initdb/pg_ctl refuse root, so root runs them as `postgres`
  # (from / : the postgres user may not be able to enter the caller's folder)
  if [ "$(id -u)" = 0 ]; then (cd / && runuser -u postgres -- "$@"); else "$@"; fi
}

local_pg_up() {
  [ -x "$PG_BIN/initdb" ] || die "PostgreSQL's server binaries are missing: \`make postgres\` (Debian: apt-get install postgresql), or set FINGRPO_PG_URL"
  local data
  data=$(cat "$TEAM/pgdata" 2>/dev/null || true)
  if [ -z "$data" ] || [ ! -f "$data/db/PG_VERSION" ]; then
    # a folder the postgres user can reach (a root-owned 700 parent would lock it out)
    data=$(mktemp -d /tmp/fingrpo-pg.XXXXXX)
    "$PY" -c 'import secrets; print(secrets.token_urlsafe(18))' >"$data/.pw"
    [ "$(id -u)" = 0 ] && chown -R postgres "$data"
    chmod 700 "$data"
    as_pg "$PG_BIN/initdb" -D "$data/db" -U fingrpo --pwfile="$data/.pw" \
      --auth-host=scram-sha-256 --auth-local=trust >"$TEAM/postgres-initdb.log" 2>&1 \
      || { tail "$TEAM/postgres-initdb.log" >&2; die "initdb failed"; }
    echo "$data" >"$TEAM/pgdata"
    say "initialised PostgreSQL in $data/db"
  fi
  if ! as_pg "$PG_BIN/pg_ctl" -D "$data/db" status >/dev/null 2>&1; then
    as_pg "$PG_BIN/pg_ctl" -D "$data/db" -w -t 60 -l "$data/postgres.log" \
      -o "-p $PG_PORT -k $data -c listen_addresses=127.0.0.1" start >/dev/null \
      || { tail "$data/postgres.log" >&2; die "PostgreSQL did not start on port $PG_PORT"; }
    say "PostgreSQL on 127.0.0.1:$PG_PORT"
  fi
  PG_URL="postgresql://fingrpo:$(cat "$data/.pw" 2>/dev/null || as_pg cat "$data/.pw")@127.0.0.1:$PG_PORT"
}

ensure_databases() {  # PG_URL: create the databases `mlflow` and `prefect` when missing
  "$PY" - "$PG_URL" <<'EOF'
import sys
import psycopg
with psycopg.connect(sys.argv[1] + "/postgres", autocommit=True, connect_timeout=10) as conn:
    have = {r[0] for r in conn.execute("SELECT datname FROM pg_database")}
    for name in ("mlflow", "prefect"):
        if name not in have:
            conn.execute(f'CREATE DATABASE "{name}"')
EOF
}

up() {
  mkdir -p "$TEAM/mlartifacts" "$TEAM/prefect-home"
  chmod 700 "$TEAM"
  if [ -n "${FINGRPO_PG_URL:-}" ]; then PG_URL=${FINGRPO_PG_URL%/}; else local_pg_up; fi
  ensure_databases || die "cannot reach PostgreSQL or create its databases (FINGRPO_PG_URL?)"
  local mlflow_uri=${FINGRPO_MLFLOW_URI:-http://127.0.0.1:$MLFLOW_PORT}
  local prefect_api=http://127.0.0.1:$PREFECT_PORT/api
  local pg_rest=${PG_URL#postgresql://}

  if ! running mlflow; then
    MLFLOW_BACKEND_STORE_URI="postgresql+psycopg://$pg_rest/mlflow" start mlflow "$TEAM/mlflow.log" \
      mlflow server --artifacts-destination "$TEAM/mlartifacts" --serve-artifacts \
      --host 127.0.0.1 --port "$MLFLOW_PORT" --workers 1
  fi
  if ! running prefect; then
    PREFECT_HOME="$TEAM/prefect-home" PREFECT_SERVER_DATABASE_CONNECTION_URL="postgresql+asyncpg://$pg_rest/prefect" \
      start prefect "$TEAM/prefect.log" prefect server start --host 127.0.0.1 --port "$PREFECT_PORT"
  fi
  wait_http "http://127.0.0.1:$MLFLOW_PORT/health" 180 "the MLflow server" "$TEAM/mlflow.log"
  say "MLflow server on http://127.0.0.1:$MLFLOW_PORT (backend store: PostgreSQL database mlflow; artifacts: $TEAM/mlartifacts)"
  wait_http "$prefect_api/health" 180 "the Prefect server" "$TEAM/prefect.log"
  say "Prefect server on $prefect_api (database: PostgreSQL database prefect)"

  export PREFECT_API_URL=$prefect_api PREFECT_HOME="$TEAM/prefect-home"
  prefect work-pool inspect "$POOL" >/dev/null 2>&1 || prefect work-pool create "$POOL" --type process >/dev/null
  if ! running worker; then
    # the worker runs each flow run as a subprocess with this environment
    MLFLOW_TRACKING_URI=$mlflow_uri start worker "$TEAM/worker.log" \
      prefect worker start --pool "$POOL" --type process --name "fingrpo-worker-$(hostname)"
    for _ in $(seq 120); do grep -q "started" "$TEAM/worker.log" 2>/dev/null && break; running worker || break; sleep 0.5; done
    running worker || { tail -20 "$TEAM/worker.log" >&2; die "the worker exited (log: $TEAM/worker.log)"; }
  fi
  say "worker polling work pool $POOL (log: $TEAM/worker.log)"

  umask 077
  cat >"$TEAM/env" <<EOF
export MLFLOW_TRACKING_URI='$mlflow_uri'
export PREFECT_API_URL='$prefect_api'
export PREFECT_HOME='$TEAM/prefect-home'
export FINGRPO_POOL='$POOL'
EOF
  say "wrote $TEAM/env: \`source $TEAM/env\`"
}

down() {
  stop_group worker
  stop_group prefect
  stop_group mlflow
  local data
  data=$(cat "$TEAM/pgdata" 2>/dev/null || true)
  if [ -n "$data" ] && [ -f "$data/db/PG_VERSION" ] && as_pg "$PG_BIN/pg_ctl" -D "$data/db" status >/dev/null 2>&1; then
    as_pg "$PG_BIN/pg_ctl" -D "$data/db" -m fast -w stop >/dev/null && say "stopped PostgreSQL ($data/db)"
  fi
  if [ "${1:-}" = "--purge" ] && [ -n "$data" ]; then
    rm -rf "$data" "$TEAM" && say "removed $data and $TEAM"
  fi
}

status() {
  local name
  for name in mlflow prefect worker; do
    if running "$name"; then say "$name: running (pid $(cat "$TEAM/$name.pid"))"; else say "$name: not running"; fi
  done
  local data
  data=$(cat "$TEAM/pgdata" 2>/dev/null || true)
  if [ -n "$data" ]; then as_pg "$PG_BIN/pg_ctl" -D "$data/db" status 2>/dev/null | head -1 | sed 's/^/team: postgres: /' || say "postgres: not running"; fi
}

case "${1:-}" in
  up) up ;;
  down) shift; down "$@" ;;
  status) status ;;
  *) echo "usage: bash flows/team.sh up | status | down [--purge]" >&2; exit 2 ;;
esac
