#!/usr/bin/env bash
# The server stack without Docker: Prefect server and MLflow tracking server as plain processes on
# loopback, SQLite behind both, MLflow artifacts in a local folder. State, logs and PIDs in .stack/.
#
#   infra/stack.sh [start]   start both (idempotent) and wait until healthy
#   infra/stack.sh status    say what runs where
#   infra/stack.sh stop      stop both
#   infra/stack.sh env       print the exports a shell needs (eval "$(infra/stack.sh env)")
#
# PREFECT_PORT (4200), MLFLOW_PORT (5000), STACK_HOST (127.0.0.1), STACK_TIMEOUT (120 s per server).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
stack="${STACK_DIR:-$root/.stack}"
host="${STACK_HOST:-127.0.0.1}"
prefect_port="${PREFECT_PORT:-4200}"
mlflow_port="${MLFLOW_PORT:-5000}"
timeout_s="${STACK_TIMEOUT:-120}"
bin="$root/.venv/bin"
[[ -x "$bin/prefect" ]] || bin="$(dirname "$(command -v prefect || echo /usr/bin/prefect)")"

prefect_url="http://$host:$prefect_port"
mlflow_url="http://$host:$mlflow_port"

running() { [[ -f "$stack/$1.pid" ]] && kill -0 "$(cat "$stack/$1.pid")" 2>/dev/null; }
healthy() { curl -fsS --max-time 2 "$1" >/dev/null 2>&1; }

wait_healthy() {  # name url
  local deadline=$((SECONDS + timeout_s))
  until healthy "$2"; do
    if ! running "$1"; then
      echo "$1 exited during start-up; last lines of $stack/$1.log:" >&2
      tail -n 30 "$stack/$1.log" >&2
      return 1
    fi
    if ((SECONDS >= deadline)); then
      echo "$1 not healthy at $2 after ${timeout_s} s (raise STACK_TIMEOUT?); see $stack/$1.log" >&2
      return 1
    fi
    sleep 1
  done
  echo "$1 healthy at ${2%/*}  (log: $stack/$1.log)"
}

launch() {  # name url command...
  local name="$1" url="$2"; shift 2
  if running "$name"; then echo "$name already running (pid $(cat "$stack/$name.pid"))"; return; fi
  if healthy "$url"; then
    echo "something else already answers at $url: stop it or set a different port" >&2; return 1
  fi
  # setsid: its own process group, so stop ends the server's workers too.
  setsid "$@" >"$stack/$name.log" 2>&1 </dev/null &
  echo $! >"$stack/$name.pid"
}

start() {
  mkdir -p "$stack/prefect-home" "$stack/mlflow-artifacts"
  export PREFECT_HOME="$stack/prefect-home" PREFECT_SERVER_ANALYTICS_ENABLED=false \
    PREFECT_API_DATABASE_CONNECTION_URL="sqlite+aiosqlite:///$stack/prefect.db" \
    MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false MLFLOW_DISABLE_TELEMETRY=true
  unset PREFECT_API_URL MLFLOW_TRACKING_URI
  launch prefect "$prefect_url/api/health" "$bin/prefect" server start --host "$host" --port "$prefect_port"
  launch mlflow "$mlflow_url/health" "$bin/mlflow" server --host "$host" --port "$mlflow_port" --workers 1 \
    --backend-store-uri "sqlite:///$stack/mlflow.db" --artifacts-destination "$stack/mlflow-artifacts"
  wait_healthy prefect "$prefect_url/api/health" && wait_healthy mlflow "$mlflow_url/health" || {
    echo "start-up failed: 'infra/stack.sh stop' cleans up" >&2; exit 1; }
  echo
  echo "export PREFECT_API_URL=$prefect_url/api MLFLOW_TRACKING_URI=$mlflow_url"
  echo "Prefect UI: $prefect_url   MLflow UI: $mlflow_url"
  echo "next: infra/work-pools.sh && prefect --no-prompt deploy --all --prefect-file infra/prefect.yaml"
  echo "      LORAOPS_PROJECT_DIR=$root prefect worker start --pool cpu   # runs retrain (make worker-cpu)"
  echo "      a gpu worker (make worker-gpu) only for orchestration.train_deployment: train-adapter/train-adapter"
}

stop_one() {
  local name="$1"
  if ! running "$name"; then echo "$name not running"; rm -f "$stack/$name.pid"; return; fi
  local pid; pid="$(cat "$stack/$name.pid")"
  kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid"
  for _ in $(seq 1 20); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
  if kill -0 "$pid" 2>/dev/null; then kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid"; fi
  rm -f "$stack/$name.pid"
  echo "$name stopped"
}

status() {
  local name url rc=0
  for name in prefect mlflow; do
    [[ $name == prefect ]] && url="$prefect_url/api/health" || url="$mlflow_url/health"
    if healthy "$url"; then echo "$name: healthy at ${url%/*}"
    elif running "$name"; then echo "$name: starting or stuck (pid $(cat "$stack/$name.pid")); see $stack/$name.log"; rc=1
    else echo "$name: not running — start it with infra/stack.sh start"; rc=1
    fi
  done
  return $rc
}

case "${1:-start}" in
  start) start ;;
  stop) stop_one mlflow; stop_one prefect ;;
  status) status ;;
  env) echo "export PREFECT_API_URL=$prefect_url/api MLFLOW_TRACKING_URI=$mlflow_url" ;;
  *) echo "usage: infra/stack.sh [start|stop|status|env]" >&2; exit 2 ;;
esac
