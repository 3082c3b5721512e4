#!/usr/bin/env bash
# The training benchmark on a lent GPU machine, in one call (the whole device allowance is 15 minutes,
# the machine's start included). From the repository root, after `make bench-wheels` here:
#
#   device run: command "bash bench/gpu_run.sh", carry ["bench/wheels"], timeout_s 600
#
# 1. installs the carried wheels (bench/wheels) next to the image's torch/transformers/peft;
# 2. a CPU smoke run of the bench (proves the stack imports and trains; ~30 s);
# 3. the GPU run: Llama-3.1-8B-shaped random model, five configurations, no configuration started after
#    BENCH_BUDGET_S seconds; results are rewritten after each configuration, so a cut run keeps its rows.
# Everything lands in $OUT (bench/results without the device tool): JSON, markdown table, logs.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results}
BUDGET_S=${BENCH_BUDGET_S:-330}
STEPS=${BENCH_STEPS:-20}
PY=${PYTHON:-python3}
SITE=/tmp/loraops-bench-site
mkdir -p "$OUT"
started=$(date +%s)

"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" bench/wheels/*.whl \
  || { echo "wheel install failed: run 'make bench-wheels' and carry bench/wheels" >&2; exit 1; }
export PYTHONPATH="$SITE:$PWD" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 \
  TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  df -h /dev/shm /tmp | sed 1d
  "$PY" - <<'PYEOF'
import importlib.metadata as md
for name in ("torch", "transformers", "peft", "accelerate", "trl", "bitsandbytes", "datasets", "liger-kernel",
             "triton", "pyarrow", "pydantic", "huggingface-hub", "numpy", "tokenizers"):
    try:
        print(name, md.version(name))
    except md.PackageNotFoundError:
        print(name, "MISSING")
import datasets, trl, bitsandbytes, liger_kernel, loraops.train.trainer  # noqa: F401 - fail here, not mid-run
print("imports ok")
PYEOF
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
echo "[gpu_run] setup $(( $(date +%s) - started )) s"

CUDA_VISIBLE_DEVICES="" timeout 120 "$PY" bench/train_bench.py --mode smoke --out "$OUT/train_bench-smoke.json" \
  > "$OUT/smoke.log" 2>&1 && echo "[gpu_run] smoke ok" || echo "[gpu_run] smoke FAILED (see smoke.log)"
grep -E "^\[train_bench\]" "$OUT/smoke.log"
echo "[gpu_run] smoke done at $(( $(date +%s) - started )) s"

# the random 16 GB base is saved once and reloaded per configuration: RAM-backed when /dev/shm has room
work=/tmp/loraops-bench
if [ "$(df -Pk /dev/shm 2>/dev/null | awk 'NR==2 {print $4}')" -gt 40000000 ] 2>/dev/null; then work=/dev/shm/loraops-bench; fi
timeout $(( 560 - ($(date +%s) - started) )) "$PY" bench/train_bench.py --mode gpu --steps "$STEPS" \
  --time-budget-s "$BUDGET_S" --work-dir "$work" --out "$OUT/train_bench-gpu.json" --markdown "$OUT/train_bench-gpu.md" \
  2>&1 | grep -v -E "it/s\]|s/it\]" > "$OUT/gpu.log"
status=${PIPESTATUS[0]}
grep -E "^\[train_bench\]|Error|error" "$OUT/gpu.log" | tail -40
cat "$OUT/train_bench-gpu.md" 2>/dev/null
rm -rf "$work"
echo "[gpu_run] gpu mode exit $status, total $(( $(date +%s) - started )) s"
exit "$status"
