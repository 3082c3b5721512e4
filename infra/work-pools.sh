#!/usr/bin/env bash
# Create (or update) the loraops work pools on the Prefect server at $PREFECT_API_URL.
#
#   infra/work-pools.sh                    # cpu and gpu process pools
#   infra/work-pools.sh docker kubernetes  # also gpu-docker / gpu-kubernetes from infra/work-pools/*.json
#
# gpu pools get a concurrency limit of 1 (GPU_POOL_LIMIT): one training per GPU. To scale out, give
# each GPU host its own pool (gpu-a100-1, ...) with limit 1, or one shared pool with the limit set
# to the number of GPU workers (each worker then runs one training: `--limit 1`).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
prefect="${PREFECT:-prefect}"
gpu_limit="${GPU_POOL_LIMIT:-1}"

if [[ -z "${PREFECT_API_URL:-}" ]]; then
  echo "PREFECT_API_URL is not set: start the server (infra/stack.sh) and export the URL it prints" >&2
  exit 2
fi
if ! "$prefect" --no-prompt work-pool ls >/dev/null 2>&1; then
  echo "Prefect server at $PREFECT_API_URL does not answer: start it with infra/stack.sh (or docker compose -f infra/docker-compose.yml up -d)" >&2
  exit 2
fi

create() {  # name type [base job template]
  local args=("$1" --type "$2" --overwrite)
  [[ $# -ge 3 ]] && args+=(--base-job-template "$3")
  "$prefect" --no-prompt work-pool create "${args[@]}" >/dev/null
  echo "work pool $1 ($2) ready"
}

create cpu process
create gpu process
"$prefect" --no-prompt work-pool set-concurrency-limit gpu "$gpu_limit" >/dev/null
for extra in "$@"; do
  case "$extra" in
    docker|kubernetes) create "gpu-$extra" "$extra" "$here/work-pools/gpu-$extra.json"
      "$prefect" --no-prompt work-pool set-concurrency-limit "gpu-$extra" "$gpu_limit" >/dev/null ;;
    *) echo "unknown pool kind '$extra' (docker, kubernetes)" >&2; exit 2 ;;
  esac
done
echo "gpu pool concurrency limit: $gpu_limit"
# Workers send heartbeats (PREFECT_FLOWS_HEARTBEAT_FREQUENCY=60); a run whose heartbeats stop is marked Crashed.
"${PYTHON:-python}" "$here/automations.py" --heartbeat-seconds "${HEARTBEAT_SECONDS:-60}"
