#!/usr/bin/env bash
# Download the wheels the GPU benchmark needs beyond the lent machine's image into bench/wheels/
# (ignored by git; carried to the machine). The image (Python 3.12, torch 2.11 cu130, transformers 5.17,
# peft 0.21, accelerate 1.15, triton, numpy, pandas, pyarrow, pyyaml, tokenizers, huggingface-hub, xxhash,
# fsspec, psutil, jinja2) lacks trl, bitsandbytes, datasets (+ dill, multiprocess), liger-kernel and
# pydantic (loraops.config). The device tool carries at most 64 MiB with the working tree: checked below.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=bench/wheels
LIMIT_MB=${LIMIT_MB:-60}
PYTHON=${PYTHON:-.venv/bin/python}
WHEELS=(
  trl==1.16.0
  bitsandbytes==0.50.2          # manylinux x86_64: CPU + CUDA 11.8-13.2 libraries in one wheel (43 MB)
  datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
  liger-kernel==0.8.5
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0
)
mkdir -p "$DEST"
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d "$DEST" "${WHEELS[@]}"
ls -l "$DEST"
total_mb=$(du -cm "$DEST"/*.whl | tail -1 | cut -f1)
echo "bench/wheels: ${total_mb} MB in $(ls "$DEST"/*.whl | wc -l) wheels (limit ${LIMIT_MB} MB, leaving room for the working tree)"
if [ "$total_mb" -gt "$LIMIT_MB" ]; then
  echo "bench/wheels is over ${LIMIT_MB} MB: the device tool carries at most 64 MiB with the working tree" >&2
  exit 1
fi
