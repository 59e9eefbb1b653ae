#!/usr/bin/env bash
# The GPU campaign of issue 19: under 8 minutes on one H100/H200, dated records in bench/results/.
# Steps (bench/gpu.py says more): a 160M bf16 smoke run with generation, the fp16 loss-scale path,
# generation tokens/s, and tokens/s + MFU of 160M/410M/1.4B in bf16, eager and compiled, with and without
# selective recomputation where the config has it.
#
#   bash bench/gpu.sh              # on a GPU machine, from the neo checkout
#   bash bench/gpu.sh --dry-run    # on a CPU: every step with the tiny model, records to a temp folder
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
if [ "${1:-}" != "--dry-run" ] && ! "$PYTHON" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    echo "bench/gpu.sh: torch sees no GPU here; on a CPU run: bash bench/gpu.sh --dry-run" >&2
    exit 2
fi
exec "$PYTHON" bench/gpu.py "$@"
